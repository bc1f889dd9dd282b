//! The control plane's API: what sidecars in other processes (gateways, outbound and inbound
//! sidecars) talk to over their one control-plane client (`mecha_common::wire`).
//!
//! - `GET /api/v1/watch`: one JSON line with the routes and ready endpoints now, then one more
//!   whenever either changes, until the client goes away or the server stops;
//! - `POST /api/v1/stats`: a JSON list of load reports, for the autoscaler;
//! - `POST /api/v1/pokes`: a JSON list of activation pokes from callers holding requests;
//! - `GET /api/v1/eventing/watch`: for standalone brokers (`eventing-broker`), one JSON line
//!   with every Broker and Trigger now (`crds::eventing::EventingState` in its wire form
//!   `{"brokers":[…],"triggers":[…]}`), then one more whenever they change. Fed by
//!   [`ApiState::with_eventing`]: `mecha up` from its store; in Kubernetes, whatever watches
//!   the Broker and Trigger resources publishes an `EventingState` into the same kind of
//!   `watch` channel. A control plane not given one answers 503.
//! - `GET /api/v1/sources/watch`: for the standalone importers (`importers` binary), the same
//!   shape for every event source with its sink resolved by the control plane
//!   (`crds::sources::SourcesSnapshot`, `{"sources":[{"resource":…,"sink":{"url","uri","host"}}]}`),
//!   fed by [`ApiState::with_sources`]; 503 when not given one.
//!
//! [`router`] has no credential or `Host` check of its own: whoever serves it puts it behind
//! `mecha_common::auth::guard` (`mecha up` with its admin API; the rule is in one place).

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use crds::eventing::EventingState;
use crds::sources::SourcesSnapshot;
use futures_util::StreamExt;
use mecha_common::wire::{
    EVENTING_WATCH_PATH, POKE_PATH, Poke, SOURCES_WATCH_PATH, STATS_PATH, Snapshot, Stat,
    WATCH_PATH,
};
use mecha_common::{Activation, EndpointTable, RoutingTable, ShutdownSignal};
use tokio::sync::{mpsc, watch};

/// What the API reads and feeds: the controller's routes, the actuator's endpoints, the
/// controller's stats intake and the activation pokes go to.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub routes: watch::Receiver<Arc<RoutingTable>>,
    pub endpoints: watch::Receiver<Arc<EndpointTable>>,
    pub stats: mpsc::UnboundedSender<Stat>,
    pub activation: Activation,
    /// Ends the watch streams, so a server can drain.
    pub shutdown: ShutdownSignal,
    /// Every Broker and Trigger, for standalone brokers; `None`: this control plane does not
    /// serve eventing (`/api/v1/eventing/watch` answers 503).
    pub eventing: Option<watch::Receiver<Arc<EventingState>>>,
    /// Every event source with its resolved sink, for the standalone importers; `None`: this
    /// control plane does not serve them (`/api/v1/sources/watch` answers 503).
    pub sources: Option<watch::Receiver<Arc<SourcesSnapshot>>>,
}

// === impl ApiState ===

impl ApiState {
    /// Serves `eventing` on `/api/v1/eventing/watch`: a `watch` whose value is the whole of
    /// the Brokers and Triggers, replaced whenever any of them changes (send only real
    /// changes: every send is a line to every broker). Readers never block the sender and only
    /// see the newest state.
    pub fn with_eventing(mut self, eventing: watch::Receiver<Arc<EventingState>>) -> Self {
        self.eventing = Some(eventing);
        self
    }

    /// Serves `sources` on `/api/v1/sources/watch`, as [`with_eventing`](Self::with_eventing)
    /// serves Brokers and Triggers.
    pub fn with_sources(mut self, sources: watch::Receiver<Arc<SourcesSnapshot>>) -> Self {
        self.sources = Some(sources);
        self
    }
}

/// The control-plane routes, without authentication (see the module's documentation).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route(STATS_PATH, post(stats))
        .route(POKE_PATH, post(pokes))
        .route(WATCH_PATH, get(watch_tables))
        .route(EVENTING_WATCH_PATH, get(watch_eventing))
        .route(SOURCES_WATCH_PATH, get(watch_sources))
        .with_state(state)
}

