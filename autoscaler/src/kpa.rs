//! Knative's KPA algorithm as a pure state machine: no I/O, no clock — every call takes `now`
//! (time since an arbitrary start), so it is tested with scripted load under exact time.
//!
//! - [`DeciderSpec`]: the per-revision settings, resolved from `config-autoscaler`, the
//!   revision's `autoscaling.knative.dev/*` annotations and its `containerConcurrency`.
//! - [`Kpa`]: observed load in 1-second buckets, stable and panic window averages, panic mode,
//!   rate limits, activation scale and scale-down delay — Knative's `Scale` step.
//! - [`Scaler`]: what is applied to the workload: initial scale, min/max bounds, and scale to
//!   zero only after the grace (and retention) period — and never within the first stable
//!   window of the revision's life.

use std::collections::VecDeque;
use std::time::Duration;

use crds::autoscaling::{Metric, ScalingAnnotations};
use crds::config::AutoscalerConfig;

/// Knative's decision interval.
pub const TICK: Duration = Duration::from_secs(2);
/// Utilization of the RPS target unless the revision says otherwise.
const RPS_UTILIZATION: f64 = 0.7;

/// Everything one revision's autoscaler decides with.
#[derive(Debug, Clone, PartialEq)]
pub struct DeciderSpec {
    pub metric: Metric,
    /// Per-replica value the KPA aims for: total × utilization, at least 0.01.
    pub target: f64,
    /// Per-replica capacity before utilization (the concurrency or RPS target).
    pub total: f64,
    pub stable_window: Duration,
    pub panic_window: Duration,
    /// As a ratio: 2.0 for 200%.
    pub panic_threshold: f64,
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub activation_scale: u32,
    pub scale_down_delay: Duration,
    pub min_scale: u32,
    /// 0 means unlimited.
    pub max_scale: u32,
    pub initial_scale: u32,
    pub enable_scale_to_zero: bool,
    pub scale_to_zero_grace_period: Duration,
    pub scale_to_zero_pod_retention_period: Duration,
}

/// One decision of [`Kpa::scale`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// `None` when there is no data to decide on yet (keep the current scale).
    pub desired: Option<u32>,
    pub panicking: bool,
    pub stable_value: f64,
    pub panic_value: f64,
}

/// Load averaged over a trailing window of 1-second buckets.
#[derive(Debug, Clone)]
pub struct WindowAverage {
    /// (second, summed value) oldest first, one entry per second that saw a record.
    buckets: VecDeque<(u64, f64)>,
    first: Option<u64>,
    retain: u64,
}

/// The KPA decider of one revision.
#[derive(Debug, Clone)]
pub struct Kpa {
    spec: DeciderSpec,
    load: WindowAverage,
    panic_since: Option<Duration>,
    max_panic_pods: u32,
    /// Desired counts of the last `scale_down_delay`, for the delay window's maximum.
    delay: VecDeque<(Duration, u32)>,
}

/// Turns KPA decisions into the replica count the workload gets.
#[derive(Debug, Clone)]
pub struct Scaler {
    spec: DeciderSpec,
    /// The revision has reached its initial scale once (Knative's "initial scale reached").
    initialized: bool,
    /// Since when the KPA has wanted zero replicas.
    zero_since: Option<Duration>,
    /// When the first decision was applied: a revision lives at least one stable window
    /// before the grace period towards zero can start, even if it never saw load.
    started: Option<Duration>,
    current: u32,
}

// === impl DeciderSpec ===

