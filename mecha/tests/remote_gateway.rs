//! The gateway role in another process's place: routes and endpoints streamed from `mecha up`'s
//! admin API, activation pokes and held load sent back to it over HTTP.

mod support;

use mecha_common::Shutdown;
use mecha_common::auth::AdminToken;
use support::{FAST_CONFIG, Mecha, Workdir, echo_service, start_gateway, wait_until};

fn metric(mecha: &Mecha, line_start: &str) -> Option<f64> {
    support::http(mecha.admin, "localhost", "/metrics")
        .body
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

#[test]
fn a_gateway_fed_over_the_wire_routes_and_wakes_zero_scaled_services() {
    let dir = Workdir::new("remote-gateway");
    dir.write("config.yaml", FAST_CONFIG);
    let warm = echo_service("warm", &[("min-scale", "1")], "", "red");
    let cold = echo_service("cold", &[("initial-scale", "0")], "", "blue");
    dir.write("svc.yaml", &format!("{warm}---\n{cold}"));
    let mecha = Mecha::up(&[&dir.path]);
    mecha.wait_ready("warm", 1);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let shutdown = Shutdown::new();

    // Without the credential a sidecar learns nothing and wakes nothing.
    let poke = r#"[{"revision":"cold-00001","waiting":5}]"#;
    let refused = support::post(mecha.admin, "/api/v1/pokes", poke);
    assert_eq!(refused.status, 401, "{refused:?}");
    let (stranger, stranger_health, stranger_served) =
        start_gateway(&runtime, &mecha, None, true, &shutdown);
    wait_until("the tokenless gateway's watch to be refused", || {
        metric(
            &mecha,
            "mecha_admin_refused_requests_total{reason=\"credential\"}",
        )
        .is_some_and(|n| n >= 2.0)
    });
    assert!(!stranger_health.is_ready());
    assert_eq!(
        support::http(stranger, "warm.default.localhost", "/").status,
        404
    );
    assert_eq!(
        metric(
            &mecha,
            "mecha_autoscaler_activations_total{namespace=\"default\",revision=\"cold-00001\",service=\"cold\"}"
        ),
        None,
        "a refused poke woke the service"
    );

    let token = AdminToken::parse(&mecha.token()).expect("token");
    let (gateway, health, served) = start_gateway(&runtime, &mecha, Some(token), true, &shutdown);

    // Routes and endpoints arrive over the watch stream; the gateway is ready with them.
    wait_until("the remote gateway to route warm", || {
        support::http(gateway, "warm.default.localhost", "/").status == 200
    });
    assert!(health.is_ready());
    assert_eq!(
        support::http(gateway, "warm.default.localhost", "/")
            .echo()
            .0,
        "warm-00001"
    );
    assert_eq!(
        support::http(gateway, "nope.default.localhost", "/").status,
        404
    );

    // As a caller's HTTP proxy (the outbound role), requests name the service in absolute form.
    let mut stream = std::net::TcpStream::connect(gateway).expect("connect");
    std::io::Write::write_all(
        &mut stream,
        b"GET http://warm.default.localhost/ HTTP/1.1\r\nHost: warm.default.localhost\r\nConnection: close\r\n\r\n",
    )
    .expect("write");
    let mut raw = String::new();
    std::io::Read::read_to_string(&mut stream, &mut raw).expect("read");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("warm-00001"), "{raw}");

    // A zero-scaled service: the held request pokes mecha over HTTP and is answered.
    let response = support::http(gateway, "cold.default.localhost", "/");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.echo().0, "cold-00001");
    let metrics = support::http(mecha.admin, "localhost", "/metrics").body;
    assert!(
        metrics.contains("mecha_autoscaler_activations_total{namespace=\"default\",revision=\"cold-00001\",service=\"cold\"} 1"),
        "{metrics}"
    );

    // The tokenless one still has nothing.
    assert!(!stranger_health.is_ready());
    assert_eq!(
        support::http(stranger, "cold.default.localhost", "/").status,
        404
    );

    shutdown.trigger();
    runtime.block_on(served).expect("gateway stopped");
    runtime
        .block_on(stranger_served)
        .expect("tokenless gateway stopped");
}