/// `POST /api/v1/stats`: a JSON list of sidecar stats, each checked before any is taken.
async fn stats(State(state): State<ApiState>, body: Bytes) -> Response {
    let stats: Vec<Stat> = match serde_json::from_slice(&body) {
        Ok(stats) => stats,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("a JSON list of stats is expected: {error}\n"),
            )
                .into_response();
        }
    };
    for (i, stat) in stats.iter().enumerate() {
        if let Err(error) = stat.validate() {
            return (StatusCode::BAD_REQUEST, format!("stats[{i}].{error}\n")).into_response();
        }
    }
    for stat in stats {
        let _ = state.stats.send(stat);
    }
    StatusCode::ACCEPTED.into_response()
}

/// `POST /api/v1/pokes`: a JSON list of activation pokes from callers in other processes.
async fn pokes(State(state): State<ApiState>, body: Bytes) -> Response {
    match serde_json::from_slice::<Vec<Poke>>(&body) {
        Ok(pokes) => {
            for poke in pokes {
                state.activation.poke(poke);
            }
            StatusCode::ACCEPTED.into_response()
        }
        Err(error) => (
            StatusCode::BAD_REQUEST,
            format!("a JSON list of pokes is expected: {error}\n"),
        )
            .into_response(),
    }
}

/// `GET /api/v1/watch`: the tables now, then on every change, one JSON line each.
async fn watch_tables(State(state): State<ApiState>) -> Response {
    let tables = (state.routes.clone(), state.endpoints.clone(), true);
    let lines =
        futures_util::stream::unfold(tables, |(mut routes, mut endpoints, first)| async move {
            if !first {
                tokio::select! {
                    changed = routes.changed() => changed.ok()?,
                    changed = endpoints.changed() => changed.ok()?,
                }
            }
            let snapshot = {
                let routes = routes.borrow_and_update();
                let endpoints = endpoints.borrow_and_update();
                Snapshot::from_tables(&routes, &endpoints)
            };
            let mut line = serde_json::to_vec(&snapshot).ok()?;
            line.push(b'\n');
            Some((Ok::<_, Infallible>(line), (routes, endpoints, false)))
        });
    let body = Body::from_stream(lines.take_until(state.shutdown.clone().recv()));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// `GET /api/v1/eventing/watch`: every Broker and Trigger now, then on every change, one JSON
/// line each.
async fn watch_eventing(State(state): State<ApiState>) -> Response {
    match state.eventing.clone() {
        Some(eventing) => json_lines(eventing, &state.shutdown),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "this control plane does not serve Brokers and Triggers\n",
        )
            .into_response(),
    }
}

/// `GET /api/v1/sources/watch`: every event source now, then on every change, one JSON line
/// each.
async fn watch_sources(State(state): State<ApiState>) -> Response {
    match state.sources.clone() {
        Some(sources) => json_lines(sources, &state.shutdown),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "this control plane does not serve event sources\n",
        )
            .into_response(),
    }
}

