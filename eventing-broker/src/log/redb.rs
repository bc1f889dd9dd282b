//! The durable event log: one append-only sequence per broker, a cursor per trigger, in an
//! embedded [redb](https://docs.rs/redb) database under the state directory.
//!
//! Every write goes through one writer thread. It takes whatever appends and cursor updates
//! are waiting, applies them all in one write transaction and commits once (one fsync), then
//! answers every waiter: group commit, so durability costs one fsync per batch, not per event,
//! and an append is answered only after its commit — the ingress's `202` means "on disk".
//!
//! Keys are `(broker, sequence)`; sequences start at 1 and only grow: a broker's last sequence
//! is its last event's, and retention records it in the heads table before it deletes events,
//! so sequences survive retention emptying the log while an append writes nothing but its
//! events. A trigger's cursor is the highest sequence below which it has handled everything.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use ::redb::{
    Builder, Database, DatabaseError, ReadableDatabase, ReadableTable, StorageError,
    TableDefinition,
};
use bytes::Bytes;
use tokio::sync::{Notify, oneshot, watch};

use super::journal::{self, Journal};
use super::{Acker, Consumer, EventLog, LogError, LogFuture, Message, Record};

const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
const HEADS: TableDefinition<&str, u64> = TableDefinition::new("heads");
/// Plain cursors, as logs written before [`Progress`] existed hold them; read, then replaced.
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
/// A trigger's [`Progress`], encoded by [`Progress::encode`].
const PROGRESS: TableDefinition<&str, &[u8]> = TableDefinition::new("progress");
/// Facts about the log itself: [`JOURNAL_GENERATION`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The journal generation every synced commit leaves current: a store that has one expects
/// its journal, and says so when it is gone.
const JOURNAL_GENERATION: &str = "journal-generation";

/// Most operations folded into one commit.
const MAX_BATCH: usize = 4096;

/// How the embedded log uses memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedbOptions {
    /// Bytes of recently committed events kept in memory, across brokers, from which every
    /// trigger takes new events without reading the file (see [`Tail`]); each event counts
    /// its length and [`TAIL_ENTRY_OVERHEAD`].
    pub tail_bytes: usize,
    /// The store's page cache in bytes (redb's own default is 1 GiB, which a backlog fills).
    pub cache_bytes: usize,
    /// How long the store's commits may go unsynced while appends keep coming (their events
    /// are durable in the journal); with [`journal::CHECKPOINT_BYTES`] it bounds what a start
    /// after a crash replays.
    pub sync_interval: std::time::Duration,
}

impl Default for RedbOptions {
    fn default() -> Self {
        Self {
            tail_bytes: 4 << 20,
            // What the writer touches per commit (the right edge of the events tree, the
            // heads and progress tables, redb's own tables) is a few hundred KiB, and a trigger
            // that reads the file re-reads pages the kernel caches anyway: more cache only
            // grows the broker's memory under a backlog (8 MiB measured 2.4x the idle RSS).
            cache_bytes: 2 << 20,
            sync_interval: std::time::Duration::from_secs(1),
        }
    }
}

/// What one event in the tail costs besides its bytes: its slot in the queue (sequence and
/// `Bytes`, 40 bytes), the allocator's header and rounding, and the shared header a `Bytes`
/// allocates when first handed to a consumer. Counted, so that [`RedbOptions::tail_bytes`]
/// bounds the memory the tail holds, not only its payload (small events are mostly overhead).
pub const TAIL_ENTRY_OVERHEAD: usize = 96;

/// The events committed last, per broker, in order and without gaps: the writer adds each
/// commit's events (before it announces the new head), consumers whose position lies inside
/// take them from here (a shared `Bytes`, no copy and no read of the file), and the oldest
/// are dropped once the total passes [`RedbOptions::tail_bytes`]. A consumer that fell behind
/// the tail reads the file until it has caught up. Nothing waits for a consumer, so no trigger
/// can hold back another, and memory stays bounded.
#[derive(Debug, Default)]
struct Tail {
    brokers: HashMap<String, VecDeque<(u64, Bytes)>>,
    bytes: usize,
    limit: usize,
}

impl Tail {
    fn push(&mut self, broker: &str, first: u64, events: Vec<Bytes>) {
        let queue = match self.brokers.get_mut(broker) {
            Some(queue) => queue,
            None => self.brokers.entry(broker.to_string()).or_default(),
        };
        // Sequences only follow on: anything else (never expected) starts the queue afresh.
        if queue.back().is_some_and(|(last, _)| *last + 1 != first) {
            self.bytes -= queue
                .iter()
                .map(|(_, e)| e.len() + TAIL_ENTRY_OVERHEAD)
                .sum::<usize>();
            queue.clear();
        }
        for (i, event) in events.into_iter().enumerate() {
            self.bytes += event.len() + TAIL_ENTRY_OVERHEAD;
            queue.push_back((first + i as u64, event));
        }
        // The broker holding the most events gives up its oldest first, so that a busy
        // broker cannot push a quiet one's recent events out.
        while self.bytes > self.limit {
            let Some(queue) = self.brokers.values_mut().max_by_key(|q| q.len()) else {
                break;
            };
            let Some((_, event)) = queue.pop_front() else {
                break;
            };
            self.bytes -= event.len() + TAIL_ENTRY_OVERHEAD;
        }
    }

    /// Up to `max` events after `after`, if the tail holds everything from `after + 1` on
    /// (then an empty answer means there is nothing newer yet); `None` when the caller must
    /// read the file.
    fn read(&self, broker: &str, after: u64, max: usize) -> Option<Vec<(u64, Bytes)>> {
        let queue = self.brokers.get(broker)?;
        let (first, _) = queue.front()?;
        if *first > after.saturating_add(1) {
            return None;
        }
        // Sequences in the queue are contiguous: the position is arithmetic, not a walk.
        let skip = usize::try_from(after.saturating_add(1) - first).ok()?;
        let end = skip.saturating_add(max).min(queue.len());
        Some(queue.range(skip.min(end)..end).cloned().collect())
    }
}

/// How far a trigger got: everything up to `read_upto` was handled except the sequences in
/// `pending`, which were being delivered. Recording `pending` (at most the delivery concurrency)
/// instead of only "lowest pending − 1" keeps one slow event from making a crash redeliver
/// everything delivered after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub read_upto: u64,
    pub pending: Vec<u64>,
}

/// A failure to inject, for tests of what the broker does when its store misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[doc(hidden)]
pub enum Fault {
    None = 0,
    /// Reads fail with a storage error.
    ReadError = 1,
    /// Reads panic, as redb does on some corrupted pages.
    ReadPanic = 2,
    /// The writer panics on its next batch.
    WriterPanic = 3,
    /// The store behaves as after an I/O error (refuses writes until opened again) when the
    /// writer next checks it.
    StorePoisoned = 4,
    /// While set, the store refuses writes as after an I/O error and cannot be opened again
    /// (a disk that stays full).
    ReopenFails = 5,
    /// The journal's next start-over after a synced commit fails once its new header is
    /// written.
    StartOverFails = 6,
    /// The store's next commit fails after the round's events reached the journal.
    StoreCommitFails = 7,
}

/// A handle to the log; cheap to clone.
#[derive(Clone)]
pub struct RedbLog {
    inner: Arc<Inner>,
}

struct Inner {
    /// The store; `None` while the writer opens it again after an I/O error.
    db: std::sync::RwLock<Option<Arc<Database>>>,
    /// Whether the first open repaired the store (it was not closed cleanly).
    repaired_on_open: bool,
    /// How often the store was opened again, and how often that was tried.
    reopened: std::sync::atomic::AtomicU64,
    reopen_attempts: std::sync::atomic::AtomicU64,
    path: PathBuf,
    ops: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The last sequence appended, per broker, for dispatchers to wait on.
    heads: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// What is wrong right now, by what failed ("write", "read {broker}"); cleared by the next
    /// success of the same kind. Readiness reports it.
    problems: Mutex<BTreeMap<String, String>>,
    /// Why the writer thread stopped, if it did.
    writer_stopped: Mutex<Option<String>>,
    fault: AtomicU8,
    /// Every trigger with a consumer, by trigger key: where it got, and what was last recorded.
    consumers: Mutex<HashMap<String, Registered>>,
    /// How far each broker's log was last truncated, so an idle broker costs no writes.
    truncated: Mutex<HashMap<String, u64>>,
    /// Wakes the runtime's maintenance before its tick (a trigger reached [`CHECKPOINT_COUNT`]).
    due: Notify,
    tail: Mutex<Tail>,
}

/// A trigger that has finished this many events since its progress was last recorded asks for
/// a checkpoint at once, so that under load checkpoints keep pace by count, not only by time;
/// with the runtime's tick this bounds what a crash redelivers (see docs/architecture.md).
pub const CHECKPOINT_COUNT: usize = 256;

/// A trigger's progress through its broker's log, shared by its consumer and its messages.
#[derive(Debug, Default)]
struct Tracker {
    /// The last sequence handed out.
    read_upto: u64,
    /// Handed out and not acknowledged.
    pending: BTreeSet<u64>,
    /// Events acknowledged since the last checkpoint took a snapshot.
    unchecked: usize,
}

struct Registered {
    broker: String,
    tracker: Arc<Mutex<Tracker>>,
    /// What the last checkpoint recorded; `None` forces the next one to record.
    saved: Option<Progress>,
}

/// A trigger's consumer: first the events that were pending when it was opened, then what
/// follows `read_upto`.
struct RedbConsumer {
    log: RedbLog,
    broker: String,
    tracker: Arc<Mutex<Tracker>>,
    head: watch::Receiver<u64>,
    /// Pending when opened, to hand out again first (highest last: popped from the end).
    redo: Vec<u64>,
    /// The last sequence read.
    next: u64,
    first: bool,
}

