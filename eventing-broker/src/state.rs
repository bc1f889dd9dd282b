//! The eventing resources the broker runs: what `mecha up` loaded and `mecha apply` changed, or
//! what the control plane streams to a standalone broker. The type lives in `crds` so that the
//! control plane (the `autoscaler` crate) can serve it without depending on the broker.

pub use crds::eventing::{Change, EventingState, Key};
