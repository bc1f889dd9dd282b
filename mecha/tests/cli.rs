//! The CLI as a user who knows `kn` and `kubectl` drives it: `apply` waits for the new
//! revision, a failing revision ends the wait with its reason and output, `logs` filters,
//! traffic adds up.

mod support;

use std::time::Instant;

use support::{Mecha, Workdir, echo_service};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A Service whose process prints a line and exits 7 at once, every time.
fn crashing_service(name: &str) -> String {
    format!(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  template:\n    spec:\n      containers:\n        - command: [sh, -c, \"echo cannot open the database; exit 7\"]\n"
    )
}

#[test]
fn apply_ends_the_wait_with_a_failing_revisions_reason_and_output() {
    let dir = Workdir::new("cli-crash");
    let good = dir.write("svc.yaml", &echo_service("crashy", &[], "", "blue"));
    let mecha = Mecha::up(&[&good]);
    mecha.wait_ready("crashy", 1);

    let bad = dir.write("bad.yaml", &crashing_service("crashy"));
    let started = Instant::now();
    let output = mecha.cli(&["apply", "-f", bad.to_str().unwrap(), "--timeout", "120s"]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("service/default/crashy configured (revision crashy-00002)"),
        "{stdout}"
    );
    assert!(
        stderr.contains("error: Service default/crashy: revision crashy-00002 failed: CrashLoop: replica crashy-00002-1 ended 3 times in a row, each within 60s of starting, last: exit status: 7"),
        "{stderr}"
    );
    // The last output of that revision's replicas, and only of that revision.
    assert!(
        stderr.contains("[crashy/crashy-00002-1] cannot open the database"),
        "{stderr}"
    );
    assert!(
        stderr.contains("mecha: process ended (exit status: 7)"),
        "{stderr}"
    );
    assert!(!stderr.contains("crashy-00001"), "{stderr}");
    // It failed on the crash loop, long before the timeout.
    assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());
    // The old revision still serves.
    assert_eq!(
        mecha.get("crashy.default.localhost", "/").echo().0,
        "crashy-00001"
    );

    // `logs` filters by revision and count, and stamps lines when asked.
    let logs = mecha.cli(&[
        "logs",
        "crashy",
        "--revision",
        "crashy-00002",
        "--tail",
        "2",
        "--timestamps",
    ]);
    assert!(logs.status.success(), "{logs:?}");
    let lines: Vec<String> = text(&logs.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        let (stamp, rest) = line.split_once(' ').expect("a timestamp, then the line");
        assert!(
            stamp.parse::<jiff::Timestamp>().is_ok(),
            "{stamp:?} is not RFC 3339"
        );
        assert!(rest.starts_with("[crashy/crashy-00002-"), "{line}");
    }
    let old = text(
        &mecha
            .cli(&["logs", "crashy", "--revision", "crashy-00001"])
            .stdout,
    );
    assert!(old.contains("[crashy/crashy-00001-1] echo up"), "{old}");
    assert!(!old.contains("crashy-00002"), "{old}");
    let recent = text(&mecha.cli(&["logs", "crashy", "--since", "1h"]).stdout);
    assert!(recent.contains("echo up"), "{recent}");

    // --no-wait returns with the outcome only.
    let v3 = dir.write("v3.yaml", &echo_service("crashy", &[], "", "green"));
    let output = mecha.cli(&["apply", "-f", v3.to_str().unwrap(), "--no-wait"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        text(&output.stdout).trim(),
        "service/default/crashy configured (revision crashy-00003)"
    );
}

#[test]
fn tagged_traffic_is_listed_once_and_adds_up_to_one_hundred() {
    let dir = Workdir::new("cli-traffic");
    let v1 = echo_service("split", &[], "", "blue");
    let v2 = format!(
        "{}  traffic:\n    - revisionName: split-00001\n      percent: 50\n      tag: old\n    - latestRevision: true\n      percent: 50\n      tag: new\n",
        echo_service("split", &[], "", "green")
    );
    dir.write("svc.yaml", &format!("{v1}---\n{v2}"));
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("split", 2);
    let services = mecha.services_json();
    let traffic = services[0]["traffic"].as_array().expect("traffic");
    assert_eq!(traffic.len(), 2, "{traffic:?}");
    let total: u64 = traffic.iter().map(|t| t["percent"].as_u64().unwrap()).sum();
    assert_eq!(total, 100, "{traffic:?}");
    let by_tag = |tag: &str| {
        traffic
            .iter()
            .find(|t| t["tag"] == tag)
            .unwrap_or_else(|| panic!("no {tag} in {traffic:?}"))
    };
    assert_eq!(by_tag("old")["revision"], "split-00001");
    assert_eq!(by_tag("new")["revision"], "split-00002");
    assert_eq!(by_tag("new")["latestRevision"], true);
    let revisions = services[0]["revisions"].as_array().expect("revisions");
    for revision in revisions {
        assert_eq!(revision["traffic"], 50, "{revision}");
        assert_eq!(revision["ready"], true, "{revision}");
        assert!(revision["created"].as_str().is_some(), "{revision}");
    }
}

/// `mecha CLI ARGS` with only the state directory: the client finds the admin address there.
fn cli_with_state_dir(mecha: &Mecha, args: &[&str]) -> std::process::Output {
    std::process::Command::new(support::mecha_bin())
        .args(args)
        .env_remove("MECHA_ADMIN_ADDR")
        .env_remove("MECHA_ADMIN_TOKEN")
        .env("MECHA_STATE_DIR", mecha.state_dir())
        .output()
        .expect("run mecha")
}

#[test]
fn get_describe_delete_and_version_work_as_kubectl_and_kn_users_expect() {
    let dir = Workdir::new("cli-kubectl");
    let other = echo_service("elsewhere", &[], "", "red").replace(
        "metadata:\n  name: elsewhere\n",
        "metadata:\n  name: elsewhere\n  namespace: team-b\n",
    );
    dir.write(
        "svc.yaml",
        &format!(
            "{}---\n{}---\n{other}",
            echo_service("hello", &[], "", "blue"),
            echo_service("hello", &[], "", "green")
        ),
    );
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("hello", 1);

    // The address comes from the state directory (a second `mecha up` on 8081 or anywhere
    // else cannot answer instead).
    let table = cli_with_state_dir(&mecha, &["get", "ksvc"]);
    assert!(table.status.success(), "{table:?}");
    let table = text(&table.stdout);
    let header = table.lines().next().expect("header");
    for column in [
        "NAME",
        "URL",
        "LATEST",
        "AGE",
        "CONDITIONS",
        "READY",
        "REPLICAS",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with("hello "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.contains("hello-00002") && row.contains("3 OK / 3"),
        "{row}"
    );
    // Only the default namespace without -n or -A.
    assert!(!table.contains("elsewhere"), "{table}");
    let team_b = text(&mecha.cli(&["get", "svc", "-n", "team-b"]).stdout);
    assert!(
        team_b.lines().any(|l| l.starts_with("elsewhere ")),
        "{team_b}"
    );
    let all = text(&mecha.cli(&["get", "services", "-A"]).stdout);
    assert!(all.starts_with("NAMESPACE"), "{all}");
    assert!(
        all.lines()
            .any(|l| l.starts_with("team-b ") && l.contains("elsewhere")),
        "{all}"
    );
    assert!(
        all.lines()
            .any(|l| l.starts_with("default ") && l.contains("hello")),
        "{all}"
    );

    // Revisions, by short name, with a name, as YAML.
    let revisions = text(&mecha.cli(&["get", "rev"]).stdout);
    let newest = revisions
        .lines()
        .find(|l| l.starts_with("hello-00002 "))
        .unwrap_or_else(|| panic!("{revisions}"));
    assert!(
        newest.contains("100%") && newest.contains("True"),
        "{newest}"
    );
    assert!(
        revisions.lines().any(|l| l.starts_with("hello-00001 ")),
        "{revisions}"
    );
    let yaml = mecha.cli(&["get", "revisions", "hello-00002", "-o", "yaml"]);
    assert!(yaml.status.success(), "{yaml:?}");
    let yaml = text(&yaml.stdout);
    assert!(
        yaml.contains("name: hello-00002") && yaml.contains("service: hello"),
        "{yaml}"
    );
    let wide = text(&mecha.cli(&["get", "rev", "-o", "wide"]).stdout);
    assert!(wide.lines().next().unwrap().contains("PIDS"), "{wide}");
    let missing = mecha.cli(&["get", "svc", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("Service default/nope not found"));

    // describe: conditions, revisions with replicas, traffic, events.
    let described = mecha.cli(&["describe", "ksvc", "hello"]);
    assert!(described.status.success(), "{described:?}");
    let described = text(&described.stdout);
    for needle in [
        "Name:       hello",
        "100%  hello-00002 (latest)",
        "hello-00002-1  pid ",
        "++ Ready",
        "++ ConfigurationsReady",
        "++ RoutesReady",
        "Events:",
        "hello-00002-1 started (pid ",
        "hello-00002-1 ready in ",
        "hello-00002 scaled from 0 to 1 replicas",
    ] {
        assert!(
            described.contains(needle),
            "{needle:?} not in:\n{described}"
        );
    }
    let revision = text(&mecha.cli(&["describe", "rev", "hello-00002"]).stdout);
    assert!(
        revision.contains("Service:    hello") && revision.contains("++ Active"),
        "{revision}"
    );

    // version: client and server.
    let version = text(&mecha.cli(&["version"]).stdout);
    let expected = env!("CARGO_PKG_VERSION");
    assert!(
        version.contains(&format!("Client: mecha {expected}")),
        "{version}"
    );
    assert!(
        version.contains(&format!("Server: mecha {expected} at ")),
        "{version}"
    );

    // Completion scripts for the shells kubectl users have.
    for shell in ["bash", "zsh", "fish"] {
        let script = mecha.cli(&["completion", shell]);
        assert!(script.status.success(), "{script:?}");
        assert!(text(&script.stdout).contains("describe"), "{shell}");
    }

    // -w prints a row again when it changes: a new revision shows up without asking.
    let mut watch = std::process::Command::new(support::mecha_bin())
        .args(["get", "ksvc", "hello", "-w"])
        .env("MECHA_ADMIN_ADDR", mecha.admin.to_string())
        .env("MECHA_STATE_DIR", mecha.state_dir())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run mecha get -w");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let out = watch.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let first = lines
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the header");
    assert!(first.starts_with("NAME"), "{first}");
    let v3 = dir.write("v3.yaml", &echo_service("hello", &[], "", "white"));
    let applied = mecha.cli(&["apply", "-f", v3.to_str().unwrap()]);
    assert!(applied.status.success(), "{applied:?}");
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.starts_with("hello ") && l.contains("hello-00003"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("no row for hello-00003 in {seen:?}"),
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();

    // Series carry namespace and service, and leave with a deleted Service.
    let metrics = || support::http(mecha.admin, "localhost", "/metrics").body;
    support::wait_until("team-b's replica in /metrics", || {
        metrics().contains(
            "mecha_revision_ready_replicas{namespace=\"team-b\",revision=\"elsewhere-00001\",service=\"elsewhere\"} 1",
        )
    });

    // delete by kind and name; a file naming one Service twice deletes it once.
    let deleted = mecha.cli(&["delete", "svc", "elsewhere", "-n", "team-b"]);
    assert!(deleted.status.success(), "{deleted:?}");
    assert_eq!(
        text(&deleted.stdout).trim(),
        "service/team-b/elsewhere deleted"
    );
    support::wait_until("the deleted revision's series to go", || {
        !metrics().contains("elsewhere-00001")
    });
    let again = mecha.cli(&["delete", "service", "elsewhere", "-n", "team-b"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again.stderr).contains("Service team-b/elsewhere not found"));
    let file = dir.path.join("svc.yaml");
    let output = mecha.cli(&["delete", "-f", file.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        text(&output.stdout).trim(),
        "service/default/hello deleted\nservice/team-b/elsewhere not found"
    );
}

#[test]
fn what_was_applied_survives_a_restart_and_up_without_yaml_starts_empty() {
    let dir = Workdir::new("cli-restart");
    let state = dir.path.join("state");
    let started = dir.write("started.yaml", &echo_service("first", &[], "", "blue"));
    let mut mecha = Mecha::start(&[&started], &[], &[], &state);
    mecha.keep_state();
    mecha.wait_ready("first", 1);
    let later = dir.write(
        "later.yaml",
        &format!(
            "{}---\n{}",
            echo_service("second", &[], "", "green"),
            echo_service("third", &[], "", "red")
        ),
    );
    let output = mecha.cli(&["apply", "-f", later.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let output = mecha.cli(&["delete", "ksvc", "third"]);
    assert!(output.status.success(), "{output:?}");
    // The file changes after it was applied: what was applied is what comes back.
    dir.write("later.yaml", "this is not YAML: [\n");
    assert!(mecha.interrupt().success());

    // No YAML this time: everything kept comes back, as it was applied.
    let mecha = Mecha::start(&[], &[], &[], &state);
    mecha.wait_ready("first", 1);
    mecha.wait_ready("second", 1);
    let names: Vec<String> = mecha
        .services_json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(
        mecha.get("second.default.localhost", "/").echo().0,
        "second-00001"
    );
    drop(mecha);

    // A state directory never used: nothing runs, and apply is awaited.
    let empty = Mecha::start(&[], &[], &[], &dir.path.join("fresh"));
    assert!(empty.stdout_contains("No services."));
    assert_eq!(empty.services_json(), serde_json::json!([]));
}

#[test]
fn a_revision_whose_readiness_never_passes_ends_the_wait_at_the_timeout() {
    let dir = Workdir::new("cli-unready");
    // The process runs, but never listens: its readiness probe never passes.
    let file = dir.write(
        "svc.yaml",
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: slow\nspec:\n  template:\n    spec:\n      containers:\n        - command: [sh, -c, \"echo warming up forever; exec sleep 600\"]\n",
    );
    let mecha = Mecha::up(&[]);
    let output = mecha.cli(&["apply", "-f", file.to_str().unwrap(), "--timeout", "2s"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("revision slow-00001 not ready after 2s (--timeout): its replicas run but their readiness probe has not passed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("waiting for Service default/slow revision slow-00001: 0/1 replicas ready"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[slow/slow-00001-1] warming up forever"),
        "{stderr}"
    );

    // The same file again: nothing changed, but the Service is still not Ready.
    let output = mecha.cli(&["apply", "-f", file.to_str().unwrap(), "--timeout", "1s"]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!(
        stdout.lines().next(),
        Some("service/default/slow unchanged")
    );
    assert!(
        stderr.contains("revision slow-00001 not ready after 1s (--timeout)"),
        "{stderr}"
    );
}

#[test]
fn planted_state_files_are_not_believed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Workdir::new("cli-planted");
    let state = dir.path.join("state");
    let file = dir.write("svc.yaml", &echo_service("kept", &[], "", "blue"));
    let mut mecha = Mecha::start(&[&file], &[], &[], &state);
    mecha.keep_state();
    mecha.wait_ready("kept", 1);
    // Written owner-only, and the client finds the instance through it.
    let addr_file = state.join("admin-addr");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&addr_file), 0o600);
    assert_eq!(mode(&state.join("resources.json")), 0o600);
    assert!(
        cli_with_state_dir(&mecha, &["get", "ksvc"])
            .status
            .success()
    );
    // A link in its place is not followed: the client falls back to the default address.
    let real = std::fs::read_to_string(&addr_file).unwrap();
    let elsewhere = dir.write("elsewhere", &real);
    std::fs::remove_file(&addr_file).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &addr_file).unwrap();
    let output = cli_with_state_dir(&mecha, &["get", "ksvc"]);
    assert!(!text(&output.stdout).contains("kept"), "{output:?}");
    std::fs::remove_file(&addr_file).unwrap();
    assert!(mecha.interrupt().success());
    assert!(
        !addr_file.exists(),
        "a stopped mecha up leaves no address behind"
    );

    // Kept resources others could have written are refused, not run.
    std::fs::set_permissions(
        state.join("resources.json"),
        std::fs::Permissions::from_mode(0o664),
    )
    .unwrap();
    let output = std::process::Command::new(support::mecha_bin())
        .args(["up", "--port", "0", "--admin-port", "0", "--state-dir"])
        .arg(&state)
        .output()
        .expect("run mecha up");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("restoring what was applied before") && stderr.contains("resources.json"),
        "{stderr}"
    );
}

/// The revision's `type` condition from `mecha get revisions NAME -o json`.
fn revision_condition(mecha: &Mecha, revision: &str, kind: &str) -> serde_json::Value {
    let output = mecha.cli(&["get", "revisions", revision, "-o", "json"]);
    assert!(output.status.success(), "{output:?}");
    let view: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    view["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == kind)
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} in {view}"))
}

/// A crash-looping revision that the autoscaler takes to zero still reads unhealthy: its
/// last replica's crashes are kept, and re-applying the file still fails.
#[test]
fn a_crash_loop_survives_scaling_to_zero() {
    let dir = Workdir::new("cli-crash-zero");
    dir.write("config.yaml", support::FAST_CONFIG);
    let file = dir.write(
        "svc.yaml",
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: crashy\nspec:\n  template:\n    spec:\n      containers:\n        - command: [sh, -c, \"timeout 0.5 python3 echo.py; exit 3\"]\n",
    );
    let mecha = Mecha::up(&[&dir.path.join("config.yaml")]);
    let _ = mecha.cli(&["apply", "-f", file.to_str().unwrap(), "--no-wait"]);
    support::wait_until("crashy-00001 to be ContainerHealthy=False", || {
        revision_condition(&mecha, "crashy-00001", "ContainerHealthy")["status"] == "False"
    });
    // No traffic: the autoscaler takes it to zero (stable window 6 s).
    let replicas = |mecha: &Mecha| -> usize {
        let output = mecha.cli(&["get", "revisions", "crashy-00001", "-o", "json"]);
        let view: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
        view["replicas"].as_array().map_or(0, Vec::len)
            + view["desired"].as_u64().unwrap_or(0) as usize
    };
    support::wait_until("crashy-00001 to have no replica", || replicas(&mecha) == 0);
    let healthy = revision_condition(&mecha, "crashy-00001", "ContainerHealthy");
    assert_eq!(healthy["status"], "False", "{healthy}");
    assert!(
        healthy["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("CrashLoop: replica crashy-00001-")),
        "{healthy}"
    );
    let output = mecha.cli(&["apply", "-f", file.to_str().unwrap(), "--timeout", "20s"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(text(&output.stderr).contains("CrashLoop"), "{output:?}");
}

#[test]
fn a_revision_that_crash_loops_after_being_ready_is_not_ready_and_apply_says_why() {
    let dir = Workdir::new("cli-flaky");
    // Serves until the file `down` appears (the database goes away), then ends, every time.
    let file = dir.write(
        "svc.yaml",
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: flaky\nspec:\n  template:\n    spec:\n      containers:\n        - command: [sh, -c, \"python3 echo.py & while [ ! -e down ]; do sleep 0.05; done; kill $!; echo lost the database connection; exit 3\"]\n",
    );
    let mecha = Mecha::up(&[]);
    // Ready before its first crash: kn's wait ends there too.
    let _ = mecha.cli(&["apply", "-f", file.to_str().unwrap()]);
    support::wait_until("flaky-00001 to have been ready", || {
        mecha
            .stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("flaky-00001-1") && l.contains("ready in"))
    });
    dir.write("down", "");

    support::wait_until("flaky-00001 to be ContainerHealthy=False", || {
        revision_condition(&mecha, "flaky-00001", "ContainerHealthy")["status"] == "False"
    });
    let healthy = revision_condition(&mecha, "flaky-00001", "ContainerHealthy");
    let message = healthy["message"].as_str().unwrap();
    assert!(
        message.starts_with("CrashLoop: replica flaky-00001-1 ended ")
            && message.contains("times in a row")
            && message.ends_with("last: exit status: 3"),
        "{healthy}"
    );
    let ready = revision_condition(&mecha, "flaky-00001", "Ready");
    assert_eq!(ready["status"], "False", "{ready}");
    let services = mecha.services_json();
    let service_ready = services[0]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap();
    assert_eq!(service_ready["status"], "False", "{services}");
    assert_eq!(services[0]["revisions"][0]["ready"], false, "{services}");

    // Applying the same file again waits on it, and fails with the reason and its output.
    let output = mecha.cli(&["apply", "-f", file.to_str().unwrap(), "--timeout", "60s"]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("service/default/flaky unchanged"),
        "{stdout}"
    );
    assert!(
        stderr.contains(
            "error: Service default/flaky: revision flaky-00001 failed: CrashLoop: replica flaky-00001-1 ended "
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("[flaky/flaky-00001-1] lost the database connection"),
        "{stderr}"
    );
}

#[test]
fn client_requests_to_a_port_that_never_answers_time_out_naming_it() {
    // Accepts connections (the kernel does) and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let run = |args: &[&str]| {
        let started = Instant::now();
        let mut child = std::process::Command::new(support::mecha_bin())
            .args(args)
            .env("MECHA_ADMIN_ADDR", &addr)
            .env("MECHA_ADMIN_TOKEN", "f".repeat(64))
            .env("MECHA_REQUEST_TIMEOUT", "1s")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Without a timeout the client would hang: give it 20 s, then call it a failure.
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > std::time::Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mecha {args:?} still waits after 20 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        (child.wait_with_output().unwrap(), started.elapsed())
    };
    for args in [
        &["get", "ksvc"][..],
        &["logs", "hello", "-f"],
        &["get", "ksvc", "-w"],
    ] {
        let (output, took) = run(args);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("no answer from {addr} within 1s")),
            "{args:?}: {stderr}"
        );
        assert!(
            took < std::time::Duration::from_secs(10),
            "{args:?}: {took:?}"
        );
    }
}

#[test]
fn revision_names_and_traffic_to_old_revisions_survive_a_restart() {
    let dir = Workdir::new("cli-revisions-restart");
    let state = dir.path.join("state");
    let v1 = dir.write("svc.yaml", &echo_service("hello", &[], "", "blue"));
    let mut mecha = Mecha::start(&[], &[], &[], &state);
    mecha.keep_state();
    let output = mecha.cli(&["apply", "-f", v1.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    // The second version keeps a tag on the first revision.
    let v2 = format!(
        "{}  traffic:\n    - revisionName: hello-00001\n      percent: 0\n      tag: old\n    - latestRevision: true\n      percent: 100\n",
        echo_service("hello", &[], "", "green")
    );
    dir.write("svc.yaml", &v2);
    let output = mecha.cli(&["apply", "-f", v1.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    assert!(
        text(&output.stdout).contains("(revision hello-00002)"),
        "{output:?}"
    );
    let created = |mecha: &Mecha| -> Vec<(String, String)> {
        mecha.services_json()[0]["revisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().to_string(),
                    r["created"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let before = created(&mecha);
    assert!(mecha.interrupt().success());

    let mecha = Mecha::start(&[], &[], &[], &state);
    // Both revisions, under their names, with their templates and ages.
    assert_eq!(created(&mecha), before);
    support::wait_until("both revisions to answer", || {
        mecha.get("hello.default.localhost", "/").echo().0 == "hello-00002"
            && mecha.get("old-hello.default.localhost", "/").echo().0 == "hello-00001"
    });
    assert_eq!(
        mecha.get("old-hello.default.localhost", "/").echo().2,
        "blue"
    );
    assert_eq!(mecha.get("hello.default.localhost", "/").echo().2, "green");
    // The next template change makes a new name.
    dir.write("svc.yaml", &echo_service("hello", &[], "", "white"));
    let output = mecha.cli(&["apply", "-f", v1.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        text(&output.stdout).trim_end().lines().next().unwrap(),
        "service/default/hello configured (revision hello-00003)"
    );
}

/// `--body-budget` is bounded both ways: below the largest body the gateway port takes (a
/// webhook's 4 MiB, or a larger `--max-event-size`) no such body could ever be taken, above
/// 1 GiB it bounds nothing; `--body-timeout` is 1s to 10m. Each stops `mecha up` with status 2
/// and a message naming the flag, before anything starts.
#[test]
fn up_refuses_a_body_budget_that_cannot_work() {
    let dir = Workdir::new("cli-body-budget");
    for (args, flag, says) in [
        (
            &["--body-budget", "1048576"][..],
            "--body-budget",
            "at least 4194304",
        ),
        (
            &["--body-budget", "8388608", "--max-event-size", "16777216"][..],
            "--body-budget",
            "at least 16777216",
        ),
        (
            &["--body-budget", "1073741825"][..],
            "--body-budget",
            "at most 1073741824",
        ),
        (
            &["--body-timeout", "0s"][..],
            "--body-timeout",
            "between 1s and 600s",
        ),
    ] {
        let output = std::process::Command::new(support::mecha_bin())
            .args(["up", "--port", "0", "--admin-port", "0"])
            .args(args)
            .arg("--state-dir")
            .arg(dir.path.join("state"))
            .output()
            .expect("run mecha up");
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains(flag) && stderr.contains(says),
            "{args:?}: {stderr}"
        );
    }
}

/// `--max-event-size` is bounded both ways (64 KiB to 16 MiB): an absurd value stops `mecha
/// up` with status 2 and a message naming the flag and the bound, before anything starts.
#[test]
fn up_refuses_an_absurd_event_size() {
    let dir = Workdir::new("cli-event-size");
    for (value, says) in [
        ("1000", "65536"),
        ("16777217", "16777216"),
        ("18446744073709551615", "16777216"),
    ] {
        let output = std::process::Command::new(support::mecha_bin())
            .args(["up", "--port", "0", "--admin-port", "0"])
            .args(["--max-event-size", value, "--state-dir"])
            .arg(dir.path.join("state"))
            .output()
            .expect("run mecha up");
        assert_eq!(output.status.code(), Some(2), "{value}: {output:?}");
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains("--max-event-size") && stderr.contains(says),
            "{value}: {stderr}"
        );
    }
}
