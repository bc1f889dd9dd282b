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
        stderr.contains("error: Service default/crashy: revision crashy-00002 failed: CrashLoop: replica crashy-00002-1 ended 3 times, last: exit status: 7"),
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
