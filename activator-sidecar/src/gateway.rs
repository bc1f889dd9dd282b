//! The gateway role: one port for all external traffic, routed by `Host`.
//!
//! `{service}.{namespace}.{domain}` reaches a Service (split between its revisions by
//! `spec.traffic`), `{tag}-{service}.{namespace}.{domain}` reaches a tagged revision. The
//! request then waits — at most the revision's `timeoutSeconds` — for a ready replica, and is
//! forwarded to the least busy of two replicas picked at random (power of two choices, as
//! Knative does for `containerConcurrency: 0`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, header};
use http_body::Body;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use mecha_common::routing::{ServiceKey, normalize_host};
use mecha_common::{Endpoint, EndpointTable, Route, RouteTarget, RoutingTable};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::proxy::{Failure, Forwarder, RequestBody};

/// Attempts on other replicas when a body-less request could not connect (the replica died
/// between being picked and being dialled).
const CONNECT_RETRIES: usize = 2;

#[derive(Debug, Clone)]
pub struct Gateway {
    routes: watch::Receiver<Arc<RoutingTable>>,
    endpoints: watch::Receiver<Arc<EndpointTable>>,
    forwarder: Forwarder,
    domain: Arc<str>,
    metrics: Metrics,
}

#[derive(Debug, Clone)]
struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

// === impl Gateway ===

impl Gateway {
    /// `domain` is the host suffix services answer on (`localhost` locally); it only appears
    /// in the 404 message.
    pub fn new(
        routes: watch::Receiver<Arc<RoutingTable>>,
        endpoints: watch::Receiver<Arc<EndpointTable>>,
        domain: &str,
        registry: &Registry,
    ) -> Self {
        Self {
            routes,
            endpoints,
            forwarder: Forwarder::new(),
            domain: domain.into(),
            metrics: Metrics::register(registry),
        }
    }

    /// Serves one request; every failure becomes a response with a status and a message.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let (service, response) = match self.route(request, peer).await {
            Ok((service, response)) => (service.to_string(), response),
            Err((service, error)) => {
                let status = error.status();
                if status.is_server_error() {
                    tracing::warn!(%error, %status, "request failed");
                } else {
                    tracing::debug!(%error, %status, "request refused");
                }
                (
                    service.map_or_else(|| "-".to_string(), |s| s.to_string()),
                    error.into_response(),
                )
            }
        };
        self.metrics
            .requests
            .with_label_values(&[&service, response.status().as_str()])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[&service])
            .observe(started.elapsed().as_secs_f64());
        response
    }

    async fn route(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<(ServiceKey, Response<ProxyBody>), (Option<ServiceKey>, ProxyError)> {
        let host = request_host(&request).ok_or((None, ProxyError::MissingHost))?;
        let route: Arc<Route> = self.routes.borrow().lookup(&host).cloned().ok_or_else(|| {
            (
                None,
                ProxyError::UnknownHost {
                    host: host.clone(),
                    domain: self.domain.to_string(),
                },
            )
        })?;
        let service = route.service.clone();
        let target = route.pick(fastrand::u32(0..100)).cloned().ok_or_else(|| {
            (
                Some(service.clone()),
                no_replica(&service, "-", Duration::ZERO),
            )
        })?;
        self.forward(request, &service, &target, peer)
            .await
            .map(|response| (service.clone(), response))
            .map_err(|error| (Some(service), error))
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        service: &ServiceKey,
        target: &RouteTarget,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let deadline = Instant::now() + target.timeout;
        let (parts, body) = request.into_parts();
        // A request without a body can be replayed on another replica; keep what it takes.
        let replay = body.is_end_stream().then(|| replayable(&parts));
        let mut request = Some(Request::from_parts(
            parts,
            if replay.is_some() {
                Either::Right(Empty::new())
            } else {
                Either::Left(body)
            },
        ));
        let mut failed: Vec<Endpoint> = Vec::new();
        loop {
            let endpoint = self
                .ready_endpoint(&target.revision, &failed, deadline)
                .await
                .ok_or_else(|| no_replica(service, &target.revision, target.timeout))?;
            // Only replayable requests come round a second time.
            let Some(attempt) = request.take().or_else(|| replay.as_ref().map(|r| r())) else {
                return Err(ProxyError::Upstream {
                    service: service.clone(),
                    source: "the request body was already sent".into(),
                });
            };
            let forwarded = tokio::time::timeout_at(
                deadline,
                self.forwarder
                    .forward(attempt, &endpoint, target.protocol, peer, deadline),
            )
            .await
            .map_err(|_| ProxyError::Timeout {
                service: service.clone(),
                timeout: target.timeout,
            })?;
            match forwarded {
                Ok(response) => return Ok(response),
                Err(Failure::Connect(source))
                    if replay.is_some() && failed.len() < CONNECT_RETRIES =>
                {
                    tracing::debug!(replica = %endpoint.replica, %source, "connect failed; retrying elsewhere");
                    failed.push(endpoint);
                }
                Err(Failure::Connect(source) | Failure::Other(source)) => {
                    return Err(ProxyError::Upstream {
                        service: service.clone(),
                        source,
                    });
                }
            }
        }
    }

    /// A ready replica of `revision` other than those in `exclude`, waiting for one to become
    /// ready until `deadline`.
    async fn ready_endpoint(
        &self,
        revision: &str,
        exclude: &[Endpoint],
        deadline: Instant,
    ) -> Option<Endpoint> {
        let mut endpoints = self.endpoints.clone();
        loop {
            let picked = {
                let table = endpoints.borrow_and_update();
                let candidates: Vec<&Endpoint> = table
                    .ready(revision)
                    .iter()
                    .filter(|e| !exclude.iter().any(|x| x.same(e)))
                    .collect();
                pick_least_loaded(&candidates).cloned()
            };
            if picked.is_some() {
                return picked;
            }
            match tokio::time::timeout_at(deadline, endpoints.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }
}

fn no_replica(service: &ServiceKey, revision: &str, waited: Duration) -> ProxyError {
    ProxyError::NoReadyReplica {
        service: service.clone(),
        revision: revision.to_string(),
        waited,
    }
}

/// Power of two choices: of two random replicas, the one with fewer requests in flight.
fn pick_least_loaded<'a>(candidates: &[&'a Endpoint]) -> Option<&'a Endpoint> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let a = fastrand::usize(0..n);
            let b = (a + 1 + fastrand::usize(0..n - 1)) % n;
            let (a, b) = (candidates[a], candidates[b]);
            Some(if b.in_flight() < a.in_flight() { b } else { a })
        }
    }
}

