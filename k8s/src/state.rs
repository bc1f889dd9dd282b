//! The desired state in a cluster: the [`ServingState`] the KPA controller reads, rebuilt from
//! watches of the `serving.knative.dev` Services and Revisions (the Revisions are the serving
//! reconciler's, so their names come from the cluster, not from local numbering) and of the
//! `config-autoscaler` and `config-domain` ConfigMaps in the autoscaler's namespace; and, for
//! the actuator, the replicas each revision's Deployment runs ([`Running`]).
//!
//! [`serving_state`] is the pure part (objects in, state out) and [`run`] keeps it current.
//! A revision name is unique within a namespace only, so the revisions of the state — and with
//! them every table the sidecars read — are keyed `{namespace}/{name}`
//! ([`mecha_common::routing::revision_key`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use autoscaler::{RevisionSpec, ServingState};
use crds::Source;
use crds::config::AutoscalerConfig;
use crds::serving::{RevisionTemplate, TemplateMeta};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector};
use kube::{Api, ResourceExt};
use mecha_common::ShutdownSignal;
use mecha_common::admin::Health;
use tokio::sync::watch;

use crate::actuator::{EverReady, Running};
use crate::crd::{Broker, Revision, Service, Trigger};
use crate::desired::{CONFIGURATION_GENERATION_LABEL, REVISION_LABEL, SERVICE_LABEL};

/// The ConfigMap of the autoscaler's defaults, in the autoscaler's namespace.
pub const AUTOSCALER_CONFIG: &str = crds::config::NAME;
/// The ConfigMap of the domain service hosts answer on (Knative's format).
pub const DOMAIN_CONFIG: &str = "config-domain";

