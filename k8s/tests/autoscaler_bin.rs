//! The `autoscaler` binary as a process, against the scripted API server served over HTTP on
//! 127.0.0.1 (found through a kubeconfig, as `Client::try_default` finds any cluster): it
//! becomes ready once its caches are synced and it leads, holds the Lease, refuses the
//! control-plane API without a token the API server vouches for, streams the tables with
//! one, and on SIGTERM drains, releases the Lease and exits 0.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use support::ApiServer;
use support::process::{Process, free_port, get, kubeconfig, serve_http};
use support::runtime::{SIDECAR_TOKEN, SYSTEM, script_token_reviews};

/// One request to the binary; reads until the control-plane API's tables have arrived.
async fn http(port: u16, request: &str, read_for: Duration) -> (u16, String) {
    support::process::http(port, request, read_for, Some("\"endpoints\"")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_leads_serves_the_api_behind_token_review_and_drains_on_sigterm() {
    let server = ApiServer::new();
    script_token_reviews(&server);
    let addr = serve_http(server.clone()).await;
    let dir = std::env::temp_dir().join(format!("mecha-autoscaler-bin-{}", std::process::id()));
    let kubeconfig = kubeconfig(&dir, addr, SYSTEM);
    let (api_port, admin_port) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_autoscaler"))
        .env_clear()
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", "autoscaler-0")
        .env("POD_NAMESPACE", SYSTEM)
        .env("AUTOSCALER_PORT", api_port.to_string())
        .env("AUTOSCALER_ADMIN_PORT", admin_port.to_string())
        .env("LEASE_RETRY_PERIOD", "200ms")
        .env("MECHA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the autoscaler binary starts");
    let mut process = Process(child);

    // Ready: caches synced, leading, reconcilers running.
    let ready = tokio::time::timeout(support::WAIT, async {
        loop {
            let (status, _) = http(admin_port, &get("/ready", None), Duration::from_secs(1)).await;
            if status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(ready.is_ok(), "the autoscaler never became ready");
    assert_eq!(
        http(admin_port, &get("/live", None), Duration::from_secs(1))
            .await
            .0,
        200
    );
    server
        .wait_for("the Lease held by autoscaler-0", |s| {
            let holder = s
                .get::<Lease>(SYSTEM, "mecha-autoscaler")
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity);
            (holder.as_deref() == Some("autoscaler-0")).then_some(())
        })
        .await;

    // The control-plane API: 401 without a token, the tables with one.
    let (status, text) = http(
        api_port,
        &get("/api/v1/watch", None),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status, 401, "{text}");
    let (status, text) = http(
        api_port,
        &get(
            "/api/v1/watch",
            Some("forged-0123456789abcdef0123456789abcdef"),
        ),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(status, 401, "{text}");
    let (status, text) = http(
        api_port,
        &get("/api/v1/watch", Some(SIDECAR_TOKEN)),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("\"routes\"") && text.contains("\"endpoints\""),
        "{text}"
    );
    let (_, metrics) = http(admin_port, &get("/metrics", None), Duration::from_secs(2)).await;
    assert!(
        metrics.contains("mecha_autoscaler_token_reviews_total{result=\"accepted\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("mecha_admin_refused_requests_total{reason=\"credential\"} 2"));

    // SIGTERM: drains, releases the Lease, exits 0.
    let exited = process.terminate().await;
    assert!(exited.success(), "{exited:?}");
    let holder = server
        .get::<Lease>(SYSTEM, "mecha-autoscaler")
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity);
    assert_eq!(holder, None, "the Lease is released");
    let _ = std::fs::remove_dir_all(&dir);
}