struct RedbAck {
    log: RedbLog,
    tracker: Arc<Mutex<Tracker>>,
    seq: u64,
}

enum Op {
    Append {
        broker: String,
        events: Vec<Vec<u8>>,
        done: oneshot::Sender<Result<u64, String>>,
    },
    Cursors {
        set: Vec<(String, Progress)>,
        remove: Vec<String>,
        /// Delete a broker's events up to and including this sequence.
        truncate: Vec<(String, u64)>,
        done: oneshot::Sender<Result<u64, String>>,
    },
}

// === impl Progress ===

impl Progress {
    /// Little-endian `read_upto`, then each pending sequence.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * (1 + self.pending.len()));
        out.extend_from_slice(&self.read_upto.to_le_bytes());
        for seq in &self.pending {
            out.extend_from_slice(&seq.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(8) {
            return None;
        }
        let mut words = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()));
        let read_upto = words.next()?;
        Some(Self {
            read_upto,
            pending: words.collect(),
        })
    }

    /// The highest sequence below which everything was handled.
    pub fn cursor(&self) -> u64 {
        self.pending
            .iter()
            .min()
            .map_or(self.read_upto, |first| first - 1)
    }
}

/// The log holds every accepted event: a new one is created readable by its owner only, and
/// a symbolic link in its place is refused (it would put the events wherever it points).
fn owner_only_file(path: &Path) -> Result<(), LogError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(LogError::Storage(format!(
            "{} is a symbolic link; the event log must be a file of its own",
            path.display()
        ))),
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map(drop)
            .or_else(|error| match error.kind() {
                // Made by a racing opener: redb's lock decides between them.
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(LogError::Storage(format!("{}: {error}", path.display()))),
            }),
        Err(error) => Err(LogError::Storage(format!("{}: {error}", path.display()))),
    }
}

// === impl RedbLog ===

impl std::fmt::Debug for RedbLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbLog")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl RedbLog {
    /// Opens (or creates) the log at `path`, checks its integrity, and starts its writer
    /// thread. A damaged file is refused with [`LogError::Damaged`], a file another process
    /// holds with [`LogError::InUse`].
    pub fn open(path: &Path) -> Result<Self, LogError> {
        Self::open_with(path, RedbOptions::default())
    }

    /// [`RedbLog::open`] with memory settings.
    pub fn open_with(path: &Path, options: RedbOptions) -> Result<Self, LogError> {
        owner_only_file(path)?;
        let (db, repaired_on_open) = open_store(path, options.cache_bytes)?;
        if repaired_on_open {
            tracing::warn!(path = %path.display(), "the event log was not closed cleanly or was damaged, and has been repaired to its last intact commit");
        }
        let db = Arc::new(db);
        {
            // Create the tables so that readers never meet a missing one.
            let txn = db.begin_write().map_err(storage)?;
            txn.open_table(EVENTS).map_err(storage)?;
            txn.open_table(HEADS).map_err(storage)?;
            txn.open_table(CURSORS).map_err(storage)?;
            txn.open_table(PROGRESS).map_err(storage)?;
            txn.open_table(META).map_err(storage)?;
            txn.commit().map_err(storage)?;
        }
        let journal_path = journal_path(path);
        let mut journal = Journal::open(&journal_path).map_err(|error| {
            if error.kind() == std::io::ErrorKind::InvalidData {
                LogError::JournalDamaged {
                    path: journal_path.clone(),
                    detail: error.to_string(),
                }
            } else {
                LogError::Storage(format!("{}: {error}", journal_path.display()))
            }
        })?;
        if journal.created() {
            let expected = stored_generation(&db).map_err(storage)?;
            if let Some(generation) = expected {
                tracing::warn!(journal = %journal_path.display(), generation, "the event log's journal was missing and is new: the events accepted in about the last second before the log was last used, if it did not close cleanly, are lost");
            }
        }
        match replay(&db, &mut journal) {
            Ok((0, _)) => {}
            Ok((restored, _)) => {
                tracing::info!(path = %journal_path.display(), restored, "events the store had not synced were restored from the journal");
            }
            Err(error) => {
                return Err(LogError::Storage(format!(
                    "cannot restore the journal {} into the log: {error}",
                    journal_path.display()
                )));
            }
        }
        let sync_interval = options.sync_interval;
        let store = (path.to_path_buf(), options.cache_bytes);
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            db: std::sync::RwLock::new(Some(db.clone())),
            repaired_on_open,
            reopened: std::sync::atomic::AtomicU64::new(0),
            reopen_attempts: std::sync::atomic::AtomicU64::new(0),
            path: path.to_path_buf(),
            ops: Mutex::new(Some(tx)),
            writer: Mutex::default(),
            heads: Mutex::default(),
            problems: Mutex::default(),
            writer_stopped: Mutex::default(),
            fault: AtomicU8::new(Fault::None as u8),
            consumers: Mutex::default(),
            truncated: Mutex::default(),
            due: Notify::new(),
            tail: Mutex::new(Tail {
                limit: options.tail_bytes,
                ..Tail::default()
            }),
        });
        let weak = Arc::downgrade(&inner);
        let handle = std::thread::Builder::new()
            .name("event-log-writer".into())
            .spawn(move || {
                // The writer survives a panic in a batch (see `writer`); this catches anything
                // else, so that a dead writer is reported instead of leaving appends hanging.
                let died = catch_unwind(AssertUnwindSafe(|| {
                    writer(db, &store, journal, sync_interval, &rx, &weak)
                }));
                if let Err(panic) = died {
                    let why = format!("panicked: {}", panic_message(&*panic));
                    tracing::error!(reason = %why, "the event log writer stopped");
                    if let Some(inner) = weak.upgrade() {
                        *lock(&inner.writer_stopped) = Some(why.clone());
                        lock(&inner.problems)
                            .insert("write".into(), format!("the writer stopped: {why}"));
                    }
                }
            })
            .map_err(|e| LogError::Storage(format!("cannot start the writer: {e}")))?;
        *lock(&inner.writer) = Some(handle);
        Ok(Self { inner })
    }

    /// Appends `events` (serialized) to `broker`'s log; returns the sequence of the last one
    /// once they are committed to disk.
    pub async fn append(&self, broker: &str, events: Vec<Vec<u8>>) -> Result<u64, LogError> {
        let (done, rx) = oneshot::channel();
        self.send(Op::Append {
            broker: broker.to_string(),
            events,
            done,
        })?;
        rx.await
            .map_err(|_| self.writer_gone())?
            .map_err(LogError::Storage)
    }

    /// Records trigger progress, forgets removed triggers' cursors and deletes handled events,
    /// in one commit.
    pub async fn checkpoint(
        &self,
        set: Vec<(String, Progress)>,
        remove: Vec<String>,
        truncate: Vec<(String, u64)>,
    ) -> Result<(), LogError> {
        let (done, rx) = oneshot::channel();
        self.send(Op::Cursors {
            set,
            remove,
            truncate,
            done,
        })?;
        rx.await
            .map_err(|_| self.writer_gone())?
            .map(|_| ())
            .map_err(LogError::Storage)
    }

    fn send(&self, op: Op) -> Result<(), LogError> {
        let ops = lock(&self.inner.ops);
        ops.as_ref()
            .ok_or(LogError::Closed)?
            .send(op)
            .map_err(|_| self.writer_gone())
    }

    /// Why an operation got no answer: the writer stopped (and why), or the log was closed.
    fn writer_gone(&self) -> LogError {
        match lock(&self.inner.writer_stopped).clone() {
            Some(why) => LogError::WriterStopped(why),
            None => LogError::Closed,
        }
    }

    /// Stops accepting writes and waits for the writer to commit what is queued and exit.
    /// Then lets go of the store, so that redb closes the file cleanly even while clones of
    /// this handle live on (the next open then needs no repair, which reads the whole file).
    pub fn close(&self) {
        lock(&self.inner.ops).take();
        let handle = lock(&self.inner.writer).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        self.inner
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// What is wrong with the log right now (a failed commit, a broker's log that cannot be
    /// read, a stopped writer), or `None`.
    pub fn problem(&self) -> Option<String> {
        let problems = lock(&self.inner.problems);
        if problems.is_empty() {
            return None;
        }
        let all: Vec<String> = problems.values().cloned().collect();
        Some(format!(
            "event log {}: {}",
            self.inner.path.display(),
            all.join("; ")
        ))
    }

    /// Runs `read` on the store, unless it is being opened again after an I/O error or the
    /// log is closed. The store's lock is held for the whole read (its transaction holds the
    /// file open), so that opening it again or closing it waits for reads in flight instead
    /// of finding the file still in use.
    fn with_db<T>(
        &self,
        read: impl FnOnce(&Database) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        let db = self.inner.db.read().unwrap_or_else(PoisonError::into_inner);
        match db.as_deref() {
            Some(db) => read(db),
            None if lock(&self.inner.ops).is_none() => Err(LogError::Closed),
            None => Err(LogError::Unavailable(
                "the store is being opened again after an I/O error".into(),
            )),
        }
    }

    /// Whether opening the store found it not closed cleanly and repaired it.
    #[doc(hidden)]
    pub fn repaired_on_open(&self) -> bool {
        self.inner.repaired_on_open
    }

    /// How often the store was opened again after an I/O error.
    #[doc(hidden)]
    pub fn reopened(&self) -> u64 {
        self.inner.reopened.load(Ordering::Relaxed)
    }

    /// How often opening the store again was tried, successfully or not.
    #[doc(hidden)]
    pub fn reopen_attempts(&self) -> u64 {
        self.inner.reopen_attempts.load(Ordering::Relaxed)
    }

    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Fault) {
        self.inner.fault.store(fault as u8, Ordering::Relaxed);
    }

    fn fault(&self) -> u8 {
        self.inner.fault.load(Ordering::Relaxed)
    }

    /// Up to `limit` events of `broker` with sequence above `after`, in order.
    pub fn read(
        &self,
        broker: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, LogError> {
        // A panic inside the store (redb on a damaged page) becomes an error the trigger
        // reports, instead of unwinding through the dispatcher.
        let read = catch_unwind(AssertUnwindSafe(|| self.read_inner(broker, after, limit)))
            .unwrap_or_else(|panic| {
                Err(LogError::Storage(format!(
                    "the store panicked: {}",
                    panic_message(&*panic)
                )))
            });
        let key = format!("read {broker}");
        match &read {
            Ok(_) => {
                let mut problems = lock(&self.inner.problems);
                if problems.contains_key(&key) {
                    problems.remove(&key);
                }
            }
            Err(error) => {
                lock(&self.inner.problems).insert(key, format!("cannot read {broker}: {error}"));
            }
        }
        read
    }

    fn read_inner(
        &self,
        broker: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, LogError> {
        match self.fault() {
            1 => return Err(LogError::Storage("injected read failure".into())),
            2 => panic!("injected read panic"),
            _ => {}
        }
        self.with_db(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(EVENTS).map_err(storage)?;
            let range = table
                .range((broker, after.saturating_add(1))..=(broker, u64::MAX))
                .map_err(storage)?;
            let mut out = Vec::new();
            for entry in range.take(limit) {
                let (key, value) = entry.map_err(storage)?;
                out.push((key.value().1, Bytes::copy_from_slice(value.value())));
            }
            Ok(out)
        })
    }

    /// The event stored at `seq`, if it still is.
    pub fn read_one(&self, broker: &str, seq: u64) -> Result<Option<Bytes>, LogError> {
        let found = self.read(broker, seq.saturating_sub(1), 1)?;
        Ok(found
            .into_iter()
            .next()
            .filter(|(at, _)| *at == seq)
            .map(|(_, bytes)| bytes))
    }

    /// The last sequence given out for `broker` (0 when none).
    pub fn head(&self, broker: &str) -> u64 {
        *self.subscribe(broker).borrow()
    }

    /// Watches `broker`'s head: changes on every committed append.
    pub fn subscribe(&self, broker: &str) -> watch::Receiver<u64> {
        let mut heads = lock(&self.inner.heads);
        if let Some(head) = heads.get(broker) {
            return head.subscribe();
        }
        let stored = self.stored_head(broker).unwrap_or(0);
        let (tx, rx) = watch::channel(stored);
        heads.insert(broker.to_string(), tx);
        rx
    }

    fn stored_head(&self, broker: &str) -> Result<u64, LogError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let events = txn.open_table(EVENTS).map_err(storage)?;
            let heads = txn.open_table(HEADS).map_err(storage)?;
            last_sequence(&events, &heads, broker).map_err(storage)
        })
    }

    /// A trigger's stored cursor.
    pub fn cursor(&self, trigger: &str) -> Result<Option<u64>, LogError> {
        Ok(self.progress(trigger)?.map(|p| p.cursor()))
    }

    /// A trigger's stored progress.
    pub fn progress(&self, trigger: &str) -> Result<Option<Progress>, LogError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(PROGRESS).map_err(storage)?;
            if let Some(value) = table.get(trigger).map_err(storage)? {
                return Progress::decode(value.value()).map(Some).ok_or_else(|| {
                    LogError::Storage(format!("the progress of {trigger} is unreadable"))
                });
            }
            let table = txn.open_table(CURSORS).map_err(storage)?;
            Ok(table.get(trigger).map_err(storage)?.map(|v| Progress {
                read_upto: v.value(),
                pending: Vec::new(),
            }))
        })
    }

    /// Events stored for `broker` right now.
    pub fn len(&self, broker: &str) -> Result<u64, LogError> {
        self.with_db(|db| {
            let txn = db.begin_read().map_err(storage)?;
            let table = txn.open_table(EVENTS).map_err(storage)?;
            let count = table
                .range((broker, 0)..=(broker, u64::MAX))
                .map_err(storage)?
                .count();
            Ok(count as u64)
        })
    }

    /// Size of the database file in bytes.
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.inner.path).map_or(0, |m| m.len())
    }
}

