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
    let table = mecha.cli(&["get", "sources"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("default/tick") && table.contains("PingSource"),
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
        format!("{name}: document 1: spec.schedule: \"@every 1m\": @every is not supported"),
        format!(
            "{name}: document 2: spec.timezone: \"Mars/Olympus\" is not a known IANA time zone"
        ),
        format!(
            "{name}: document 3: spec.data: with a JSON contentType, data must be a JSON object"
        ),
        format!("{name}: document 4: spec.data: data and dataBase64 cannot both be set"),
        format!("{name}: document 5: spec.schedule: \"* * *\" has 3 fields"),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in\n{stderr}"
        );
    }
}
