//! The gateway over real sockets, with routing and endpoint tables fed by hand, served as
//! `mecha up` serves it (HTTP/1.1 fast path first).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use activator_sidecar::Gateway;
use mecha_common::activation::Poke;
use mecha_common::routing::{ServiceKey, UpstreamProtocol};
use mecha_common::{
    Activation, BufferLimits, Endpoint, EndpointTable, RevisionEndpoints, Route, RouteTarget,
    RoutingTable, Shutdown,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

const HOST: &str = "fn.default.localhost";

/// An upstream that answers every request on every connection with `body`.
async fn upstream(body: &'static str) -> SocketAddr {
    counting_upstream(body).await.0
}

async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

fn routes(timeout: Duration, container_concurrency: u32, buffer: BufferLimits) -> RoutingTable {
    let mut table = RoutingTable::default();
    table.insert(
        HOST.into(),
        Route {
            service: ServiceKey::new("default", "fn"),
            tag: None,
            targets: vec![RouteTarget {
                revision: "fn-00001".into(),
                percent: 100,
                timeout,
                protocol: UpstreamProtocol::Http1,
                container_concurrency,
                buffer,
            }],
        },
    );
    table
}

fn endpoints(list: Vec<Endpoint>) -> Arc<EndpointTable> {
    let mut table = EndpointTable::default();
    table.set("fn-00001".into(), RevisionEndpoints { ready: list });
    Arc::new(table)
}

struct Running {
    addr: SocketAddr,
    endpoints: watch::Sender<Arc<EndpointTable>>,
    activation: Activation,
    pokes: tokio::sync::mpsc::UnboundedReceiver<Poke>,
    _routes: watch::Sender<Arc<RoutingTable>>,
    _shutdown: Shutdown,
}

/// Serves a gateway on a free port for one revision with the given limits.
async fn gateway_with(
    timeout: Duration,
    container_concurrency: u32,
    buffer: BufferLimits,
    initial: Vec<Endpoint>,
) -> Running {
    let (routes_tx, routes_rx) =
        watch::channel(Arc::new(routes(timeout, container_concurrency, buffer)));
    let (endpoints_tx, endpoints_rx) = watch::channel(endpoints(initial));
    let (activation, pokes) = Activation::new();
    let gateway = Gateway::new(
        routes_rx,
        endpoints_rx,
        activation.clone(),
        "localhost",
        &prometheus::Registry::new(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = Shutdown::new();
    tokio::spawn(activator_sidecar::server::serve(
        listener,
        Arc::new(gateway),
        activator_sidecar::server::Workers::current(),
        shutdown.signal(),
        activator_sidecar::server::ServeOptions {
            fast_path: true,
            drain_timeout: Duration::from_secs(1),
            limits: activator_sidecar::limits::Limits::default(),
        },
    ));
    Running {
        addr,
        endpoints: endpoints_tx,
        activation,
        pokes,
        _routes: routes_tx,
        _shutdown: shutdown,
    }
}

/// A gateway without concurrency limits; returns its address and the endpoint table.
async fn gateway(
    timeout: Duration,
    initial: Vec<Endpoint>,
) -> (SocketAddr, watch::Sender<Arc<EndpointTable>>, Running) {
    let running = gateway_with(timeout, 0, BufferLimits::default(), initial).await;
    (running.addr, running.endpoints.clone(), running)
}

async fn get(addr: SocketAddr, host: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("read");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn a_restarted_replica_with_the_same_name_takes_the_retried_request() {
    // The replica died (its port is closed) but is still listed; its restart comes back under
    // the same name on a new port. The request must reach the restart, not wait it out.
    let dead = Endpoint::standalone("fn-00001-1", closed_port().await);
    let (addr, endpoints_tx, _shutdown) = gateway(Duration::from_secs(10), vec![dead]).await;
    let live = upstream("restarted").await;
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        endpoints_tx.send_replace(endpoints(vec![Endpoint::standalone("fn-00001-1", live)]));
    });
    let started = std::time::Instant::now();
    let (status, body) = get(addr, HOST).await;
    assert_eq!((status, body.as_str()), (200, "restarted"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn unknown_hosts_and_missing_replicas_get_clear_errors() {
    let (addr, _endpoints, _shutdown) = gateway(Duration::from_millis(300), vec![]).await;
    let (status, body) = get(addr, "other.default.localhost:8080").await;
    assert_eq!(status, 404);
    assert!(
        body.contains("no service answers on host \"other.default.localhost\""),
        "{body}"
    );
    let (status, body) = get(addr, HOST).await;
    assert_eq!(status, 504);
    assert!(
        body.contains("no ready replica of service default/fn (revision fn-00001) within 0.3s"),
        "{body}"
    );
}

#[tokio::test]
async fn a_request_waits_for_the_first_ready_replica() {
    let (addr, endpoints_tx, _shutdown) = gateway(Duration::from_secs(10), vec![]).await;
    let live = upstream("hello").await;
    let request = tokio::spawn(get(addr, HOST));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !request.is_finished(),
        "the request should wait for a replica"
    );
    endpoints_tx.send_replace(endpoints(vec![Endpoint::standalone("fn-00001-1", live)]));
    assert_eq!(request.await.expect("join"), (200, "hello".to_string()));
}

#[tokio::test]
async fn held_requests_poke_the_autoscaler_and_a_full_buffer_answers_503() {
    let limits = BufferLimits {
        requests: 2,
        bytes: 1 << 20,
    };
    let mut running = gateway_with(Duration::from_secs(10), 0, limits, vec![]).await;
    let first = tokio::spawn(get(running.addr, HOST));
    let second = tokio::spawn(get(running.addr, HOST));
    let poke = tokio::time::timeout(Duration::from_secs(5), running.pokes.recv())
        .await
        .expect("poke");
    assert_eq!(poke.expect("poke").revision, "fn-00001");
    // Wait until both are held, then the third finds the buffer full.
    while running.activation.waiting("fn-00001") < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut stream = tokio::net::TcpStream::connect(running.addr)
        .await
        .expect("connect");
    stream
        .write_all(
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("read");
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    assert!(raw.to_ascii_lowercase().contains("retry-after: 1"), "{raw}");
    assert!(raw.contains("buffer is full (2 requests)"), "{raw}");
    // A replica appears: both held requests are answered.
    let live = upstream("woken").await;
    running
        .endpoints
        .send_replace(endpoints(vec![Endpoint::standalone("fn-00001-1", live)]));
    assert_eq!(first.await.expect("join"), (200, "woken".to_string()));
    assert_eq!(second.await.expect("join"), (200, "woken".to_string()));
    assert_eq!(running.activation.waiting("fn-00001"), 0);
}

#[tokio::test]
async fn container_concurrency_one_queues_requests_until_the_replica_is_free() {
    // An upstream that answers after 100 ms: with containerConcurrency 1, three requests
    // through one replica take turns (about 300 ms), none fails, and a release wakes the next.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let concurrent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let max_seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (concurrent, max_seen) = (concurrent.clone(), max_seen.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (concurrent, max_seen) = (concurrent.clone(), max_seen.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let now = concurrent.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        max_seen.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        concurrent.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
    }
    let running = gateway_with(Duration::from_secs(10), 1, BufferLimits::default(), vec![]).await;
    let endpoint = Endpoint::new("fn-00001-1", addr, running.activation.released("fn-00001"));
    running.endpoints.send_replace(endpoints(vec![endpoint]));
    let started = std::time::Instant::now();
    let requests: Vec<_> = (0..3)
        .map(|_| tokio::spawn(get(running.addr, HOST)))
        .collect();
    for request in requests {
        assert_eq!(request.await.expect("join"), (200, "ok".to_string()));
    }
    assert_eq!(max_seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        started.elapsed() >= Duration::from_millis(290),
        "{:?}",
        started.elapsed()
    );
}

/// An upstream answering `body` on every request of every connection; counts the
/// connections it accepted.
async fn counting_upstream(
    body: &'static str,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(response.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn one_client_connection_reuses_a_connection_per_replica() {
    let (a, accepted_a) = counting_upstream("a").await;
    let (b, accepted_b) = counting_upstream("b").await;
    let running = gateway_with(
        Duration::from_secs(5),
        0,
        BufferLimits::default(),
        Vec::new(),
    )
    .await;
    let released = running.activation.released("fn-00001");
    let _ = running.endpoints.send(endpoints(vec![
        Endpoint::new("fn-00001-a", a, released.clone()),
        Endpoint::new("fn-00001-b", b, released),
    ]));
    let mut stream = tokio::net::TcpStream::connect(running.addr)
        .await
        .expect("connect");
    let mut answered = String::new();
    for _ in 0..40 {
        stream
            .write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
            .await
            .expect("send");
        let mut response = Vec::new();
        while !response.ends_with(b"\r\n\r\na") && !response.ends_with(b"\r\n\r\nb") {
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the gateway closed the connection");
            response.extend_from_slice(&chunk[..n]);
        }
        answered.push(char::from(*response.last().expect("a body")));
    }
    // Both replicas served (power of two choices spreads the requests) ...
    assert!(
        answered.contains('a') && answered.contains('b'),
        "{answered}"
    );
    // ... each over the one connection this client connection keeps to it.
    use std::sync::atomic::Ordering;
    assert_eq!(
        (
            accepted_a.load(Ordering::SeqCst),
            accepted_b.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
}
