//! Load reports and pokes reach the leader wherever they land.
//!
//! Sidecars reach the autoscaler through its Service, so their reports (`POST /api/v1/stats`)
//! and pokes (`POST /api/v1/pokes`) land on any replica, while only the leader's KPA decides.
//! A follower passes each one on to the leader (its address is on the Lease, see
//! [`crate::leader::LEADER_ADDRESS`]) with the caller's own credential, which the leader
//! checks again, and answers what the leader answered; it also feeds its own controller, so
//! it has seen some load should it take over. A report already forwarded is never forwarded
//! again (a stale Lease could name a replica that no longer leads). When the leader cannot be
//! reached the answer is 503: the sidecar reports again within a second.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mecha_common::wire::{POKE_PATH, STATS_PATH};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::watch;

/// Marks a report a follower passed on.
pub const FORWARDED: &str = "x-mecha-forwarded";
/// How long a follower waits for the leader.
pub const TIMEOUT: Duration = Duration::from_secs(1);

/// What a follower needs to pass reports on.
#[derive(Clone)]
pub struct ToLeader {
    leading: watch::Receiver<bool>,
    leader: watch::Receiver<Option<String>>,
    client: Client<HttpConnector, Full<Bytes>>,
    forwarded: IntCounterVec,
}

// === impl ToLeader ===

impl ToLeader {
    pub fn new(
        leading: watch::Receiver<bool>,
        leader: watch::Receiver<Option<String>>,
        registry: &Registry,
    ) -> Self {
        let forwarded = IntCounterVec::new(
            Opts::new(
                "mecha_autoscaler_forwarded_reports_total",
                "Stats and pokes a follower passed on to the leader, by result: ok, failed",
            ),
            &["result"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(forwarded.clone()));
        Self {
            leading,
            leader,
            client: Client::builder(TokioExecutor::new()).build_http(),
            forwarded,
        }
    }

    /// The leader's address, when another replica leads and says where.
    fn target(&self) -> Option<String> {
        if *self.leading.borrow() {
            return None;
        }
        self.leader.borrow().clone()
    }
}

impl std::fmt::Debug for ToLeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToLeader")
            .field("target", &self.target())
            .finish_non_exhaustive()
    }
}

/// Middleware on the control-plane API (inside its credential check): on a follower, passes
/// stats and pokes on to the leader, as described in the module's documentation.
pub async fn to_leader(State(to): State<ToLeader>, request: Request, next: Next) -> Response {
    let report = request.method() == Method::POST
        && matches!(request.uri().path(), STATS_PATH | POKE_PATH)
        && !request.headers().contains_key(FORWARDED);
    let Some(leader) = to.target().filter(|_| report) else {
        return next.run(request).await;
    };
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, crate::auth::MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("reading the report: {error}\n"),
            )
                .into_response();
        }
    };
    let mut forward = http::Request::builder()
        .method(Method::POST)
        .uri(format!("http://{leader}{}", parts.uri.path()))
        .header(FORWARDED, HeaderValue::from_static("1"));
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE] {
        if let Some(value) = parts.headers.get(&name) {
            forward = forward.header(name, value.clone());
        }
    }
    let answer = match forward.body(Full::new(body.clone())) {
        Ok(forward) => tokio::time::timeout(TIMEOUT, to.client.request(forward))
            .await
            .map_err(|_| format!("no answer within {TIMEOUT:?}"))
            .and_then(|r| r.map_err(|e| e.to_string())),
        Err(error) => Err(error.to_string()),
    };
    // This replica's own controller sees the report too.
    let local = Request::from_parts(parts, Body::from(body));
    let _ = next.run(local).await;
    match answer {
        Ok(response) => {
            to.forwarded.with_label_values(&["ok"]).inc();
            let status = response.status();
            let said = Limited::new(response.into_body(), 4096)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (status, said).into_response()
        }
        Err(error) => {
            to.forwarded.with_label_values(&["failed"]).inc();
            tracing::warn!(%leader, %error, "cannot pass a report on to the leader");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "1")],
                format!("the leader at {leader} did not take the report: {error}\n"),
            )
                .into_response()
        }
    }
}
