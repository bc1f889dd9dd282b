//! The event log's contract and the broker runtime on top of it, written once and run against
//! every backend: each test takes a [`Backend`], a factory that opens the log (again, after a
//! close, on the same storage), and `each_backend` runs it on every one.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[cfg(feature = "jetstream")]
use eventing_broker::log::jetstream::{JetStreamConfig, JetStreamLog};
use eventing_broker::log::{Consumer, EventLog, Fault, Message, Record, RedbLog, RedbOptions};
use eventing_broker::{BrokerConfig, Event, EventBroker, EventingState};
use prometheus::Registry;
use tokio::sync::watch;
use tokio::time::Instant;

mod support;
use support::{counts, subscriber, until};

type Opened = Pin<Box<dyn Future<Output = Arc<dyn EventLog>> + Send>>;

/// Opens one backend's log; every call after a close opens the same storage.
struct Backend {
    name: &'static str,
    open: Box<dyn Fn() -> Opened + Send + Sync>,
    /// Keeps what the storage lives in (a directory, a server) until the test ends.
    _keep: Box<dyn std::any::Any + Send>,
}

impl Backend {
    async fn open(&self) -> Arc<dyn EventLog> {
        (self.open)().await
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("mecha-broker-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn redb(name: &str) -> Backend {
    let dir = TempDir::new(name);
    let path = dir.0.join("events.redb");
    Backend {
        name: "redb",
        open: Box::new(move || {
            let path = path.clone();
            Box::pin(async move {
                // A log closed a moment ago may still be held by tasks that are being
                // aborted: wait for them to let go of the file.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match RedbLog::open(&path) {
                        Ok(log) => return Arc::new(log) as Arc<dyn EventLog>,
                        Err(eventing_broker::LogError::InUse(_)) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Err(error) => panic!("{error}"),
                    }
                }
            })
        }),
        _keep: Box::new(dir),
    }
}

/// The log on a `nats-server` of its own (killed when the test ends), with a short
/// acknowledgement deadline so that redeliveries come quickly.
#[cfg(feature = "jetstream")]
fn jetstream(_name: &str) -> Backend {
    let server = tokio::task::block_in_place(test_support::nats::NatsServer::start);
    let url = format!("{}?ack-wait=2s", server.url());
    Backend {
        name: "jetstream",
        open: Box::new(move || {
            let config = JetStreamConfig::from_url(&url).unwrap();
            Box::pin(async move {
                Arc::new(JetStreamLog::connect(config).await.unwrap()) as Arc<dyn EventLog>
            })
        }),
        _keep: Box::new(server),
    }
}

/// Every backend this build has.
fn backends(name: &str) -> Vec<Backend> {
    vec![
        redb(name),
        #[cfg(feature = "jetstream")]
        jetstream(name),
    ]
}

/// Runs `test` against a fresh instance of every backend, one after the other.
async fn each_backend<F, Fut>(name: &str, test: F)
where
    F: Fn(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    for backend in backends(name) {
        eprintln!("--- {name} on {}", backend.name);
        test(backend).await;
    }
}

fn record(n: u32) -> Record {
    Record {
        key: format!("/test {n}"),
        data: format!("event {n}").into_bytes(),
    }
}

fn text(message: &Message) -> String {
    String::from_utf8_lossy(&message.data).into_owned()
}

/// Fetches until `n` messages came (failing after 20 s).
async fn take(consumer: &mut Box<dyn Consumer>, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        let batch = tokio::time::timeout_at(deadline, consumer.fetch(n - out.len()))
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events came", out.len()))
            .unwrap();
        out.extend(batch);
    }
    out
}

/// What the consumer hands out within `wait` (for "nothing more comes").
async fn drain(consumer: &mut Box<dyn Consumer>, wait: Duration) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = Instant::now() + wait;
    while let Ok(batch) = tokio::time::timeout_at(deadline, consumer.fetch(100)).await {
        out.extend(batch.unwrap().iter().map(text));
    }
    out
}