// === impl RedbLog as EventLog ===

impl RedbLog {
    /// The consumer of `trigger`, registered: its tracker is kept across consumers (a
    /// restarted trigger task resumes where the last one got, redelivering its pending
    /// events); a trigger seen for the first time resumes from its stored progress, or starts
    /// at the head with that start recorded before this returns.
    async fn open_consumer(&self, broker: &str, trigger: &str) -> Result<RedbConsumer, LogError> {
        let known = lock(&self.inner.consumers)
            .get(trigger)
            .filter(|r| r.broker == broker)
            .map(|r| r.tracker.clone());
        let tracker = match known {
            Some(tracker) => tracker,
            None => {
                let stored = self.progress(trigger)?;
                let fresh = stored.is_none();
                let progress = stored.unwrap_or_else(|| Progress {
                    read_upto: self.head(broker),
                    pending: Vec::new(),
                });
                if fresh {
                    self.checkpoint(
                        vec![(trigger.to_string(), progress.clone())],
                        vec![],
                        vec![],
                    )
                    .await?;
                }
                let tracker = Arc::new(Mutex::new(Tracker {
                    read_upto: progress.read_upto,
                    pending: progress.pending.iter().copied().collect(),
                    unchecked: 0,
                }));
                lock(&self.inner.consumers).insert(
                    trigger.to_string(),
                    Registered {
                        broker: broker.to_string(),
                        tracker: tracker.clone(),
                        saved: Some(progress),
                    },
                );
                tracker
            }
        };
        let (redo, next) = {
            let t = lock(&tracker);
            (t.pending.iter().rev().copied().collect(), t.read_upto)
        };
        Ok(RedbConsumer {
            log: self.clone(),
            broker: broker.to_string(),
            tracker,
            head: self.subscribe(broker),
            redo,
            next,
            first: true,
        })
    }

    /// Records moved progress and deletes every event all of a broker's triggers have
    /// handled; returns each broker's backlog.
    async fn maintain_now(&self, brokers: &[String]) -> Result<Vec<(String, u64)>, LogError> {
        let mut set = Vec::new();
        let mut low: HashMap<String, u64> = HashMap::new();
        for (key, registered) in lock(&self.inner.consumers).iter_mut() {
            let progress = {
                let mut tracker = lock(&registered.tracker);
                tracker.unchecked = 0;
                Progress {
                    read_upto: tracker.read_upto,
                    pending: tracker.pending.iter().copied().collect(),
                }
            };
            let cursor = progress.cursor();
            if registered.saved.as_ref() != Some(&progress) {
                set.push((key.clone(), progress.clone()));
                registered.saved = Some(progress);
            }
            let entry = low.entry(registered.broker.clone()).or_insert(u64::MAX);
            *entry = (*entry).min(cursor);
        }
        let mut truncate = Vec::new();
        let mut backlog = Vec::new();
        {
            let mut truncated = lock(&self.inner.truncated);
            for broker in brokers {
                let head = self.head(broker);
                // With no trigger, nobody will ever want these events.
                let upto = low.get(broker).copied().unwrap_or(head).min(head);
                backlog.push((broker.clone(), head - upto));
                if upto > truncated.get(broker).copied().unwrap_or(0) {
                    truncated.insert(broker.clone(), upto);
                    truncate.push((broker.clone(), upto));
                }
            }
        }
        if set.is_empty() && truncate.is_empty() {
            return Ok(backlog);
        }
        let recorded: Vec<String> = set.iter().map(|(key, _)| key.clone()).collect();
        let truncating: Vec<String> = truncate.iter().map(|(key, _)| key.clone()).collect();
        if let Err(error) = self.checkpoint(set, vec![], truncate).await {
            // Nothing of it was written: make the next round try all of it again. The log
            // reports the failure to readiness.
            for key in &recorded {
                if let Some(registered) = lock(&self.inner.consumers).get_mut(key) {
                    registered.saved = None;
                }
            }
            let mut truncated = lock(&self.inner.truncated);
            for key in truncating {
                truncated.remove(&key);
            }
            return Err(error);
        }
        Ok(backlog)
    }
}

impl EventLog for RedbLog {
    fn append<'a>(&'a self, broker: &'a str, records: Vec<Record>) -> LogFuture<'a, ()> {
        Box::pin(async move {
            let events = records.into_iter().map(|r| r.data).collect();
            RedbLog::append(self, broker, events).await.map(|_| ())
        })
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

    fn remove_consumer<'a>(&'a self, _broker: &'a str, trigger: &'a str) -> LogFuture<'a, ()> {
        Box::pin(async move {
            lock(&self.inner.consumers).remove(trigger);
            self.checkpoint(vec![], vec![trigger.to_string()], vec![])
                .await
        })
    }

    fn maintain<'a>(&'a self, brokers: &'a [String]) -> LogFuture<'a, Vec<(String, u64)>> {
        Box::pin(self.maintain_now(brokers))
    }

    fn maintenance_due(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.inner.due.notified())
    }

    fn problem(&self) -> Option<String> {
        RedbLog::problem(self)
    }

    fn size_bytes(&self) -> Option<u64> {
        Some(self.file_size())
    }

    fn close(&self) -> LogFuture<'_, ()> {
        Box::pin(async move {
            // Joining the writer waits for its last commit: not on a runtime thread.
            let log = self.clone();
            tokio::task::spawn_blocking(move || RedbLog::close(&log))
                .await
                .map_err(|e| LogError::Storage(format!("closing the log: {e}")))
        })
    }
}

// === impl RedbConsumer ===

