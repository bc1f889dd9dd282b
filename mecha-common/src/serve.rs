//! Serving an axum router (admin endpoints, the control-plane API) with the limits every Mecha
//! listener has: a bound on open connections and on the time a client may take to send a
//! request head (a slow-loris client is cut off), then a graceful drain on shutdown.
//! `axum::serve` has neither limit, which is why this exists.
//!
//! At the connection limit the longest-open connection with no request in flight (a response
//! body still streaming counts as in flight: a watch stream is never taken) is closed to make
//! room, so idle connections held open cannot lock out probes and clients; only when every
//! connection is busy is the new one closed.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::ServiceExt;

use crate::ShutdownSignal;

/// Bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Longest time from a connection's start (or its previous response) to a whole request
    /// head.
    pub header_read_timeout: Duration,
    /// Longest wait for open requests after shutdown before their connections are dropped.
    pub drain_timeout: Duration,
}

impl Default for ServeLimits {
    /// 512 connections, 10 s for a request head, 30 s of drain.
    fn default() -> Self {
        Self {
            max_connections: 512,
            header_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `router` on `listener` (HTTP/1.1) within `limits` until `shutdown`, then lets open
/// requests finish for at most the drain timeout. Accept errors (out of file descriptors) are
/// logged and retried after a short pause.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    shutdown: ShutdownSignal,
) {
    let open = Connections::default();
    let graceful = GracefulShutdown::new();
    let stop = shutdown.recv();
    tokio::pin!(stop);
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        next_id += 1;
        let Some(slot) = open.admit(next_id, limits.max_connections) else {
            tracing::debug!(
                limit = limits.max_connections,
                "connection refused: every open connection is busy"
            );
            continue;
        };
        let router = router.clone();
        let busy = slot.busy.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let router = router.clone();
            let guard = InFlight::new(busy.clone());
            async move {
                let response = router.oneshot(request).await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| Tracked {
                    body,
                    _guard: guard,
                }))
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        let open = open.clone();
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => {
                    if let Err(error) = ended {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                }
                // Evicted to make room: dropping the connection closes it.
                () = slot.evict.notified() => {}
            }
            open.remove(slot.id);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?limits.drain_timeout,
            "requests still open after the drain timeout; dropped"
        );
    }
}

/// The open connections, oldest first by id.
#[derive(Clone, Default)]
struct Connections(Arc<Mutex<BTreeMap<u64, Arc<Slot>>>>);

/// One open connection: its requests in flight, and how to close it.
struct Slot {
    id: u64,
    busy: Arc<AtomicUsize>,
    evict: Notify,
}

impl Connections {
    /// A slot for connection `id`, closing the oldest idle connection when `limit` are open;
    /// `None` when all of them are busy.
    fn admit(&self, id: u64, limit: usize) -> Option<Arc<Slot>> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if open.len() >= limit {
            let idle = open
                .values()
                .find(|s| s.busy.load(Ordering::Acquire) == 0)?
                .clone();
            open.remove(&idle.id);
            idle.evict.notify_one();
        }
        let slot = Arc::new(Slot {
            id,
            busy: Arc::default(),
            evict: Notify::new(),
        });
        open.insert(id, slot.clone());
        Some(slot)
    }

    fn remove(&self, id: u64) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }
}

/// Counts a request in flight on its connection until its response body is done.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(busy: Arc<AtomicUsize>) -> Self {
        busy.fetch_add(1, Ordering::AcqRel);
        Self(busy)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted in flight until hyper drops it.
struct Tracked {
    body: axum::body::Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Binds `addr` for `what` (named with its setting in the message), or prints why it cannot
/// and gives the exit status a binary ends with (1).
pub async fn listen(
    addr: std::net::SocketAddr,
    what: &str,
) -> Result<TcpListener, std::process::ExitCode> {
    TcpListener::bind(addr).await.map_err(|error| {
        eprintln!("error: cannot listen on {addr} for {what}: {error}");
        std::process::ExitCode::from(1)
    })
}

/// `listen` on every interface at `port`.
pub async fn listen_all(port: u16, what: &str) -> Result<TcpListener, std::process::ExitCode> {
    listen(std::net::SocketAddr::from(([0, 0, 0, 0], port)), what).await
}

/// How a component with one serving port and an admin port starts (the standalone broker and
/// importers): both bound on every interface (a failure names `what` and exits 1), SIGTERM and
/// Ctrl-C listened for before anything starts (so a signal during start-up drains too), then
/// `run` until it returns — exit 0, or 1 with its error said.
pub async fn run_component<F, Fut>(
    (port, what): (u16, &str),
    (admin_port, admin_what): (u16, &str),
    run: F,
) -> std::process::ExitCode
where
    F: FnOnce(TcpListener, TcpListener, crate::shutdown::StopSignals) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let serving = match listen_all(port, what).await {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let admin = match listen_all(admin_port, admin_what).await {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let stop = match crate::shutdown::stop_signals() {
        Ok(stop) => stop,
        Err(error) => {
            eprintln!("error: cannot listen for SIGTERM: {error}");
            return std::process::ExitCode::from(1);
        }
    };
    match run(serving, admin, Box::pin(stop)).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::from(1)
        }
    }
}

