//! The gateway role in another process's place: routes and endpoints streamed from `mecha up`'s
//! admin API, activation pokes and held load sent back to it over HTTP.

mod support;

use mecha_common::Shutdown;
use support::{FAST_CONFIG, Mecha, Workdir, echo_service, wait_until};

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
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let gateway = listener.local_addr().expect("addr");
    let signal = shutdown.signal();
    let admin = mecha.admin.to_string();
    let served = runtime.spawn(async move {
        let config = activator_sidecar::discovery::GatewayConfig::from_args_and_env(
            &[
                "--autoscaler-addr".to_string(),
                admin,
                "--pod-name".into(),
                "test-gateway".into(),
                "--drain-timeout".into(),
                "1s".into(),
            ],
            |_| None,
        )
        .expect("gateway settings");
        activator_sidecar::discovery::serve_gateway(
            listener,
            &config,
            &prometheus::Registry::new(),
            signal,
        )
        .await;
    });

    // Routes and endpoints arrive over the watch stream.
    wait_until("the remote gateway to route warm", || {
        support::http(gateway, "warm.default.localhost", "/").status == 200
    });
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
        metrics.contains("mecha_autoscaler_activations_total{revision=\"cold-00001\"} 1"),
        "{metrics}"
    );

    shutdown.trigger();
    runtime.block_on(served).expect("gateway stopped");
}
