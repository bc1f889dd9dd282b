//! The admin endpoints every long-running component serves: `/live`, `/ready`, `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};

/// Readiness as the component itself judges it: not ready until started, and not ready again
/// once draining, so load balancers stop sending before the listeners close. Parts of the
/// component report what is wrong with them (a check run on every `/ready`, or a problem set
/// when a task dies); any problem makes `/ready` answer 503 with the reasons.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
    problems: Arc<Mutex<BTreeMap<String, String>>>,
    checks: Arc<Mutex<Vec<Check>>>,
}

type Check = Arc<dyn Fn() -> Option<String> + Send + Sync>;

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("ready", &self.is_ready())
            .field("problems", &self.problems())
            .finish_non_exhaustive()
    }
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

    /// Started, not draining, and nothing reports a problem.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.problems().is_empty()
    }

    /// Records that `part` is broken (`Some(reason)`) or fine again (`None`).
    pub fn set_problem(&self, part: &str, problem: Option<String>) {
        let mut problems = self.problems.lock().unwrap_or_else(PoisonError::into_inner);
        match problem {
            Some(why) => problems.insert(part.to_string(), why),
            None => problems.remove(part),
        };
    }

    /// Adds a check asked on every readiness question: `Some(reason)` while something is wrong.
    pub fn add_check(&self, check: impl Fn() -> Option<String> + Send + Sync + 'static) {
        self.checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::new(check));
    }

    /// Everything wrong right now, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(part, why)| format!("{part}: {why}"))
            .collect();
        let checks = self
            .checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        all.extend(checks.iter().filter_map(|check| check()));
        all
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
    let problems = state.health.problems();
    if !problems.is_empty() {
        let mut body = String::from("not ready:\n");
        for problem in problems {
            body.push_str(&format!("  {problem}\n"));
        }
        return (StatusCode::SERVICE_UNAVAILABLE, body);
    }
    if state.health.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string())
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
    use axum::http::Request;

    async fn get(app: Router, path: &str) -> (StatusCode, String) {
        crate::auth::tests::call(&app, Request::get(path)).await
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

        // A problem, set or checked, makes it not ready with the reason, until it goes away.
        health.set_problem("controller", Some("stopped: boom".into()));
        let failing = Arc::new(AtomicBool::new(true));
        let check = failing.clone();
        health.add_check(move || {
            check
                .load(Ordering::Relaxed)
                .then(|| "log unreadable".into())
        });
        let (status, body) = get(app.clone(), "/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("controller: stopped: boom"), "{body}");
        assert!(body.contains("log unreadable"), "{body}");
        health.set_problem("controller", None);
        failing.store(false, Ordering::Relaxed);
        assert_eq!(get(app.clone(), "/ready").await.0, StatusCode::OK);
        let (status, body) = get(app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("mecha_test_total 3"), "{body}");
    }
}
