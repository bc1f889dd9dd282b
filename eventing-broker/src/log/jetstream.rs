//! The event log on NATS JetStream (feature `jetstream`): a stream per broker, a durable pull
//! consumer per trigger with explicit acknowledgements. For brokers that must outlive a machine:
//! with a three-node NATS cluster and `replicas=3`, an event is acknowledged to the ingress only
//! once a majority stored it.
//!
//! - **Stream** `KN_BROKER_{namespace}__{name}` (Knative-natss's shape; Kubernetes names have no
//!   `_`, so a `.` in a broker's name becomes `_` without clashing), one subject of the same
//!   name, file storage, created on first use with the configured replicas and retention.
//! - **Append** publishes each record with `Nats-Msg-Id` = the event's `source` and `id`, so a
//!   client's retried POST is stored once within the duplicate window, and resolves only once
//!   every publish is acknowledged. While the connection is down it fails at once with
//!   [`LogError::Unavailable`] (the ingress answers 503 with `Retry-After`).
//! - **Consumer** per trigger: durable (named after the trigger), deliver policy `new` (a new
//!   trigger starts at the head), explicit acks, no delivery limit (the runtime's retry rules
//!   decide, see docs/architecture.md), `AckWait` from the settings; an event being worked on
//!   is kept from redelivery with "in progress" acknowledgements every third of `AckWait`.
//! - **Retention** `limits` by default: events are kept by age (`max-age`, seven days) and size;
//!   `interest` removes an event once every trigger's consumer acknowledged it (see
//!   [`Retention::Interest`] for why it is not the default).
//! - **Several brokers** (the standalone binary's replicas) may use one stream: each opens the
//!   same durable consumer per trigger and pulls from it, so each event goes to one of them per
//!   trigger, and what one took and did not acknowledge goes to another after `AckWait` (at
//!   once when it was handed back, [`Acker::release`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use async_nats::{HeaderMap, connection::State};
use bytes::Bytes;
use futures_util::StreamExt;

use super::{Acker, Consumer, EventLog, LogError, LogFuture, Message, Record};

/// How long [`JetStreamLog::connect`] waits for the first connection before going on.
const FIRST_CONNECT: Duration = Duration::from_secs(5);
/// Longest wait for an answer of the server (a publish acknowledgement, a stream lookup).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the stream keeps an event by default (as Kafka's default retention): a trigger
/// stalled for longer loses what is older.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a consumer's waiting pull lasts before it is made again.
const WAIT_PULL: Duration = Duration::from_secs(5);

/// How the log's streams and consumers are made; parsed from the `--event-log` URL's query.
#[derive(Debug, Clone, PartialEq)]
pub struct JetStreamConfig {
    /// `nats://host:port` (several, comma-separated, for a cluster).
    pub servers: String,
    /// Stream replicas (1 for one server, 3 for a cluster).
    pub replicas: usize,
    pub retention: Retention,
    /// Events older than this are removed whatever their state; zero keeps them.
    pub max_age: Duration,
    /// The stream's size limit in bytes; -1: none.
    pub max_bytes: i64,
    /// How long a `Nats-Msg-Id` is remembered for deduplication.
    pub duplicate_window: Duration,
    /// How long an event handed to a trigger may go without news before it is handed out
    /// again.
    pub ack_wait: Duration,
    /// Events a trigger may hold unacknowledged.
    pub max_ack_pending: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Kept by age and size only (`max-age`, `max-bytes`): the default.
    Limits,
    /// The server's interest retention: removed once every consumer acknowledged it. With
    /// Debian's nats-server 2.9.10 we saw events accepted just before a clean restart lost
    /// (see docs/architecture.md); use it with a newer server only.
    Interest,
}

/// The log on a NATS server or cluster; cheap to clone.
#[derive(Clone)]
pub struct JetStreamLog {
    inner: Arc<Inner>,
}

struct Inner {
    config: JetStreamConfig,
    client: async_nats::Client,
    context: jetstream::Context,
    /// Streams known to exist, by broker key.
    streams: Mutex<HashMap<String, stream::Stream>>,
}

