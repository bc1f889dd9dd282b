//! The broker's durable event log, as the runtime needs it: append with a durable
//! acknowledgement, a durable consumer per trigger that hands out events from where the trigger
//! got and takes acknowledgements, and retention of what every trigger has handled.
//!
//! Two implementations: [`RedbLog`], an embedded file on local disk (the default of `mecha up`),
//! and, with the `jetstream` feature, [`jetstream::JetStreamLog`] on a NATS JetStream server or
//! cluster. The runtime holds an `Arc<dyn EventLog>` (see docs/architecture.md for why not a type
//! parameter), so the log is chosen at run time by a flag.
//!
//! The contract both keep (pinned by `tests/log_contract.rs`, run against each backend):
//! - [`EventLog::append`] resolves only once the events are durably stored; then every
//!   consumer of the broker that existed before the append will be handed them.
//! - A new consumer starts at the broker's head (events appended before it are not its
//!   business, as in Knative); [`EventLog::consumer`] records that position durably before it
//!   returns.
//! - A consumer hands events out in log order. An event handed out and not acknowledged is
//!   handed out again to a later consumer of the same trigger (after a restart, or after the
//!   runtime restarts a failed trigger): at-least-once, never lost.
//! - Retention never removes an event some consumer of its broker has not acknowledged, except
//!   by the limits the log was configured with (the JetStream stream's age and size);
//!   [`EventLog::maintain`] reports, per broker, how many events some consumer has not
//!   acknowledged.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use bytes::Bytes;

#[cfg(feature = "jetstream")]
pub mod jetstream;
mod journal;
pub mod redb;

pub use self::redb::{Fault, Progress, RedbLog, RedbOptions};

/// `file` in a fresh directory of its own for a unit test named `name`.
#[cfg(test)]
pub(crate) fn temp_file(name: &str, file: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mecha-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(file)
}

/// What every log operation returns: boxed, so that the trait stays usable as `dyn EventLog`.
pub type LogFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LogError>> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log storage: {0}")]
    Storage(String),
    #[error("the event log is shut down")]
    Closed,
    /// The log cannot take or hand out events right now (its server is unreachable); the
    /// caller should try again later.
    #[error("the event log is unavailable: {0}")]
    Unavailable(String),
    /// Only said when the lock really is held: a damaged file is not another process's fault.
    #[error(
        "the event log {} is in use by another process (is another `mecha up` using this --state-dir, or another broker this file?)",
        .0.display()
    )]
    InUse(PathBuf),
    #[error(
        "the event log {p} is damaged ({detail}): move it aside (for example `mv {p} {p}.damaged`) to start with an empty log; the events accepted into it and not yet delivered are then lost",
        p = path.display()
    )]
    Damaged { path: PathBuf, detail: String },
    #[error(
        "the event log's journal {p} is damaged ({detail}): the events accepted in about the last second before it was damaged may be in it and nowhere else. Move it aside (for example `mv {p} {p}.damaged`) to start with the events the store holds",
        p = path.display()
    )]
    JournalDamaged { path: PathBuf, detail: String },
    #[error(
        "the event log writer has stopped ({0}): nothing can be stored until `mecha up` restarts"
    )]
    WriterStopped(String),
}

/// One event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Names the event for deduplication (the event's `source` and `id`): a log that
    /// deduplicates stores a record whose key it has seen recently only once.
    pub key: String,
    /// The event as stored (structured-mode JSON).
    pub data: Vec<u8>,
}

/// The seam between the broker runtime and where its events live.
///
/// `broker` is a broker's key (`namespace/name`); `trigger` is a trigger's key, unique across
/// brokers (`namespace/broker/name`).
pub trait EventLog: Send + Sync + std::fmt::Debug + 'static {
    /// Appends `records` to `broker`'s log, in order; resolves once they are durably stored.
    fn append<'a>(&'a self, broker: &'a str, records: Vec<Record>) -> LogFuture<'a, ()>;

    /// The durable consumer of `trigger` on `broker`: created at the broker's head when the
    /// trigger is new (durably, before this resolves), resumed where it got otherwise. One
    /// consumer per trigger is in use at a time.
    fn consumer<'a>(
        &'a self,
        broker: &'a str,
        trigger: &'a str,
    ) -> LogFuture<'a, Box<dyn Consumer>>;

    /// Forgets `trigger`'s consumer and its position: its events no longer hold retention.
    fn remove_consumer<'a>(&'a self, broker: &'a str, trigger: &'a str) -> LogFuture<'a, ()>;

    /// Periodic housekeeping for the current `brokers` (records consumer positions and applies
    /// retention where the log does not do that itself). Returns how many events each broker's
    /// log holds that some consumer has not acknowledged, where the log knows it.
    fn maintain<'a>(&'a self, brokers: &'a [String]) -> LogFuture<'a, Vec<(String, u64)>>;

    /// Resolves when the log would like [`EventLog::maintain`] called before its next tick.
    fn maintenance_due(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::pending())
    }

    /// What is wrong with the log right now, or `None`; readiness reports it.
    fn problem(&self) -> Option<String>;

    /// Bytes the log takes on local disk, where that means something.
    fn size_bytes(&self) -> Option<u64> {
        None
    }

    /// Stops taking writes once what is queued is stored.
    fn close(&self) -> LogFuture<'_, ()>;
}

/// One trigger's durable consumer.
pub trait Consumer: Send {
    /// Up to `max` events in log order. The first call returns at once with what is there
    /// (possibly nothing), so the caller learns that the log can be read; later calls wait
    /// for at least one event. A future dropped before it resolves loses nothing for good,
    /// but a log that pulls from a server hands out what it had pulled only after that
    /// event's acknowledgement deadline: let it run to completion in normal operation.
    fn fetch(&mut self, max: usize) -> LogFuture<'_, Vec<Message>>;
}

/// An event handed out by a [`Consumer`]; [`Message::ack`] once it was delivered,
/// dead-lettered or dropped by the rules. Dropped without an acknowledgement, it is handed out
/// again.
pub struct Message {
    /// Its position in the broker's log.
    pub seq: u64,
    pub data: Bytes,
    acker: Box<dyn Acker>,
}

/// How a backend takes one message's acknowledgement.
pub trait Acker: Send {
    fn ack(self: Box<Self>) -> LogFuture<'static, ()>;

    /// Hands the message back unhandled, so that it is handed out again as soon as the log
    /// can (to another replica consuming the same trigger); by default it simply waits for
    /// its acknowledgement deadline, or the next start.
    fn release(self: Box<Self>) -> LogFuture<'static, ()> {
        Box::pin(async { Ok(()) })
    }
}

// === impl Message ===

impl Message {
    pub fn new(seq: u64, data: Bytes, acker: Box<dyn Acker>) -> Self {
        Self { seq, data, acker }
    }

    /// Marks the event handled for this trigger.
    pub async fn ack(self) -> Result<(), LogError> {
        self.acker.ack().await
    }

    /// Hands the event back unhandled (a broker that is stopping): it is delivered again.
    /// A release that does not reach the log costs only time.
    pub async fn release(self) {
        let seq = self.seq;
        if let Err(error) = self.acker.release().await {
            tracing::debug!(seq, %error, "cannot hand an event back; it is handed out again after its deadline");
        }
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("seq", &self.seq)
            .field("len", &self.data.len())
            .finish_non_exhaustive()
    }
}
