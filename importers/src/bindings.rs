//! ContainerSource and SinkBinding: a program of the user's sends the events, told where by
//! `K_SINK` (the sink's URL) and `K_CE_OVERRIDES` (`{"extensions":{…}}`).
//!
//! A ContainerSource's container runs through the [`Processes`] seam (`mecha up`: the process
//! supervisor, restarted with backoff like a replica, never probed or routed to); the source
//! is not ready while its process is not running. A SinkBinding has no process of its own:
//! [`bound_env`] computes the variables of each Service it selects, and `mecha up` hands them
//! to the supervisor, which starts new replicas with them and replaces running ones.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crds::bindings::{K_CE_OVERRIDES, K_SINK, ce_overrides_json};
use crds::serving::Container;
use crds::{ContainerSource, SourceResource};
use tokio::task::JoinHandle;

use crate::context::SourceContext;
use crate::state::SourcesState;

/// How often a ContainerSource's readiness is read from its process.
const WATCH: Duration = Duration::from_millis(500);

/// Runs the programs of ContainerSources.
pub trait Processes: Send + Sync + fmt::Debug + 'static {
    /// Starts `container` for the source `namespace/name` with `env` added, kept running
    /// (restarted when it exits) until [`stop`](Self::stop).
    fn run(&self, namespace: &str, name: &str, container: &Container, env: Vec<(String, String)>);
    fn stop(&self, namespace: &str, name: &str);
    /// Why its process is not running, when it is not.
    fn problem(&self, namespace: &str, name: &str) -> Option<String>;
}

/// `K_SINK` and `K_CE_OVERRIDES` for a sink URL and `ceOverrides.extensions`.
pub fn sink_env(sink: &str, extensions: &BTreeMap<String, String>) -> Vec<(String, String)> {
    vec![
        (K_SINK.to_string(), sink.to_string()),
        (K_CE_OVERRIDES.to_string(), ce_overrides_json(extensions)),
    ]
}

/// Runs a ContainerSource's program until the context's shutdown (or the task is dropped).
pub fn run_container(
    source: &ContainerSource,
    cx: SourceContext,
    processes: Arc<dyn Processes>,
    sink: &str,
) -> Result<JoinHandle<()>, String> {
    let container = source
        .container()
        .ok_or("spec.template.spec.containers: exactly one container is required")?
        .clone();
    let env = sink_env(
        sink,
        &source
            .spec
            .ce_overrides
            .clone()
            .unwrap_or_default()
            .extensions,
    );
    processes.run(&cx.namespace, &cx.name, &container, env);
    // Stops the process however the task ends (shut down, or aborted when the source changes).
    let stop = StopOnDrop {
        processes: processes.clone(),
        namespace: cx.namespace.clone(),
        name: cx.name.clone(),
    };
    Ok(tokio::spawn(async move {
        let _stop = stop;
        loop {
            cx.set_problem(processes.problem(&cx.namespace, &cx.name));
            tokio::select! {
                () = tokio::time::sleep(WATCH) => {}
                () = cx.shutdown.clone().recv() => return,
            }
        }
    }))
}

/// The variables each Service gets from the SinkBindings that select it, by
/// `(namespace, name)`. `services` lists `(namespace, name, labels)`; `sink` resolves a
/// binding's sink to its URL (`None`: not bound, the binding shows why). When several bindings
/// select one Service the last by namespace and name wins.
pub fn bound_env<'a>(
    sources: &SourcesState,
    services: impl Iterator<Item = (&'a str, &'a str, &'a BTreeMap<String, String>)> + Clone,
    sink: impl Fn(&SourceResource) -> Option<String>,
) -> BTreeMap<(String, String), Vec<(String, String)>> {
    let mut bound = BTreeMap::new();
    for resource in sources.sources.values() {
        let SourceResource::Binding(binding) = resource else {
            continue;
        };
        let Some(url) = sink(resource) else {
            continue;
        };
        let env = sink_env(&url, &resource.extensions());
        for (namespace, name, labels) in services.clone() {
            if binding.selects(namespace, name, labels) {
                bound.insert((namespace.to_string(), name.to_string()), env.clone());
            }
        }
    }
    bound
}

struct StopOnDrop {
    processes: Arc<dyn Processes>,
    namespace: String,
    name: String,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.processes.stop(&self.namespace, &self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(yaml_subject: serde_json::Value) -> SourceResource {
        SourceResource::Binding(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "sources.knative.dev/v1",
                "kind": "SinkBinding",
                "metadata": {"name": "bind"},
                "spec": {
                    "subject": yaml_subject,
                    "sink": {"uri": "http://127.0.0.1:9/events"},
                    "ceOverrides": {"extensions": {"team": "blue"}}
                }
            }))
            .unwrap_or_else(|e| panic!("{e}")),
        )
    }

    #[test]
    fn bindings_select_services_by_name_or_labels_in_their_namespace() {
        let mut sources = SourcesState::default();
        sources.apply(binding(serde_json::json!({
            "apiVersion": "serving.knative.dev/v1", "kind": "Service",
            "selector": {"matchLabels": {"app": "emitter"}}
        })));
        let emitter = BTreeMap::from([("app".to_string(), "emitter".to_string())]);
        let none = BTreeMap::new();
        let services = [
            ("default", "a", &emitter),
            ("default", "b", &none),
            ("other", "c", &emitter),
        ];
        let bound = bound_env(&sources, services.iter().copied(), |r| {
            Some(r.sink().uri.clone().unwrap_or_default())
        });
        assert_eq!(bound.len(), 1, "{bound:?}");
        assert_eq!(
            bound[&("default".to_string(), "a".to_string())],
            [
                (
                    "K_SINK".to_string(),
                    "http://127.0.0.1:9/events".to_string()
                ),
                (
                    "K_CE_OVERRIDES".to_string(),
                    r#"{"extensions":{"team":"blue"}}"#.to_string()
                ),
            ]
        );
        // A sink that does not resolve binds nothing.
        assert!(bound_env(&sources, services.iter().copied(), |_| None).is_empty());
    }
}