impl DeciderSpec {
    /// Resolves the settings as Knative does: the annotation wins over the ConfigMap; with
    /// `containerConcurrency` > 0 the concurrency target is at most it.
    pub fn resolve(
        config: &AutoscalerConfig,
        annotations: &ScalingAnnotations,
        container_concurrency: u32,
    ) -> Self {
        let metric = annotations.metric.unwrap_or(Metric::Concurrency);
        let (total, utilization) = match metric {
            Metric::Concurrency => {
                // Knative's `ResolveMetricTarget` (pkg/reconciler/autoscaling/resources/
                // target.go): without a `target` annotation the total is containerConcurrency
                // when set, else the default; with one, the annotation capped by
                // containerConcurrency. The utilization applies after either.
                let cc = (container_concurrency > 0).then(|| f64::from(container_concurrency));
                let total = match (annotations.target, cc) {
                    (Some(target), Some(cc)) => target.min(cc),
                    (Some(target), None) => target,
                    (None, Some(cc)) => cc,
                    (None, None) => config.container_concurrency_target_default,
                };
                (
                    total,
                    config.container_concurrency_target_percentage / 100.0,
                )
            }
            Metric::Rps => (
                annotations
                    .target
                    .unwrap_or(config.requests_per_second_target_default),
                RPS_UTILIZATION,
            ),
        };
        let utilization = annotations
            .target_utilization_percentage
            .map_or(utilization, |p| p / 100.0);
        let stable_window = annotations.window.unwrap_or(config.stable_window);
        let panic_pct = annotations
            .panic_window_percentage
            .unwrap_or(config.panic_window_percentage);
        let panic_window = Duration::from_secs_f64(
            (stable_window.as_secs_f64() * panic_pct / 100.0)
                .round()
                .max(1.0),
        );
        Self {
            metric,
            target: (total * utilization).max(0.01),
            total,
            stable_window,
            panic_window,
            panic_threshold: annotations
                .panic_threshold_percentage
                .unwrap_or(config.panic_threshold_percentage)
                / 100.0,
            max_scale_up_rate: config.max_scale_up_rate,
            max_scale_down_rate: config.max_scale_down_rate,
            activation_scale: annotations.activation_scale.unwrap_or(1),
            scale_down_delay: annotations
                .scale_down_delay
                .unwrap_or(config.scale_down_delay),
            min_scale: annotations.min_scale.unwrap_or(config.min_scale),
            max_scale: annotations.max_scale.unwrap_or(config.max_scale),
            initial_scale: annotations.initial_scale.unwrap_or(config.initial_scale),
            enable_scale_to_zero: config.enable_scale_to_zero,
            scale_to_zero_grace_period: config.scale_to_zero_grace_period,
            scale_to_zero_pod_retention_period: annotations
                .scale_to_zero_pod_retention_period
                .unwrap_or(config.scale_to_zero_pod_retention_period),
        }
    }

    /// Clamps to `[min_scale, max_scale]` (max 0 is unlimited).
    pub fn bound(&self, replicas: u32) -> u32 {
        let mut replicas = replicas.max(self.min_scale);
        if self.max_scale > 0 {
            replicas = replicas.min(self.max_scale);
        }
        replicas
    }
}

// === impl WindowAverage ===

impl WindowAverage {
    /// Keeps enough buckets for averages over up to `retain`.
    pub fn new(retain: Duration) -> Self {
        Self {
            buckets: VecDeque::new(),
            first: None,
            retain: retain.as_secs().max(1),
        }
    }

    /// Adds `value` to the bucket of the second `now` falls in.
    pub fn record(&mut self, now: Duration, value: f64) {
        let second = now.as_secs();
        self.first.get_or_insert(second);
        match self.buckets.back_mut() {
            Some((s, sum)) if *s == second => *sum += value,
            _ => self.buckets.push_back((second, value)),
        }
        while self
            .buckets
            .front()
            .is_some_and(|(s, _)| s + self.retain < second)
        {
            self.buckets.pop_front();
        }
    }

    /// The average per second over the `window` ending at `now`: seconds without a record
    /// count as zero; while fewer than `window` seconds have passed since the first record,
    /// the average is over the seconds that have. `None` before any record.
    pub fn average(&self, now: Duration, window: Duration) -> Option<f64> {
        let first = self.first?;
        let now_s = now.as_secs();
        let window_s = window.as_secs().max(1);
        let start = (now_s + 1).saturating_sub(window_s).max(first);
        let seconds = (now_s + 1).saturating_sub(start).max(1);
        let sum: f64 = self
            .buckets
            .iter()
            .filter(|(s, _)| *s >= start && *s <= now_s)
            .map(|(_, v)| v)
            .sum();
        Some(sum / seconds as f64)
    }
}

