//! The Knative Broker data plane: CloudEvents ingress ([`ingress`]), the durable event log
//! ([`log`]), Trigger filters ([`filter`]) and delivery with Knative's semantics
//! ([`delivery`]), run together by [`EventBroker`].
//!
//! Local mode (`mecha up`) runs it in-process: the gateway hands requests for a bare host
//! (`localhost:8080/{namespace}/{broker}`) to [`ingress::handle`], and Service subscribers are
//! reached back through the gateway, which wakes zero-scaled functions. On its own (feature
//! `standalone`, on by default; the `eventing-broker` binary) it serves the ingress on a port of
//! its own, reads Brokers and Triggers from the control plane, and several replicas share one
//! NATS JetStream log ([`standalone`]).
#![forbid(unsafe_code)]

pub mod delivery;
pub mod event;
pub mod filter;
pub mod ingress;
pub mod log;
pub mod metrics;
pub mod record;
pub mod runtime;
#[cfg(feature = "standalone")]
pub mod standalone;
pub mod state;
pub mod trace;

pub use event::{Event, EventError};
pub use log::{EventLog, LogError, RedbLog};
pub use runtime::{BrokerConfig, EventBroker, IngestError};
pub use state::{Change, EventingState};
