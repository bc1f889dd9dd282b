//! The admin endpoints every long-running component serves: `/live`, `/ready`, `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};

/// Readiness as the component itself judges it: not ready until started, and not ready again
/// once draining, so load balancers stop sending before the listeners close.
#[derive(Debug, Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

#[derive(Debug, Clone)]
struct AdminState {
    health: Health,
    registry: Registry,
}

// === impl Health ===

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// The health and metrics routes; components merge their own admin routes into it.
pub fn router(health: Health, registry: Registry) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(AdminState { health, registry })
}

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    if state.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                TextEncoder::new().format_type().to_owned(),
            )],
            body,
        )
            .into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {error}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(app: Router, path: &str) -> (StatusCode, String) {
        let response = app
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn live_ready_and_metrics() {
        let registry = Registry::new();
        let counter =
            prometheus::IntCounter::new("mecha_test_total", "a test counter").expect("counter");
        registry
            .register(Box::new(counter.clone()))
            .expect("register");
        counter.inc_by(3);
        let health = Health::default();
        let app = router(health.clone(), registry);
        assert_eq!(get(app.clone(), "/live").await.0, StatusCode::OK);
        assert_eq!(
            get(app.clone(), "/ready").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        health.set_ready(true);
        assert_eq!(get(app.clone(), "/ready").await.0, StatusCode::OK);
        let (status, body) = get(app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("mecha_test_total 3"), "{body}");
    }
}
