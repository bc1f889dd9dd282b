//! Load accounting for the autoscaler: requests in flight, integrated over time, and request
//! counts — counters and time-weighted averages, never sampled gauges that miss bursts.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;

/// In-flight requests of one replica (or waiting at one caller), with their time-weighted
/// average and count since the last [`sample`](LoadTracker::sample).
#[derive(Debug)]
pub struct LoadTracker {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    in_flight: u32,
    /// When `in_flight` last changed or the load was last sampled.
    since: Instant,
    /// ∫ in_flight dt since the last sample, in request-seconds.
    area: f64,
    requests: u64,
    sampled_at: Instant,
}

/// Load over one sampling interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadSample {
    /// Time-weighted average of requests in flight.
    pub concurrency: f64,
    /// Requests started in the interval.
    pub requests: u64,
    /// Length of the interval in seconds.
    pub seconds: f64,
}

/// Counts one request against a [`LoadTracker`] until dropped.
#[derive(Debug)]
pub struct LoadGuard {
    tracker: Arc<LoadTracker>,
    on_release: Option<Arc<tokio::sync::Notify>>,
}

// === impl LoadTracker ===

impl LoadTracker {
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            state: Mutex::new(State {
                in_flight: 0,
                since: now,
                area: 0.0,
                requests: 0,
                sampled_at: now,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn in_flight(&self) -> u32 {
        self.lock().in_flight
    }

    /// Starts counting a request; `on_release` is notified (one waiter) when it ends.
    pub fn start(self: &Arc<Self>, on_release: Option<Arc<tokio::sync::Notify>>) -> LoadGuard {
        self.lock().begin();
        LoadGuard {
            tracker: self.clone(),
            on_release,
        }
    }

    /// Starts counting a request unless `limit` (> 0) requests are already in flight: the check
    /// and the count happen under one lock, so concurrent callers never exceed the limit.
    pub fn try_start(
        self: &Arc<Self>,
        limit: u32,
        on_release: Option<Arc<tokio::sync::Notify>>,
    ) -> Option<LoadGuard> {
        let mut state = self.lock();
        if limit > 0 && state.in_flight >= limit {
            return None;
        }
        state.begin();
        drop(state);
        Some(LoadGuard {
            tracker: self.clone(),
            on_release,
        })
    }

    /// The load since the previous sample; starts a new interval.
    pub fn sample(&self) -> LoadSample {
        let now = Instant::now();
        let mut state = self.lock();
        state.advance(now);
        let seconds = now.duration_since(state.sampled_at).as_secs_f64();
        let sample = LoadSample {
            concurrency: if seconds > 0.0 {
                state.area / seconds
            } else {
                f64::from(state.in_flight)
            },
            requests: state.requests,
            seconds,
        };
        state.area = 0.0;
        state.requests = 0;
        state.sampled_at = now;
        sample
    }
}

impl Default for LoadTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    fn begin(&mut self) {
        self.advance(Instant::now());
        self.in_flight += 1;
        self.requests += 1;
    }

    fn advance(&mut self, now: Instant) {
        self.area += f64::from(self.in_flight) * now.duration_since(self.since).as_secs_f64();
        self.since = now;
    }
}

// === impl LoadGuard ===

impl Drop for LoadGuard {
    fn drop(&mut self) {
        let mut state = self.tracker.lock();
        state.advance(Instant::now());
        state.in_flight = state.in_flight.saturating_sub(1);
        drop(state);
        if let Some(notify) = &self.on_release {
            notify.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn averages_are_time_weighted() {
        let tracker = Arc::new(LoadTracker::new());
        let first = tracker.start(None);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = tracker.start(None);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // 1 in flight for 0.5 s, then 2 for 0.5 s: 1.5 on average, 2 requests.
        let sample = tracker.sample();
        assert!((sample.concurrency - 1.5).abs() < 1e-6, "{sample:?}");
        assert_eq!(sample.requests, 2);
        drop(first);
        drop(second);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sample = tracker.sample();
        assert_eq!(sample.concurrency, 0.0);
        assert_eq!(sample.requests, 0);
        assert_eq!(tracker.in_flight(), 0);
    }

    #[tokio::test]
    async fn release_wakes_one_waiter() {
        let tracker = Arc::new(LoadTracker::new());
        let notify = Arc::new(tokio::sync::Notify::new());
        let guard = tracker.start(Some(notify.clone()));
        let waiter = tokio::spawn({
            let notify = notify.clone();
            async move { notify.notified().await }
        });
        drop(guard);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }
}
