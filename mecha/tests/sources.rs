//! Event sources end to end: the real `mecha` binary, its broker and a trigger delivering to a
//! subscriber of the test's own on 127.0.0.1.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use support::subscriber::Subscriber;
use support::{Mecha, Workdir, mecha_bin, wait_until};

const ZONE: &str = "Asia/Kolkata";
const SOURCE: &str = "/apis/v1/namespaces/default/pingsources/tick";

/// A broker, a trigger for ping events to `subscriber`, and `source`.
fn eventing(subscriber: &Subscriber, source: &str) -> String {
    format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: pings\nspec:\n  broker: default\n  filter:\n    attributes:\n      type: dev.knative.sources.ping\n  subscriber:\n    uri: {}\n---\n{source}",
        subscriber.url("/ping")
    )
}

fn sources_json(mecha: &Mecha) -> serde_json::Value {
    let output = mecha.cli(&["get", "sources", "-o", "json"]);
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn ping_source_events_reach_a_subscriber_in_their_time_zone() {
    let subscriber = Subscriber::ok();
    // Every second of this hour and the next in Kolkata (UTC+5:30). The UTC hour now is 5 or
    // 6 hours behind, so a source that ignored the time zone would send nothing.
    let hour = Timestamp::now()
        .to_zoned_datetime(TimeZone::get(ZONE).unwrap())
        .hour();
    let next = (hour + 1) % 24;
    let source = format!(
        "apiVersion: sources.knative.dev/v1\nkind: PingSource\nmetadata:\n  name: tick\nspec:\n  schedule: \"* * {hour},{next} * * *\"\n  timezone: {ZONE}\n  contentType: application/json\n  data: '{{\"message\": \"hello\"}}'\n  ceOverrides:\n    extensions:\n      team: blue\n  sink:\n    ref:\n      apiVersion: eventing.knative.dev/v1\n      kind: Broker\n      name: default\n"
    );
    let dir = Workdir::new("ping");
    dir.write("eventing.yaml", &eventing(&subscriber, &source));
    let mecha = Mecha::up(&[&dir.path]);
    wait_until("three ping events at the subscriber", || {
        subscriber.count("/ping") >= 3
    });
    let received = subscriber.all();
    let mut times = Vec::new();
    for event in &received[..3] {
        let h = &event.headers;
        assert_eq!(h["ce-type"], "dev.knative.sources.ping");
        assert_eq!(h["ce-source"], SOURCE);
        assert_eq!(h["ce-team"], "blue");
        assert_eq!(h["content-type"], "application/json");
        // The broker keeps JSON data as JSON (its log is structured mode), so compare values.
        let data: serde_json::Value = serde_json::from_str(&event.body).unwrap();
        assert_eq!(data, serde_json::json!({"message": "hello"}));
        let time: Timestamp = h["ce-time"].parse().unwrap();
        assert_eq!(time.subsec_nanosecond(), 0, "ticks are on whole seconds");
        let local_hour = time.to_zoned_datetime(TimeZone::get(ZONE).unwrap()).hour();
        assert!(local_hour == hour || local_hour == next, "{time}");
        // The id is derived from the source and the scheduled time.
        assert_eq!(h["ce-id"], importers::ping::event_id(SOURCE, time));
        times.push(time);
    }
    times.dedup();
    assert_eq!(times.len(), 3, "one event per tick: {times:?}");

    let sources = sources_json(&mecha);
    let tick = &sources[0];
    assert_eq!(tick["kind"], "PingSource");
    assert_eq!(tick["name"], "tick");
    assert_eq!(tick["ready"], true, "{tick}");
    assert_eq!(
        tick["sinkUri"],
        format!("http://localhost:{}/default/default", mecha.gateway.port())
    );
    assert!(tick["sent"].as_u64().unwrap() >= 3, "{tick}");
    assert_eq!(tick["failed"], 0);
    assert_eq!(
        tick["ceAttributes"],
        serde_json::json!([{"type": "dev.knative.sources.ping", "source": SOURCE}])
    );
    let table = mecha.cli(&["get", "sources"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("tick ") && l.contains("PingSource")),
        "{table}"
    );
}

#[test]
fn sources_follow_apply_and_delete_and_say_why_they_are_not_ready() {
    let subscriber = Subscriber::ok();
    let dir = Workdir::new("ping-apply");
    dir.write("eventing.yaml", &eventing(&subscriber, "# no source yet\n"));
    let mecha = Mecha::up(&[&dir.path]);
    assert_eq!(sources_json(&mecha), serde_json::json!([]));

    // A sink that names a Service that does not exist.
    let missing = dir.write(
        "missing.yaml",
        "apiVersion: sources.knative.dev/v1\nkind: PingSource\nmetadata:\n  name: lost\nspec:\n  schedule: \"0 0 1 1 *\"\n  sink:\n    ref: {apiVersion: serving.knative.dev/v1, kind: Service, name: nope}\n",
    );
    let output = mecha.cli(&["apply", "-f", missing.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let sources = sources_json(&mecha);
    assert_eq!(sources[0]["ready"], false, "{sources}");
    assert_eq!(
        sources[0]["reason"], "sink: Service default/nope not found",
        "{sources}"
    );

    // Two per-second sources straight to the subscriber's URIs; one is deleted and stops,
    // the other keeps ticking (it is the clock the test waits on).
    let per_second = |name: &str, path: &str| {
        format!(
            "apiVersion: sources.knative.dev/v1\nkind: PingSource\nmetadata:\n  name: {name}\nspec:\n  schedule: \"* * * * * *\"\n  data: plain\n  sink:\n    uri: {}\n",
            subscriber.url(path)
        )
    };
    let direct = dir.write("direct.yaml", &per_second("direct", "/direct"));
    let clock = dir.write("clock.yaml", &per_second("clock", "/clock"));
    let output = mecha.cli(&[
        "apply",
        "-f",
        direct.to_str().unwrap(),
        "-f",
        clock.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{output:?}");
    wait_until("an event sent straight to the URI", || {
        subscriber.count("/direct") >= 1
    });
    let first = subscriber
        .all()
        .into_iter()
        .find(|r| r.path == "/direct")
        .unwrap();
    assert_eq!(first.body, "plain");
    assert!(
        !first.headers.contains_key("content-type"),
        "no contentType, no Content-Type: {:?}",
        first.headers
    );
    let output = mecha.cli(&["delete", "-f", direct.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let names = || -> Vec<String> {
        sources_json(&mecha)
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(), ["clock", "lost"]);
    // A send already under way may still land; after that none comes while the other source
    // ticks three more times.
    let settled = subscriber.count("/direct");
    let ticks = subscriber.count("/clock");
    wait_until("three more ticks of the other source", || {
        subscriber.count("/clock") >= ticks + 3
    });
    assert!(
        subscriber.count("/direct") <= settled + 1,
        "events kept coming after delete"
    );
}

#[test]
fn a_ping_source_wakes_a_zero_scaled_service_sink() {
    let work = Workdir::new("ping-wake");
    work.write("sink.py", support::CE_ID_RECORDER);
    let service = format!(
        "{}---\napiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: sink\nspec:\n  template:\n    metadata:\n      annotations:\n        autoscaling.knative.dev/initial-scale: \"0\"\n    spec:\n      containers:\n        - command: [python3, sink.py]\n",
        support::FAST_CONFIG
    );
    let file = work.write("wake.yaml", &service);
    let mecha = Mecha::up(&[&file]);
    assert!(mecha.pids("sink").is_empty(), "scaled to zero at start");
    // The source comes after, so nothing else can have started the function.
    let source = work.write(
        "source.yaml",
        "apiVersion: sources.knative.dev/v1\nkind: PingSource\nmetadata:\n  name: wake\nspec:\n  schedule: \"* * * * * *\"\n  sink:\n    ref:\n      apiVersion: serving.knative.dev/v1\n      kind: Service\n      name: sink\n",
    );
    let output = mecha.cli(&["apply", "-f", source.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    let received = work.path.join("received.txt");
    wait_until("the function received a ping event", || {
        std::fs::read_to_string(&received).is_ok_and(|s| s.lines().any(|l| !l.is_empty()))
    });
    let sources = sources_json(&mecha);
    assert_eq!(
        sources[0]["sinkUri"],
        format!("http://sink.default.localhost:{}/", mecha.gateway.port())
    );
    assert_eq!(sources[0]["ready"], true, "{sources}");
}

#[test]
fn bad_ping_sources_are_load_errors_naming_the_field() {
    let dir = Workdir::new("ping-bad");
    let doc = |name: &str, spec: &str| {
        format!(
            "apiVersion: sources.knative.dev/v1\nkind: PingSource\nmetadata:\n  name: {name}\nspec:\n{spec}  sink:\n    uri: http://127.0.0.1:1/\n"
        )
    };
    let file = dir.write(
        "bad.yaml",
        &[
            doc("every", "  schedule: \"@every 1m\"\n"),
            doc("zone", "  timezone: Mars/Olympus\n"),
            doc(
                "array",
                "  contentType: application/json\n  data: \"[1, 2]\"\n",
            ),
            doc("both", "  data: x\n  dataBase64: eA==\n"),
            doc("fields", "  schedule: \"* * *\"\n"),
        ]
        .join("---\n"),
    );
    let output = Command::new(mecha_bin())
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
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let name = file.display();
    for expected in [
        format!(
            "{name}: document 1 (PingSource default/every): spec.schedule: \"@every 1m\": @every is not supported"
        ),
        format!(
            "{name}: document 2 (PingSource default/zone): spec.timezone: \"Mars/Olympus\" is not a known IANA time zone"
        ),
        format!(
            "{name}: document 3 (PingSource default/array): spec.data: with a JSON contentType, data must be a JSON object"
        ),
        format!(
            "{name}: document 4 (PingSource default/both): spec.data: data and dataBase64 cannot both be set"
        ),
        format!(
            "{name}: document 5 (PingSource default/fields): spec.schedule: \"* * *\" has 3 fields"
        ),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in\n{stderr}"
        );
    }
}

const SECRET: &str = "webhook-secret-9f8e7d";

/// `sha256=` and the hex HMAC-SHA256 of `body`, as GitHub signs deliveries.
fn github_signature(body: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

#[test]
fn webhook_sources_check_signatures_and_send_to_the_sink() {
    let subscriber = Subscriber::ok();
    let dir = Workdir::new("webhooks");
    // A relative path: from the YAML file's directory. The file is written after the start.
    let sources = format!(
        "apiVersion: sources.knative.dev/v1alpha1\nkind: GitHubSource\nmetadata:\n  name: repo\n  annotations:\n    mecha.dev/secret-token-env: TEST_GITHUB_SECRET\nspec:\n  ownerAndRepository: octo/hello\n  eventTypes: [push]\n  accessToken:\n    secretKeyRef: {{name: github, key: accessToken}}\n  secretToken:\n    secretKeyRef: {{name: github, key: secretToken}}\n  ceOverrides:\n    extensions: {{team: blue}}\n  sink:\n    ref: {{apiVersion: eventing.knative.dev/v1, kind: Broker, name: default}}\n---\napiVersion: sources.knative.dev/v1alpha1\nkind: GitLabSource\nmetadata:\n  name: proj\n  annotations:\n    mecha.dev/secret-token-file: gitlab-secret\nspec:\n  projectUrl: https://gitlab.com/group/proj\n  eventTypes: [push_events]\n  sink:\n    uri: {}\n",
        subscriber.url("/gitlab")
    );
    let trigger = format!(
        "apiVersion: eventing.knative.dev/v1\nkind: Broker\nmetadata:\n  name: default\n---\napiVersion: eventing.knative.dev/v1\nkind: Trigger\nmetadata:\n  name: github\nspec:\n  broker: default\n  filter:\n    attributes:\n      type: dev.knative.source.github.push\n  subscriber:\n    uri: {}\n---\n{sources}",
        subscriber.url("/github")
    );
    dir.write("webhooks.yaml", &trigger);
    let mecha = Mecha::up_with(&[&dir.path], &[("TEST_GITHUB_SECRET", SECRET)]);
    let listed = sources_json(&mecha);
    let port = mecha.gateway.port();
    assert_eq!(listed[0]["ready"], true, "{listed}");
    assert_eq!(listed[1]["ready"], false, "{listed}");
    assert!(
        listed[1]["reason"]
            .as_str()
            .unwrap()
            .contains("cannot read the secret file"),
        "{listed}"
    );
    // Providing the secret is enough: the source is tried again.
    dir.write("gitlab-secret", &format!("{SECRET}\n"));
    wait_until("the GitLab source to start", || {
        sources_json(&mecha)[1]["ready"] == true
    });
    assert_eq!(
        listed[0]["url"],
        format!("http://localhost:{port}/webhooks/github/default/repo")
    );
    assert_eq!(
        listed[1]["url"],
        format!("http://localhost:{port}/webhooks/gitlab/default/proj")
    );

    let body = r#"{"ref":"refs/heads/main","repository":{"full_name":"octo/hello"}}"#;
    let github = |headers: &[(&str, &str)], body: &str| {
        support::request_with(
            mecha.gateway,
            "POST",
            "localhost",
            "/webhooks/github/default/repo",
            headers,
            body,
        )
    };
    let signature = github_signature(body);
    let delivery = "0b2c4e00-8d1f-11f0-9a3e-5c1d2e3f4a5b";
    let headers = [
        ("Content-Type", "application/json"),
        ("X-GitHub-Event", "push"),
        ("X-GitHub-Delivery", delivery),
        ("X-Hub-Signature-256", signature.as_str()),
    ];
    let accepted = github(&headers, body);
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    wait_until("the push event at the subscriber", || {
        subscriber.count("/github") == 1
    });
    let event = subscriber
        .all()
        .into_iter()
        .find(|r| r.path == "/github")
        .unwrap();
    assert_eq!(event.headers["ce-type"], "dev.knative.source.github.push");
    assert_eq!(event.headers["ce-source"], "https://github.com/octo/hello");
    assert_eq!(event.headers["ce-id"], delivery);
    assert_eq!(event.headers["ce-team"], "blue");
    let data: serde_json::Value = serde_json::from_str(&event.body).unwrap();
    assert_eq!(data["repository"]["full_name"], "octo/hello");

    // Signed with another secret, a tampered body, no signature, SHA-1 only: 401.
    let tampered = body.replace("main", "evil");
    assert_eq!(github(&headers, &tampered).status, 401);
    let wrong = "sha256=0000000000000000000000000000000000000000000000000000000000000000";
    assert_eq!(
        github(
            &[
                headers[0],
                headers[1],
                headers[2],
                ("X-Hub-Signature-256", wrong)
            ],
            body
        )
        .status,
        401
    );
    let unsigned = github(&headers[..3], body);
    assert_eq!(unsigned.status, 401);
    assert!(
        unsigned.body.contains("X-Hub-Signature-256"),
        "{}",
        unsigned.body
    );
    let sha1 = github(
        &[
            headers[0],
            headers[1],
            headers[2],
            (
                "X-Hub-Signature",
                "sha1=0123456789abcdef0123456789abcdef01234567",
            ),
        ],
        body,
    );
    assert_eq!(sha1.status, 401);
    assert!(sha1.body.contains("SHA-1"), "{}", sha1.body);
    // Signed but not JSON: 400. An unknown source: 404.
    let form = "payload=%7B%7D";
    let form_signature = github_signature(form);
    assert_eq!(
        github(
            &[
                headers[0],
                headers[1],
                headers[2],
                ("X-Hub-Signature-256", &form_signature)
            ],
            form
        )
        .status,
        400
    );
    let unknown = support::request_with(
        mecha.gateway,
        "POST",
        "localhost",
        "/webhooks/github/default/nope",
        &headers,
        body,
    );
    assert_eq!(unknown.status, 404);

    // GitLab: the token, compared with the secret file's content.
    let gitlab = |token: Option<&str>| {
        let mut headers = vec![
            ("Content-Type", "application/json"),
            ("X-Gitlab-Event", "Push Hook"),
            (
                "X-Gitlab-Event-UUID",
                "7f1e2d3c-0000-4000-8000-000000000001",
            ),
        ];
        if let Some(token) = token {
            headers.push(("X-Gitlab-Token", token));
        }
        support::request_with(
            mecha.gateway,
            "POST",
            "127.0.0.1",
            "/webhooks/gitlab/default/proj",
            &headers,
            r#"{"object_kind":"push"}"#,
        )
        .status
    };
    assert_eq!(gitlab(Some("not-the-secret")), 401);
    assert_eq!(gitlab(None), 401);
    assert_eq!(gitlab(Some(SECRET)), 202);
    let pushed = subscriber
        .all()
        .into_iter()
        .find(|r| r.path == "/gitlab")
        .unwrap();
    assert_eq!(pushed.headers["ce-type"], "dev.knative.sources.gitlab.push");
    assert_eq!(pushed.headers["ce-source"], "https://gitlab.com/group/proj");

    // Exactly the two accepted deliveries reached the sinks; the secret was never printed.
    assert_eq!(subscriber.count("/github"), 1);
    assert_eq!(subscriber.count("/gitlab"), 1);
    let listed = sources_json(&mecha);
    assert_eq!(listed[0]["sent"], 1);
    assert_eq!(listed[1]["sent"], 1);
    assert!(!mecha.log_contains(&[SECRET]));
    assert!(!mecha.stdout_contains(SECRET));
}

#[test]
fn webhook_sources_without_a_local_secret_are_load_errors() {
    let dir = Workdir::new("webhook-bad");
    let file = dir.write(
        "bad.yaml",
        "apiVersion: sources.knative.dev/v1alpha1\nkind: GitHubSource\nmetadata:\n  name: repo\nspec:\n  ownerAndRepository: octo/hello/extra\n  eventTypes: [push]\n  secretToken:\n    secretKeyRef: {name: github, key: secretToken}\n  sink: {uri: http://127.0.0.1:1/}\n---\napiVersion: sources.knative.dev/v1alpha1\nkind: GitLabSource\nmetadata:\n  name: proj\n  annotations: {mecha.dev/secret-token-env: X}\nspec:\n  projectUrl: https://gitlab.com/group/proj\n  eventTypes: [pushes]\n  sink: {uri: http://127.0.0.1:1/}\n",
    );
    let output = Command::new(mecha_bin())
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
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let name = file.display();
    for expected in [
        format!(
            "{name}: document 1 (GitHubSource default/repo): spec.ownerAndRepository: \"octo/hello/extra\" is not OWNER/REPOSITORY"
        ),
        format!(
            "{name}: document 1 (GitHubSource default/repo): spec.secretToken: local mode cannot read a Kubernetes Secret"
        ),
        format!(
            "{name}: document 2 (GitLabSource default/proj): spec.eventTypes[0]: \"pushes\" is not one of push_events"
        ),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in\n{stderr}"
        );
    }
}
