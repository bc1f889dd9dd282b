//! Queue sources end to end: the real `mecha` binary reading real `redis-server`,
//! `nats-server` and `mosquitto` processes on 127.0.0.1 and sending to an HTTP sink of the
//! test's own. Each source: delivery byte for byte with Knative's (or Mecha's) attributes; the
//! sink down → nothing acknowledged upstream, sent again when it is back; `mecha up` killed
//! (SIGKILL) while a message waits → delivered after the restart; nothing acknowledged is
//! delivered twice.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use support::subscriber::{Received, Subscriber};
use support::{Mecha, Workdir, wait_until};

/// A sink that answers 202 while `up`, 503 otherwise, and keeps what it accepted.
struct Sink {
    subscriber: Subscriber,
    up: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<Received>>>,
}

impl Sink {
    fn start() -> Self {
        let up = Arc::new(AtomicBool::new(true));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let subscriber = Subscriber::start({
            let (up, accepted) = (up.clone(), accepted.clone());
            move |request| {
                if up.load(Ordering::SeqCst) {
                    accepted.lock().unwrap().push(request.clone());
                    (202, vec![], String::new())
                } else {
                    (503, vec![], "down for the test".into())
                }
            }
        });
        Self {
            subscriber,
            up,
            accepted,
        }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    /// What the sink accepted whose body `matches`.
    fn accepted(&self, matches: &dyn Fn(&str) -> bool) -> Vec<Received> {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .filter(|r| matches(&r.body))
            .cloned()
            .collect()
    }

    /// Requests (accepted or refused) whose body `matches`.
    fn attempts(&self, matches: &dyn Fn(&str) -> bool) -> usize {
        self.subscriber
            .all()
            .iter()
            .filter(|r| matches(&r.body))
            .count()
    }
}

fn source_json(mecha: &Mecha) -> serde_json::Value {
    let output = mecha.cli(&["get", "sources", "-o", "json"]);
    assert!(output.status.success(), "{output:?}");
    let sources: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    sources[0].clone()
}

fn wait_ready(mecha: &Mecha) {
    wait_until("the source ready", || source_json(mecha)["ready"] == true);
}

/// How each queue is driven by the shared scenario.
struct Queue<'a> {
    /// The source's YAML, sending to `sink`.
    yaml: String,
    /// Publishes one message; returns the id the event must carry, when it is known upfront.
    publish: &'a dyn Fn(&str) -> Option<String>,
    /// Messages delivered and not acknowledged upstream, when the server can say.
    pending: Option<&'a dyn Fn() -> usize>,
    /// What the sink receives for a published payload (the body, as text).
    body: &'a dyn Fn(&str) -> String,
    event_type: &'a str,
    event_source: String,
    /// The `subject` attribute each event carries, if any.
    subject: Option<&'a str>,
}

