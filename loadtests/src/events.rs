//! Posting CloudEvents and receiving them, for the broker benchmarks: closed-loop posting
//! clients, and a subscriber that records POST-to-arrival latency.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub type PostClient = Client<HttpConnector, Full<Bytes>>;

/// Reserves `n` event ids no other call in this process hands out: a log that deduplicates
/// (JetStream's `Nats-Msg-Id`) must see fresh events, not repeats it stores once.
pub fn fresh_ids(n: u64) -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(n, Ordering::Relaxed)
}

/// The clock events carry in their `sentns` extension.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// A subscriber that answers 202 (or 503 while `down`) and records POST-to-arrival latency
/// from the `ce-sentns` extension.
#[derive(Debug, Clone, Default)]
pub struct Receiver {
    pub down: Arc<AtomicBool>,
    pub received: Arc<AtomicU64>,
    pub latencies: Arc<Mutex<Vec<Duration>>>,
}

impl Receiver {
    pub async fn start(&self) -> Result<SocketAddr, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Answers go out at once, as a subscriber's should (no Nagle wait on them).
                let _ = stream.set_nodelay(true);
                let me = me.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let me = me.clone();
                        async move { Ok::<_, Infallible>(me.handle(request).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(addr)
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let sent = request
            .headers()
            .get("ce-sentns")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let _ = request.into_body().collect().await;
        let status = if self.down.load(Ordering::Relaxed) {
            503
        } else {
            202
        };
        if status == 202 {
            self.received.fetch_add(1, Ordering::Relaxed);
            if let Some(sent) = sent {
                let now = epoch().elapsed();
                self.latencies
                    .lock()
                    .expect("lock")
                    .push(now.saturating_sub(Duration::from_nanos(sent)));
            }
        }
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
        response
    }
}

pub fn post_client() -> PostClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector)
}

pub async fn post(client: &PostClient, uri: &str, id: u64) -> Result<u16, String> {
    let request = Request::post(uri)
        .header("host", "localhost")
        .header("ce-specversion", "1.0")
        .header("ce-id", id.to_string())
        .header("ce-source", "/bench")
        .header("ce-type", "bench.event")
        .header("ce-sentns", epoch().elapsed().as_nanos().to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"n\":1}")))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    Ok(status)
}

/// `clients` closed loops posting for `seconds`; returns events/s answered with `want`.
pub async fn closed_loop(
    uri: String,
    clients: usize,
    seconds: u64,
    want: u16,
) -> Result<f64, String> {
    let client = post_client();
    let ok = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, uri, ok) = (client.clone(), uri.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let id = fresh_ids(1);
                if post(&client, &uri, id).await == Ok(want) {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())?;
    }
    Ok(ok.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}
