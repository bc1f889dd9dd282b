//! RedisStreamSource: entries of a Redis stream, read through a consumer group and
//! acknowledged (`XACK`) only after the sink answered 2xx.
//!
//! Each of the `consumers` has a stable name (`{group}-{i}`), so after a crash or a restart it
//! first reads its own pending entries again (`XREADGROUP … 0`), then takes over entries other
//! consumers left pending for longer than [`CLAIM_IDLE`] (`XAUTOCLAIM`: a consumer that no
//! longer exists, or an importer that died), then reads new entries (`>`). While the sink
//! fails, the entry stays pending and is sent again (its idle time reset with `XCLAIM` every
//! 10 s while it is being delivered, so no other consumer takes it meanwhile). Knative's adapter acks even when the send failed.
//!
//! The event is Knative's: type `dev.knative.sources.redisstream`, source `{address}/{stream}`,
//! id the entry id, data the entry's fields and values as a JSON array of strings
//! (`["field", "value", …]`, in the entry's order). Knative's Go adapter marshals the values as
//! byte slices, i.e. base64 strings; Mecha sends the text (bytes that are not UTF-8 become
//! U+FFFD).

use std::time::Duration;

use crds::RedisStreamSource;
use eventing_broker::Event;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Value};
use tokio::task::{JoinHandle, JoinSet};

use crate::context::SourceContext;

pub const EVENT_TYPE: &str = crds::queues::REDIS_EVENT_TYPE;
/// How long a read waits for new entries before it looks for abandoned ones again.
const BLOCK: Duration = Duration::from_secs(5);
/// Entries pending this long with another consumer are taken over.
const CLAIM_IDLE: Duration = Duration::from_secs(60);
/// Entries read at once.
const COUNT: usize = 16;
/// First pause before connecting again; doubles up to [`MAX_RECONNECT`].
const RECONNECT: Duration = Duration::from_secs(1);
const MAX_RECONNECT: Duration = Duration::from_secs(30);

/// What the source connects with, read from the resource.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// The client URL (may hold a password: never logged).
    url: String,
    /// `redis://host:port`, for logs and statuses.
    display: String,
    stream: String,
    group: String,
    consumers: usize,
    source: String,
    /// Entries pending this long with another consumer are taken over ([`CLAIM_IDLE`]).
    claim_idle: Duration,
}

/// One stream entry: its id and its field/value pairs in order (`None` when it was deleted
/// from the stream while pending).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub fields: Option<Vec<(String, String)>>,
}

// === impl RedisConfig ===

impl RedisConfig {
    pub fn from_resource(source: &RedisStreamSource) -> Result<Self, String> {
        let endpoint = source.endpoint()?;
        let address = &source.spec.address;
        let url = if address.contains("://") {
            address.clone()
        } else {
            format!("redis://{address}")
        };
        Ok(Self {
            url,
            display: endpoint.display(),
            stream: source.spec.stream.clone(),
            group: source.group(),
            consumers: usize::try_from(source.consumers()).unwrap_or(1).max(1),
            source: source.event_source(),
            claim_idle: CLAIM_IDLE,
        })
    }

    /// Takes over other consumers' entries after `idle` instead of [`CLAIM_IDLE`] (tests).
    pub fn with_claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// The event of one entry.
    pub fn event(&self, entry: &Entry) -> Event {
        let mut event = Event::new(&entry.id, &self.source, EVENT_TYPE);
        let values: Vec<&str> = entry
            .fields
            .iter()
            .flatten()
            .flat_map(|(f, v)| [f.as_str(), v.as_str()])
            .collect();
        event.set("datacontenttype", "application/json");
        event.data = Some(serde_json::to_vec(&values).unwrap_or_default().into());
        event
    }

