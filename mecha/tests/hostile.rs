//! `mecha up` attacked from outside, as a client on the network would: raw bytes to its gateway,
//! a function that records every request it parses (`recorder.py`, Python's own HTTP parser)
//! behind it; and the gateway role run beside it against its admin API, as a standalone gateway
//! or outbound sidecar is.

mod support;

use std::net::{SocketAddr, TcpStream};

use mecha_common::Shutdown;
use mecha_common::auth::AdminToken;
use support::hostile::{self, RecordLog, attack_all, attacks};
use support::{Mecha, Workdir, recorder_service, start_gateway, wait_until};

/// `mecha up` with one replica of the recorder as service `rec`.
struct Platform {
    mecha: Mecha,
    log: RecordLog,
    _dir: Workdir,
}

const HOST: &str = "rec.default.localhost";

fn platform(name: &str) -> Platform {
    let dir = Workdir::new(name);
    dir.write("recorder.py", hostile::RECORDER);
    let log = RecordLog {
        path: dir.path.join("requests.jsonl"),
    };
    dir.write("svc.yaml", &recorder_service("rec", &log.path));
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("rec", 1);
    Platform {
        mecha,
        log,
        _dir: dir,
    }
}

/// The gateway role beside `mecha up`, fed over its admin API with its credential, on the fast
/// path or hyper only; ready once it routes `rec`.
struct Standalone {
    addr: SocketAddr,
    shutdown: Shutdown,
    served: Option<tokio::task::JoinHandle<()>>,
    runtime: tokio::runtime::Runtime,
}

fn standalone(platform: &Platform, fast_path: bool) -> Standalone {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let shutdown = Shutdown::new();
    let token = AdminToken::parse(&platform.mecha.token()).expect("token");
    let (addr, _health, served) =
        start_gateway(&runtime, &platform.mecha, Some(token), fast_path, &shutdown);
    wait_until("the standalone gateway to route rec", || {
        support::http(addr, HOST, "/ready").status == 200
    });
    Standalone {
        addr,
        shutdown,
        served: Some(served),
        runtime,
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(served) = self.served.take() {
            let _ = self.runtime.block_on(served);
        }
    }
}

#[test]
fn smuggling_attempts_reach_no_function_and_poison_no_pooled_connection() {
    let platform = platform("hostile-smuggling");
    // The standalone gateway on hyper only: every case on the path mecha up's gateway takes
    // only for some of them.
    let hyper_only = standalone(&platform, false);
    let cases = attacks();
    let mut failures = Vec::new();
    for (role, addr) in [
        ("mecha up's gateway", platform.mecha.gateway),
        ("a standalone gateway on hyper only", hyper_only.addr),
    ] {
        failures.extend(attack_all(addr, Some(HOST), &platform.log, &cases, role));
    }
    assert!(
        failures.is_empty(),
        "{} of {} attacks failed:\n{}",
        failures.len(),
        2 * cases.len(),
        failures.join("\n")
    );
    // Nothing reached the function but the innocents and the valid cases' own requests.
    let strays = hostile::strays(&platform.log);
    assert!(strays.is_empty(), "requests nobody meant: {strays:?}");
}

/// The duplicate-`Host` requests every role must refuse with 400.
const DUPLICATE_HOSTS: &[&str] = &[
    "GET /dup HTTP/1.1\r\nHost: rec.default.localhost\r\nHost: evil.default.localhost\r\n\r\n",
    "GET /dup HTTP/1.1\r\nHost: rec.default.localhost\r\nHost: rec.default.localhost\r\n\r\n",
    "GET /dup HTTP/1.1\r\nHost: evil.default.localhost\r\nhost: rec.default.localhost\r\n\r\n",
    "GET http://rec.default.localhost/dup HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
];

#[test]
fn a_duplicate_host_is_refused_on_every_role() {
    let platform = platform("hostile-host");
    let fast = standalone(&platform, true);
    let hyper_only = standalone(&platform, false);
    for (role, addr) in [
        ("mecha up's gateway", platform.mecha.gateway),
        ("a standalone gateway", fast.addr),
        ("a standalone gateway on hyper only", hyper_only.addr),
    ] {
        for head in DUPLICATE_HOSTS {
            let replies = hostile::exchange(addr, head.as_bytes());
            let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
            assert_eq!(statuses, [400], "{role}: {head:?}");
        }
        let path = format!("/after/{}", role.replace(' ', "-").replace('\'', ""));
        let reply = hostile::request(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
        );
        assert_eq!(reply.seen().map(|s| s.target), Some(path), "{role}");
    }
    let refused: Vec<_> = platform
        .log
        .entries()
        .into_iter()
        .filter(|s| s.target.contains("dup"))
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
}

