//! The `activator-sidecar inbound` binary attacked from outside, as a client on the network
//! would: raw bytes over a socket, a keep-alive recording upstream (`support/recorder.py`,
//! Python's own HTTP parser) behind it, both real processes.

use std::net::TcpStream;

mod support;

use support::hostile::{self, RecordLog, Upstream, attack_all, attacks};
use support::{Port, Sidecar, reserve_port};

/// The recorder behind an inbound sidecar.
struct Stack {
    sidecar: Sidecar,
    upstream: Upstream,
    _port: Port,
}

fn stack(extra: &[(&str, &str)]) -> Stack {
    let port = reserve_port();
    let upstream = Upstream::start(port.number);
    let sidecar = Sidecar::start(port.number, extra);
    hostile::wait_listening(sidecar.serving);
    Stack {
        sidecar,
        upstream,
        _port: port,
    }
}

impl Stack {
    fn log(&self) -> &RecordLog {
        &self.upstream.log
    }
}

fn run_attacks(stack: &Stack) {
    let cases = attacks();
    let failures = attack_all(stack.sidecar.serving, None, stack.log(), &cases, "inbound");
    assert!(
        failures.is_empty(),
        "{} of {} attacks failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Nothing reached the replica but the innocents and the valid cases' own requests.
    let strays = hostile::strays(stack.log());
    assert!(strays.is_empty(), "requests nobody meant: {strays:?}");
}

#[test]
fn smuggling_attempts_reach_no_replica_and_poison_no_pooled_connection() {
    run_attacks(&stack(&[]));
}

#[test]
fn smuggling_attempts_fail_on_the_hyper_path_too() {
    run_attacks(&stack(&[("SIDECAR_FAST_PATH", "false")]));
}

#[test]
fn a_duplicate_host_is_refused() {
    for fast_path in ["true", "false"] {
        let stack = stack(&[("SIDECAR_FAST_PATH", fast_path)]);
        for head in [
            "GET /dup HTTP/1.1\r\nHost: echo\r\nHost: evil\r\n\r\n",
            "GET /dup HTTP/1.1\r\nHost: echo\r\nHost: echo\r\n\r\n",
            "GET /dup HTTP/1.1\r\nHost: echo\r\nhost: evil\r\nConnection: keep-alive\r\n\r\n",
            "GET http://echo/dup HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ] {
            let replies = hostile::exchange(stack.sidecar.serving, head.as_bytes());
            let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
            assert_eq!(statuses, [400], "fast path {fast_path}: {head:?}");
        }
        // The refusal is not a broken sidecar: the next request is served.
        let reply = hostile::request(
            stack.sidecar.serving,
            b"GET /after HTTP/1.1\r\nHost: echo\r\n\r\n",
        );
        assert_eq!(reply.seen().map(|s| s.target), Some("/after".into()));
        assert!(
            stack.log().entries().iter().all(|s| s.target == "/after"),
            "{:?}",
            stack.log().entries()
        );
    }
}

#[test]
fn absolute_form_and_upgrade_targets_reach_the_replica_in_origin_form() {
    let stack = stack(&[]);
    let reply = hostile::request(
        stack.sidecar.serving,
        b"GET http://svc.default.localhost/abs?x=1 HTTP/1.1\r\nHost: other.example\r\n\r\n",
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.seen().expect("the replica's answer");
    assert_eq!(seen.line, "GET /abs?x=1 HTTP/1.1");
    assert_eq!(seen.all("host"), [b"svc.default.localhost".as_slice()]);

    for target in ["/ws", "http://svc.default.localhost/ws"] {
        let mut stream = TcpStream::connect(stack.sidecar.serving).expect("connect");
        let head = format!(
            "GET {target} HTTP/1.1\r\nHost: svc.default.localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        );
        let reply = hostile::send(&mut stream, head.as_bytes());
        assert_eq!(reply.status, 101, "{target}: {reply:?}");
        // The tunnel carries bytes both ways.
        assert_eq!(hostile::through_tunnel(&mut stream, b"ping"), b"ping");
        let seen = stack.log().last();
        assert_eq!(seen.line, "GET /ws HTTP/1.1", "{target}");
        assert_eq!(seen.all("upgrade"), [b"websocket".as_slice()]);
        assert_eq!(seen.all("host"), [b"svc.default.localhost".as_slice()]);
    }
    assert!(
        stack
            .log()
            .entries()
            .iter()
            .all(|s| !s.target.contains("127.0.0.1")),
        "{:?}",
        stack.log().entries()
    );
}

#[test]
fn a_function_sees_the_runtime_contract_headers() {
    // Trusting nobody, as a sidecar reached straight from clients must: claims are replaced.
    let distrustful = stack(&[("SIDECAR_TRUSTED_PROXIES", "none")]);
    let seen = hostile::with_user_headers(
        distrustful.sidecar.serving,
        "svc.default.localhost",
        "/contract",
        &[
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("Forwarded", "for=1.2.3.4;proto=https"),
            ("traceparent", hostile::TRACEPARENT),
            ("tracestate", hostile::TRACESTATE),
        ],
    );
    assert_eq!(seen.all("host"), [b"svc.default.localhost".as_slice()]);
    assert_eq!(seen.one("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen.one("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        seen.one("forwarded").as_deref(),
        Some("for=127.0.0.1;proto=http;host=svc.default.localhost")
    );
    assert_eq!(
        seen.one("traceparent").as_deref(),
        Some(hostile::TRACEPARENT)
    );
    assert_eq!(seen.one("tracestate").as_deref(), Some(hostile::TRACESTATE));

    // By default the inbound role trusts the loopback and private networks (the gateway in
    // front of it): their claims are extended with this hop.
    let trusting = stack(&[]);
    let seen = hostile::with_user_headers(
        trusting.sidecar.serving,
        "svc.default.localhost:8080",
        "/contract",
        &[
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-Proto", "https"),
            (
                "Forwarded",
                "for=1.2.3.4;proto=https;host=svc.default.localhost",
            ),
        ],
    );
    assert_eq!(seen.all("host"), [b"svc.default.localhost:8080".as_slice()]);
    assert_eq!(
        seen.one("x-forwarded-for").as_deref(),
        Some("1.2.3.4, 127.0.0.1")
    );
    assert_eq!(seen.one("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(
        seen.one("forwarded").as_deref(),
        Some(
            "for=1.2.3.4;proto=https;host=svc.default.localhost, for=127.0.0.1;proto=http;host=\"svc.default.localhost:8080\""
        )
    );
}