struct JetStreamConsumer {
    client: async_nats::Client,
    consumer: consumer::PullConsumer,
    /// A pull that waits for the next event; kept across calls so that a dropped `fetch`
    /// loses nothing.
    waiting: Option<consumer::pull::Batch>,
    first: bool,
    ack_wait: Duration,
}

struct JetStreamAck {
    message: Arc<jetstream::Message>,
    /// Sends "in progress" while the event is worked on.
    keepalive: tokio::task::JoinHandle<()>,
}

// === impl JetStreamConfig ===

impl JetStreamConfig {
    /// `nats://HOST:PORT[,nats://HOST:PORT…][?replicas=3&retention=interest|limits&max-age=…
    /// &max-bytes=…&duplicate-window=…&ack-wait=…&max-ack-pending=…]`; durations in Go's
    /// syntax (`30s`, `24h`).
    pub fn from_url(url: &str) -> Result<Self, String> {
        let (servers, query) = url.split_once('?').unwrap_or((url, ""));
        if !servers
            .split(',')
            .all(|s| s.starts_with("nats://") && s.len() > "nats://".len())
        {
            return Err(format!("{servers}: expected nats://HOST:PORT"));
        }
        let mut config = Self {
            servers: servers.to_string(),
            ..Self::default()
        };
        let duration = |key: &str, value: &str| {
            crds::autoscaling::parse_go_duration(value).map_err(|e| format!("{key}: {e}"))
        };
        let number = |key: &str, value: &str| {
            value
                .parse::<i64>()
                .map_err(|_| format!("{key}: {value:?} is not a whole number"))
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "replicas" => {
                    config.replicas = match number(key, value)? {
                        n @ 1..=5 => usize::try_from(n).unwrap_or(1),
                        _ => return Err(format!("replicas: {value} is not between 1 and 5")),
                    }
                }
                "retention" => {
                    config.retention = match value {
                        "interest" => Retention::Interest,
                        "limits" => Retention::Limits,
                        _ => {
                            return Err(format!(
                                "retention: {value:?} is neither limits nor interest"
                            ));
                        }
                    }
                }
                "max-age" => config.max_age = duration(key, value)?,
                "max-bytes" => config.max_bytes = number(key, value)?,
                "duplicate-window" => config.duplicate_window = duration(key, value)?,
                "ack-wait" => match duration(key, value)? {
                    wait if wait >= Duration::from_secs(1) => config.ack_wait = wait,
                    _ => return Err("ack-wait: must be at least 1s".into()),
                },
                "max-ack-pending" => match number(key, value)? {
                    n if n > 0 => config.max_ack_pending = n,
                    _ => return Err("max-ack-pending: must be more than 0".into()),
                },
                other => {
                    return Err(format!(
                        "unknown setting {other:?} (known: replicas, retention, max-age, max-bytes, duplicate-window, ack-wait, max-ack-pending)"
                    ));
                }
            }
        }
        Ok(config)
    }
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        Self {
            servers: "nats://127.0.0.1:4222".into(),
            replicas: 1,
            retention: Retention::Limits,
            max_age: DEFAULT_MAX_AGE,
            max_bytes: -1,
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1000,
        }
    }
}

// === impl JetStreamLog ===

impl std::fmt::Debug for JetStreamLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamLog")
            .field("servers", &self.inner.config.servers)
            .finish_non_exhaustive()
    }
}