/// `ceil` for replica counts, robust where float arithmetic lands a hair above an integer:
/// 2.8 / 0.7 is 4.000000000000001 in binary floating point, and Knative's own running window
/// total (added and subtracted per bucket) lands on either side of such boundaries for the same
/// load. A value within one part in 10⁹ of an integer counts as that integer, so the same load
/// always gives the count exact arithmetic gives (4, not 5).
fn ceil(x: f64) -> f64 {
    let nearest = x.round();
    if (x - nearest).abs() <= 1e-9 * nearest.abs().max(1.0) {
        nearest
    } else {
        x.ceil()
    }
}

// === impl Kpa ===

impl Kpa {
    pub fn new(spec: DeciderSpec) -> Self {
        Self {
            load: WindowAverage::new(spec.stable_window),
            spec,
            panic_since: None,
            max_panic_pods: 0,
            delay: VecDeque::new(),
        }
    }

    pub fn spec(&self) -> &DeciderSpec {
        &self.spec
    }

    /// Replaces the settings (a changed ConfigMap), keeping the observed load.
    pub fn update_spec(&mut self, spec: DeciderSpec) {
        self.load.retain = spec.stable_window.as_secs().max(1);
        self.spec = spec;
    }

    /// Records the revision's total load for one second: summed concurrency (or requests)
    /// over all replicas and over callers holding requests for it.
    pub fn record(&mut self, now: Duration, value: f64) {
        self.load.record(now, value);
    }

    /// Knative's `Scale`: `ready` is the number of ready replicas, `reachable` whether the
    /// revision receives traffic (only then may it scale down by the rate limit).
    pub fn scale(&mut self, now: Duration, ready: u32, reachable: bool) -> Decision {
        let spec = &self.spec;
        let (Some(stable_value), Some(panic_value)) = (
            self.load.average(now, spec.stable_window),
            self.load.average(now, spec.panic_window),
        ) else {
            return Decision {
                desired: None,
                panicking: self.panic_since.is_some(),
                stable_value: 0.0,
                panic_value: 0.0,
            };
        };
        let ready = f64::from(ready.max(1));
        let max_up = ceil(spec.max_scale_up_rate * ready);
        let max_down = if reachable {
            (ready / spec.max_scale_down_rate).floor()
        } else {
            0.0
        };
        let dspc = ceil(stable_value / spec.target);
        let dppc = ceil(panic_value / spec.target);
        let mut desired_stable = dspc.max(max_down).min(max_up) as u32;
        let mut desired_panic = dppc.max(max_down).min(max_up) as u32;
        if spec.activation_scale > 1 {
            if dspc > 0.0 && spec.activation_scale > desired_stable {
                desired_stable = spec.activation_scale;
            }
            if dppc > 0.0 && spec.activation_scale > desired_panic {
                desired_panic = spec.activation_scale;
            }
        }
        let over_threshold = dppc / ready >= spec.panic_threshold;
        if over_threshold {
            // Entering panic, or still over the threshold: the panic clock restarts.
            self.panic_since = Some(now);
        } else if self
            .panic_since
            .is_some_and(|since| since + spec.stable_window < now)
        {
            // The surge has made its way into the stable window: panic is over.
            self.panic_since = None;
            self.max_panic_pods = 0;
        }
        let mut desired = desired_stable;
        if self.panic_since.is_some() {
            // Never scale down while panicking.
            desired = desired.max(desired_panic).max(self.max_panic_pods);
            self.max_panic_pods = desired;
        }
        if !spec.scale_down_delay.is_zero() {
            self.delay.push_back((now, desired));
            while self
                .delay
                .front()
                .is_some_and(|(t, _)| *t + spec.scale_down_delay <= now)
            {
                self.delay.pop_front();
            }
            desired = self.delay.iter().map(|(_, d)| *d).max().unwrap_or(desired);
        }
        Decision {
            desired: Some(desired),
            panicking: self.panic_since.is_some(),
            stable_value,
            panic_value,
        }
    }
}

// === impl Scaler ===

impl Scaler {
    /// A new revision starts at its initial scale (bounded by min/max).
    pub fn new(spec: DeciderSpec) -> Self {
        let current = spec.bound(spec.initial_scale);
        Self {
            spec,
            initialized: false,
            zero_since: None,
            started: None,
            current,
        }
    }

