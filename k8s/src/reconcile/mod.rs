//! The reconcilers of Kubernetes mode: Knative's resources in, Deployments and Services out,
//! Knative's status written back. [`run`] is the one entry point.
//!
//! # The contract of [`run`]
//!
//! - **Who calls it.** The `autoscaler` binary, only while it holds the leader `Lease`
//!   (`mecha-autoscaler`): two reconcilers applying the same objects would not corrupt them
//!   (server-side apply is idempotent), but only the leader decides. When leadership is lost,
//!   trigger the `shutdown` given to `run`; a new leader calls `run` again.
//! - **What it does.** Four `kube::runtime::Controller`s in every namespace:
//!   - `Service` (owns `Revision`s): checks the spec ([`crate::admission`]), makes a new
//!     immutable `Revision` (`{service}-00001`, …) for every `spec.template` change
//!     ([`crate::desired::next_revision`]), and writes the Service's status
//!     ([`crate::status::service`]);
//!   - `Revision` (owns `Deployment`s and `Service`s, watches its pods): applies the
//!     revision's Deployment and headless Service ([`crate::desired`]) and writes its status
//!     from the observed Deployment and, while none is ready, its pods
//!     ([`crate::status::revision`]);
//!   - `Broker` and `Trigger` (when [`ServingSettings::eventing`]): their status from their
//!     validators;
//!   - every event source kind (when [`ServingSettings::sources`]): its status from its
//!     validators and its resolved sink ([`crate::sources::status`]).
//!
//!   Every write is a server-side apply by field manager `mecha` ([`crate::apply`]); every
//!   object made carries its owner's controller reference, so deleting a Service deletes its
//!   Revisions and their Deployments and Services (the API server's garbage collector does it).
//!   A Deployment's `replicas` is never written here: the autoscaler sets it through the
//!   `scale` subresource.
//! - **Errors.** A failed step (an API call) fails the reconcile: the object's `Ready`
//!   condition says what failed and where (reason `ReconcileFailed`), the failure counts in
//!   `mecha_reconcile_failures_total{kind,error}`, and the object is reconciled again after a
//!   backoff that doubles from [`Retry::first`] to [`Retry::max`] and resets on success. A
//!   watch that fails is retried by the controller with its own backoff, counted in
//!   `mecha_reconcile_watch_errors_total{kind}`, and reported by [`Metrics::watch_problem`]
//!   (for the binary's `/ready`) until it has not failed for [`WATCH_PROBLEM_WINDOW`].
//! - **Returns** once `shutdown` fires and the reconciles in flight have finished. It never
//!   returns early on errors: every failure is retried.
//!
//! Verified only against the scripted API server of `k8s/tests/support` (no Kubernetes API
//! server runs on the development machines).

mod eventing;
mod serving;
mod sources;

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use kube::Client;
use kube::runtime::controller::{self, Action};
use mecha_common::ShutdownSignal;
use prometheus::{IntCounterVec, Opts, Registry};

use crate::apply::ApiError;
use crate::desired::PodSettings;
use crate::status::Addresses;

/// What the reconcilers need from the installation.
#[derive(Debug, Clone, PartialEq)]
pub struct ServingSettings {
    /// What every revision's pod gets (the sidecar image, the autoscaler's address, …).
    pub pods: PodSettings,
    /// The domain of Service URLs (`config-domain`) and the broker ingress's base URL.
    pub addresses: Addresses,
    /// How soon a failed reconcile is tried again.
    pub retry: Retry,
    /// How often an object is reconciled even when nothing changed (catches drift that no
    /// watch event reports).
    pub resync: Duration,
    /// Whether to reconcile Brokers and Triggers too.
    pub eventing: bool,
    /// The event sources' status, with their sinks resolved as these settings say (`None`:
    /// sources are not reconciled).
    pub sources: Option<crate::sources::SinkSettings>,
}

/// A doubling backoff: `first`, `2 × first`, … up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub first: Duration,
    pub max: Duration,
}

/// The reconcilers' counters, registered once by the binary.
#[derive(Debug, Clone)]
pub struct Metrics {
    reconciliations: IntCounterVec,
    failures: IntCounterVec,
    watch_errors: IntCounterVec,
    /// The last watch error of each kind, and when it happened.
    last_watch_error: Arc<Mutex<HashMap<&'static str, (tokio::time::Instant, String)>>>,
}

