//! Serving the data path: every connection of a role's listener starts on the HTTP/1.1 fast
//! path ([`crate::h1`]), which reads and checks every request head against
//! [`crate::rules`]; hyper answers what the fast path hands it — one request at a time, the
//! connection coming back afterwards — and HTTP/2 connections whole. Connections are spread
//! over [`Workers`] (one single-threaded runtime per core), and drained gracefully: on shutdown
//! the listener closes, idle connections close, and in-flight requests get until the drain
//! timeout to finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mecha_common::ShutdownSignal;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::h1::guard::Guarded;
use crate::h1::{self, Handover, Role, codec};
use crate::limits::{Admitted, ConnState, Limits, Registry};
use crate::rules;

/// How a role's listener serves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Relay plain HTTP/1.1 requests on the fast path (`true`, the default) or hand every
    /// request to hyper (`SIDECAR_FAST_PATH=false`): same rules, same answers, more CPU.
    pub fast_path: bool,
    /// How long in-flight requests may take after shutdown.
    pub drain_timeout: Duration,
    /// Head and idle timeouts, and the most connections kept.
    pub limits: Limits,
}

impl ServeOptions {
    /// The defaults, with `drain_timeout`.
    pub fn new(drain_timeout: Duration) -> Self {
        Self {
            fast_path: true,
            drain_timeout,
            limits: Limits::default(),
        }
    }
}

