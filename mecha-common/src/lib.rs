//! What every Mecha component shares: the shutdown signal, telemetry (tracing, the Prometheus
//! registry and the `/live`, `/ready`, `/metrics` admin endpoints), the admin API's credential
//! and `Host` rule, and the routing and endpoint tables that the control plane publishes and
//! the data path reads.
//!
//! Nothing here knows about Kubernetes: the same types serve local mode and cluster mode.
#![deny(unsafe_code)] // one exception here: `memory::release` (glibc's `malloc_trim`)

pub mod activation;
pub mod admin;
pub mod auth;
pub mod budget;
pub mod duration;
pub mod load;
pub mod memory;
pub mod outlier;
pub mod probe;
pub mod routing;
pub mod serve;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod wire;

pub use activation::Activation;
pub use budget::{BodyBudget, BodyError, BudgetSettings, Buffered, Collecting};
pub use load::{LoadGuard, LoadSample, LoadTracker};
pub use routing::{
    BufferLimits, Endpoint, EndpointTable, RevisionEndpoints, Route, RouteTarget, RoutingTable,
};
pub use shutdown::{Shutdown, ShutdownSignal};