    /// Runs the consumers until the context's shutdown, connecting again (with backoff) after
    /// any failure; the source is not ready while it cannot reach Redis.
    pub fn build(self, cx: SourceContext) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut pause = RECONNECT;
            loop {
                let error = tokio::select! {
                    result = self.run(&cx) => match result {
                        Ok(()) => return,
                        Err(error) => error,
                    },
                    () = cx.shutdown.clone().recv() => return,
                };
                cx.set_problem(Some(format!(
                    "redis {} stream {:?}: {error}; connecting again in {pause:?}",
                    self.display, self.stream
                )));
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = cx.shutdown.clone().recv() => return,
                }
                pause = (pause * 2).min(MAX_RECONNECT);
            }
        })
    }

    async fn connect(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        let client = Client::open(self.url.as_str())?;
        // A blocked read answers within BLOCK; a server that says nothing for longer is gone.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(BLOCK + Duration::from_secs(10)));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Creates the group (and the stream) when missing, then runs every consumer, each on a
    /// connection of its own (a blocked read holds its connection). Returns the first error.
    async fn run(&self, cx: &SourceContext) -> Result<(), String> {
        let mut conn = self.connect().await.map_err(|e| e.to_string())?;
        let created: Result<Value, redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(_) => {
                tracing::info!(stream = %self.stream, group = %self.group, "created the consumer group (new entries only)");
            }
            Err(error) if error.code() == Some("BUSYGROUP") => {}
            Err(error) => return Err(format!("XGROUP CREATE: {error}")),
        }
        let mut consumers = JoinSet::new();
        for i in 0..self.consumers {
            let conn = self.connect().await.map_err(|e| e.to_string())?;
            let (config, cx) = (self.clone(), cx.clone());
            consumers.spawn(async move { config.consume(&cx, conn, i).await });
        }
        cx.set_problem(None);
        while let Some(result) = consumers.join_next().await {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(error.to_string()),
                Err(error) => return Err(format!("a consumer task ended: {error}")),
            }
        }
        Ok(())
    }

    /// One consumer: its own pending entries, then abandoned ones, then new ones, each sent
    /// and acknowledged in order. `Ok` on shutdown.
    async fn consume(
        &self,
        cx: &SourceContext,
        mut conn: MultiplexedConnection,
        i: usize,
    ) -> Result<(), redis::RedisError> {
        let consumer = format!("{}-{i}", self.group);
        // What this consumer had read and not acknowledged before a crash or a restart.
        loop {
            let entries = self.read(&mut conn, &consumer, "0", None).await?;
            if entries.is_empty() {
                break;
            }
            if !self.process(cx, &mut conn, &consumer, entries).await? {
                return Ok(());
            }
        }
        loop {
            let mut cursor = "0-0".to_string();
            loop {
                let (next, entries) = self.autoclaim(&mut conn, &consumer, &cursor).await?;
                if !entries.is_empty() {
                    tracing::info!(stream = %self.stream, %consumer, count = entries.len(), "took over entries another consumer left pending");
                }
                if !self.process(cx, &mut conn, &consumer, entries).await? {
                    return Ok(());
                }
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
            let entries = tokio::select! {
                entries = self.read(&mut conn, &consumer, ">", Some(BLOCK)) => entries?,
                () = cx.shutdown.clone().recv() => return Ok(()),
            };
            if !self.process(cx, &mut conn, &consumer, entries).await? {
                return Ok(());
            }
        }
    }

    /// Sends each entry and acknowledges it once the sink took it; `false` on shutdown.
    async fn process(
        &self,
        cx: &SourceContext,
        conn: &mut MultiplexedConnection,
        consumer: &str,
        entries: Vec<Entry>,
    ) -> Result<bool, redis::RedisError> {
        for entry in entries {
            if entry.fields.is_some() {
                let sent = cx
                    .emit_acked(self.event(&entry), Some(self.claim_idle / 6), || {
                        // Still ours: reset its idle time so no other consumer takes it over.
                        let mut keep = conn.clone();
                        let mut claim = redis::cmd("XCLAIM");
                        claim
                            .arg(&self.stream)
                            .arg(&self.group)
                            .arg(consumer)
                            .arg(0)
                            .arg(&entry.id)
                            .arg("JUSTID");
                        async move {
                            let _: Result<Value, _> = claim.query_async(&mut keep).await;
                        }
                    })
                    .await;
                if !sent {
                    return Ok(false);
                }
            }
            // A deleted entry (no fields) cannot be sent; acknowledging it clears it.
            let _: Value = redis::cmd("XACK")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&entry.id)
                .query_async(conn)
                .await?;
        }
        Ok(true)
    }

    async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        consumer: &str,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Vec<Entry>, redis::RedisError> {
        let mut command = redis::cmd("XREADGROUP");
        command
            .arg("GROUP")
            .arg(&self.group)
            .arg(consumer)
            .arg("COUNT")
            .arg(COUNT);
        if let Some(block) = block {
            command
                .arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX));
        }
        let reply: Value = command
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(from)
            .query_async(conn)
            .await?;
        Ok(read_reply(&reply))
    }

    async fn autoclaim(
        &self,
        conn: &mut MultiplexedConnection,
        consumer: &str,
        cursor: &str,
    ) -> Result<(String, Vec<Entry>), redis::RedisError> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(consumer)
            .arg(u64::try_from(self.claim_idle.as_millis()).unwrap_or(u64::MAX))
            .arg(cursor)
            .arg("COUNT")
            .arg(COUNT)
            .query_async(conn)
            .await?;
        let Value::Array(parts) = reply else {
            return Ok(("0-0".into(), Vec::new()));
        };
        let next = parts.first().and_then(text).unwrap_or_else(|| "0-0".into());
        let entries = parts.get(1).map(entries).unwrap_or_default();
        Ok((next, entries))
    }
}

/// `XREADGROUP`'s reply: `[[stream, [[id, [field, value, …] | nil], …]]]`, or nil.
pub fn read_reply(reply: &Value) -> Vec<Entry> {
    let Value::Array(streams) = reply else {
        return Vec::new();
    };
    streams
        .iter()
        .filter_map(|stream| match stream {
            Value::Array(pair) if pair.len() == 2 => Some(entries(&pair[1])),
            _ => None,
        })
        .flatten()
        .collect()
}

fn entries(value: &Value) -> Vec<Entry> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(parts) = item else {
                return None;
            };
            let id = parts.first().and_then(text)?;
            let fields = match parts.get(1) {
                Some(Value::Array(flat)) => Some(
                    flat.chunks(2)
                        .map(|pair| {
                            (
                                pair.first().and_then(text).unwrap_or_default(),
                                pair.get(1).and_then(text).unwrap_or_default(),
                            )
                        })
                        .collect(),
                ),
                _ => None,
            };
            Some(Entry { id, fields })
        })
        .collect()
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn replies_keep_the_order_of_fields_and_mark_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("orders"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("b"), bulk("2"), bulk("a"), bulk("1")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = read_reply(&reply);
        assert_eq!(
            entries,
            [
                Entry {
                    id: "1-0".into(),
                    fields: Some(vec![("b".into(), "2".into()), ("a".into(), "1".into())]),
                },
                Entry {
                    id: "2-0".into(),
                    fields: None,
                },
            ]
        );
        assert!(read_reply(&Value::Nil).is_empty());
    }
}