/// How long after its last failure a watch counts as failing ([`Metrics::watch_problem`]):
/// longer than the controller's longest backoff between tries, so a watch that keeps failing
/// never looks healthy in between.
pub const WATCH_PROBLEM_WINDOW: Duration = Duration::from_secs(120);

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{kind} {namespace}/{name}: {message}")]
    Invalid {
        kind: &'static str,
        namespace: String,
        name: String,
        message: String,
    },
    /// An object of the name Mecha would make exists and is not Mecha's (Knative's
    /// `NotOwned`): it is left alone.
    #[error(
        "there is an existing {kind} {namespace}/{name} that this resource does not own; delete or rename it"
    )]
    NotOwned {
        kind: String,
        namespace: String,
        name: String,
    },
}

// === impl ServingSettings ===

impl ServingSettings {
    /// The defaults: Knative's `example.com`, the broker in `mecha-system`, retries from 1 s
    /// to 5 min, a resync every 10 min, eventing on.
    pub fn new(pods: PodSettings) -> Self {
        Self {
            pods,
            addresses: Addresses::default(),
            retry: Retry {
                first: Duration::from_secs(1),
                max: Duration::from_secs(300),
            },
            resync: Duration::from_secs(600),
            eventing: true,
            sources: Some(crate::sources::SinkSettings::default()),
        }
    }
}

// === impl Retry ===

impl Retry {
    /// The delay after the `attempt`th failure in a row (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.max)
    }
}

// === impl Metrics ===

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "mecha_reconciliations_total",
                "Reconciles run, by kind of object",
            ),
            &["kind"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "mecha_reconcile_failures_total",
                "Reconciles that failed (and were retried with backoff), by kind and error",
            ),
            &["kind", "error"],
        )?;
        let watch_errors = IntCounterVec::new(
            Opts::new(
                "mecha_reconcile_watch_errors_total",
                "Watches of the API server that failed (and were retried), by kind",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(reconciliations.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(watch_errors.clone()))?;
        Ok(Self {
            reconciliations,
            failures,
            watch_errors,
            last_watch_error: Arc::default(),
        })
    }

    /// The watches that failed within [`WATCH_PROBLEM_WINDOW`], with their last error, or
    /// `None` while every watch works: a readiness check for the binary
    /// (`health.add_check(move || metrics.watch_problem())`), since a reconciler that cannot
    /// watch (CRDs missing, RBAC refused) changes nothing and would otherwise only log.
    pub fn watch_problem(&self) -> Option<String> {
        let errors = self
            .last_watch_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut failing: Vec<String> = errors
            .iter()
            .filter(|(_, (at, _))| at.elapsed() < WATCH_PROBLEM_WINDOW)
            .map(|(kind, (_, error))| format!("watching {kind}s fails: {error}"))
            .collect();
        failing.sort();
        (!failing.is_empty()).then(|| failing.join("; "))
    }

    fn watch_failed(&self, kind: &'static str, error: &str) {
        self.watch_errors.with_label_values(&[kind]).inc();
        self.last_watch_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(kind, (tokio::time::Instant::now(), error.to_string()));
    }

    /// Failed reconciles of `kind` with error label `error` so far.
    pub fn failures(&self, kind: &str, error: &str) -> u64 {
        self.failures.with_label_values(&[kind, error]).get()
    }

    /// Reconciles of `kind` so far.
    pub fn reconciliations(&self, kind: &str) -> u64 {
        self.reconciliations.with_label_values(&[kind]).get()
    }
}

// === impl Error ===

impl Error {
    /// The `error` label of `mecha_reconcile_failures_total`.
    pub fn metric_label(&self) -> String {
        match self {
            Self::Api(e) => e.metric_label(),
            Self::Invalid { .. } => "invalid".into(),
            Self::NotOwned { .. } => "not_owned".into(),
        }
    }

    /// The reason of the `Ready` condition it puts on the resource.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotOwned { .. } => NOT_OWNED,
            _ => RECONCILE_FAILED,
        }
    }
}

