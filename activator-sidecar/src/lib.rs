//! Mecha's data path. One library, three roles:
//!
//! - **gateway** ([`gateway`]): external traffic on one port, routed by `Host` to the ready
//!   replicas of the Service (or traffic tag) it names;
//! - **outbound** and **inbound** roles (the mesh client and Knative's queue-proxy) build on
//!   the same [`proxy`] forwarding.
//!
//! The stage order follows linkerd2-proxy: route → pick a target revision → wait (bounded)
//! for a ready endpoint → forward; one place ([`error::ProxyError`]) maps every failure to
//! its HTTP status.
#![deny(unsafe_code)]

pub mod body;
pub mod error;
pub mod gateway;
pub mod proxy;
pub mod server;

pub use error::ProxyError;
pub use gateway::Gateway;