/// A `watch`'s value now, then on every change, one JSON line each, until `shutdown`.
fn json_lines<T>(current: watch::Receiver<Arc<T>>, shutdown: &ShutdownSignal) -> Response
where
    T: serde::Serialize + Send + Sync + 'static,
{
    let lines = futures_util::stream::unfold((current, true), |(mut current, first)| async move {
        if !first {
            current.changed().await.ok()?;
        }
        let value = current.borrow_and_update().clone();
        let mut line = serde_json::to_vec(&*value).ok()?;
        line.push(b'\n');
        Some((Ok::<_, Infallible>(line), (current, false)))
    });
    let body = Body::from_stream(lines.take_until(shutdown.clone().recv()));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use mecha_common::routing::{Route, RouteTarget, ServiceKey, UpstreamProtocol};
    use mecha_common::{Endpoint, RevisionEndpoints, Shutdown};
    use tower::ServiceExt;

    struct Fixture {
        app: Router,
        routes: watch::Sender<Arc<RoutingTable>>,
        endpoints: watch::Sender<Arc<EndpointTable>>,
        stats: mpsc::UnboundedReceiver<Stat>,
        pokes: mpsc::UnboundedReceiver<Poke>,
        shutdown: Shutdown,
    }

    fn fixture() -> Fixture {
        let (routes, routes_rx) = watch::channel(Arc::<RoutingTable>::default());
        let (endpoints, endpoints_rx) = watch::channel(Arc::<EndpointTable>::default());
        let (stats_tx, stats) = mpsc::unbounded_channel();
        let (activation, pokes) = Activation::new();
        let shutdown = Shutdown::new();
        let app = router(ApiState {
            routes: routes_rx,
            endpoints: endpoints_rx,
            stats: stats_tx,
            activation,
            shutdown: shutdown.signal(),
            eventing: None,
            sources: None,
        });
        Fixture {
            app,
            routes,
            endpoints,
            stats,
            pokes,
            shutdown,
        }
    }

    fn post(path: &str, body: &str) -> Request<Body> {
        Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .expect("request")
    }

    async fn text(response: Response) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn stats_are_checked_whole_then_handed_to_the_autoscaler() {
        let mut fixture = fixture();
        let good = r#"{"revision":"hello-00001","replica":"p1","concurrency":2.5,"requests":10,"seconds":1.0}"#;
        let bad = r#"{"revision":"hello-00001","replica":"p2","concurrency":-1.0,"requests":1,"seconds":1.0}"#;
        let response = fixture
            .app
            .clone()
            .oneshot(post(STATS_PATH, &format!("[{good},{bad}]")))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let said = text(response).await;
        assert!(said.starts_with("stats[1]."), "{said}");
        assert!(fixture.stats.try_recv().is_err(), "nothing of a bad batch");

        let response = fixture
            .app
            .clone()
            .oneshot(post(STATS_PATH, &format!("[{good}]")))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let stat = fixture.stats.try_recv().expect("one stat");
        assert_eq!((stat.revision.as_str(), stat.requests), ("hello-00001", 10));

        let response = fixture
            .app
            .clone()
            .oneshot(post(STATS_PATH, "{}"))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(text(response).await.contains("a JSON list of stats"));
    }

    #[tokio::test]
    async fn pokes_reach_the_activation_channel() {
        let mut fixture = fixture();
        let response = fixture
            .app
            .clone()
            .oneshot(post(
                POKE_PATH,
                r#"[{"revision":"hello-00001","waiting":3}]"#,
            ))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let poke = fixture.pokes.try_recv().expect("poked");
        assert_eq!((poke.revision.as_str(), poke.waiting), ("hello-00001", 3));
        let response = fixture
            .app
            .clone()
            .oneshot(post(POKE_PATH, "[{\"revision\":1}]"))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(fixture.pokes.try_recv().is_err());
    }

    #[tokio::test]
    async fn the_eventing_watch_streams_brokers_and_triggers_per_change() {
        let (routes, routes_rx) = watch::channel(Arc::<RoutingTable>::default());
        let (endpoints, endpoints_rx) = watch::channel(Arc::<EndpointTable>::default());
        let (stats, _stats) = mpsc::unbounded_channel();
        let (activation, _pokes) = Activation::new();
        let shutdown = Shutdown::new();
        let state = ApiState {
            routes: routes_rx,
            endpoints: endpoints_rx,
            stats,
            activation,
            shutdown: shutdown.signal(),
            eventing: None,
            sources: None,
        };
        let get = || {
            Request::get(EVENTING_WATCH_PATH)
                .body(Body::empty())
                .expect("request")
        };
        // Not given any: says so rather than streaming an empty state brokers would obey.
        let response = router(state.clone())
            .oneshot(get())
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(text(response).await.contains("does not serve Brokers"));

        let (eventing, eventing_rx) = watch::channel(Arc::new(EventingState::default()));
        let app = router(state.with_eventing(eventing_rx));
        let response = app.oneshot(get()).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/x-ndjson"
        );
        let mut body = response.into_body();
        let mut next_line = async || -> EventingState {
            let frame = body.frame().await.expect("a line").expect("frame");
            let data = frame.into_data().expect("data");
            assert_eq!(data.last(), Some(&b'\n'));
            serde_json::from_slice(&data).expect("an eventing state")
        };
        assert_eq!(next_line().await, EventingState::default(), "the state now");
        let broker: crds::Broker = serde_json::from_value(serde_json::json!({
            "apiVersion": "eventing.knative.dev/v1",
            "kind": "Broker",
            "metadata": {"name": "default", "namespace": "shop"}
        }))
        .expect("broker");
        let mut next = EventingState::default();
        next.apply_broker(broker);
        eventing.send_replace(Arc::new(next.clone()));
        assert_eq!(next_line().await, next, "a line per change");
        drop((routes, endpoints));
        shutdown.trigger();
        assert!(body.frame().await.is_none(), "the stream ends on shutdown");
    }

    #[tokio::test]
    async fn the_sources_watch_streams_every_source_per_change() {
        let (routes, routes_rx) = watch::channel(Arc::<RoutingTable>::default());
        let (endpoints, endpoints_rx) = watch::channel(Arc::<EndpointTable>::default());
        let (stats, _stats) = mpsc::unbounded_channel();
        let (activation, _pokes) = Activation::new();
        let shutdown = Shutdown::new();
        let state = ApiState {
            routes: routes_rx,
            endpoints: endpoints_rx,
            stats,
            activation,
            shutdown: shutdown.signal(),
            eventing: None,
            sources: None,
        };
        let get = || {
            Request::get(SOURCES_WATCH_PATH)
                .body(Body::empty())
                .expect("request")
        };
        let response = router(state.clone())
            .oneshot(get())
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            text(response)
                .await
                .contains("does not serve event sources")
        );

        let (sources, sources_rx) = watch::channel(Arc::new(SourcesSnapshot::default()));
        let response = router(state.with_sources(sources_rx))
            .oneshot(get())
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut next_line = async || -> SourcesSnapshot {
            let frame = body.frame().await.expect("a line").expect("frame");
            let data = frame.into_data().expect("data");
            assert_eq!(data.last(), Some(&b'\n'));
            serde_json::from_slice(&data).expect("a sources snapshot")
        };
        assert_eq!(
            next_line().await,
            SourcesSnapshot::default(),
            "the sources now"
        );
        let ping = crds::SourceResource::from_json(serde_json::json!({
            "apiVersion": "sources.knative.dev/v1",
            "kind": "PingSource",
            "metadata": {"name": "tick", "namespace": "shop"},
            "spec": {"sink": {"uri": "http://example.com/"}}
        }))
        .expect("a PingSource");
        let next = SourcesSnapshot {
            sources: vec![crds::sources::PlacedSource {
                resource: ping,
                sink: Some(crds::sources::SinkAddress {
                    url: "http://example.com/".into(),
                    uri: "http://example.com/".into(),
                    host: None,
                }),
                problem: None,
            }],
        };
        sources.send_replace(Arc::new(next.clone()));
        assert_eq!(next_line().await, next, "a line per change");
        drop((routes, endpoints));
        shutdown.trigger();
        assert!(body.frame().await.is_none(), "the stream ends on shutdown");
    }

    #[tokio::test]
    async fn the_watch_streams_a_line_per_change_and_ends_on_shutdown() {
        let fixture = fixture();
        let response = fixture
            .app
            .clone()
            .oneshot(
                Request::get(WATCH_PATH)
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/x-ndjson"
        );
        let mut body = response.into_body();
        let mut next_line = async || -> Snapshot {
            let frame = body.frame().await.expect("a line").expect("frame");
            let data = frame.into_data().expect("data");
            assert_eq!(data.last(), Some(&b'\n'));
            serde_json::from_slice(&data).expect("a snapshot")
        };
        assert_eq!(next_line().await, Snapshot::default(), "the tables now");

        let mut routes = RoutingTable::default();
        routes.insert(
            "hello.default.localhost".into(),
            Route {
                service: ServiceKey::new("default", "hello"),
                tag: None,
                targets: vec![RouteTarget {
                    revision: "hello-00001".into(),
                    percent: 100,
                    timeout: std::time::Duration::from_secs(30),
                    protocol: UpstreamProtocol::Http1,
                    container_concurrency: 0,
                    buffer: Default::default(),
                }],
            },
        );
        fixture.routes.send_replace(Arc::new(routes));
        let snapshot = next_line().await;
        assert_eq!(snapshot.routes[0].host, "hello.default.localhost");

        let mut endpoints = EndpointTable::default();
        let endpoint =
            Endpoint::standalone("hello-00001-1", "127.0.0.1:9999".parse().expect("addr"));
        endpoints.set(
            "hello-00001".into(),
            RevisionEndpoints {
                ready: vec![endpoint],
            },
        );
        fixture.endpoints.send_replace(Arc::new(endpoints));
        let snapshot = next_line().await;
        assert_eq!(snapshot.endpoints[0].replicas[0].replica, "hello-00001-1");

        fixture.shutdown.trigger();
        assert!(body.frame().await.is_none(), "the stream ends on shutdown");
    }
}
