//! Event sources ("importers"): events from schedules, webhooks, queues (Redis streams, NATS,
//! MQTT), programs of the user's (ContainerSource, SinkBinding) and Mecha's own resources
//! (ApiServerSource), sent as CloudEvents to a sink (a Broker, a Service or a URL) with
//! Knative's delivery rules; queue messages are acknowledged only after the sink took them.
//!
//! Every source follows vector's shape ([`SourceConfig`]): a config (the resource's type from
//! `crds`) with `validate(mode)` and `build(context)`, which returns the running source — a
//! task ([`ping`], the queue sources, [`bindings`], [`apiserver`]) or a webhook receiver
//! ([`webhook`]). The [`SourceContext`] carries the shutdown signal and the
//! [`Sink`]; tests build sources with [`ShutdownSignal::never`](mecha_common::ShutdownSignal)
//! and a [`MemorySink`]. [`Importers`] runs the sources of the current resources and follows
//! their changes; `mecha up` composes it with the gateway and the broker.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod bindings;
pub mod context;
pub mod metrics;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "nats")]
pub mod nats;
pub mod ping;
#[cfg(feature = "redis")]
pub mod redis;
pub mod runtime;
pub mod sink;
pub mod source;
#[cfg(feature = "standalone")]
pub mod standalone;
pub mod state;
pub mod webhook;

pub use bindings::Processes;
pub use context::SourceContext;
pub use metrics::SourceMetrics;
pub use runtime::{Importers, ImportersConfig, SourceStatus};
pub use sink::{HttpSink, MemorySink, Sink, SinkError};
pub use source::{Running, SourceConfig};
pub use state::SourcesState;
