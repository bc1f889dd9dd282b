//! The Knative Broker data plane.
#![forbid(unsafe_code)]

pub mod delivery;
pub mod event;
pub mod filter;
pub mod log;
pub mod state;

pub use event::{Event, EventError};
pub use log::{EventLog, LogError};
pub use state::{Change, EventingState};
