//! The sources `mecha up` loaded and `mecha apply` changed.

use std::collections::BTreeMap;

use crds::SourceResource;
use crds::sources::{PlacedSource, SinkAddress, SourcesSnapshot};

/// `(kind, namespace, name)`: kinds have names of their own, as in Kubernetes.
pub type Key = (String, String, String);

/// Every source, published to [`Importers`](crate::Importers) as an immutable snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourcesState {
    pub sources: BTreeMap<Key, SourceResource>,
    /// Sinks resolved by the control plane (the standalone importers read them with the
    /// sources), by key: `Err` says why one cannot be. Empty in `mecha up`, which resolves
    /// them itself.
    pub sinks: BTreeMap<Key, Result<SinkAddress, String>>,
}

// === impl SourcesState ===

impl SourcesState {
    pub fn key(source: &SourceResource) -> Key {
        (
            source.kind().to_string(),
            source.namespace().to_string(),
            source.name().to_string(),
        )
    }

    /// Adds or replaces a source; returns whether it was new, and whether it changed.
    pub fn apply(&mut self, source: SourceResource) -> (bool, bool) {
        let key = Self::key(&source);
        match self.sources.get(&key) {
            None => {
                self.sources.insert(key, source);
                (true, true)
            }
            Some(old) if *old == source => (false, false),
            Some(_) => {
                self.sources.insert(key, source);
                (false, true)
            }
        }
    }

    /// The sources of a control plane's snapshot that `keep` selects, with their sinks.
    pub fn from_snapshot(
        snapshot: SourcesSnapshot,
        mut keep: impl FnMut(&SourceResource) -> bool,
    ) -> Self {
        let mut state = Self::default();
        for placed in snapshot.sources {
            if !keep(&placed.resource) {
                continue;
            }
            let key = Self::key(&placed.resource);
            let sink = match (placed.sink, placed.problem) {
                (Some(sink), _) => Ok(sink),
                (None, problem) => Err(problem.unwrap_or_else(|| "no sink".into())),
            };
            state.sinks.insert(key.clone(), sink);
            state.sources.insert(key, placed.resource);
        }
        state
    }

    /// Every source with its sink as `resolve` finds it: what a control plane streams.
    pub fn snapshot(
        &self,
        resolve: impl Fn(&SourceResource) -> Result<SinkAddress, String>,
    ) -> SourcesSnapshot {
        SourcesSnapshot {
            sources: self
                .sources
                .values()
                .map(|resource| {
                    let (sink, problem) = match resolve(resource) {
                        Ok(sink) => (Some(sink), None),
                        Err(why) => (None, Some(why)),
                    };
                    PlacedSource {
                        resource: resource.clone(),
                        sink,
                        problem,
                    }
                })
                .collect(),
        }
    }

    pub fn remove(&mut self, kind: &str, namespace: &str, name: &str) -> bool {
        self.sources
            .remove(&(kind.to_string(), namespace.to_string(), name.to_string()))
            .is_some()
    }
}
