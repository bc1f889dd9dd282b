//! The eventing resources the broker runs: what `mecha up` loaded and `mecha apply` changed.

use std::collections::BTreeMap;

use crds::{Broker, Trigger};

/// `(namespace, name)`.
pub type Key = (String, String);

/// Every Broker and Trigger, published to the broker runtime as an immutable snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventingState {
    pub brokers: BTreeMap<Key, Broker>,
    pub triggers: BTreeMap<Key, Trigger>,
}

/// What applying one resource did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Configured,
    Unchanged,
}

// === impl EventingState ===

impl EventingState {
    pub fn apply_broker(&mut self, broker: Broker) -> Change {
        let key = (broker.namespace().to_string(), broker.metadata.name.clone());
        upsert(&mut self.brokers, key, broker)
    }

    pub fn apply_trigger(&mut self, trigger: Trigger) -> Change {
        let key = (
            trigger.namespace().to_string(),
            trigger.metadata.name.clone(),
        );
        upsert(&mut self.triggers, key, trigger)
    }

    pub fn broker(&self, namespace: &str, name: &str) -> Option<&Broker> {
        self.brokers.get(&(namespace.to_string(), name.to_string()))
    }

    /// The triggers of one broker.
    pub fn triggers_of<'a>(
        &'a self,
        namespace: &'a str,
        broker: &'a str,
    ) -> impl Iterator<Item = &'a Trigger> + 'a {
        self.triggers
            .values()
            .filter(move |t| t.namespace() == namespace && t.spec.broker == broker)
    }
}

fn upsert<T: PartialEq>(map: &mut BTreeMap<Key, T>, key: Key, value: T) -> Change {
    match map.get(&key) {
        None => {
            map.insert(key, value);
            Change::Created
        }
        Some(old) if *old == value => Change::Unchanged,
        Some(_) => {
            map.insert(key, value);
            Change::Configured
        }
    }
}
