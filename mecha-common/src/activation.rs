//! The caller side of scale-from-zero, shared by the gateway (and later the outbound sidecar)
//! and read by the autoscaler: which requests are held waiting for a revision's replicas, and
//! the pokes that ask for an immediate scaling decision.
//!
//! In local mode caller and autoscaler share one process and this is the channel between them;
//! across processes the same counts travel as stat messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Notify, mpsc};

use crate::load::{LoadGuard, LoadSample, LoadTracker};
use crate::routing::BufferLimits;

/// A request for an immediate decision: `waiting` requests are held for `revision`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Poke {
    pub revision: String,
    pub waiting: u32,
}

/// Requests held per revision, and the pokes channel.
#[derive(Debug, Clone)]
pub struct Activation {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    revisions: Mutex<HashMap<String, Arc<RevisionDemand>>>,
    pokes: mpsc::UnboundedSender<Poke>,
}

#[derive(Debug)]
struct RevisionDemand {
    waiting: Arc<LoadTracker>,
    /// Declared body bytes of the held requests.
    bytes: Mutex<u64>,
    released: Arc<Notify>,
}

/// A request held for a revision; it stops counting as waiting when dropped.
#[derive(Debug)]
pub struct Waiting {
    _load: LoadGuard,
    demand: Arc<RevisionDemand>,
    bytes: u64,
}

/// Why a request could not be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferFull {
    Requests(u32),
    Bytes(u64),
}

// === impl Activation ===

impl Activation {
    /// The hub, and the receiver of pokes (held by the autoscaler).
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Poke>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                inner: Arc::new(Inner {
                    revisions: Mutex::default(),
                    pokes: tx,
                }),
            },
            rx,
        )
    }

    fn demand(&self, revision: &str) -> Arc<RevisionDemand> {
        let mut revisions = self
            .inner
            .revisions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        revisions
            .entry(revision.to_string())
            .or_insert_with(|| {
                Arc::new(RevisionDemand {
                    waiting: Arc::new(LoadTracker::new()),
                    bytes: Mutex::new(0),
                    released: Arc::new(Notify::new()),
                })
            })
            .clone()
    }

    /// The signal shared by a revision's endpoints: notified when a request on one of them
    /// finishes.
    pub fn released(&self, revision: &str) -> Arc<Notify> {
        self.demand(revision).released.clone()
    }

    /// Holds a request for `revision` within `limits` and pokes the autoscaler with the number
    /// of requests now waiting.
    pub fn hold(
        &self,
        revision: &str,
        body_bytes: u64,
        limits: BufferLimits,
    ) -> Result<Waiting, BufferFull> {
        let demand = self.demand(revision);
        let waiting = demand.waiting.in_flight();
        if waiting >= limits.requests {
            return Err(BufferFull::Requests(limits.requests));
        }
        {
            let mut bytes = demand.bytes.lock().unwrap_or_else(PoisonError::into_inner);
            if *bytes + body_bytes > limits.bytes {
                return Err(BufferFull::Bytes(limits.bytes));
            }
            *bytes += body_bytes;
        }
        let load = demand.waiting.start(None);
        let _ = self.inner.pokes.send(Poke {
            revision: revision.to_string(),
            waiting: waiting + 1,
        });
        Ok(Waiting {
            _load: load,
            demand,
            bytes: body_bytes,
        })
    }

    /// Passes on a poke from a caller in another process.
    pub fn poke(&self, poke: Poke) {
        let _ = self.inner.pokes.send(poke);
    }

    /// Requests held right now for `revision`.
    pub fn waiting(&self, revision: &str) -> u32 {
        self.inner
            .revisions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(revision)
            .map_or(0, |d| d.waiting.in_flight())
    }

    /// The held-request load of `revision` since its last sample (the autoscaler samples).
    pub fn sample(&self, revision: &str) -> LoadSample {
        let demand = self
            .inner
            .revisions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(revision)
            .cloned();
        demand.map(|d| d.waiting.sample()).unwrap_or_default()
    }

    /// Forgets revisions that no longer exist.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.inner
            .revisions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|revision, demand| keep(revision) || demand.waiting.in_flight() > 0);
    }
}

// === impl Waiting ===

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut bytes = self
            .demand
            .bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *bytes = bytes.saturating_sub(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_within_limits_and_pokes() {
        let (activation, mut pokes) = Activation::new();
        let limits = BufferLimits {
            requests: 2,
            bytes: 100,
        };
        let a = activation.hold("r", 60, limits).expect("first");
        assert_eq!(
            pokes.recv().await,
            Some(Poke {
                revision: "r".into(),
                waiting: 1
            })
        );
        assert_eq!(
            activation.hold("r", 60, limits).err(),
            Some(BufferFull::Bytes(100))
        );
        let b = activation.hold("r", 10, limits).expect("second");
        assert_eq!(
            activation.hold("r", 0, limits).err(),
            Some(BufferFull::Requests(2))
        );
        assert_eq!(activation.waiting("r"), 2);
        drop(a);
        drop(b);
        assert_eq!(activation.waiting("r"), 0);
        activation.hold("r", 100, limits).expect("room again");
    }
}
