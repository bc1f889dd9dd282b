//! The event sources in a cluster against the scripted API server of `tests/support`: each
//! test is one scenario of `support::sources`, which `tests/rbac.rs` also runs.

mod support;

use support::ApiServer;
use support::sources;

#[tokio::test]
async fn every_source_kind_gets_its_status_and_a_refused_one_names_the_field() {
    sources::status(ApiServer::new()).await;
}

#[tokio::test]
async fn the_importers_snapshot_follows_the_source_crds_with_resolved_sinks() {
    sources::snapshot(ApiServer::new()).await;
}

#[tokio::test]
async fn a_container_source_runs_as_its_own_deployment_with_k_sink_and_goes_with_it() {
    sources::container_source(ApiServer::new()).await;
}

#[tokio::test]
async fn a_sink_binding_puts_k_sink_into_the_selected_services_revisions_and_takes_it_back() {
    sources::sink_binding(ApiServer::new()).await;
}

#[tokio::test]
async fn an_api_server_source_checks_its_accounts_access_and_runs_its_adapter_under_it() {
    sources::api_server_source(ApiServer::new()).await;
}