/// `/live`, `/ready`, `/metrics` ([`crate::admin::router`]) on `listener`, with the default
/// limits, until `shutdown`.
pub async fn serve_admin(
    listener: TcpListener,
    health: crate::admin::Health,
    registry: prometheus::Registry,
    shutdown: ShutdownSignal,
) {
    let router = crate::admin::router(health, registry);
    serve(listener, router, ServeLimits::default(), shutdown).await;
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use axum::routing::get;

    use super::*;
    use crate::Shutdown;

    async fn start(limits: ServeLimits) -> (std::net::SocketAddr, Shutdown) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = Shutdown::new();
        let router = Router::new().route("/live", get(|| async { "ok\n" }));
        tokio::spawn(serve(listener, router, limits, shutdown.signal()));
        (addr, shutdown)
    }

    fn get_live(addr: std::net::SocketAddr) -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_request_head_is_cut_off_and_others_are_served() {
        let (addr, shutdown) = start(ServeLimits {
            header_read_timeout: Duration::from_millis(300),
            ..ServeLimits::default()
        })
        .await;
        let answered = tokio::task::spawn_blocking(move || {
            let mut slow = std::net::TcpStream::connect(addr).expect("connect");
            slow.write_all(b"GET /live HTTP/1.1\r\nHo").expect("write");
            let started = std::time::Instant::now();
            let mut rest = Vec::new();
            // The server closes it (possibly with a 408) well before the client's 5 s.
            slow.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let _ = slow.read_to_end(&mut rest);
            (started.elapsed(), get_live(addr).expect("served"))
        })
        .await
        .expect("client");
        assert!(answered.0 < Duration::from_secs(4), "{:?}", answered.0);
        assert!(answered.1.starts_with("HTTP/1.1 200"), "{}", answered.1);
        shutdown.trigger();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_limit_idle_connections_make_room_and_busy_ones_stay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = Shutdown::new();
        // `/stream` answers with a body that never ends, like a watch.
        let router = Router::new()
            .route("/live", get(|| async { "ok\n" }))
            .route(
                "/stream",
                get(|| async {
                    let endless =
                        futures_util::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
                    axum::body::Body::from_stream(endless)
                }),
            );
        let limits = ServeLimits {
            max_connections: 2,
            ..ServeLimits::default()
        };
        tokio::spawn(serve(listener, router, limits, shutdown.signal()));
        let outcome = tokio::task::spawn_blocking(move || {
            // A watch-like stream holds one place; an idle connection the other.
            let mut watch = std::net::TcpStream::connect(addr).expect("connect");
            watch
                .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            // Its whole head; the body never comes.
            let mut seen = Vec::new();
            let mut byte = [0u8; 1];
            while !seen.ends_with(b"\r\n\r\n") {
                watch.read_exact(&mut byte).expect("the stream's head");
                seen.push(byte[0]);
            }
            let head: [u8; 12] = seen[..12].try_into().expect("a status line");
            let mut idle = std::net::TcpStream::connect(addr).expect("connect");
            // A probe still gets in: the idle connection is closed for it.
            let probe = get_live(addr);
            idle.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut rest = Vec::new();
            let idle_closed = idle.read_to_end(&mut rest).map(|n| n == 0).unwrap_or(true);
            // The stream was never taken: it is still open (reading would block).
            watch.set_nonblocking(true).expect("nonblocking");
            let watch_open = matches!(
                watch.read(&mut byte),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            );
            (head, probe, idle_closed, watch_open)
        })
        .await
        .expect("client");
        assert_eq!(&outcome.0, b"HTTP/1.1 200");
        assert!(outcome.1.expect("served").starts_with("HTTP/1.1 200"));
        assert!(outcome.2, "the idle connection made room");
        assert!(outcome.3, "the streaming response was left alone");
        shutdown.trigger();
    }
}
