//! Brokers and triggers end to end: the real `mecha` binary, real subscribers on real sockets.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use support::subscriber::{Received, Subscriber};
use support::{Mecha, Workdir, wait_until};

/// One request to the ingress with the given headers; returns status, headers (names in
/// lower case) and body.
fn ingress(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, BTreeMap<String, String>, String) {
    let response = support::request_with(addr, method, "localhost", path, headers, body);
    let headers = response
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    (response.status, headers, response.body)
}

fn binary_event(id: &str, kind: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ce-specversion", "1.0".into()),
        ("ce-id", id.into()),
        ("ce-source", "/tests".into()),
        ("ce-type", kind.into()),
    ]
}

fn post_binary(mecha: &Mecha, id: &str, kind: &str, extra: &[(&str, &str)]) -> u16 {
    let mut headers = binary_event(id, kind);
    headers.extend(extra.iter().map(|(k, v)| (*k, (*v).to_string())));
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    ingress(mecha.gateway, "POST", "/default/default", &headers, "").0
}

const BROKER: &str =
    "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n";

fn trigger(name: &str, filter: &str, subscriber: &str, delivery: &str) -> String {
    format!(
        "---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: {name}\nspec:\n  broker: default\n{filter}  subscriber:\n    uri: {subscriber}\n{delivery}"
    )
}

fn type_filter(kind: &str) -> String {
    format!("  filter:\n    attributes:\n      type: {kind}\n")
}

#[test]
fn ingress_accepts_each_mode_and_refuses_bad_requests_with_reasons() {
    let work = Workdir::new("ingress");
    let sink = Subscriber::ok();
    let yaml = format!("{BROKER}{}", trigger("all", "", &sink.url("/"), ""));
    let file = work.write("broker.yaml", &yaml);
    let mecha = Mecha::up(&[&file]);
    let at = mecha.gateway;
    let path = "/default/default";

    // Binary mode, with a percent-encoded header value.
    let mut headers = binary_event("b1", "t.binary");
    headers.push(("ce-note", "caf%C3%A9".into()));
    headers.push(("content-type", "application/json".into()));
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(ingress(at, "POST", path, &headers, "{\"n\":1}").0, 202);
    // Structured mode.
    let structured = r#"{"specversion":"1.0","id":"s1","source":"/tests","type":"t.structured","count":3,"data":{"n":2}}"#;
    let ct = [(
        "content-type",
        "application/cloudevents+json; charset=utf-8",
    )];
    assert_eq!(ingress(at, "POST", path, &ct, structured).0, 202);
    // Batched mode, and the empty batch.
    let batch = r#"[{"specversion":"1.0","id":"m1","source":"/tests","type":"t.batch"},{"specversion":"1.0","id":"m2","source":"/tests","type":"t.batch"}]"#;
    let ct = [("content-type", "application/cloudevents-batch+json")];
    assert_eq!(ingress(at, "POST", path, &ct, batch).0, 202);
    assert_eq!(ingress(at, "POST", path, &ct, "[]").0, 202);

    wait_until("four events delivered", || sink.all().len() == 4);
    let all = sink.all();
    let binary = all
        .iter()
        .find(|r| r.headers.get("ce-id").map(String::as_str) == Some("b1"))
        .unwrap();
    assert_eq!(
        binary.headers["ce-note"], "caf%C3%A9",
        "re-encoded for delivery"
    );
    assert_eq!(binary.body, "{\"n\":1}");
    assert_eq!(binary.headers["prefer"], "reply");
    assert!(
        !binary.headers.contains_key("ce-knativebrokerttl"),
        "the TTL is the broker's own"
    );
    let structured = all
        .iter()
        .find(|r| r.headers.get("ce-id").map(String::as_str) == Some("s1"))
        .unwrap();
    assert_eq!(structured.headers["ce-count"], "3");
    assert_eq!(structured.body, "{\"n\":2}");

    // Refusals, each with its status and a message that names the problem.
    let refused = |path: &str, headers: &[(&str, &str)], body: &str, status: u16, says: &str| {
        let (got, _, text) = ingress(at, "POST", path, headers, body);
        assert_eq!((got, text.contains(says)), (status, true), "{text}");
    };
    let json = [("content-type", "application/cloudevents+json")];
    let batch = [("content-type", "application/cloudevents-batch+json")];
    refused(
        path,
        &json,
        r#"{"specversion":"1.0","source":"/s","type":"t"}"#,
        400,
        "id is missing",
    );
    refused(
        path,
        &json,
        r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"noon"}"#,
        400,
        "RFC 3339",
    );
    refused(
        path,
        &json,
        r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
        400,
        "specversion",
    );
    refused(
        path,
        &[("content-type", "text/plain")],
        "hello",
        400,
        "not a CloudEvent",
    );
    refused(
        path,
        &batch,
        r#"[{"specversion":"1.0","id":"1","source":"/s","type":"t"},{"id":"2"}]"#,
        400,
        "event 1 of the batch",
    );
    refused(
        path,
        &[("content-type", "application/cloudevents+xml")],
        "<e/>",
        415,
        "not supported",
    );
    refused(path, &headers, &"x".repeat((1 << 20) + 10), 413, "limit");
    refused(
        "/default/nope",
        &headers,
        "",
        404,
        "broker default/nope not found",
    );
    refused("/a/b/c", &headers, "", 400, "not a broker address");
    refused("/", &headers, "", 404, "no broker here");
    let (status, h, _) = ingress(at, "GET", path, &[], "");
    assert_eq!(
        (status, h.get("allow").map(String::as_str)),
        (405, Some("POST, OPTIONS"))
    );
    let (status, h, _) = ingress(
        at,
        "OPTIONS",
        path,
        &[("webhook-request-origin", "example.com")],
        "",
    );
    assert_eq!(status, 200);
    assert_eq!(h["webhook-allowed-origin"], "*");
    assert_eq!(h["webhook-allowed-rate"], "*");
    // An event whose TTL runs out is dropped.
    assert_eq!(
        post_binary(&mecha, "ttl", "t.ttl", &[("ce-knativebrokerttl", "1")]),
        400
    );

    let metrics = support::http(mecha.admin, "localhost", "/metrics").body;
    for reason in [
        "invalid",
        "too-large",
        "method",
        "unknown-broker",
        "unsupported-format",
        "ttl",
    ] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "rejections by {reason} are counted"
        );
    }
    // Requests for no broker are counted under one label, not under the names they made up.
    assert!(
        metrics.contains(
            "rejected_total{broker=\"(unknown)\",namespace=\"(unknown)\",reason=\"unknown-broker\"}"
        ),
        "{metrics}"
    );
    assert!(!metrics.contains("broker=\"nope\""), "{metrics}");
    assert!(
        metrics.contains(
            "mecha_broker_events_dropped_ttl_total{broker=\"default\",namespace=\"default\"} 1"
        ),
        "{metrics}"
    );
    assert_eq!(sink.all().len(), 4, "nothing refused was delivered");
}

