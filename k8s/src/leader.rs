//! Leader election with a `coordination.k8s.io/v1` `Lease`, as client-go's leader election
//! does it: the holder renews `renewTime` every [`LeaseTimings::renew_every`]; another replica
//! takes the lease over once it has seen the same record unchanged for the lease's duration
//! (measured on its own clock from when it first saw the record, so clocks need not agree);
//! every write carries the `resourceVersion` it read, so two replicas cannot both win. A leader
//! that cannot renew within [`LeaseTimings::renew_deadline`] stops leading before anyone can
//! take over; one that shuts down releases the lease, so a successor need not wait.
//!
//! Only the leader runs the reconcilers and writes replica counts; every replica serves the
//! control-plane API from its own caches (see docs/architecture.md).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use autoscaler::ServingState;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use mecha_common::admin::Health;
use mecha_common::{Shutdown, ShutdownSignal};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::reconcile::{Metrics, ServingSettings};
use crate::state::Caches;
use crate::status::Addresses;

/// The Lease's name (in the autoscaler's namespace).
pub const LEASE_NAME: &str = "mecha-autoscaler";
/// The Lease annotation where the holder says where it takes forwarded reports
/// (`POD_IP:AUTOSCALER_PORT`), see [`crate::forward`].
pub const LEADER_ADDRESS: &str = "mecha.dev/leader-address";

/// How long a lease lasts and how often it is renewed or tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// `leaseDurationSeconds`: how long others wait for an unrenewed lease (15 s).
    pub duration: Duration,
    /// The holder stops leading when it could not renew for this long (10 s); less than
    /// `duration`, so it has stopped before anyone else can start.
    pub renew_deadline: Duration,
    /// How often the holder renews (2 s), and a follower looks (the same).
    pub renew_every: Duration,
}

/// One replica's part in the election.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: LeaseTimings,
    leading: watch::Sender<bool>,
    /// Where this replica takes forwarded reports, written on the Lease while it holds it.
    address: Option<String>,
    /// Where the current holder takes them, as its Lease says (`None` while this replica
    /// leads, or nobody does, or the holder does not say).
    leader: watch::Sender<Option<String>>,
    /// The record last seen (holder, renew time, resourceVersion) and when it was first seen.
    observed: Option<(Observed, Instant)>,
    /// When this replica last renewed (while leading).
    renewed: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    duration: Option<i32>,
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the lease (acquired, taken over or renewed).
    Leading,
    /// Another replica holds a lease that has not expired.
    Following(Option<String>),
    /// The API server did not take the attempt (an error or a lost race); tried again later.
    Failed(String),
}

// === impl LeaseTimings ===

impl Default for LeaseTimings {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
        }
    }
}

// === impl Elector ===

impl Elector {
    /// `identity` is this replica's (its pod name).
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        timings: LeaseTimings,
    ) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            timings,
            leading: watch::channel(false).0,
            address: None,
            leader: watch::channel(None).0,
            observed: None,
            renewed: None,
        }
    }

    /// Writes `address` on the Lease while holding it, for followers to forward reports to.
    pub fn with_address(mut self, address: Option<String>) -> Self {
        self.address = address;
        self
    }

    /// Where the leader takes forwarded reports, while another replica leads.
    pub fn leader_address(&self) -> watch::Receiver<Option<String>> {
        self.leader.subscribe()
    }

    /// `true` while this replica leads.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    /// One round: create the lease, renew ours, take over an expired one, or follow.
    pub async fn attempt(&mut self) -> Attempt {
        let attempt = self.try_once().await;
        let now = Instant::now();
        match &attempt {
            Attempt::Leading => {
                self.renewed = Some(now);
                self.set_leading(true);
            }
            Attempt::Following(holder) => {
                self.renewed = None;
                if *self.leading.borrow() {
                    tracing::warn!(holder = ?holder, "another replica holds the lease now");
                }
                self.set_leading(false);
            }
            Attempt::Failed(error) => {
                tracing::warn!(%error, lease = %self.name, "leader election attempt failed");
                // Keep leading only while a renewal is recent enough that nobody can have
                // taken over.
                let recent = self
                    .renewed
                    .is_some_and(|at| now.duration_since(at) < self.timings.renew_deadline);
                if !recent {
                    self.set_leading(false);
                }
            }
        }
        attempt
    }

    fn set_leading(&self, leading: bool) {
        self.leading.send_if_modified(|current| {
            if *current == leading {
                return false;
            }
            if leading {
                tracing::info!(identity = %self.identity, "leading");
            } else {
                tracing::info!(identity = %self.identity, "no longer leading");
            }
            *current = leading;
            true
        });
    }

    async fn try_once(&mut self) -> Attempt {
        let now = Instant::now();
        let current = match self.api.get_opt(&self.name).await {
            Ok(current) => current,
            Err(error) => return Attempt::Failed(format!("reading lease {}: {error}", self.name)),
        };
        let Some(mut lease) = current else {
            let mut lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.held_spec(0)),
            };
            self.annotate(&mut lease.metadata);
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Attempt::Leading,
                Err(error) => Attempt::Failed(format!("creating lease {}: {error}", self.name)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let seen = Observed {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.clone(),
            duration: spec.lease_duration_seconds,
        };
        let first_seen = match &self.observed {
            Some((record, at)) if *record == seen => *at,
            _ => {
                self.observed = Some((seen.clone(), now));
                now
            }
        };
        let ours = seen.holder.as_deref() == Some(self.identity.as_str());
        let theirs = (!ours && seen.holder.is_some())
            .then(|| {
                lease
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(LEADER_ADDRESS).cloned())
            })
            .flatten();
        self.leader.send_if_modified(|current| {
            let changed = *current != theirs;
            *current = theirs;
            changed
        });
        let lasts = seen
            .duration
            .and_then(|d| u64::try_from(d).ok())
            .map_or(self.timings.duration, Duration::from_secs);
        let expired = seen.holder.is_none() || now.duration_since(first_seen) >= lasts;
        if !ours && !expired {
            return Attempt::Following(seen.holder);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(if ours {
            LeaseSpec {
                renew_time: Some(now_micro()),
                lease_duration_seconds: Some(seconds(self.timings.duration)),
                ..spec
            }
        } else {
            self.held_spec(transitions + 1)
        });
        self.annotate(&mut lease.metadata);
        // The resourceVersion read is sent back: a replica that raced us gets a conflict.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !ours {
                    tracing::info!(previous = ?seen.holder, "took over the lease");
                }
                Attempt::Leading
            }
            Err(error) => Attempt::Failed(format!("writing lease {}: {error}", self.name)),
        }
    }

    /// Puts (or removes) this replica's address on the Lease it writes.
    fn annotate(&self, metadata: &mut ObjectMeta) {
        let annotations = metadata.annotations.get_or_insert_with(Default::default);
        match &self.address {
            Some(address) => {
                annotations.insert(LEADER_ADDRESS.into(), address.clone());
            }
            None => {
                annotations.remove(LEADER_ADDRESS);
            }
        }
    }

    fn held_spec(&self, transitions: i32) -> LeaseSpec {
        let now = now_micro();
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(seconds(self.timings.duration)),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Gives the lease up if this replica holds it, so a successor need not wait it out.
    pub async fn release(&mut self) {
        let was_leading = *self.leading.borrow();
        self.set_leading(false);
        if !was_leading {
            return;
        }
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        if let Some(annotations) = lease.metadata.annotations.as_mut() {
            annotations.remove(LEADER_ADDRESS);
        }
        spec.renew_time = Some(now_micro());
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "released the lease"),
            Err(error) => tracing::warn!(%error, "cannot release the lease; it expires on its own"),
        }
    }

    /// Takes part until shutdown, then releases the lease.
    pub async fn run(mut self, shutdown: ShutdownSignal) {
        let stop = shutdown.recv();
        tokio::pin!(stop);
        loop {
            self.attempt().await;
            tokio::select! {
                () = tokio::time::sleep(self.timings.renew_every) => {}
                () = &mut stop => break,
            }
        }
        self.release().await;
    }
}

