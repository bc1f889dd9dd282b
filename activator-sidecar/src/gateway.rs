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
use mecha_common::activation::{BufferFull, Waiting};
use mecha_common::outlier::OutlierConfig;
use mecha_common::routing::{ServiceKey, UpstreamProtocol, normalize_host};
use mecha_common::{
    Activation, Endpoint, EndpointTable, LoadGuard, Route, RouteTarget, RoutingTable,
};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::error::Failure;
use crate::error::ProxyError;
use crate::h1::{Answer, Decision, Role, codec::RequestHead};
use crate::outlier::Outliers;
use crate::proxy::{Forwarder, RequestBody};
use crate::rules::{self, HopPolicy, TraceId, TrustedProxies};

/// Attempts on other replicas when a body-less request could not connect (the replica died
/// between being picked and being dialled).
const CONNECT_RETRIES: usize = 2;

#[derive(Debug, Clone)]
pub struct Gateway {
    routes: watch::Receiver<Arc<RoutingTable>>,
    endpoints: watch::Receiver<Arc<EndpointTable>>,
    /// Where requests without a free replica are held, and the autoscaler poked.
    activation: Activation,
    forwarder: Forwarder,
    domain: Arc<str>,
    policy: Arc<HopPolicy>,
    /// Takes replicas that stop answering out of rotation.
    outliers: Outliers,
    /// The outbound role's: a host that is no Service's is passed on to where it names
    /// ([`Gateway::with_pass_through`]).
    pass_through: Option<PassThrough>,
    metrics: Metrics,
}

/// How the outbound role passes calls for other hosts on.
#[derive(Debug, Clone)]
struct PassThrough {
    timeout: Duration,
    /// The proxy's own address, never a destination (a call to it would come back forever).
    own: SocketAddr,
    /// Calls passed through at once: each holds two sockets until its answer or timeout, and
    /// the destination is the caller's choice, so they are bounded apart from calls to
    /// functions.
    slots: Arc<tokio::sync::Semaphore>,
}

/// Most calls the outbound role passes through at once.
pub const MAX_PASSED_THROUGH: usize = 256;

/// The service label of calls the outbound role passed through.
const PASSED_THROUGH: &str = "(pass-through)";

#[derive(Debug, Clone)]
struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    buffered: IntGaugeVec,
    held: HistogramVec,
}

// === impl Gateway ===

impl Gateway {
    /// `domain` is the host suffix services answer on (`localhost` locally); it only appears
    /// in the 404 message.
    pub fn new(
        routes: watch::Receiver<Arc<RoutingTable>>,
        endpoints: watch::Receiver<Arc<EndpointTable>>,
        activation: Activation,
        domain: &str,
        registry: &Registry,
    ) -> Self {
        Self {
            routes,
            endpoints,
            activation,
            forwarder: Forwarder::new(),
            domain: domain.into(),
            policy: Arc::new(HopPolicy {
                trusted: TrustedProxies::none(),
                start_trace: true,
            }),
            outliers: Outliers::new(OutlierConfig::DEFAULT, registry),
            pass_through: None,
            metrics: Metrics::register(registry),
        }
    }

