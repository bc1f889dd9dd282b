//! Forwarding one request to one replica: HTTP/1.1 or h2c upstream, hop-by-hop headers
//! removed, `X-Forwarded-*` added, bodies streamed both ways, and protocol upgrades
//! (WebSocket) spliced through.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mecha_common::routing::UpstreamProtocol;
use mecha_common::{Endpoint, LoadGuard};
use tokio::time::Instant;

use crate::body::{BoxError, ProxyBody, Streamed, empty};

/// Headers that describe one connection, not the request: never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Why a forward failed; [`Failure::Connect`] means the replica never saw the request.
#[derive(Debug)]
pub enum Failure {
    Connect(BoxError),
    Other(BoxError),
}

/// A request body on its way to a replica: streamed from the client, or empty — an empty
/// request can be sent again to another replica when the first one could not be reached.
pub type RequestBody = Either<Incoming, Empty<Bytes>>;

/// Connection pools to replicas, one per upstream protocol.
#[derive(Debug, Clone)]
pub struct Forwarder {
    http1: Client<HttpConnector, RequestBody>,
    h2c: Client<HttpConnector, RequestBody>,
}

// === impl Forwarder ===

impl Forwarder {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .build(connector.clone());
        let h2c = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Self { http1, h2c }
    }

    /// Sends `request` to `endpoint` and returns its response with a body that streams until
    /// `deadline`.
    /// `guard` counts the request against the endpoint for the whole exchange, body included.
    pub async fn forward(
        &self,
        mut request: Request<RequestBody>,
        endpoint: &Endpoint,
        guard: LoadGuard,
        protocol: UpstreamProtocol,
        peer: SocketAddr,
        deadline: Instant,
    ) -> Result<Response<ProxyBody>, Failure> {
        let upgrade = is_upgrade(request.headers());
        prepare_request(&mut request, endpoint.addr, peer, protocol, upgrade);
        if upgrade && protocol == UpstreamProtocol::Http1 {
            return forward_upgrade(request, endpoint.addr, guard, deadline).await;
        }
        let client = match protocol {
            UpstreamProtocol::Http1 => &self.http1,
            UpstreamProtocol::H2c => &self.h2c,
        };
        let response = client.request(request).await.map_err(|error| {
            if error.is_connect() {
                Failure::Connect(error.into())
            } else {
                Failure::Other(error.into())
            }
        })?;
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = Streamed::new(body, Some(guard), deadline);
        Ok(Response::from_parts(parts, body.boxed_unsync()))
    }
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the request asks to switch protocols (`Connection: upgrade` + `Upgrade`).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

fn prepare_request(
    request: &mut Request<RequestBody>,
    addr: SocketAddr,
    peer: SocketAddr,
    protocol: UpstreamProtocol,
    upgrade: bool,
) {
    // HTTP/2 clients send the host as :authority; HTTP/1.1 replicas expect a Host header.
    if !request.headers().contains_key(header::HOST)
        && let Some(authority) = request.uri().authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        request.headers_mut().insert(header::HOST, value);
    }
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    *request.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(addr.to_string())
        .path_and_query(path)
        .build()
        .unwrap_or_else(|_| Uri::from_static("/"));
    *request.version_mut() = match protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2c => Version::HTTP_2,
    };
    let headers = request.headers_mut();
    if !upgrade {
        strip_hop_by_hop(headers);
    }
    if protocol == UpstreamProtocol::H2c {
        headers.remove(header::HOST);
    }
    let peer_ip = peer.ip().to_string();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {peer_ip}"),
        None => peer_ip,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    headers
        .entry("x-forwarded-proto")
        .or_insert(HeaderValue::from_static("http"));
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// An upgrade gets a connection of its own (it is never returned to a pool): send the
/// request, and on `101 Switching Protocols` splice the two upgraded streams together.
async fn forward_upgrade(
    mut request: Request<RequestBody>,
    addr: SocketAddr,
    guard: LoadGuard,
    deadline: Instant,
) -> Result<Response<ProxyBody>, Failure> {
    let downstream = hyper::upgrade::on(&mut request);
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| Failure::Connect(e.into()))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Failure::Connect(e.into()))?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upgrade connection ended");
        }
    });
    let mut response = sender
        .send_request(request)
        .await
        .map_err(|e| Failure::Other(e.into()))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = Streamed::new(body, Some(guard), deadline);
        return Ok(Response::from_parts(parts, body.boxed_unsync()));
    }
    let upstream = hyper::upgrade::on(&mut response);
    tokio::spawn(async move {
        // The replica stays counted busy for as long as the upgraded stream lives.
        let _guard = guard;
        match tokio::try_join!(downstream, upstream) {
            Ok((downstream, upstream)) => {
                let mut downstream = TokioIo::new(downstream);
                let mut upstream = TokioIo::new(upstream);
                let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
            }
            Err(error) => tracing::debug!(%error, "upgrade failed"),
        }
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn upgrade_detection() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(!is_upgrade(&headers));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&headers));
    }
}