/// Runs the reconcilers ([`crate::reconcile::run`]) while this replica leads and `caches` are
/// synced, with the domain of the current desired state; restarts them when the domain
/// changes, stops them when leadership is lost, and restarts them with backoff if they end on
/// their own (`/ready` says so meanwhile). Returns on shutdown.
#[allow(
    clippy::too_many_arguments,
    reason = "what the reconcilers need and what decides when they run"
)]
pub async fn reconcile_while_leading(
    client: kube::Client,
    settings: ServingSettings,
    metrics: Metrics,
    mut leading: watch::Receiver<bool>,
    mut state: watch::Receiver<Arc<ServingState>>,
    caches: Caches,
    health: Health,
    shutdown: ShutdownSignal,
) {
    let stop = shutdown.clone().recv();
    tokio::pin!(stop);
    let mut failures = 0u32;
    loop {
        // Wait to lead, with synced caches.
        while !(*leading.borrow_and_update() && caches.synced()) {
            health.set_problem("reconcilers", None);
            tokio::select! {
                changed = leading.changed() => if changed.is_err() { return },
                changed = state.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = &mut stop => return,
            }
        }
        let domain = state
            .borrow_and_update()
            .domain()
            .unwrap_or(crate::status::DEFAULT_DOMAIN)
            .to_string();
        let mut settings = settings.clone();
        settings.addresses = Addresses {
            domain: domain.clone(),
            ..settings.addresses
        };
        tracing::info!(%domain, "starting the reconcilers");
        let run_shutdown = Shutdown::new();
        let mut task = tokio::spawn(crate::reconcile::run(
            client.clone(),
            settings,
            metrics.clone(),
            run_shutdown.signal(),
        ));
        health.set_problem("reconcilers", None);
        let ended = loop {
            tokio::select! {
                result = &mut task => break Some(result),
                changed = leading.changed() => {
                    if changed.is_err() || !*leading.borrow_and_update() {
                        break None;
                    }
                }
                changed = state.changed() => {
                    if changed.is_err() {
                        break None;
                    }
                    if state.borrow_and_update().domain().unwrap_or(crate::status::DEFAULT_DOMAIN) != domain {
                        tracing::info!("config-domain changed: restarting the reconcilers");
                        break None;
                    }
                }
                () = &mut stop => break None,
            }
        };
        match ended {
            None => {
                run_shutdown.trigger();
                let _ = task.await;
                failures = 0;
            }
            Some(result) => {
                // `run` returns only on shutdown; ending otherwise is a failure to retry.
                failures += 1;
                let why = match result {
                    Ok(()) => "stopped unexpectedly".to_string(),
                    Err(error) => format!("failed: {error}"),
                };
                let backoff = Duration::from_secs(1 << failures.min(5));
                tracing::error!(%why, "the reconcilers ended; restarting in {backoff:?}");
                health.set_problem("reconcilers", Some(format!("{why}; restarting")));
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut stop => return,
                }
            }
        }
        if shutdown.is_triggered() {
            return;
        }
    }
}

fn seconds(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)
}

/// Now, as the Lease's fields take it (microseconds; the wall clock is only written, never
/// compared).
fn now_micro() -> MicroTime {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    MicroTime(Timestamp::from_microsecond(micros).unwrap_or(Timestamp::UNIX_EPOCH))
}