    /// The outbound role: a plain-HTTP call for a host that is no Service's goes on to that
    /// host as an ordinary forward proxy would send it (within `timeout`), so a meshed
    /// function's other calls still work through `HTTP_PROXY`. Never for the gateway, which
    /// would become an open proxy. A call for the proxy's own address (`own`, where it
    /// listens) is refused rather than sent round in a loop.
    pub fn with_pass_through(mut self, timeout: Duration, own: SocketAddr) -> Self {
        self.pass_through = Some(PassThrough {
            timeout,
            own,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_PASSED_THROUGH)),
        });
        self
    }

    /// Ejects replicas that fail requests in a row as `config` says (by default 3 failures,
    /// 30 s growing to 300 s; [`mecha_common::outlier`]).
    pub fn with_outlier_detection(mut self, config: OutlierConfig) -> Self {
        self.outliers = self.outliers.with_config(config);
        self
    }

    /// Records whether one attempt at `endpoint` (of `revision`) got a response head — the one
    /// place both paths report to the outlier detector.
    fn record_reply(
        &self,
        service: &ServiceKey,
        revision: &str,
        endpoint: &Endpoint,
        reply: Result<(), &Failure>,
    ) {
        if Outliers::judge(reply).is_none() {
            return;
        }
        let table = self.endpoints.borrow();
        self.outliers
            .record(service, revision, endpoint, table.ready(revision), reply);
    }

    /// Believes the forwarding headers of these proxies (by default, nobody's: the gateway is
    /// where requests enter, so it describes the client as it saw it).
    pub fn with_trusted_proxies(mut self, trusted: TrustedProxies) -> Self {
        self.policy = Arc::new(HopPolicy {
            trusted,
            start_trace: true,
        });
        self
    }

    /// Serves one request; every failure becomes a response with a status and a message.
    pub async fn handle(
        &self,
        mut request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let existing = request.headers().get("traceparent").map(|v| v.as_bytes());
        let (trace, new) = rules::trace(&self.policy, existing);
        if let Some(traceparent) = new
            && let Ok(value) = http::HeaderValue::from_bytes(&traceparent)
        {
            request.headers_mut().insert("traceparent", value);
        }
        let (service, revision, response) = match self.route(request, peer).await {
            Ok((service, revision, response)) => (Some(service), Some(revision), response),
            Err((service, revision, error)) => {
                log_refusal(&error, trace);
                (service, revision, error.into_response())
            }
        };
        let status = response.status();
        tracing::debug!(trace_id = trace.map(tracing::field::display), service = %label(service.as_ref()), %status, "request");
        self.record(service.as_ref(), revision.as_deref(), status, started);
        response
    }

    /// Counts an answered request and its duration under its service and revision (`-` for
    /// what it never reached).
    fn record(
        &self,
        service: Option<&ServiceKey>,
        revision: Option<&str>,
        status: http::StatusCode,
        started: Instant,
    ) {
        let [namespace, name, revision] = labels(service, revision);
        self.metrics
            .requests
            .with_label_values(&[namespace, name, revision, status.as_str()])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[namespace, name, revision])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The service and revision a host reaches; the refusal names the service when known.
    fn target(&self, host: &str) -> Result<(ServiceKey, RouteTarget), Refusal> {
        let route: Arc<Route> = self.routes.borrow().lookup(host).cloned().ok_or_else(|| {
            Box::new((
                None,
                ProxyError::UnknownHost {
                    host: host.to_string(),
                    domain: self.domain.to_string(),
                },
            ))
        })?;
        let service = route.service.clone();
        let target = route.pick(fastrand::u32(0..100)).cloned().ok_or_else(|| {
            Box::new((
                Some(service.clone()),
                no_replica(&service, "-", Duration::ZERO),
            ))
        })?;
        Ok((service, target))
    }

    async fn route(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<
        (ServiceKey, String, Response<ProxyBody>),
        (Option<ServiceKey>, Option<String>, ProxyError),
    > {
        let host = request_host(&request).ok_or((None, None, ProxyError::MissingHost))?;
        let (service, target) = match self.target(&host) {
            Ok(found) => found,
            Err(refusal) => match (*refusal, self.pass_through.clone()) {
                ((_, ProxyError::UnknownHost { .. }), Some(pass)) => {
                    let service = ServiceKey::new("-", PASSED_THROUGH);
                    return self
                        .pass_on(request, peer, pass)
                        .await
                        .map(|response| (service, "-".to_string(), response))
                        .map_err(|error| (None, None, error));
                }
                ((service, error), _) => return Err((service, None, error)),
            },
        };
        self.forward(request, &service, &target, peer)
            .await
            .map(|response| (service.clone(), target.revision.clone(), response))
            .map_err(|error| (Some(service), Some(target.revision.clone()), error))
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
        let declared_bytes = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
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
        let mut failed: Vec<SocketAddr> = Vec::new();
        loop {
            let (endpoint, guard) = self
                .ready_endpoint(service, target, &failed, declared_bytes, deadline)
                .await?;
            // Only replayable requests come round a second time.
            let Some(attempt) = request.take().or_else(|| replay.as_ref().map(|r| r())) else {
                return Err(ProxyError::Upstream {
                    service: service.clone(),
                    source: "the request body was already sent".into(),
                });
            };
            let forwarded = tokio::time::timeout_at(
                deadline,
                self.forwarder.forward(
                    attempt,
                    &endpoint,
                    guard,
                    target.protocol,
                    peer,
                    &self.policy,
                    deadline,
                ),
            )
            .await
            .unwrap_or(Err(Failure::Timeout));
            self.record_reply(
                service,
                &target.revision,
                &endpoint,
                forwarded.as_ref().map(|_| ()),
            );
            match forwarded {
                Ok(response) => return Ok(response),
                Err(Failure::Connect(source))
                    if replay.is_some() && failed.len() < CONNECT_RETRIES =>
                {
                    tracing::debug!(replica = %endpoint.replica, %source, "connect failed; retrying elsewhere");
                    failed.push(endpoint.addr);
                }
                Err(failure) => {
                    return Err(ProxyError::from_failure(
                        service.clone(),
                        target.timeout,
                        failure,
                    ));
                }
            }
        }
    }

    /// Sends a call for a host outside Mecha on to the origin its absolute target (or `Host`)
    /// names, port 80 unless it says otherwise.
    async fn pass_on(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        pass: PassThrough,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let timeout = pass.timeout;
        let deadline = Instant::now() + timeout;
        let raw = match request.uri().authority() {
            Some(authority) => authority.as_str().to_string(),
            None => request
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        };
        let refuse = |status: http::StatusCode, reason: String| ProxyError::PassThrough {
            authority: raw.clone(),
            reason,
            status,
        };
        if request
            .uri()
            .scheme()
            .is_some_and(|s| s != &http::uri::Scheme::HTTP)
        {
            return Err(refuse(
                http::StatusCode::BAD_REQUEST,
                "only plain http:// calls go through the proxy (HTTPS_PROXY is not set)".into(),
            ));
        }
        let authority: http::uri::Authority = raw
            .parse()
            .map_err(|_| refuse(http::StatusCode::BAD_REQUEST, "not a host[:port]".into()))?;
        // A port that is there must be one (`http` reads `:99999` or `:` as none at all).
        let written_port = match authority.as_str().rsplit_once(':') {
            Some((_, after)) if !after.ends_with(']') => Some(after),
            _ => None,
        };
        let port = match (written_port, authority.port_u16()) {
            (None, _) => 80,
            (Some(_), Some(port)) if port > 0 => port,
            (Some(written), _) => {
                return Err(refuse(
                    http::StatusCode::BAD_REQUEST,
                    format!("{written:?} is not a port"),
                ));
            }
        };
        let Ok(_slot) = pass.slots.clone().try_acquire_owned() else {
            return Err(refuse(
                http::StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_PASSED_THROUGH} calls are already being passed through; retry later"),
            ));
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let resolved = tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| {
                refuse(
                    http::StatusCode::GATEWAY_TIMEOUT,
                    "name lookup timed out".into(),
                )
            })?
            .map_err(|e| {
                refuse(
                    http::StatusCode::BAD_GATEWAY,
                    format!("name lookup failed: {e}"),
                )
            })?;
        let addrs: Vec<SocketAddr> = resolved.collect();
        // 0.0.0.0 and ::ffff:127.0.0.1 reach loopback too.
        let itself = |a: &SocketAddr| {
            let ip = a.ip().to_canonical();
            (ip.is_loopback() || ip.is_unspecified()) && a.port() == pass.own.port()
        };
        let Some(addr) = addrs.iter().copied().find(|a| !itself(a)) else {
            return Err(refuse(
                if addrs.is_empty() {
                    http::StatusCode::BAD_GATEWAY
                } else {
                    http::StatusCode::LOOP_DETECTED
                },
                if addrs.is_empty() {
                    "the name has no address".into()
                } else {
                    "that is this proxy itself".into()
                },
            ));
        };
        let endpoint = Endpoint::standalone(PASSED_THROUGH, addr);
        let guard = endpoint.track();
        let request = request.map(Either::Left);
        tokio::time::timeout_at(
            deadline,
            self.forwarder.forward(
                request,
                &endpoint,
                guard,
                UpstreamProtocol::Http1,
                peer,
                &self.policy,
                deadline,
            ),
        )
        .await
        .unwrap_or(Err(Failure::Timeout))
        .map_err(|failure| match failure {
            Failure::Refused(refusal) => ProxyError::Refused(refusal),
            Failure::Timeout => refuse(
                http::StatusCode::GATEWAY_TIMEOUT,
                format!("no answer within {}s", timeout.as_secs_f64()),
            ),
            Failure::Connect(error) | Failure::Upstream(error) => {
                let mut reason = error.to_string();
                let mut cause = error.source();
                while let Some(inner) = cause {
                    reason.push_str(&format!(": {inner}"));
                    cause = inner.source();
                }
                refuse(http::StatusCode::BAD_GATEWAY, reason)
            }
        })
    }

    /// A ready replica of the target revision with room for one more request (its
    /// `containerConcurrency`), other than those at the addresses in `exclude`, counted busy
    /// from here on.
    /// Without one, the request is held — within the revision's buffer limits, which pokes the
    /// autoscaler — until a replica becomes ready or finishes a request, or until `deadline`.
    async fn ready_endpoint(
        &self,
        service: &ServiceKey,
        target: &RouteTarget,
        exclude: &[SocketAddr],
        declared_bytes: u64,
        deadline: Instant,
    ) -> Result<(Endpoint, LoadGuard), ProxyError> {
        let mut endpoints = self.endpoints.clone();
        let released = self.activation.released(&target.revision);
        let mut held: Option<(Waiting, Instant, BufferedGauge)> = None;
        loop {
            // Listen for a release before looking, so one that comes in between is not missed.
            let notified = released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let picked = {
                let table = endpoints.borrow_and_update();
                let candidates: Vec<&Endpoint> = table
                    .ready(&target.revision)
                    .iter()
                    .filter(|e| !exclude.contains(&e.addr))
                    .collect();
                let candidates = self.outliers.routable(candidates);
                pick(&candidates, target.container_concurrency)
            };
            if let Some(picked) = picked {
                if let Some((_, since, _)) = held {
                    self.metrics
                        .held
                        .with_label_values(&labels(Some(service), Some(&target.revision)))
                        .observe(since.elapsed().as_secs_f64());
                }
                return Ok(picked);
            }
            if held.is_none() {
                let waiting = self
                    .activation
                    .hold(&target.revision, declared_bytes, target.buffer)
                    .map_err(|full| ProxyError::BufferFull {
                        service: service.clone(),
                        revision: target.revision.clone(),
                        limit: match full {
                            BufferFull::Requests(n) => format!("{n} requests"),
                            BufferFull::Bytes(n) => format!("{n} bytes"),
                        },
                    })?;
                let gauge = BufferedGauge::new(&self.metrics, service, &target.revision);
                held = Some((waiting, Instant::now(), gauge));
            }
            tokio::select! {
                changed = endpoints.changed() => {
                    if changed.is_err() {
                        return Err(no_replica(service, &target.revision, target.timeout));
                    }
                }
                () = &mut notified => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(no_replica(service, &target.revision, target.timeout));
                }
            }
        }
    }
}

