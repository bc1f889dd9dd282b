//! Kept-alive HTTP/1.1 connections to replicas, shared by the client connections served on
//! one thread: an exchange takes one and gives it back when its response has been relayed,
//! so the connections to a replica track the requests in flight there, not the clients.
//!
//! Without an idle connection, an exchange dials a new one but also takes the first one given
//! back meanwhile, whichever comes first (its own dial then finishes in the background, into
//! the pool). A replica that accepts slowly (Python's `http.server` listens with a backlog of
//! 5) stalls a flood of dials in SYN retransmits for seconds; the requests behind them are
//! served on the connections that do get through — as in hyper's pool.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::READ_BUFFER;

/// Idle connections kept per replica.
const IDLE_PER_REPLICA: usize = 256;
/// An idle connection older than this is closed (hyper's pool default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Pool {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    replicas: HashMap<SocketAddr, Replica>,
    next_sweep: Option<Instant>,
}

#[derive(Debug, Default)]
struct Replica {
    idle: Vec<Upstream>,
    /// Exchanges waiting for a connection.
    waiting: usize,
    /// Wakes one of them when a connection is given back. One per replica: a connection given
    /// back to one replica must not use up the wake-up of an exchange waiting for another.
    available: Arc<Notify>,
}

/// One connection to a replica, with its read buffer.
#[derive(Debug)]
pub struct Upstream {
    pub stream: TcpStream,
    pub buf: BytesMut,
    pub addr: SocketAddr,
    /// Exchanges completed on it: a reused connection may have been closed meanwhile.
    pub used: u64,
    idle_since: Instant,
}

// === impl Pool ===

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection to `addr`: an idle one, else a new one or the first one given back,
    /// whichever comes first. `fresh`: only a new one, and the idle ones are closed (after a
    /// kept-alive connection turned out closed, its idle siblings likely are too).
    pub async fn take(self: &Arc<Self>, addr: SocketAddr, fresh: bool) -> io::Result<Upstream> {
        let available = {
            let mut state = self.lock();
            state.sweep(Instant::now());
            let replica = state.replicas.entry(addr).or_default();
            if fresh {
                replica.idle.clear();
            } else if let Some(upstream) = replica.idle.pop() {
                return Ok(upstream);
            }
            replica.waiting += 1;
            // The replica's entry, and so this, stays while it has a waiter.
            replica.available.clone()
        };
        let _waiting = Waiting { pool: self, addr };
        let mut dial = Box::pin(Upstream::connect(addr));
        loop {
            let given_back = available.notified();
            tokio::pin!(given_back);
            given_back.as_mut().enable();
            if !fresh && let Some(upstream) = self.pop_idle(addr) {
                self.finish_in_background(dial);
                return Ok(upstream);
            }
            tokio::select! {
                dialled = &mut dial => return dialled,
                () = given_back => {}
            }
        }
    }

    fn pop_idle(&self, addr: SocketAddr) -> Option<Upstream> {
        self.lock().replicas.get_mut(&addr)?.idle.pop()
    }

    /// A dial nobody waits for any more: its connection goes to the pool when it arrives.
    fn finish_in_background(
        self: &Arc<Self>,
        dial: Pin<Box<impl Future<Output = io::Result<Upstream>> + Send + 'static>>,
    ) {
        let pool = self.clone();
        tokio::spawn(async move {
            if let Ok(mut upstream) = dial.await {
                upstream.used = 0;
                pool.put(upstream);
            }
        });
    }

    /// Gives back a connection that can carry another exchange.
    pub fn give_back(&self, mut upstream: Upstream) {
        upstream.used += 1;
        self.put(upstream);
    }

    fn put(&self, mut upstream: Upstream) {
        upstream.idle_since = Instant::now();
        let mut state = self.lock();
        let replica = state.replicas.entry(upstream.addr).or_default();
        if replica.idle.len() < IDLE_PER_REPLICA {
            replica.idle.push(upstream);
        }
        if replica.waiting > 0 {
            replica.available.notify_one();
        }
    }

    /// Exchanges waiting for a connection to `addr` right now (for tests).
    #[cfg(test)]
    fn waiting(&self, addr: SocketAddr) -> usize {
        self.lock().replicas.get(&addr).map_or(0, |r| r.waiting)
    }

    /// Connections idle to `addr` right now (for tests).
    #[cfg(test)]
    fn idle(&self, addr: SocketAddr) -> usize {
        self.lock().replicas.get(&addr).map_or(0, |r| r.idle.len())
    }
}

