//! Outlier detection for one replica, as a pure state machine (time passed in): a replica
//! that fails `consecutive_failures` requests in a row — no response head before the
//! deadline, or no connection — is ejected from its revision's rotation for a time that grows
//! with repeated ejections, then admitted again on probation (one request at a time) until a
//! request succeeds. Envoy's `consecutive_gateway_failure` ejection, with its
//! `base_ejection_time × times ejected` (capped) and a half-open return instead of sending a
//! returning replica its full share at once.
//!
//! The data path owns the policy around it (which failures count, logs, metrics, never
//! ejecting the last routable replica); this module only decides.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// When to eject and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Failures in a row that eject a replica; 0 turns outlier detection off.
    pub consecutive_failures: u32,
    /// The first ejection's length; the k-th (without good behaviour in between) lasts k times
    /// this.
    pub base_ejection: Duration,
    /// The longest an ejection lasts.
    pub max_ejection: Duration,
}

/// What one request sent to the replica came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head came (any status: the replica answers).
    Answered,
    /// No response head before the deadline, or no connection.
    Failed,
}

/// Whether the picker may send the replica a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routable {
    Yes,
    /// Back from an ejection and not yet proven: only while it has nothing in flight.
    OnTrial,
    No,
}

/// A change worth saying (logs, metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Taken out of rotation for `ejected_for`; `times`: the ejection multiplier.
    Ejected {
        ejected_for: Duration,
        times: u32,
        failures: u32,
    },
    /// It reached the threshold but is its revision's last routable replica, so it stays.
    Spared { failures: u32 },
    /// Its ejection time is over: admitted again, on trial.
    Returned,
    /// On trial, a request succeeded: fully back.
    Recovered,
}

/// The outlier state of one replica.
#[derive(Debug, Clone)]
pub struct Outlier {
    /// Failures in a row since the last success (or return).
    failures: u32,
    /// The ejection multiplier (Envoy's "times ejected"), decayed by time in rotation.
    times: u32,
    state: State,
    /// When it last came back into rotation, for the multiplier's decay.
    back_since: Option<Instant>,
}

/// An [`Outlier`] shared by the clones of one endpoint, cheap to read while the replica is
/// in rotation (no lock): the picker asks every candidate on every request.
#[derive(Debug, Default)]
pub struct OutlierCell {
    /// Whether the state is anything but plainly in rotation.
    flagged: AtomicBool,
    state: Mutex<Outlier>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InRotation,
    Ejected { until: Instant },
    Trial,
}

// === impl OutlierConfig ===

impl OutlierConfig {
    /// Three failures in a row, 30 s base ejection, at most 300 s.
    pub const DEFAULT: Self = Self {
        consecutive_failures: 3,
        base_ejection: Duration::from_secs(30),
        max_ejection: Duration::from_secs(300),
    };

    pub fn enabled(&self) -> bool {
        self.consecutive_failures > 0
    }
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

// === impl Outlier ===

impl Outlier {
    pub fn new() -> Self {
        Self {
            failures: 0,
            times: 0,
            state: State::InRotation,
            back_since: None,
        }
    }

    /// Whether it is ejected at `now` (an ejection whose time is over counts as returned).
    pub fn ejected(&self, now: Instant) -> bool {
        matches!(self.state, State::Ejected { until } if now < until)
    }

    /// Whether a request may be sent to it at `now`.
    pub fn routable(&self, now: Instant) -> Routable {
        match self.state {
            State::InRotation => Routable::Yes,
            State::Ejected { until } if now < until => Routable::No,
            State::Ejected { .. } | State::Trial => Routable::OnTrial,
        }
    }

    /// When the current ejection ends, if it is ejected.
    pub fn ejected_until(&self) -> Option<Instant> {
        match self.state {
            State::Ejected { until } => Some(until),
            _ => None,
        }
    }

    /// Admits it again if its ejection is over at `now` ([`Transition::Returned`], once).
    pub fn settle(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::Ejected { until } if now >= until => {
                self.state = State::Trial;
                self.failures = 0;
                self.back_since = Some(until);
                Some(Transition::Returned)
            }
            _ => None,
        }
    }

