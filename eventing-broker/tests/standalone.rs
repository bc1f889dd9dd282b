//! The `eventing-broker` binary from outside: real processes, a real `nats-server`, and a real
//! control plane (the autoscaler's router behind `mecha_common::auth::guard`, as `mecha up`
//! serves it) streaming Brokers and Triggers.
#![cfg(feature = "standalone")]
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use crds::eventing::EventingState;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mecha_common::auth::{AdminToken, Credential, Refusals};
use mecha_common::{Activation, EndpointTable, RoutingTable, Shutdown};
use test_support::nats::NatsServer;
use tokio::sync::{mpsc, watch};
use tokio::task::block_in_place;
use tokio::time::Instant;

mod support;
use support::{Seen, counts, raw_exchange, raw_post, raw_subscriber, subscriber, until};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The control plane: the autoscaler's API with an eventing state the test sets, guarded by
/// a credential as `mecha up` guards it.
struct ControlPlane {
    _eventing: watch::Sender<Arc<EventingState>>,
    _shutdown: Shutdown,
}

impl ControlPlane {
    async fn start(
        listener: tokio::net::TcpListener,
        token: AdminToken,
        state: EventingState,
    ) -> Self {
        let shutdown = Shutdown::new();
        let (eventing, eventing_rx) = watch::channel(Arc::new(state));
        let (_routes_tx, routes) = watch::channel(Arc::<RoutingTable>::default());
        let (_endpoints_tx, endpoints) = watch::channel(Arc::<EndpointTable>::default());
        let (stats, _) = mpsc::unbounded_channel();
        let api = autoscaler::api::router(
            autoscaler::api::ApiState {
                routes,
                endpoints,
                stats,
                activation: Activation::new().0,
                shutdown: shutdown.signal(),
                eventing: None,
                sources: None,
            }
            .with_eventing(eventing_rx),
        );
        let registry = prometheus::Registry::new();
        let refusals = Refusals::register(&registry);
        let app = mecha_common::auth::guard(
            axum::Router::new(),
            api,
            Credential::new(token, "the test's token"),
            refusals,
        );
        let signal = shutdown.signal();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(signal.recv())
                .await
                .unwrap();
            // The senders of the API's other channels live as long as it serves.
            drop((_routes_tx, _endpoints_tx));
        });
        Self {
            _eventing: eventing,
            _shutdown: shutdown,
        }
    }
}

/// One `eventing-broker` process; SIGKILLed on drop if still running.
struct Broker {
    child: Child,
    ingress: SocketAddr,
    admin: SocketAddr,
}

impl Broker {
    fn start(nats: &str, control: SocketAddr, token: &AdminToken) -> Self {
        Self::start_with(nats, control, token, &[])
    }

    fn start_with(
        nats: &str,
        control: SocketAddr,
        token: &AdminToken,
        settings: &[(&str, &str)],
    ) -> Self {
        let [ingress, admin] = test_support::free_ports::<2>();
        let child = Command::new(env!("CARGO_BIN_EXE_eventing-broker"))
            .env_clear()
            .envs(settings.iter().copied())
            .env("BROKER_PORT", ingress.to_string())
            .env("BROKER_ADMIN_PORT", admin.to_string())
            .env("BROKER_EVENT_LOG", nats)
            .env("AUTOSCALER_ADDR", control.to_string())
            .env("AUTOSCALER_TOKEN", token.as_str())
            .env("DRAIN_TIMEOUT", "10s")
            .env("MECHA_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            ingress: SocketAddr::from(([127, 0, 0, 1], ingress)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        }
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Waits for the process to exit (up to `within`); its status.
    async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// `GET path`: the status and body, or `None` when nothing answers.
async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let request = http::Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.ok()?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Posts one binary-mode event; the status (`None`: no answer) and whether a 503 said when to
/// retry.
async fn post(client: &HttpClient, addr: SocketAddr, id: &str, kind: &str) -> Option<u16> {
    let request = http::Request::post(format!("http://{addr}/default/b"))
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/standalone-test")
        .header("ce-type", kind)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"n\":1}")))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .ok()?
        .ok()?;
    let status = response.status().as_u16();
    if status == 503 {
        assert!(
            response.headers().contains_key("retry-after"),
            "a 503 says when to retry"
        );
    }
    Some(status)
}

/// The resources of `yaml` as an `EventingState`.
fn load(yaml: &str) -> EventingState {
    let (loaded, errors) = crds::load_str(
        std::path::Path::new("/tmp/standalone.yaml"),
        yaml,
        crds::Mode::Local,
    );
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

/// Broker `default/b` and three triggers: `all` (no filter), `orders` (type `order`) and
/// `never` (a type nobody sends).
fn state(all: SocketAddr, orders: SocketAddr, never: SocketAddr) -> EventingState {
    let trigger = |name: &str, filter: &str, to: SocketAddr| {
        format!(
            "---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: {name}\nspec:\n  broker: b\n{filter}  subscriber:\n    uri: http://{to}/\n"
        )
    };
    let yaml = format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: b\n{}{}{}",
        trigger("all", "", all),
        trigger(
            "orders",
            "  filter:\n    attributes:\n      type: order\n",
            orders
        ),
        trigger(
            "never",
            "  filter:\n    attributes:\n      type: never\n",
            never
        ),
    );
    load(&yaml)
}

