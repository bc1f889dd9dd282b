//! Service → Revision → Route, as pure functions over a [`ServingState`] snapshot.
//!
//! Each change of a Service's `spec.template` creates a Revision named `{service}-00001`,
//! `-00002`, …; `spec.traffic` splits requests between revisions, where `latestRevision: true`
//! means the newest revision that has become ready (so a new revision only takes traffic once
//! it can serve it, as in Knative).
//!
//! Local mode numbers revisions itself ([`ServingState::apply`]); in a cluster the serving
//! reconciler makes them as `Revision` objects, and the state is rebuilt from what the cluster
//! holds ([`ServingState::observe`], [`RevisionSpec::named`]), under the cluster's names.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crds::autoscaling::ScalingAnnotations;
use crds::config::AutoscalerConfig;
use crds::serving::{Container, PortProtocol, RevisionTemplate, Service, TrafficTarget};
use crds::{FieldError, Source};
use mecha_common::routing::{ServiceKey, UpstreamProtocol, service_host, tag_host};
use mecha_common::{BufferLimits, Route, RouteTarget, RoutingTable};

use crate::kpa::DeciderSpec;

/// A Revision: an immutable snapshot of a Service's template, as the runtime runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionSpec {
    /// Its key in the tables: the revision's name locally, `{namespace}/{name}` in a cluster
    /// ([`mecha_common::routing::revision_key`]).
    pub name: String,
    pub service: ServiceKey,
    pub generation: u32,
    pub template: RevisionTemplate,
    pub container: Container,
    /// Where the process starts: the YAML file's directory, joined with `workingDir`.
    pub workdir: PathBuf,
    pub container_concurrency: u32,
    pub timeout: Duration,
    pub scaling: ScalingAnnotations,
    pub protocol: PortProtocol,
    /// Bounds of the requests callers hold while the revision has no free replica.
    pub buffer: BufferLimits,
    /// `false` for a program that serves nothing (a ContainerSource's): not probed, ready
    /// while it runs.
    pub serves_requests: bool,
}

impl RevisionSpec {
    /// The labels of its series in `/metrics`: namespace, service, revision (its name, not
    /// its [key](mecha_common::routing::revision_key)).
    pub fn metric_labels(&self) -> [&str; 3] {
        [
            &self.service.namespace,
            &self.service.name,
            mecha_common::routing::revision_name(&self.name),
        ]
    }
}

/// One Service and the revisions it has made, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRecord {
    pub key: ServiceKey,
    pub service: Service,
    pub source: Source,
    pub revisions: Vec<Arc<RevisionSpec>>,
}

/// Everything the user has applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServingState {
    services: BTreeMap<ServiceKey, ServiceRecord>,
    config: Arc<AutoscalerConfig>,
    /// The domain of service hosts when the installation sets one (a cluster's
    /// `config-domain`); otherwise the controller's own (`localhost` in local mode).
    domain: Option<String>,
    /// In a cluster, the cluster's DNS domain (`cluster.local`): every Service and tag also
    /// answers on its cluster-local hosts, `{name}.{namespace}.svc.{cluster domain}` (Knative's
    /// `status.address`) and `{name}.{namespace}.svc`, which meshed callers and the cluster's
    /// own clients use.
    cluster_domain: Option<String>,
}

/// What applying a Service did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// A new Service, with its first revision.
    Created {
        revision: String,
    },
    /// The template changed: a new revision.
    NewRevision {
        revision: String,
    },
    /// Only traffic or metadata changed.
    Configured,
    Unchanged,
}

/// What the runtime should do: which host goes where, and which revisions should run (the
/// autoscaler decides how many replicas each gets). Revisions not listed should have none.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub routes: RoutingTable,
    pub active: BTreeMap<String, Arc<RevisionSpec>>,
}

// === impl ServingState ===

impl ServingState {
    pub fn services(&self) -> impl Iterator<Item = &ServiceRecord> {
        self.services.values()
    }

    pub fn get(&self, key: &ServiceKey) -> Option<&ServiceRecord> {
        self.services.get(key)
    }

    /// The `config-autoscaler` settings in force (Knative's defaults until one is applied).
    pub fn config(&self) -> &AutoscalerConfig {
        &self.config
    }

    /// The domain service hosts answer on, when the installation sets one.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// Applies a cluster's `config-domain`; `None` leaves the controller's own domain.
    pub fn set_domain(&mut self, domain: Option<String>) {
        self.domain = domain;
    }