impl JetStreamLog {
    /// Connects (waiting for the server if it is not up yet: the client keeps retrying with
    /// backoff, and reconnects the same way whenever the connection is lost).
    pub async fn connect(config: JetStreamConfig) -> Result<Self, LogError> {
        let client = async_nats::ConnectOptions::new()
            .name("mecha-broker")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(config.servers.split(',').collect::<Vec<&str>>())
            .await
            .map_err(|e| LogError::Unavailable(format!("{}: {e}", config.servers)))?;
        // Give the first connection a moment, so that a log opened next to a running server is
        // usable at once; if the server is down, go on anyway: the client keeps trying, and
        // until it connects the log reports the problem and the ingress answers 503.
        let deadline = tokio::time::Instant::now() + FIRST_CONNECT;
        while client.connection_state() != State::Connected
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if client.connection_state() != State::Connected {
            tracing::warn!(servers = %config.servers, "NATS is not reachable yet; the broker is not ready until it is");
        }
        let mut context = jetstream::new(client.clone());
        context.set_timeout(REQUEST_TIMEOUT);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                client,
                context,
                streams: Mutex::default(),
            }),
        })
    }

    pub fn config(&self) -> &JetStreamConfig {
        &self.inner.config
    }

    fn connected(&self) -> Result<(), LogError> {
        match self.inner.client.connection_state() {
            State::Connected => Ok(()),
            _ => Err(LogError::Unavailable(format!(
                "NATS at {} is not reachable; reconnecting",
                self.inner.config.servers
            ))),
        }
    }

    /// The broker's stream, created on first use.
    async fn stream(&self, broker: &str) -> Result<stream::Stream, LogError> {
        if let Some(stream) = lock(&self.inner.streams).get(broker) {
            return Ok(stream.clone());
        }
        // Fail at once rather than wait for a request's timeout: the runtime retries.
        self.connected()?;
        let config = &self.inner.config;
        let name = stream_name(broker);
        let stream = self
            .inner
            .context
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![name.clone()],
                retention: match config.retention {
                    Retention::Interest => stream::RetentionPolicy::Interest,
                    Retention::Limits => stream::RetentionPolicy::Limits,
                },
                storage: stream::StorageType::File,
                num_replicas: config.replicas,
                max_age: config.max_age,
                max_bytes: config.max_bytes,
                duplicate_window: config.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&format!("stream {name}"), e))?;
        lock(&self.inner.streams).insert(broker.to_string(), stream.clone());
        Ok(stream)
    }

    /// Forgets a stream that failed, so the next use looks it up (or makes it) again.
    fn forget(&self, broker: &str) {
        lock(&self.inner.streams).remove(broker);
    }

    async fn publish(&self, broker: &str, records: Vec<Record>) -> Result<(), LogError> {
        self.connected()?;
        let subject = stream_name(broker);
        self.stream(broker).await?;
        let mut acks = Vec::with_capacity(records.len());
        for record in records {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", record.key.as_str());
            let ack = self
                .inner
                .context
                .publish_with_headers(subject.clone(), headers, Bytes::from(record.data))
                .await
                .map_err(|e| unavailable("publish", e))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| {
                self.forget(broker);
                unavailable("publish acknowledgement", e)
            })?;
        }
        Ok(())
    }

    async fn open_consumer(
        &self,
        broker: &str,
        trigger: &str,
    ) -> Result<JetStreamConsumer, LogError> {
        let stream = self.stream(broker).await?;
        let name = consumer_name(trigger);
        let config = &self.inner.config;
        let consumer = stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    deliver_policy: consumer::DeliverPolicy::New,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    max_deliver: -1,
                    max_ack_pending: config.max_ack_pending,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                self.forget(broker);
                unavailable(&format!("consumer {name}"), e)
            })?;
        Ok(JetStreamConsumer {
            client: self.inner.client.clone(),
            consumer,
            waiting: None,
            first: true,
            ack_wait: config.ack_wait,
        })
    }

    /// Each broker's backlog: the events after the lowest acknowledgement floor of its
    /// consumers. (Purging below that floor ourselves, as the embedded log deletes, lost
    /// unacknowledged events with nats-server 2.9.10, so retention is the stream's own.)
    async fn backlog(&self, brokers: &[String]) -> Result<Vec<(String, u64)>, LogError> {
        let mut out = Vec::new();
        for broker in brokers {
            let known = lock(&self.inner.streams).get(broker).cloned();
            // No stream yet: nothing was ever stored.
            let Some(mut stream) = known else {
                out.push((broker.clone(), 0));
                continue;
            };
            let state = stream
                .info()
                .await
                .map_err(|e| unavailable("stream info", e))?
                .state
                .clone();
            let mut floor = state.last_sequence;
            let mut consumers = stream.consumers();
            while let Some(info) = consumers.next().await {
                let info = info.map_err(|e| unavailable("consumer info", e))?;
                floor = floor.min(info.ack_floor.stream_sequence);
            }
            out.push((broker.clone(), state.last_sequence.saturating_sub(floor)));
        }
        Ok(out)
    }
}

