//! RedisStreamSource against a real `redis-server`: entries another consumer read and never
//! acknowledged (an importer that died) are claimed and sent, and entries the sink refused stay
//! pending until it takes them.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crds::RedisStreamSource;
use importers::redis::RedisConfig;
use importers::{MemorySink, SinkError, SourceContext, SourceMetrics};
use mecha_common::Shutdown;
use prometheus::Registry;
use test_support::servers::Server;

fn source(port: u16) -> RedisStreamSource {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "sources.knative.dev/v1alpha1",
        "kind": "RedisStreamSource",
        "metadata": {"name": "orders"},
        "spec": {
            "address": format!("127.0.0.1:{port}"),
            "stream": "orders",
            "group": "billing",
            "sink": {"uri": "http://127.0.0.1:1/"}
        }
    }))
    .unwrap()
}

fn pending(redis: &Server) -> usize {
    let summary = redis.redis_cli(&["XPENDING", "orders", "billing"]);
    summary.lines().next().unwrap().trim().parse().unwrap()
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn entries_a_dead_consumer_left_pending_are_claimed_and_acknowledged_after_the_sink() {
    let redis = Server::redis();
    redis.redis_cli(&["XGROUP", "CREATE", "orders", "billing", "$", "MKSTREAM"]);
    let id = redis.redis_cli(&["XADD", "orders", "*", "item", "book", "qty", "2"]);
    // A consumer of an importer that died: it read the entry and never acknowledged it.
    redis.redis_cli(&[
        "XREADGROUP",
        "GROUP",
        "billing",
        "ghost",
        "COUNT",
        "1",
        "STREAMS",
        "orders",
        ">",
    ]);
    assert_eq!(pending(&redis), 1);

    let sink = MemorySink::default();
    sink.refuse(Some(SinkError {
        code: 503,
        message: "down".into(),
        attempts: 1,
    }));
    let stop = Shutdown::new();
    let cx = SourceContext::new(
        (
            "RedisStreamSource".into(),
            "default".into(),
            "orders".into(),
        ),
        stop.signal(),
        Arc::new(sink.clone()),
        BTreeMap::new(),
        SourceMetrics::new(&Registry::new()),
    );
    let health = cx.health();
    let task = RedisConfig::from_resource(&source(redis.port))
        .unwrap()
        .with_claim_idle(Duration::from_millis(300))
        .build(cx);

    // Claimed from the ghost, refused by the sink: still pending, the source not ready.
    wait_until("the claimed entry refused", || {
        health
            .lock()
            .unwrap()
            .as_deref()
            .is_some_and(|r| r.contains("503"))
    })
    .await;
    let consumers = redis.redis_cli(&["XPENDING", "orders", "billing", "-", "+", "10"]);
    assert!(
        consumers.contains("billing-0"),
        "claimed by our consumer: {consumers}"
    );
    assert_eq!(
        pending(&redis),
        1,
        "nothing acknowledged while the sink refuses"
    );
    assert!(sink.events().is_empty());

    sink.refuse(None);
    let events = sink.wait_for(1).await;
    assert_eq!(events[0].id(), id);
    assert_eq!(
        events[0].string("type").as_deref(),
        Some("dev.knative.sources.redisstream")
    );
    assert_eq!(
        events[0].data.as_deref(),
        Some(br#"["item","book","qty","2"]"#.as_slice())
    );
    wait_until("the entry acknowledged", || pending(&redis) == 0).await;
    assert!(health.lock().unwrap().is_none(), "ready again");
    stop.trigger();
    task.await.unwrap();
}