/// Runs the reconcilers until `shutdown` fires; see the module documentation for the
/// contract.
pub async fn run(
    client: Client,
    settings: ServingSettings,
    metrics: Metrics,
    shutdown: ShutdownSignal,
) {
    let eventing = settings.eventing;
    let sources = settings.sources.clone();
    let context = Arc::new(Context {
        client,
        settings,
        metrics,
        failures: Mutex::default(),
    });
    let mut controllers = vec![
        serving::services(context.clone(), shutdown.clone()).boxed(),
        serving::revisions(context.clone(), shutdown.clone()).boxed(),
    ];
    if eventing {
        controllers.push(eventing::brokers(context.clone(), shutdown.clone()).boxed());
        controllers.push(eventing::triggers(context.clone(), shutdown.clone()).boxed());
    }
    if let Some(sinks) = sources {
        use crate::crd::{
            ApiServerSource, ContainerSource, GitHubSource, GitLabSource, MqttSource, NatsSource,
            PingSource, RedisStreamSource, SinkBinding,
        };
        let (c, s) = (&context, &shutdown);
        controllers.extend([
            sources::run::<PingSource>("PingSource", c.clone(), sinks.clone(), s.clone()).boxed(),
            sources::run::<GitHubSource>("GitHubSource", c.clone(), sinks.clone(), s.clone())
                .boxed(),
            sources::run::<GitLabSource>("GitLabSource", c.clone(), sinks.clone(), s.clone())
                .boxed(),
            sources::run::<RedisStreamSource>(
                "RedisStreamSource",
                c.clone(),
                sinks.clone(),
                s.clone(),
            )
            .boxed(),
            sources::run::<NatsSource>("NatsSource", c.clone(), sinks.clone(), s.clone()).boxed(),
            sources::run::<MqttSource>("MqttSource", c.clone(), sinks.clone(), s.clone()).boxed(),
            sources::run::<ContainerSource>("ContainerSource", c.clone(), sinks.clone(), s.clone())
                .boxed(),
            sources::run::<SinkBinding>("SinkBinding", c.clone(), sinks.clone(), s.clone()).boxed(),
            sources::run::<ApiServerSource>("ApiServerSource", c.clone(), sinks, s.clone()).boxed(),
        ]);
    }
    futures_util::future::join_all(controllers).await;
    tracing::info!("reconcilers stopped");
}

/// What every reconcile gets.
struct Context {
    client: Client,
    settings: ServingSettings,
    metrics: Metrics,
    /// Failures in a row per object (kind, namespace, name), for the backoff.
    failures: Mutex<HashMap<(&'static str, String, String), u32>>,
}

// === impl Context ===

impl Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    fn key<K: kube::ResourceExt>(kind: &'static str, object: &K) -> (&'static str, String, String) {
        (
            kind,
            object.namespace().unwrap_or_default(),
            object.name_any(),
        )
    }

    fn succeeded<K: kube::ResourceExt>(&self, kind: &'static str, object: &K) {
        self.metrics
            .reconciliations
            .with_label_values(&[kind])
            .inc();
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(&Self::key(kind, object));
        }
    }

    /// Counts a failure and says when to try again.
    fn failed<K: kube::ResourceExt>(
        &self,
        kind: &'static str,
        object: &K,
        error: &Error,
    ) -> Action {
        self.metrics
            .reconciliations
            .with_label_values(&[kind])
            .inc();
        self.metrics
            .failures
            .with_label_values(&[kind, &error.metric_label()])
            .inc();
        let attempt = match self.failures.lock() {
            Ok(mut failures) => {
                let n = failures.entry(Self::key(kind, object)).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        let delay = self.settings.retry.delay(attempt);
        tracing::warn!(
            kind,
            namespace = object.namespace().unwrap_or_default(),
            name = object.name_any(),
            attempt,
            retry_in = ?delay,
            %error,
            "reconcile failed"
        );
        Action::requeue(delay)
    }
}

/// The condition reason of a reconcile step that failed.
pub const RECONCILE_FAILED: &str = "ReconcileFailed";
/// The condition reason when a name Mecha would use is taken by an object it does not own.
pub const NOT_OWNED: &str = "NotOwned";

/// Drains a controller's result stream: reconcile failures are counted where they happen
/// ([`Context::failed`]); watch failures are logged and counted here.
async fn drain<K, S>(kind: &'static str, context: Arc<Context>, stream: S)
where
    K: kube::Resource + Debug,
    K::DynamicType: Debug + Clone + Eq + Hash,
    S: futures_util::Stream<
            Item = Result<
                (kube::runtime::reflector::ObjectRef<K>, Action),
                controller::Error<Error, kube::runtime::watcher::Error>,
            >,
        >,
{
    stream
        .for_each(|result| {
            match result {
                Ok(_) | Err(controller::Error::ReconcilerFailed(..)) => {}
                Err(controller::Error::QueueError(error)) => {
                    context.metrics.watch_failed(kind, &error.to_string());
                    tracing::error!(kind, %error, "watching the API server failed; retrying with backoff");
                }
                Err(error) => tracing::debug!(kind, %error, "controller"),
            }
            futures_util::future::ready(())
        })
        .await;
}

/// The RFC 3339 time recorded on conditions that change now.
fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}
