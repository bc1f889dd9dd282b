//! Mecha's API: the Knative-compatible resource types users write, their defaults and
//! validation, and the YAML loader behind `mecha up` and `mecha apply`.
//!
//! Every error names where it comes from — file, document, resource and field path — in the
//! form `bad.yaml: document 2 (Service default/hello): spec.template.spec.containers[0].command:
//! required in local mode`. Fields Mecha does not support are rejected by name, never silently ignored.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod autoscaling;
pub mod bindings;
pub mod config;
pub mod error;
pub mod eventing;
pub mod load;
pub mod meta;
pub mod queues;
#[cfg(feature = "schema")]
pub mod schema;
pub mod selector;
pub mod serving;
pub mod sources;

pub use apiserver::ApiServerSource;
pub use bindings::{ContainerSource, SinkBinding};
pub use error::{FieldError, LoadError};
pub use eventing::{Broker, Trigger};
pub use load::{Loaded, Mode, Resource, Source, load_paths, load_str};
pub use meta::ObjectMeta;
pub use queues::{MqttSource, NatsSource, RedisStreamSource};
pub use serving::Service;
pub use sources::{GitHubSource, GitLabSource, PingSource, SourceResource};