/// The scenario every queue source passes.
fn exercise(queue: &Queue<'_>, sink: &Sink) {
    let dir = Workdir::new("queue");
    dir.write("source.yaml", &queue.yaml);
    let mut mecha = Mecha::up(&[&dir.path]);
    wait_ready(&mecha);
    assert_eq!(
        source_json(&mecha)["ceAttributes"],
        serde_json::json!([{"type": queue.event_type, "source": queue.event_source}])
    );

    // 1. Delivered byte for byte, with the event's attributes.
    let payloads = [
        r#"{"n": 1, "text": "grüße ✓ \"quoted\" \\ back"}"#,
        "second: plain text, sent while the sink is down",
        "third: waiting when mecha up is killed",
    ];
    let expect = |payload: &str| {
        let body = (queue.body)(payload);
        move |b: &str| b == body
    };
    let id = (queue.publish)(payloads[0]);
    let first = expect(payloads[0]);
    wait_until("the first message at the sink", || {
        !sink.accepted(&first).is_empty()
    });
    let event = &sink.accepted(&first)[0];
    assert_eq!(event.headers["ce-type"], queue.event_type);
    assert_eq!(event.headers["ce-source"], queue.event_source);
    assert_eq!(event.headers["ce-team"], "blue", "ceOverrides applied");
    if let Some(id) = &id {
        assert_eq!(&event.headers["ce-id"], id);
    }
    if let Some(subject) = queue.subject {
        assert_eq!(event.headers["ce-subject"], subject);
    }
    if let Some(pending) = queue.pending {
        wait_until("the first message acknowledged", || pending() == 0);
    }

    // 2. The sink down: sent, refused, kept upstream, not ready; sent again when it is back.
    sink.set_up(false);
    (queue.publish)(payloads[1]);
    let second = expect(payloads[1]);
    wait_until("the second message refused by the sink", || {
        sink.attempts(&second) >= 2
    });
    if let Some(pending) = queue.pending {
        assert_eq!(pending(), 1, "nothing acknowledged while the sink fails");
    }
    wait_until("the source not ready while its sink fails", || {
        let source = source_json(&mecha);
        source["ready"] == false
            && source["reason"]
                .as_str()
                .is_some_and(|r| r.contains("sink") && r.contains("503"))
    });
    assert!(source_json(&mecha)["failed"].as_u64().unwrap() >= 1);
    sink.set_up(true);
    wait_until("the second message delivered once the sink is back", || {
        !sink.accepted(&second).is_empty()
    });
    wait_ready(&mecha);
    if let Some(pending) = queue.pending {
        wait_until("the second message acknowledged", || pending() == 0);
    }

    // 3. `mecha up` killed while a message waits for the sink: delivered after the restart.
    sink.set_up(false);
    (queue.publish)(payloads[2]);
    let third = expect(payloads[2]);
    wait_until("the third message refused by the sink", || {
        sink.attempts(&third) >= 1
    });
    mecha.kill();
    sink.set_up(true);
    let mecha = Mecha::up(&[&dir.path]);
    wait_until("the third message delivered after the restart", || {
        !sink.accepted(&third).is_empty()
    });
    if let Some(pending) = queue.pending {
        wait_until("the third message acknowledged", || pending() == 0);
    }
    wait_ready(&mecha);
    // What was acknowledged before the crash is not sent again.
    assert_eq!(sink.accepted(&first).len(), 1);
    assert_eq!(sink.accepted(&second).len(), 1);
    assert!(source_json(&mecha)["sent"].as_u64().unwrap() >= 1);
}

fn sink_yaml(sink: &Sink) -> String {
    format!(
        "  ceOverrides:\n    extensions:\n      team: blue\n  sink:\n    uri: {}\n",
        sink.subscriber.url("/events")
    )
}

#[cfg(feature = "redis")]
#[test]
fn redis_stream_entries_are_acknowledged_only_after_the_sink_took_them() {
    use test_support::servers::Server;

    let redis = Server::redis();
    let sink = Sink::start();
    let yaml = format!(
        "apiVersion: sources.knative.dev/v1alpha1\nkind: RedisStreamSource\nmetadata:\n  name: orders\nspec:\n  address: 127.0.0.1:{}\n  stream: orders\n  group: billing\n{}",
        redis.port,
        sink_yaml(&sink)
    );
    let publish =
        |payload: &str| Some(redis.redis_cli(&["XADD", "orders", "*", "payload", payload]));
    let pending = || -> usize {
        let summary = redis.redis_cli(&["XPENDING", "orders", "billing"]);
        summary
            .lines()
            .next()
            .unwrap_or("0")
            .trim()
            .parse()
            .unwrap_or(usize::MAX)
    };
    let body = |payload: &str| serde_json::to_string(&["payload", payload]).unwrap();
    exercise(
        &Queue {
            yaml,
            publish: &publish,
            pending: Some(&pending),
            body: &body,
            event_type: "dev.knative.sources.redisstream",
            event_source: format!("127.0.0.1:{}/orders", redis.port),
            subject: None,
        },
        &sink,
    );
}