/// The host a request is for: the URI authority (HTTP/2, absolute-form) or the Host header.
fn request_host<B>(request: &Request<B>) -> Option<String> {
    let raw = match request.uri().authority() {
        Some(authority) => authority.as_str().to_string(),
        None => request
            .headers()
            .get(header::HOST)?
            .to_str()
            .ok()?
            .to_string(),
    };
    let host = normalize_host(&raw);
    (!host.is_empty()).then_some(host)
}

/// What it takes to send a body-less request again.
fn replayable(parts: &Parts) -> impl Fn() -> Request<RequestBody> + use<> {
    let method = parts.method.clone();
    let uri = parts.uri.clone();
    let version = parts.version;
    let headers = parts.headers.clone();
    move || {
        let mut request = Request::new(Either::Right(Empty::<Bytes>::new()));
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        *request.version_mut() = version;
        *request.headers_mut() = headers.clone();
        request
    }
}

// === impl Metrics ===

impl Metrics {
    fn register(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "mecha_gateway_requests_total",
                "Requests served by the gateway",
            ),
            &["service", "code"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "mecha_gateway_request_duration_seconds",
                "Time from request to response headers, queueing for a replica included",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
            &["service"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(requests.clone()));
        let _ = registry.register(Box::new(duration.clone()));
        Self { requests, duration }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_of_two_choices_prefers_the_idle_replica() {
        let busy = Endpoint::new("busy", "127.0.0.1:1".parse().expect("addr"));
        let idle = Endpoint::new("idle", "127.0.0.1:2".parse().expect("addr"));
        let _load: Vec<_> = (0..5).map(|_| busy.track()).collect();
        for _ in 0..50 {
            let picked = pick_least_loaded(&[&busy, &idle]).expect("pick");
            assert_eq!(&*picked.replica, "idle");
        }
        assert!(pick_least_loaded(&[]).is_none());
    }

    #[test]
    fn host_comes_from_authority_or_header() {
        let request = Request::builder()
            .uri("/x")
            .header(header::HOST, "Hello.Default.localhost:8080")
            .body(())
            .expect("request");
        assert_eq!(
            request_host(&request).as_deref(),
            Some("hello.default.localhost")
        );
        let request = Request::builder()
            .uri("http://a.b.localhost/x")
            .body(())
            .expect("request");
        assert_eq!(request_host(&request).as_deref(), Some("a.b.localhost"));
    }
}