/// Waits until the broker's `/ready` answers 200.
async fn ready(client: &HttpClient, broker: &Broker) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match get(client, broker.admin, "/ready").await {
            Some((200, _)) => return,
            other => assert!(Instant::now() < deadline, "never ready: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A control plane serving `state` with `token`, on a port of its own.
async fn control_plane(token: &AdminToken, state: EventingState) -> (SocketAddr, ControlPlane) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (
        addr,
        ControlPlane::start(listener, token.clone(), state).await,
    )
}

/// Sums a counter's series on a broker's `/metrics`.
async fn metric(client: &HttpClient, broker: &Broker, name: &str) -> u64 {
    let (_, text) = get(client, broker.admin, "/metrics").await.unwrap();
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until each id in `expected` arrived at least once; returns how many arrived more
/// than once, and fails on an id that was never expected.
async fn delivered(
    what: &str,
    got: &Mutex<Vec<String>>,
    expected: &HashSet<String>,
    within: Duration,
) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let counts = counts(got);
        if let Some(stray) = counts.keys().find(|id| !expected.contains(*id)) {
            panic!("{what}: {stray} was not for this trigger");
        }
        let missing = expected
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .count();
        if missing == 0 {
            return counts.values().map(|n| n - 1).sum();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {missing} of {} accepted events never delivered",
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two replicas on one stream share each trigger's consumer: before the control plane
/// answers they are not ready and refuse events with 503; then every event reaches every
/// matching trigger exactly once; a replica SIGKILLed while events are posted and delivered
/// loses nothing (what it held comes back to the other; duplicates counted); SIGTERM drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_work_and_a_killed_one_loses_nothing() {
    let nats = block_in_place(NatsServer::start);
    // A short acknowledgement deadline: what a killed replica held comes back soon.
    let log = format!("{}?ack-wait=2s", nats.url());
    let (all_addr, all) = subscriber().await;
    let (orders_addr, orders) = subscriber().await;
    let (never_addr, never) = subscriber().await;
    let client = client();

    // The brokers start before their control plane listens.
    let control_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let control_addr = control_listener.local_addr().unwrap();
    let token = AdminToken::generate().unwrap();
    let mut brokers = [
        Broker::start(&log, control_addr, &token),
        Broker::start(&log, control_addr, &token),
    ];
    for broker in &brokers {
        let deadline = Instant::now() + Duration::from_secs(30);
        let said = loop {
            if let Some((status, body)) = get(&client, broker.admin, "/ready").await {
                break (status, body);
            }
            assert!(Instant::now() < deadline, "the admin port never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(said.0, 503, "not ready without Brokers and Triggers");
        assert!(said.1.contains("no Brokers and Triggers"), "{}", said.1);
        assert_eq!(
            post(&client, broker.ingress, "early", "order").await,
            Some(503),
            "no event taken before the triggers run"
        );
    }
    // The control plane comes up (with the credential the brokers were given): the brokers'
    // watches reconnect on their own.
    control_listener.set_nonblocking(true).unwrap();
    let _control = ControlPlane::start(
        tokio::net::TcpListener::from_std(control_listener).unwrap(),
        token.clone(),
        state(all_addr, orders_addr, never_addr),
    )
    .await;
    for broker in &brokers {
        ready(&client, broker).await;
    }

    // Normal operation: 400 events, posted to both replicas in turn; each reaches `all`
    // once, the orders reach `orders` once, nothing reaches `never`.
    let mut every = HashSet::new();
    let mut order_ids = HashSet::new();
    for n in 0..400 {
        let id = format!("a{n}");
        let kind = if n % 2 == 0 { "order" } else { "other" };
        let broker = &brokers[n % 2];
        assert_eq!(post(&client, broker.ingress, &id, kind).await, Some(202));
        if kind == "order" {
            order_ids.insert(id.clone());
        }
        every.insert(id);
    }
    let within = Duration::from_secs(60);
    assert_eq!(delivered("all", &all, &every, within).await, 0, "once each");
    assert_eq!(
        delivered("orders", &orders, &order_ids, within).await,
        0,
        "once each"
    );
    // The subscriber records an event before it answers; the replica counts the delivery
    // after the answer: wait for the counts to catch up with what arrived.
    let deadline = Instant::now() + Duration::from_secs(10);
    let per_replica = loop {
        let counts = [
            metric(&client, &brokers[0], "mecha_broker_events_delivered_total").await,
            metric(&client, &brokers[1], "mecha_broker_events_delivered_total").await,
        ];
        if counts[0] + counts[1] >= 600 || Instant::now() > deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("normal operation: 400 events, deliveries per replica {per_replica:?}, no duplicate");
    assert_eq!(
        per_replica[0] + per_replica[1],
        600,
        "each delivery made once"
    );
    assert!(
        per_replica.iter().all(|n| *n > 0),
        "both replicas share the triggers' consumers: {per_replica:?}"
    );

    // A failure: 4 clients post 2,000 events to both replicas; replica 1 is SIGKILLed after
    // 500 answers. A client whose post got no answer (or a 503) posts it again to the other.
    let posted = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let answered = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(AtomicUsize::new(0));
    let ingresses = [brokers[0].ingress, brokers[1].ingress];
    let mut posters = Vec::new();
    for c in 0..4 {
        let (client, posted, answered, retried) = (
            client.clone(),
            posted.clone(),
            answered.clone(),
            retried.clone(),
        );
        posters.push(tokio::spawn(async move {
            for n in 0..500 {
                let id = format!("b{c}-{n}");
                let kind = if n % 2 == 0 { "order" } else { "other" };
                let mut target = (c + n) % 2;
                let mut tries = 0;
                loop {
                    match post(&client, ingresses[target], &id, kind).await {
                        Some(202) => break,
                        Some(503) | None => {
                            retried.fetch_add(1, Ordering::Relaxed);
                            target = 1 - target;
                        }
                        Some(other) => panic!("{id}: answered {other}"),
                    }
                    tries += 1;
                    assert!(tries < 200, "{id} never accepted");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                answered.fetch_add(1, Ordering::Relaxed);
                posted.lock().unwrap().push((id, kind.to_string()));
            }
        }));
    }
    until("500 posts answered", || {
        answered.load(Ordering::Relaxed) >= 500
    })
    .await;
    let delivered_before_kill = all.lock().unwrap().len();
    brokers[1].signal(rustix::process::Signal::KILL);
    let _ = brokers[1].exited(Duration::from_secs(10)).await;
    for poster in posters {
        poster.await.unwrap();
    }
    for (id, kind) in posted.lock().unwrap().iter() {
        if kind == "order" {
            order_ids.insert(id.clone());
        }
        every.insert(id.clone());
    }
    let within = Duration::from_secs(120);
    let duplicates_all = delivered("all", &all, &every, within).await;
    let duplicates_orders = delivered("orders", &orders, &order_ids, within).await;
    assert!(never.lock().unwrap().is_empty(), "no event matched `never`");
    eprintln!(
        "replica SIGKILLed after 500 of 2,000 posts ({delivered_before_kill} deliveries to `all` by then, {} posts retried at the other replica): every accepted event delivered to every matching trigger; delivered twice: {duplicates_all} to `all`, {duplicates_orders} to `orders`",
        retried.load(Ordering::Relaxed)
    );

    // The killed replica started again joins in: ready, and taking events.
    brokers[1] = Broker::start(&log, control_addr, &token);
    ready(&client, &brokers[1]).await;
    assert_eq!(
        post(&client, brokers[1].ingress, "after-restart", "other").await,
        Some(202)
    );
    every.insert("after-restart".into());
    delivered("all", &all, &every, within).await;

    // SIGTERM: the survivor drains and exits cleanly, well within its drain timeout.
    brokers[0].signal(rustix::process::Signal::TERM);
    let term = Instant::now();
    let status = brokers[0].exited(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "the survivor's exit after SIGTERM ({:?} later): {status:?}",
        term.elapsed()
    );
}

/// SIGTERM while deliveries are in flight: the replica takes no more events, its deliveries
/// in flight finish and are acknowledged (not delivered again by the other replica), what it
/// took and had not started goes to the other replica, and it exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_deliveries_in_flight_finish_and_hands_back_the_rest() {
    let nats = block_in_place(NatsServer::start);
    let log = format!("{}?ack-wait=3s", nats.url());
    // Deliveries are held at the subscriber until SIGTERM has come: some are in flight then.
    let (slow_addr, slow, release) = support::gated_subscriber().await;
    let token = AdminToken::generate().unwrap();
    let (control_addr, _control) =
        control_plane(&token, state(slow_addr, slow_addr, slow_addr)).await;
    let settings = [("BROKER_DELIVERY_CONCURRENCY", "4")];
    let mut brokers = [
        Broker::start_with(&log, control_addr, &token, &settings),
        Broker::start_with(&log, control_addr, &token, &settings),
    ];
    let client = client();
    for broker in &brokers {
        ready(&client, broker).await;
    }
    // `other` events reach only `all`: one delivery each.
    let mut every = HashSet::new();
    for n in 0..24 {
        let id = format!("d{n}");
        assert_eq!(
            post(&client, brokers[n % 2].ingress, &id, "other").await,
            Some(202)
        );
        every.insert(id);
    }
    // Both replicas are delivering (4 each at most).
    until("deliveries in flight", || slow.lock().unwrap().len() >= 8).await;
    let at_term = slow.lock().unwrap().len();
    let term = Instant::now();
    brokers[0].signal(rustix::process::Signal::TERM);
    // Draining (unready) with its deliveries still held: now let them finish.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some((200, _)) = get(&client, brokers[0].admin, "/ready").await {
        assert!(Instant::now() < deadline, "SIGTERM never turned it unready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    release.send(true).unwrap();
    let status = brokers[0].exited(Duration::from_secs(20)).await;
    let drained = term.elapsed();
    assert!(status.success(), "{status:?}");
    let duplicates = delivered("all", &slow, &every, Duration::from_secs(60)).await;
    eprintln!(
        "SIGTERM with {at_term} deliveries made: the replica drained in {drained:?}; all 24 events delivered, {duplicates} twice"
    );
    assert_eq!(
        duplicates, 0,
        "a delivery in flight at SIGTERM finishes and is acknowledged, not made again"
    );
}

/// NATS stopped under a running `eventing-broker`: not ready and 503 with `Retry-After` while
/// it is down; once it is back, ready again on its own, and every accepted event delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_and_back_under_the_binary_503s_then_resumes_on_its_own() {
    let mut nats = block_in_place(NatsServer::start);
    let (addr, got) = subscriber().await;
    let token = AdminToken::generate().unwrap();
    let (control_addr, _control) = control_plane(&token, state(addr, addr, addr)).await;
    let broker = Broker::start(&format!("{}?ack-wait=2s", nats.url()), control_addr, &token);
    let client = client();
    ready(&client, &broker).await;
    let mut accepted = HashSet::new();
    for n in 0..50 {
        let id = format!("before{n}");
        assert_eq!(post(&client, broker.ingress, &id, "other").await, Some(202));
        accepted.insert(id);
    }

    block_in_place(|| nats.stop());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    loop {
        match post(&client, broker.ingress, &format!("down{refused}"), "other").await {
            Some(503) => refused += 1,
            // Accepted before the client noticed the connection was gone.
            Some(202) => {
                accepted.insert(format!("down{refused}"));
            }
            other => panic!("while NATS is down: {other:?}"),
        }
        if refused >= 5 {
            break;
        }
        assert!(Instant::now() < deadline, "no 503 while NATS is down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, why) = get(&client, broker.admin, "/ready").await.unwrap();
    assert_eq!(status, 503, "not ready while NATS is down");
    assert!(why.contains("not reachable"), "{why}");

    block_in_place(|| nats.restart());
    ready(&client, &broker).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while accepted.len() < 100 {
        let id = format!("after{n}");
        n += 1;
        match post(&client, broker.ingress, &id, "other").await {
            Some(202) => {
                accepted.insert(id);
            }
            Some(503) => assert!(
                Instant::now() < deadline,
                "still refusing after NATS is back"
            ),
            other => panic!("after NATS is back: {other:?}"),
        }
    }
    let duplicates = delivered("all", &got, &accepted, Duration::from_secs(60)).await;
    eprintln!(
        "NATS stopped and restarted under the binary: {refused} posts answered 503 while it was down, {} accepted, all delivered, {duplicates} twice",
        accepted.len()
    );
}

/// A three-node NATS cluster (stream R3) under two replicas: the node leading the broker's
/// stream is SIGKILLed while 5,000 events are posted; posts answered 503 (or not at all) are
/// posted again, to the other replica; every accepted event reaches every matching trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_under_two_replicas_loses_no_accepted_event() {
    let mut nodes = block_in_place(NatsServer::cluster);
    let servers: Vec<String> = nodes.iter().map(NatsServer::url).collect();
    let log = format!("{}?replicas=3&ack-wait=5s", servers.join(","));
    let (all_addr, all) = subscriber().await;
    let (orders_addr, orders) = subscriber().await;
    let token = AdminToken::generate().unwrap();
    let (control_addr, _control) =
        control_plane(&token, state(all_addr, orders_addr, orders_addr)).await;
    let brokers = [
        Broker::start(&log, control_addr, &token),
        Broker::start(&log, control_addr, &token),
    ];
    let client = client();
    for broker in &brokers {
        ready(&client, broker).await;
    }
    let posted = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
    let (answered, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let ingresses = [brokers[0].ingress, brokers[1].ingress];
    let mut posters = Vec::new();
    for c in 0..8 {
        let (client, posted, answered, refused) = (
            client.clone(),
            posted.clone(),
            answered.clone(),
            refused.clone(),
        );
        posters.push(tokio::spawn(async move {
            for n in 0..625 {
                let id = format!("c{c}-{n}");
                let order = n % 2 == 0;
                let kind = if order { "order" } else { "other" };
                let mut target = (c + n) % 2;
                let mut tries = 0;
                loop {
                    match post(&client, ingresses[target], &id, kind).await {
                        Some(202) => break,
                        Some(503) | None => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            target = 1 - target;
                        }
                        Some(other) => panic!("{id}: answered {other}"),
                    }
                    tries += 1;
                    assert!(tries < 600, "{id} never accepted");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                answered.fetch_add(1, Ordering::Relaxed);
                posted.lock().unwrap().push((id, order));
            }
        }));
    }
    until("1,000 posts answered", || {
        answered.load(Ordering::Relaxed) >= 1000
    })
    .await;
    let leader = support::stream_leader(&servers, "default/b").await;
    let victim = nodes.iter().position(|n| n.name == leader).unwrap();
    block_in_place(|| nodes[victim].kill());
    for poster in posters {
        poster.await.unwrap();
    }
    let posted = posted.lock().unwrap().clone();
    assert_eq!(posted.len(), 5000, "every post is accepted in the end");
    let every: HashSet<String> = posted.iter().map(|(id, _)| id.clone()).collect();
    let order_ids: HashSet<String> = posted
        .iter()
        .filter(|(_, order)| *order)
        .map(|(id, _)| id.clone())
        .collect();
    let within = Duration::from_secs(120);
    let twice_all = delivered("all", &all, &every, within).await;
    let twice_orders = delivered("orders", &orders, &order_ids, within).await;
    eprintln!(
        "R3 under two replicas, stream leader {leader} SIGKILLed after 1,000 of 5,000 posts: all accepted ({} answers 503 or none, each posted again), every one delivered to every matching trigger; delivered twice: {twice_all} to `all`, {twice_orders} to `orders`",
        refused.load(Ordering::Relaxed)
    );
}

/// A trigger whose subscriber is another Broker (`ref`) posts to this broker's own ingress, not
/// to the gateway: the event goes through broker `b` into broker `b2` and on to `b2`'s
/// subscriber. (`BROKER_GATEWAY_ADDR` points at a port nothing listens on.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_ref_is_posted_to_the_brokers_own_ingress() {
    let nats = block_in_place(NatsServer::start);
    let (addr, got) = subscriber().await;
    let yaml = format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: b\n---\n\
         apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: b2\n---\n\
         apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: forward\nspec:\n  broker: b\n  subscriber:\n    ref:\n      apiVersion: eventing.knative.dev/v1\n      kind: Broker\n      name: b2\n---\n\
         apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: sink\nspec:\n  broker: b2\n  subscriber:\n    uri: http://{addr}/\n"
    );
    let token = AdminToken::generate().unwrap();
    let (control_addr, _control) = control_plane(&token, load(&yaml)).await;
    let [unused] = test_support::free_ports::<1>();
    let gateway = format!("127.0.0.1:{unused}");
    let broker = Broker::start_with(
        &nats.url(),
        control_addr,
        &token,
        &[("BROKER_GATEWAY_ADDR", &gateway)],
    );
    let client = client();
    ready(&client, &broker).await;
    assert_eq!(
        post(&client, broker.ingress, "chained", "any").await,
        Some(202)
    );
    let expected = HashSet::from(["chained".to_string()]);
    assert_eq!(
        delivered("sink", &got, &expected, Duration::from_secs(30)).await,
        0
    );
}

/// One event posted as raw bytes, and what its subscribers must see.
struct Sent {
    id: &'static str,
    /// Headers after the request line and `Host`, each ending in CRLF.
    headers: &'static str,
    body: &'static [u8],
    /// At the binary-mode subscriber: header (name, exact value) pairs, and the exact body.
    binary_headers: &'static [(&'static str, &'static [u8])],
    binary_body: &'static [u8],
    /// Text the structured-mode subscriber's body must contain (the data member as sent).
    structured: &'static str,
}

/// Every mode and kind of data the byte-for-byte test posts.
fn sent() -> Vec<Sent> {
    vec![
        Sent {
            id: "b-json",
            headers: "ce-specversion: 1.0\r\nce-id: b-json\r\nce-source: /raw\r\nce-type: t\r\nce-note: caf%C3%A9%20%25\r\ncontent-type: application/json\r\n",
            body: br#"{"b": [1,  2],   "a":"\u00e9" }"#,
            binary_headers: &[("content-type", b"application/json"), ("ce-note", b"caf%C3%A9%20%25"), ("ce-source", b"/raw")],
            binary_body: br#"{"b": [1,  2],   "a":"\u00e9" }"#,
            structured: r#""data":{"b": [1,  2],   "a":"\u00e9" }"#,
        },
        Sent {
            id: "b-text",
            headers: "ce-specversion: 1.0\r\nce-id: b-text\r\nce-source: /raw\r\nce-type: t\r\ncontent-type: text/plain; charset=utf-8\r\n",
            body: "h\u{e9}llo,\n  world ".as_bytes(),
            binary_headers: &[("content-type", b"text/plain; charset=utf-8")],
            binary_body: "h\u{e9}llo,\n  world ".as_bytes(),
            structured: r#""data":"h"#,
        },
        Sent {
            id: "b-bytes",
            headers: "ce-specversion: 1.0\r\nce-id: b-bytes\r\nce-source: /raw\r\nce-type: t\r\ncontent-type: application/octet-stream\r\n",
            body: &[0, 0x9f, 0xff, 0x80, b'{'],
            binary_headers: &[("content-type", b"application/octet-stream")],
            binary_body: &[0, 0x9f, 0xff, 0x80, b'{'],
            structured: r#""data_base64":"AJ//gHs=""#,
        },
        Sent {
            id: "b-empty",
            headers: "ce-specversion: 1.0\r\nce-id: b-empty\r\nce-source: /raw\r\nce-type: t\r\nce-pct: %E6%97%A5%20x%22%2541\r\n",
            body: b"",
            binary_headers: &[("ce-pct", b"%E6%97%A5%20x%22%2541")],
            binary_body: b"",
            structured: r#""pct":"日 x\"%41""#,
        },
        Sent {
            id: "s-json",
            headers: "content-type: application/cloudevents+json; charset=utf-8\r\n",
            body: br#"{ "data" : {"z": 1,  "a" :[ "\u00e9", 1.50 ]} , "specversion":"1.0","id":"s-json","source":"/raw","type":"t","datacontenttype":"application/json","note":"\u65e5\u672c %"}"#,
            binary_headers: &[("content-type", b"application/json"), ("ce-note", b"%E6%97%A5%E6%9C%AC%20%25")],
            binary_body: br#"{"z": 1,  "a" :[ "\u00e9", 1.50 ]}"#,
            structured: r#""data":{"z": 1,  "a" :[ "\u00e9", 1.50 ]}"#,
        },
        Sent {
            id: "s-base64",
            headers: "content-type: application/cloudevents+json\r\n",
            body: br#"{"specversion":"1.0","id":"s-base64","source":"/raw","type":"t","datacontenttype":"application/octet-stream","data_base64":"AJ//gA=="}"#,
            binary_headers: &[("content-type", b"application/octet-stream")],
            binary_body: &[0, 0x9f, 0xff, 0x80],
            structured: r#""data_base64":"AJ//gA==""#,
        },
        Sent {
            id: "s-text",
            headers: "content-type: application/cloudevents+json\r\n",
            body: br#"{"specversion":"1.0","id":"s-text","source":"/raw","type":"t","datacontenttype":"text/plain","data":"caf\u00e9 \"q\"\n"}"#,
            binary_headers: &[("content-type", b"text/plain")],
            binary_body: "caf\u{e9} \"q\"\n".as_bytes(),
            structured: r#""data":"caf\u00e9 \"q\"\n""#,
        },
        Sent {
            id: "s-none",
            headers: "content-type: application/cloudevents+json\r\n",
            body: br#"{"specversion":"1.0","id":"s-none","source":"/raw","type":"t"}"#,
            binary_headers: &[],
            binary_body: b"",
            structured: r#""id":"s-none""#,
        },
        Sent {
            id: "batch",
            headers: "content-type: application/cloudevents-batch+json\r\n",
            body: br#"[ {"specversion":"1.0","id":"k-1","source":"/raw","type":"t","data":{"x" :1,"x":2}},
              {"specversion":"1.0","id":"k-2","source":"/raw","type":"t","datacontenttype":"image/png","data_base64":"iVBORw=="} ]"#,
            binary_headers: &[],
            binary_body: b"",
            structured: "",
        },
    ]
}

/// Posts every [`sent`] event to a broker running on `event_log` as raw bytes, and compares
/// what a raw binary-mode subscriber and a structured-mode one get, byte for byte.
async fn events_arrive_as_sent(event_log: &str) {
    let (binary_addr, binary_seen) = raw_subscriber().await;
    let (json_addr, json_seen) = raw_subscriber().await;
    let yaml = format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: b\n---\n\
         apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: binary\nspec:\n  broker: b\n  subscriber:\n    uri: http://{binary_addr}/\n---\n\
         apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: structured\nspec:\n  broker: b\n  subscriber:\n    uri: http://{json_addr}/\n  delivery:\n    format: json\n"
    );
    let token = AdminToken::generate().unwrap();
    let (control_addr, _control) = control_plane(&token, load(&yaml)).await;
    let broker = Broker::start(event_log, control_addr, &token);
    ready(&client(), &broker).await;
    let all = sent();
    for event in &all {
        let mut request = format!(
            "POST /default/b HTTP/1.1\r\nhost: {}\r\nconnection: close\r\ncontent-length: {}\r\n{}\r\n",
            broker.ingress,
            event.body.len(),
            event.headers
        )
        .into_bytes();
        request.extend_from_slice(event.body);
        assert_eq!(
            raw_post(broker.ingress, &request).await,
            202,
            "{}",
            event.id
        );
    }
    // A structured event naming one attribute twice is refused, naming it (as binary mode
    // refuses a repeated ce- header), alone or in a batch.
    for (content_type, body) in [
        (
            "application/cloudevents+json",
            r#"{"specversion":"1.0","id":"twice","source":"/raw","type":"t","id":"other"}"#,
        ),
        (
            "application/cloudevents-batch+json",
            r#"[{"specversion":"1.0","id":"twice","source":"/raw","type":"t","type":"u"}]"#,
        ),
    ] {
        let request = format!(
            "POST /default/b HTTP/1.1\r\nhost: {}\r\nconnection: close\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{body}",
            broker.ingress,
            body.len(),
        );
        let (status, answer) = raw_exchange(broker.ingress, request.as_bytes()).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains("appears more than once"), "{answer}");
        let named = if content_type.contains("batch") {
            "\"type\""
        } else {
            "\"id\""
        };
        assert!(answer.contains(named), "{answer}");
    }
    // The batch arrives as its two events.
    let ids = |seen: &Mutex<Vec<Seen>>| {
        seen.lock()
            .unwrap()
            .iter()
            .filter_map(|s| {
                s.header("ce-id")
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .collect::<Vec<_>>()
    };
    let count = all.len() + 1;
    until("every event at the binary subscriber", || {
        ids(&binary_seen).len() >= count
    })
    .await;
    let binary = binary_seen.lock().unwrap().clone();
    let find = |id: &str| {
        binary
            .iter()
            .find(|s| s.header("ce-id") == Some(id.as_bytes()))
            .unwrap_or_else(|| panic!("{id} never arrived"))
    };
    for event in all.iter().filter(|e| e.id != "batch") {
        let got = find(event.id);
        assert_eq!(got.body, event.binary_body, "{}: data", event.id);
        for (name, value) in event.binary_headers {
            assert_eq!(got.header(name), Some(*value), "{}: {name}", event.id);
        }
        if event.binary_body.is_empty() {
            assert_eq!(
                got.header("content-type"),
                None,
                "{}: no data, no content type",
                event.id
            );
        }
        assert_eq!(got.header("ce-knativebrokerttl"), None, "{}", event.id);
    }
    assert_eq!(find("k-1").body, br#"{"x" :1,"x":2}"#);
    assert_eq!(find("k-2").body, [0x89, b'P', b'N', b'G']);
    assert_eq!(find("k-2").header("content-type"), Some(&b"image/png"[..]));
    // JSON `data` with no datacontenttype is application/json (the JSON event format).
    assert_eq!(
        find("k-1").header("content-type"),
        Some(&b"application/json"[..])
    );

    let bodies = || {
        json_seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| (s.header("content-type").map(<[u8]>::to_vec), s.body.clone()))
            .collect::<Vec<_>>()
    };
    until("every event at the structured subscriber", || {
        bodies().len() >= count
    })
    .await;
    let structured = bodies();
    let find = |id: &str| {
        let needle = format!(r#""id":"{id}""#);
        structured
            .iter()
            .find(|(_, body)| String::from_utf8_lossy(body).contains(&needle))
            .unwrap_or_else(|| panic!("{id} never arrived in structured mode"))
    };
    for event in all.iter().filter(|e| e.id != "batch") {
        let (content_type, body) = find(event.id);
        assert_eq!(
            content_type.as_deref(),
            Some(&b"application/cloudevents+json"[..])
        );
        let body = String::from_utf8(body.clone()).unwrap();
        assert!(
            body.contains(event.structured),
            "{}: {body} lacks {}",
            event.id,
            event.structured
        );
        serde_json::from_str::<serde_json::Value>(&body).expect("valid JSON");
    }
    assert!(String::from_utf8_lossy(&find("k-1").1).contains(r#""data":{"x" :1,"x":2}"#));
    assert!(String::from_utf8_lossy(&find("k-2").1).contains(r#""data_base64":"iVBORw==""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_byte_for_byte_through_an_embedded_log() {
    let dir = std::env::temp_dir().join(format!("mecha-as-sent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    events_arrive_as_sent(dir.join("events.redb").to_str().unwrap()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_byte_for_byte_through_jetstream() {
    let nats = block_in_place(NatsServer::start);
    events_arrive_as_sent(&nats.url()).await;
}

/// Broker `default/b` with one trigger to `to`.
fn one_trigger(to: SocketAddr) -> EventingState {
    load(&format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: b\n---\n\
         apiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: all\nspec:\n  broker: b\n  subscriber:\n    uri: http://{to}/\n"
    ))
}

/// A broker's `mecha_request_body_bytes_in_use`.
/// A fresh directory for a test's logs and a control plane with one broker and one trigger to
/// `subscriber`, serving while this lives; the directory goes with it.
struct OneTrigger {
    dir: std::path::PathBuf,
    token: AdminToken,
    control_addr: SocketAddr,
    _control: ControlPlane,
}

impl OneTrigger {
    async fn new(name: &str, subscriber: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = AdminToken::generate().unwrap();
        let (control_addr, control) = control_plane(&token, one_trigger(subscriber)).await;
        Self {
            dir,
            token,
            control_addr,
            _control: control,
        }
    }

    /// A broker with `env`, its log `{log}.redb` in the directory.
    fn broker(&self, log: &str, env: &[(&str, &str)]) -> Broker {
        let log = self.dir.join(format!("{log}.redb"));
        Broker::start_with(log.to_str().unwrap(), self.control_addr, &self.token, env)
    }
}

impl Drop for OneTrigger {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn bytes_in_use(client: &HttpClient, broker: &Broker) -> u64 {
    metric(client, broker, "mecha_request_body_bytes_in_use").await
}

/// Waits (up to 30 s) until the broker's bytes in use satisfy `check`; the last value.
async fn in_use_until(
    client: &HttpClient,
    broker: &Broker,
    what: &str,
    check: impl Fn(u64) -> bool,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = bytes_in_use(client, broker).await;
        if check(now) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}: {now} bytes in use");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The head of a binary-mode event of `length` bytes (`chunked` without a length).
fn event_head(id: &str, length: Option<usize>) -> String {
    let framing = length.map_or("transfer-encoding: chunked\r\n".to_string(), |n| {
        format!("content-length: {n}\r\n")
    });
    format!(
        "POST /default/b HTTP/1.1\r\nhost: broker\r\nce-specversion: 1.0\r\nce-id: {id}\r\nce-source: /budget\r\nce-type: t\r\ncontent-type: application/octet-stream\r\n{framing}\r\n"
    )
}

/// The hostile review's attack, from outside: 64 connections each send all but the last byte
/// of a 1 MiB event and hold it. With a budget that never binds (1 GiB) the broker's resident
/// memory grows by about what they sent; with 8 MiB it stays under the budget and a margin,
/// the rest are refused, a well-behaved client is answered (never left hanging), and once
/// the attackers close the budget is all back, a normal event is accepted and a large one
/// sent slowly in chunks arrives byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_hold_no_more_memory_than_the_budget() {
    use test_support::hostile::{PartialBody, resident};
    const ATTACKERS: usize = 64;
    const EVENT: usize = 1 << 20;
    const BUDGET: u64 = 8 << 20;
    // What besides the budget may grow: connection buffers and tasks, the allocator's slack.
    const MARGIN: u64 = 16 << 20;
    let (subscriber_addr, seen) = raw_subscriber().await;
    let setup = OneTrigger::new("mecha-budget", subscriber_addr).await;
    let (dir, token, control_addr) = (&setup.dir, &setup.token, setup.control_addr);
    let client = client();

    let mut growth = Vec::new();
    for (run, budget) in [("unbounded", 1u64 << 30), ("budgeted", BUDGET)] {
        let log = dir.join(format!("{run}.redb"));
        let broker = Broker::start_with(
            log.to_str().unwrap(),
            control_addr,
            token,
            &[("BROKER_BODY_BUDGET", &budget.to_string())],
        );
        ready(&client, &broker).await;
        for n in 0..5 {
            let id = format!("{run}-warm-{n}");
            assert_eq!(post(&client, broker.ingress, &id, "t").await, Some(202));
        }
        let pid = broker.child.id();
        let before = resident(pid);
        let attackers: Vec<PartialBody> = (0..ATTACKERS)
            .map(|n| {
                let head = event_head(&format!("{run}-attack-{n}"), Some(EVENT));
                PartialBody::start(broker.ingress, head, vec![b'a'; EVENT - 1], None)
            })
            .collect();
        block_in_place(|| {
            for attacker in &attackers {
                attacker.settled(Duration::from_secs(60));
            }
        });
        // Settled: every attacker the broker did not refuse has its body read (its buffer
        // at the event's full size, taken from the budget).
        let deadline = Instant::now() + Duration::from_secs(30);
        let holding = loop {
            let holding = attackers.iter().filter(|a| !a.refused()).count() as u64;
            let in_use = bytes_in_use(&client, &broker).await;
            if in_use == holding * EVENT as u64 {
                break holding;
            }
            assert!(
                Instant::now() < deadline,
                "{run}: {in_use} bytes in use for {holding} bodies held"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // What the process holds now that every attacker's body is read and held.
        let peak = resident(pid);
        let grown = peak.saturating_sub(before);
        eprintln!(
            "{run} (budget {budget}): {ATTACKERS} attackers, {holding} held, resident {} MiB before, {} MiB under attack (+{:.1} MiB)",
            before >> 20,
            peak >> 20,
            grown as f64 / f64::from(1 << 20)
        );
        growth.push(grown);
        // A well-behaved client is answered at once: 202 if room is left, else 503 with
        // Retry-After (checked by `post`), never a wait.
        let polite = post(&client, broker.ingress, &format!("{run}-polite"), "t").await;
        assert!(matches!(polite, Some(202 | 503)), "{run}: {polite:?}");
        if run == "budgeted" {
            assert!(
                holding * (EVENT as u64) <= BUDGET,
                "{holding} bodies held within the budget"
            );
            assert!(
                metric(&client, &broker, "mecha_request_body_budget_refused_total").await
                    >= (ATTACKERS as u64 - holding),
                "each attacker not held was refused for budget"
            );
        } else {
            assert_eq!(holding, ATTACKERS as u64, "a budget that never binds");
        }
        // The attackers go away mid-body: every byte comes back.
        drop(attackers);
        in_use_until(&client, &broker, run, |n| n == 0).await;
        let id = format!("{run}-after");
        assert_eq!(post(&client, broker.ingress, &id, "t").await, Some(202));

        if run == "budgeted" {
            // Within the budget a large event sent slowly, in chunks, arrives byte for byte.
            let data: Vec<u8> = (0..900 * 1024u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            let mut stream = tokio::net::TcpStream::connect(broker.ingress)
                .await
                .unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream
                .write_all(event_head("large-slow", None).as_bytes())
                .await
                .unwrap();
            for chunk in data.chunks(32 * 1024) {
                let size = format!("{:x}\r\n", chunk.len());
                let framed = [size.as_bytes(), chunk, b"\r\n".as_slice()].concat();
                stream.write_all(&framed).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stream.write_all(b"0\r\n\r\n").await.unwrap();
            let mut answer = [0u8; 12];
            stream.read_exact(&mut answer).await.unwrap();
            assert_eq!(
                &answer[9..12],
                b"202",
                "{}",
                String::from_utf8_lossy(&answer)
            );
            until("the large event at the subscriber", || {
                seen.lock()
                    .unwrap()
                    .iter()
                    .any(|s| s.header("ce-id") == Some(&b"large-slow"[..]))
            })
            .await;
            let got = seen
                .lock()
                .unwrap()
                .iter()
                .find(|s| s.header("ce-id") == Some(&b"large-slow"[..]))
                .unwrap()
                .body
                .clone();
            assert!(
                got == data,
                "the large event's data differs from what was sent"
            );
            in_use_until(&client, &broker, "after the large event", |n| n == 0).await;
        }
    }
    assert!(
        growth[0] > 48 << 20,
        "without a budget the attack holds memory (else this test measures nothing): +{} MiB",
        growth[0] >> 20
    );
    assert!(
        growth[1] < BUDGET + MARGIN,
        "with an 8 MiB budget: +{} MiB",
        growth[1] >> 20
    );
}

/// A body that trickles in (a byte every 200 ms, never pausing long enough for the 1 s pause
/// timeout) holds its budget only until the 3 s body timeout; a well-behaved client meanwhile
/// gets 503 with Retry-After and a message; a body whose sender stops gives it back at the
/// pause timeout, and a chunked body whose client goes away at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_body_holds_its_budget_until_the_body_timeout() {
    use test_support::hostile::PartialBody;
    let (subscriber_addr, _seen) = subscriber().await;
    let setup = OneTrigger::new("mecha-trickle", subscriber_addr).await;
    let client = client();
    let broker = setup.broker(
        "events",
        &[
            ("BROKER_MAX_EVENT_SIZE", "65536"),
            ("BROKER_BODY_BUDGET", "65536"),
            ("BROKER_BODY_TIMEOUT", "3s"),
            ("SIDECAR_BODY_READ_TIMEOUT", "1s"),
        ],
    );
    ready(&client, &broker).await;
    assert_eq!(post(&client, broker.ingress, "first", "t").await, Some(202));
    // A control character in a String attribute (here a percent-encoded line feed): 400,
    // naming the attribute, as CloudEvents excludes them from Strings.
    let bad = format!(
        "{}{{}}",
        event_head("bad", Some(2)).replace(
            "host: broker\r\n",
            "host: broker\r\nconnection: close\r\nce-subject: line%0Abreak\r\n"
        )
    );
    let (status, answer) = raw_exchange(broker.ingress, bad.as_bytes()).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer.contains("attribute subject contains U+000A"),
        "{answer}"
    );

    let started = Instant::now();
    let trickler = PartialBody::start(
        broker.ingress,
        event_head("trickle", Some(65536)),
        vec![b't'; 40_000],
        Some(Duration::from_millis(200)),
    );
    // 40,000 bytes of a 65,536-byte body: the buffer is the body's size, the whole budget.
    in_use_until(&client, &broker, "the trickler's bytes", |n| n == 65536).await;
    let polite = format!(
        "{}{{}}",
        event_head("polite", Some(2))
            .replace("host: broker\r\n", "host: broker\r\nconnection: close\r\n")
    );
    let (status, answer) = raw_exchange(broker.ingress, polite.as_bytes()).await;
    assert_eq!(status, 503, "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("holds at most 65536 bytes"), "{answer}");

    // The body timeout: 408, and the budget is back while the client still holds on.
    let said = block_in_place(|| trickler.answer(Duration::from_secs(20)));
    let took = started.elapsed();
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("did not arrive whole within 3s"), "{said}");
    assert!(took >= Duration::from_secs(3), "{took:?}");
    in_use_until(&client, &broker, "after the timeout", |n| n == 0).await;
    assert_eq!(
        post(&client, broker.ingress, "after-timeout", "t").await,
        Some(202)
    );
    assert_eq!(
        metric(&client, &broker, "mecha_request_body_timeouts_total").await,
        1
    );
    assert!(metric(&client, &broker, "mecha_request_body_budget_refused_total").await >= 1);
    drop(trickler);

    // A sender that stops: the pause timeout answers first (408, saying so rather than the
    // body timeout) and frees its budget.
    let stopper = PartialBody::start(
        broker.ingress,
        event_head("stopper", Some(65536)),
        vec![b's'; 40_000],
        None,
    );
    in_use_until(&client, &broker, "the stopper's bytes", |n| n == 65536).await;
    let said = block_in_place(|| stopper.answer(Duration::from_secs(20)));
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("paused longer than 1s"), "{said}");
    in_use_until(&client, &broker, "after the pause timeout", |n| n == 0).await;
    drop(stopper);

    // A chunked body (no length) whose client goes away mid-body.
    let chunk = [
        b"9c40\r\n".as_slice(),
        [b'c'; 40_000].as_slice(),
        b"\r\n".as_slice(),
    ]
    .concat();
    let leaver = PartialBody::start(broker.ingress, event_head("leaver", None), chunk, None);
    in_use_until(&client, &broker, "the chunked body's bytes", |n| {
        n >= 40_000
    })
    .await;
    leaver.close();
    in_use_until(&client, &broker, "after the client left", |n| n == 0).await;
    assert_eq!(
        post(&client, broker.ingress, "after-leaving", "t").await,
        Some(202)
    );
}

/// One response as it came off a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Raw {
    status: u16,
    /// Names lower-cased, in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// What both paths must agree on: everything but `date` (the time) and `connection`
    /// (hyper closes without saying so).
    fn comparable(&self) -> (u16, Vec<(String, String)>, String) {
        let headers = self
            .headers
            .iter()
            .filter(|(n, _)| n != "date" && n != "connection")
            .cloned()
            .collect();
        (
            self.status,
            headers,
            String::from_utf8_lossy(&self.body).into_owned(),
        )
    }
}

/// Reads one response (a `Content-Length` body, none for `HEAD`) off `stream`; `None` if
/// the connection ends first.
async fn read_raw(
    stream: &mut tokio::io::BufReader<tokio::net::TcpStream>,
    head_method: bool,
) -> Option<Raw> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut status = None;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(20), stream.read_line(&mut line))
            .await
            .expect("an answer within 20 s");
        if read.ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches("\r\n");
        if line.is_empty() {
            break;
        }
        match status {
            None => status = line.get(9..12).and_then(|s| s.parse().ok()),
            Some(_) => {
                let (name, value) = line.split_once(':').expect("a header field");
                headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
            }
        }
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; if head_method { 0 } else { length }];
    stream.read_exact(&mut body).await.ok()?;
    Some(Raw {
        status: status.expect("a status line"),
        headers,
        body,
    })
}

/// Whether the server closed `stream` (nothing more comes, within 20 s).
async fn closed(stream: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> bool {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await,
        Ok(Ok(0) | Err(_))
    )
}

async fn connect(addr: SocketAddr) -> tokio::io::BufReader<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    tokio::io::BufReader::new(stream)
}

/// A binary-mode event `id` with `data`, framed by `Content-Length`; `extra` header lines
/// (each ending in CRLF) go into the head.
fn event(id: &str, data: &[u8], extra: &str) -> Vec<u8> {
    let mut request = format!(
        "POST /default/b HTTP/1.1\r\nhost: broker\r\nce-specversion: 1.0\r\nce-id: {id}\r\nce-source: /fast\r\nce-type: t\r\nce-note: {id}%20n\r\ncontent-type: application/octet-stream\r\n{extra}content-length: {}\r\n\r\n",
        data.len()
    )
    .into_bytes();
    request.extend_from_slice(data);
    request
}

/// The broker ingress's own answers on the fast path, from a raw socket: kept-alive and
/// pipelined posts, a body in many pieces, an empty one, `Connection: close`; a declared
/// length over the maximum (413, closed), a client leaving mid-body, a body past the body
/// timeout and one paused past the pause timeout (408) give their budget back; chunked and `Expect: 100-continue` bodies still go through hyper; every accepted
/// event reaches a subscriber with its data and `ce-` headers as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_reads_whole_bodies_on_the_fast_path() {
    use test_support::hostile::PartialBody;
    use tokio::io::AsyncWriteExt;
    let (subscriber_addr, seen) = raw_subscriber().await;
    let setup = OneTrigger::new("mecha-fast-ingress", subscriber_addr).await;
    let client = client();
    let broker = setup.broker(
        "events",
        &[
            ("BROKER_MAX_EVENT_SIZE", "65536"),
            ("BROKER_BODY_TIMEOUT", "2s"),
            ("SIDECAR_BODY_READ_TIMEOUT", "1s"),
        ],
    );
    ready(&client, &broker).await;
    let data = |id: &str| -> Vec<u8> {
        let mut data = format!("{id}:").into_bytes();
        data.extend((0..300u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8));
        data
    };
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();

    // Three posts on one kept-alive connection.
    let mut stream = connect(broker.ingress).await;
    for n in 0..3 {
        let id = format!("kept-{n}");
        stream
            .get_mut()
            .write_all(&event(&id, &data(&id), ""))
            .await
            .unwrap();
        let answer = read_raw(&mut stream, false).await.expect("an answer");
        assert_eq!(answer.status, 202, "{answer:?}");
        assert_eq!(answer.header("content-length"), Some("0"), "{answer:?}");
        assert!(answer.header("date").is_some(), "{answer:?}");
        assert_eq!(answer.header("connection"), None, "{answer:?}");
        expected.push((id.clone(), data(&id)));
    }
    // Two pipelined in one write, on the same connection.
    let mut two = event("piped-0", &data("piped-0"), "");
    two.extend_from_slice(&event("piped-1", &data("piped-1"), ""));
    stream.get_mut().write_all(&two).await.unwrap();
    for id in ["piped-0", "piped-1"] {
        let answer = read_raw(&mut stream, false).await.expect("an answer");
        assert_eq!(answer.status, 202, "{id}: {answer:?}");
        expected.push((id.to_string(), data(id)));
    }
    // A body in pieces of 7 bytes, each its own write.
    let split = event("split", &data("split"), "");
    for piece in split.chunks(7) {
        stream.get_mut().write_all(piece).await.unwrap();
        stream.get_mut().flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let answer = read_raw(&mut stream, false).await.expect("an answer");
    assert_eq!(answer.status, 202, "{answer:?}");
    expected.push(("split".into(), data("split")));
    // No data: `Content-Length: 0`.
    stream
        .get_mut()
        .write_all(&event("empty", b"", ""))
        .await
        .unwrap();
    let answer = read_raw(&mut stream, false).await.expect("an answer");
    assert_eq!(answer.status, 202, "{answer:?}");
    expected.push(("empty".into(), Vec::new()));
    // A chunked body, then one behind `Expect: 100-continue`: hyper's, on the same connection.
    let chunked = data("chunked");
    let mut request = String::from_utf8(event("chunked", b"", ""))
        .unwrap()
        .replace("content-length: 0\r\n", "transfer-encoding: chunked\r\n")
        .into_bytes();
    request.extend_from_slice(format!("{:x}\r\n", chunked.len()).as_bytes());
    request.extend_from_slice(&chunked);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    stream.get_mut().write_all(&request).await.unwrap();
    let answer = read_raw(&mut stream, false).await.expect("an answer");
    assert_eq!(answer.status, 202, "chunked: {answer:?}");
    expected.push(("chunked".into(), chunked));
    let waiting = event("continued", &data("continued"), "expect: 100-continue\r\n");
    let body_at = waiting.len() - data("continued").len();
    stream
        .get_mut()
        .write_all(&waiting[..body_at])
        .await
        .unwrap();
    let interim = read_raw(&mut stream, false).await.expect("100 Continue");
    assert_eq!(interim.status, 100, "{interim:?}");
    stream
        .get_mut()
        .write_all(&waiting[body_at..])
        .await
        .unwrap();
    let answer = read_raw(&mut stream, false).await.expect("an answer");
    assert_eq!(answer.status, 202, "100-continue: {answer:?}");
    expected.push(("continued".into(), data("continued")));
    // The fast path again after hyper's turn; then `Connection: close` is honoured.
    stream
        .get_mut()
        .write_all(&event("last", &data("last"), "connection: close\r\n"))
        .await
        .unwrap();
    let answer = read_raw(&mut stream, false).await.expect("an answer");
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
    assert!(closed(&mut stream).await, "closed after Connection: close");
    expected.push(("last".into(), data("last")));

    // A declared length over the maximum: 413 before a byte is read, and the connection ends.
    let mut stream = connect(broker.ingress).await;
    let head = String::from_utf8(event("huge", b"", ""))
        .unwrap()
        .replace("content-length: 0", "content-length: 100000");
    // Head and a first part in one write: the part is read with the head, so closing after
    // the answer resets nothing the client has not read.
    let mut start = head.into_bytes();
    start.extend_from_slice(&[b'h'; 1000]);
    stream.get_mut().write_all(&start).await.unwrap();
    let answer = read_raw(&mut stream, false).await.expect("an answer");
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(
        String::from_utf8_lossy(&answer.body).contains("65536-byte limit"),
        "{answer:?}"
    );
    assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
    assert!(closed(&mut stream).await, "closed after 413");
    assert_eq!(bytes_in_use(&client, &broker).await, 0);

    // A client leaving mid-body gives its budget back.
    let leaver = PartialBody::start(
        broker.ingress,
        event_head("leaver", Some(60_000)),
        vec![b'l'; 30_000],
        None,
    );
    in_use_until(&client, &broker, "the leaver's bytes", |n| n >= 30_000).await;
    leaver.close();
    in_use_until(&client, &broker, "after the client left", |n| n == 0).await;

    // A body that trickles past the body timeout (2 s), and one that stops for longer than
    // the pause timeout (1 s): 408 each, saying which, and their budget back.
    let trickler = PartialBody::start(
        broker.ingress,
        event_head("trickler", Some(60_000)),
        vec![b't'; 20_000],
        Some(Duration::from_millis(200)),
    );
    let stopper = PartialBody::start(
        broker.ingress,
        event_head("stopper", Some(60_000)),
        vec![b's'; 20_000],
        None,
    );
    let said = block_in_place(|| stopper.answer(Duration::from_secs(20)));
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("paused longer than 1s"), "{said}");
    let said = block_in_place(|| trickler.answer(Duration::from_secs(20)));
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("did not arrive whole within 2s"), "{said}");
    in_use_until(&client, &broker, "after the 408s", |n| n == 0).await;
    drop((trickler, stopper));

    // Every accepted event arrived with its data and `ce-` headers as sent.
    until("every event at the subscriber", || {
        seen.lock().unwrap().len() >= expected.len()
    })
    .await;
    let got = seen.lock().unwrap().clone();
    for (id, data) in &expected {
        let event = got
            .iter()
            .find(|s| s.header("ce-id") == Some(id.as_bytes()))
            .unwrap_or_else(|| panic!("{id} never arrived"));
        assert!(&event.body == data, "{id}: the data differs");
        assert_eq!(event.header("ce-source"), Some(&b"/fast"[..]), "{id}");
        assert_eq!(event.header("ce-type"), Some(&b"t"[..]), "{id}");
        let note = format!("{id}%20n");
        assert_eq!(event.header("ce-note"), Some(note.as_bytes()), "{id}");
    }
    assert!(
        !got.iter().any(|s| s.header("ce-id") == Some(&b"huge"[..])
            || s.header("ce-id") == Some(&b"leaver"[..])
            || s.header("ce-id") == Some(&b"trickler"[..])),
        "a refused event was delivered"
    );
}

/// A client pausing in the middle of its body counts as idle for the connection limit, on the
/// fast path as on hyper's: with room for two connections, both taken by bodies paused half
/// way, a new client is served (202) by closing one of them, whose budget comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_body_makes_room_at_the_connection_limit() {
    use test_support::hostile::PartialBody;
    let (subscriber_addr, _seen) = subscriber().await;
    let setup = OneTrigger::new("mecha-paused-room", subscriber_addr).await;
    let client = client();
    let broker = setup.broker(
        "events",
        &[
            ("BROKER_MAX_EVENT_SIZE", "65536"),
            ("SIDECAR_MAX_CONNECTIONS", "2"),
        ],
    );
    ready(&client, &broker).await;
    let pausers: Vec<PartialBody> = (0..2)
        .map(|n| {
            PartialBody::start(
                broker.ingress,
                event_head(&format!("paused-{n}"), Some(60_000)),
                vec![b'p'; 30_000],
                None,
            )
        })
        .collect();
    // Both bodies half read: each holds at least what arrived.
    in_use_until(&client, &broker, "the paused bodies", |n| n >= 60_000).await;
    let post = event("newcomer", b"{}", "connection: close\r\n");
    let (status, answer) = raw_exchange(broker.ingress, &post).await;
    assert_eq!(status, 202, "{answer}");
    // One of the paused clients made room, and its budget is back.
    until("a paused client closed", || {
        pausers.iter().filter(|p| p.refused()).count() == 1
    })
    .await;
    in_use_until(&client, &broker, "one body left", |n| n > 0 && n < 60_000).await;
    drop(pausers);
    in_use_until(&client, &broker, "every body gone", |n| n == 0).await;
}

/// SIGTERM while a body is arriving on the fast path: the request is finished (202, its event
/// delivered) and its answer closes the connection; then the broker exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_arriving_at_sigterm_is_finished_and_its_connection_closed() {
    use tokio::io::AsyncWriteExt;
    let (subscriber_addr, seen) = raw_subscriber().await;
    let setup = OneTrigger::new("mecha-fast-drain", subscriber_addr).await;
    let (dir, token, control_addr) = (&setup.dir, &setup.token, setup.control_addr);
    let client = client();
    let log = dir.join("events.redb");
    let mut broker = Broker::start(log.to_str().unwrap(), control_addr, token);
    ready(&client, &broker).await;
    let data = vec![b'd'; 20_000];
    let request = event("draining", &data, "");
    let half = request.len() - 10_000;
    let mut stream = connect(broker.ingress).await;
    stream.get_mut().write_all(&request[..half]).await.unwrap();
    in_use_until(&client, &broker, "the body arriving", |n| n > 0).await;
    broker.signal(rustix::process::Signal::TERM);
    // Not ready any more: the drain has begun while the body is still arriving.
    until_not_ready(&client, &broker).await;
    stream.get_mut().write_all(&request[half..]).await.unwrap();
    let answer = read_raw(&mut stream, false).await.expect("an answer");
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
    assert!(closed(&mut stream).await, "closed after the answer");
    until("the event at the subscriber", || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|s| s.header("ce-id") == Some(&b"draining"[..]) && s.body == data)
    })
    .await;
    assert!(broker.exited(Duration::from_secs(30)).await.success());
}

