//! `mecha up` end to end: the real binary, real replica processes, real sockets on 127.0.0.1.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::Duration;

use rustix::process::Signal;
use support::{Mecha, Workdir, alive, echo_service, repo_root, wait_until};

#[test]
fn the_python_example_answers_through_the_gateway() {
    let example = repo_root().join("examples/hello-python");
    let mecha = Mecha::up(&[&example]);
    wait_until("the hello example to answer", || {
        mecha.get("hello.default.localhost", "/").status == 200
    });
    let response = mecha.get("hello.default.localhost:8080", "/");
    assert!(
        response
            .body
            .starts_with("Hello Python! (revision hello-00001"),
        "{response:?}"
    );
    assert!(mecha.stdout_contains("ready: default/hello (hello-00001)"));
    // The replica's own output comes back prefixed with [service/replica].
    wait_until("the request log line", || {
        mecha.stdout_contains("[hello/hello-00001-1] GET / -> 200")
    });
    let table = mecha.cli(&["get", "services"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("hello ") && l.contains("True")),
        "{table}"
    );
    assert!(table.contains(&format!(
        "http://hello.default.localhost:{}",
        mecha.gateway.port()
    )));
}

#[test]
fn the_rust_example_runs_two_replicas() {
    let example = repo_root().join("examples/hello-rust");
    // The replicas build with cargo: give them their own target directory so they never wait
    // on the lock of the build that runs this test.
    let target = repo_root().join("target/example-tests");
    let mecha = Mecha::up_with(
        &[&example],
        &[("CARGO_TARGET_DIR", target.to_str().unwrap())],
    );
    mecha.wait_ready("hello-rust", 2);
    let pids: BTreeSet<u32> = (0..20)
        .map(|_| mecha.get("hello-rust.default.localhost", "/"))
        .inspect(|r| assert!(r.body.starts_with("Hello Rust!"), "{r:?}"))
        .map(|r| {
            r.body
                .trim_end()
                .trim_end_matches(')')
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(pids.len(), 2, "both replicas should serve: {pids:?}");
}

#[test]
fn min_scale_two_runs_two_replicas_that_both_serve() {
    let dir = Workdir::new("min-scale");
    dir.write(
        "svc.yaml",
        &echo_service("pair", &[("min-scale", "2")], "", "red"),
    );
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("pair", 2);
    let served: BTreeSet<u32> = (0..40)
        .map(|_| mecha.get("pair.default.localhost", "/").echo().1)
        .collect();
    let pids: BTreeSet<u32> = mecha.pids("pair").into_iter().collect();
    assert_eq!(pids.len(), 2);
    assert_eq!(served, pids, "requests should reach both replicas");
}

#[test]
fn apply_makes_a_new_revision_that_takes_over() {
    let dir = Workdir::new("apply");
    let file = dir.write("svc.yaml", &echo_service("app", &[], "", "blue"));
    let mecha = Mecha::up(&[&file]);
    mecha.wait_ready("app", 1);
    let old_pid = mecha.get("app.default.localhost", "/").echo().1;
    assert_eq!(
        mecha.get("app.default.localhost", "/").echo().0,
        "app-00001"
    );

    dir.write("svc.yaml", &echo_service("app", &[], "", "green"));
    let output = mecha.cli(&["apply", "-f", file.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0], "service/default/app configured (revision app-00002)",
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("Service default/app: revision app-00002 ready after "),
        "{stdout}"
    );
    assert!(
        lines[2].trim().starts_with("http://app.default.localhost:"),
        "{stdout}"
    );
    // The old revision served until the new one was ready; `apply` returned once the new
    // one took over, so every request from now on reaches it.
    for _ in 0..10 {
        let (revision, _, color) = mecha.get("app.default.localhost", "/").echo();
        assert_eq!((revision.as_str(), color.as_str()), ("app-00002", "green"));
    }
    wait_until("the old replica to stop", || !alive(old_pid));
    // Applying the same file again changes nothing.
    let output = mecha.cli(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "service/default/app unchanged"
    );
}

#[test]
fn a_fifty_fifty_split_lands_within_tolerance_and_tags_pin_revisions() {
    let dir = Workdir::new("split");
    let v1 = echo_service("split", &[], "", "blue");
    let v2 = format!(
        "{}  traffic:\n    - revisionName: split-00001\n      percent: 50\n      tag: old\n    - latestRevision: true\n      percent: 50\n      tag: new\n",
        echo_service("split", &[], "", "green")
    );
    dir.write("svc.yaml", &format!("{v1}---\n{v2}"));
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("split", 2);
    let mut counts = BTreeMap::new();
    for _ in 0..400 {
        let (revision, _, _) = mecha.get("split.default.localhost", "/").echo();
        *counts.entry(revision).or_insert(0) += 1;
    }
    // Binomial(400, 0.5) has a standard deviation of 10: ±50 is five of them.
    assert_eq!(counts.len(), 2, "{counts:?}");
    for (revision, count) in &counts {
        assert!((150..=250).contains(count), "{revision}: {count} of 400");
    }
    for _ in 0..10 {
        assert_eq!(
            mecha.get("old-split.default.localhost", "/").echo().0,
            "split-00001"
        );
        assert_eq!(
            mecha.get("new-split.default.localhost", "/").echo().0,
            "split-00002"
        );
    }
}

#[test]
fn a_killed_replica_is_restarted() {
    let dir = Workdir::new("restart");
    dir.write("svc.yaml", &echo_service("phoenix", &[], "", "red"));
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("phoenix", 1);
    let pid = mecha.get("phoenix.default.localhost", "/").echo().1;
    let target = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(target, Signal::KILL).unwrap();
    wait_until("a new replica to answer", || {
        let response = mecha.get("phoenix.default.localhost", "/");
        response.status == 200 && response.echo().1 != pid
    });
    let services = mecha.services_json();
    let restarts = &services[0]["revisions"][0]["replicas"][0]["restarts"];
    assert_eq!(restarts.as_u64(), Some(1), "{services}");
}

#[test]
fn bad_input_is_refused_with_file_document_and_field() {
    let dir = Workdir::new("bad");
    let good = echo_service("good", &[], "", "red");
    let no_command = good.replace(
        "        - command: [python3, echo.py]\n",
        "        - image: x\n",
    );
    let unknown_field = good.replace("    spec:\n", "    spec:\n      volumes: []\n");
    let file = dir.write(
        "bad.yaml",
        &format!("{good}---\n{no_command}---\n{unknown_field}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\nkind: [\n"),
    );
    let output = std::process::Command::new(support::mecha_bin())
        .args([
            "up",
            file.to_str().unwrap(),
            "--port",
            "0",
            "--admin-port",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let shown = file.display();
    for expected in [
        format!(
            "error: {shown}: document 2 (Service default/good): spec.template.spec.containers[0].command: required in local mode"
        ),
        format!(
            "error: {shown}: document 3 (Service default/good): spec.template.spec.volumes: unknown or unsupported field"
        ),
        format!(
            "error: {shown}: document 4 (Deployment default/d): kind: unsupported kind Deployment (apps/v1)"
        ),
        format!("error: {shown}: document 5: line "),
        "4 errors; nothing was changed".to_string(),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    // Nothing started: the good service in the same file is not running either.
    assert!(String::from_utf8_lossy(&output.stdout).is_empty());
}

#[test]
fn a_bad_apply_changes_nothing_and_delete_stops_the_service() {
    let dir = Workdir::new("apply-bad");
    let file = dir.write("svc.yaml", &echo_service("keep", &[], "", "red"));
    let mecha = Mecha::up(&[&file]);
    mecha.wait_ready("keep", 1);
    let pid = mecha.get("keep.default.localhost", "/").echo().1;
    let bad = dir.write(
        "bad.yaml",
        &format!(
            "{}  traffic:\n    - revisionName: keep-00042\n      percent: 100\n",
            echo_service("keep", &[], "", "blue")
        ),
    );
    let output = mecha.cli(&["apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "document 1 (Service default/keep): spec.traffic[0].revisionName: revision \"keep-00042\" does not exist"
        ),
        "{stderr}"
    );
    assert_eq!(
        mecha.get("keep.default.localhost", "/").echo(),
        (String::from("keep-00001"), pid, String::from("red"))
    );

    let logs = mecha.cli(&["logs", "keep"]);
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("[keep/keep-00001-1] echo up"),
        "{logs:?}"
    );
    let missing = mecha.cli(&["logs", "nope"]);
    assert_eq!(missing.status.code(), Some(1));

    let output = mecha.cli(&["delete", "-f", file.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "service/default/keep deleted"
    );
    wait_until("the replica to stop", || !alive(pid));
    assert_eq!(mecha.get("keep.default.localhost", "/").status, 404);
}

#[test]
fn routing_errors_timeouts_h2c_and_upgrades() {
    let dir = Workdir::new("gateway");
    dir.write(
        "svc.yaml",
        &echo_service("edge", &[], "      timeoutSeconds: 1\n", "red"),
    );
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("edge", 1);

    let response = mecha.get("nope.default.localhost", "/");
    assert_eq!(response.status, 404);
    assert!(
        response.body.contains("\"nope.default.localhost\""),
        "{response:?}"
    );

    // The replica sees the original host and who called.
    let response = mecha.get("edge.default.localhost:1234", "/");
    assert_eq!(
        response.header("x-seen-host"),
        Some("edge.default.localhost:1234")
    );
    assert_eq!(response.header("x-seen-forwarded-for"), Some("127.0.0.1"));

    // timeoutSeconds: 1 → a 3 s request gets 504 naming the service.
    let response = mecha.get("edge.default.localhost", "/sleep?ms=3000");
    assert_eq!(response.status, 504, "{response:?}");
    assert!(
        response
            .body
            .contains("service default/edge did not answer within its timeout of 1s")
    );

    // An upgraded connection is spliced through to the replica.
    let mut stream = std::net::TcpStream::connect(mecha.gateway).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET / HTTP/1.1\r\nHost: edge.default.localhost\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream.write_all(b"ping through the gateway").unwrap();
    let mut echoed = [0u8; 24];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"ping through the gateway");

    // HTTP/2 with prior knowledge (h2c) reaches an HTTP/1.1 replica.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (version, status, body) = runtime.block_on(async {
        use http_body_util::{BodyExt, Empty};
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let stream = tokio::net::TcpStream::connect(mecha.gateway).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let uri = format!("http://edge.default.localhost:{}/", mecha.gateway.port());
        let request = hyper::Request::get(uri)
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let version = response.version();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (version, status, String::from_utf8_lossy(&body).to_string())
    });
    assert_eq!((version, status), (hyper::Version::HTTP_2, 200));
    assert!(body.starts_with("edge-00001 "), "{body}");
}

#[test]
fn ctrl_c_stops_every_replica() {
    let dir = Workdir::new("ctrl-c");
    dir.write(
        "svc.yaml",
        &echo_service("stop", &[("min-scale", "2")], "", "red"),
    );
    let mut mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("stop", 2);
    let pids = mecha.pids("stop");
    assert_eq!(pids.len(), 2);
    let status = mecha.interrupt();
    assert!(status.success(), "{status:?}");
    assert!(mecha.stdout_contains("Stopped."));
    for pid in pids {
        assert!(!alive(pid), "replica {pid} outlived mecha");
    }
}

#[test]
fn sigkill_of_mecha_takes_the_replicas_with_it() {
    let dir = Workdir::new("sigkill");
    dir.write(
        "svc.yaml",
        &echo_service("orphan", &[("min-scale", "2")], "", "red"),
    );
    let mut mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("orphan", 2);
    let pids = mecha.pids("orphan");
    mecha.signal(Signal::KILL);
    mecha.wait_exit(Duration::from_secs(5));
    wait_until("the replicas to die with mecha", || {
        pids.iter().all(|p| !alive(*p))
    });
}

#[test]
fn a_revision_that_never_becomes_ready_answers_504_naming_the_service() {
    let dir = Workdir::new("never-ready");
    let yaml = echo_service("sleepy", &[], "      timeoutSeconds: 1\n", "red").replace(
        "[python3, echo.py]",
        "[python3, -c, \"import time; time.sleep(600)\"]",
    );
    dir.write("svc.yaml", &yaml);
    let mecha = Mecha::up(&[&dir.path]);
    let started = std::time::Instant::now();
    let response = mecha.get("sleepy.default.localhost", "/");
    assert_eq!(response.status, 504, "{response:?}");
    assert!(
        response.body.contains(
            "no ready replica of service default/sleepy (revision sleepy-00001) within 1s"
        ),
        "{response:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
fn response_bodies_stream_through_the_gateway() {
    let dir = Workdir::new("stream");
    dir.write("svc.yaml", &echo_service("stream", &[], "", "red"));
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("stream", 1);
    // The function sends "first", then waits for this file before sending "last": the test
    // can only create it after reading "first", so a buffering gateway would never get there.
    let gate = dir.path.join("gate");
    let mut stream = std::net::TcpStream::connect(mecha.gateway).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    write!(
        stream,
        "GET /stream?wait={} HTTP/1.1\r\nHost: stream.default.localhost\r\nConnection: close\r\n\r\n",
        gate.display()
    )
    .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&received).contains("first") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended before the first chunk");
        received.extend_from_slice(&buf[..n]);
    }
    assert!(!String::from_utf8_lossy(&received).contains("last"));
    std::fs::write(&gate, "go").unwrap();
    stream.read_to_end(&mut received).unwrap();
    assert!(String::from_utf8_lossy(&received).contains("last"));
}

/// `(ppid, pgrp)` of a live process, from `/proc/PID/stat`.
fn parent_and_group(pid: u32) -> Option<(u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(1);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

/// Live processes in process group `group`.
fn group_members(group: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| alive(pid) && parent_and_group(pid).is_some_and(|(_, g)| g == group))
        .collect()
}

#[test]
fn no_process_a_replica_started_outlives_a_sigkilled_mecha() {
    let dir = Workdir::new("grandchild");
    // A shell that does not exec: Python is its child, and Python starts a grandchild that
    // leaves the process group and the session (`setsid`), as a daemon would.
    dir.write(
        "svc.yaml",
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: tree\nspec:\n  template:\n    spec:\n      containers:\n        - command: [sh, -c, \"sleep 600 & echo $! > sleeper.pid; python3 -c 'import os,subprocess; subprocess.Popen([\\\"sleep\\\", \\\"601\\\"], start_new_session=True); open(\\\"python.pid\\\", \\\"w\\\").write(str(os.getpid())); exec(open(\\\"echo.py\\\").read())'; echo after\"]\n",
    );
    let mut mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("tree", 1);
    let read_pid = |name: &str| -> u32 {
        let path = dir.path.join(name);
        wait_until(&format!("{name} written"), || {
            std::fs::read_to_string(&path).is_ok_and(|s| !s.trim().is_empty())
        });
        std::fs::read_to_string(&path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let python = read_pid("python.pid");
    let sleeper = read_pid("sleeper.pid");
    let (_, group) = parent_and_group(python).expect("python runs");
    let members = group_members(group);
    assert!(members.len() >= 3, "guard, sh, python, sleep: {members:?}");
    // The daemon-like grandchild: the sleep 601 child of python.
    let daemon = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| parent_and_group(pid).is_some_and(|(parent, _)| parent == python))
        .expect("python's child");

    mecha.signal(Signal::KILL);
    mecha.wait_exit(Duration::from_secs(5));
    wait_until("every process of the replica to die with mecha", || {
        !alive(python) && !alive(sleeper) && !alive(daemon) && group_members(group).is_empty()
    });
}

#[test]
fn ten_thousand_env_vars_all_arrive_and_start_about_as_fast_as_a_hundred() {
    // The interpreter itself, not a shim: pyenv's `python3` is a bash script, and bash takes
    // time quadratic in the size of its environment (0.5 s per bash for 10,000 variables),
    // which would measure bash, not Mecha.
    let python = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    let python = String::from_utf8(python.stdout).unwrap().trim().to_string();
    let dir = Workdir::new("env");
    dir.write(
        "env.py",
        "import http.server, os\nn = int(os.environ['COUNT'])\nok = all(os.environ.get(f'V{i}') == f'x{i}' for i in range(n))\nbody = f'{n} {ok}'.encode()\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_GET(self):\n        self.send_response(200)\n        self.send_header('Content-Length', str(len(body)))\n        self.end_headers()\n        self.wfile.write(body)\n    def log_message(self, *a):\n        pass\nhttp.server.HTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n",
    );
    let service = |n: usize| {
        let vars: String = (0..n)
            .map(|i| format!("            - {{name: V{i}, value: x{i}}}\n"))
            .collect();
        format!(
            "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: env{n}\nspec:\n  template:\n    spec:\n      containers:\n        - command: [\"{python}\", env.py]\n          env:\n            - {{name: COUNT, value: \"{n}\"}}\n{vars}"
        )
    };
    dir.write("few.yaml", &service(100));
    dir.write("many.yaml", &service(10_000));
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("env100", 1);
    mecha.wait_ready("env10000", 1);
    let body = mecha.get("env10000.default.localhost", "/").body;
    assert_eq!(body, "10000 True", "every variable arrives with its value");
    assert_eq!(mecha.get("env100.default.localhost", "/").body, "100 True");
    // Both start together; "ready: … after N ms" is printed for each.
    let after = |service: &str| -> u64 {
        let lines = mecha.stdout.lock().unwrap();
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("ready: default/{service} ")))
            .unwrap_or_else(|| panic!("no ready line for {service}: {lines:?}"));
        let ms = line.rsplit("after ").next().unwrap();
        ms.trim_end_matches(" ms").parse().unwrap()
    };
    let (few, many) = (after("env100"), after("env10000"));
    eprintln!("env: 100 variables ready after {few} ms, 10,000 after {many} ms");
    // Twice as long, plus room for a busy two-core machine; the quadratic step took 13 s.
    assert!(
        many <= 2 * few + 1_000,
        "10,000 variables took {many} ms against {few} ms for 100"
    );
}

#[test]
fn the_gateway_starts_a_trace_and_logs_each_request_with_its_trace_id() {
    let dir = Workdir::new("trace");
    let path = dir.write("svc.yaml", &echo_service("traced", &[], "", "blue"));
    let mecha = Mecha::up_with(&[&path], &[("MECHA_LOG", "activator_sidecar=debug")]);
    let host = "traced.default.localhost";
    wait_until("traced to answer", || mecha.get(host, "/").status == 200);

    // A request without trace context gets one: valid W3C format, logged with its id.
    let started = mecha.get(host, "/");
    let traceparent = started.header("X-Seen-Traceparent").unwrap_or_default();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && parts[1].len() == 32
            && parts[2].len() == 16
            && parts[1].bytes().all(|b| b.is_ascii_hexdigit())
            && parts[1] != "0".repeat(32),
        "{traceparent:?}"
    );
    wait_until("the started trace id in the log", || {
        mecha.log_contains(&[parts[1]])
    });

    // A request that carries one keeps it, on the fast path and on hyper's path (HTTP/1.0).
    for (version, trace) in [
        ("HTTP/1.1", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("HTTP/1.0", "0af7651916cd43dd8448eb211c80319c"),
    ] {
        let mut stream = std::net::TcpStream::connect(mecha.gateway).expect("connect");
        write!(
            stream,
            "GET / {version}\r\nHost: {host}\r\ntraceparent: 00-{trace}-00f067aa0ba902b7-01\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        assert!(
            response.to_ascii_lowercase().contains(&format!(
                "x-seen-traceparent: 00-{trace}-00f067aa0ba902b7-01"
            )),
            "{response}"
        );
        wait_until("the trace id in the log", || mecha.log_contains(&[trace]));
    }
}
