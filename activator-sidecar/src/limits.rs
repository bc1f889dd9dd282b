//! Limits on the client connections a listener keeps, so slow or idle clients cannot use up
//! the process: a time to send a request head, a time a kept-alive connection may sit idle,
//! and a number of connections. At the limit, a new connection closes the connection that has
//! been idle (or reading a head) the longest; only when every connection is in the middle of
//! an exchange is the new one refused. New requests keep being served under a flood of idle or
//! half-sent connections, and the limit follows the process's file limit so `accept` does not
//! run out of descriptors first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A connection's idle time when it is in the middle of an exchange.
const BUSY: u64 = u64::MAX;

/// Descriptors kept for everything but client connections (listeners, logs, the store).
const RESERVED_FILES: u64 = 64;

/// How long clients may take, and how many connections a listener keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// From the first byte of a request head to its end (`SIDECAR_HEADER_READ_TIMEOUT`,
    /// 10 s); a client that takes longer gets 408 and the connection closes.
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request
    /// (`SIDECAR_IDLE_TIMEOUT`, 60 s).
    pub idle_timeout: Duration,
    /// Client connections kept at once (`SIDECAR_MAX_CONNECTIONS`; by default half the file
    /// limit, since each may hold a replica connection too).
    pub max_connections: usize,
    /// How long a client may pause in the middle of its request body
    /// (`SIDECAR_BODY_READ_TIMEOUT`, 30 s); then 408 and the connection closes. While it
    /// pauses, its connection counts as idle for the connection limit.
    pub body_read_timeout: Duration,
}

/// The open connections of one listener.
#[derive(Debug)]
pub struct Registry {
    epoch: Instant,
    max: usize,
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
    /// Whether the limit was reached since it was last logged.
    at_limit: AtomicBool,
}

/// What the accept loop knows of one connection: whether it is idle, and since when.
#[derive(Debug)]
pub struct ConnState {
    epoch: Instant,
    /// Milliseconds since the registry's epoch at which it went idle; [`BUSY`] in an exchange.
    idle_since: AtomicU64,
    evict: Notify,
    /// Told to close, for readers that poll rather than await (the general server's).
    evicted: AtomicBool,
    /// Woken when told to close.
    waker: Mutex<Option<Waker>>,
}

/// A connection's place in the registry; dropping it frees the place.
#[derive(Debug)]
pub struct Admitted {
    registry: Arc<Registry>,
    id: u64,
    pub state: Arc<ConnState>,
}

// === impl Limits ===

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: max_from_file_limit(),
            body_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Half of what the soft file limit leaves after [`RESERVED_FILES`], at least 16.
pub fn max_from_file_limit() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20);
    usize::try_from(soft.saturating_sub(RESERVED_FILES) / 2)
        .unwrap_or(usize::MAX)
        .clamp(16, 1 << 20)
}

// === impl Registry ===

impl Registry {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            max: max.max(1),
            next: AtomicU64::new(0),
            open: Mutex::default(),
            at_limit: AtomicBool::new(false),
        })
    }

    /// A place for a new connection: at the limit, the connection idle the longest is told to
    /// close and gives up its place; `None` when every connection is busy.
    pub fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= self.max {
            if !self.at_limit.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    limit = self.max,
                    "connection limit reached: closing the longest idle connections"
                );
            }
            if !Self::evict_oldest(&mut open) {
                tracing::debug!(limit = self.max, "every connection is busy: refusing one");
                return None;
            }
        } else if open.len() < self.max / 2 {
            self.at_limit.store(false, Ordering::Relaxed);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            epoch: self.epoch,
            idle_since: AtomicU64::new(0),
            evict: Notify::new(),
            evicted: AtomicBool::new(false),
            waker: Mutex::default(),
        });
        state.idle();
        open.insert(id, state.clone());
        Some(Admitted {
            registry: self.clone(),
            id,
            state,
        })
    }

    /// Closes the longest idle connection, if one is idle; `false` otherwise. Used at the
    /// limit and when `accept` runs out of descriptors.
    pub fn evict_one(&self) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        Self::evict_oldest(&mut open)
    }

    fn evict_oldest(open: &mut HashMap<u64, Arc<ConnState>>) -> bool {
        let oldest = open
            .iter()
            .map(|(id, state)| (state.idle_since.load(Ordering::Relaxed), *id))
            .filter(|(since, _)| *since != BUSY)
            .min();
        let Some((_, id)) = oldest else {
            return false;
        };
        if let Some(state) = open.remove(&id) {
            // A stored permit: the connection sees it at its next wait even if not waiting now.
            state.evict.notify_one();
            state.evicted.store(true, Ordering::Release);
            if let Some(waker) = state.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
                waker.wake();
            }
        }
        true
    }

    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.registry.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(&self.id);
    }
}

// === impl ConnState ===

impl ConnState {
    /// In an exchange: not to be closed for room.
    pub fn busy(&self) {
        self.idle_since.store(BUSY, Ordering::Relaxed);
    }

    /// Waiting for (or reading) a request head: may be closed for room, oldest first.
    pub fn idle(&self) {
        self.idle_at(Instant::now());
    }

    /// [`ConnState::idle`] since `now`.
    pub fn idle_at(&self, now: Instant) {
        let since = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(BUSY - 1);
        self.idle_since.store(since, Ordering::Relaxed);
    }

    /// Resolves when the accept loop closed this connection for room.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }

    /// For a reader that polls: whether it was told to close; if not, `waker` is woken when it
    /// is.
    pub fn poll_evicted(&self, waker: &Waker) -> bool {
        if self.evicted.load(Ordering::Acquire) {
            return true;
        }
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
        // Told between the check and the registration: the waker may have been missed.
        self.evicted.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_the_limit_the_longest_idle_connection_makes_room() {
        let registry = Registry::new(3);
        let a = registry.admit().expect("a");
        tokio::time::advance(Duration::from_millis(10)).await;
        let b = registry.admit().expect("b");
        tokio::time::advance(Duration::from_millis(10)).await;
        let c = registry.admit().expect("c");
        // a is busy, so b (idle the longest of the others) goes.
        a.state.busy();
        let d = registry.admit().expect("room made");
        assert_eq!(registry.open(), 3);
        tokio::time::timeout(Duration::from_millis(1), b.state.evicted())
            .await
            .expect("b was told to close");
        // c and d idle, a busy: c is next, then d; then nobody is idle.
        let _e = registry.admit().expect("c makes room");
        tokio::time::timeout(Duration::from_millis(1), c.state.evicted())
            .await
            .expect("c was told to close");
        d.state.busy();
        _e.state.busy();
        assert!(registry.admit().is_none(), "every connection is busy");
        drop(a);
        assert!(registry.admit().is_some(), "a closed and freed its place");
        assert!(max_from_file_limit() >= 16);
    }
}