/// Waits until `broker`'s backlog, as `maintain` reports it, is `expected`.
async fn backlog_becomes(log: &Arc<dyn EventLog>, broker: &str, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let backlog = log.maintain(&[broker.to_string()]).await.unwrap();
        let now = backlog.iter().find(|(b, _)| b == broker).map(|(_, n)| *n);
        if now == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the backlog of {broker} stayed {now:?}, not {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === the log's contract ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consumer_gets_every_event_from_its_start_in_order() {
    each_backend("order", |backend| async move {
        let log = backend.open().await;
        let mut early = log.consumer("ns/b", "ns/b/early").await.unwrap();
        assert!(
            early.fetch(10).await.unwrap().is_empty(),
            "the first fetch answers at once"
        );
        log.append("ns/b", (1..=3).map(record).collect())
            .await
            .unwrap();
        let mut late = log.consumer("ns/b", "ns/b/late").await.unwrap();
        log.append("ns/b", (4..=5).map(record).collect())
            .await
            .unwrap();
        // Another broker's events are not this one's.
        log.append("ns/other", vec![record(99)]).await.unwrap();

        let got = take(&mut early, 5).await;
        let texts: Vec<String> = got.iter().map(text).collect();
        assert_eq!(
            texts,
            (1..=5).map(|n| format!("event {n}")).collect::<Vec<_>>()
        );
        assert!(got.windows(2).all(|w| w[0].seq < w[1].seq), "log order");
        let got = take(&mut late, 2).await;
        assert_eq!(
            got.iter().map(text).collect::<Vec<_>>(),
            ["event 4", "event 5"]
        );
        for message in got {
            message.ack().await.unwrap();
        }
        assert!(
            drain(&mut late, Duration::from_millis(300))
                .await
                .is_empty()
        );
        log.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_not_acknowledged_is_handed_out_again_after_a_restart() {
    each_backend("restart", |backend| async move {
        let log = backend.open().await;
        let mut consumer = log.consumer("ns/b", "ns/b/t").await.unwrap();
        log.append("ns/b", (1..=4).map(record).collect())
            .await
            .unwrap();
        let mut got = take(&mut consumer, 4).await.into_iter();
        let (first, second, third, fourth) = (
            got.next().unwrap(),
            got.next().unwrap(),
            got.next().unwrap(),
            got.next().unwrap(),
        );
        first.ack().await.unwrap();
        third.ack().await.unwrap();
        drop((second, fourth));
        log.maintain(&["ns/b".to_string()]).await.unwrap();
        drop(consumer);
        log.close().await.unwrap();
        drop(log);

        let log = backend.open().await;
        let mut consumer = log.consumer("ns/b", "ns/b/t").await.unwrap();
        let again = take(&mut consumer, 2).await;
        assert_eq!(
            again.iter().map(text).collect::<Vec<_>>(),
            ["event 2", "event 4"]
        );
        for message in again {
            message.ack().await.unwrap();
        }
        log.append("ns/b", vec![record(5)]).await.unwrap();
        let next = take(&mut consumer, 1).await;
        assert_eq!(text(&next[0]), "event 5");
        next.into_iter().next().unwrap().ack().await.unwrap();
        log.maintain(&["ns/b".to_string()]).await.unwrap();
        drop(consumer);
        log.close().await.unwrap();
        drop(log);

        // Everything was acknowledged: nothing comes back.
        let log = backend.open().await;
        let mut consumer = log.consumer("ns/b", "ns/b/t").await.unwrap();
        assert!(
            drain(&mut consumer, Duration::from_millis(1500))
                .await
                .is_empty()
        );
        log.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_what_some_consumer_has_not_acknowledged() {
    each_backend("retention", |backend| async move {
        let log = backend.open().await;
        // No consumer: nobody will ever want these.
        log.append("ns/b", (1..=2).map(record).collect())
            .await
            .unwrap();
        backlog_becomes(&log, "ns/b", 0).await;

        let mut fast = log.consumer("ns/b", "ns/b/fast").await.unwrap();
        let mut slow = log.consumer("ns/b", "ns/b/slow").await.unwrap();
        log.append("ns/b", (3..=5).map(record).collect())
            .await
            .unwrap();
        for message in take(&mut fast, 3).await {
            message.ack().await.unwrap();
        }
        let mut slow_got = take(&mut slow, 3).await.into_iter();
        slow_got.next().unwrap().ack().await.unwrap();
        backlog_becomes(&log, "ns/b", 2).await;
        for message in slow_got {
            message.ack().await.unwrap();
        }
        backlog_becomes(&log, "ns/b", 0).await;

        // A removed consumer holds nothing back.
        log.append("ns/b", vec![record(6)]).await.unwrap();
        for message in take(&mut fast, 1).await {
            message.ack().await.unwrap();
        }
        drop(slow);
        log.remove_consumer("ns/b", "ns/b/slow").await.unwrap();
        backlog_becomes(&log, "ns/b", 0).await;
        log.close().await.unwrap();
    })
    .await;
}

// === the runtime on each log ===

/// Broker `b` with a trigger per subscriber (`t0`, `t1`, …).
fn state(subscribers: &[SocketAddr]) -> EventingState {
    let mut yaml =
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: b\n".to_string();
    for (i, subscriber) in subscribers.iter().enumerate() {
        yaml.push_str(&format!(
            "---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: t{i}\nspec:\n  broker: b\n  subscriber:\n    uri: http://{subscriber}/\n"
        ));
    }
    let (loaded, errors) = crds::load_str(Path::new("/tmp/t.yaml"), &yaml, crds::Mode::Local);
    assert!(errors.is_empty(), "{errors:?}");
    let mut state = EventingState::default();
    for loaded in loaded {
        match loaded.resource {
            crds::Resource::Broker(b) => {
                state.apply_broker(b);
            }
            crds::Resource::Trigger(t) => {
                state.apply_trigger(t);
            }
            _ => {}
        }
    }
    state
}

fn event(id: &str) -> Event {
    let json = serde_json::json!({"specversion": "1.0", "id": id, "source": "/t", "type": "t"});
    Event::from_json(json).unwrap()
}

fn broker(log: Arc<dyn EventLog>, state: EventingState, registry: &Registry) -> EventBroker {
    let (state_tx, state_rx) = watch::channel(Arc::new(state));
    // The state never changes in these tests; a dropped sender would stop the broker.
    std::mem::forget(state_tx);
    EventBroker::new(
        log,
        state_rx,
        BrokerConfig {
            max_event_size: eventing_broker::runtime::MIN_EVENT_SIZE,
            default_timeout: Duration::from_secs(5),
            concurrency: 8,
            ingress: "127.0.0.1:9".parse().unwrap(),
            broker_ingress: None,
            domain: "localhost".into(),
            drain_timeout: std::time::Duration::ZERO,
        },
        registry,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_every_trigger_and_a_restart_resumes() {
    each_backend("runtime", |backend| async move {
        let (a, got_a) = subscriber().await;
        let (b, got_b) = subscriber().await;
        let state = state(&[a, b]);

        let shutdown = mecha_common::Shutdown::new();
        let registry = Registry::new();
        let log = backend.open().await;
        let running = broker(log.clone(), state.clone(), &registry);
        let task = running.clone().start(shutdown.signal()).await;
        for batch in 0..10 {
            let events = (0..20)
                .map(|i| event(&format!("{}", batch * 20 + i)))
                .collect();
            assert_eq!(running.ingest("default", "b", events).await.unwrap(), 20);
        }
        until("200 events at both triggers", || {
            counts(&got_a).len() == 200 && counts(&got_b).len() == 200
        })
        .await;
        // Acknowledged too (a delivery is acknowledged just after its answer came).
        backlog_becomes(&log, "default/b", 0).await;
        shutdown.trigger();
        task.await.unwrap();
        drop((running, log));
        // In normal operation each event reaches each trigger once.
        for got in [&got_a, &got_b] {
            let twice: Vec<_> = counts(got).into_iter().filter(|(_, n)| *n > 1).collect();
            assert!(
                twice.is_empty(),
                "{}: delivered twice: {twice:?}",
                backend.name
            );
        }

        // Started again on the same log: nothing is delivered twice, new events flow.
        let shutdown = mecha_common::Shutdown::new();
        let registry = Registry::new();
        let running = broker(backend.open().await, state, &registry);
        let task = running.clone().start(shutdown.signal()).await;
        running
            .ingest("default", "b", vec![event("after")])
            .await
            .unwrap();
        until("the new event at both triggers", || {
            counts(&got_a).contains_key("after") && counts(&got_b).contains_key("after")
        })
        .await;
        for got in [&got_a, &got_b] {
            let twice: Vec<_> = counts(got).into_iter().filter(|(_, n)| *n > 1).collect();
            assert!(
                twice.is_empty(),
                "{}: delivered twice: {twice:?}",
                backend.name
            );
            assert_eq!(counts(got).len(), 201);
        }
        shutdown.trigger();
        task.await.unwrap();
    })
    .await;
}

/// Fault injection is the embedded log's (its store can be made to fail on purpose); the
/// failure handling it exercises is the runtime's, the same for every log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_trigger_is_not_ready_with_the_reason_and_recovers() {
    let dir = TempDir::new("failing");
    // No in-memory tail: every read goes to the file, whose failure this test injects.
    let log = RedbLog::open_with(
        &dir.0.join("events.redb"),
        RedbOptions {
            tail_bytes: 0,
            ..RedbOptions::default()
        },
    )
    .unwrap();
    let (addr, received) = subscriber().await;
    let registry = Registry::new();
    let broker = broker(Arc::new(log.clone()), state(&[addr]), &registry);
    let shutdown = mecha_common::Shutdown::new();
    let task = broker.clone().start(shutdown.signal()).await;
    let received = || received.lock().unwrap().len();
    let ready = || {
        broker
            .metrics()
            .trigger_ready
            .with_label_values(&["default", "t0"])
            .get()
    };
    broker
        .ingest("default", "b", vec![event("1")])
        .await
        .unwrap();
    until("the first event", || received() == 1).await;
    assert_eq!(broker.trigger_problem("default", "t0"), None);

    // A dependency of delivery panics: the trigger says so, and delivers once it stops.
    broker.inject_delivery_panics(true);
    broker
        .ingest("default", "b", vec![event("2")])
        .await
        .unwrap();
    until("the trigger to report the panic", || {
        broker
            .trigger_problem("default", "t0")
            .is_some_and(|p| p.contains("injected delivery panic"))
    })
    .await;
    assert_eq!(ready(), 0);
    broker.inject_delivery_panics(false);
    until("the event delivered after recovery", || received() == 2).await;
    until("the trigger ready again", || {
        broker.trigger_problem("default", "t0").is_none()
    })
    .await;
    assert_eq!(ready(), 1);

    // The log cannot be read: the trigger and the broker both say so, until it can.
    log.inject_fault(Fault::ReadError);
    broker
        .ingest("default", "b", vec![event("3")])
        .await
        .expect("the writer still works");
    until("the read failure reported", || {
        broker
            .trigger_problem("default", "t0")
            .is_some_and(|p| p.contains("cannot read the event log"))
    })
    .await;
    assert!(
        broker
            .problem()
            .is_some_and(|p| p.contains("cannot read default/b")),
        "{:?}",
        broker.problem()
    );
    log.inject_fault(Fault::None);
    until("the event delivered after the log heals", || {
        received() == 3
    })
    .await;
    until("everything ready again", || {
        broker.trigger_problem("default", "t0").is_none() && broker.problem().is_none()
    })
    .await;
    let failures = broker
        .metrics()
        .trigger_failures
        .with_label_values(&["default", "t0"])
        .get();
    assert_eq!(failures, 2);
    shutdown.trigger();
    task.await.unwrap();
}

// === JetStream only: deduplication, a server that goes away, a cluster that loses a node ===

#[cfg(feature = "jetstream")]
mod jetstream_only {
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicBool;

    use bytes::Bytes;
    use http_body_util::Full;
    use test_support::nats::NatsServer;
    use tokio::task::block_in_place;

    use super::*;

    async fn connect(url: &str) -> Arc<dyn EventLog> {
        Arc::new(
            JetStreamLog::connect(JetStreamConfig::from_url(url).unwrap())
                .await
                .unwrap(),
        )
    }

    /// What posting through the ingress got: the ids answered 202, and how many 503s (each
    /// checked for `Retry-After`).
    #[derive(Default)]
    struct Posted {
        accepted: Mutex<Vec<String>>,
        refused: AtomicUsize,
    }

    /// Posts `id` in binary mode through the real ingress handler; true when accepted.
    async fn post(broker: &EventBroker, id: &str, posted: &Posted) -> bool {
        let request = http::Request::post("/default/b")
            .header("ce-specversion", "1.0")
            .header("ce-id", id)
            .header("ce-source", "/posts")
            .header("ce-type", "t")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let budget = mecha_common::BodyBudget::new(
            "test",
            mecha_common::BudgetSettings::default(),
            &prometheus::Registry::new(),
        );
        let response = eventing_broker::ingress::handle(broker, &budget, request).await;
        match response.status().as_u16() {
            202 => {
                posted.accepted.lock().unwrap().push(id.to_string());
                true
            }
            503 => {
                assert!(
                    response.headers().contains_key("retry-after"),
                    "a 503 says when to retry"
                );
                posted.refused.fetch_add(1, Ordering::Relaxed);
                false
            }
            other => panic!("unexpected answer {other} to {id}"),
        }
    }

    /// Every id accepted reached the subscriber; returns how many arrived more than once.
    async fn all_delivered(posted: &Posted, got: &Mutex<Vec<String>>, within: Duration) -> usize {
        let accepted: HashSet<String> = posted.accepted.lock().unwrap().iter().cloned().collect();
        let deadline = Instant::now() + within;
        loop {
            let counts = counts(got);
            let missing: Vec<&String> = accepted
                .iter()
                .filter(|id| !counts.contains_key(*id))
                .collect();
            if missing.is_empty() {
                return counts.values().map(|n| n - 1).sum();
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} accepted events were never delivered: {missing:?}",
                missing.len(),
                accepted.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retried_post_is_stored_once() {
        let server = block_in_place(NatsServer::start);
        let log = connect(&server.url()).await;
        let mut consumer = log.consumer("ns/b", "ns/b/t").await.unwrap();
        log.append("ns/b", vec![record(1), record(2)])
            .await
            .unwrap();
        // The client did not hear the 202 and posts the same event (source and id) again.
        log.append("ns/b", vec![record(1)]).await.unwrap();
        log.append("ns/b", vec![record(3)]).await.unwrap();
        let got = take(&mut consumer, 3).await;
        assert_eq!(
            got.iter().map(text).collect::<Vec<_>>(),
            ["event 1", "event 2", "event 3"]
        );
        assert!(
            drain(&mut consumer, Duration::from_millis(500))
                .await
                .is_empty()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_stopped_and_restarted_while_the_broker_runs_loses_nothing() {
        let mut server = block_in_place(NatsServer::start);
        let log = connect(&format!("{}?ack-wait=2s", server.url())).await;
        let (addr, got) = subscriber().await;
        let registry = Registry::new();
        let running = broker(log, state(&[addr]), &registry);
        let shutdown = mecha_common::Shutdown::new();
        let task = running.clone().start(shutdown.signal()).await;

        let posted = Arc::new(Posted::default());
        let stop = Arc::new(AtomicBool::new(false));
        let poster = {
            let (running, posted, stop) = (running.clone(), posted.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    post(&running, &format!("e{n}"), &posted).await;
                    n += 1;
                    // A steady trickle of posts, not a busy loop.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        let accepted = || posted.accepted.lock().unwrap().len();
        let refused = || posted.refused.load(Ordering::Relaxed);
        until("posts accepted", || accepted() >= 50).await;

        block_in_place(|| server.stop());
        until("503s while NATS is down", || refused() >= 20).await;
        let problem = running.problem().expect("the broker is not ready");
        assert!(problem.contains("not reachable"), "{problem}");
        let accepted_while_down = accepted();

        block_in_place(|| server.restart());
        until("posts accepted again", || {
            accepted() >= accepted_while_down + 50
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        poster.await.unwrap();
        let duplicates = all_delivered(&posted, &got, Duration::from_secs(60)).await;
        eprintln!(
            "accepted {}, refused with 503 {}, delivered twice {duplicates}",
            accepted(),
            refused()
        );
        until("the broker ready again", || running.problem().is_none()).await;
        shutdown.trigger();
        task.await.unwrap();
    }

    /// NATS is down when the broker starts: its triggers cannot have their consumers, so the
    /// broker takes no event (one accepted now would fall before the trigger's start) until
    /// they do; then events flow.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_started_before_its_nats_takes_events_once_its_triggers_run() {
        let mut server = block_in_place(NatsServer::start);
        block_in_place(|| server.stop());
        let log = connect(&server.url()).await;
        let (addr, got) = subscriber().await;
        let registry = Registry::new();
        let running = broker(log, state(&[addr]), &registry);
        let shutdown = mecha_common::Shutdown::new();
        let task = running.clone().start(shutdown.signal()).await;
        let posted = Posted::default();
        assert!(
            !post(&running, "early", &posted).await,
            "503 while NATS is down"
        );
        assert!(
            running
                .trigger_problem("default", "t0")
                .is_some_and(|p| p.contains("cannot start")),
            "{:?}",
            running.trigger_problem("default", "t0")
        );

        block_in_place(|| server.restart());
        // The reconnect, then the next tick starts the trigger; posts are refused until then.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !post(&running, "first", &posted).await {
            assert!(Instant::now() < deadline, "the broker never took an event");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(running.trigger_problem("default", "t0"), None);
        until("the first event delivered", || {
            counts(&got).contains_key("first")
        })
        .await;
        shutdown.trigger();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_node_killed_during_5000_posts_loses_no_accepted_event() {
        let mut nodes = block_in_place(NatsServer::cluster);
        let servers: Vec<String> = nodes.iter().map(NatsServer::url).collect();
        let log = connect(&format!("{}?replicas=3&ack-wait=5s", servers.join(","))).await;
        let (addr, got) = subscriber().await;
        let registry = Registry::new();
        let running = broker(log, state(&[addr]), &registry);
        let shutdown = mecha_common::Shutdown::new();
        let task = running.clone().start(shutdown.signal()).await;
        // The trigger's consumer exists before the first post (a cluster that has only just
        // elected its leaders may refuse the first attempts; the broker retries them).
        until("the trigger running", || {
            running
                .metrics()
                .trigger_ready
                .with_label_values(&["default", "t0"])
                .get()
                == 1
        })
        .await;

        let posted = Arc::new(Posted::default());
        let mut posters = Vec::new();
        for client in 0..8 {
            let (running, posted) = (running.clone(), posted.clone());
            posters.push(tokio::spawn(async move {
                for n in 0..625 {
                    // As a client that honours the 503's Retry-After would, only sooner.
                    let id = format!("c{client}-{n}");
                    for _ in 0..600 {
                        if post(&running, &id, &posted).await {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }));
        }
        let answered =
            || posted.accepted.lock().unwrap().len() + posted.refused.load(Ordering::Relaxed);
        until("1,000 posts answered", || answered() >= 1000).await;
        // The node that leads the broker's stream: losing it is what a majority must survive.
        let leader = support::stream_leader(&servers, "default/b").await;
        let victim = nodes.iter().position(|n| n.name == leader).unwrap();
        block_in_place(|| nodes[victim].kill());
        for poster in posters {
            poster.await.unwrap();
        }
        let accepted = posted.accepted.lock().unwrap().len();
        assert_eq!(accepted, 5000, "every post is accepted in the end");
        let duplicates = all_delivered(&posted, &got, Duration::from_secs(120)).await;
        eprintln!(
            "R3, stream leader {leader} SIGKILLed after 1,000 posts: accepted {accepted} of 5000 (after {} answers 503, each retried), every accepted event delivered, {duplicates} delivered twice",
            posted.refused.load(Ordering::Relaxed)
        );
        shutdown.trigger();
        task.await.unwrap();
    }
}

/// A trigger whose subscriber answers slowly does not hold back another trigger of the same
/// broker: the fast one has every event while the slow one is still working through them,
/// and the slow one still gets all of them in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_trigger_does_not_hold_back_a_fast_one() {
    each_backend("slow-fast", |backend| async move {
        let (fast, got_fast) = subscriber().await;
        let (slow, got_slow) = support::slow_subscriber(Duration::from_millis(100)).await;
        let shutdown = mecha_common::Shutdown::new();
        let registry = Registry::new();
        let log = backend.open().await;
        let running = broker(log.clone(), state(&[fast, slow]), &registry);
        let task = running.clone().start(shutdown.signal()).await;
        for batch in 0..10 {
            let events = (0..20)
                .map(|i| event(&format!("{}", batch * 20 + i)))
                .collect();
            running.ingest("default", "b", events).await.unwrap();
        }
        until("200 events at the fast trigger", || {
            counts(&got_fast).len() == 200
        })
        .await;
        // 8 deliveries at a time, 100 ms each: the slow one needs 2.5 s for all 200.
        let slow_then = counts(&got_slow).len();
        assert!(
            slow_then < 200,
            "{}: the slow trigger had {slow_then} when the fast one finished",
            backend.name
        );
        until("200 events at the slow trigger", || {
            counts(&got_slow).len() == 200
        })
        .await;
        shutdown.trigger();
        task.await.unwrap();
    })
    .await;
}

/// An `events.redb` whose events were stored before the record format (each event
/// re-serialized as structured JSON, as brokers until then wrote it) still delivers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_log_of_json_records_still_delivers() {
    const OLD: [&str; 2] = [
        r#"{"data":{"a":1,"b":[1,2]},"datacontenttype":"application/json","id":"old-1","knativebrokerttl":254,"source":"/s","specversion":"1.0","type":"t"}"#,
        r#"{"data_base64":"AJ//","datacontenttype":"application/octet-stream","id":"old-2","knativebrokerttl":254,"note":"café","source":"/s","specversion":"1.0","type":"t"}"#,
    ];
    let dir = TempDir::new("json-records");
    let path = dir.0.join("events.redb");
    let (addr, seen) = support::raw_subscriber().await;
    {
        let log = RedbLog::open(&path).unwrap();
        // The trigger existed when the events were accepted.
        drop(
            EventLog::consumer(&log, "default/b", "default/b/t0")
                .await
                .unwrap(),
        );
        log.append(
            "default/b",
            OLD.iter().map(|r| r.as_bytes().to_vec()).collect(),
        )
        .await
        .unwrap();
        log.close();
    }
    let shutdown = mecha_common::Shutdown::new();
    let registry = Registry::new();
    let log: Arc<dyn EventLog> = Arc::new(RedbLog::open(&path).unwrap());
    let running = broker(log, state(&[addr]), &registry);
    let task = running.clone().start(shutdown.signal()).await;
    until("both old events delivered", || {
        seen.lock().unwrap().len() == 2
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    let find = |id: &str| {
        seen.iter()
            .find(|s| s.header("ce-id") == Some(id.as_bytes()))
            .unwrap_or_else(|| panic!("{id} not delivered"))
            .clone()
    };
    let first = find("old-1");
    assert_eq!(first.body, br#"{"a":1,"b":[1,2]}"#);
    assert_eq!(first.header("content-type"), Some(&b"application/json"[..]));
    let second = find("old-2");
    assert_eq!(second.body, [0, 0x9f, 0xff]);
    assert_eq!(second.header("ce-note"), Some(&b"caf%C3%A9"[..]));
    shutdown.trigger();
    task.await.unwrap();
}
