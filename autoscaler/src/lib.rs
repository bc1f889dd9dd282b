//! Mecha's control plane.
//!
//! - [`serving`]: Service → Revision reconciliation and route resolution, as pure functions.
//! - [`supervisor`]: the local actuator — runs each revision's replicas as OS processes,
//!   probes their readiness and publishes the ready ones as endpoints.
//! - [`controller`]: the loop that joins the two: desired state and runtime status in, routes
//!   and replica counts out.
//! - [`actuator`]: the workload-runtime seam the controller drives ([`Actuator`]); the
//!   supervisor is its local implementation.
//! - [`api`]: the control plane's HTTP API (watch down; stats and pokes up) as a router of its
//!   own, which `mecha up` mounts behind its credential.
//! - [`kpa`]: Knative's KPA autoscaling algorithm as a pure state machine.
//!
//! The seams of DESIGN.md are the inputs and outputs of the controller: desired state arrives
//! as a `watch` of [`serving::ServingState`] snapshots (local mode: an in-memory store fed by
//! `mecha apply`), replicas are run by an [`Actuator`] (local mode: the
//! [`supervisor::Supervisor`]) and endpoints leave as a `watch` of
//! [`mecha_common::EndpointTable`] snapshots.
#![deny(unsafe_code)]

pub mod actuator;
pub mod api;
pub mod controller;
pub mod guard;
pub mod kpa;
pub mod logs;
pub mod probe;
pub mod serving;
pub mod supervisor;

pub use actuator::{ActuationError, Actuator};
pub use controller::{Controller, ScalingStatus, StatusBoard};
pub use serving::{Applied, RevisionSpec, ServingState};
pub use supervisor::{Supervisor, SupervisorConfig};
