//! The `importers` binary from outside: a real process against a real control plane (the
//! autoscaler's router behind `mecha_common::auth::guard`, as `mecha up` serves it) streaming
//! sources with their resolved sinks, and a real receiver.
#![cfg(feature = "standalone")]
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crds::sources::{PlacedSource, SinkAddress, SourcesSnapshot};
use hmac::{KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mecha_common::auth::{AdminToken, Credential, Refusals};
use mecha_common::{Activation, EndpointTable, RoutingTable, Shutdown};
use test_support::subscriber::Subscriber;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const SECRET: &str = "a webhook secret of the test";

/// The control plane: the autoscaler's API with sources the test sets, guarded by a
/// credential as `mecha up` guards it; stopped (its streams ended) by `stop`.
struct ControlPlane {
    sources: watch::Sender<Arc<SourcesSnapshot>>,
    shutdown: Shutdown,
    served: tokio::task::JoinHandle<()>,
}

impl ControlPlane {
    async fn start(listener: tokio::net::TcpListener, token: AdminToken) -> Self {
        let shutdown = Shutdown::new();
        let (sources, sources_rx) = watch::channel(Arc::new(SourcesSnapshot::default()));
        let (routes_tx, routes) = watch::channel(Arc::<RoutingTable>::default());
        let (endpoints_tx, endpoints) = watch::channel(Arc::<EndpointTable>::default());
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
            .with_sources(sources_rx),
        );
        let registry = prometheus::Registry::new();
        let app = mecha_common::auth::guard(
            axum::Router::new(),
            api,
            Credential::new(token, "the test's token"),
            Refusals::register(&registry),
        );
        let signal = shutdown.signal();
        let served = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(signal.recv())
                .await
                .unwrap();
            drop((routes_tx, endpoints_tx));
        });
        Self {
            sources,
            shutdown,
            served,
        }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        self.served.await.unwrap();
    }
}

/// One `importers` process; SIGKILLed on drop if still running.
struct Importers {
    child: Child,
    webhooks: SocketAddr,
    admin: SocketAddr,
}

impl Importers {
    fn start(control: SocketAddr, token: &AdminToken) -> Self {
        Self::start_with(control, token, &[])
    }