    /// A revision the runtime already runs at `current` replicas (a new leader in a cluster
    /// takes over revisions another decided for): it goes on from that count, bounded, rather
    /// than from its initial scale. `initialized` says whether it has been ready before (then
    /// the initial scale no longer holds it up).
    pub fn resume(spec: DeciderSpec, current: u32, initialized: bool) -> Self {
        let current = spec.bound(current);
        Self {
            spec,
            initialized,
            zero_since: None,
            started: None,
            current,
        }
    }

    pub fn current(&self) -> u32 {
        self.current
    }

    pub fn update_spec(&mut self, spec: DeciderSpec) {
        self.spec = spec;
    }

    /// Marks that the revision has had `ready` replicas: until it once reaches its initial
    /// scale, the autoscaler does not scale it below that.
    pub fn observe_ready(&mut self, ready: u32) {
        if ready >= self.spec.bound(self.spec.initial_scale) {
            self.initialized = true;
        }
    }

    /// The replica count to apply at `now` given the KPA's decision.
    pub fn apply(&mut self, now: Duration, decision: &Decision) -> u32 {
        let Some(mut desired) = decision.desired else {
            return self.current;
        };
        let started = *self.started.get_or_insert(now);
        if !self.initialized {
            desired = desired.max(self.spec.initial_scale);
        }
        let bounded = self.spec.bound(desired);
        self.current = if bounded == 0 {
            let since =
                (*self.zero_since.get_or_insert(now)).max(started + self.spec.stable_window);
            let wait = self
                .spec
                .scale_to_zero_grace_period
                .max(self.spec.scale_to_zero_pod_retention_period);
            if self.spec.enable_scale_to_zero && now.saturating_sub(since) >= wait {
                0
            } else {
                // Keep one replica until the grace period is over (or for ever when scaling to
                // zero is disabled) — but never start one for a revision that has none.
                self.current.min(1)
            }
        } else {
            self.zero_since = None;
            bounded
        };
        self.current
    }