/// Why a request is answered without a replica, and the service it named if any (boxed: the
/// happy path stays small).
type Refusal = Box<(Option<ServiceKey>, ProxyError)>;

/// What the fast path holds while a request is at a replica.
#[derive(Debug)]
pub struct Forwarded {
    service: ServiceKey,
    target: RouteTarget,
    endpoint: Endpoint,
    started: Instant,
    trace: Option<TraceId>,
    _guard: LoadGuard,
}

/// Plain HTTP/1.1 requests to HTTP/1.1 revisions take the fast path: the same routing, holding
/// and replica choice, then relayed over the client connection's own replica connection.
impl Role for Gateway {
    type Ticket = Forwarded;

    const NEEDS_HOST: bool = true;

    fn policy(&self) -> &HopPolicy {
        &self.policy
    }

    async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        Gateway::handle(self, request, peer).await
    }

    async fn dispatch(&self, head: &RequestHead, retry: &[SocketAddr]) -> Decision<Forwarded> {
        let started = Instant::now();
        let refuse = |service: Option<&ServiceKey>, revision: Option<&str>, error: ProxyError| {
            log_refusal(&error, head.trace);
            self.record(service, revision, error.status(), started);
            Decision::Answer(Answer::from(&error))
        };
        let Some(host) = head.host.as_deref().filter(|h| !h.is_empty()) else {
            return refuse(None, None, ProxyError::MissingHost);
        };
        let (service, target) = match self.target(host) {
            Ok(found) => found,
            // Calls passed through go by the general server, which sees the target's port.
            Err(refusal)
                if self.pass_through.is_some()
                    && matches!(refusal.1, ProxyError::UnknownHost { .. }) =>
            {
                return Decision::Fallback;
            }
            Err(refusal) => {
                let (service, error) = *refusal;
                return refuse(service.as_ref(), None, error);
            }
        };
        if target.protocol != UpstreamProtocol::Http1 {
            return Decision::Fallback;
        }
        let deadline = started + target.timeout;
        match self
            .ready_endpoint(&service, &target, retry, head.content_length, deadline)
            .await
        {
            Ok((endpoint, guard)) => Decision::Forward {
                addr: endpoint.addr,
                deadline,
                ticket: Forwarded {
                    service,
                    target,
                    endpoint,
                    started,
                    trace: head.trace,
                    _guard: guard,
                },
            },
            Err(error) => refuse(Some(&service), Some(&target.revision), error),
        }
    }

    fn may_retry(&self, _ticket: &Forwarded, attempts: usize) -> bool {
        attempts < CONNECT_RETRIES
    }

    fn replied(&self, ticket: &Forwarded, reply: Result<(), &Failure>) {
        self.record_reply(
            &ticket.service,
            &ticket.target.revision,
            &ticket.endpoint,
            reply,
        );
    }

    fn failed(&self, ticket: &Forwarded, failure: Failure) -> ProxyError {
        ProxyError::from_failure(ticket.service.clone(), ticket.target.timeout, failure)
    }

    fn finished(&self, ticket: Option<Forwarded>, status: http::StatusCode) {
        // The gateway's own answers were counted where they were decided.
        if let Some(ticket) = ticket {
            tracing::debug!(
                trace_id = ticket.trace.map(tracing::field::display),
                service = %ticket.service,
                %status,
                "request"
            );
            self.record(
                Some(&ticket.service),
                Some(&ticket.target.revision),
                status,
                ticket.started,
            );
        }
    }
}