impl RedbConsumer {
    fn message(&self, seq: u64, data: Bytes) -> Message {
        Message::new(
            seq,
            data,
            Box::new(RedbAck {
                log: self.log.clone(),
                tracker: self.tracker.clone(),
                seq,
            }),
        )
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<Message>, LogError> {
        let max = max.max(1);
        loop {
            if !self.redo.is_empty() {
                let mut out = Vec::new();
                while out.len() < max {
                    let Some(seq) = self.redo.pop() else { break };
                    match self.log.read_one(&self.broker, seq)? {
                        Some(bytes) => out.push(self.message(seq, bytes)),
                        // Gone (retention already passed it): nothing to deliver.
                        None => {
                            lock(&self.tracker).pending.remove(&seq);
                        }
                    }
                }
                if !out.is_empty() {
                    return Ok(out);
                }
                continue;
            }
            self.head.borrow_and_update();
            let recent = lock(&self.log.inner.tail).read(&self.broker, self.next, max);
            let batch = match recent {
                Some(batch) => batch,
                None => self.log.read(&self.broker, self.next, max)?,
            };
            let Some(&(last, _)) = batch.last() else {
                if std::mem::take(&mut self.first) {
                    return Ok(Vec::new());
                }
                if self.head.changed().await.is_err() {
                    return Err(LogError::Closed);
                }
                continue;
            };
            self.first = false;
            self.next = last;
            {
                let mut t = lock(&self.tracker);
                t.pending.extend(batch.iter().map(|(seq, _)| *seq));
                t.read_upto = last;
            }
            return Ok(batch
                .into_iter()
                .map(|(seq, bytes)| self.message(seq, bytes))
                .collect());
        }
    }
}

impl Consumer for RedbConsumer {
    fn fetch(&mut self, max: usize) -> LogFuture<'_, Vec<Message>> {
        Box::pin(self.next_batch(max))
    }
}

impl Acker for RedbAck {
    fn ack(self: Box<Self>) -> LogFuture<'static, ()> {
        let due = {
            let mut t = lock(&self.tracker);
            t.pending.remove(&self.seq);
            t.unchecked += 1;
            t.unchecked >= CHECKPOINT_COUNT
        };
        if due {
            self.log.inner.due.notify_one();
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

fn publish(inner: &Inner, broker: &str, head: u64) {
    let mut heads = lock(&inner.heads);
    match heads.get(broker) {
        Some(tx) => {
            tx.send_replace(head);
        }
        None => {
            heads.insert(broker.to_string(), watch::channel(head).0);
        }
    }
}

fn storage(error: impl std::fmt::Display) -> LogError {
    LogError::Storage(error.to_string())
}

/// What went wrong opening the file, said so that the user knows what to do.
fn open_error(path: &Path, error: DatabaseError) -> LogError {
    let damaged = |detail: String| LogError::Damaged {
        path: path.to_path_buf(),
        detail,
    };
    match error {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            LogError::InUse(path.to_path_buf())
        }
        DatabaseError::RepairAborted => damaged("it could not be repaired".into()),
        DatabaseError::Storage(StorageError::Corrupted(detail)) => damaged(detail),
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            damaged(format!("it is truncated: {io}"))
        }
        DatabaseError::UpgradeRequired(version) => LogError::Storage(format!(
            "{} was written in redb file format {version}, which this Mecha cannot read",
            path.display()
        )),
        other => LogError::Storage(format!("cannot open {}: {other}", path.display())),
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `broker`'s last sequence: its last event's, or, when retention has emptied its log, the
/// one recorded by the truncation (a log written before appends stopped recording every
/// head has it there too: the larger wins).
fn last_sequence(
    events: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    heads: &impl ReadableTable<&'static str, u64>,
    broker: &str,
) -> Result<u64, StorageError> {
    let recorded = heads.get(broker)?.map_or(0, |v| v.value());
    let last = match events
        .range((broker, 0)..=(broker, u64::MAX))?
        .next_back()
        .transpose()?
    {
        Some((key, _)) => key.value().1,
        None => 0,
    };
    Ok(recorded.max(last))
}

/// One round's store transaction: applies every op (appends at the sequences `firsts` gives
/// them), returns each op's result. `synced`: a synced commit, which makes every earlier
/// unsynced one durable too, recording the journal generation that follows it; otherwise the
/// events are durable in the journal already.
fn apply_batch(
    db: &Database,
    batch: &[Op],
    firsts: &[u64],
    synced: Option<u64>,
) -> Result<Vec<u64>, ::redb::Error> {
    let mut results: Vec<u64> = Vec::with_capacity(batch.len());
    let mut txn = db.begin_write()?;
    match synced {
        Some(generation) => record_generation(&txn, generation)?,
        None => txn
            .set_durability(::redb::Durability::None)
            .map_err(|e| ::redb::Error::Corrupted(e.to_string()))?,
    }
    {
        let mut events = txn.open_table(EVENTS)?;
        // Most rounds only append, and an append writes only the events table: the heads
        // table is written when retention truncates (see `last_sequence`), the progress
        // tables by checkpoints. Each is opened by the first op in the round that needs it:
        // every table written costs a commit its pages, and an untouched one opened costs work.
        let mut head_table = None;
        let mut progress_tables = None;
        for (op, first) in batch.iter().zip(firsts) {
            match op {
                Op::Append {
                    broker,
                    events: new,
                    ..
                } => {
                    let mut seq = *first;
                    for event in new {
                        events.insert((broker.as_str(), seq), event.as_slice())?;
                        seq += 1;
                    }
                    results.push(seq - 1);
                }
                Op::Cursors {
                    set,
                    remove,
                    truncate,
                    ..
                } => {
                    if progress_tables.is_none() {
                        progress_tables =
                            Some((txn.open_table(CURSORS)?, txn.open_table(PROGRESS)?));
                    }
                    let Some((cursors, progress)) = progress_tables.as_mut() else {
                        continue;
                    };
                    for (trigger, at) in set {
                        progress.insert(trigger.as_str(), at.encode().as_slice())?;
                        cursors.remove(trigger.as_str())?;
                    }
                    for trigger in remove {
                        progress.remove(trigger.as_str())?;
                        cursors.remove(trigger.as_str())?;
                    }
                    for (broker, upto) in truncate {
                        // The last sequence is recorded before its event may go, so that
                        // sequences keep counting up after retention empties the log.
                        if head_table.is_none() {
                            head_table = Some(txn.open_table(HEADS)?);
                        }
                        if let Some(recorded) = head_table.as_mut() {
                            let last = last_sequence(&events, recorded, broker)?;
                            recorded.insert(broker.as_str(), last)?;
                        }
                        let doomed: Vec<u64> = events
                            .range((broker.as_str(), 0)..=(broker.as_str(), *upto))?
                            .map(|entry| entry.map(|(k, _)| k.value().1))
                            .collect::<Result<_, _>>()?;
                        for seq in doomed {
                            events.remove((broker.as_str(), seq))?;
                        }
                    }
                    results.push(0);
                }
            }
        }
    }
    txn.commit()?;
    Ok(results)
}

/// Records in a synced commit the journal generation that follows it.
fn record_generation(txn: &::redb::WriteTransaction, generation: u64) -> Result<(), ::redb::Error> {
    txn.open_table(META)?
        .insert(JOURNAL_GENERATION, generation)?;
    Ok(())
}

/// The journal generation the store's last synced commit recorded, if any.
fn stored_generation(db: &Database) -> Result<Option<u64>, ::redb::Error> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    Ok(meta.get(JOURNAL_GENERATION)?.map(|v| v.value()))
}

/// Opens (or creates) the store at `path`, checking every page; a file redb repaired to its
/// last intact commit is said so.
/// Opens the store; `true` with it when redb had to repair it (it was not closed cleanly, or
/// its integrity check found damage it could mend).
fn open_store(path: &Path, cache_bytes: usize) -> Result<(Database, bool), LogError> {
    let unclean = Arc::new(AtomicBool::new(false));
    // redb calls the repair callback only for a file not closed cleanly; the integrity check
    // after the open (every page's checksum, reading the whole file once) refuses a file
    // damaged outside redb here instead of panicking a trigger later. (An integrity check *on*
    // open would call the callback every time.) Debug builds of redb panic on some impossible
    // states instead of returning `Corrupted`, hence the catch.
    let opened = catch_unwind(AssertUnwindSafe(|| {
        let flag = unclean.clone();
        let mut db = Builder::new()
            .set_cache_size(cache_bytes)
            .set_repair_callback(move |_| flag.store(true, Ordering::Relaxed))
            .create(path)?;
        let intact = db.check_integrity()?;
        Ok::<_, DatabaseError>((db, intact))
    }));
    match opened {
        Ok(Ok((db, intact))) => Ok((db, !intact || unclean.load(Ordering::Relaxed))),
        Ok(Err(error)) => Err(open_error(path, error)),
        Err(panic) => Err(LogError::Damaged {
            path: path.to_path_buf(),
            detail: format!("the store panicked reading it: {}", panic_message(&*panic)),
        }),
    }
}

/// Whether the store refuses all writes since an I/O error (redb's "previous I/O error":
/// only a new handle on the file writes again).
fn poisoned(db: &Database) -> bool {
    use ::redb::{CommitError, TransactionError};
    match db.begin_write() {
        Err(TransactionError::Storage(StorageError::PreviousIo)) => true,
        Err(_) => false,
        Ok(mut txn) => {
            let _ = txn.set_durability(::redb::Durability::None);
            matches!(
                txn.commit(),
                Err(CommitError::Storage(StorageError::PreviousIo))
            )
        }
    }
}

/// Closes the store and opens it again: taking the store's lock waits for reads in flight
/// (they hold it for their whole transaction), readers after it are told the store is
/// unavailable, and the file, with no handle left on it, opens at once.
fn reopen_store(
    inner: &std::sync::Weak<Inner>,
    db: &mut Option<Arc<Database>>,
    path: &Path,
    cache_bytes: usize,
) -> Result<(), String> {
    if let Some(alive) = inner.upgrade() {
        *alive.db.write().unwrap_or_else(PoisonError::into_inner) = None;
        alive.reopen_attempts.fetch_add(1, Ordering::Relaxed);
        if alive.fault.load(Ordering::Relaxed) == Fault::ReopenFails as u8 {
            db.take();
            return Err("cannot open the store again: injected failure".into());
        }
    }
    // The last handle: taking the lock above waited for reads in flight (see
    // `RedbLog::with_db`), so the file is closed once this goes.
    db.take();
    // Repaired, as expected after an I/O error: said by the caller's own message.
    let (store, _repaired) = open_store(path, cache_bytes)
        .map_err(|error| format!("cannot open the store again: {error}"))?;
    let store = Arc::new(store);
    if let Some(alive) = inner.upgrade() {
        *alive.db.write().unwrap_or_else(PoisonError::into_inner) = Some(store.clone());
        alive.reopened.fetch_add(1, Ordering::Relaxed);
    }
    *db = Some(store);
    Ok(())
}

/// Where the journal of the log at `path` lives: beside it.
fn journal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".journal");
    PathBuf::from(name)
}

