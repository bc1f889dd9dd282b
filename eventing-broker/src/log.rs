//! The durable event log: one append-only sequence per broker, a cursor per trigger, in an
//! embedded [redb](https://docs.rs/redb) database under the state directory.
//!
//! Every write goes through one writer thread. It takes whatever appends and cursor updates
//! are waiting, applies them all in one write transaction and commits once (one fsync), then
//! answers every waiter: group commit, so durability costs one fsync per batch, not per event,
//! and an append is answered only after its commit — the ingress's `202` means "on disk".
//!
//! Keys are `(broker, sequence)`; sequences start at 1 and only grow (the last one given out is
//! kept per broker, so they survive retention emptying the log). A trigger's cursor is the
//! highest sequence below which it has handled everything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{oneshot, watch};

const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
const HEADS: TableDefinition<&str, u64> = TableDefinition::new("heads");
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");

/// Most operations folded into one commit.
const MAX_BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("event log storage: {0}")]
    Storage(String),
    #[error("the event log is shut down")]
    Closed,
}

/// A handle to the log; cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    path: PathBuf,
    ops: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The last sequence appended, per broker, for dispatchers to wait on.
    heads: Mutex<HashMap<String, watch::Sender<u64>>>,
}

enum Op {
    Append {
        broker: String,
        events: Vec<Vec<u8>>,
        done: oneshot::Sender<Result<u64, String>>,
    },
    Cursors {
        set: Vec<(String, u64)>,
        remove: Vec<String>,
        /// Delete a broker's events up to and including this sequence.
        truncate: Vec<(String, u64)>,
        done: oneshot::Sender<Result<u64, String>>,
    },
}

// === impl EventLog ===

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl EventLog {
    /// Opens (or creates) the log at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let db = Database::create(path).map_err(storage)?;
        let db = Arc::new(db);
        {
            // Create the tables so that readers never meet a missing one.
            let txn = db.begin_write().map_err(storage)?;
            txn.open_table(EVENTS).map_err(storage)?;
            txn.open_table(HEADS).map_err(storage)?;
            txn.open_table(CURSORS).map_err(storage)?;
            txn.commit().map_err(storage)?;
        }
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            db: db.clone(),
            path: path.to_path_buf(),
            ops: Mutex::new(Some(tx)),
            writer: Mutex::default(),
            heads: Mutex::default(),
        });
        let weak = Arc::downgrade(&inner);
        let handle = std::thread::Builder::new()
            .name("event-log-writer".into())
            .spawn(move || writer(&db, &rx, &weak))
            .map_err(|e| LogError::Storage(format!("cannot start the writer: {e}")))?;
        *inner.writer.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
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
            .map_err(|_| LogError::Closed)?
            .map_err(LogError::Storage)
    }

    /// Records trigger cursors, forgets removed triggers' cursors and deletes handled events,
    /// in one commit.
    pub async fn checkpoint(
        &self,
        set: Vec<(String, u64)>,
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
            .map_err(|_| LogError::Closed)?
            .map(|_| ())
            .map_err(LogError::Storage)
    }

    fn send(&self, op: Op) -> Result<(), LogError> {
        let ops = self
            .inner
            .ops
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ops.as_ref()
            .ok_or(LogError::Closed)?
            .send(op)
            .map_err(|_| LogError::Closed)
    }

    /// Stops accepting writes and waits for the writer to commit what is queued and exit.
    pub fn close(&self) {
        self.inner
            .ops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let handle = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// Up to `limit` events of `broker` with sequence above `after`, in order.
    pub fn read(
        &self,
        broker: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, LogError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
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
    }

    /// The last sequence given out for `broker` (0 when none).
    pub fn head(&self, broker: &str) -> u64 {
        *self.subscribe(broker).borrow()
    }

    /// Watches `broker`'s head: changes on every committed append.
    pub fn subscribe(&self, broker: &str) -> watch::Receiver<u64> {
        let mut heads = self
            .inner
            .heads
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(head) = heads.get(broker) {
            return head.subscribe();
        }
        let stored = self.stored_head(broker).unwrap_or(0);
        let (tx, rx) = watch::channel(stored);
        heads.insert(broker.to_string(), tx);
        rx
    }

    fn stored_head(&self, broker: &str) -> Result<u64, LogError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(HEADS).map_err(storage)?;
        Ok(table.get(broker).map_err(storage)?.map_or(0, |v| v.value()))
    }

    /// A trigger's stored cursor.
    pub fn cursor(&self, trigger: &str) -> Result<Option<u64>, LogError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(CURSORS).map_err(storage)?;
        Ok(table.get(trigger).map_err(storage)?.map(|v| v.value()))
    }

    /// Events stored for `broker` right now.
    pub fn len(&self, broker: &str) -> Result<u64, LogError> {
        let txn = self.inner.db.begin_read().map_err(storage)?;
        let table = txn.open_table(EVENTS).map_err(storage)?;
        let count = table
            .range((broker, 0)..=(broker, u64::MAX))
            .map_err(storage)?
            .count();
        Ok(count as u64)
    }

    /// Size of the database file in bytes.
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.inner.path).map_or(0, |m| m.len())
    }
}