    /// Callers hold `waiting` requests for the revision: act now instead of at the next tick,
    /// as Knative's activator does, with enough replicas for the held requests at the target
    /// (at least the activation scale). Never scales down. Returns the new replica count.
    pub fn activate(&mut self, waiting: u32) -> u32 {
        self.zero_since = None;
        let needed = ceil(f64::from(waiting) / self.spec.target) as u32;
        let wanted = self
            .spec
            .bound(needed.max(self.spec.activation_scale).max(1));
        self.current = self.current.max(wanted);
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DeciderSpec {
        DeciderSpec::resolve(
            &AutoscalerConfig::default(),
            &ScalingAnnotations::default(),
            0,
        )
    }

    #[test]
    fn resolves_knatives_targets() {
        let s = spec();
        assert_eq!(s.target, 70.0);
        assert_eq!(s.panic_window, Duration::from_secs(6));
        assert_eq!(s.panic_threshold, 2.0);
        let cc1 = DeciderSpec::resolve(
            &AutoscalerConfig::default(),
            &ScalingAnnotations::default(),
            1,
        );
        assert_eq!(cc1.total, 1.0);
        assert!((cc1.target - 0.7).abs() < 1e-9);
        let rps = DeciderSpec::resolve(
            &AutoscalerConfig::default(),
            &ScalingAnnotations {
                metric: Some(Metric::Rps),
                ..ScalingAnnotations::default()
            },
            0,
        );
        assert!((rps.target - 140.0).abs() < 1e-9);
        // containerConcurrency above the default is the target, as in Knative.
        let cc500 = DeciderSpec::resolve(
            &AutoscalerConfig::default(),
            &ScalingAnnotations::default(),
            500,
        );
        assert_eq!(cc500.total, 500.0);
        assert!((cc500.target - 350.0).abs() < 1e-9);
        let annotated = DeciderSpec::resolve(
            &AutoscalerConfig::default(),
            &ScalingAnnotations {
                target: Some(50.0),
                ..ScalingAnnotations::default()
            },
            500,
        );
        assert_eq!(annotated.total, 50.0);
        let capped = DeciderSpec::resolve(
            &AutoscalerConfig::default(),
            &ScalingAnnotations {
                target: Some(800.0),
                ..ScalingAnnotations::default()
            },
            500,
        );
        assert_eq!(capped.total, 500.0);
    }

    #[test]
    fn replica_counts_do_not_jump_on_float_noise() {
        // 2.8 averaged over a window of float sums, then divided by 0.7, lands just above 4.
        let sum: f64 = std::iter::repeat_n(2.8_f64, 60).sum();
        let average = sum / 60.0;
        assert!(average / 0.7 > 4.0, "{}", average / 0.7);
        assert_eq!(ceil(average / 0.7), 4.0);
        assert_eq!(ceil(4.000000000000001), 4.0);
        assert_eq!(ceil(4.0001), 5.0);
        assert_eq!(ceil(0.0), 0.0);
        assert_eq!(ceil(0.1), 1.0);
        assert_eq!(ceil(80.0 + 1e-12), 80.0);
    }

    #[test]
    fn window_average_counts_missing_seconds_as_zero() {
        let mut w = WindowAverage::new(Duration::from_secs(60));
        assert_eq!(w.average(Duration::ZERO, Duration::from_secs(60)), None);
        w.record(Duration::from_secs(0), 10.0);
        w.record(Duration::from_millis(500), 10.0);
        assert_eq!(
            w.average(Duration::from_secs(0), Duration::from_secs(60)),
            Some(20.0)
        );
        // Two seconds seen, one of them empty.
        assert_eq!(
            w.average(Duration::from_secs(1), Duration::from_secs(60)),
            Some(10.0)
        );
        // Past the window, nothing is left.
        assert_eq!(
            w.average(Duration::from_secs(100), Duration::from_secs(6)),
            Some(0.0)
        );
    }

    #[test]
    fn scale_up_is_rate_limited_and_panic_never_scales_down() {
        let mut kpa = Kpa::new(DeciderSpec {
            max_scale_up_rate: 2.0,
            ..spec()
        });
        for s in 0..10 {
            kpa.record(Duration::from_secs(s), 700.0);
        }
        let d = kpa.scale(Duration::from_secs(9), 1, true);
        assert_eq!(d.desired, Some(2), "ceil(2.0 × 1 ready)");
        assert!(d.panicking);
        let d = kpa.scale(Duration::from_secs(9), 2, true);
        assert_eq!(d.desired, Some(4));
        // Load drops to zero: the panic window empties at once, but panic mode holds for a
        // stable window after the last tick over the threshold and never scales down; the
        // stable window still holds the burst (7000 over 20 s = 350, 350 / 70 → 5).
        for s in 10..20 {
            kpa.record(Duration::from_secs(s), 0.0);
        }
        let d = kpa.scale(Duration::from_secs(19), 4, true);
        assert_eq!(d.panic_value, 0.0);
        assert_eq!(d.desired, Some(5));
        assert!(d.panicking);
        let d = kpa.scale(Duration::from_secs(21), 5, true);
        assert_eq!(d.desired, Some(5), "no scale-down while panicking");
    }

    #[test]
    fn a_revision_at_zero_stays_at_zero_without_load() {
        let mut scaler = Scaler::new(DeciderSpec {
            initial_scale: 0,
            ..spec()
        });
        let zero = Decision {
            desired: Some(0),
            panicking: false,
            stable_value: 0.0,
            panic_value: 0.0,
        };
        assert_eq!(scaler.current(), 0);
        assert_eq!(scaler.apply(Duration::from_secs(0), &zero), 0);
        assert_eq!(scaler.apply(Duration::from_secs(2), &zero), 0);
    }

    #[test]
    fn scaler_waits_out_the_grace_period_before_zero() {
        let mut scaler = Scaler::new(spec());
        assert_eq!(scaler.current(), 1);
        scaler.observe_ready(1);
        let zero = Decision {
            desired: Some(0),
            panicking: false,
            stable_value: 0.0,
            panic_value: 0.0,
        };
        // A revision that never saw load lives one stable window (60 s), then the 30 s grace.
        assert_eq!(scaler.apply(Duration::from_secs(0), &zero), 1);
        assert_eq!(scaler.apply(Duration::from_secs(89), &zero), 1);
        assert_eq!(scaler.apply(Duration::from_secs(90), &zero), 0);
        assert_eq!(scaler.activate(1), 1);
        // 100 held requests at a target of 70 per replica need two replicas at once.
        assert_eq!(scaler.activate(100), 2);
    }
}