    fn start_with(control: SocketAddr, token: &AdminToken, settings: &[(&str, &str)]) -> Self {
        let [webhooks, admin] = test_support::free_ports::<2>();
        let child = Command::new(env!("CARGO_BIN_EXE_importers"))
            .env_clear()
            .envs(settings.iter().copied())
            .env("IMPORTERS_PORT", webhooks.to_string())
            .env("IMPORTERS_ADMIN_PORT", admin.to_string())
            .env("AUTOSCALER_ADDR", control.to_string())
            .env("AUTOSCALER_TOKEN", token.as_str())
            .env("HOOK_SECRET", SECRET)
            .env("DRAIN_TIMEOUT", "5s")
            .env("MECHA_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            webhooks: SocketAddr::from(([127, 0, 0, 1], webhooks)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        }
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
                "the importers did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Importers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A request; the status and body, or `None` when nothing answers.
async fn request(
    client: &HttpClient,
    request: http::Request<Full<Bytes>>,
) -> Option<(u16, String)> {
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .ok()?
        .ok()?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let get = http::Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    request(client, get).await
}

/// Polls `check` every 50 ms until it holds or `within` passes.
async fn until(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sources of `yaml`, each sent to `sink`.
fn snapshot(yaml: &str, sink: &str) -> SourcesSnapshot {
    let (loaded, errors) = crds::load_str(
        std::path::Path::new("/tmp/importers.yaml"),
        yaml,
        crds::Mode::Local,
    );
    assert!(errors.is_empty(), "{errors:?}");
    SourcesSnapshot {
        sources: loaded
            .into_iter()
            .map(|loaded| match loaded.resource {
                crds::Resource::Source(resource) => PlacedSource {
                    resource,
                    sink: Some(SinkAddress {
                        url: sink.to_string(),
                        uri: sink.to_string(),
                        host: None,
                    }),
                    problem: None,
                },
                other => panic!("not a source: {other:?}"),
            })
            .collect(),
    }
}

const SOURCES: &str = r#"
apiVersion: sources.knative.dev/v1
kind: PingSource
metadata: {name: tick, namespace: team}
spec:
  schedule: "* * * * * *"
  contentType: application/json
  data: '{"n": 1}'
  ceOverrides: {extensions: {origin: standalone}}
  sink: {uri: "http://placeholder.invalid/"}
---
apiVersion: sources.knative.dev/v1alpha1
kind: GitHubSource
metadata:
  name: repo
  namespace: team
  annotations: {mecha.dev/secret-token-env: HOOK_SECRET}
spec:
  ownerAndRepository: octo/hello
  eventTypes: [push]
  sink: {uri: "http://placeholder.invalid/"}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_from_the_control_plane_send_to_their_sinks_and_webhooks_answer() {
    let receiver = Subscriber::ok();
    let token = AdminToken::generate().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_addr = listener.local_addr().unwrap();
    let control = ControlPlane::start(listener, token.clone()).await;
    let mut importers = Importers::start(control_addr, &token);
    let http = client();

    // Nothing to run yet: ready only once the first state arrived.
    until(
        "the importers to be ready",
        Duration::from_secs(20),
        async || {
            get(&http, importers.admin, "/ready")
                .await
                .is_some_and(|(status, _)| status == 200)
        },
    )
    .await;
    assert_eq!(get(&http, importers.admin, "/live").await.unwrap().0, 200);

    // A PingSource streamed with its resolved sink fires every second into the receiver.
    control
        .sources
        .send_replace(Arc::new(snapshot(SOURCES, &receiver.url("/events"))));
    until("a ping event", Duration::from_secs(10), async || {
        receiver.count("/events") > 0
    })
    .await;
    let ping = receiver.all().into_iter().next().unwrap();
    assert_eq!(ping.headers["ce-type"], "dev.knative.sources.ping");
    assert_eq!(
        ping.headers["ce-source"],
        "/apis/v1/namespaces/team/pingsources/tick"
    );
    assert_eq!(ping.headers["ce-origin"], "standalone");
    assert_eq!(ping.headers["content-type"], "application/json");
    assert_eq!(ping.body, r#"{"n": 1}"#);

    // The GitHub receiver answers on the importers' own port: signed → 202 and an event.
    let body = r#"{"ref":"refs/heads/main"}"#;
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let signature: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let hook = |signature: &str| {
        http::Request::post(format!(
            "http://{}/webhooks/github/team/repo",
            importers.webhooks
        ))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", "delivery-1")
        .header("x-hub-signature-256", format!("sha256={signature}"))
        .body(Full::new(Bytes::from(body)))
        .unwrap()
    };
    let (status, answer) = request(&http, hook(&signature)).await.unwrap();
    assert_eq!(status, 202, "{answer}");
    let push = receiver
        .all()
        .into_iter()
        .find(|r| r.headers.get("ce-id").map(String::as_str) == Some("delivery-1"))
        .expect("the push event reached the sink");
    assert_eq!(push.headers["ce-type"], "dev.knative.source.github.push");
    assert_eq!(push.headers["ce-source"], "https://github.com/octo/hello");
    assert_eq!(push.body, body);
    let (status, _) = request(&http, hook(&"0".repeat(64))).await.unwrap();
    assert_eq!(status, 401, "a wrong signature");
    let (status, _) = get(&http, importers.webhooks, "/webhooks/github/team/other")
        .await
        .unwrap();
    assert_eq!(status, 404, "no such source");
    let metrics = get(&http, importers.admin, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains(
            r#"mecha_source_events_sent_total{kind="PingSource",name="tick",namespace="team"}"#
        ),
        "{metrics}"
    );

    // The control plane away: not ready, saying why, while the PingSource keeps firing.
    control.stop().await;
    until(
        "the importers to be unready",
        Duration::from_secs(20),
        async || {
            get(&http, importers.admin, "/ready")
                .await
                .is_some_and(|(status, body)| status == 503 && body.contains("lost"))
        },
    )
    .await;
    let before = receiver.count("/events");
    until(
        "ping events without the control plane",
        Duration::from_secs(10),
        async || receiver.count("/events") > before + 1,
    )
    .await;

    // SIGTERM: drained and exited cleanly.
    let pid = rustix::process::Pid::from_child(&importers.child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert!(importers.exited(Duration::from_secs(15)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_keeps_the_importers_unready_and_says_so() {
    let token = AdminToken::generate().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_addr = listener.local_addr().unwrap();
    let _control = ControlPlane::start(listener, token).await;
    let other = AdminToken::generate().unwrap();
    let importers = Importers::start(control_addr, &other);
    let http = client();
    until("/ready to say why", Duration::from_secs(20), async || {
        get(&http, importers.admin, "/ready")
            .await
            .is_some_and(|(status, body)| {
                status == 503 && body.contains("no sources from the control plane")
            })
    })
    .await;
    let (status, _) = get(&http, importers.webhooks, "/webhooks/github/team/repo")
        .await
        .unwrap();
    assert_eq!(status, 503, "webhooks wait for the first state");
}

/// The GitHubSource `team/repo` alone.
const GITHUB: &str = r#"
apiVersion: sources.knative.dev/v1alpha1
kind: GitHubSource
metadata:
  name: repo
  namespace: team
  annotations: {mecha.dev/secret-token-env: HOOK_SECRET}
spec:
  ownerAndRepository: octo/hello
  eventTypes: [push]
  sink: {uri: "http://placeholder.invalid/"}
"#;

/// `sha256=` and the HMAC of `body` with the test's secret.
fn signature(body: &[u8]) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// A push delivery's head (`signatures` as given; `length` or chunked).
fn push_head(delivery: &str, signatures: &[&str], length: Option<usize>) -> String {
    let mut head = format!(
        "POST /webhooks/github/team/repo HTTP/1.1\r\nhost: hooks\r\nconnection: close\r\ncontent-type: application/json\r\nx-github-event: push\r\nx-github-delivery: {delivery}\r\n"
    );
    for signature in signatures {
        head.push_str(&format!("x-hub-signature-256: {signature}\r\n"));
    }
    match length {
        Some(n) => head.push_str(&format!("content-length: {n}\r\n\r\n")),
        None => head.push_str("transfer-encoding: chunked\r\n\r\n"),
    }
    head
}

/// The sum of a metric's series on `/metrics`.
async fn metric(http: &HttpClient, admin: SocketAddr, name: &str) -> u64 {
    let (_, text) = get(http, admin, "/metrics").await.unwrap();
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Sends `request` on a connection of its own; the answer's status and text (status 0:
/// nothing listens yet, or no answer).
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    if stream.write_all(request).await.is_err() {
        return (0, String::new());
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// Webhook bodies are read whole before their signature can be checked, so anyone can make
/// the receivers hold them. 32 unauthenticated connections each sending 3 MiB of a 4 MiB body
/// leave the process's resident memory within the port's budget (4 MiB here) and a margin
/// (unbounded it would be 96 MiB); the others are refused with 503; a signed delivery is
/// answered meanwhile; once they close, the budget is back and a large signed delivery sent
/// slowly in chunks reaches the sink byte for byte. Two signatures are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_webhook_bodies_hold_no_more_than_the_budget() {
    use test_support::hostile::{PartialBody, resident};
    const ATTACKERS: usize = 32;
    const BODY: usize = 4 << 20;
    const BUDGET: u64 = 4 << 20;
    const MARGIN: u64 = 16 << 20;
    let receiver = Subscriber::ok();
    let token = AdminToken::generate().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_addr = listener.local_addr().unwrap();
    let control = ControlPlane::start(listener, token.clone()).await;
    let importers = Importers::start_with(
        control_addr,
        &token,
        &[("IMPORTERS_BODY_BUDGET", &BUDGET.to_string())],
    );
    let http = client();
    control
        .sources
        .send_replace(Arc::new(snapshot(GITHUB, &receiver.url("/events"))));
    let small = br#"{"ref":"refs/heads/main"}"#;
    let signed_small = |delivery: &str| {
        let mut request = push_head(delivery, &[&signature(small)], Some(small.len())).into_bytes();
        request.extend_from_slice(small);
        request
    };
    until(
        "the receiver to take deliveries",
        Duration::from_secs(20),
        async || raw(importers.webhooks, &signed_small("warm")).await.0 == 202,
    )
    .await;
    let pid = importers.child.id();
    let before = resident(pid);

    let attackers: Vec<PartialBody> = (0..ATTACKERS)
        .map(|n| {
            let head = push_head(&format!("attack-{n}"), &["sha256=00"], Some(BODY));
            PartialBody::start(importers.webhooks, head, vec![b' '; 3 << 20], None)
        })
        .collect();
    tokio::task::block_in_place(|| {
        for attacker in &attackers {
            attacker.settled(Duration::from_secs(60));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let holding = loop {
        let holding = attackers.iter().filter(|a| !a.refused()).count() as u64;
        let in_use = metric(&http, importers.admin, "mecha_request_body_bytes_in_use").await;
        if in_use == holding * BODY as u64 {
            break holding;
        }
        assert!(
            Instant::now() < deadline,
            "{in_use} bytes in use for {holding} bodies held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // What the process holds now that every attacker's body is read and held.
    let peak = resident(pid);
    let grown = peak.saturating_sub(before);
    eprintln!(
        "webhooks (budget {BUDGET}): {ATTACKERS} attackers, {holding} held, resident {} MiB before, {} MiB under attack (+{:.1} MiB)",
        before >> 20,
        peak >> 20,
        grown as f64 / f64::from(1 << 20)
    );
    assert!(holding * BODY as u64 <= BUDGET);
    assert!(grown < BUDGET + MARGIN, "+{} MiB", grown >> 20);
    assert!(
        metric(
            &http,
            importers.admin,
            "mecha_request_body_budget_refused_total"
        )
        .await
            >= ATTACKERS as u64 - holding
    );
    // A signed delivery is answered meanwhile: 503 with Retry-After when the budget is
    // taken (as it is: one 4 MiB buffer), never left waiting.
    let (status, answer) = raw(importers.webhooks, &signed_small("polite")).await;
    assert!(status == 202 || status == 503, "{answer}");
    if status == 503 {
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
    }

    drop(attackers);
    until("the budget back", Duration::from_secs(30), async || {
        metric(&http, importers.admin, "mecha_request_body_bytes_in_use").await == 0
    })
    .await;
    assert_eq!(raw(importers.webhooks, &signed_small("after")).await.0, 202);

    // A large signed delivery, sent slowly in chunks, reaches the sink as it was sent.
    let large: String = format!(
        r#"{{"ref":"refs/heads/main","commits":[{}]}}"#,
        (0..20_000)
            .map(|i| format!(r#"{{"id":"{i:040x}","n":{i}}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert!(large.len() > 1 << 20 && large.len() < BODY);
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(importers.webhooks)
            .await
            .unwrap();
        let head = push_head("large", &[&signature(large.as_bytes())], None);
        stream.write_all(head.as_bytes()).await.unwrap();
        for chunk in large.as_bytes().chunks(64 * 1024) {
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
    }
    let delivered = receiver
        .all()
        .into_iter()
        .find(|r| r.headers.get("ce-id").map(String::as_str) == Some("large"))
        .expect("the large delivery reached the sink");
    assert!(delivered.body == large, "the large delivery's body differs");

    // Two signatures, one of them right: which would count? Neither.
    let mut twice = push_head(
        "twice",
        &[
            &signature(small),
            "sha256=0000000000000000000000000000000000000000000000000000000000000000",
        ],
        Some(small.len()),
    )
    .into_bytes();
    twice.extend_from_slice(small);
    let (status, answer) = raw(importers.webhooks, &twice).await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer.contains("more than once"), "{answer}");
}
