//! Where a source's events go. [`HttpSink`] posts them (binary mode) with the broker's own
//! retry loop ([`eventing_broker::delivery::deliver_with`]); [`MemorySink`] keeps them for tests.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crds::eventing::Delivery;
use eventing_broker::Event;
use eventing_broker::delivery::{self, HttpSender, Outcome, Replies, Target};
use tokio::sync::Notify;

/// Most characters of a sink's answer kept in an error (and shown in `mecha get sources`).
const MAX_ERROR_BODY: usize = 200;

pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// Takes one event; `Ok` once the sink accepted it (every retry is inside).
pub trait Sink: Send + Sync + fmt::Debug + 'static {
    fn send(&self, event: Event) -> SendFuture<'_>;
}

/// A send given up on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the sink answered {code} after {attempts} attempts: {message}")]
pub struct SinkError {
    /// The last status; 500 when there was no response at all.
    pub code: u16,
    pub message: String,
    pub attempts: u32,
}

/// Posts events to a resolved target over HTTP.
#[derive(Debug, Clone)]
pub struct HttpSink {
    target: Target,
    delivery: Delivery,
    timeout: Duration,
    sender: HttpSender,
}

/// Keeps every event; optionally refuses them (tests).
#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    events: Arc<Mutex<Vec<Event>>>,
    refuse: Arc<Mutex<Option<SinkError>>>,
    arrived: Arc<Notify>,
}

// === impl HttpSink ===

impl HttpSink {
    pub fn new(target: Target, delivery: Delivery, timeout: Duration, sender: HttpSender) -> Self {
        Self {
            target,
            delivery,
            timeout,
            sender,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }
}

impl Sink for HttpSink {
    fn send(&self, event: Event) -> SendFuture<'_> {
        Box::pin(async move {
            let outcome = delivery::deliver_with(
                &self.sender,
                &self.target,
                &event,
                &self.delivery,
                self.timeout,
                Replies::<fn(Event) -> std::future::Ready<Result<(), String>>>::Ignore,
            )
            .await;
            match outcome {
                Outcome::Delivered { .. } => Ok(()),
                Outcome::Failed {
                    code,
                    body,
                    attempts,
                } => {
                    let mut message = String::from_utf8_lossy(&body).trim().to_string();
                    if let Some((cut, _)) = message.char_indices().nth(MAX_ERROR_BODY) {
                        message.truncate(cut);
                    }
                    Err(SinkError {
                        code,
                        message,
                        attempts,
                    })
                }
            }
        })
    }
}

// === impl MemorySink ===

impl MemorySink {
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// From now on every send fails with `error` (or succeeds again with `None`).
    pub fn refuse(&self, error: Option<SinkError>) {
        *self.refuse.lock().unwrap_or_else(PoisonError::into_inner) = error;
    }

    /// Waits until at least `count` events arrived.
    pub async fn wait_for(&self, count: usize) -> Vec<Event> {
        loop {
            let arrived = self.arrived.notified();
            let events = self.events();
            if events.len() >= count {
                return events;
            }
            arrived.await;
        }
    }
}

impl Sink for MemorySink {
    fn send(&self, event: Event) -> SendFuture<'_> {
        Box::pin(async move {
            if let Some(error) = self
                .refuse
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
            {
                return Err(error);
            }
            self.events
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(event);
            self.arrived.notify_waiters();
            Ok(())
        })
    }
}