impl EventLog for JetStreamLog {
    fn append<'a>(&'a self, broker: &'a str, records: Vec<Record>) -> LogFuture<'a, ()> {
        Box::pin(self.publish(broker, records))
    }

    fn consumer<'a>(
        &'a self,
        broker: &'a str,
        trigger: &'a str,
    ) -> LogFuture<'a, Box<dyn Consumer>> {
        Box::pin(async move {
            let consumer = self.open_consumer(broker, trigger).await?;
            Ok(Box::new(consumer) as Box<dyn Consumer>)
        })
    }

    fn remove_consumer<'a>(&'a self, broker: &'a str, trigger: &'a str) -> LogFuture<'a, ()> {
        Box::pin(async move {
            let stream = self.stream(broker).await?;
            let name = consumer_name(trigger);
            match stream.delete_consumer(&name).await {
                Ok(_) => Ok(()),
                // Already gone.
                Err(error) if error.to_string().contains("not found") => Ok(()),
                Err(error) => Err(unavailable(&format!("deleting consumer {name}"), error)),
            }
        })
    }

    fn maintain<'a>(&'a self, brokers: &'a [String]) -> LogFuture<'a, Vec<(String, u64)>> {
        Box::pin(self.backlog(brokers))
    }

    fn problem(&self) -> Option<String> {
        self.connected().err().map(|e| e.to_string())
    }

    fn close(&self) -> LogFuture<'_, ()> {
        Box::pin(async move {
            // Acknowledgements still buffered in the client go out before it is dropped.
            let _ = self.inner.client.flush().await;
            Ok(())
        })
    }
}

// === impl JetStreamConsumer ===

impl JetStreamConsumer {
    fn message(&self, message: jetstream::Message) -> Result<Message, LogError> {
        let seq = message
            .info()
            .map(|info| info.stream_sequence)
            .map_err(|e| LogError::Storage(format!("a message without JetStream metadata: {e}")))?;
        let data = message.payload.clone();
        let message = Arc::new(message);
        let keepalive = {
            let message = message.clone();
            let every = self.ack_wait / 3;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            })
        };
        Ok(Message::new(
            seq,
            data,
            Box::new(JetStreamAck { message, keepalive }),
        ))
    }

    /// What can be had without waiting, up to `max`. A pull whose answer is lost with the
    /// connection would wait for ever: it is given up after [`REQUEST_TIMEOUT`] (what it took
    /// comes back after `AckWait`).
    async fn ready(&mut self, max: usize, out: &mut Vec<Message>) -> Result<(), LogError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.ready_now(max, out)).await {
            Ok(result) => result,
            Err(_) => Err(LogError::Unavailable(
                "fetch: no answer from NATS".to_string(),
            )),
        }
    }

    async fn ready_now(&mut self, max: usize, out: &mut Vec<Message>) -> Result<(), LogError> {
        if out.len() >= max {
            return Ok(());
        }
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(max - out.len())
            .messages()
            .await
            .map_err(|e| unavailable("fetch", e))?;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| unavailable("fetch", e))?;
            out.push(self.message(message)?);
        }
        Ok(())
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<Message>, LogError> {
        if self.client.connection_state() != State::Connected {
            // Fail now rather than wait on pulls the server will never see: the runtime
            // retries the trigger with backoff and reports it not ready meanwhile.
            return Err(LogError::Unavailable(
                "NATS is not reachable; reconnecting".to_string(),
            ));
        }
        let max = max.max(1);
        let mut out = Vec::new();
        loop {
            if let Some(waiting) = &mut self.waiting {
                match waiting.next().await {
                    Some(Ok(message)) => {
                        self.waiting = None;
                        out.push(self.message(message)?);
                        self.ready(max, &mut out).await?;
                        return Ok(out);
                    }
                    Some(Err(error)) => {
                        self.waiting = None;
                        return Err(unavailable("fetch", error));
                    }
                    // The pull expired with nothing: pull again.
                    None => self.waiting = None,
                }
                continue;
            }
            self.ready(max, &mut out).await?;
            if !out.is_empty() || std::mem::take(&mut self.first) {
                return Ok(out);
            }
            self.waiting = Some(
                self.consumer
                    .batch()
                    .max_messages(1)
                    // The client gives up on a pull 5 s after it expired: this bounds how long
                    // a pull lost with the connection goes unnoticed. (No idle heartbeats:
                    // this client's batch stalls until its timeout on one.)
                    .expires(WAIT_PULL)
                    .messages()
                    .await
                    .map_err(|e| unavailable("fetch", e))?,
            );
        }
    }
}

