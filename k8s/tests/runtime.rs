//! The autoscaler's Kubernetes runtime (`k8s::{state, actuator, endpoints, leader, auth}`)
//! against the scripted API server of `tests/support`: each test is one scenario of
//! `support::runtime`, which `tests/rbac.rs` also runs to check the requests they make
//! against the roles in `deploy/`. Paused time where no real socket is involved: the KPA's
//! windows and the Lease's clock pass without waiting.

mod support;

use support::ApiServer;
use support::runtime;

#[tokio::test(start_paused = true)]
async fn a_poke_scales_a_zero_scaled_revision_through_the_scale_subresource() {
    runtime::scale_from_zero_on_a_poke(ApiServer::new()).await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_revision_goes_to_zero_after_the_grace_period_and_followers_never_write() {
    runtime::scale_to_zero_after_the_grace_period(ApiServer::new()).await;
}

#[tokio::test(start_paused = true)]
async fn ready_endpoints_of_the_revisions_slices_make_the_table() {
    runtime::endpoint_slices_feed_the_table(ApiServer::new()).await;
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_acquired_renewed_taken_over_and_released() {
    runtime::lease_acquire_renew_takeover(ApiServer::new()).await;
}

#[tokio::test(start_paused = true)]
async fn token_reviews_accept_refuse_and_cache() {
    runtime::token_reviews(ApiServer::new()).await;
}

#[tokio::test(start_paused = true)]
async fn a_restarted_autoscaler_goes_on_from_the_replicas_deployments_run() {
    runtime::a_new_leader_goes_on_from_the_running_replicas(ApiServer::new()).await;
}

#[tokio::test(start_paused = true)]
async fn the_reconcilers_run_while_leading_with_the_current_domain() {
    runtime::reconcilers_run_while_leading(ApiServer::new()).await;
}

#[tokio::test]
async fn a_follower_passes_reports_and_pokes_on_to_the_leader() {
    runtime::a_follower_passes_reports_to_the_leader(ApiServer::new()).await;
}