/// Applies what the journal holds beyond the store's last synced commit (after a crash, or
/// after a round whose store commit failed), syncs the store and starts the journal over.
/// Returns how many events it restored, and the last sequence of each broker it restored
/// events of. Records the store has already are skipped, so replaying twice changes nothing.
fn replay(db: &Database, journal: &mut Journal) -> Result<(u64, HashMap<String, u64>), String> {
    let (entries, stopped) = journal.entries().map_err(|e| e.to_string())?;
    if let Some(stopped) = &stopped {
        // A journal in order ends at the zeros of an end: this is damage, or a write torn
        // by a power loss (never answered then).
        tracing::warn!(journal = %journal.path().display(), offset = stopped.offset, why = stopped.why, "the event log's journal is damaged here: events recorded after this point cannot be restored from it");
    }
    let mut restored = 0u64;
    let mut restored_heads: HashMap<String, u64> = HashMap::new();
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut events = txn.open_table(EVENTS).map_err(|e| e.to_string())?;
        let heads = txn.open_table(HEADS).map_err(|e| e.to_string())?;
        let mut last: HashMap<String, u64> = HashMap::new();
        for entry in entries {
            let head = match last.get(&entry.broker) {
                Some(head) => *head,
                None => last_sequence(&events, &heads, &entry.broker).map_err(|e| e.to_string())?,
            };
            if entry.first > head.saturating_add(1) {
                // Records follow on from the store or from each other; one that does not is
                // not what this log wrote: nothing from it on is restored.
                tracing::error!(journal = %journal.path().display(), broker = %entry.broker, head, first = entry.first, "the event log's journal continues a broker's log after a gap; what follows is not restored");
                break;
            }
            let mut top = head;
            for (i, event) in entry.events.iter().enumerate() {
                let seq = entry.first + i as u64;
                if seq > head {
                    events
                        .insert((entry.broker.as_str(), seq), event.as_slice())
                        .map_err(|e| e.to_string())?;
                    restored += 1;
                    restored_heads.insert(entry.broker.clone(), seq);
                }
                top = top.max(seq);
            }
            last.insert(entry.broker, top);
        }
    }
    record_generation(&txn, journal.generation() + 1).map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| e.to_string())?;
    journal.start_over().map_err(|e| e.to_string())?;
    Ok((restored, restored_heads))
}

/// The writer thread: drains the queue into one round at a time — the appends' events into
/// the journal (one write, one flush), then every op into one store transaction — and
/// answers the round's waiters. A round that fails — an error or a panic inside the store —
/// answers each of its waiters with the reason and the writer goes on with the next round
/// (after bringing the store up to the journal), so a transient failure heals by itself.
fn writer(
    store: Arc<Database>,
    (path, cache_bytes): &(PathBuf, usize),
    mut journal: Journal,
    sync_interval: std::time::Duration,
    rx: &mpsc::Receiver<Op>,
    inner: &std::sync::Weak<Inner>,
) {
    // The last sequence given out per broker, as the store will hold it.
    let mut heads: HashMap<String, u64> = HashMap::new();
    let mut synced_at = std::time::Instant::now();
    let mut behind_journal = false;
    let mut store = Some(store);
    // After a failed recovery: when to try again, and why the last try failed.
    let mut retry: Option<(std::time::Instant, String)> = None;
    let mut backoff = RECOVERY_BACKOFF;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if behind_journal
            && let Some((at, why)) = &retry
            && std::time::Instant::now() < *at
        {
            // Recovering failed a moment ago: refused at once, quietly (the failure is logged
            // and reported once per attempt, not once per request).
            refuse_round(batch, why);
            continue;
        }
        if behind_journal {
            // After an I/O error redb refuses every write until the file is opened again.
            let injected = take_fault(inner, Fault::StorePoisoned)
                || inner
                    .upgrade()
                    .is_some_and(|i| i.fault.load(Ordering::Relaxed) == Fault::ReopenFails as u8);
            if store.is_none() || injected || store.as_deref().is_some_and(poisoned) {
                tracing::warn!(path = %path.display(), "the event log's store refuses writes since an I/O error; opening it again");
                if let Err(why) = reopen_store(inner, &mut store, path, *cache_bytes) {
                    fail_round(inner, batch, &why);
                    retry = Some((std::time::Instant::now() + backoff, why));
                    backoff = (backoff * 2).min(RECOVERY_BACKOFF_MAX);
                    continue;
                }
            }
        }
        let Some(db) = store.clone() else {
            fail_round(inner, batch, "the store is not open");
            continue;
        };
        let db = &*db;
        if behind_journal {
            match catch_unwind(AssertUnwindSafe(|| replay(db, &mut journal))).unwrap_or_else(
                |panic| Err(format!("the store panicked: {}", panic_message(&*panic))),
            ) {
                Ok((restored, restored_heads)) => {
                    tracing::info!(restored, "the store caught up with the journal");
                    behind_journal = false;
                    retry = None;
                    backoff = RECOVERY_BACKOFF;
                    synced_at = std::time::Instant::now();
                    // Triggers learn of restored events as of appended ones.
                    if let Some(inner) = inner.upgrade() {
                        for (broker, head) in &restored_heads {
                            publish(&inner, broker, *head);
                        }
                    }
                }
                Err(why) => {
                    let why = format!("cannot restore the journal: {why}");
                    fail_round(inner, batch, &why);
                    retry = Some((std::time::Instant::now() + backoff, why));
                    backoff = (backoff * 2).min(RECOVERY_BACKOFF_MAX);
                    continue;
                }
            }
        }
        let inject = inner
            .upgrade()
            .is_some_and(|i| i.fault.load(Ordering::Relaxed) == Fault::WriterPanic as u8);
        let durable = synced_at.elapsed() >= sync_interval
            || journal.written() >= journal::CHECKPOINT_BYTES
            || batch.iter().any(|op| matches!(op, Op::Cursors { .. }));
        // The round's sequences once its events are in the journal: durable from then on.
        let mut journaled: Option<Vec<u64>> = None;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            if inject {
                panic!("injected writer panic");
            }
            let firsts = sequences(db, &batch, &mut heads).map_err(|e| e.to_string())?;
            let appends = batch
                .iter()
                .zip(&firsts)
                .filter_map(|(op, first)| match op {
                    Op::Append { broker, events, .. } if !events.is_empty() => {
                        Some((broker.as_str(), *first, events.as_slice()))
                    }
                    _ => None,
                });
            journal.append(appends).map_err(|e| {
                format!("cannot write the journal {}: {e}", journal.path().display())
            })?;
            journaled = Some(firsts.clone());
            if take_fault(inner, Fault::StoreCommitFails) {
                return Err("injected store commit failure".to_string());
            }
            let synced = durable.then(|| journal.generation() + 1);
            let results = apply_batch(db, &batch, &firsts, synced).map_err(|e| e.to_string())?;
            Ok::<_, String>((firsts, results))
        }))
        .unwrap_or_else(|panic| Err(format!("the store panicked: {}", panic_message(&*panic))));
        let alive = inner.upgrade();
        match outcome {
            Ok((firsts, results)) => {
                if durable {
                    synced_at = std::time::Instant::now();
                    journal.fail_after_header = take_fault(inner, Fault::StartOverFails);
                    if let Err(error) = journal.start_over() {
                        // The store holds everything, but whether the journal's new header
                        // reached the disk is unknown: nothing is appended before the
                        // recovery has started it over.
                        tracing::warn!(%error, "cannot start the journal over");
                        behind_journal = true;
                    }
                }
                let mut answers = Vec::with_capacity(batch.len());
                let mut touched: Vec<(&str, u64)> = Vec::new();
                {
                    // Into the tail before the head moves, so that a consumer woken by the
                    // head finds them there.
                    let mut tail = alive.as_ref().map(|inner| lock(&inner.tail));
                    for ((op, first), result) in batch.iter_mut().zip(&firsts).zip(&results) {
                        match op {
                            Op::Append { broker, events, .. } => {
                                if let Some(tail) = tail.as_mut()
                                    && !events.is_empty()
                                {
                                    tail.push(
                                        broker,
                                        *first,
                                        std::mem::take(events)
                                            .into_iter()
                                            .map(Bytes::from)
                                            .collect(),
                                    );
                                }
                                if *result >= *first {
                                    touched.push((broker.as_str(), *result));
                                }
                            }
                            Op::Cursors { .. } => {}
                        }
                    }
                }
                if let Some(inner) = &alive {
                    lock(&inner.problems).remove("write");
                    for (broker, head) in &touched {
                        publish(inner, broker, *head);
                    }
                }
                for (op, result) in batch.into_iter().zip(results) {
                    let (Op::Append { done, .. } | Op::Cursors { done, .. }) = op;
                    answers.push((done, result));
                }
                for (done, result) in answers {
                    let _ = done.send(Ok(result));
                }
            }
            Err(why) => {
                // The store's transaction was rolled back: forget the sequences it gave out
                // (the store is brought up to the journal before the next round, which also
                // finds out whether it must be opened again; replaying changes nothing the
                // store has already, and sequences are taken from the store after it).
                heads.clear();
                behind_journal = true;
                match journaled {
                    // The journal holds the round's events: they are durable, and reach the
                    // store (and the triggers) with the replay — answered as stored, so that
                    // a client does not send again what will be delivered. Only the cursor
                    // and retention ops failed.
                    Some(firsts) => {
                        tracing::error!(error = %why, "event log store commit failed; the round's events are in the journal and are restored from it");
                        if let Some(inner) = &alive {
                            lock(&inner.problems)
                                .insert("write".into(), format!("cannot write: {why}"));
                        }
                        for (op, first) in batch.into_iter().zip(firsts) {
                            match op {
                                Op::Append { events, done, .. } => {
                                    let _ = done.send(Ok(first + events.len() as u64 - 1));
                                }
                                Op::Cursors { done, .. } => {
                                    let _ = done.send(Err(why.clone()));
                                }
                            }
                        }
                    }
                    // Nothing of the round is durable: every waiter gets the error.
                    None => fail_round(inner, batch, &why),
                }
            }
        }
    }
    // Closed: sync the store, so that the next start has nothing to replay.
    let generation = journal.generation() + 1;
    let closed = store
        .ok_or_else(|| "the store is not open".to_string())
        .and_then(|store| store.begin_write().map_err(|e| e.to_string()))
        .and_then(|txn| {
            record_generation(&txn, generation).map_err(|e| e.to_string())?;
            txn.commit().map_err(|e| e.to_string())
        })
        .and_then(|()| {
            if behind_journal {
                Ok(())
            } else {
                journal.start_over().map_err(|e| e.to_string())
            }
        });
    if let Err(error) = closed {
        tracing::warn!(%error, "cannot sync the event log on close; the next start replays its journal");
    }
}

