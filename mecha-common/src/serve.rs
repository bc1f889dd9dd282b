//! Serving an axum router (admin endpoints, the control-plane API) with the limits every Mecha
//! listener has: a bound on open connections (those past it are closed at once) and on the
//! time a client may take to send a request head (a slow-loris client is cut off), then a
//! graceful drain on shutdown. `axum::serve` has neither limit, which is why this exists.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
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
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let stop = shutdown.recv();
    tokio::pin!(stop);
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(
                limit = limits.max_connections,
                "connection refused: too many open"
            );
            continue;
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let router = router.clone();
            async move { router.oneshot(request).await }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(permit);
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
    async fn connections_past_the_limit_are_closed() {
        let (addr, shutdown) = start(ServeLimits {
            max_connections: 2,
            ..ServeLimits::default()
        })
        .await;
        let outcome = tokio::task::spawn_blocking(move || {
            // Two idle connections hold both places.
            let held: Vec<_> = (0..2)
                .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
                .collect();
            // Accepted in order, so by the time the third is, both places are taken: it is
            // closed unanswered.
            let third = get_live(addr);
            drop(held);
            // With them gone, requests are served again.
            let mut again = Err(std::io::Error::other("never tried"));
            for _ in 0..50 {
                again = get_live(addr);
                if again.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 200")) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (third, again)
        })
        .await
        .expect("client");
        assert!(
            outcome.0.as_ref().map_or(true, |a| a.is_empty()),
            "{:?}",
            outcome.0
        );
        assert!(outcome.1.expect("served").starts_with("HTTP/1.1 200"));
        shutdown.trigger();
    }
}