fn publish(inner: &Inner, broker: &str, head: u64) {
    let mut heads = inner.heads.lock().unwrap_or_else(PoisonError::into_inner);
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

/// The writer thread: drains the queue into one transaction per round.
fn writer(db: &Database, rx: &mpsc::Receiver<Op>, inner: &std::sync::Weak<Inner>) {
    let mut heads: HashMap<String, u64> = HashMap::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut results: Vec<u64> = Vec::with_capacity(batch.len());
        let mut touched: Vec<(String, u64)> = Vec::new();
        let outcome = (|| -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut events = txn.open_table(EVENTS)?;
                let mut head_table = txn.open_table(HEADS)?;
                let mut cursors = txn.open_table(CURSORS)?;
                for op in &batch {
                    match op {
                        Op::Append {
                            broker,
                            events: new,
                            ..
                        } => {
                            let head = match heads.get(broker) {
                                Some(h) => *h,
                                None => head_table.get(broker.as_str())?.map_or(0, |v| v.value()),
                            };
                            let mut seq = head;
                            for event in new {
                                seq += 1;
                                events.insert((broker.as_str(), seq), event.as_slice())?;
                            }
                            head_table.insert(broker.as_str(), seq)?;
                            heads.insert(broker.clone(), seq);
                            touched.push((broker.clone(), seq));
                            results.push(seq);
                        }
                        Op::Cursors {
                            set,
                            remove,
                            truncate,
                            ..
                        } => {
                            for (trigger, cursor) in set {
                                cursors.insert(trigger.as_str(), *cursor)?;
                            }
                            for trigger in remove {
                                cursors.remove(trigger.as_str())?;
                            }
                            for (broker, upto) in truncate {
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
            Ok(())
        })();
        match outcome {
            Ok(()) => {
                if let Some(inner) = inner.upgrade() {
                    for (broker, head) in &touched {
                        publish(&inner, broker, *head);
                    }
                }
                for (op, result) in batch.into_iter().zip(results) {
                    let done = match op {
                        Op::Append { done, .. } | Op::Cursors { done, .. } => done,
                    };
                    let _ = done.send(Ok(result));
                }
            }
            Err(error) => {
                tracing::error!(%error, "event log commit failed");
                // The transaction was rolled back: forget the sequences it gave out.
                heads.clear();
                for op in batch {
                    let done = match op {
                        Op::Append { done, .. } | Op::Cursors { done, .. } => done,
                    };
                    let _ = done.send(Err(error.to_string()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mecha-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir.join("events.redb")
    }

    #[tokio::test]
    async fn appends_read_back_in_order_and_survive_reopen() {
        let path = temp("reopen");
        {
            let log = EventLog::open(&path).expect("open");
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
                vec![("t1".into(), 2)],
                vec![],
                vec![("default/b".into(), 2)],
            )
            .await
            .expect("checkpoint");
            assert_eq!(log.len("default/b").expect("len"), 1);
            log.close();
        }
        let log = EventLog::open(&path).expect("reopen");
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
    }

    #[tokio::test]
    async fn concurrent_appends_are_group_committed() {
        let log = EventLog::open(&temp("group")).expect("open");
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
}
