//! Scale from zero and back, end to end: the real binary, real replica processes, and a short
//! `config-autoscaler` so windows pass in seconds.

mod support;

use std::collections::BTreeSet;

use support::{FAST_CONFIG, Mecha, Workdir, alive, echo_service, wait_until};

fn ready_and_desired(mecha: &Mecha, service: &str) -> (u64, u64) {
    let services = mecha.services_json();
    let service = services
        .as_array()
        .expect("a list of services")
        .iter()
        .find(|s| s["name"] == service)
        .expect("the service is listed");
    let count = |field: &str| service[field].as_u64().expect("a count");
    (count("ready"), count("desired"))
}

#[test]
fn a_zero_scaled_service_wakes_on_a_request_and_returns_to_zero() {
    let dir = Workdir::new("from-zero");
    dir.write("config.yaml", FAST_CONFIG);
    dir.write(
        "svc.yaml",
        &echo_service("sleeper", &[("initial-scale", "0")], "", "red"),
    );
    let mecha = Mecha::up(&[&dir.path]);
    // Nothing runs until the first request: the autoscaler has considered the revision and
    // wants no replica.
    wait_until("the autoscaler's first decision", || {
        support::http(mecha.admin, "localhost", "/metrics")
            .body
            .contains("mecha_autoscaler_desired_replicas{namespace=\"default\",revision=\"sleeper-00001\",service=\"sleeper\"} 0")
    });
    assert_eq!(ready_and_desired(&mecha, "sleeper"), (0, 0));
    let response = mecha.get("sleeper.default.localhost", "/");
    assert_eq!(response.status, 200, "{response:?}");
    let pid = response.echo().1;
    assert!(alive(pid));
    // Idle: after the 6 s stable window and the 1 s grace period it goes back to zero.
    wait_until("scale to zero", || {
        !alive(pid) && ready_and_desired(&mecha, "sleeper") == (0, 0)
    });
    // And wakes again.
    assert_eq!(mecha.get("sleeper.default.localhost", "/").status, 200);
    let metrics = support::http(mecha.admin, "localhost", "/metrics").body;
    assert!(
        metrics.contains("mecha_autoscaler_activations_total{namespace=\"default\",revision=\"sleeper-00001\",service=\"sleeper\"} 2"),
        "{metrics}"
    );
    // The gateway's series are labelled as the control plane's.
    assert!(
        metrics.contains("mecha_gateway_requests_total{code=\"200\",namespace=\"default\",revision=\"sleeper-00001\",service=\"sleeper\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mecha_gateway_request_duration_seconds_count{namespace=\"default\",revision=\"sleeper-00001\",service=\"sleeper\"} 2"),
        "{metrics}"
    );
}

#[test]
fn a_burst_against_zero_replicas_is_answered_and_scales_out_within_max_scale() {
    let dir = Workdir::new("burst");
    dir.write("config.yaml", FAST_CONFIG);
    dir.write(
        "svc.yaml",
        &echo_service(
            "burst",
            &[("initial-scale", "0"), ("max-scale", "4")],
            "      containerConcurrency: 1\n",
            "red",
        ),
    );
    let mecha = Mecha::up(&[&dir.path]);
    let gateway = mecha.gateway;
    let requests: Vec<_> = (0..200)
        .map(|_| {
            std::thread::spawn(move || {
                support::http(gateway, "burst.default.localhost", "/sleep?ms=20")
            })
        })
        .collect();
    let responses: Vec<_> = requests.into_iter().map(|r| r.join().unwrap()).collect();
    let failed: Vec<_> = responses.iter().filter(|r| r.status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of 200 failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    let pids: BTreeSet<u32> = responses.iter().map(|r| r.echo().1).collect();
    assert!(
        pids.len() > 1,
        "containerConcurrency 1 should scale out: {pids:?}"
    );
    assert!(pids.len() <= 4, "max-scale 4 caps replicas: {pids:?}");
}

#[test]
fn a_full_buffer_answers_503_with_retry_after() {
    let dir = Workdir::new("full");
    dir.write("config.yaml", FAST_CONFIG);
    // Never listens, so requests are held until the buffer of one is full.
    let yaml = echo_service(
        "stuck",
        &[("initial-scale", "0")],
        "      timeoutSeconds: 5\n",
        "red",
    )
    .replace(
        "    metadata:\n      annotations:\n",
        "    metadata:\n      annotations:\n        mecha.dev/max-buffered-requests: \"1\"\n",
    )
    .replace(
        "[python3, echo.py]",
        "[python3, -c, \"import time; time.sleep(600)\"]",
    );
    dir.write("svc.yaml", &yaml);
    let mecha = Mecha::up(&[&dir.path]);
    let gateway = mecha.gateway;
    let held = std::thread::spawn(move || support::http(gateway, "stuck.default.localhost", "/"));
    wait_until("the first request to be held", || {
        support::http(mecha.admin, "localhost", "/metrics")
            .body
            .contains("mecha_gateway_buffered_requests{namespace=\"default\",revision=\"stuck-00001\",service=\"stuck\"} 1")
    });
    let response = mecha.get("stuck.default.localhost", "/");
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(response.header("retry-after"), Some("1"));
    assert!(
        response.body.contains("buffer is full (1 requests)"),
        "{response:?}"
    );
    // The held one times out with a 504 that names the service.
    let held = held.join().unwrap();
    assert_eq!(held.status, 504, "{held:?}");
    assert!(held.body.contains("default/stuck"));
}

#[test]
fn min_scale_keeps_replicas_through_idle_windows() {
    let dir = Workdir::new("min-keep");
    dir.write("config.yaml", FAST_CONFIG);
    let pinned = echo_service("keeper", &[("min-scale", "1")], "", "red");
    let free = echo_service("drifter", &[], "", "red");
    dir.write("svc.yaml", &format!("{pinned}---\n{free}"));
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("keeper", 1);
    mecha.wait_ready("drifter", 1);
    let pid = mecha.get("keeper.default.localhost", "/").echo().1;
    // The unpinned service going to zero shows a stable window and the grace period have
    // passed without load.
    wait_until("the unpinned service to scale to zero", || {
        ready_and_desired(&mecha, "drifter") == (0, 0)
    });
    assert!(alive(pid));
    assert_eq!(ready_and_desired(&mecha, "keeper"), (1, 1));
}

#[test]
fn stats_posted_by_a_sidecar_drive_the_autoscaler() {
    let dir = Workdir::new("remote-stats");
    dir.write("config.yaml", FAST_CONFIG);
    dir.write(
        "svc.yaml",
        &echo_service("remote", &[("initial-scale", "0")], "", "red"),
    );
    let mecha = Mecha::up(&[&dir.path]);
    // No request ever reaches the gateway: only the reported load can scale the revision.
    let stat = r#"[{"revision":"remote-00001","replica":"pod-a","concurrency":140,"requests":10,"seconds":1}]"#;
    wait_until("the reported load to scale the revision to two", || {
        assert_eq!(mecha.admin_post("/api/v1/stats", stat).status, 202);
        ready_and_desired(&mecha, "remote").1 >= 2
    });
    let bad = r#"[{"revision":"remote-00001","replica":"pod-a","concurrency":1,"requests":1,"seconds":0}]"#;
    let response = mecha.admin_post("/api/v1/stats", bad);
    assert_eq!(response.status, 400);
    assert!(
        response
            .body
            .contains("stats[0].seconds: 0 must be a number > 0"),
        "{response:?}"
    );
}