#[cfg(feature = "mqtt")]
#[test]
fn mqtt_messages_are_acknowledged_only_after_the_sink_took_them() {
    use test_support::servers::Server;

    let mosquitto = Server::mosquitto();
    let sink = Sink::start();
    let yaml = format!(
        "apiVersion: sources.mecha.dev/v1alpha1\nkind: MqttSource\nmetadata:\n  name: sensors\nspec:\n  brokerUrl: mqtt://127.0.0.1:{}\n  topics: [\"sensors/+/temperature\"]\n{}",
        mosquitto.port,
        sink_yaml(&sink)
    );
    let publish = |payload: &str| {
        mosquitto.mqtt_publish("sensors/kitchen/temperature", payload);
        None
    };
    let body = |payload: &str| payload.to_string();
    exercise(
        &Queue {
            yaml,
            publish: &publish,
            pending: None,
            body: &body,
            event_type: "dev.mecha.sources.mqtt",
            event_source: "/apis/v1alpha1/namespaces/default/mqttsources/sensors".into(),
            subject: Some("sensors/kitchen/temperature"),
        },
        &sink,
    );
}

#[cfg(feature = "nats")]
#[test]
fn jetstream_messages_are_acknowledged_only_after_the_sink_took_them() {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;

    use test_support::nats::NatsServer;

    let nats = NatsServer::start();
    let sink = Sink::start();
    let yaml = format!(
        "apiVersion: sources.mecha.dev/v1alpha1\nkind: NatsSource\nmetadata:\n  name: payments\nspec:\n  url: {}\n  subject: payments.created\n  stream: PAYMENTS\n  ackWaitSeconds: 3\n{}",
        nats.url(),
        sink_yaml(&sink)
    );
    // Publishes with the NATS protocol and waits for JetStream's acknowledgement (the stream
    // stored it); the id is the stream sequence it reports.
    let publish = |payload: &str| {
        let mut stream = TcpStream::connect(("127.0.0.1", nats.port)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap(); // INFO
        write!(
            stream,
            "CONNECT {{\"verbose\":false}}\r\nSUB _INBOX.test 1\r\nPUB payments.created _INBOX.test {}\r\n{payload}\r\n",
            payload.len()
        )
        .unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.starts_with("MSG") {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let ack: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
                assert_eq!(ack["stream"], "PAYMENTS", "{ack}");
                return Some(format!("PAYMENTS-{}", ack["seq"]));
            }
        }
    };
    let body = |payload: &str| payload.to_string();
    exercise(
        &Queue {
            yaml,
            publish: &publish,
            pending: None,
            body: &body,
            event_type: "dev.mecha.sources.nats",
            event_source: "/apis/v1alpha1/namespaces/default/natssources/payments".into(),
            subject: Some("payments.created"),
        },
        &sink,
    );
}

#[test]
fn bad_queue_sources_are_load_errors_naming_the_field() {
    let dir = Workdir::new("queue-bad");
    let file = dir.write(
        "bad.yaml",
        "apiVersion: sources.knative.dev/v1alpha1\nkind: RedisStreamSource\nmetadata:\n  name: r\nspec:\n  address: rediss://cache:6379\n  stream: \"\"\n  consumers: 0\n  sink:\n    uri: http://127.0.0.1:1/\n---\napiVersion: sources.mecha.dev/v1alpha1\nkind: MqttSource\nmetadata:\n  name: m\nspec:\n  brokerUrl: mqtt://broker:1883\n  topics: [\"a/#/b\"]\n  sink:\n    uri: http://127.0.0.1:1/\n---\napiVersion: sources.mecha.dev/v1alpha1\nkind: NatsSource\nmetadata:\n  name: orders\nspec:\n  url: nats://127.0.0.1:4222\n  subject: \"a..b\"\n  consumer: durable\n  sink:\n    uri: http://127.0.0.1:1/\n",
    );
    let stderr = support::refused_up(&file, &dir.path.join(".state"));
    for needle in [
        "document 1 (RedisStreamSource default/r): spec.address: \"rediss://cache:6379\": the scheme must be redis",
        "document 1 (RedisStreamSource default/r): spec.stream: required",
        "document 1 (RedisStreamSource default/r): spec.consumers: 0 is not between 1 and 64",
        "document 2 (MqttSource default/m): spec.topics[0]: \"a/#/b\": # is only allowed as the last level",
        "document 3 (NatsSource default/orders): spec.subject:",
        "document 3 (NatsSource default/orders): spec.consumer: a durable consumer needs spec.stream",
    ] {
        assert!(stderr.contains(needle), "{needle}\n{stderr}");
    }
}
