//! Delivering one event to one destination with Knative's `DeliverySpec` semantics: attempts,
//! backoff, which statuses are retried, `Retry-After`, and what a reply must look like.
//!
//! The retry loop is generic over [`Send`], so its timing is tested under paused time with an
//! in-memory subscriber, and the same code runs against real sockets through [`HttpSender`].

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use crds::eventing::{Delivery, Destination, Format};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::event::{Event, STRUCTURED};

/// Most encoded characters of `knativeerrordata`, as Knative truncates it.
const MAX_ERROR_DATA: usize = 1024;

/// Where an event is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The address users know (`knativeerrordest`, logs).
    pub url: String,
    /// Where the request actually goes.
    pub uri: Uri,
    /// A `Host` header to send instead of the URI's (Services are reached through the gateway
    /// by host name).
    pub host: Option<String>,
}

/// A subscriber's answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Sends one attempt. Errors are transport failures (no response).
pub trait Send: Clone + std::marker::Send + Sync + 'static {
    fn send(
        &self,
        target: &Target,
        event: &Event,
        format: Format,
        timeout: Duration,
    ) -> impl Future<Output = Result<Reply, String>> + std::marker::Send;
}

/// What became of a delivery after all its attempts.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A 2xx answer, with the CloudEvent it carried, if any.
    Delivered { reply: Option<Event>, attempts: u32 },
    /// Every attempt failed, or one failed in a way that is not retried.
    Failed {
        /// The last status; 500 when there was no response at all.
        code: u16,
        body: Bytes,
        attempts: u32,
    },
}

/// What a 2xx answer's body means to the sender.
#[derive(Debug)]
pub enum Replies<F> {
    /// A trigger's subscriber may answer with an event: it must be a valid CloudEvent and is
    /// handed to the function (which stores it); a body that is not one fails the attempt.
    Accept(F),
    /// A source's sink: any 2xx is delivered, whatever its body (Knative's sources read no
    /// replies).
    Ignore,
}

/// Sends `event` to `target`, retrying as `delivery` says. `accept_reply` is called with the
/// reply event of a 2xx answer; if it fails (the reply could not be stored) the attempt counts
/// as failed and is retried.
pub async fn deliver<S, F, Fut>(
    sender: &S,
    target: &Target,
    event: &Event,
    delivery: &Delivery,
    default_timeout: Duration,
    accept_reply: F,
) -> Outcome
where
    S: Send,
    F: FnMut(Event) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    deliver_with(
        sender,
        target,
        event,
        delivery,
        default_timeout,
        Replies::Accept(accept_reply),
    )
    .await
}

/// [`deliver`] with a choice of what replies mean: the one retry loop every sender uses.
pub async fn deliver_with<S, F, Fut>(
    sender: &S,
    target: &Target,
    event: &Event,
    delivery: &Delivery,
    default_timeout: Duration,
    mut replies: Replies<F>,
) -> Outcome
where
    S: Send,
    F: FnMut(Event) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let timeout = delivery.timeout.unwrap_or(default_timeout);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (code, body, retry_after) =
            match sender.send(target, event, delivery.format, timeout).await {
                Ok(reply) if (200..300).contains(&reply.status) => {
                    let Replies::Accept(accept_reply) = &mut replies else {
                        return Outcome::Delivered {
                            reply: None,
                            attempts: attempt,
                        };
                    };
                    match reply_event(&reply) {
                        Ok(None) => {
                            return Outcome::Delivered {
                                reply: None,
                                attempts: attempt,
                            };
                        }
                        Ok(Some(answer)) => match accept_reply(answer.clone()).await {
                            Ok(()) => {
                                return Outcome::Delivered {
                                    reply: Some(answer),
                                    attempts: attempt,
                                };
                            }
                            Err(why) => (500, Bytes::from(why), None),
                        },
                        // A reply that is not a CloudEvent is a failed delivery, as in Knative.
                        Err(why) => (502, Bytes::from(why), None),
                    }
                }
                Ok(reply) => {
                    let retry_after = retry_after(&reply.headers);
                    (reply.status, reply.body, retry_after)
                }
                Err(error) => (500, Bytes::from(error), None),
            };
        let retryable = matches!(code, 404 | 408 | 409 | 429) || code >= 500;
        if !retryable || attempt > delivery.retry {
            return Outcome::Failed {
                code,
                body,
                attempts: attempt,
            };
        }
        let mut wait = delivery.backoff(attempt);
        if let (Some(max), Some(after), 429 | 503) = (delivery.retry_after_max, retry_after, code) {
            wait = wait.max(after.min(max));
        }
        tracing::debug!(target = %target.url, id = %event.id(), trace_id = %event.trace_id().unwrap_or_default(), code, attempt, ?wait, "delivery failed; retrying");
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The URL users post events for broker `namespace/name` to.
pub fn broker_address(ingress: SocketAddr, namespace: &str, name: &str) -> String {
    format!("http://localhost:{}/{namespace}/{name}", ingress.port())
}