/// Accepts connections on `listener` and serves `role` on them until `shutdown`, then drains
/// for at most the drain timeout.
pub async fn serve<R: Role>(
    listener: TcpListener,
    role: Arc<R>,
    workers: Workers,
    shutdown: ShutdownSignal,
    options: ServeOptions,
) {
    let fast = options.fast_path;
    let limits = Arc::new(options.limits);
    let registry = Registry::new(limits.max_connections);
    accept(
        listener,
        &workers,
        &registry,
        shutdown,
        options.drain_timeout,
        move |stream, peer, stop, admitted| {
            let (role, limits) = (role.clone(), limits.clone());
            async move {
                // The pool of the thread the connection starts on: a replica connection is
                // driven by the reactor of the runtime that opened it.
                let pool = REPLICA_CONNECTIONS.with(Arc::clone);
                let connection = h1::Connection {
                    peer,
                    pool: &pool,
                    shutdown: &stop,
                    fast,
                    limits: &limits,
                    state: &admitted.state,
                };
                let (mut stream, mut buf) = (stream, BytesMut::new());
                loop {
                    match h1::serve(stream, buf, &connection, &*role).await {
                        None => return,
                        Some(Handover::Connection(io)) => {
                            return serve_http2(io, peer, role, stop.clone(), &admitted.state)
                                .await;
                        }
                        Some(Handover::Request {
                            stream: s,
                            buf: b,
                            close,
                            upgrade,
                        }) => match one_request(
                            s,
                            b,
                            upgrade,
                            peer,
                            role.clone(),
                            (&admitted.state, &limits),
                        )
                        .await
                        {
                            Some(back) if !close && !upgrade && !stop.is_triggered() => {
                                (stream, buf) = back;
                            }
                            _ => return,
                        },
                    }
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

/// The accept loop: one task per connection, each holding a drain token and its place in
/// `registry` until it ends.
async fn accept<C, Fut>(
    listener: TcpListener,
    workers: &Workers,
    registry: &Arc<Registry>,
    shutdown: ShutdownSignal,
    drain_timeout: Duration,
    connection: C,
) where
    C: Fn(TcpStream, SocketAddr, ShutdownSignal, Admitted) -> Fut + Clone + Send + Sync + 'static,
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
                    // Out of file descriptors: an idle connection makes room (its task closes
                    // it soon); with none, back off instead of spinning.
                    let room = registry.evict_one();
                    if room {
                        tracing::debug!(%error, "accept failed; closed an idle connection");
                    } else {
                        tracing::warn!(%error, "accept failed and no connection is idle");
                    }
                    let pause = if room { 5 } else { 50 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Some(admitted) = registry.admit() else {
            // Every connection is in an exchange: this one cannot be served now.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let token = open.clone();
        let (connection, stop) = (connection.clone(), shutdown.clone());
        workers.spawn(stream, move |stream| async move {
            connection(stream, peer, stop, admitted).await;
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

/// Hyper answers the one request at the start of `buf`; the connection comes back, with the
/// bytes after the request, unless it closed (or was upgraded).
async fn one_request<R: Role>(
    stream: TcpStream,
    buf: BytesMut,
    upgrade: bool,
    peer: SocketAddr,
    role: Arc<R>,
    (state, limits): (&Arc<ConnState>, &Limits),
) -> Option<(TcpStream, BytesMut)> {
    let (head_len, body) = codec::request_extent(&buf)?;
    let timeout = limits.body_read_timeout;
    let answered = Arc::new(AtomicBool::new(false));
    let mut io = Guarded::new(stream, buf, head_len, body).watched(state.clone(), timeout);
    io = if upgrade {
        io.then_open()
    } else {
        io.watching_departure(answered.clone())
    };
    let broken = io.broken();
    let service = {
        let (answered, broken) = (answered.clone(), broken.clone());
        service_fn(move |request: Request<Incoming>| {
            let (role, answered, broken) = (role.clone(), answered.clone(), broken.clone());
            Box::pin(async move {
                let mut response = answer(&*role, request, peer).await;
                if let Some(refusal) = Guarded::refusal(&broken, timeout) {
                    // Whatever forwarding made of it, a broken body is the client's error, as
                    // on the fast path, and the connection ends with it.
                    response = ProxyError::Refused(refusal).into_response();
                    response.headers_mut().insert(
                        http::header::CONNECTION,
                        http::HeaderValue::from_static("close"),
                    );
                }
                answered.store(true, Ordering::Release);
                Ok::<_, Infallible>(response)
            })
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.max_buf_size(rules::MAX_HEAD.max(8192) * 2);
    if upgrade {
        // A refused upgrade closes the connection: hyper would read the next request itself.
        builder.keep_alive(false);
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        if let Err(error) = connection.await {
            tracing::debug!(%error, %peer, "upgraded connection ended with an error");
        }
        return None;
    }
    let mut connection = builder.serve_connection(TokioIo::new(io), service);
    let mut stopping = false;
    let done = std::future::poll_fn(|cx| {
        loop {
            let polled = connection.poll_without_shutdown(cx);
            // Once the response head is out (the handler returned), keep-alive is turned off
            // so hyper stops after this response instead of reading the next request; the
            // head already went out with the connection kept alive.
            if polled.is_pending() && !stopping && answered.load(Ordering::Acquire) {
                stopping = true;
                Pin::new(&mut connection).graceful_shutdown();
                continue;
            }
            return polled;
        }
    })
    .await;
    if let Err(error) = done {
        tracing::debug!(%error, %peer, "connection ended with an error");
        return None;
    }
    if Guarded::refusal(&broken, timeout).is_some() {
        return None;
    }
    let parts = connection.into_parts();
    if !parts.io.inner().complete() {
        // Answered before its body was read: the rest of the body is not a request.
        return None;
    }
    let (stream, pending) = parts.io.into_inner().into_parts();
    let mut rest = BytesMut::from(&parts.read_buf[..]);
    rest.extend_from_slice(&pending);
    Some((stream, rest))
}

/// An HTTP/2 connection (h2c with prior knowledge), whole, through hyper; shut down gracefully
/// when `stop` fires.
async fn serve_http2<R: Role>(
    io: Guarded,
    peer: SocketAddr,
    role: Arc<R>,
    stop: ShutdownSignal,
    state: &Arc<ConnState>,
) {
    // Busy while a stream is open, so the connection limit only closes idle ones.
    let streams = Arc::new(AtomicUsize::new(0));
    let service = {
        let state = state.clone();
        service_fn(move |request: Request<Incoming>| {
            let (role, state, streams) = (role.clone(), state.clone(), streams.clone());
            async move {
                if streams.fetch_add(1, Ordering::AcqRel) == 0 {
                    state.busy();
                }
                let response = answer(&*role, request, peer).await;
                if streams.fetch_sub(1, Ordering::AcqRel) == 1 {
                    state.idle();
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .max_header_list_size(u32::try_from(rules::MAX_HEAD).unwrap_or(u32::MAX));
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let stopped = stop.recv();
    tokio::pin!(stopped);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = &mut stopped => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = state.evicted() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

/// The general server's answer: the rules' checks (HTTP/2 requests were not read by the fast
/// path), then the role.
async fn answer<R: Role>(
    role: &R,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    if let Err(refusal) = rules::check_parsed(&request) {
        tracing::debug!(%refusal, %peer, "request refused");
        return ProxyError::Refused(refusal).into_response();
    }
    role.handle(request, peer).await
}
