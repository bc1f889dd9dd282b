//! Graceful shutdown: one [`Shutdown`] owned by the binary, any number of [`ShutdownSignal`]s
//! handed to library entry points (the mini-redis pattern: libraries take a shutdown future,
//! only binaries handle OS signals — through [`stop_signals`], the one way they all listen).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// The sending side, held by whoever decides when to stop (a binary's signal handler, a test).
#[derive(Debug)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
    triggered: Arc<AtomicBool>,
}

/// A cloneable future source that resolves once shutdown has been requested.
#[derive(Debug, Clone)]
pub struct ShutdownSignal {
    rx: watch::Receiver<bool>,
    /// The same fact as the channel's value, readable without its lock (the data path asks
    /// once per request, from every thread).
    triggered: Arc<AtomicBool>,
}

// === impl Shutdown ===

impl Shutdown {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(false);
        Self {
            tx,
            triggered: Arc::default(),
        }
    }

    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal {
            rx: self.tx.subscribe(),
            triggered: self.triggered.clone(),
        }
    }

    /// Asks every holder of a [`ShutdownSignal`] to stop. Idempotent.
    pub fn trigger(&self) {
        self.triggered.store(true, Ordering::Release);
        self.tx.send_replace(true);
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

// === impl ShutdownSignal ===

impl ShutdownSignal {
    /// A signal that never fires, for tests and for components that run until dropped.
    pub fn never() -> Self {
        let (tx, rx) = watch::channel(false);
        // Leaking one sender keeps the channel open forever so `recv` never resolves.
        std::mem::forget(tx);
        Self {
            rx,
            triggered: Arc::default(),
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.load(Ordering::Acquire)
    }

    /// Resolves once shutdown is requested (or the [`Shutdown`] was dropped, which means the
    /// owner is gone and nobody could ever ask for a clean stop).
    pub async fn recv(mut self) {
        let _ = self.rx.wait_for(|stop| *stop).await;
    }
}

/// Listens for Ctrl-C and SIGTERM from now on (so a signal during start-up is not lost); the
/// future ends at the first of either. What every long-running binary drains on.
/// [`stop_signals`], boxed to be passed on by name.
pub type StopSignals = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

pub fn stop_signals() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn signal_fires_for_every_clone() {
        let shutdown = Shutdown::new();
        let a = shutdown.signal();
        let b = a.clone();
        assert!(!a.is_triggered());
        shutdown.trigger();
        a.clone().recv().await;
        b.recv().await;
        assert!(a.is_triggered());
    }

    #[tokio::test]
    async fn dropping_the_owner_releases_waiters() {
        let shutdown = Shutdown::new();
        let signal = shutdown.signal();
        drop(shutdown);
        signal.recv().await;
    }
}
