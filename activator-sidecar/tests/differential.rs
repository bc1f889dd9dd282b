//! The corpus of requests in `tests/corpus/` — valid ones in every framing, pipelined ones,
//! malformed ones and the classic smuggling variants — sent byte for byte through the inbound
//! role twice: on the fast path, and with every request handed to hyper
//! (`SIDECAR_FAST_PATH=false`). Behind both sits the same recording upstream (hyper, a
//! parser of its own).
//!
//! For every case both paths must forward the same requests (method, target, headers after the
//! hop rules, body bytes) and answer the client with the same statuses; every request the
//! upstream saw must come back to the client as exactly one response (nothing smuggled, nothing
//! left on a pooled connection), and an innocent request after each case gets its own answer.
//!
//! The case file format is described in `support/corpus.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use activator_sidecar::inbound::{Inbound, InboundConfig};
use activator_sidecar::server::{ServeOptions, Workers, serve};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mecha_common::Shutdown;
use mecha_common::admin::Health;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support;

use support::corpus::corpus;

/// A request as the upstream parsed it: method, target, headers (lowercase names, grouped by
/// name in their order; values with non-printable bytes escaped, so equal means byte-equal),
/// body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Vec<Seen>>,
}

/// One client exchange: the statuses of the responses, in order, and the upstream sequence
/// numbers those responses carried.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    statuses: Vec<u16>,
    upstream: Vec<usize>,
    seen: Vec<Seen>,
}

// === the recording upstream ===

async fn upstream(recorder: Arc<Recorder>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let recorder = recorder.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let recorder = recorder.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let Ok(body) = body.collect().await else {
                            // An incomplete request is not a request.
                            return Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(400)
                                    .body(Full::new(Bytes::new()))
                                    .expect("response"),
                            );
                        };
                        let mut headers: Vec<(String, String)> = parts
                            .headers
                            .iter()
                            .map(|(n, v)| {
                                (
                                    n.as_str().to_string(),
                                    v.as_bytes().escape_ascii().to_string(),
                                )
                            })
                            .collect();
                        headers.sort_by(|a, b| a.0.cmp(&b.0));
                        let seq = {
                            let mut seen = recorder.seen.lock().expect("lock");
                            seen.push(Seen {
                                method: parts.method.to_string(),
                                target: parts.uri.to_string(),
                                headers,
                                body: body.to_bytes().to_vec(),
                            });
                            seen.len()
                        };
                        Ok(hyper::Response::builder()
                            .header("x-upstream-seq", seq.to_string())
                            .header("content-length", "0")
                            .body(Full::new(Bytes::new()))
                            .expect("response"))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

// === the sidecar, in process ===

async fn sidecar(upstream: SocketAddr, fast_path: bool, shutdown: &Shutdown) -> SocketAddr {
    let port = upstream.port().to_string();
    let config = InboundConfig::from_env(|key| match key {
        "USER_PORT" => Some(port.clone()),
        "REVISION_TIMEOUT_SECONDS" => Some("10".into()),
        "SERVING_SERVICE" => Some("echo".into()),
        _ => None,
    })
    .expect("settings");
    let health = Health::default();
    // Ready, as it is once its container is: network probes get their 200.
    health.set_ready(true);
    let inbound = Inbound::new(config, health, &prometheus::Registry::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(
        listener,
        Arc::new(inbound),
        Workers::current(),
        shutdown.signal(),
        ServeOptions {
            fast_path,
            drain_timeout: Duration::from_secs(1),
            limits: activator_sidecar::limits::Limits::default(),
        },
    ));
    addr
}

// === the client ===

/// Sends `bytes`, closes the sending side, and reads every response until the sidecar closes.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> (Vec<u16>, Vec<usize>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The sidecar may answer and close before everything is written: that is an answer too.
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = [0u8; 16384];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the sidecar never closed the connection");
    responses(&received)
}

/// The statuses and upstream sequence numbers of the responses in `bytes`.
fn responses(mut bytes: &[u8]) -> (Vec<u16>, Vec<usize>) {
    let (mut statuses, mut upstream) = (Vec::new(), Vec::new());
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(len)) = response.parse(bytes) else {
            panic!("not a response: {:?}", String::from_utf8_lossy(bytes));
        };
        let status = response.code.expect("status");
        statuses.push(status);
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_string())
        };
        if let Some(seq) = header("x-upstream-seq") {
            upstream.push(seq.parse().expect("a number"));
        }
        let body = if (100..200).contains(&status) {
            0
        } else {
            header("content-length").map_or(bytes.len() - len, |n| n.parse().expect("length"))
        };
        bytes = &bytes[(len + body).min(bytes.len())..];
    }
    (statuses, upstream)
}

async fn run(addr: SocketAddr, recorder: &Recorder, bytes: &[u8]) -> Outcome {
    recorder.seen.lock().expect("lock").clear();
    let (statuses, upstream) = exchange(addr, bytes).await;
    let seen = std::mem::take(&mut *recorder.seen.lock().expect("lock"));
    Outcome {
        statuses,
        upstream,
        seen,
    }
}

#[tokio::test]
async fn both_paths_forward_and_refuse_the_corpus_alike() {
    let cases = corpus();
    assert!(cases.len() >= 150, "the corpus has {} cases", cases.len());
    let recorder = Arc::new(Recorder::default());
    let up = upstream(recorder.clone()).await;
    let shutdown = Shutdown::new();
    let fast = sidecar(up, true, &shutdown).await;
    let hyper_only = sidecar(up, false, &shutdown).await;
    let mut failures = Vec::new();
    for case in &cases {
        let on_fast = run(fast, &recorder, &case.bytes).await;
        let on_hyper = run(hyper_only, &recorder, &case.bytes).await;
        let mut problems = Vec::new();
        if on_fast.statuses != on_hyper.statuses {
            problems.push(format!(
                "statuses differ: fast {:?}, hyper {:?}",
                on_fast.statuses, on_hyper.statuses
            ));
        }
        if on_fast.seen != on_hyper.seen {
            problems.push(format!(
                "the upstream saw different requests:\n  fast  {:?}\n  hyper {:?}",
                on_fast.seen, on_hyper.seen
            ));
        }
        for (path, outcome) in [("fast", &on_fast), ("hyper", &on_hyper)] {
            // Every request the upstream parsed came back as exactly one response, in order.
            let expected: Vec<usize> = (1..=outcome.seen.len()).collect();
            if outcome.upstream != expected {
                problems.push(format!(
                    "{path}: the upstream answered {} requests, the client got responses {:?}",
                    outcome.seen.len(),
                    outcome.upstream
                ));
            }
            if let Some(expect) = &case.expect
                && &outcome.statuses != expect
            {
                problems.push(format!(
                    "{path}: statuses {:?}, expected {expect:?}",
                    outcome.statuses
                ));
            }
            // After the case, an innocent request on a new connection gets its own answer.
            let innocent = format!("GET /innocent/{} HTTP/1.1\r\nHost: echo\r\n\r\n", case.name);
            let after = run(
                if path == "fast" { fast } else { hyper_only },
                &recorder,
                innocent.as_bytes(),
            )
            .await;
            if after.statuses != [200]
                || after.seen.len() != 1
                || after.seen[0].target != format!("/innocent/{}", case.name)
            {
                problems.push(format!(
                    "{path}: an innocent request after it got {after:?}"
                ));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}:\n  {}", case.name, problems.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