/// Waits until the broker's `/ready` stops answering 200.
async fn until_not_ready(client: &HttpClient, broker: &Broker) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(get(client, broker.admin, "/ready").await, Some((200, _))) {
        assert!(Instant::now() < deadline, "still ready after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The same requests answered by the fast path and by hyper (`SIDECAR_FAST_PATH=false`):
/// the same status, headers and body, valid or not, whichever the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_path_and_hyper_answer_the_ingress_alike() {
    let (subscriber_addr, _seen) = subscriber().await;
    let setup = OneTrigger::new("mecha-ingress-diff", subscriber_addr).await;
    let (dir, token, control_addr) = (&setup.dir, &setup.token, setup.control_addr);
    let client = client();
    let start = |name: &str, fast: &str| {
        let log = dir.join(format!("{name}.redb"));
        Broker::start_with(
            log.to_str().unwrap(),
            control_addr,
            token,
            &[
                ("SIDECAR_FAST_PATH", fast),
                ("BROKER_MAX_EVENT_SIZE", "65536"),
            ],
        )
    };
    let (fast, general) = (start("fast", "true"), start("general", "false"));
    ready(&client, &fast).await;
    ready(&client, &general).await;
    let structured = r#"{"specversion":"1.0","id":"s","source":"/diff","type":"t","data":{"a":1}}"#;
    let requests: Vec<(&str, Vec<u8>)> = vec![
        ("binary event", event("valid", b"{\"a\":1}", "")),
        ("no data", event("nodata", b"", "")),
        (
            "structured event",
            format!("POST /default/b HTTP/1.1\r\nhost: broker\r\ncontent-type: application/cloudevents+json\r\ncontent-length: {}\r\n\r\n{structured}", structured.len()).into_bytes(),
        ),
        (
            "missing ce-id",
            b"POST /default/b HTTP/1.1\r\nhost: broker\r\nce-specversion: 1.0\r\nce-source: /diff\r\nce-type: t\r\ncontent-length: 2\r\n\r\n{}".to_vec(),
        ),
        (
            "control character",
            event("ctl", b"x", "ce-subject: a%0Ab\r\n"),
        ),
        (
            "unsupported format",
            b"POST /default/b HTTP/1.1\r\nhost: broker\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nhi".to_vec(),
        ),
        (
            "bad batch",
            b"POST /default/b HTTP/1.1\r\nhost: broker\r\ncontent-type: application/cloudevents-batch+json\r\ncontent-length: 5\r\n\r\n[{}, ".to_vec(),
        ),
        (
            "unknown broker",
            String::from_utf8(event("u", b"x", ""))
                .unwrap()
                .replace("/default/b", "/default/nobody")
                .into_bytes(),
        ),
        (
            "wrong method",
            b"PUT /default/b HTTP/1.1\r\nhost: broker\r\ncontent-length: 2\r\n\r\n{}".to_vec(),
        ),
        ("GET", b"GET /default/b HTTP/1.1\r\nhost: broker\r\n\r\n".to_vec()),
        ("HEAD", b"HEAD /default/b HTTP/1.1\r\nhost: broker\r\n\r\n".to_vec()),
        (
            "OPTIONS",
            b"OPTIONS /default/b HTTP/1.1\r\nhost: broker\r\nwebhook-request-origin: example.com\r\n\r\n".to_vec(),
        ),
        ("root", b"GET / HTTP/1.1\r\nhost: broker\r\n\r\n".to_vec()),
        (
            "bad path",
            b"POST /a/b/c HTTP/1.1\r\nhost: broker\r\ncontent-length: 0\r\n\r\n".to_vec(),
        ),
        (
            "absolute target",
            String::from_utf8(event("abs", b"x", ""))
                .unwrap()
                .replace("POST /default/b", "POST http://broker/default/b")
                .into_bytes(),
        ),
        (
            "too large",
            String::from_utf8(event("big", b"", ""))
                .unwrap()
                .replace("content-length: 0", "content-length: 70000")
                .into_bytes(),
        ),
    ];
    for (what, request) in &requests {
        let head_method = request.starts_with(b"HEAD ");
        let mut answers = Vec::new();
        for broker in [&fast, &general] {
            let mut stream = connect(broker.ingress).await;
            use tokio::io::AsyncWriteExt;
            stream.get_mut().write_all(request).await.unwrap();
            let answer = read_raw(&mut stream, head_method)
                .await
                .unwrap_or_else(|| panic!("{what}: no answer"));
            answers.push(answer);
        }
        assert_eq!(
            answers[0].comparable(),
            answers[1].comparable(),
            "{what}: the fast path (left) and hyper (right) differ"
        );
        assert!(
            answers[0].header("date").is_some(),
            "{what}: {:?}",
            answers[0]
        );
    }
    // And the refusals were counted alike.
    for name in [
        "mecha_broker_events_rejected_total",
        "mecha_broker_events_received_total",
    ] {
        assert_eq!(
            metric(&client, &fast, name).await,
            metric(&client, &general, name).await,
            "{name}"
        );
    }
}

/// `--help` lists every setting; a missing or bad one stops the binary with status 2 and a
/// message naming it, before anything listens.
#[test]
fn help_lists_the_settings_and_a_bad_one_is_named() {
    let binary = env!("CARGO_BIN_EXE_eventing-broker");
    let help = Command::new(binary).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for setting in [
        "BROKER_PORT",
        "BROKER_ADMIN_PORT",
        "BROKER_EVENT_LOG",
        "AUTOSCALER_ADDR",
        "AUTOSCALER_TOKEN_FILE",
        "BROKER_GATEWAY_ADDR",
        "DRAIN_TIMEOUT",
        "BROKER_BODY_BUDGET",
        "BROKER_BODY_TIMEOUT",
    ] {
        assert!(text.contains(setting), "--help names {setting}:\n{text}");
    }
    let run = |env: &[(&str, &str)], args: &[&str]| {
        Command::new(binary)
            .env_clear()
            .envs(env.iter().copied())
            .args(args)
            .output()
            .unwrap()
    };
    let missing = run(&[("AUTOSCALER_ADDR", "127.0.0.1:1")], &[]);
    assert_eq!(missing.status.code(), Some(2));
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(
        said.contains("BROKER_EVENT_LOG") && said.contains("required"),
        "{said}"
    );
    let bad = run(
        &[("AUTOSCALER_ADDR", "127.0.0.1:1")],
        &["--event-log", "nats://127.0.0.1:1?replicas=9"],
    );
    assert_eq!(bad.status.code(), Some(2));
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(
        said.contains("BROKER_EVENT_LOG") && said.contains("replicas"),
        "{said}"
    );
    // A budget smaller than the largest event could never take one.
    let small = run(
        &[
            ("AUTOSCALER_ADDR", "127.0.0.1:1"),
            ("BROKER_EVENT_LOG", "/nonexistent/events.redb"),
            ("BROKER_BODY_BUDGET", "65536"),
        ],
        &[],
    );
    assert_eq!(small.status.code(), Some(2));
    let said = String::from_utf8_lossy(&small.stderr);
    assert!(
        said.contains("BROKER_BODY_BUDGET") && said.contains("at least 1048576"),
        "{said}"
    );
    // The event size limit is bounded both ways, and the help says the bounds.
    assert!(text.contains("65536 to 16777216"), "{text}");
    for absurd in ["16777217", "18446744073709551615", "1000"] {
        let bad = run(
            &[
                ("AUTOSCALER_ADDR", "127.0.0.1:1"),
                ("BROKER_EVENT_LOG", "/nonexistent/events.redb"),
                ("BROKER_MAX_EVENT_SIZE", absurd),
            ],
            &[],
        );
        assert_eq!(bad.status.code(), Some(2), "{absurd}");
        let said = String::from_utf8_lossy(&bad.stderr);
        assert!(said.contains("BROKER_MAX_EVENT_SIZE"), "{absurd}: {said}");
    }
}
