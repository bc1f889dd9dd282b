//! Forwarding one request that hyper parsed to one replica: HTTP/1.1 or h2c upstream, the
//! hop rules of [`crate::rules`] applied to both heads, bodies streamed both ways, and
//! protocol upgrades (WebSocket) spliced through.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mecha_common::routing::UpstreamProtocol;
use mecha_common::{Endpoint, LoadGuard};
use tokio::time::Instant;

use crate::body::{ProxyBody, Streamed, empty};
use crate::error::Failure;
use crate::rules::{self, HopPolicy, Peer};

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
    /// `deadline`; `peer` and `policy` give the forwarding headers.
    /// `guard` counts the request against the endpoint for the whole exchange, body included.
    #[allow(clippy::too_many_arguments)]
    pub async fn forward(
        &self,
        request: Request<RequestBody>,
        endpoint: &Endpoint,
        guard: LoadGuard,
        protocol: UpstreamProtocol,
        peer: SocketAddr,
        policy: &HopPolicy,
        deadline: Instant,
    ) -> Result<Response<ProxyBody>, Failure> {
        let upgrade = is_upgrade(request.headers());
        let (mut parts, body) = request.into_parts();
        prepare_request(&mut parts, endpoint.addr, peer, policy, protocol, upgrade)
            .map_err(Failure::Refused)?;
        let request = Request::from_parts(parts, body);
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
                Failure::Upstream(error.into())
            }
        })?;
        let (mut parts, body) = response.into_parts();
        response_hop(&mut parts.headers);
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

/// Applies the hop rules to a request head for `addr`: the host (an absolute target's
/// authority replaces `Host`), hop-by-hop headers out (an upgrade keeps `Connection` and
/// `Upgrade`), forwarding headers in; the target becomes what the upstream client needs.
fn prepare_request(
    parts: &mut Parts,
    addr: SocketAddr,
    peer: SocketAddr,
    policy: &HopPolicy,
    protocol: UpstreamProtocol,
    upgrade: bool,
) -> Result<(), rules::Refusal> {
    if let Some(authority) = parts.uri.authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, value);
    }
    let version = u8::from(parts.version != Version::HTTP_10);
    let peer = Peer::new(peer.ip(), policy);
    let (drop, add) = {
        let facts = rules::check_request(
            parts.method.as_str(),
            version,
            parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes())),
        )?;
        let drop: Vec<HeaderName> = parts
            .headers
            .keys()
            .filter(|name| {
                !rules::forwards(name.as_str(), &facts.connection)
                    && !(upgrade && (*name == header::CONNECTION || *name == header::UPGRADE))
            })
            .cloned()
            .collect();
        let mut add = rules::Collected::default();
        rules::forwarding_headers(&facts, &peer, policy, facts.host, &mut add);
        (drop, add)
    };
    for name in drop {
        parts.headers.remove(name);
    }
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        // Checked to be exactly `chunked`: spelled one way for the next hop, as the fast path
        // writes it.
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    for (name, value) in add.headers {
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            parts.headers.insert(name, value);
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    // The pooled client wants an absolute URI (it picks the connection by it); an upgrade's
    // own connection sends the target as the replica must see it: origin form.
    parts.uri = if upgrade {
        Uri::try_from(path).ok()
    } else {
        Uri::builder()
            .scheme("http")
            .authority(addr.to_string())
            .path_and_query(path)
            .build()
            .ok()
    }
    .unwrap_or_else(|| Uri::from_static("/"));
    parts.version = match protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2c => Version::HTTP_2,
    };
    if protocol == UpstreamProtocol::H2c {
        parts.headers.remove(header::HOST);
    }
    Ok(())
}

/// Applies the hop rules to a response head: hop-by-hop headers, and those its `Connection`
/// names, stay behind.
fn response_hop(headers: &mut HeaderMap) {
    let drop: Vec<HeaderName> = {
        let facts = rules::check_response(headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())))
            .unwrap_or_default();
        headers
            .keys()
            .filter(|name| !rules::forwards_response(name.as_str(), &facts.connection))
            .cloned()
            .collect()
    };
    for name in drop {
        headers.remove(name);
    }
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
        .map_err(|e| Failure::Upstream(e.into()))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = response.into_parts();
        response_hop(&mut parts.headers);
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

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut request = Request::builder().uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("request").into_parts().0
    }

    #[test]
    fn requests_follow_the_hop_rules() {
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let peer: SocketAddr = "10.0.0.7:5555".parse().expect("peer");
        let mut head = parts(
            "/a?b",
            &[
                ("host", "a.b"),
                ("connection", "keep-alive, x-private"),
                ("x-private", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("x-forwarded-proto", "https"),
                ("x-kept", "1"),
                ("x-kept", "2"),
            ],
        );
        let policy = HopPolicy::default();
        prepare_request(
            &mut head,
            addr,
            peer,
            &policy,
            UpstreamProtocol::Http1,
            false,
        )
        .expect("valid");
        assert_eq!(head.uri, "http://127.0.0.1:9/a?b");
        let names: Vec<&str> = head.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "host",
                "x-kept",
                "x-forwarded-for",
                "x-forwarded-proto",
                "forwarded"
            ]
        );
        assert_eq!(head.headers.get_all("x-kept").iter().count(), 2);
        assert_eq!(head.headers["x-forwarded-proto"], "http");
        assert_eq!(
            head.headers["forwarded"],
            "for=10.0.0.7;proto=http;host=a.b"
        );
        // An absolute target's authority is the host; an upgrade keeps origin form.
        let mut head = parts(
            "http://c.d:8080/ws",
            &[
                ("host", "a.b"),
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
            ],
        );
        prepare_request(
            &mut head,
            addr,
            peer,
            &policy,
            UpstreamProtocol::Http1,
            true,
        )
        .expect("valid");
        assert_eq!(head.uri, "/ws");
        assert_eq!(head.headers["host"], "c.d:8080");
        assert_eq!(head.headers["upgrade"], "websocket");
        let mut head = parts("/", &[("host", "a.b"), ("connection", "content-length")]);
        assert!(
            prepare_request(
                &mut head,
                addr,
                peer,
                &policy,
                UpstreamProtocol::Http1,
                false
            )
            .is_err()
        );
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