impl Consumer for JetStreamConsumer {
    fn fetch(&mut self, max: usize) -> LogFuture<'_, Vec<Message>> {
        Box::pin(self.next_batch(max))
    }
}

impl Acker for JetStreamAck {
    fn ack(self: Box<Self>) -> LogFuture<'static, ()> {
        self.keepalive.abort();
        Box::pin(async move {
            // Confirmed by the server: an acknowledgement lost on the way would only mean a
            // duplicate, but a confirmed one lets retention and tests rely on it.
            self.message
                .double_ack()
                .await
                .map_err(|e| unavailable("ack", e))
        })
    }

    fn release(self: Box<Self>) -> LogFuture<'static, ()> {
        self.keepalive.abort();
        Box::pin(async move {
            // Redelivered at once, to whichever consumer of the trigger pulls next.
            self.message
                .ack_with(AckKind::Nak(None))
                .await
                .map_err(|e| unavailable("nak", e))
        })
    }
}

impl Drop for JetStreamAck {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

/// `KN_BROKER_{namespace}__{name}` for the broker key `namespace/name`.
pub fn stream_name(broker: &str) -> String {
    let (namespace, name) = broker.split_once('/').unwrap_or(("", broker));
    format!("KN_BROKER_{namespace}__{}", name.replace('.', "_"))
}

/// The durable name of a trigger's consumer (its stream is its broker's, so the trigger's name
/// is unique there): the last part of the key `namespace/broker/name`.
pub fn consumer_name(trigger: &str) -> String {
    trigger
        .rsplit('/')
        .next()
        .unwrap_or(trigger)
        .replace('.', "_")
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(format!("{what}: {error}"))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_knative_natss_and_settings_parse_with_defaults() {
        assert_eq!(
            stream_name("default/my-broker"),
            "KN_BROKER_default__my-broker"
        );
        assert_eq!(stream_name("ns/a.b"), "KN_BROKER_ns__a_b");
        assert_eq!(consumer_name("ns/b/orders"), "orders");
        let config = JetStreamConfig::from_url("nats://127.0.0.1:4222").expect("plain");
        assert_eq!(config, JetStreamConfig::default());
        let config =
            JetStreamConfig::from_url("nats://a:1,nats://b:2?replicas=3&max-age=24h&ack-wait=10s")
                .expect("settings");
        assert_eq!(config.servers, "nats://a:1,nats://b:2");
        assert_eq!(config.replicas, 3);
        assert_eq!(config.retention, Retention::Limits);
        assert_eq!(config.max_age, Duration::from_secs(86_400));
        assert_eq!(config.ack_wait, Duration::from_secs(10));
        let config = JetStreamConfig::from_url("nats://a:1?retention=interest&max-age=0s")
            .expect("interest");
        assert_eq!(config.retention, Retention::Interest);
        assert_eq!(config.max_age, Duration::ZERO);
        for bad in [
            "http://x:1",
            "nats://x:1?replicas=7",
            "nats://x:1?retention=forever",
            "nats://x:1?colour=blue",
            "nats://x:1?ack-wait=10ms",
        ] {
            assert!(JetStreamConfig::from_url(bad).is_err(), "{bad}");
        }
    }
}