impl State {
    /// At most every 10 s: closes connections idle for longer than [`IDLE_TIMEOUT`] and
    /// forgets replicas with nothing left (the gateway stops routing to removed replicas, so
    /// their connections would otherwise stay open forever).
    fn sweep(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|at| now < at) {
            return;
        }
        self.next_sweep = Some(now + Duration::from_secs(10));
        for replica in self.replicas.values_mut() {
            replica
                .idle
                .retain(|u| now.duration_since(u.idle_since) < IDLE_TIMEOUT);
        }
        self.replicas.retain(|_, r| !r.is_empty());
    }
}

impl Replica {
    fn is_empty(&self) -> bool {
        self.idle.is_empty() && self.waiting == 0
    }
}

// === impl Upstream ===

impl Upstream {
    async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: BytesMut::with_capacity(READ_BUFFER),
            addr,
            used: 0,
            idle_since: Instant::now(),
        })
    }
}

/// Counts an exchange as waiting for a connection to its replica until dropped.
struct Waiting<'a> {
    pool: &'a Pool,
    addr: SocketAddr,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(replica) = self.pool.lock().replicas.get_mut(&self.addr) {
            replica.waiting = replica.waiting.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A replica whose listen backlog is full, so new dials hang in SYN retransmits, and the
    /// one connection that got through.
    struct Stuck {
        addr: SocketAddr,
        first: Upstream,
        _listener: TcpListener,
        _backlog: Vec<TcpStream>,
    }

    async fn stuck_replica(pool: &Arc<Pool>) -> Stuck {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(1).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let first = pool.take(addr, false).await.expect("first dial");
        let mut backlog = Vec::new();
        for _ in 0..8 {
            if let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_millis(50), TcpStream::connect(addr)).await
            {
                backlog.push(stream);
            }
        }
        Stuck {
            addr,
            first,
            _listener: listener,
            _backlog: backlog,
        }
    }

    /// Starts an exchange waiting for a connection to `addr` and returns once it is
    /// registered as waiting (its dial started, stuck behind the backlog).
    async fn waiter(pool: &Arc<Pool>, addr: SocketAddr) -> tokio::task::JoinHandle<u64> {
        let before = pool.waiting(addr);
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.take(addr, false).await.expect("a connection").used }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.waiting(addr) == before {
            assert!(Instant::now() < deadline, "the waiter never started");
            tokio::task::yield_now().await;
        }
        assert!(
            !waiter.is_finished(),
            "the dial should be stuck behind the full backlog"
        );
        waiter
    }

    async fn served_at_once(waiter: tokio::task::JoinHandle<u64>) -> u64 {
        tokio::time::timeout(Duration::from_millis(500), waiter)
            .await
            .expect("served by the connection given back, not after SYN retransmits")
            .expect("joined")
    }

    #[tokio::test]
    async fn a_waiting_exchange_takes_a_connection_given_back_before_its_own_dial() {
        let pool = Arc::new(Pool::default());
        let replica = stuck_replica(&pool).await;
        let waiter = waiter(&pool, replica.addr).await;
        pool.give_back(replica.first);
        assert_eq!(served_at_once(waiter).await, 1, "the connection given back");
    }

    #[tokio::test]
    async fn a_connection_given_back_wakes_an_exchange_waiting_for_its_own_replica() {
        let pool = Arc::new(Pool::default());
        let (a, b) = (stuck_replica(&pool).await, stuck_replica(&pool).await);
        // The exchange for `a` has waited longer; a connection to `b` is still not for it.
        let waiting_for_a = waiter(&pool, a.addr).await;
        let waiting_for_b = waiter(&pool, b.addr).await;
        pool.give_back(b.first);
        assert_eq!(
            served_at_once(waiting_for_b).await,
            1,
            "the connection to b"
        );
        assert!(!waiting_for_a.is_finished());
        pool.give_back(a.first);
        assert_eq!(
            served_at_once(waiting_for_a).await,
            1,
            "the connection to a"
        );
    }

    #[tokio::test]
    async fn fresh_closes_the_idle_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pool = Arc::new(Pool::default());
        let a = pool.take(addr, false).await.expect("dial");
        let b = pool.take(addr, false).await.expect("dial");
        pool.give_back(a);
        pool.give_back(b);
        assert_eq!(pool.idle(addr), 2);
        let again = pool.take(addr, false).await.expect("idle");
        assert_eq!(again.used, 1);
        let fresh = pool.take(addr, true).await.expect("dial");
        assert_eq!((fresh.used, pool.idle(addr)), (0, 0));
    }
}