/// Where a destination's events go, for anything that sends to one (trigger subscribers and
/// dead-letter sinks, source sinks): a Broker `ref` is its ingress path on the gateway port; a
/// Service `ref` is the gateway with the Service's host name, so a zero-scaled Service is woken
/// like any request; a lone `uri` is used as it is. `ingress` is the gateway's address (an
/// unspecified IP means loopback); `domain` the Services' host suffix.
pub fn resolve(
    destination: &Destination,
    namespace: &str,
    ingress: SocketAddr,
    domain: &str,
) -> Result<Target, String> {
    let mut connect = ingress;
    if connect.ip().is_unspecified() {
        connect.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let path = destination.uri.as_deref().unwrap_or("/");
    let (url, uri, host) = match &destination.r#ref {
        Some(reference) if reference.kind == crds::eventing::BROKER_KIND => {
            let ns = reference.namespace.as_deref().unwrap_or(namespace);
            let address = broker_address(ingress, ns, &reference.name);
            let uri = format!("http://{connect}/{ns}/{}", reference.name);
            (address, uri, None)
        }
        Some(reference) => {
            let ns = reference.namespace.as_deref().unwrap_or(namespace);
            let host = format!("{}.{ns}.{domain}:{}", reference.name, connect.port());
            let path = if path.starts_with('/') { path } else { "/" };
            (
                format!("http://{host}{path}"),
                format!("http://{connect}{path}"),
                Some(host),
            )
        }
        None => (path.to_string(), path.to_string(), None),
    };
    let uri = uri.parse().map_err(|e| format!("{url}: {e}"))?;
    Ok(Target { url, uri, host })
}

/// The event to send to a dead-letter sink for a failed delivery.
pub fn dead_letter(event: &Event, target: &Target, code: u16, body: &[u8]) -> Event {
    let mut failed = event.clone();
    failed.set("knativeerrordest", target.url.clone());
    failed.set("knativeerrorcode", code.to_string());
    if !body.is_empty() {
        let mut encoded = BASE64.encode(body);
        encoded.truncate(MAX_ERROR_DATA);
        failed.set("knativeerrordata", encoded);
    }
    failed
}

/// A 2xx answer's event: none when the body is empty and no `ce-` headers came back.
fn reply_event(reply: &Reply) -> Result<Option<Event>, String> {
    let has_ce = reply.headers.keys().any(|k| k.as_str().starts_with("ce-"));
    if reply.body.is_empty() && !has_ce {
        return Ok(None);
    }
    let mut events = Event::from_http(&reply.headers, &reply.body)
        .map_err(|e| format!("the reply is not a CloudEvent: {e}"))?;
    if events.len() != 1 {
        return Err("the reply is a batch; a reply carries one event".into());
    }
    let event = events.remove(0);
    event
        .validate()
        .map_err(|e| format!("the reply is not a valid CloudEvent: {e}"))?;
    Ok(Some(event))
}

/// `Retry-After` in seconds (HTTP dates are not honoured).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Delivery over HTTP/1.1 with pooled keep-alive connections.
#[derive(Clone, Debug)]
pub struct HttpSender {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpSender {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build(connector);
        Self { client }
    }
}

impl Default for HttpSender {
    fn default() -> Self {
        Self::new()
    }
}

