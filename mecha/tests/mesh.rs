//! The mesh from a function's side: the outbound role as its `HTTP_PROXY`, driven by curl the
//! way a function's HTTP client uses it — calls to other functions go straight to a replica
//! (waking one at zero), calls for other hosts pass through byte for byte, and the proxy
//! refuses to call itself.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;

use mecha_common::Shutdown;
use mecha_common::auth::AdminToken;
use support::{FAST_CONFIG, Mecha, Workdir, echo_service, start_outbound, wait_until};

/// `curl` with `proxy` as its `http_proxy` (the variable a meshed function gets): status line
/// code and body.
fn curl_via(proxy: SocketAddr, url: &str, extra: &[&str]) -> (u16, String) {
    let output = Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "30"])
        .args(extra)
        .arg(url)
        .env_clear()
        .env("http_proxy", format!("http://{proxy}"))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').expect("a status code");
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A plain HTTP origin outside Mecha on 127.0.0.1:0 that answers one request with what it
/// received, verbatim, as its body.
fn mirror() -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        // Head, then the body its Content-Length announces.
        loop {
            let n = stream.read(&mut buffer).expect("read");
            assert!(n > 0, "the request ended early: {seen:?}");
            seen.extend_from_slice(&buffer[..n]);
            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().expect("length"));
                if seen.len() >= end + 4 + length {
                    break;
                }
            }
        }
        let reply = format!(
            "HTTP/1.1 201 Created\r\ncontent-length: {}\r\nx-origin: mirror\r\nconnection: close\r\n\r\n",
            seen.len()
        );
        stream.write_all(reply.as_bytes()).expect("write");
        stream.write_all(&seen).expect("write");
        seen
    });
    (addr, served)
}

#[test]
fn a_meshed_function_calls_functions_directly_and_other_hosts_through() {
    let dir = Workdir::new("mesh");
    dir.write("config.yaml", FAST_CONFIG);
    let cold = echo_service("callee", &[("initial-scale", "0")], "", "blue");
    dir.write("svc.yaml", &cold);
    let mecha = Mecha::up(&[&dir.path]);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let shutdown = Shutdown::new();
    let token = AdminToken::parse(&mecha.token()).expect("token");
    for fast_path in [true, false] {
        let (proxy, health, _served) =
            start_outbound(&runtime, &mecha, Some(token.clone()), fast_path, &shutdown);
        wait_until("the outbound role's first routes", || health.is_ready());

        // A function at zero, called by its URL through the proxy: held, woken, answered.
        let (status, body) = curl_via(proxy, "http://callee.default.localhost/hi", &[]);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("callee-00001"), "{body}");

        // Another host: passed on as sent — method, path, query, headers, body bytes.
        let (origin, seen) = mirror();
        let url = format!("http://localhost:{}/p%20q/r?s=1&t=%2F", origin.port());
        let payload = "caf\u{e9} \u{1f980} {\"a\": 1,  \"b\": [1, 2]}";
        let (status, body) = curl_via(
            proxy,
            &url,
            &[
                "-X",
                "PUT",
                "-H",
                "X-Custom: one, two",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                payload,
            ],
        );
        let seen = String::from_utf8(seen.join().expect("the origin answered")).expect("utf-8");
        assert_eq!(status, 201, "{body}");
        assert!(
            seen.starts_with("PUT /p%20q/r?s=1&t=%2F HTTP/1.1\r\n"),
            "origin-form target, as sent: {seen}"
        );
        let lower = seen.to_ascii_lowercase();
        assert!(
            lower.contains(&format!("\r\nhost: localhost:{}\r\n", origin.port())),
            "{seen}"
        );
        assert!(lower.contains("\r\nx-custom: one, two\r\n"), "{seen}");
        assert!(seen.ends_with(&format!("\r\n\r\n{payload}")), "{seen}");
        assert_eq!(body, seen, "the origin's answer comes back byte for byte");

        // The proxy itself, by any of its names: refused, not looped.
        for url in [
            format!("http://127.0.0.1:{}/", proxy.port()),
            format!("http://localhost:{}/", proxy.port()),
            format!("http://0.0.0.0:{}/", proxy.port()),
            format!("http://[::ffff:127.0.0.1]:{}/", proxy.port()),
            format!("http://[::ffff:0.0.0.0]:{}/", proxy.port()),
        ] {
            let (status, body) = curl_via(proxy, &url, &[]);
            assert_eq!(status, 508, "{url}: {body}");
            assert!(body.contains("this proxy itself"), "{body}");
        }
        // A port that is no port is refused, not read as 80.
        for authority in ["127.0.0.1:99999", "127.0.0.1:", "127.0.0.1:0"] {
            let mut stream = std::net::TcpStream::connect(proxy).expect("connect");
            write!(
                stream,
                "GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
            )
            .expect("write");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).expect("read");
            assert!(answer.starts_with("HTTP/1.1 400"), "{authority}: {answer}");
        }
        // A name that does not resolve, and nobody listening: 502 naming the host.
        let (status, body) = curl_via(proxy, "http://no-such-host.invalid/", &[]);
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("no-such-host.invalid"), "{body}");
        let closed = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let (status, body) = curl_via(proxy, &format!("http://{closed}/"), &[]);
        assert_eq!(status, 502, "{body}");
        assert!(body.contains(&closed.to_string()), "{body}");
    }

    // The gateway role never passes through: it would be an open proxy.
    let (gateway, health, _served) =
        support::start_gateway(&runtime, &mecha, Some(token), true, &shutdown);
    wait_until("the gateway's first routes", || health.is_ready());
    let (status, body) = curl_via(gateway, "http://example.org/", &[]);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no service answers on host"), "{body}");
    shutdown.trigger();
}

