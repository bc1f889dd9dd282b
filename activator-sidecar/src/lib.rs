//! Mecha's data path. One library, three roles:
//!
//! - **gateway** ([`gateway`]): external traffic on one port, routed by `Host` to the ready
//!   replicas of the Service (or traffic tag) it names;
//! - **inbound** ([`inbound`]): Knative's queue-proxy role in front of one container —
//!   `containerConcurrency`, readiness probing, load metrics; the `activator-sidecar` binary
//!   runs it on its own;
//! - **gateway in its own process** ([`discovery::serve_gateway`]): the same gateway, fed by
//!   the autoscaler's stream of routes and endpoints instead of in-process tables;
//! - **outbound** (the mesh client): the same, on loopback, as the caller's HTTP proxy.
//!
//! The stage order follows linkerd2-proxy: route → pick a target revision → wait (bounded)
//! for a ready endpoint → forward; one place ([`error::ProxyError`]) maps every failure to
//! its HTTP status.
#![deny(unsafe_code)]

pub mod answering;
pub mod body;
pub mod discovery;
pub mod error;
pub mod gateway;
pub mod h1;
pub mod inbound;
pub mod limits;
pub mod outlier;
pub mod proxy;
pub mod rules;
pub mod server;
pub mod settings;

pub use error::ProxyError;
pub use gateway::Gateway;
