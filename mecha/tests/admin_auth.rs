//! The admin API's credential and `Host` rule against the real `mecha up`, and the CLI finding
//! the credential on its own.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use support::{FAST_CONFIG, Mecha, Workdir, mecha_bin, request_with, wait_until};

/// A Service whose replica would leave `marker` behind: proof that its command ran.
fn marker_service(name: &str) -> String {
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  template:\n    spec:\n      containers:\n        - command: [sh, -c, \"touch {name}.ran; exec python3 ../echo.py\"]\n"
    )
}

/// `mecha ARGS` run in `dir` with nothing but the admin address (the port is picked at random
/// in tests): no --state-dir, no --token, no other variable.
fn cli_in(dir: &Path, mecha: &Mecha, args: &[&str]) -> Output {
    Command::new(mecha_bin())
        .args(args)
        .current_dir(dir)
        .env("MECHA_ADMIN_ADDR", mecha.admin.to_string())
        .env_remove("MECHA_STATE_DIR")
        .env_remove("MECHA_ADMIN_TOKEN")
        .output()
        .expect("run mecha")
}

#[test]
fn without_the_credential_or_from_a_foreign_host_nothing_is_done() {
    let dir = Workdir::new("admin-auth");
    dir.write("config.yaml", FAST_CONFIG);
    let mecha = Mecha::start_in(&dir.path);
    // Written after the start, so only an apply can run it.
    let later = dir.path.join("later");
    std::fs::create_dir_all(&later).unwrap();
    let file = later.join("evil.yaml");
    std::fs::write(&file, marker_service("evil")).unwrap();
    let marker = later.join("evil.ran");
    let files = serde_json::json!({"files": [{
        "path": file.to_str().unwrap(),
        "content": marker_service("evil"),
    }]})
    .to_string();

    // The credential is private to this user and reused by every command.
    let token_path = dir.path.join(".mecha/admin-token");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&token_path), 0o600);
    assert_eq!(mode(&dir.path.join(".mecha")), 0o700);
    let token = mecha.token();
    assert_eq!(token.len(), 64);
    let bearer = format!("Bearer {token}");
    let wrong = format!("Bearer {}", "0".repeat(64));
    let nip = format!("127.0.0.1.nip.io:{}", mecha.admin.port());

    let stat = r#"[{"revision":"evil-00001","replica":"pod-a","concurrency":100,"requests":1,"seconds":1}]"#;
    let poke = r#"[{"revision":"evil-00001","waiting":5}]"#;
    let endpoints: &[(&str, &str, &str)] = &[
        ("POST", "/api/v1/apply", &files),
        ("POST", "/api/v1/delete", &files),
        ("GET", "/api/v1/services", ""),
        ("GET", "/api/v1/brokers", ""),
        ("GET", "/api/v1/triggers", ""),
        ("GET", "/api/v1/namespaces/default/services/evil/logs", ""),
        ("GET", "/api/v1/watch", ""),
        ("GET", "/api/v1/eventing/watch", ""),
        ("POST", "/api/v1/stats", stat),
        ("POST", "/api/v1/pokes", poke),
    ];
    let json = ("Content-Type", "application/json");
    for (method, path, body) in endpoints {
        let call = |host: &str, headers: &[(&str, &str)]| {
            request_with(mecha.admin, method, host, path, headers, body)
        };
        let response = call("localhost", &[json]);
        assert_eq!(response.status, 401, "{method} {path}: {response:?}");
        assert!(
            response.body.starts_with("missing credential: ")
                && response.body.contains(".mecha/admin-token"),
            "{method} {path}: {response:?}"
        );
        assert_eq!(
            response.header("www-authenticate"),
            Some("Bearer realm=\"mecha\"")
        );
        let response = call("127.0.0.1", &[json, ("Authorization", &wrong)]);
        assert_eq!(response.status, 401, "{method} {path}: {response:?}");
        assert!(
            response.body.starts_with("wrong credential"),
            "{response:?}"
        );
        for host in ["evil.example", nip.as_str()] {
            let response = call(host, &[json, ("Authorization", &bearer)]);
            assert_eq!(
                response.status, 403,
                "{method} {path} Host {host}: {response:?}"
            );
            assert!(
                response.body.contains("not a loopback name"),
                "{response:?}"
            );
        }
    }
    // HTTP/1.0 without a Host cannot show that it was meant for this machine.
    let mut stream = std::net::TcpStream::connect(mecha.admin).unwrap();
    write!(
        stream,
        "POST /api/v1/apply HTTP/1.0\r\nAuthorization: {bearer}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{files}",
        files.len()
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    assert!(
        raw.starts_with("HTTP/1.0 403") || raw.starts_with("HTTP/1.1 403"),
        "{raw}"
    );

    // Health and metrics stay open to local callers, but not to foreign names.
    wait_until("/ready", || {
        support::http(mecha.admin, "localhost", "/ready").status == 200
    });
    assert_eq!(support::http(mecha.admin, "127.0.0.1", "/live").status, 200);
    let metrics = support::http(mecha.admin, "[::1]", "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains("mecha_admin_refused_requests_total{reason=\"credential\"} 20"),
        "{}",
        metrics.body
    );
    assert_eq!(
        support::http(mecha.admin, "evil.example", "/metrics").status,
        403
    );

    // Nothing was applied: no service, and its command never ran.
    let listed = cli_in(&dir.path, &mecha, &["get", "services", "-o", "json"]);
    assert!(listed.status.success(), "{listed:?}");
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "[]");
    assert!(!marker.exists());

    // The CLI, with no flags, in the directory of `mecha up`, can do all of it.
    let applied = cli_in(&dir.path, &mecha, &["apply", "-f", "later/evil.yaml"]);
    assert!(applied.status.success(), "{applied:?}");
    wait_until("the applied command to run", || marker.exists());
    wait_until("the service to be ready", || {
        let table = cli_in(&dir.path, &mecha, &["get", "services"]);
        String::from_utf8_lossy(&table.stdout)
            .lines()
            .any(|l| l.starts_with("evil "))
            && mecha.get("evil.default.localhost", "/").status == 200
    });
    let logs = cli_in(&dir.path, &mecha, &["logs", "evil"]);
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("[evil/evil-00001-1] echo up"),
        "{logs:?}"
    );
    for what in ["brokers", "triggers"] {
        let output = cli_in(&dir.path, &mecha, &["get", what]);
        assert!(output.status.success(), "{output:?}");
    }
    let deleted = cli_in(&dir.path, &mecha, &["delete", "-f", "later/evil.yaml"]);
    assert!(deleted.status.success(), "{deleted:?}");
}

