//! The sources `mecha up` loaded and `mecha apply` changed.

use std::collections::BTreeMap;

use crds::SourceResource;

/// `(kind, namespace, name)`: kinds have names of their own, as in Kubernetes.
pub type Key = (String, String, String);

/// Every source, published to [`Importers`](crate::Importers) as an immutable snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourcesState {
    pub sources: BTreeMap<Key, SourceResource>,
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

    pub fn remove(&mut self, kind: &str, namespace: &str, name: &str) -> bool {
        self.sources
            .remove(&(kind.to_string(), namespace.to_string(), name.to_string()))
            .is_some()
    }
}