/// The first sequence of each append in `batch` (0 for other ops), given out after the
/// broker's last; `heads` remembers them.
fn sequences(
    db: &Database,
    batch: &[Op],
    heads: &mut HashMap<String, u64>,
) -> Result<Vec<u64>, ::redb::Error> {
    let mut firsts = Vec::with_capacity(batch.len());
    for op in batch {
        let Op::Append { broker, events, .. } = op else {
            firsts.push(0);
            continue;
        };
        let head = match heads.get(broker) {
            Some(head) => *head,
            None => {
                let txn = db.begin_read()?;
                let stored = txn.open_table(EVENTS)?;
                let recorded = txn.open_table(HEADS)?;
                last_sequence(&stored, &recorded, broker)?
            }
        };
        firsts.push(head + 1);
        heads.insert(broker.clone(), head + events.len() as u64);
    }
    Ok(firsts)
}

/// The first wait before recovering the log again after recovering failed; doubled after each
/// failure up to [`RECOVERY_BACKOFF_MAX`]. Opening the store again reads all of it, so a disk
/// that stays full must not make every request pay that.
const RECOVERY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
const RECOVERY_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether `fault` was injected, clearing it (a fault that happens once).
fn take_fault(inner: &std::sync::Weak<Inner>, fault: Fault) -> bool {
    inner.upgrade().is_some_and(|i| {
        i.fault
            .compare_exchange(
                fault as u8,
                Fault::None as u8,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    })
}

/// Answers every op of `batch` with `why` without logging it again.
fn refuse_round(batch: Vec<Op>, why: &str) {
    for op in batch {
        let (Op::Append { done, .. } | Op::Cursors { done, .. }) = op;
        let _ = done.send(Err(why.to_string()));
    }
}

/// Answers every op of a failed round with `why`, and reports it.
fn fail_round(inner: &std::sync::Weak<Inner>, batch: Vec<Op>, why: &str) {
    tracing::error!(error = %why, "event log commit failed");
    if let Some(inner) = inner.upgrade() {
        lock(&inner.problems).insert("write".into(), format!("cannot write: {why}"));
    }
    refuse_round(batch, why);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        crate::log::temp_file(&format!("log-{name}"), "events.redb")
    }

    #[tokio::test]
    async fn appends_read_back_in_order_and_survive_reopen() {
        let path = temp("reopen");
        {
            let log = RedbLog::open(&path).expect("open");
            let mut head = log.subscribe("default/b");
            assert_eq!(
                log.append("default/b", vec![b"a".to_vec(), b"b".to_vec()])
                    .await
                    .expect("append"),
                2
            );
            assert_eq!(
                log.append("default/other", vec![b"x".to_vec()])
                    .await
                    .expect("append"),
                1
            );
            assert_eq!(
                log.append("default/b", vec![b"c".to_vec()])
                    .await
                    .expect("append"),
                3
            );
            head.changed().await.expect("head moves");
            assert_eq!(*head.borrow_and_update(), 3);
            let read = log.read("default/b", 1, 10).expect("read");
            let values: Vec<_> = read.iter().map(|(s, v)| (*s, v.clone())).collect();
            assert_eq!(values, [(2, Bytes::from("b")), (3, Bytes::from("c"))]);
            log.checkpoint(
                vec![(
                    "t1".into(),
                    Progress {
                        read_upto: 3,
                        pending: vec![3],
                    },
                )],
                vec![],
                vec![("default/b".into(), 2)],
            )
            .await
            .expect("checkpoint");
            assert_eq!(log.len("default/b").expect("len"), 1);
            log.close();
        }
        let log = RedbLog::open(&path).expect("reopen");
        assert_eq!(log.head("default/b"), 3, "sequences survive");
        assert_eq!(log.cursor("t1").expect("cursor"), Some(2));
        assert_eq!(log.read("default/b", 0, 10).expect("read").len(), 1);
        // Retention emptied nothing it should not have, and new events keep counting up.
        log.checkpoint(vec![], vec![], vec![("default/b".into(), 3)])
            .await
            .expect("truncate");
        assert_eq!(
            log.append("default/b", vec![b"d".to_vec()])
                .await
                .expect("append"),
            4
        );
        // Emptied again and reopened: the truncation recorded the last sequence.
        log.checkpoint(vec![], vec![], vec![("default/b".into(), 4)])
            .await
            .expect("truncate");
        assert_eq!(log.len("default/b").expect("len"), 0);
        log.close();
        drop(log);
        let log = RedbLog::open(&path).expect("reopen");
        assert_eq!(log.head("default/b"), 4, "sequences survive an empty log");
        assert_eq!(
            log.append("default/b", vec![b"e".to_vec()])
                .await
                .expect("append"),
            5
        );
    }

    #[tokio::test]
    async fn appends_write_only_events_and_the_head_comes_from_the_last_one() {
        let path = temp("heads");
        {
            let log = RedbLog::open(&path).expect("open");
            for n in 1..=3u64 {
                assert_eq!(
                    log.append("ns/b", vec![b"x".to_vec()])
                        .await
                        .expect("append"),
                    n
                );
            }
            // Nothing recorded in the heads table: the head is the last event's sequence.
            {
                let recorded = log.with_db(|db| {
                    let txn = db.begin_read().map_err(storage)?;
                    let heads = txn.open_table(HEADS).map_err(storage)?;
                    Ok(heads.get("ns/b").map_err(storage)?.is_some())
                });
                assert!(!recorded.expect("read"));
            }
            log.close();
        }
        let log = RedbLog::open(&path).expect("reopen");
        assert_eq!(log.head("ns/b"), 3);
        assert_eq!(
            log.append("ns/b", vec![b"y".to_vec()])
                .await
                .expect("append"),
            4
        );
    }

    /// A new log whose store commits are synced only by checkpoints (and on close).
    fn unsynced(name: &str) -> (PathBuf, RedbLog) {
        let path = temp(name);
        let log = RedbLog::open_with(
            &path,
            RedbOptions {
                sync_interval: std::time::Duration::from_secs(3600),
                ..RedbOptions::default()
            },
        )
        .expect("open");
        (path, log)
    }

    /// The files as a crash leaves them (a SIGKILL keeps what was written, synced or not):
    /// copies taken while the log runs with store commits unsynced. Every answered append is
    /// there after the copy is opened — restored from the journal — and sequences go on.
    #[tokio::test]
    async fn a_crash_loses_no_answered_append_the_journal_restores_them() {
        let (path, log) = unsynced("crash");
        // Synced by a checkpoint (a store commit that syncs), then appends that only the
        // journal holds durably.
        log.append("ns/a", vec![b"synced".to_vec()])
            .await
            .expect("append");
        log.checkpoint(vec![("t".into(), Progress::default())], vec![], vec![])
            .await
            .expect("checkpoint");
        let mut tasks = Vec::new();
        for i in 0..100u32 {
            let log = log.clone();
            let broker = if i % 3 == 0 { "ns/b" } else { "ns/a" };
            tasks.push(tokio::spawn(async move {
                log.append(broker, vec![format!("event {i}").into_bytes(), Vec::new()])
                    .await
                    .map(|last| (broker, last, i))
            }));
        }
        let mut answered = Vec::new();
        for task in tasks {
            answered.push(task.await.expect("task").expect("append"));
        }
        let crashed = temp("crash-copy");
        std::fs::copy(&path, &crashed).expect("copy the store");
        std::fs::copy(journal_path(&path), journal_path(&crashed)).expect("copy the journal");

        let restored = RedbLog::open(&crashed).expect("open after the crash");
        for (broker, last, i) in &answered {
            assert_eq!(
                restored
                    .read_one(broker, last - 1)
                    .expect("read")
                    .as_deref(),
                Some(format!("event {i}").as_bytes()),
                "{broker} {last}"
            );
            assert_eq!(
                restored.read_one(broker, *last).expect("read").as_deref(),
                Some(&b""[..])
            );
        }
        assert_eq!(restored.len("ns/a").expect("len"), 1 + 2 * 66);
        assert_eq!(restored.len("ns/b").expect("len"), 2 * 34);
        assert_eq!(restored.head("ns/a"), 1 + 2 * 66);
        assert_eq!(
            restored
                .append("ns/b", vec![b"next".to_vec()])
                .await
                .expect("append"),
            2 * 34 + 1,
            "sequences go on after the restored ones"
        );
        // Opened again after a clean close: nothing twice.
        restored.close();
        drop(restored);
        let again = RedbLog::open(&crashed).expect("reopen");
        assert_eq!(again.len("ns/b").expect("len"), 2 * 34 + 1);
        assert_eq!(again.len("ns/a").expect("len"), 1 + 2 * 66);
        log.close();
    }

    #[tokio::test]
    async fn concurrent_appends_are_group_committed() {
        let log = RedbLog::open(&temp("group")).expect("open");
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                log.append("ns/b", vec![i.to_be_bytes().to_vec()]).await
            }));
        }
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.push(task.await.expect("task").expect("append"));
        }
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=200).collect::<Vec<u64>>(),
            "every append got its own sequence"
        );
        assert_eq!(log.len("ns/b").expect("len"), 200);
    }

    /// A log with some events in it, closed; returns its path and file size.
    async fn filled(name: &str) -> (PathBuf, u64) {
        let path = temp(name);
        let log = RedbLog::open(&path).expect("open");
        for i in 0..50u32 {
            log.append("ns/b", vec![vec![b'e'; 1000 + i as usize]])
                .await
                .expect("append");
        }
        log.close();
        drop(log);
        let size = std::fs::metadata(&path).expect("size").len();
        (path, size)
    }

    fn refused(path: &Path) -> String {
        let error = RedbLog::open(path).expect_err("a damaged log must be refused");
        assert!(matches!(error, LogError::Damaged { .. }), "{error:?}");
        error.to_string()
    }

    #[tokio::test]
    async fn a_new_log_is_its_owners_alone_and_a_link_in_its_place_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (path, _) = filled("owner-only").await;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let link = temp("linked");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        let error = RedbLog::open(&link).expect_err("a link is refused");
        assert!(error.to_string().contains("symbolic link"), "{error}");
    }

    #[tokio::test]
    async fn a_damaged_or_truncated_log_is_refused_with_what_to_do() {
        // Garbage over the pages after the header.
        let (path, size) = filled("garbage").await;
        let mut bytes = std::fs::read(&path).expect("read");
        let end = usize::try_from(size).expect("size").min(4096 + 4096 * 8);
        for (i, b) in bytes[4096..end].iter_mut().enumerate() {
            *b = (i * 7 + 13) as u8;
        }
        std::fs::write(&path, &bytes).expect("write");
        let message = refused(&path);
        assert!(message.contains("is damaged"), "{message}");
        assert!(message.contains("move it aside"), "{message}");
        assert!(
            !message.contains("another"),
            "not a lock problem: {message}"
        );

        // Cut short.
        let (path, size) = filled("truncated").await;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(size / 3).expect("truncate");
        let message = refused(&path);
        assert!(!message.contains("another"), "{message}");

        // A journal whose header is not one.
        let (path, _) = filled("journal-garbage").await;
        std::fs::write(journal_path(&path), vec![b'j'; 8192]).expect("write");
        let error = RedbLog::open(&path).expect_err("refused");
        assert!(
            matches!(error, LogError::JournalDamaged { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains("events.redb.journal is damaged"),
            "{message}"
        );
        assert!(message.contains("Move it aside"), "{message}");
        // Moved aside: the log starts with what the store holds.
        std::fs::rename(journal_path(&path), path.with_extension("damaged")).expect("move");
        let log = RedbLog::open(&path).expect("open without the journal");
        assert_eq!(log.len("ns/b").expect("len"), 50);
    }

    #[tokio::test]
    async fn a_log_held_by_another_handle_says_so() {
        let path = temp("locked");
        let _held = RedbLog::open(&path).expect("open");
        let error = RedbLog::open(&path).expect_err("locked");
        assert!(matches!(error, LogError::InUse(_)), "{error:?}");
        assert!(error.to_string().contains("another `mecha up`"), "{error}");
    }

    #[tokio::test]
    async fn a_failing_writer_answers_every_append_with_the_reason_and_recovers() {
        let log = RedbLog::open(&temp("writer-panic")).expect("open");
        log.inject_fault(Fault::WriterPanic);
        let error = log
            .append("ns/b", vec![b"x".to_vec()])
            .await
            .expect_err("the commit failed");
        assert!(
            error.to_string().contains("injected writer panic"),
            "{error}"
        );
        let problem = log.problem().expect("reported");
        assert!(problem.contains("cannot write"), "{problem}");

        log.inject_fault(Fault::None);
        assert_eq!(
            log.append("ns/b", vec![b"y".to_vec()])
                .await
                .expect("append"),
            1,
            "the failed append gave out no sequence"
        );
        assert_eq!(log.problem(), None);

        log.inject_fault(Fault::ReadPanic);
        let error = log.read("ns/b", 0, 10).expect_err("read fails");
        assert!(error.to_string().contains("panicked"), "{error}");
        assert!(
            log.problem()
                .expect("reported")
                .contains("cannot read ns/b")
        );
        log.inject_fault(Fault::None);
        assert_eq!(log.read("ns/b", 0, 10).expect("read").len(), 1);
        assert_eq!(log.problem(), None);
        log.close();
        let error = log.append("ns/b", vec![]).await.expect_err("closed");
        assert!(matches!(error, LogError::Closed), "{error:?}");
    }

    /// A log holding `a` at 1, whose next round failed (as an I/O error fails one), so that
    /// the writer recovers before its next round.
    async fn after_a_failed_round(name: &str) -> RedbLog {
        let log = RedbLog::open(&temp(name)).expect("open");
        assert_eq!(
            log.append("ns/b", vec![b"a".to_vec()])
                .await
                .expect("append"),
            1
        );
        log.inject_fault(Fault::WriterPanic);
        log.append("ns/b", vec![b"lost".to_vec()])
            .await
            .expect_err("the round failed");
        log
    }

    /// The log of [`after_a_failed_round`] with `b` appended after one reopening, and healthy.
    fn recovered_once(log: &RedbLog) {
        assert_eq!(log.reopened(), 1);
        assert_eq!(
            log.read("ns/b", 0, 10).expect("read"),
            [(1, Bytes::from("a")), (2, Bytes::from("b"))]
        );
        assert_eq!(log.problem(), None);
        log.close();
    }

    /// A round whose events reached the journal is durable even when the store's commit
    /// then fails: its appends are answered as stored (found from outside: a disk filling up
    /// answered 503 "not stored" for events that the recovery then delivered, so a client
    /// retrying on the 503 had them twice), and the next round restores them into the store.
    #[tokio::test]
    async fn a_failed_store_commit_after_the_journal_answers_the_appends_as_stored() {
        let log = RedbLog::open(&temp("store-commit-fails")).expect("open");
        let mut head = log.subscribe("ns/b");
        assert_eq!(
            log.append("ns/b", vec![b"a".to_vec()])
                .await
                .expect("append"),
            1
        );
        log.inject_fault(Fault::StoreCommitFails);
        assert_eq!(
            log.append("ns/b", vec![b"b".to_vec(), b"c".to_vec()])
                .await
                .expect("durable in the journal"),
            3
        );
        assert!(
            log.problem()
                .expect("reported")
                .contains("injected store commit failure")
        );
        // Cursor and retention ops in such a round get the error: they are not journaled.
        log.inject_fault(Fault::StoreCommitFails);
        log.checkpoint(vec![("t".into(), Progress::default())], vec![], vec![])
            .await
            .expect_err("a checkpoint is only in the store");
        assert_eq!(
            log.append("ns/b", vec![b"d".to_vec()])
                .await
                .expect("append"),
            4,
            "sequences go on after the restored ones"
        );
        while *head.borrow_and_update() < 4 {
            head.changed().await.expect("head moves");
        }
        assert_eq!(
            log.read("ns/b", 0, 10).expect("read"),
            [
                (1, Bytes::from("a")),
                (2, Bytes::from("b")),
                (3, Bytes::from("c")),
                (4, Bytes::from("d"))
            ]
        );
        assert_eq!(log.problem(), None);
        log.close();
    }

    /// A clean close leaves nothing to repair, even while other handles on the log live on
    /// (found from outside: every restart of `mecha up` after SIGTERM warned of a log "not
    /// closed cleanly", and repairing reads the whole file).
    #[tokio::test]
    async fn a_closed_log_lets_go_of_its_file_and_opens_again_without_repair() {
        let path = temp("clean-close");
        let log = RedbLog::open(&path).expect("open");
        assert!(!log.repaired_on_open());
        log.append("ns/b", vec![b"a".to_vec()])
            .await
            .expect("append");
        let still_held = log.clone();
        log.close();
        assert!(matches!(
            still_held.read("ns/b", 5, 1),
            Err(LogError::Closed)
        ));
        let again = RedbLog::open(&path).expect("the file is free");
        assert!(!again.repaired_on_open(), "a clean close needs no repair");
        assert_eq!(
            again.read("ns/b", 0, 10).expect("read"),
            [(1, Bytes::from("a"))]
        );
        again.close();
        drop(still_held);
    }

    /// After an I/O error redb refuses every write until the file is opened again (found
    /// from outside: a full disk, then space again, and every post was 503 until a restart).
    #[tokio::test]
    async fn a_store_that_refuses_writes_after_an_io_error_is_opened_again() {
        let log = after_a_failed_round("reopen-store").await;
        // The store then refuses writes.
        log.inject_fault(Fault::StorePoisoned);
        assert_eq!(
            log.append("ns/b", vec![b"b".to_vec()])
                .await
                .expect("stored once the store is open again"),
            2
        );
        recovered_once(&log);
    }

    /// A store that cannot be opened again (a disk that stays full) is tried again after a
    /// backoff, not once per append: appends meanwhile are refused at once with the reason,
    /// and once it opens, the log goes on where it was.
    #[tokio::test]
    async fn a_store_that_cannot_be_opened_again_is_retried_with_backoff_not_per_append() {
        let log = after_a_failed_round("reopen-fails").await;
        log.inject_fault(Fault::ReopenFails);
        let error = log
            .append("ns/b", vec![b"refused".to_vec()])
            .await
            .expect_err("the store cannot be opened");
        assert!(
            error.to_string().contains("cannot open the store again"),
            "{error}"
        );
        assert_eq!(log.reopen_attempts(), 1);
        assert!(matches!(
            log.read("ns/b", 0, 10),
            Err(LogError::Unavailable(_))
        ));
        // A burst of appends inside the first backoff (100 ms): each refused with the reason,
        // none tries the store again.
        let started = std::time::Instant::now();
        let mut refused = 0;
        while started.elapsed() < RECOVERY_BACKOFF / 2 {
            let error = log
                .append("ns/b", vec![b"refused".to_vec()])
                .await
                .expect_err("refused during the backoff");
            assert!(
                error.to_string().contains("cannot open the store again"),
                "{error}"
            );
            refused += 1;
        }
        assert!(refused > 10, "{refused} appends refused");
        assert_eq!(log.reopen_attempts(), 1, "after {refused} refused appends");
        assert!(
            log.problem()
                .expect("reported")
                .contains("cannot open the store again")
        );
        // The disk has room again: the next try after the backoff opens the store.
        log.inject_fault(Fault::None);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let seq = loop {
            match log.append("ns/b", vec![b"b".to_vec()]).await {
                Ok(seq) => break seq,
                Err(error) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "never recovered: {error}"
                    );
                    tokio::task::yield_now().await;
                }
            }
        };
        assert_eq!(seq, 2, "refused appends gave out no sequence");
        assert!(
            log.reopen_attempts() <= 3,
            "{} attempts",
            log.reopen_attempts()
        );
        recovered_once(&log);
    }

    /// A start-over of the journal that fails once its new header is written leaves the
    /// header's fate unknown: appends wait for the recovery to start the journal over again,
    /// so a crash right after still finds every answered append in the journal.
    #[tokio::test]
    async fn appends_after_a_failed_start_over_wait_for_the_journal_to_start_over_again() {
        let (path, log) = unsynced("start-over-fails");
        assert_eq!(
            log.append("ns/b", vec![b"a".to_vec()])
                .await
                .expect("append"),
            1
        );
        // A checkpoint syncs the store; the journal's start-over after it fails.
        log.inject_fault(Fault::StartOverFails);
        log.checkpoint(vec![("t".into(), Progress::default())], vec![], vec![])
            .await
            .expect("the store holds everything");
        for n in 2..=4u64 {
            assert_eq!(
                log.append("ns/b", vec![format!("e{n}").into_bytes()])
                    .await
                    .expect("append"),
                n
            );
        }
        // A crash now: the files as they are.
        let crashed = temp("start-over-fails-copy");
        std::fs::copy(&path, &crashed).expect("copy the store");
        std::fs::copy(journal_path(&path), journal_path(&crashed)).expect("copy the journal");
        let restored = RedbLog::open(&crashed).expect("open after the crash");
        assert_eq!(
            restored.read("ns/b", 0, 10).expect("read"),
            [
                (1, Bytes::from("a")),
                (2, Bytes::from("e2")),
                (3, Bytes::from("e3")),
                (4, Bytes::from("e4"))
            ]
        );
        restored.close();
        log.close();
    }

    #[test]
    fn progress_round_trips_and_its_cursor_is_below_the_first_pending() {
        let progress = Progress {
            read_upto: 90,
            pending: vec![70, 85],
        };
        assert_eq!(Progress::decode(&progress.encode()), Some(progress.clone()));
        assert_eq!(progress.cursor(), 69);
        assert_eq!(Progress::decode(&[1, 2, 3]), None);
    }

    fn ten_bytes(n: u64) -> Vec<u8> {
        format!("event-{n:04}").into_bytes()
    }

    async fn fetch_seqs(
        consumer: &mut Box<dyn Consumer>,
        max: usize,
    ) -> Result<Vec<u64>, LogError> {
        let messages = consumer.fetch(max).await?;
        let seqs = messages.iter().map(|m| m.seq).collect();
        for message in messages {
            message.ack().await?;
        }
        Ok(seqs)
    }

    #[tokio::test]
    async fn triggers_take_recent_events_from_the_tail_and_a_slow_one_catches_up_from_the_file() {
        let log = RedbLog::open_with(
            &temp("tail"),
            RedbOptions {
                // Ten events of ten bytes.
                tail_bytes: 10 * (10 + TAIL_ENTRY_OVERHEAD),
                cache_bytes: 1 << 20,
                ..RedbOptions::default()
            },
        )
        .expect("open");
        let mut fast = EventLog::consumer(&log, "default/b", "fast")
            .await
            .expect("fast");
        let mut slow = EventLog::consumer(&log, "default/b", "slow")
            .await
            .expect("slow");
        assert!(fetch_seqs(&mut fast, 10).await.expect("first").is_empty());
        assert!(fetch_seqs(&mut slow, 10).await.expect("first").is_empty());
        log.append("default/b", (1..=5).map(ten_bytes).collect())
            .await
            .expect("append");
        // With every read of the file failing, the fast trigger still gets what is new: from
        // memory.
        log.inject_fault(Fault::ReadError);
        assert_eq!(
            fetch_seqs(&mut fast, 10).await.expect("from the tail"),
            [1, 2, 3, 4, 5]
        );
        // The slow trigger has read nothing, and holds nobody up: appends go on, and the tail
        // drops its oldest events to stay within its bound.
        for n in 6..=15 {
            log.append("default/b", vec![ten_bytes(n)])
                .await
                .expect("append");
        }
        {
            let tail = lock(&log.inner.tail);
            assert!(
                tail.bytes <= 10 * (10 + TAIL_ENTRY_OVERHEAD),
                "{} bytes in the tail",
                tail.bytes
            );
            let held: Vec<u64> = tail.brokers["default/b"].iter().map(|(s, _)| *s).collect();
            assert_eq!(held, (6..=15).collect::<Vec<_>>());
        }
        let mut got = Vec::new();
        while got.len() < 10 {
            got.extend(fetch_seqs(&mut fast, 4).await.expect("from the tail"));
        }
        assert_eq!(got, (6..=15).collect::<Vec<_>>());
        // The slow one is behind the tail: it must read the file, which fails for now.
        assert!(fetch_seqs(&mut slow, 10).await.is_err());
        log.inject_fault(Fault::None);
        let mut caught_up = Vec::new();
        while caught_up.len() < 15 {
            caught_up.extend(fetch_seqs(&mut slow, 4).await.expect("catches up"));
        }
        assert_eq!(caught_up, (1..=15).collect::<Vec<_>>());
        // Caught up, it is served from memory again.
        log.inject_fault(Fault::ReadError);
        log.append("default/b", vec![ten_bytes(16)])
            .await
            .expect("append");
        assert_eq!(
            fetch_seqs(&mut slow, 10).await.expect("from the tail"),
            [16]
        );
        assert_eq!(
            fetch_seqs(&mut fast, 10).await.expect("from the tail"),
            [16]
        );
        log.inject_fault(Fault::None);
        log.close();
    }

    #[test]
    fn the_tail_stays_within_its_bytes_across_brokers() {
        // Room for ten events of 100 bytes.
        let limit = 10 * (100 + TAIL_ENTRY_OVERHEAD);
        let mut tail = Tail {
            limit,
            ..Tail::default()
        };
        let events = |n: usize| (0..n).map(|_| Bytes::from(vec![7u8; 100])).collect();
        tail.push("a", 1, events(8));
        tail.push("b", 1, events(5));
        assert!(tail.bytes <= limit);
        // The broker holding the most events loses its oldest first.
        assert_eq!(tail.brokers["b"].len(), 5);
        assert_eq!(tail.brokers["a"].front().map(|(s, _)| *s), Some(4));
        tail.push("b", 6, events(12));
        assert!(tail.bytes <= limit);
        assert_eq!(
            tail.bytes,
            tail.brokers
                .values()
                .flatten()
                .map(|(_, e)| e.len() + TAIL_ENTRY_OVERHEAD)
                .sum::<usize>()
        );
        assert_eq!(tail.brokers["b"].back().map(|(s, _)| *s), Some(17));
        // Inside the tail: served (empty when nothing is newer); before it: the file.
        assert_eq!(tail.read("b", 17, 10).map(|v| v.len()), Some(0));
        assert_eq!(tail.read("b", 15, 10).map(|v| v.len()), Some(2));
        assert!(tail.read("b", 1, 10).is_none());
        assert!(tail.read("c", 0, 10).is_none());
        // A gap (never expected) restarts the broker's queue instead of serving across it.
        tail.push("b", 30, events(1));
        assert_eq!(tail.brokers["b"].len(), 1);
        // Small events count what they cost, not only their bytes: a bound of 1,000 bytes
        // holds ten events of one byte, not a thousand.
        let mut small = Tail {
            limit: 1000,
            ..Tail::default()
        };
        small.push(
            "a",
            1,
            (0..1000).map(|_| Bytes::from_static(b"x")).collect(),
        );
        assert_eq!(small.brokers["a"].len(), 1000 / (1 + TAIL_ENTRY_OVERHEAD));
        assert_eq!(
            tail.bytes,
            tail.brokers
                .values()
                .flatten()
                .map(|(_, e)| e.len() + TAIL_ENTRY_OVERHEAD)
                .sum::<usize>()
        );
    }
}