    /// Makes every route answer on its cluster-local hosts too (see the field); `None` (local
    /// mode) serves the domain's hosts only.
    pub fn set_cluster_domain(&mut self, cluster_domain: Option<String>) {
        self.cluster_domain = cluster_domain;
    }

    /// Applies `config-autoscaler`; `None` (it was deleted) restores the defaults.
    pub fn set_config(&mut self, config: Option<AutoscalerConfig>) {
        self.config = Arc::new(config.unwrap_or_default());
    }

    /// The autoscaling settings of a revision under the current config.
    pub fn decider_spec(&self, revision: &RevisionSpec) -> DeciderSpec {
        DeciderSpec::resolve(
            &self.config,
            &revision.scaling,
            revision.container_concurrency,
        )
    }

    /// Applies a Service: creates a revision when its template changed, and checks that the
    /// revisions its traffic names exist. Nothing changes when it fails.
    pub fn apply(&mut self, service: Service, source: Source) -> Result<Applied, Vec<FieldError>> {
        if service.scaling().initial_scale == Some(0) && !self.config.allow_zero_initial_scale {
            return Err(vec![FieldError::new(
                format!(
                    "spec.template.metadata.annotations[\"{}initial-scale\"]",
                    crds::autoscaling::PREFIX
                ),
                "0 requires allow-zero-initial-scale: \"true\" in config-autoscaler",
            )]);
        }
        let key = ServiceKey::new(service.namespace(), &service.metadata.name);
        let existing = self.services.get(&key);
        let mut revisions = existing.map(|r| r.revisions.clone()).unwrap_or_default();
        let workdir = workdir(&service, &source);
        let template_changed = revisions.last().is_none_or(|latest| {
            latest.template != service.spec.template || latest.workdir != workdir
        });
        let mut created = None;
        if template_changed {
            let generation = revisions.last().map_or(1, |r| r.generation + 1);
            let revision = revision_spec(&key, generation, &service, workdir);
            created = Some(revision.name.clone());
            revisions.push(Arc::new(revision));
        }
        check_traffic_revisions(&key, &service.spec.traffic, &revisions)?;
        let outcome = match (existing, created) {
            (None, Some(revision)) => Applied::Created { revision },
            (Some(_), Some(revision)) => Applied::NewRevision { revision },
            (Some(old), None) if old.service == service => Applied::Unchanged,
            _ => Applied::Configured,
        };
        self.services.insert(
            key.clone(),
            ServiceRecord {
                key,
                service,
                source,
                revisions,
            },
        );
        Ok(outcome)
    }

    /// Puts a Service with revisions made elsewhere — in a cluster, the `Revision` objects the
    /// serving reconciler created — as they are, oldest first: nothing is numbered or checked
    /// here (the reconciler shows a bad traffic target in the Service's status; routing falls
    /// back to the latest ready revision for it).
    pub fn observe(&mut self, service: Service, source: Source, revisions: Vec<Arc<RevisionSpec>>) {
        let key = ServiceKey::new(service.namespace(), &service.metadata.name);
        self.services.insert(
            key.clone(),
            ServiceRecord {
                key,
                service,
                source,
                revisions,
            },
        );
    }

    /// Removes a Service and its revisions; `false` when there was none.
    pub fn delete(&mut self, key: &ServiceKey) -> bool {
        self.services.remove(key).is_some()
    }

    /// Routes and active revisions. `ever_ready` tells whether a revision has become ready at
    /// least once (Knative's Ready condition), which decides what `latestRevision` means.
    pub fn desired(&self, domain: &str, ever_ready: impl Fn(&str) -> bool) -> Desired {
        let mut desired = Desired::default();
        let mut domains = vec![domain.to_string()];
        if let Some(cluster) = &self.cluster_domain {
            domains.push(format!("svc.{cluster}"));
            domains.push("svc".into());
        }
        for record in self.services.values() {
            record.desired_into(&domains, &ever_ready, &mut desired);
        }

        desired
    }
}

// === impl ServiceRecord ===

impl ServiceRecord {
    pub fn latest(&self) -> Option<&Arc<RevisionSpec>> {
        self.revisions.last()
    }

    /// The newest revision that has been ready, which `latestRevision: true` routes to.
    pub fn latest_ready(&self, ever_ready: impl Fn(&str) -> bool) -> Option<&Arc<RevisionSpec>> {
        self.revisions.iter().rev().find(|r| ever_ready(&r.name))
    }

    fn revision(&self, name: &str) -> Option<&Arc<RevisionSpec>> {
        self.revisions.iter().find(|r| r.name == name)
    }