/// The caches a replica needs before it may say it is ready, and whether their watches work.
#[derive(Debug, Clone, Default)]
pub struct Caches(Arc<Mutex<BTreeMap<&'static str, CacheState>>>);

/// One watched kind's entry in [`Caches`].
#[derive(Debug, Clone)]
pub struct CacheFlag {
    caches: Caches,
    name: &'static str,
}

#[derive(Debug, Clone, Default)]
struct CacheState {
    synced: bool,
    error: Option<String>,
}

/// What could not be taken from the cluster's objects, one line each (logged; the rest of the
/// state is used).
pub type Problems = Vec<String>;

// === impl Caches ===

impl Caches {
    /// A cache to wait for, named as `/ready` reports it.
    pub fn register(&self, name: &'static str) -> CacheFlag {
        self.lock().insert(name, CacheState::default());
        CacheFlag {
            caches: self.clone(),
            name,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, CacheState>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether every cache has had its first full list.
    pub fn synced(&self) -> bool {
        self.lock().values().all(|c| c.synced)
    }

    /// Adds `/ready`'s check: not ready until every cache is synced, nor while a watch fails.
    pub fn report_to(&self, health: &Health) {
        let caches = self.clone();
        health.add_check(move || {
            let caches = caches.lock();
            let waiting: Vec<&str> = caches
                .iter()
                .filter(|(_, c)| !c.synced)
                .map(|(name, _)| *name)
                .collect();
            let failing: Vec<String> = caches.values().filter_map(|c| c.error.clone()).collect();
            match (waiting.is_empty(), failing.is_empty()) {
                (true, true) => None,
                (false, _) => Some(format!("caches not synced yet: {}", waiting.join(", "))),
                (true, false) => Some(failing.join("; ")),
            }
        });
    }
}

// === impl CacheFlag ===

impl CacheFlag {
    pub fn set_synced(&self) {
        if let Some(state) = self.caches.lock().get_mut(self.name) {
            state.synced = true;
        }
    }

    pub fn is_synced(&self) -> bool {
        self.caches
            .lock()
            .get(self.name)
            .is_some_and(|state| state.synced)
    }

    pub fn set_error(&self, error: Option<String>) {
        if let Some(state) = self.caches.lock().get_mut(self.name) {
            state.error = error;
        }
    }
}

/// The desired state from the cluster's objects: every Service with the Revisions it owns
/// (label `serving.knative.dev/service`, same namespace), oldest first by their
/// configuration generation; `config-autoscaler` (`None`: Knative's defaults; a bad one keeps
/// the defaults and is reported); `domain` from `config-domain`.
pub fn serving_state(
    services: &[Arc<Service>],
    revisions: &[Arc<Revision>],
    autoscaler_config: Option<&ConfigMap>,
    domain: Option<&ConfigMap>,
) -> (ServingState, Problems) {
    let mut problems = Problems::new();
    let mut state = ServingState::default();
    if let Some(config) = autoscaler_config {
        let data = config.data.clone().unwrap_or_default();
        match AutoscalerConfig::from_data(&data) {
            Ok(config) => state.set_config(Some(config)),
            Err(errors) => {
                for error in errors {
                    problems.push(format!("{AUTOSCALER_CONFIG}: {error}"));
                }
            }
        }
    }
    let (domain, domain_problems) = domain_from(domain);
    problems.extend(domain_problems);
    state.set_domain(Some(domain));

    for service in services {
        let Some(name) = service.metadata.name.clone() else {
            continue;
        };
        let namespace = service.namespace().unwrap_or_else(|| "default".into());
        let local = crds::serving::Service {
            api_version: "serving.knative.dev/v1".into(),
            kind: "Service".into(),
            metadata: crds::meta::ObjectMeta {
                name: name.clone(),
                namespace: Some(namespace.clone()),
                labels: service.labels().clone(),
                annotations: service.annotations().clone(),
            },
            spec: service.spec.0.clone(),
        };
        let mut owned: Vec<(u32, &Revision)> = revisions
            .iter()
            .filter(|r| {
                r.namespace().as_deref() == Some(namespace.as_str())
                    && r.labels().get(SERVICE_LABEL) == Some(&name)
            })
            .filter(|r| r.metadata.name.as_deref().is_some_and(|n| !n.is_empty()))
            .map(|r| (generation(r), &**r))
            .collect();
        owned.sort_by(|(a, ra), (b, rb)| {
            a.cmp(b)
                .then_with(|| {
                    ra.metadata
                        .creation_timestamp
                        .cmp(&rb.metadata.creation_timestamp)
                })
                .then_with(|| ra.metadata.name.cmp(&rb.metadata.name))
        });
        let specs = owned
            .into_iter()
            .map(|(generation, revision)| Arc::new(revision_spec(&local, revision, generation)))
            .collect();
        let source = Source {
            file: PathBuf::from(format!(
                "serving.knative.dev/v1/namespaces/{namespace}/services/{name}"
            )),
            document: 1,
            dir: PathBuf::new(),
        };
        state.observe(local, source, specs);
    }
    (state, problems)
}

/// The revision as the controller runs it: `service` with the Revision's own template.
fn revision_spec(
    service: &crds::serving::Service,
    revision: &Revision,
    generation: u32,
) -> RevisionSpec {
    let mut labels = revision.labels().clone();
    for ours in [
        SERVICE_LABEL,
        CONFIGURATION_GENERATION_LABEL,
        crate::desired::CONFIGURATION_LABEL,
    ] {
        labels.remove(ours);
    }
    let mut with_template = service.clone();
    with_template.spec.template = RevisionTemplate {
        metadata: TemplateMeta {
            labels,
            annotations: revision.annotations().clone(),
        },
        spec: revision.spec.0.clone(),
    };
    RevisionSpec::named(
        mecha_common::routing::revision_key(
            &revision.namespace().unwrap_or_default(),
            &revision.name_any(),
        ),
        generation,
        &with_template,
        PathBuf::new(),
    )
}

/// The Revision's number within its Service (label `configurationGeneration`), 0 if absent.
fn generation(revision: &Revision) -> u32 {
    revision
        .labels()
        .get(CONFIGURATION_GENERATION_LABEL)
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}

/// Whether the reconciler has marked the revision `Ready`.
pub fn revision_ready(revision: &Revision) -> bool {
    revision.status.as_ref().is_some_and(|status| {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// The default domain of a `config-domain` ConfigMap in Knative's format: each key is a domain,
/// its value a label selector for the routes that use it, empty for the default. Only the
/// default is used (one domain for every route); domains with selectors are reported. Without
/// a default: [`crate::status::DEFAULT_DOMAIN`].
pub fn domain_from(config: Option<&ConfigMap>) -> (String, Problems) {
    /// A value of `config-domain`: `selector: {label: value}`, or empty for the default.
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        #[serde(default)]
        selector: BTreeMap<String, String>,
    }
    let mut problems = Problems::new();
    let data = config.and_then(|c| c.data.clone()).unwrap_or_default();
    let mut default = None;
    for (domain, value) in &data {
        if domain == "_example" {
            continue;
        }
        let entry: Entry = if value.trim().is_empty() {
            Entry::default()
        } else {
            match serde_saphyr::from_str(value) {
                Ok(entry) => entry,
                Err(error) => {
                    problems.push(format!(
                        "{DOMAIN_CONFIG}: data[{domain:?}] is not a label selector: {error}"
                    ));
                    continue;
                }
            }
        };
        if !entry.selector.is_empty() {
            problems.push(format!(
                "{DOMAIN_CONFIG}: domain {domain:?} has a selector; only the default domain (an empty value) is supported, so it is not used"
            ));
            continue;
        }
        if !valid_domain(domain) {
            problems.push(format!(
                "{DOMAIN_CONFIG}: data[{domain:?}] is not a DNS name"
            ));
            continue;
        }
        // Several defaults: the first in key order, so every replica picks the same.
        default.get_or_insert_with(|| domain.clone());
    }
    (
        default.unwrap_or_else(|| crate::status::DEFAULT_DOMAIN.into()),
        problems,
    )
}

fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Where Mecha is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installation {
    /// The autoscaler's namespace, with the `config-autoscaler` and `config-domain` ConfigMaps.
    pub namespace: String,
    /// The cluster's DNS domain (`cluster.local`): routes answer on cluster-local hosts too.
    pub cluster_domain: String,
}

/// Keeps `state_tx` current from the cluster until shutdown: Services and Revisions in every
/// namespace, the two ConfigMaps in the installation's namespace. Revisions the reconciler
/// marked `Ready` go into `ever_ready`, the replicas of revisions' Deployments into `running`.
/// Each watch is retried with backoff when it fails; until all four have listed once nothing
/// is published (and `/ready` says so), so the controller never meets a revision before its
/// Deployment.
pub async fn run(
    client: kube::Client,
    installation: Installation,
    state_tx: watch::Sender<Arc<ServingState>>,
    ever_ready: EverReady,
    running: Running,
    caches: Caches,
    shutdown: ShutdownSignal,
) {
    let services_flag = caches.register("services");
    let revisions_flag = caches.register("revisions");
    let configs_flag = caches.register("configmaps");
    let deployments_flag = caches.register("deployments");
    let (services, services_writer) = reflector::store::<Service>();
    let (revisions, revisions_writer) = reflector::store::<Revision>();
    let (configs, configs_writer) = reflector::store::<ConfigMap>();
    let (deployments, deployments_writer) = reflector::store::<Deployment>();
    let services_events = watcher::watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(services_writer)
    .map(|e| (0usize, e.map(|e| matches!(e, Event::InitDone))));
    let revisions_events = watcher::watcher(
        Api::<Revision>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(revisions_writer)
    .map(|e| (1usize, e.map(|e| matches!(e, Event::InitDone))));
    let configs_events = watcher::watcher(
        Api::<ConfigMap>::namespaced(client.clone(), &installation.namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(configs_writer)
    .map(|e| (2usize, e.map(|e| matches!(e, Event::InitDone))));
    let deployments_events = watcher::watcher(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default().labels(REVISION_LABEL),
    )
    .default_backoff()
    .reflect(deployments_writer)
    .map(|e| (3usize, e.map(|e| matches!(e, Event::InitDone))));
    let flags = [
        services_flag,
        revisions_flag,
        configs_flag,
        deployments_flag,
    ];
    let kinds = ["Services", "Revisions", "ConfigMaps", "Deployments"];
    // Bursts (the first lists) are taken together: one rebuild per burst.
    let events = futures_util::stream::select_all([
        services_events.boxed(),
        revisions_events.boxed(),
        configs_events.boxed(),
        deployments_events.boxed(),
    ])
    .ready_chunks(1024);
    tokio::pin!(events);
    let stop = shutdown.recv();
    tokio::pin!(stop);
    let mut last_problems = Problems::new();
    loop {
        let batch = tokio::select! {
            batch = events.next() => match batch {
                Some(batch) => batch,
                None => return,
            },
            () = &mut stop => return,
        };
        if !absorb(batch, &flags, &kinds) {
            continue;
        }
        running.set_all(
            deployments
                .state()
                .iter()
                .filter_map(|d| {
                    let revision = d.labels().get(REVISION_LABEL)?.clone();
                    // The API server defaults an unset `replicas` to 1.
                    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    Some((
                        (d.namespace()?, revision),
                        u32::try_from(replicas).unwrap_or(0),
                    ))
                })
                .collect(),
        );
        let configs = configs.state();
        let named = |name: &str| configs.iter().find(|c| c.name_any() == name).map(|c| &**c);
        let revisions = revisions.state();
        for revision in revisions.iter().filter(|r| revision_ready(r)) {
            ever_ready.mark(&mecha_common::routing::revision_key(
                &revision.namespace().unwrap_or_default(),
                &revision.name_any(),
            ));
        }
        let (mut next, problems) = serving_state(
            &services.state(),
            &revisions,
            named(AUTOSCALER_CONFIG),
            named(DOMAIN_CONFIG),
        );
        next.set_cluster_domain(Some(installation.cluster_domain.clone()));
        if problems != last_problems {
            for problem in &problems {
                tracing::warn!(%problem, "part of the cluster's desired state is not used");
            }
            last_problems = problems;
        }
        state_tx.send_if_modified(|current| {
            if **current == next {
                false
            } else {
                *current = Arc::new(next);
                true
            }
        });
    }
}

/// Takes one burst of watch events (`(which watch, Ok(list done) | Err)`) into the watches'
/// cache flags: errors are logged and shown until the watch recovers. Whether every watch has
/// listed once, so that a state built from the stores is whole.
pub(crate) fn absorb<E: std::fmt::Display>(
    batch: Vec<(usize, Result<bool, E>)>,
    flags: &[CacheFlag],
    kinds: &[&str],
) -> bool {
    for (which, event) in batch {
        match event {
            Ok(init_done) => {
                flags[which].set_error(None);
                if init_done {
                    flags[which].set_synced();
                }
            }
            Err(error) => {
                tracing::warn!(%error, "watching {} failed; keeping the last state and retrying", kinds[which]);
                flags[which].set_error(Some(format!("watching {}: {error}", kinds[which])));
            }
        }
    }
    flags.iter().all(CacheFlag::is_synced)
}

/// Brokers and Triggers as the broker replicas read them from the control plane
/// (`GET /api/v1/eventing/watch`): every Broker and Trigger the cluster has, as the `crds`
/// types, except those admission refuses (their `Ready` condition says why; the reconciler
/// writes it).
pub fn eventing_state(
    brokers: &[Arc<Broker>],
    triggers: &[Arc<Trigger>],
) -> crds::eventing::EventingState {
    let mut state = crds::eventing::EventingState::default();
    for broker in brokers {
        let local = crate::admission::local_broker(broker);
        if local.validate().is_empty() {
            state.apply_broker(local);
        }
    }
    for trigger in triggers {
        let local = crate::admission::local_trigger(trigger);
        if local.validate().is_empty() {
            state.apply_trigger(local);
        }
    }
    state
}

/// Keeps `eventing_tx` current from the Broker and Trigger CRDs in every namespace until
/// shutdown; nothing is published until both have listed once (until then the control
/// plane's eventing watch answers as not ready), and a failing watch is retried with
/// backoff, keeping the last state.
pub async fn run_eventing(
    client: kube::Client,
    eventing_tx: watch::Sender<Arc<crds::eventing::EventingState>>,
    caches: Caches,
    shutdown: ShutdownSignal,
) {
    let flags = [caches.register("brokers"), caches.register("triggers")];
    let kinds = ["Brokers", "Triggers"];
    let (brokers, brokers_writer) = reflector::store::<Broker>();
    let (triggers, triggers_writer) = reflector::store::<Trigger>();
    let brokers_events = watcher::watcher(
        Api::<Broker>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(brokers_writer)
    .map(|e| (0usize, e.map(|e| matches!(e, Event::InitDone))));
    let triggers_events = watcher::watcher(Api::<Trigger>::all(client), watcher::Config::default())
        .default_backoff()
        .reflect(triggers_writer)
        .map(|e| (1usize, e.map(|e| matches!(e, Event::InitDone))));
    let events =
        futures_util::stream::select_all([brokers_events.boxed(), triggers_events.boxed()])
            .ready_chunks(1024);
    tokio::pin!(events);
    let stop = shutdown.recv();
    tokio::pin!(stop);
    loop {
        let batch = tokio::select! {
            batch = events.next() => match batch {
                Some(batch) => batch,
                None => return,
            },
            () = &mut stop => return,
        };
        if !absorb(batch, &flags, &kinds) {
            continue;
        }
        let next = eventing_state(&brokers.state(), &triggers.state());
        // Each change is a line to every broker replica: only real changes are sent.
        eventing_tx.send_if_modified(|current| {
            if **current == next {
                false
            } else {
                *current = Arc::new(next);
                true
            }
        });
    }
}