    /// Records one request's outcome at `now` (after [`settle`](Self::settle)).
    /// `others_routable` says whether another replica of the revision would still take
    /// requests; without one, a failing replica is spared rather than ejected.
    pub fn record(
        &mut self,
        now: Instant,
        outcome: Outcome,
        others_routable: bool,
        config: &OutlierConfig,
    ) -> Option<Transition> {
        if !config.enabled() {
            return None;
        }
        match (self.state, outcome) {
            (State::InRotation, Outcome::Answered) => {
                self.failures = 0;
                None
            }
            (State::Trial, Outcome::Answered) => {
                self.state = State::InRotation;
                self.failures = 0;
                Some(Transition::Recovered)
            }
            // A request sent before the ejection; it changes nothing until the ejection ends.
            (State::Ejected { .. }, Outcome::Answered) => {
                self.failures = 0;
                None
            }
            (State::Ejected { .. }, Outcome::Failed) => None,
            // On trial one failure is enough: it failed the threshold before.
            (State::Trial, Outcome::Failed) => {
                self.failures = config.consecutive_failures.max(self.failures + 1);
                self.eject_or_spare(now, others_routable, config)
            }
            (State::InRotation, Outcome::Failed) => {
                self.failures += 1;
                if self.failures < config.consecutive_failures {
                    return None;
                }
                self.eject_or_spare(now, others_routable, config)
            }
        }
    }

    fn eject_or_spare(
        &mut self,
        now: Instant,
        others_routable: bool,
        config: &OutlierConfig,
    ) -> Option<Transition> {
        let failures = self.failures;
        if !others_routable {
            // Said once per run of failures, not on every further one.
            let first = failures == config.consecutive_failures || self.state == State::Trial;
            self.state = State::InRotation;
            return first.then_some(Transition::Spared { failures });
        }
        // Envoy lowers the multiplier while a host behaves; here by one per base ejection
        // time spent back in rotation since the last return.
        if let Some(back) = self.back_since
            && !config.base_ejection.is_zero()
        {
            let periods =
                now.saturating_duration_since(back).as_nanos() / config.base_ejection.as_nanos();
            self.times = self
                .times
                .saturating_sub(u32::try_from(periods).unwrap_or(u32::MAX));
        }
        self.times = self.times.saturating_add(1);
        let ejected_for = config
            .base_ejection
            .saturating_mul(self.times)
            .min(config.max_ejection);
        self.state = State::Ejected {
            until: now + ejected_for,
        };
        self.failures = 0;
        Some(Transition::Ejected {
            ejected_for,
            times: self.times,
            failures,
        })
    }
}

impl Default for Outlier {
    fn default() -> Self {
        Self::new()
    }
}

// === impl OutlierCell ===

impl OutlierCell {
    pub fn routable(&self, now: Instant) -> Routable {
        if !self.flagged.load(Ordering::Acquire) {
            return Routable::Yes;
        }
        self.lock().routable(now)
    }

    /// A copy of the state.
    pub fn get(&self) -> Outlier {
        self.lock().clone()
    }