/// A function that calls `callee` at its URL with a plain HTTP client (urllib reads
/// `http_proxy`), and answers with what it got and the proxy it was given.
const CALLER: &str = r#"
import http.server, os, urllib.request
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            got = urllib.request.urlopen("http://callee.default.localhost" + self.path, timeout=30).read()
        except Exception as e:
            got = ("error: %r" % e).encode()
        body = b"proxy=" + os.environ.get("http_proxy", "").encode() + b"\n" + got
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

#[test]
fn locally_a_meshed_function_reaches_others_by_url_through_mecha_ups_mesh_proxy() {
    let dir = Workdir::new("mesh-local");
    dir.write("config.yaml", FAST_CONFIG);
    dir.write("caller.py", CALLER);
    let callee = echo_service("callee", &[("initial-scale", "0")], "", "blue");
    let caller = |name: &str, mesh: &str| {
        format!(
            "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  template:\n    metadata:\n      annotations:\n        mecha.dev/mesh: \"{mesh}\"\n    spec:\n      containers:\n        - command: [python3, caller.py]\n"
        )
    };
    dir.write(
        "svc.yaml",
        &format!(
            "{callee}---\n{}---\n{}",
            caller("meshed", "true"),
            caller("plain", "false")
        ),
    );
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("meshed", 1);

    // The callee is at zero: the call through the mesh proxy wakes it.
    let response = support::http(mecha.gateway, "meshed.default.localhost", "/x?y=1");
    assert_eq!(response.status, 200, "{response:?}");
    let (proxy, got) = response.body.split_once('\n').expect("two parts");
    let proxy = proxy.strip_prefix("proxy=http://127.0.0.1:").expect(proxy);
    assert!(
        proxy
            .parse::<u16>()
            .is_ok_and(|p| p != mecha.gateway.port()),
        "{proxy}"
    );
    assert!(got.contains("callee-00001"), "{got}");

    // Without the annotation there is no proxy, and the URL leads nowhere.
    mecha.wait_ready("plain", 1);
    let response = support::http(mecha.gateway, "plain.default.localhost", "/");
    assert_eq!(response.status, 200, "{response:?}");
    assert!(response.body.starts_with("proxy=\n"), "{}", response.body);
    assert!(response.body.contains("error:"), "{}", response.body);

    // A bad value is a load error naming the field.
    let bad = dir.write("bad.yaml", &caller("bad", "yes"));
    let stderr = support::refused_up(&bad, &dir.path.join("bad-state"));
    assert!(
        stderr.contains("spec.template.metadata.annotations[\"mecha.dev/mesh\"]"),
        "{stderr}"
    );
    assert!(
        stderr.contains("\"yes\" is not \"true\" or \"false\""),
        "{stderr}"
    );
    // A meshed container's own proxy settings would be lost or would undo the mesh: refused.
    let own = caller("own", "true").replace(
        "        - command: [python3, caller.py]\n",
        "        - command: [python3, caller.py]\n          env:\n            - name: http_proxy\n              value: http://10.0.0.1:3128\n            - name: NO_PROXY\n              value: \"a.example, *\"\n",
    );
    let own = dir.write("own.yaml", &own);
    let stderr = support::refused_up(&own, &dir.path.join("own-state"));
    assert!(
        stderr.contains("spec.template.spec.containers[0].env[0].name")
            && stderr.contains("http_proxy is set by the mesh"),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.template.spec.containers[0].env[1].value"),
        "{stderr}"
    );
}
