//! The serving reconcilers (`k8s::reconcile::run`) against the scripted API server of
//! `tests/support`: each test is one scenario of `support::serving`, which `tests/rbac.rs`
//! also runs to check the requests they make against the ClusterRole.

mod support;

use support::ApiServer;
use support::serving;

#[tokio::test]
async fn a_service_makes_a_revision_a_deployment_and_a_headless_service_and_reports_ready() {
    serving::create(ApiServer::new()).await;
}

#[tokio::test]
async fn an_initial_scale_of_zero_creates_the_deployment_at_zero_and_keeps_it() {
    serving::initial_scale(ApiServer::new()).await;
}

#[tokio::test]
async fn a_users_own_service_of_the_name_is_left_alone_and_reported_not_owned() {
    serving::not_owned(ApiServer::new()).await;
}

#[tokio::test]
async fn a_template_change_makes_a_second_revision_and_traffic_follows_once_ready() {
    serving::template_change(ApiServer::new()).await;
}

#[tokio::test]
async fn a_tagged_fifty_fifty_split_shows_in_status() {
    serving::traffic_split(ApiServer::new()).await;
}

#[tokio::test]
async fn deleting_a_service_deletes_everything_it_made() {
    serving::delete_cascades(ApiServer::new()).await;
}

#[tokio::test]
async fn a_conflict_on_apply_is_reported_counted_and_retried() {
    serving::conflict_retried(ApiServer::new()).await;
}

#[tokio::test]
async fn a_crashing_container_makes_the_revision_unhealthy_with_its_exit_code() {
    serving::crash_loop(ApiServer::new()).await;
}

#[tokio::test]
async fn a_failing_watch_is_reported_and_retried() {
    serving::watch_fails(ApiServer::new()).await;
}

#[tokio::test]
async fn a_refused_service_is_ready_false_naming_the_field() {
    serving::invalid_service(ApiServer::new()).await;
}

#[tokio::test]
async fn brokers_and_triggers_get_their_status() {
    serving::eventing(ApiServer::new()).await;
}