#[test]
fn the_cli_says_where_the_credential_is_missing_or_wrong() {
    let dir = Workdir::new("admin-auth-cli");
    dir.write("config.yaml", FAST_CONFIG);
    let mecha = Mecha::start_in(&dir.path);
    let elsewhere = Workdir::new("admin-auth-elsewhere");

    let output = cli_in(&elsewhere.path, &mecha, &["get", "services"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("error: no admin credential found at .mecha/admin-token")
            && stderr.contains("is `mecha up` running from this directory? pass --state-dir"),
        "{stderr}"
    );

    // Pointed at the state directory, or given the token, it works from anywhere.
    let state = dir.path.join(".mecha");
    let output = cli_in(
        &elsewhere.path,
        &mecha,
        &["get", "services", "--state-dir", state.to_str().unwrap()],
    );
    assert!(output.status.success(), "{output:?}");
    let output = Command::new(mecha_bin())
        .args(["get", "brokers"])
        .current_dir(&elsewhere.path)
        .env("MECHA_ADMIN_ADDR", mecha.admin.to_string())
        .env("MECHA_ADMIN_TOKEN", mecha.token())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");

    let output = Command::new(mecha_bin())
        .args([
            "get",
            "services",
            "--token",
            "not-the-token-0123456789abcdef01234567",
        ])
        .current_dir(&dir.path)
        .env("MECHA_ADMIN_ADDR", mecha.admin.to_string())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refused the request (401 Unauthorized): wrong credential"),
        "{stderr}"
    );
}

#[test]
fn a_restart_keeps_the_credential_and_an_exposed_one_stops_the_start() {
    let dir = Workdir::new("admin-auth-restart");
    dir.write("config.yaml", FAST_CONFIG);
    let mut mecha = Mecha::start_in(&dir.path);
    wait_until("mecha up to start", || {
        mecha.stdout_contains("Mecha is running")
    });
    let first = mecha.token();
    assert_eq!(mecha.interrupt().code(), Some(0));
    // The token file is there from the first run: wait for the second to start before
    // interrupting it (a SIGINT before its handlers are installed would just kill it).
    let mut mecha = Mecha::start_in(&dir.path);
    wait_until("mecha up to start again", || {
        mecha.stdout_contains("Mecha is running")
    });
    assert_eq!(mecha.token(), first);
    assert_eq!(mecha.interrupt().code(), Some(0));

    // A token others could read may have leaked: `mecha up` will not serve with it.
    let token_path = dir.path.join(".mecha/admin-token");
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut child = Command::new(mecha_bin())
        .args(["up", ".", "--port", "0", "--admin-port", "0"])
        .current_dir(&dir.path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut exited = None;
    wait_until("mecha up to refuse to start", || {
        exited = child.try_wait().unwrap();
        exited.is_some()
    });
    assert_eq!(exited.and_then(|s| s.code()), Some(1));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("can be read by other users (mode 0644)")
            && stderr.contains("delete it and restart `mecha up`"),
        "{stderr}"
    );
}