#[test]
fn triggers_filter_retry_dead_letter_and_reply() {
    triggers_scenario(&[]);
}

/// The same on NATS JetStream (`--event-log`).
#[cfg(feature = "nats")]
#[test]
fn triggers_filter_retry_dead_letter_and_reply_on_jetstream() {
    let nats = test_support::nats::NatsServer::start();
    triggers_scenario(&["--event-log", &nats.url()]);
}

/// Filters, retries with their timing, dead letters, replies back into the broker and the
/// TTL that ends reply loops, on `mecha up ARGS`.
fn triggers_scenario(args: &[&str]) {
    let work = Workdir::new("triggers");
    let sink = Subscriber::ok();
    let dead = Subscriber::ok();
    let failing = Subscriber::start(|_| (500, vec![], "boom".into()));
    // Answers "ask" with a "reply" event, and "loop" with another "loop".
    let replier = Subscriber::start(|r| {
        let kind = match r.headers.get("ce-type").map(String::as_str) {
            Some("ask") => "reply",
            _ => "loop",
        };
        let id = format!("{}-r", r.headers.get("ce-id").cloned().unwrap_or_default());
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", &id),
            ("ce-source", "/replier"),
            ("ce-type", kind),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
        (200, headers, String::new())
    });
    let retry = "  delivery:\n    retry: 2\n    backoffPolicy: linear\n    backoffDelay: PT0.05S\n    deadLetterSink:\n      uri: DEAD\n"
        .replace("DEAD", &dead.url("/dead"));
    let yaml = [
        BROKER.to_string(),
        trigger("orders", &type_filter("order.created"), &sink.url("/orders"), ""),
        trigger("urgent", "  filters:\n    - cesql: \"INT(priority) > 5 AND type LIKE 'order.c%'\"\n", &sink.url("/urgent"), ""),
        trigger("failing", &type_filter("order.created"), &failing.url("/"), &retry),
        trigger("ask", &type_filter("ask"), &replier.url("/"), ""),
        trigger("replies", &type_filter("reply"), &sink.url("/replies"), ""),
        trigger("loop", &type_filter("loop"), &replier.url("/loop"), ""),
        "---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: to-nowhere\nspec:\n  broker: default\n  subscriber:\n    ref:\n      apiVersion: serving.knative.dev/v1\n      kind: Service\n      name: missing\n".to_string(),
    ]
    .concat();
    let file = work.write("triggers.yaml", &yaml);
    let mecha = Mecha::start(&[&file], &[], args, &Mecha::fresh_state_dir());

    let send = |args: &[&str]| {
        let mut all = vec!["send", "--broker", "default/default", "--source", "/tests"];
        all.extend_from_slice(args);
        let out = mecha.cli(&all);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let printed = send(&[
        "--type",
        "order.created",
        "--id",
        "o1",
        "-e",
        "priority=7",
        "--data",
        "{\"total\":5}",
    ]);
    assert!(printed.contains("accepted"), "{printed}");
    send(&["--type", "order.created", "--id", "o2", "-e", "priority=2"]);
    send(&["--type", "order.paid", "--id", "p1", "-e", "priority=9"]);

    wait_until("orders delivered", || sink.count("/orders") == 2);
    wait_until("one urgent order", || sink.count("/urgent") == 1);
    let urgent = sink
        .all()
        .into_iter()
        .find(|r| r.path == "/urgent")
        .unwrap();
    assert_eq!(urgent.headers["ce-id"], "o1");
    assert_eq!(urgent.body, "{\"total\":5}");

    // retry 2 → three attempts each, the first retry at once, then 50 ms (linear).
    wait_until("both orders dead-lettered", || dead.count("/dead") == 2);
    let attempts: Vec<Received> = failing
        .all()
        .into_iter()
        .filter(|r| r.headers["ce-id"] == "o1")
        .collect();
    assert_eq!(attempts.len(), 3);
    let second_gap = attempts[2].at - attempts[1].at;
    assert!(second_gap >= Duration::from_millis(45), "{second_gap:?}");
    let letter = dead
        .all()
        .into_iter()
        .find(|r| r.headers["ce-id"] == "o1")
        .unwrap();
    assert_eq!(letter.headers["ce-knativeerrordest"], failing.url("/"));
    assert_eq!(letter.headers["ce-knativeerrorcode"], "500");
    assert_eq!(
        letter.headers["ce-knativeerrordata"], "Ym9vbQ==",
        "base64 of the body"
    );
    assert_eq!(letter.headers["ce-type"], "order.created");

    // A reply goes back into the broker and reaches the trigger that wants it.
    send(&["--type", "ask", "--id", "q1"]);
    wait_until("the reply delivered", || sink.count("/replies") == 1);
    let reply = sink
        .all()
        .into_iter()
        .find(|r| r.path == "/replies")
        .unwrap();
    assert_eq!(reply.headers["ce-id"], "q1-r");
    assert_eq!(reply.headers["ce-source"], "/replier");

    // A reply loop stops when the TTL runs out: 3 → stored with 2, reply stored with 1, the
    // next reply would be 0 and is dropped.
    send(&["--type", "loop", "--id", "l", "-e", "knativebrokerttl=3"]);
    wait_until("the loop ran out", || {
        support::http(mecha.admin, "localhost", "/metrics")
            .body
            .contains(
                "mecha_broker_events_dropped_ttl_total{broker=\"default\",namespace=\"default\"} 1",
            )
    });
    assert_eq!(replier.count("/loop"), 2);

    let triggers: serde_json::Value =
        serde_json::from_slice(&mecha.cli(&["get", "triggers", "-o", "json"]).stdout).unwrap();
    let by_name = |name: &str| {
        triggers
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(by_name("orders")["ready"], true);
    assert_eq!(by_name("orders")["subscriberUri"], sink.url("/orders"));
    assert_eq!(by_name("to-nowhere")["ready"], false);
    assert_eq!(
        by_name("to-nowhere")["reason"],
        "Service default/missing not found"
    );
    let brokers = String::from_utf8_lossy(&mecha.cli(&["get", "brokers"]).stdout).to_string();
    assert!(
        brokers.contains(&format!(
            "http://localhost:{}/default/default",
            mecha.gateway.port()
        )),
        "{brokers}"
    );
    let metrics = support::http(mecha.admin, "localhost", "/metrics").body;
    assert!(
        metrics.contains(
            "mecha_broker_events_dead_lettered_total{namespace=\"default\",trigger=\"failing\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "mecha_broker_delivery_retries_total{namespace=\"default\",trigger=\"failing\"} 4"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("mecha_broker_delivery_latency_seconds_count{namespace=\"default\",trigger=\"orders\"} 2"), "{metrics}");
}

#[test]
fn the_trace_context_of_a_posted_event_reaches_subscribers_replies_and_dead_letters() {
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const OWN: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let work = Workdir::new("tracing");
    let sink = Subscriber::ok();
    let failing = Subscriber::start(|_| (500, vec![], "boom".into()));
    // Answers with a reply event that has no trace context of its own.
    let replier = Subscriber::start(|r| {
        let id = format!("{}-r", r.headers.get("ce-id").cloned().unwrap_or_default());
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", &id),
            ("ce-source", "/replier"),
            ("ce-type", "traced.reply"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
        (200, headers, String::new())
    });
    let dead_letter = "  delivery:\n    retry: 0\n    deadLetterSink:\n      uri: DEAD\n"
        .replace("DEAD", &sink.url("/dead"));
    let yaml = [
        BROKER.to_string(),
        trigger("ask", &type_filter("traced"), &replier.url("/ask"), ""),
        trigger(
            "replies",
            &type_filter("traced.reply"),
            &sink.url("/replies"),
            "",
        ),
        trigger(
            "failing",
            &type_filter("traced"),
            &failing.url("/fail"),
            &dead_letter,
        ),
        trigger("own", &type_filter("own"), &sink.url("/own"), ""),
    ]
    .concat();
    let file = work.write("triggers.yaml", &yaml);
    let mecha = Mecha::up_with(&[&file], &[("MECHA_LOG", "info,eventing_broker=debug")]);

    let trace = [("traceparent", PARENT), ("tracestate", "congo=t61rcWkgMzE")];
    assert_eq!(post_binary(&mecha, "t1", "traced", &trace), 202);
    // An event with its own trace context (binary mode's ce-traceparent) keeps it.
    let own = [("traceparent", PARENT), ("ce-traceparent", OWN)];
    assert_eq!(post_binary(&mecha, "t2", "own", &own), 202);

    wait_until("the subscriber, the reply and the dead letter", || {
        sink.count("/replies") >= 1 && sink.count("/dead") >= 1 && sink.count("/own") >= 1
    });
    let first = |subscriber: &Subscriber, path: &str| {
        subscriber
            .all()
            .into_iter()
            .find(|r| r.path == path)
            .unwrap()
    };
    let asked = first(&replier, "/ask");
    assert_eq!(asked.headers["traceparent"], PARENT, "{asked:?}");
    assert_eq!(asked.headers["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(asked.headers["ce-traceparent"], PARENT);
    for path in ["/replies", "/dead"] {
        let received = first(&sink, path);
        assert_eq!(received.headers["traceparent"], PARENT, "{received:?}");
        assert_eq!(received.headers["tracestate"], "congo=t61rcWkgMzE");
    }
    let own = first(&sink, "/own");
    assert_eq!(own.headers["traceparent"], OWN, "{own:?}");
    assert_eq!(own.headers["ce-traceparent"], OWN);
    assert!(!own.headers.contains_key("tracestate"), "{own:?}");
    // The rest of the event is as it was sent.
    assert_eq!(own.headers["ce-id"], "t2");
    assert_eq!(own.headers["ce-source"], "/tests");

    wait_until("the trace id in the delivery logs", || {
        mecha.log_contains(&[
            "event delivered",
            "trigger=ask",
            &format!("trace_id={TRACE_ID}"),
        ]) && mecha.log_contains(&["event dead-lettered", &format!("trace_id={TRACE_ID}")])
    });
}

#[test]
fn a_slow_subscriber_does_not_delay_a_fast_one() {
    let work = Workdir::new("slow");
    let fast = Subscriber::ok();
    // The slow subscriber holds every request until the gate opens.
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let held = gate.clone();
    let slow = Subscriber::start(move |_| {
        let (open, opened) = &*held;
        let _open = opened
            .wait_while(open.lock().unwrap(), |open| !*open)
            .unwrap();
        (202, vec![], String::new())
    });
    let yaml = [
        BROKER.to_string(),
        trigger("fast", "", &fast.url("/"), ""),
        trigger("slow", "", &slow.url("/"), ""),
    ]
    .concat();
    let file = work.write("slow.yaml", &yaml);
    let mecha = Mecha::start(
        &[&file],
        &[],
        &["--delivery-concurrency", "1"],
        &Mecha::fresh_state_dir(),
    );
    let started = Instant::now();
    for i in 0..20 {
        assert_eq!(post_binary(&mecha, &format!("e{i}"), "t", &[]), 202);
    }
    wait_until("the fast subscriber has everything", || {
        fast.all().len() == 20
    });
    let slow_so_far = slow.all().len();
    assert!(
        slow_so_far < 10,
        "the slow trigger took {slow_so_far} events in {:?}: it cannot have, one at a time",
        started.elapsed()
    );
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    wait_until("the slow subscriber catches up", || slow.all().len() >= 3);
}

/// What a SIGKILL may make one trigger deliver again, as docs/architecture.md states it: the
/// checkpoint count (256) + the delivery concurrency (32) + one read batch (256).
const REDELIVERY_BOUND: usize = 256 + 32 + 256;

/// Posts one binary-mode event on a fresh connection; `None` when the platform is gone.
fn post_raw(gateway: SocketAddr, id: &str) -> Option<u16> {
    let headers = binary_event(id, "t.crash");
    let mut stream = TcpStream::connect(gateway).ok()?;
    let mut request = "POST /default/default HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n".to_string();
    for (k, v) in &headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    raw.get(9..12)?.parse().ok()
}

#[test]
fn every_accepted_event_survives_a_crash_and_few_are_delivered_twice() {
    crash_and_restart(&[]);
}

/// The same on NATS JetStream (`--event-log`): the events live in the server, which outlives
/// the SIGKILLed `mecha up`; what the dead process had in flight comes back once its
/// acknowledgement deadline (2 s here) has passed.
#[cfg(feature = "nats")]
#[test]
fn every_accepted_event_survives_a_crash_on_jetstream() {
    let nats = test_support::nats::NatsServer::start();
    let url = format!("{}?ack-wait=2s", nats.url());
    crash_and_restart(&["--event-log", &url]);
}

/// `mecha up --event-log` with its NATS down: it starts, is not ready and says why, answers
/// posts with 503 and `Retry-After`; once NATS is up it takes and delivers events by itself.
#[cfg(feature = "nats")]
#[test]
fn mecha_up_on_a_nats_that_is_down_answers_503_until_it_is_up() {
    let work = Workdir::new("nats-down");
    let sink = Subscriber::ok();
    let yaml = format!("{BROKER}{}", trigger("all", "", &sink.url("/all"), ""));
    let file = work.write("broker.yaml", &yaml);
    let mut nats = test_support::nats::NatsServer::start();
    nats.stop();
    let mecha = Mecha::start(
        &[&file],
        &[],
        &["--event-log", &nats.url()],
        &Mecha::fresh_state_dir(),
    );
    let ready = support::http(mecha.admin, "localhost", "/ready");
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.body.contains("not reachable"), "{}", ready.body);
    let (status, headers, body) = ingress(
        mecha.gateway,
        "POST",
        "/default/default",
        &binary_event("early", "t")
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect::<Vec<_>>(),
        "",
    );
    assert_eq!(status, 503, "{body}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");

    nats.restart();
    wait_until("a post accepted once NATS is up", || {
        post_binary(&mecha, "first", "t", &[]) == 202
    });
    wait_until("the event delivered", || sink.count("/all") == 1);
    wait_until("ready", || {
        support::http(mecha.admin, "localhost", "/ready").status == 200
    });
}

/// 10,000 events from 8 clients, `mecha up ARGS` SIGKILLed right after, started again with the
/// same state: every accepted event is delivered, and few twice.
fn crash_and_restart(args: &[&str]) {
    let work = Workdir::new("crash");
    // One request in a hundred fails, so some events are retried while later ones finish:
    // the case where a bare cursor would make a crash redeliver everything after them.
    let seen = Arc::new(AtomicU16::new(0));
    let counter = seen.clone();
    let sink = Subscriber::start(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) % 100 == 99 {
            (503, vec![], "busy".into())
        } else {
            (202, vec![], String::new())
        }
    });
    let delivery =
        "  delivery:\n    retry: 1000\n    backoffPolicy: linear\n    backoffDelay: PT0.05S\n";
    let yaml = format!("{BROKER}{}", trigger("all", "", &sink.url("/"), delivery));
    let file = work.write("crash.yaml", &yaml);
    let state = Mecha::fresh_state_dir();
    let mut first = Mecha::start(&[&file], &[], args, &state);

    // Eight clients post 10,000 events; the platform is SIGKILLed right after.
    const TOTAL: usize = 10_000;
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gateway = first.gateway;
    let posting = Instant::now();
    let posters: Vec<_> = (0..8)
        .map(|_| {
            let (accepted, next) = (accepted.clone(), next.clone());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= TOTAL {
                        return;
                    }
                    let id = format!("c{i}");
                    match post_raw(gateway, &id) {
                        Some(202) => accepted.lock().unwrap().push(id),
                        Some(_) => {}
                        None => return,
                    }
                }
            })
        })
        .collect();
    for poster in posters {
        poster.join().unwrap();
    }
    let posted_in = posting.elapsed();
    first.kill();
    let accepted = accepted.lock().unwrap().clone();
    assert_eq!(
        accepted.len(),
        TOTAL,
        "every post was accepted before the kill"
    );
    let delivered_ids = |sink: &Subscriber| -> Vec<String> {
        sink.all()
            .into_iter()
            .filter_map(|r| r.headers.get("ce-id").cloned())
            .collect()
    };
    let before = sink.all().len();

    let second = Mecha::start(&[&file], &[], args, &state);
    wait_until("every accepted event delivered after the restart", || {
        let delivered: std::collections::BTreeSet<String> =
            delivered_ids(&sink).into_iter().collect();
        accepted.iter().all(|id| delivered.contains(id))
    });
    // Until the trigger has caught up with the log: nothing more will come.
    wait_until("the log drained", || {
        support::http(second.admin, "localhost", "/metrics")
            .body
            .contains("mecha_broker_log_events{broker=\"default\",namespace=\"default\"} 0")
    });
    // A delivery is one 2xx answer; the 503s (every hundredth request) are not deliveries.
    let all = sink.all();
    let answered = all.len() - all.len() / 100;
    let unique = delivered_ids(&sink)
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let duplicates = answered - unique;
    eprintln!(
        "crash: {TOTAL} accepted in {posted_in:.1?} ({:.0} posts/s, 8 clients, one connection per post, debug build), {before} requests before the kill, {} after; {duplicates} delivered twice (bound {REDELIVERY_BOUND})",
        TOTAL as f64 / posted_in.as_secs_f64(),
        all.len() - before
    );
    assert!(
        duplicates <= REDELIVERY_BOUND,
        "{duplicates} events delivered twice; the documented bound is {REDELIVERY_BOUND}"
    );
    drop(second);
    drop(first);
}

/// Runs `mecha up` expecting it to refuse to start; returns its stderr.
fn refuses_to_start(file: &std::path::Path, state: &std::path::Path) -> String {
    let mut child = std::process::Command::new(support::mecha_bin())
        .arg("up")
        .arg(file)
        .args(["--port", "0", "--admin-port", "0", "--state-dir"])
        .arg(state)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mecha up started on a damaged or locked log");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    stderr
}

#[test]
fn a_damaged_or_locked_event_log_is_refused_with_what_to_do() {
    let work = Workdir::new("damaged");
    let sink = Subscriber::start(|_| (503, vec![], "down".into()));
    let yaml = format!("{BROKER}{}", trigger("all", "", &sink.url("/"), ""));
    let file = work.write("damaged.yaml", &yaml);
    let state = Mecha::fresh_state_dir();
    let mut mecha = Mecha::start(&[&file], &[], &[], &state);
    for i in 0..300 {
        assert_eq!(post_binary(&mecha, &format!("d{i}"), "t", &[]), 202);
    }
    // A second `mecha up` on the same state: that one really is another process's lock.
    let locked = refuses_to_start(&file, &state);
    assert!(locked.contains("another `mecha up`"), "{locked}");
    assert!(mecha.interrupt().success());

    // Garbage over the 4 KB pages that hold events (garbage over a free page would be
    // harmless, and the log rightly opens).
    let path = state.join("events.redb");
    let mut bytes = std::fs::read(&path).unwrap();
    let original = bytes.clone();
    let mut hit = 0;
    for page in bytes.chunks_mut(4096).skip(1) {
        // The id of event d150, as its record holds it (length-prefixed, no quotes).
        if page.windows(4).any(|w| w == b"d150") {
            for (i, b) in page.iter_mut().enumerate() {
                *b = (i * 31 + 7) as u8;
            }
            hit += 1;
        }
    }
    assert!(hit > 0, "no page holds the events");
    std::fs::write(&path, &bytes).unwrap();
    let damaged = refuses_to_start(&file, &state);
    assert!(damaged.contains("is damaged"), "{damaged}");
    assert!(damaged.contains("move it aside"), "{damaged}");
    assert!(!damaged.contains("another"), "{damaged}");

    // Cut short.
    std::fs::write(&path, &original[..original.len() / 3]).unwrap();
    let truncated = refuses_to_start(&file, &state);
    assert!(!truncated.contains("another"), "{truncated}");
    assert!(truncated.contains("events.redb"), "{truncated}");
    eprintln!("locked: {locked}damaged: {damaged}truncated: {truncated}");
}

#[test]
fn an_event_wakes_a_zero_scaled_service() {
    let work = Workdir::new("wake");
    work.write("sink.py", support::CE_ID_RECORDER);
    let yaml = format!(
        "{}---\napiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: sink\nspec:\n  template:\n    metadata:\n      annotations:\n        autoscaling.knative.dev/initial-scale: \"0\"\n    spec:\n      containers:\n        - command: [python3, sink.py]\n---\n{BROKER}---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: to-sink\nspec:\n  broker: default\n  subscriber:\n    ref:\n      apiVersion: serving.knative.dev/v1\n      kind: Service\n      name: sink\n",
        support::FAST_CONFIG
    );
    let file = work.write("wake.yaml", &yaml);
    let mecha = Mecha::up(&[&file]);
    assert!(mecha.pids("sink").is_empty(), "scaled to zero at start");
    assert_eq!(post_binary(&mecha, "wake-1", "t.wake", &[]), 202);
    let received = work.path.join("received.txt");
    wait_until("the function received the event", || {
        std::fs::read_to_string(&received).is_ok_and(|s| s.contains("wake-1"))
    });
    let triggers = String::from_utf8_lossy(&mecha.cli(&["get", "triggers"]).stdout).to_string();
    assert!(
        triggers.contains(&format!(
            "http://sink.default.localhost:{}/",
            mecha.gateway.port()
        )),
        "{triggers}"
    );
}

#[test]
fn the_events_example_displays_what_is_sent() {
    let example = support::repo_root().join("examples/events");
    let mecha = Mecha::up(&[&example]);
    let out = mecha.cli(&[
        "send",
        "--broker",
        "default/default",
        "--type",
        "order.created",
        "--source",
        "/shop",
        "-e",
        "priority=7",
        "--data",
        "{\"total\": 5}",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both triggers match: the display prints the event once for each.
    wait_until("the display printed the event twice", || {
        mecha
            .stdout
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("event:") && l.contains("\"type\": \"order.created\""))
            .count()
            == 2
    });
}

/// The ingress answers 413 from the declared length, before reading the body: the unread body
/// must never be taken for the next request on the connection (it would reach whatever it
/// names, behind the proxy's back).
#[test]
fn a_body_left_unread_after_an_early_answer_is_never_parsed_as_a_request() {
    let work = Workdir::new("early-answer");
    let file = work.write("broker.yaml", BROKER);
    let state = Mecha::fresh_state_dir();
    let mecha = Mecha::start(&[&file], &[], &["--max-event-size", "65536"], &state);
    let smuggled = "GET /default/default HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut body = smuggled.repeat(3).into_bytes();
    body.resize(70_000, b'x');
    let mut stream = std::net::TcpStream::connect(mecha.gateway).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let head = format!(
        "POST /default/default HTTP/1.1\r\nHost: localhost\r\nce-specversion: 1.0\r\nce-id: big\r\nce-source: /t\r\nce-type: t\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    let received = String::from_utf8_lossy(&received);
    let responses = received.matches("HTTP/1.1 ").count();
    assert!(
        responses <= 1,
        "the unread body was served as requests:\n{received}"
    );
    assert!(
        received.is_empty() || received.starts_with("HTTP/1.1 413"),
        "{received}"
    );
}

/// `mecha_request_body_bytes_in_use{listener="gateway"}` on `mecha up`'s `/metrics`.
fn gateway_bytes_in_use(mecha: &Mecha) -> u64 {
    let metrics = support::http(mecha.admin, "localhost", "/metrics").body;
    metrics
        .lines()
        .find(|line| line.starts_with("mecha_request_body_bytes_in_use{listener=\"gateway\"}"))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no gateway budget in /metrics:\n{metrics}"))
}

/// The gateway port holds the bodies of the broker ingress and the webhooks within one budget:
/// four unfinished 1 MiB events take the whole 4 MiB, so an event is refused at once with 503
/// and `Retry-After`, and so is a webhook delivery (its body is read before its signature is
/// checked), until the body timeout answers the four 408 and gives every byte back; then
/// events are taken again.
#[test]
fn the_gateway_port_holds_request_bodies_within_its_budget() {
    use test_support::hostile::PartialBody;
    let work = Workdir::new("gateway-budget");
    let github = "---\napiVersion: sources.knative.dev/v1alpha1\nkind: GitHubSource\nmetadata:\n  name: repo\n  annotations: {mecha.dev/secret-token-env: BUDGET_HOOK_SECRET}\nspec:\n  ownerAndRepository: octo/hello\n  eventTypes: [push]\n  sink: {uri: \"http://127.0.0.1:9/\"}\n";
    let file = work.write("broker.yaml", &format!("{BROKER}{github}"));
    let state = Mecha::fresh_state_dir();
    let mecha = Mecha::start(
        &[&file],
        &[("BUDGET_HOOK_SECRET", "a secret")],
        &["--body-budget", "4194304", "--body-timeout", "3s"],
        &state,
    );
    assert_eq!(post_binary(&mecha, "before", "t", &[]), 202);
    let unsigned_webhook = || {
        support::request_with(
            mecha.gateway,
            "POST",
            "localhost",
            "/webhooks/github/default/repo",
            &[("x-github-event", "push"), ("x-github-delivery", "d1")],
            "{}",
        )
    };
    wait_until("the webhook receiver", || unsigned_webhook().status == 401);
    let head = |id: &str| {
        format!(
            "POST /default/default HTTP/1.1\r\nHost: localhost\r\nce-specversion: 1.0\r\nce-id: {id}\r\nce-source: /t\r\nce-type: t\r\nContent-Length: 1048576\r\n\r\n"
        )
    };
    let holders: Vec<PartialBody> = (0..4)
        .map(|n| {
            PartialBody::start(
                mecha.gateway,
                head(&format!("held-{n}")),
                vec![b'h'; 800_000],
                None,
            )
        })
        .collect();
    wait_until("the holders' bodies in the budget", || {
        gateway_bytes_in_use(&mecha) == 4 << 20
    });
    let (status, headers, body) = ingress(
        mecha.gateway,
        "POST",
        "/default/default",
        &[
            ("ce-specversion", "1.0"),
            ("ce-id", "refused"),
            ("ce-source", "/t"),
            ("ce-type", "t"),
        ],
        "{}",
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers.get("retry-after").map(String::as_str), Some("1"));
    assert!(body.contains("holds at most 4194304 bytes"), "{body}");
    let webhook = unsigned_webhook();
    assert_eq!(webhook.status, 503, "{}", webhook.body);
    for holder in &holders {
        let said = holder.answer(Duration::from_secs(20));
        assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    }
    wait_until("the budget back", || gateway_bytes_in_use(&mecha) == 0);
    assert_eq!(post_binary(&mecha, "after", "t", &[]), 202);
    assert_eq!(unsigned_webhook().status, 401);
}

/// Reads one response off `stream` (a `Content-Length` body): status, headers (names in
/// lower case), body; `None` if the connection ends first.
fn read_response(
    stream: &mut std::io::BufReader<TcpStream>,
) -> Option<(u16, BTreeMap<String, String>, String)> {
    use std::io::BufRead;
    let mut status = None;
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        match status {
            None => status = line.get(9..12).and_then(|s| s.parse().ok()),
            Some(_) => {
                let (name, value) = line.split_once(':')?;
                headers.insert(name.to_ascii_lowercase(), value.trim().to_string());
            }
        }
    }
    let length = headers
        .get("content-length")
        .map_or(0, |v| v.parse().unwrap());
    let mut body = vec![0; length];
    stream.read_exact(&mut body).ok()?;
    Some((
        status?,
        headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// `mecha up`'s gateway port answers the broker ingress itself on its fast path, on kept-alive
/// connections: pipelined posts, a refusal (the connection goes on), a webhook (hyper's) and a chunked post (hyper's) between them on the same connection, then
/// `Connection: close`; every accepted event reaches the subscriber with its data and `ce-`
/// headers as sent.
#[test]
fn the_gateway_port_answers_the_ingress_on_kept_alive_connections() {
    let subscriber = Subscriber::ok();
    let work = Workdir::new("fast-ingress");
    let github = "---\napiVersion: sources.knative.dev/v1alpha1\nkind: GitHubSource\nmetadata:\n  name: repo\n  annotations: {mecha.dev/secret-token-env: FAST_HOOK_SECRET}\nspec:\n  ownerAndRepository: octo/hello\n  eventTypes: [push]\n  sink: {uri: \"http://127.0.0.1:9/\"}\n";
    let file = work.write(
        "broker.yaml",
        &format!(
            "{BROKER}{}{github}",
            trigger("all", "", &subscriber.url("/all"), "")
        ),
    );
    let mecha = Mecha::up_with(&[&file], &[("FAST_HOOK_SECRET", "a secret")]);
    wait_until("the webhook receiver", || {
        support::request_with(
            mecha.gateway,
            "POST",
            "localhost",
            "/webhooks/github/default/repo",
            &[("x-github-event", "push")],
            "{}",
        )
        .status
            == 401
    });
    let event = |id: &str, data: &str, extra: &str| {
        format!(
            "POST /default/default HTTP/1.1\r\nHost: localhost:8080\r\nce-specversion: 1.0\r\nce-id: {id}\r\nce-source: /fast\r\nce-type: t\r\nce-note: {id}%20n\r\ncontent-type: text/plain\r\n{extra}content-length: {}\r\n\r\n{data}",
            data.len()
        )
    };
    let stream = TcpStream::connect(mecha.gateway).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = std::io::BufReader::new(stream);
    // Two posts in one write.
    writer
        .write_all(format!("{}{}", event("one", "first data", ""), event("two", "", "")).as_bytes())
        .unwrap();
    for id in ["one", "two"] {
        let (status, headers, body) = read_response(&mut reader).expect("an answer");
        assert_eq!(status, 202, "{id}: {body}");
        assert!(headers.contains_key("date"), "{id}: {headers:?}");
    }
    // A refusal answered before any body is read (`GET`): the connection carries on.
    writer
        .write_all(b"GET /default/nobody HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let (status, _, body) = read_response(&mut reader).expect("an answer");
    assert_eq!(status, 405, "{body}");
    // A webhook: hyper's, on the same connection.
    writer
        .write_all(b"POST /webhooks/github/default/repo HTTP/1.1\r\nHost: localhost\r\nx-github-event: push\r\ncontent-length: 2\r\n\r\n{}")
        .unwrap();
    let (status, _, body) = read_response(&mut reader).expect("an answer");
    assert_eq!(status, 401, "{body}");
    // A chunked post: hyper's too.
    let chunked = event("three", "", "").replace(
        "content-length: 0\r\n\r\n",
        "transfer-encoding: chunked\r\n\r\n5\r\nthird\r\n0\r\n\r\n",
    );
    writer.write_all(chunked.as_bytes()).unwrap();
    let (status, _, body) = read_response(&mut reader).expect("an answer");
    assert_eq!(status, 202, "{body}");
    // The fast path again, and `Connection: close` ends the connection.
    writer
        .write_all(event("four", "last", "Connection: close\r\n").as_bytes())
        .unwrap();
    let (status, headers, body) = read_response(&mut reader).expect("an answer");
    assert_eq!(status, 202, "{body}");
    assert_eq!(headers.get("connection").map(String::as_str), Some("close"));
    let mut rest = Vec::new();
    assert_eq!(reader.read_to_end(&mut rest).unwrap(), 0, "closed");

    wait_until("four events at the subscriber", || {
        subscriber.count("/all") == 4
    });
    for (id, data) in [
        ("one", "first data"),
        ("two", ""),
        ("three", "third"),
        ("four", "last"),
    ] {
        let got = subscriber
            .all()
            .into_iter()
            .find(|r| r.headers.get("ce-id").map(String::as_str) == Some(id))
            .unwrap_or_else(|| panic!("{id} never arrived"));
        assert_eq!(got.body, data, "{id}");
        assert_eq!(got.headers["ce-source"], "/fast", "{id}");
        assert_eq!(got.headers["ce-note"], format!("{id}%20n"), "{id}");
    }
}