    /// Adds this Service's routes — on its hosts in each of `domains` — and active revisions.
    fn desired_into(
        &self,
        domains: &[String],
        ever_ready: &impl Fn(&str) -> bool,
        out: &mut Desired,
    ) {
        let Some(latest) = self.latest() else {
            return;
        };
        // Until some revision is ready, route to the newest one so requests wait for it.
        let routed_latest = self.latest_ready(ever_ready).unwrap_or(latest);
        let default_traffic = [TrafficTarget {
            latest_revision: Some(true),
            percent: Some(100),
            ..TrafficTarget::default()
        }];
        let traffic = if self.service.spec.traffic.is_empty() {
            &default_traffic[..]
        } else {
            &self.service.spec.traffic[..]
        };
        let mut main = Vec::<RouteTarget>::new();
        let mut active = vec![latest.clone()];
        for entry in traffic {
            let revision = match &entry.revision_name {
                Some(name) => self.revision(name).unwrap_or(routed_latest),
                None => routed_latest,
            };
            active.push(revision.clone());
            let percent = entry.percent.unwrap_or(0);
            match main.iter_mut().find(|t| t.revision == revision.name) {
                Some(existing) => existing.percent += percent,
                None => main.push(target(revision, percent)),
            }
            if let Some(tag) = &entry.tag {
                let route = Route {
                    service: self.key.clone(),
                    tag: Some(tag.clone()),
                    targets: vec![target(revision, 100)],
                };
                for domain in domains {
                    out.routes
                        .insert(tag_host(tag, &self.key, domain), route.clone());
                }
            }
        }
        let route = Route {
            service: self.key.clone(),
            tag: None,
            targets: main,
        };
        for domain in domains {
            out.routes
                .insert(service_host(&self.key, domain), route.clone());
        }
        for revision in active {
            out.active.entry(revision.name.clone()).or_insert(revision);
        }
    }
}

fn target(revision: &RevisionSpec, percent: u32) -> RouteTarget {
    RouteTarget {
        revision: revision.name.clone(),
        percent,
        timeout: revision.timeout,
        protocol: match revision.protocol {
            PortProtocol::Http1 => UpstreamProtocol::Http1,
            PortProtocol::H2c => UpstreamProtocol::H2c,
        },
        container_concurrency: revision.container_concurrency,
        buffer: revision.buffer,
    }
}

fn workdir(service: &Service, source: &Source) -> PathBuf {
    match service.container().and_then(|c| c.working_dir.as_deref()) {
        Some(dir) => source.dir.join(dir),
        None => source.dir.clone(),
    }
}

fn revision_spec(
    key: &ServiceKey,
    generation: u32,
    service: &Service,
    workdir: PathBuf,
) -> RevisionSpec {
    RevisionSpec::named(
        format!("{}-{generation:05}", key.name),
        generation,
        service,
        workdir,
    )
}

// === impl RevisionSpec ===

impl RevisionSpec {
    /// The revision `name` of `service`, made from the service's current template (in a
    /// cluster: a Service whose template is the `Revision` object's).
    pub fn named(name: String, generation: u32, service: &Service, workdir: PathBuf) -> Self {
        let key = ServiceKey::new(service.namespace(), &service.metadata.name);
        let template = service.spec.template.clone();
        let container = service.container().cloned().unwrap_or_default();
        Self {
            name,
            service: key,
            generation,
            container_concurrency: template.spec.container_concurrency.unwrap_or(0),
            timeout: Duration::from_secs(service.timeout_seconds()),
            scaling: service.scaling(),
            buffer: {
                let defaults = BufferLimits::default();
                let (requests, bytes) = service.buffer_annotations();
                BufferLimits {
                    requests: requests.unwrap_or(defaults.requests),
                    bytes: bytes.unwrap_or(defaults.bytes),
                }
            },
            protocol: container.protocol(),
            container,
            workdir,
            template,
            serves_requests: true,
        }
    }
}

/// The process of a ContainerSource `namespace/name`, run by the supervisor like a replica
/// (restarted with backoff, stopped with SIGTERM then SIGKILL) but never probed or routed to:
/// revision `{name}-source-{namespace}` of a Service key of the source's name.
pub fn source_process(
    namespace: &str,
    name: &str,
    mut container: Container,
    env: Vec<(String, String)>,
) -> RevisionSpec {
    container.env.extend(
        env.into_iter()
            .map(|(name, value)| crds::serving::EnvVar { name, value }),
    );
    let workdir = container
        .working_dir
        .as_deref()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    RevisionSpec {
        name: format!("{name}-source-{namespace}"),
        service: ServiceKey::new(namespace, name),
        generation: 1,
        template: RevisionTemplate {
            metadata: crds::serving::TemplateMeta::default(),
            spec: crds::serving::RevisionSpec {
                containers: vec![container.clone()],
                container_concurrency: None,
                timeout_seconds: None,
            },
        },
        protocol: container.protocol(),
        container,
        workdir,
        container_concurrency: 0,
        timeout: Duration::from_secs(300),
        scaling: ScalingAnnotations::default(),
        buffer: BufferLimits::default(),
        serves_requests: false,
    }
}