    /// Changes the state under its lock.
    pub fn update<R>(&self, change: impl FnOnce(&mut Outlier) -> R) -> R {
        let mut state = self.lock();
        let result = change(&mut state);
        self.flagged
            .store(state.state != State::InRotation, Ordering::Release);
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outlier> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: OutlierConfig = OutlierConfig {
        consecutive_failures: 3,
        base_ejection: Duration::from_secs(30),
        max_ejection: Duration::from_secs(75),
    };

    fn fail(o: &mut Outlier) -> Option<Transition> {
        let now = Instant::now();
        o.settle(now);
        o.record(now, Outcome::Failed, true, &CONFIG)
    }

    fn answer(o: &mut Outlier) -> Option<Transition> {
        let now = Instant::now();
        o.settle(now);
        o.record(now, Outcome::Answered, true, &CONFIG)
    }

    fn ejected_for(secs: u64, times: u32) -> Option<Transition> {
        Some(Transition::Ejected {
            ejected_for: Duration::from_secs(secs),
            times,
            failures: 3,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let mut o = Outlier::new();
        assert_eq!(fail(&mut o), None);
        assert_eq!(fail(&mut o), None);
        assert_eq!(answer(&mut o), None);
        assert_eq!(fail(&mut o), None);
        assert_eq!(fail(&mut o), None);
        assert_eq!(o.routable(Instant::now()), Routable::Yes);
        assert_eq!(fail(&mut o), ejected_for(30, 1));
        assert!(o.ejected(Instant::now()));
        assert_eq!(o.routable(Instant::now()), Routable::No);
        // Requests that were in flight when it was ejected change nothing.
        assert_eq!(fail(&mut o), None);
        assert_eq!(answer(&mut o), None);
        assert!(o.ejected(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn it_returns_on_trial_after_the_ejection_time() {
        let mut o = Outlier::new();
        for _ in 0..3 {
            fail(&mut o);
        }
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(o.settle(Instant::now()), None);
        assert_eq!(o.routable(Instant::now()), Routable::No);
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Routable on trial even before anyone settles it.
        assert_eq!(o.routable(Instant::now()), Routable::OnTrial);
        assert!(!o.ejected(Instant::now()));
        assert_eq!(o.settle(Instant::now()), Some(Transition::Returned));
        assert_eq!(o.settle(Instant::now()), None);
        assert_eq!(answer(&mut o), Some(Transition::Recovered));
        assert_eq!(o.routable(Instant::now()), Routable::Yes);
        // Fully back: it takes the whole threshold again.
        assert_eq!(fail(&mut o), None);
        assert_eq!(fail(&mut o), None);
        assert_eq!(o.routable(Instant::now()), Routable::Yes);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_on_trial_ejects_again_for_longer_up_to_the_cap() {
        let mut o = Outlier::new();
        for _ in 0..3 {
            fail(&mut o);
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        // The first failure back ejects it for 2 × 30 s.
        assert_eq!(fail(&mut o), ejected_for(60, 2));
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(o.routable(Instant::now()), Routable::No);
        tokio::time::sleep(Duration::from_secs(1)).await;
        // 3 × 30 s is over the 75 s cap.
        assert_eq!(fail(&mut o), ejected_for(75, 3));
        tokio::time::sleep(Duration::from_secs(75)).await;
        assert_eq!(fail(&mut o), ejected_for(75, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn the_multiplier_decays_while_the_replica_behaves() {
        let mut o = Outlier::new();
        for _ in 0..3 {
            fail(&mut o);
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(fail(&mut o), ejected_for(60, 2));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(answer(&mut o), Some(Transition::Recovered));
        // Two base periods back in rotation take the multiplier from 2 to 0.
        tokio::time::sleep(Duration::from_secs(61)).await;
        for _ in 0..2 {
            assert_eq!(fail(&mut o), None);
        }
        assert_eq!(fail(&mut o), ejected_for(30, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_routable_replica_is_spared_and_said_so_once() {
        let mut o = Outlier::new();
        let now = Instant::now();
        let record = |o: &mut Outlier| o.record(now, Outcome::Failed, false, &CONFIG);
        assert_eq!(record(&mut o), None);
        assert_eq!(record(&mut o), None);
        assert_eq!(record(&mut o), Some(Transition::Spared { failures: 3 }));
        assert_eq!(record(&mut o), None);
        assert_eq!(o.routable(now), Routable::Yes);
        // Once another replica takes requests, the next failure ejects it.
        assert_eq!(
            o.record(now, Outcome::Failed, true, &CONFIG),
            Some(Transition::Ejected {
                ejected_for: Duration::from_secs(30),
                times: 1,
                failures: 5
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_failures_turns_it_off() {
        let off = OutlierConfig {
            consecutive_failures: 0,
            ..CONFIG
        };
        let mut o = Outlier::new();
        for _ in 0..10 {
            assert_eq!(o.record(Instant::now(), Outcome::Failed, true, &off), None);
        }
        assert_eq!(o.routable(Instant::now()), Routable::Yes);
    }
}