#[test]
fn absolute_form_and_upgrade_targets_reach_the_function_in_origin_form() {
    let platform = platform("hostile-targets");
    let fast = standalone(&platform, true);
    for (role, addr) in [
        ("mecha up's gateway", platform.mecha.gateway),
        ("a standalone gateway", fast.addr),
    ] {
        let reply = hostile::request(
            addr,
            b"GET http://rec.default.localhost/abs?x=1 HTTP/1.1\r\nHost: other.default.localhost\r\n\r\n",
        );
        assert_eq!(reply.status, 200, "{role}: {reply:?}");
        let seen = reply.seen().expect("the function's answer");
        assert_eq!(seen.line, "GET /abs?x=1 HTTP/1.1", "{role}");
        assert_eq!(seen.all("host"), [HOST.as_bytes()], "{role}");

        for target in ["/ws", "http://rec.default.localhost/ws"] {
            let mut stream = TcpStream::connect(addr).expect("connect");
            let head = format!(
                "GET {target} HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            );
            let reply = hostile::send(&mut stream, head.as_bytes());
            assert_eq!(reply.status, 101, "{role} {target}: {reply:?}");
            assert_eq!(hostile::through_tunnel(&mut stream, b"ping"), b"ping");
            let seen = platform.log.last();
            assert_eq!(seen.line, "GET /ws HTTP/1.1", "{role} {target}");
            assert_eq!(seen.all("upgrade"), [b"websocket".as_slice()]);
            assert_eq!(seen.all("host"), [HOST.as_bytes()]);
        }
    }
}

#[test]
fn a_function_sees_the_runtime_contract_headers() {
    let platform = platform("hostile-contract");
    let fast = standalone(&platform, true);
    let hyper_only = standalone(&platform, false);
    for (role, addr) in [
        ("mecha up's gateway", platform.mecha.gateway),
        ("a standalone gateway", fast.addr),
        ("a standalone gateway on hyper only", hyper_only.addr),
    ] {
        // A client's own claims are not passed on: the gateway is where requests enter.
        let host = format!("{HOST}:{}", addr.port());
        let seen = hostile::with_user_headers(
            addr,
            &host,
            "/contract",
            &[
                ("X-Forwarded-For", "6.6.6.6"),
                ("X-Forwarded-Proto", "https"),
                ("Forwarded", "for=1.2.3.4;proto=https"),
                ("traceparent", hostile::TRACEPARENT),
                ("tracestate", hostile::TRACESTATE),
            ],
        );
        assert_eq!(seen.all("host"), [host.as_bytes()], "{role}");
        assert_eq!(
            seen.one("x-forwarded-for").as_deref(),
            Some("127.0.0.1"),
            "{role}"
        );
        assert_eq!(
            seen.one("x-forwarded-proto").as_deref(),
            Some("http"),
            "{role}"
        );
        assert_eq!(
            seen.one("forwarded"),
            Some(format!("for=127.0.0.1;proto=http;host=\"{host}\"")),
            "{role}"
        );
        assert_eq!(
            seen.one("traceparent").as_deref(),
            Some(hostile::TRACEPARENT),
            "{role}"
        );
        assert_eq!(
            seen.one("tracestate").as_deref(),
            Some(hostile::TRACESTATE),
            "{role}"
        );

        // Without a trace context the gateway starts one, a new one per request.
        let started: Vec<String> = (0..2)
            .map(|_| {
                let seen = hostile::with_user_headers(addr, HOST, "/untraced", &[]);
                assert_eq!(
                    seen.one("forwarded"),
                    Some(format!("for=127.0.0.1;proto=http;host={HOST}")),
                    "{role}"
                );
                let traceparent = seen.one("traceparent").expect("a started trace");
                hostile::assert_valid_traceparent(&traceparent);
                traceparent
            })
            .collect();
        assert_ne!(started[0], started[1], "{role}");
    }
}