fn check_traffic_revisions(
    key: &ServiceKey,
    traffic: &[TrafficTarget],
    revisions: &[Arc<RevisionSpec>],
) -> Result<(), Vec<FieldError>> {
    let errors: Vec<_> = traffic
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let name = t.revision_name.as_ref()?;
            if revisions.iter().any(|r| &r.name == name) {
                return None;
            }
            let known: Vec<_> = revisions.iter().map(|r| r.name.as_str()).collect();
            Some(FieldError::new(
                format!("spec.traffic[{i}].revisionName"),
                format!(
                    "revision {name:?} does not exist; {key} has {}",
                    known.join(", ")
                ),
            ))
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{Mode, Resource, load_str};
    use std::path::Path;

    fn service(yaml: &str) -> (Service, Source) {
        let (mut loaded, errors) = load_str(Path::new("t/svc.yaml"), yaml, Mode::Local);
        assert!(errors.is_empty(), "{errors:?}");
        let loaded = loaded.remove(0);
        let Resource::Service(service) = loaded.resource else {
            panic!("not a service")
        };
        (service, loaded.source)
    }

    fn hello(env: &str, extra: &str) -> String {
        format!(
            "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: hello\nspec:\n  template:\n    spec:\n      containers:\n        - command: [python3, app.py]\n          env: [{{name: COLOR, value: {env}}}]\n{extra}"
        )
    }

    fn apply(state: &mut ServingState, yaml: &str) -> Result<Applied, Vec<FieldError>> {
        let (s, src) = service(yaml);
        state.apply(s, src)
    }

    #[test]
    fn template_changes_make_revisions() {
        let mut state = ServingState::default();
        assert_eq!(
            apply(&mut state, &hello("blue", "")),
            Ok(Applied::Created {
                revision: "hello-00001".into()
            })
        );
        assert_eq!(
            apply(&mut state, &hello("blue", "")),
            Ok(Applied::Unchanged)
        );
        assert_eq!(
            apply(&mut state, &hello("green", "")),
            Ok(Applied::NewRevision {
                revision: "hello-00002".into()
            })
        );
        let traffic = "  traffic:\n    - revisionName: hello-00001\n      percent: 100\n";
        assert_eq!(
            apply(&mut state, &hello("green", traffic)),
            Ok(Applied::Configured)
        );
        let record = state
            .get(&ServiceKey::new("default", "hello"))
            .expect("service");
        assert_eq!(record.revisions.len(), 2);
        assert!(record.revisions[0].workdir.ends_with("t"));
    }

    #[test]
    fn traffic_naming_a_missing_revision_is_refused_and_changes_nothing() {
        let mut state = ServingState::default();
        apply(&mut state, &hello("blue", "")).expect("first");
        let traffic = "  traffic:\n    - revisionName: hello-00009\n      percent: 100\n";
        let errors = apply(&mut state, &hello("green", traffic)).expect_err("missing revision");
        assert_eq!(errors[0].path, "spec.traffic[0].revisionName");
        assert!(
            errors[0].message.contains("hello-00001, hello-00002"),
            "{errors:?}"
        );
        let record = state
            .get(&ServiceKey::new("default", "hello"))
            .expect("service");
        assert_eq!(
            record.revisions.len(),
            1,
            "a refused apply must not add a revision"
        );
    }

    #[test]
    fn latest_revision_routes_to_the_newest_ready_one() {
        let mut state = ServingState::default();
        apply(&mut state, &hello("blue", "")).expect("v1");
        apply(&mut state, &hello("green", "")).expect("v2");
        let host = "hello.default.localhost";
        // Only v1 has been ready: traffic stays there, v2 gets replicas to become ready.
        let desired = state.desired("localhost", |r| r == "hello-00001");
        let route = desired.routes.lookup(host).expect("route");
        assert_eq!(route.targets[0].revision, "hello-00001");
        assert_eq!(desired.active.len(), 2);
        // Once v2 is ready, it takes all traffic and v1 is no longer run.
        let desired = state.desired("localhost", |_| true);
        let route = desired.routes.lookup(host).expect("route");
        assert_eq!(route.targets[0].revision, "hello-00002");
        assert_eq!(
            desired.active.keys().collect::<Vec<_>>(),
            vec!["hello-00002"]
        );
        // Nothing ready yet: route to the newest so requests wait for it.
        let desired = state.desired("localhost", |_| false);
        assert_eq!(
            desired.routes.lookup(host).expect("route").targets[0].revision,
            "hello-00002"
        );
    }

    #[test]
    fn splits_and_tags_make_routes() {
        let mut state = ServingState::default();
        apply(&mut state, &hello("blue", "")).expect("v1");
        let traffic = "  traffic:\n    - revisionName: hello-00001\n      percent: 50\n      tag: blue\n    - latestRevision: true\n      percent: 50\n      tag: green\n";
        apply(&mut state, &hello("green", traffic)).expect("v2");
        let desired = state.desired("localhost", |_| true);
        let main = desired
            .routes
            .lookup("hello.default.localhost")
            .expect("main");
        let split: Vec<_> = main
            .targets
            .iter()
            .map(|t| (t.revision.as_str(), t.percent))
            .collect();
        assert_eq!(split, vec![("hello-00001", 50), ("hello-00002", 50)]);
        let blue = desired
            .routes
            .lookup("blue-hello.default.localhost")
            .expect("blue tag");
        assert_eq!(blue.targets[0].revision, "hello-00001");
        assert_eq!(blue.tag.as_deref(), Some("blue"));
        let green = desired
            .routes
            .lookup("green-hello.default.localhost")
            .expect("green tag");
        assert_eq!(green.targets[0].revision, "hello-00002");
        assert_eq!(desired.active.len(), 2);
    }

    #[test]
    fn a_cluster_serves_cluster_local_hosts_too() {
        let mut state = ServingState::default();
        let traffic =
            "  traffic:\n    - latestRevision: true\n      percent: 100\n      tag: blue\n";
        apply(&mut state, &hello("blue", traffic)).expect("v1");
        let local = state.desired("localhost", |_| true);
        assert_eq!(local.routes.len(), 2, "local mode: the domain's hosts only");
        state.set_cluster_domain(Some("cluster.local".into()));
        let desired = state.desired("example.com", |_| true);
        let main = desired
            .routes
            .lookup("hello.default.example.com")
            .expect("main");
        for host in ["hello.default.svc.cluster.local", "hello.default.svc"] {
            assert_eq!(desired.routes.lookup(host), Some(main), "{host}");
        }
        for host in [
            "blue-hello.default.example.com",
            "blue-hello.default.svc.cluster.local",
            "blue-hello.default.svc",
        ] {
            let tagged = desired.routes.lookup(host).expect(host);
            assert_eq!(tagged.tag.as_deref(), Some("blue"), "{host}");
        }
        assert_eq!(desired.routes.len(), 6);
    }

    #[test]
    fn min_scale_sets_replicas() {
        let mut state = ServingState::default();
        let yaml = hello("blue", "").replace(
            "  template:\n",
            "  template:\n    metadata:\n      annotations:\n        autoscaling.knative.dev/min-scale: \"2\"\n",
        );
        apply(&mut state, &yaml).expect("apply");
        let desired = state.desired("localhost", |_| true);
        let spec = state.decider_spec(&desired.active["hello-00001"]);
        assert_eq!(spec.bound(spec.initial_scale), 2);
    }

    #[test]
    fn zero_initial_scale_needs_the_config_to_allow_it() {
        let mut state = ServingState::default();
        let yaml = hello("blue", "").replace(
            "  template:\n",
            "  template:\n    metadata:\n      annotations:\n        autoscaling.knative.dev/initial-scale: \"0\"\n",
        );
        let errors = apply(&mut state, &yaml).expect_err("refused by default");
        assert!(
            errors[0].message.contains("allow-zero-initial-scale"),
            "{errors:?}"
        );
        state.set_config(Some(AutoscalerConfig {
            allow_zero_initial_scale: true,
            ..AutoscalerConfig::default()
        }));
        apply(&mut state, &yaml).expect("allowed");
        let desired = state.desired("localhost", |_| true);
        assert_eq!(
            state
                .decider_spec(&desired.active["hello-00001"])
                .initial_scale,
            0
        );
    }

    #[test]
    fn delete_removes_routes() {
        let mut state = ServingState::default();
        apply(&mut state, &hello("blue", "")).expect("v1");
        assert!(state.delete(&ServiceKey::new("default", "hello")));
        assert!(!state.delete(&ServiceKey::new("default", "hello")));
        assert!(state.desired("localhost", |_| true).routes.is_empty());
    }
}