impl Send for HttpSender {
    async fn send(
        &self,
        target: &Target,
        event: &Event,
        format: Format,
        timeout: Duration,
    ) -> Result<Reply, String> {
        let (mut headers, body) = match format {
            Format::Binary => event.to_binary(),
            Format::Json => {
                let mut headers = HeaderMap::new();
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(STRUCTURED));
                (headers, Bytes::from(event.to_json_bytes()))
            }
        };
        headers.insert("prefer", HeaderValue::from_static("reply"));
        // The event's trace context as W3C headers, so the receiver joins the trace.
        event.trace_headers(&mut headers);
        if let Some(host) = &target.host
            && let Ok(value) = HeaderValue::from_str(host)
        {
            headers.insert(header::HOST, value);
        }
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(target.uri.clone())
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        *request.headers_mut() = headers;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{e}: {}", source_chain(&e)))?;
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("reading the reply: {e}"))?
                .to_bytes();
            Ok::<_, String>(Reply {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Ok(Reply {
                // No answer in time: retried like Knative's 408-on-timeout.
                status: StatusCode::REQUEST_TIMEOUT.as_u16(),
                headers: HeaderMap::new(),
                body: Bytes::from(format!("no response within {timeout:?}")),
            }),
        }
    }
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut source = error.source();
    while let Some(s) = source {
        out.push(s.to_string());
        source = s.source();
    }
    out.join(": ")
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use crds::eventing::BackoffPolicy;
    use tokio::time::Instant;

    use super::*;

    /// A status to answer with and its `Retry-After`; status 0 is "no response".
    type Step = (u16, Option<&'static str>);

    /// Answers with a scripted list of statuses and records when each attempt came.
    #[derive(Clone)]
    struct Script {
        statuses: Arc<Mutex<Vec<Step>>>,
        attempts: Arc<Mutex<Vec<Instant>>>,
    }

    impl Script {
        fn new(statuses: &[Step]) -> Self {
            Self {
                statuses: Arc::new(Mutex::new(statuses.iter().rev().copied().collect())),
                attempts: Arc::default(),
            }
        }

        fn gaps(&self) -> Vec<u128> {
            let attempts = self.attempts.lock().expect("lock");
            attempts
                .windows(2)
                .map(|w| (w[1] - w[0]).as_millis())
                .collect()
        }
    }

    impl Send for Script {
        async fn send(
            &self,
            _: &Target,
            _: &Event,
            _: Format,
            _: Duration,
        ) -> Result<Reply, String> {
            self.attempts.lock().expect("lock").push(Instant::now());
            let next = self.statuses.lock().expect("lock").pop();
            match next {
                Some((0, _)) | None => Err("connection refused".into()),
                Some((status, retry_after)) => {
                    let mut headers = HeaderMap::new();
                    if let Some(after) = retry_after {
                        headers.insert(header::RETRY_AFTER, HeaderValue::from_static(after));
                    }
                    // A 299 stands for "2xx with a body that is not an event".
                    let body: &'static [u8] = if (200..299).contains(&status) {
                        b""
                    } else {
                        b"nope"
                    };
                    Ok(Reply {
                        status: if status == 299 { 200 } else { status },
                        headers,
                        body: Bytes::from_static(body),
                    })
                }
            }
        }
    }

    fn target() -> Target {
        Target {
            url: "http://sub.example/".into(),
            uri: Uri::from_static("http://127.0.0.1:1/"),
            host: None,
        }
    }

    fn delivery(retry: u32, policy: BackoffPolicy, delay_ms: u64) -> Delivery {
        let mut d = Delivery::broker_default();
        d.retry = retry;
        d.backoff_policy = Some(policy);
        d.backoff_delay = Some(Duration::from_millis(delay_ms));
        d
    }

    async fn run(script: &Script, d: &Delivery) -> Outcome {
        let event = Event::new("1", "/s", "t");
        deliver(
            script,
            &target(),
            &event,
            d,
            Duration::from_secs(1),
            |_| async { Ok(()) },
        )
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn exponential_backoff_waits_d_2d_4d() {
        let script = Script::new(&[(503, None), (500, None), (0, None), (200, None)]);
        let outcome = run(&script, &delivery(3, BackoffPolicy::Exponential, 100)).await;
        assert!(
            matches!(outcome, Outcome::Delivered { attempts: 4, .. }),
            "{outcome:?}"
        );
        assert_eq!(script.gaps(), [100, 200, 400]);
    }

    #[tokio::test(start_paused = true)]
    async fn linear_backoff_retries_at_once_then_d_2d() {
        let script = Script::new(&[(500, None), (404, None), (429, None), (409, None)]);
        let outcome = run(&script, &delivery(3, BackoffPolicy::Linear, 100)).await;
        match outcome {
            Outcome::Failed { code, attempts, .. } => {
                assert_eq!((code, attempts), (409, 4), "attempts = retry + 1");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(script.gaps(), [0, 100, 200]);
    }

    #[tokio::test(start_paused = true)]
    async fn other_client_errors_fail_at_once() {
        for status in [400, 401, 403, 410, 302] {
            let script = Script::new(&[(status, None), (200, None)]);
            let outcome = run(&script, &delivery(5, BackoffPolicy::Linear, 10)).await;
            assert!(
                matches!(outcome, Outcome::Failed { code, attempts: 1, .. } if code == status),
                "{status}: {outcome:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_up_to_retry_after_max() {
        let script = Script::new(&[(429, Some("3")), (503, Some("60")), (200, None)]);
        let mut d = delivery(2, BackoffPolicy::Exponential, 100);
        d.retry_after_max = Some(Duration::from_secs(10));
        run(&script, &d).await;
        assert_eq!(script.gaps(), [3000, 10_000]);
        // Without retryAfterMax, Retry-After is not used.
        let script = Script::new(&[(429, Some("3")), (200, None)]);
        run(&script, &delivery(1, BackoffPolicy::Exponential, 100)).await;
        assert_eq!(script.gaps(), [100]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retries_means_one_attempt_and_transport_errors_are_500() {
        let script = Script::new(&[(0, None)]);
        let outcome = run(&script, &delivery(0, BackoffPolicy::Linear, 10)).await;
        assert!(
            matches!(
                outcome,
                Outcome::Failed {
                    code: 500,
                    attempts: 1,
                    ..
                }
            ),
            "{outcome:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_that_is_not_an_event_is_a_failed_delivery() {
        let script = Script::new(&[(299, None), (299, None)]);
        let outcome = run(&script, &delivery(1, BackoffPolicy::Linear, 10)).await;
        assert!(
            matches!(
                outcome,
                Outcome::Failed {
                    code: 502,
                    attempts: 2,
                    ..
                }
            ),
            "{outcome:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_sink_may_answer_any_2xx_body_and_is_retried_the_same_way() {
        let script = Script::new(&[(503, None), (299, None)]);
        let outcome = deliver_with(
            &script,
            &target(),
            &Event::new("1", "/s", "t"),
            &delivery(3, BackoffPolicy::Exponential, 50),
            Duration::from_secs(1),
            Replies::<fn(Event) -> std::future::Ready<Result<(), String>>>::Ignore,
        )
        .await;
        assert!(
            matches!(
                outcome,
                Outcome::Delivered {
                    reply: None,
                    attempts: 2
                }
            ),
            "{outcome:?}"
        );
        assert_eq!(script.gaps(), [50]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_event_that_cannot_be_stored_retries_the_delivery() {
        #[derive(Clone)]
        struct Replier;
        impl Send for Replier {
            async fn send(
                &self,
                _: &Target,
                _: &Event,
                _: Format,
                _: Duration,
            ) -> Result<Reply, String> {
                let (headers, body) = Event::new("r", "/reply", "reply.t").to_binary();
                Ok(Reply {
                    status: 200,
                    headers,
                    body,
                })
            }
        }
        let event = Event::new("1", "/s", "t");
        let mut calls = 0;
        let outcome = deliver(
            &Replier,
            &target(),
            &event,
            &delivery(2, BackoffPolicy::Linear, 10),
            Duration::from_secs(1),
            |reply| {
                calls += 1;
                let ok = calls > 1;
                async move {
                    assert_eq!(reply.string("type").as_deref(), Some("reply.t"));
                    if ok {
                        Ok(())
                    } else {
                        Err("log full".to_string())
                    }
                }
            },
        )
        .await;
        assert!(
            matches!(
                outcome,
                Outcome::Delivered {
                    reply: Some(_),
                    attempts: 2
                }
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn dead_letter_extensions() {
        let event = Event::new("1", "/s", "t");
        let failed = dead_letter(&event, &target(), 503, &vec![b'x'; 2000]);
        assert_eq!(
            failed.string("knativeerrordest").as_deref(),
            Some("http://sub.example/")
        );
        assert_eq!(failed.string("knativeerrorcode").as_deref(), Some("503"));
        let data = failed.string("knativeerrordata").expect("data");
        assert_eq!(data.len(), 1024);
        assert!(data.starts_with("eHh4"));
        failed.validate().expect("still a valid event");
    }
}
