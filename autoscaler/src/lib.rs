//! Mecha's control plane.
//!
//! - [`serving`]: Service → Revision reconciliation and route resolution, as pure functions.
//! - [`supervisor`]: the local actuator — runs each revision's replicas as OS processes,
//!   probes their readiness and publishes the ready ones as endpoints.
//! - [`controller`]: the loop that joins the two: desired state and runtime status in, routes
//!   and replica counts out.
//! - [`kpa`]: Knative's KPA autoscaling algorithm as a pure state machine.
//!
//! The seams of DESIGN.md are the inputs and outputs of the controller: desired state arrives
//! as a `watch` of [`serving::ServingState`] snapshots (local mode: an in-memory store fed by
//! `mecha apply`), replicas are run by an [`supervisor::Supervisor`] and endpoints leave as a
//! `watch` of [`mecha_common::EndpointTable`] snapshots.
#![deny(unsafe_code)]

pub mod controller;
pub mod guard;
pub mod kpa;
pub mod logs;
pub mod probe;
pub mod serving;
pub mod supervisor;

pub use controller::{Controller, ScalingStatus, StatusBoard};
pub use serving::{Applied, RevisionSpec, ServingState};
pub use supervisor::{Supervisor, SupervisorConfig};
