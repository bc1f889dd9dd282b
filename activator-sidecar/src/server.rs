//! Serving the data path: HTTP/1.1 and h2c (prior knowledge) on one listener, with upgrades,
//! and a graceful drain: on shutdown the listener closes, idle connections close, and
//! in-flight requests get until the drain timeout to finish.
//!
//! [`serve`] answers every request through hyper. [`serve_fast`] first gives each connection
//! to the HTTP/1.1 fast path ([`crate::h1`]), which hands it to hyper as soon as it sees a
//! request it leaves to the general server, and spreads connections over [`Workers`]: one
//! single-threaded runtime per core, each connection living on one thread for its whole life.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mecha_common::ShutdownSignal;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::body::ProxyBody;
use crate::h1::{self, Dispatch};

/// Accepts connections on `listener` and answers each request with `handler` until
/// `shutdown`, then drains for at most `drain_timeout`.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: ShutdownSignal,
    drain_timeout: Duration,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    accept(
        listener,
        &Workers::current(),
        shutdown,
        drain_timeout,
        move |stream, peer, stop| serve_hyper(builder.clone(), stream, peer, handler.clone(), stop),
    )
    .await;
}

/// Like [`serve`], with plain HTTP/1.1 requests relayed by the fast path through `fast`;
/// `handler` answers whatever the fast path hands over (h2c, upgrades, …).
pub async fn serve_fast<D, H, F>(
    listener: TcpListener,
    fast: Arc<D>,
    handler: H,
    workers: Workers,
    shutdown: ShutdownSignal,
    drain_timeout: Duration,
) where
    D: Dispatch,
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    accept(
        listener,
        &workers,
        shutdown,
        drain_timeout,
        move |stream, peer, stop| {
            let fast = fast.clone();
            let builder = builder.clone();
            let handler = handler.clone();
            async move {
                // The pool of the thread the connection starts on: a replica connection is
                // driven by the reactor of the runtime that opened it.
                let pool = REPLICA_CONNECTIONS.with(Arc::clone);
                if let Some(handover) = h1::serve(stream, peer, &*fast, &pool, &stop).await {
                    serve_hyper(builder, handover.stream, peer, handler, stop).await;
                }
            }
        },
    )
    .await;
}

thread_local! {
    /// Replica connections of the fast path, one pool per thread (per worker runtime).
    static REPLICA_CONNECTIONS: Arc<h1::pool::Pool> = Arc::default();
}

/// Single-threaded runtimes that serve connections: the calling one, and one more per extra
/// core. A connection stays on the runtime it was given (no work stealing, no cross-thread
/// wakeups), which keeps the CPU per request of one thread while using every core.
#[derive(Debug, Clone)]
pub struct Workers {
    handles: Arc<[Handle]>,
    next: Arc<AtomicUsize>,
}

impl Workers {
    /// Only the calling runtime.
    pub fn current() -> Self {
        Self {
            handles: Arc::new([Handle::current()]),
            next: Arc::default(),
        }
    }

    /// `threads` in all, counting the calling runtime; the others run on threads of their
    /// own until the process exits.
    pub fn start(threads: usize) -> std::io::Result<Self> {
        let mut handles = vec![Handle::current()];
        for index in 1..threads {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("data-path-{index}"))
                .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        }
        Ok(Self {
            handles: handles.into(),
            next: Arc::default(),
        })
    }

    /// Runs the connection `serve` makes of `stream` on the next worker, round robin.
    fn spawn<C, Fut>(&self, stream: TcpStream, connection: C)
    where
        C: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        if index == 0 {
            tokio::spawn(connection(stream));
            return;
        }
        // A socket belongs to the reactor that registered it: move it to the worker's.
        match stream.into_std() {
            Ok(stream) => {
                self.handles[index].spawn(async move {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => connection(stream).await,
                        Err(error) => tracing::warn!(%error, "cannot hand a connection over"),
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "cannot hand a connection over"),
        }
    }
}

/// The accept loop: one task per connection, each holding a drain token until it ends.
async fn accept<C, Fut>(
    listener: TcpListener,
    workers: &Workers,
    shutdown: ShutdownSignal,
    drain_timeout: Duration,
    connection: C,
) where
    C: Fn(TcpStream, SocketAddr, ShutdownSignal) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Every connection task holds a sender; the drain is over when all are dropped.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    let stop = shutdown.clone().recv();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let token = open.clone();
        let (connection, stop) = (connection.clone(), shutdown.clone());
        workers.spawn(stream, move |stream| async move {
            connection(stream, peer, stop).await;
            drop(token);
        });
    }
    drop(listener);
    drop(open);
    if tokio::time::timeout(drain_timeout, all_closed.recv())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {drain_timeout:?}; closing them");
    }
}

/// One connection through hyper (HTTP/1.1 or h2c, with upgrades), shut down gracefully when
/// `stop` fires: the request in flight finishes, then the connection closes.
async fn serve_hyper<I, H, F>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: I,
    peer: SocketAddr,
    handler: H,
    stop: ShutdownSignal,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    TokioIo<I>: Read + Write,
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let service = service_fn(move |request| {
        let response = handler(request, peer);
        async move { Ok::<_, Infallible>(response.await) }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let stopped = stop.recv();
    tokio::pin!(stopped);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = &mut stopped => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}