/// Server errors are warnings; refusals (unknown host, full buffer) are the client's business.
/// Either names the request's trace.
fn log_refusal(error: &ProxyError, trace: Option<TraceId>) {
    let status = error.status();
    let trace_id = trace.map(tracing::field::display);
    if status.is_server_error() {
        tracing::warn!(trace_id, %error, %status, "request failed");
    } else {
        tracing::debug!(trace_id, %error, %status, "request refused");
    }
}

fn label(service: Option<&ServiceKey>) -> String {
    service.map_or_else(|| "-".to_string(), ToString::to_string)
}

/// The `namespace`, `service` and `revision` labels of a request's series (as the control
/// plane's: `RevisionSpec::metric_labels`), `-` for what it never reached.
fn labels<'a>(service: Option<&'a ServiceKey>, revision: Option<&'a str>) -> [&'a str; 3] {
    [
        service.map_or("-", |s| s.namespace.as_str()),
        service.map_or("-", |s| s.name.as_str()),
        // Its name: in a cluster the key carries the namespace, which has a label of its own.
        revision.map_or("-", mecha_common::routing::revision_name),
    ]
}

/// Counts a request in `mecha_gateway_buffered_requests` while it is held.
struct BufferedGauge(prometheus::IntGauge);

impl BufferedGauge {
    fn new(metrics: &Metrics, service: &ServiceKey, revision: &str) -> Self {
        let gauge = metrics
            .buffered
            .with_label_values(&labels(Some(service), Some(revision)));
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for BufferedGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn no_replica(service: &ServiceKey, revision: &str, waited: Duration) -> ProxyError {
    ProxyError::NoReadyReplica {
        service: service.clone(),
        revision: revision.to_string(),
        waited,
    }
}

/// Picks a replica and counts the request against it, as Knative's activator balances: with
/// no concurrency limit, power of two choices (the less busy of two random replicas); with a
/// limit of 3 or less, the first replica with room; above that, power of two choices among the
/// replicas with room.
fn pick(candidates: &[&Endpoint], limit: u32) -> Option<(Endpoint, LoadGuard)> {
    let take = |e: &Endpoint| e.try_track(limit).map(|guard| (e.clone(), guard));
    if limit > 0 && limit <= 3 {
        return candidates.iter().find_map(|e| take(e));
    }
    let with_room: Vec<&Endpoint> = candidates
        .iter()
        .copied()
        .filter(|e| limit == 0 || e.in_flight() < limit)
        .collect();
    if let Some(chosen) = two_choices(&with_room)
        && let Some(picked) = take(chosen)
    {
        return Some(picked);
    }
    // Lost a race for the last slot: take any replica that still has room.
    with_room.iter().find_map(|e| take(e))
}

/// Of two random candidates, the one with fewer requests in flight.
fn two_choices<'a>(candidates: &[&'a Endpoint]) -> Option<&'a Endpoint> {
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
pub fn request_host<B>(request: &Request<B>) -> Option<String> {
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

/// The labels of the per-revision series, here and in [`crate::outlier`].
pub(crate) const REVISION_LABELS: [&str; 3] = ["namespace", "service", "revision"];

impl Metrics {
    fn register(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "mecha_gateway_requests_total",
                "Requests served by the gateway",
            ),
            &["namespace", "service", "revision", "code"],
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
            &REVISION_LABELS,
        )
        .expect("valid metric");
        let buffered = IntGaugeVec::new(
            Opts::new(
                "mecha_gateway_buffered_requests",
                "Requests held because the revision has no free replica",
            ),
            &REVISION_LABELS,
        )
        .expect("valid metric");
        let held = HistogramVec::new(
            HistogramOpts::new(
                "mecha_gateway_activation_seconds",
                "How long held requests waited for a free replica (cold starts included)",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &REVISION_LABELS,
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(requests.clone()));
        let _ = registry.register(Box::new(duration.clone()));
        let _ = registry.register(Box::new(buffered.clone()));
        let _ = registry.register(Box::new(held.clone()));
        Self {
            requests,
            duration,
            buffered,
            held,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn power_of_two_choices_prefers_the_idle_replica() {
        let busy = Endpoint::standalone("busy", "127.0.0.1:1".parse().expect("addr"));
        let idle = Endpoint::standalone("idle", "127.0.0.1:2".parse().expect("addr"));
        let _load: Vec<_> = (0..5).map(|_| busy.track()).collect();
        for _ in 0..50 {
            let (picked, _guard) = pick(&[&busy, &idle], 0).expect("pick");
            assert_eq!(&*picked.replica, "idle");
        }
        assert!(pick(&[], 0).is_none());
    }

    #[tokio::test]
    async fn container_concurrency_is_never_exceeded() {
        let a = Endpoint::standalone("a", "127.0.0.1:1".parse().expect("addr"));
        let b = Endpoint::standalone("b", "127.0.0.1:2".parse().expect("addr"));
        // Limit 1: first available, then nothing.
        let first = pick(&[&a, &b], 1).expect("a");
        let second = pick(&[&a, &b], 1).expect("b");
        assert_eq!((&*first.0.replica, &*second.0.replica), ("a", "b"));
        assert!(pick(&[&a, &b], 1).is_none());
        drop(first);
        assert_eq!(&*pick(&[&a, &b], 1).expect("a again").0.replica, "a");
        // Limit 10: spread by load, never above 10 each.
        let c = Endpoint::standalone("c", "127.0.0.1:3".parse().expect("addr"));
        let d = Endpoint::standalone("d", "127.0.0.1:4".parse().expect("addr"));
        let guards: Vec<_> = (0..20)
            .map(|_| pick(&[&c, &d], 10).expect("room"))
            .collect();
        assert_eq!((c.in_flight(), d.in_flight()), (10, 10));
        assert!(pick(&[&c, &d], 10).is_none());
        drop(guards);
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
