//! GitHubSource and GitLabSource: a webhook receiver per source, served on `mecha up`'s
//! gateway port at `/webhooks/{github|gitlab}/{namespace}/{name}` (bare host, like the broker
//! ingress).
//!
//! A delivery is checked before anything else is read from it: GitHub's `X-Hub-Signature-256`
//! (HMAC-SHA256 of the raw body with the secret) or GitLab's `X-Gitlab-Token` (the secret
//! itself), both compared in constant time. SHA-1 `X-Hub-Signature` alone is refused. Then
//! the payload must be JSON with the provider's event headers, and the event is sent to the
//! sink: `202` once the sink accepted it, `502` when every retry failed (so the provider shows
//! the delivery as failed and it can be redelivered), `200` for an event the source does not
//! list in `eventTypes` (answered, not sent). The secret is never logged or shown.

use std::fmt;

use bytes::Bytes;
use crds::SourceResource;
use crds::sources::{GITLAB_EVENTS, SecretRef};
use eventing_broker::Event;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::Full;
use mecha_common::budget::BodyBudget;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::context::SourceContext;

/// GitHub caps payloads at 25 MB; pushes of ordinary size are far below 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 4 << 20;
pub const GITHUB_TYPE_PREFIX: &str = crds::sources::GITHUB_TYPE_PREFIX;
pub const GITLAB_TYPE_PREFIX: &str = crds::sources::GITLAB_TYPE_PREFIX;

/// A webhook secret; its `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

/// What the receiver checks and sends.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    provider: Provider,
    /// The events' CloudEvents `source`.
    source: String,
    /// `eventTypes`: GitHub event names, or GitLab `X-Gitlab-Event` headers.
    accepted: Vec<String>,
    secret: Secret,
    max_body: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    GitHub,
    GitLab,
}

/// A running webhook source.
#[derive(Debug)]
pub struct Receiver {
    config: WebhookConfig,
    cx: SourceContext,
}

/// Why a delivery is refused: the status and what the sender is told.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

// === impl Secret ===

impl Secret {
    /// Reads the secret from where the annotations say: a file (trailing line breaks dropped,
    /// as editors add them) or an environment variable of `mecha up`, through `env`.
    pub fn read(from: &SecretRef, env: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let text = match from {
            SecretRef::File(path) => read_secret_file(path)
                .map_err(|error| format!("cannot read the secret file {path}: {error}"))?,
            SecretRef::Env(name) => env(name)
                .ok_or_else(|| format!("the environment variable {name} (the secret) is not set"))?
                .into_bytes(),
        };
        let mut text = text;
        while text.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            text.pop();
        }
        if text.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(Secret(text))
    }

    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }
}

/// The longest secret file read: a webhook secret is a short token.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// A secret file's bytes: a regular file (through symlinks, as Kubernetes mounts Secrets) of
/// at most [`MAX_SECRET_FILE`] bytes. Anything else — a FIFO or a device, which would block
/// or never end — is refused before it is opened.
fn read_secret_file(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_SECRET_FILE} bytes"
        )));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_SECRET_FILE} bytes"
        )));
    }
    Ok(bytes)
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

// === impl WebhookConfig ===

impl WebhookConfig {
    /// The receiver's settings for a GitHubSource or GitLabSource (`None` for other kinds).
    pub fn from_resource(source: &SourceResource, secret: Secret) -> Option<Self> {
        let (provider, accepted) = match source {
            SourceResource::GitHub(s) => (Provider::GitHub, s.spec.event_types.clone()),
            SourceResource::GitLab(s) => (
                Provider::GitLab,
                s.spec
                    .event_types
                    .iter()
                    .filter_map(|name| {
                        GITLAB_EVENTS
                            .iter()
                            .find(|(known, _, _)| known == name)
                            .map(|(_, header, _)| header.to_string())
                    })
                    .collect(),
            ),
            SourceResource::Ping(_)
            | SourceResource::Redis(_)
            | SourceResource::Nats(_)
            | SourceResource::Mqtt(_)
            | SourceResource::Container(_)
            | SourceResource::Binding(_)
            | SourceResource::ApiServer(_) => return None,
        };
        Some(Self {
            provider,
            source: source.event_source(),
            accepted,
            secret,
            max_body: DEFAULT_MAX_BODY,
        })
    }

    pub fn with_max_body(mut self, max_body: usize) -> Self {
        self.max_body = max_body;
        self
    }

    pub fn build(self, cx: SourceContext) -> Receiver {
        Receiver { config: self, cx }
    }

    /// Checks the delivery's credential against the secret, in constant time.
    fn authenticate(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), Refusal> {
        let unauthorized = |reason, message: &str| Refusal {
            status: StatusCode::UNAUTHORIZED,
            reason,
            message: message.to_string(),
        };
        match self.provider {
            Provider::GitHub => {
                let mut signatures = headers.get_all("x-hub-signature-256").iter();
                let Some(signature) = signatures.next() else {
                    return Err(if headers.contains_key("x-hub-signature") {
                        unauthorized(
                            "sha1",
                            "only an SHA-1 X-Hub-Signature came; SHA-1 signatures are refused: X-Hub-Signature-256 is required",
                        )
                    } else {
                        unauthorized("missing-signature", "X-Hub-Signature-256 is required")
                    });
                };
                if signatures.next().is_some() {
                    // Which one counts? Refused rather than guessed: a proxy that checks the
                    // other one would disagree about whether the delivery is authentic.
                    return Err(unauthorized(
                        "repeated-signature",
                        "X-Hub-Signature-256 appears more than once; a delivery has one signature",
                    ));
                }
                let expected = signature
                    .to_str()
                    .ok()
                    .and_then(|s| s.strip_prefix("sha256="))
                    .and_then(decode_hex)
                    .ok_or_else(|| {
                        unauthorized(
                            "bad-signature",
                            "X-Hub-Signature-256 must be sha256= and 64 hex digits",
                        )
                    })?;
                let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret.0)
                    .map_err(|_| unauthorized("bad-signature", "the secret cannot key HMAC"))?;
                mac.update(body);
                mac.verify_slice(&expected).map_err(|_| {
                    unauthorized(
                        "bad-signature",
                        "X-Hub-Signature-256 does not match the body",
                    )
                })
            }
            Provider::GitLab => {
                let mut tokens = headers.get_all("x-gitlab-token").iter();
                let token = tokens.next().ok_or_else(|| {
                    unauthorized("missing-signature", "X-Gitlab-Token is required")
                })?;
                if tokens.next().is_some() {
                    return Err(unauthorized(
                        "repeated-signature",
                        "X-Gitlab-Token appears more than once; a delivery has one token",
                    ));
                }
                // Digests first, so the comparison takes as long whatever the token's length.
                let given = Sha256::digest(token.as_bytes());
                let secret = Sha256::digest(&self.secret.0);
                if bool::from(given.as_slice().ct_eq(secret.as_slice())) {
                    Ok(())
                } else {
                    Err(unauthorized(
                        "bad-signature",
                        "X-Gitlab-Token does not match",
                    ))
                }
            }
        }
    }

    /// The event of an authenticated delivery, or `None` for one not in `eventTypes`.
    fn event(&self, headers: &HeaderMap, body: &Bytes) -> Result<Option<Event>, Refusal> {
        let bad = |reason, message: String| Refusal {
            status: StatusCode::BAD_REQUEST,
            reason,
            message,
        };
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        if serde_json_is_object(body).is_err() {
            return Err(bad(
                "bad-payload",
                "the payload must be JSON (set the webhook's content type to application/json)"
                    .into(),
            ));
        }
        let (kind, id) = match self.provider {
            Provider::GitHub => {
                let name = header("x-github-event")
                    .ok_or_else(|| bad("bad-payload", "X-GitHub-Event is required".into()))?;
                let id = header("x-github-delivery")
                    .ok_or_else(|| bad("bad-payload", "X-GitHub-Delivery is required".into()))?;
                if !self.accepted.contains(&name) {
                    return Ok(None);
                }
                (format!("{GITHUB_TYPE_PREFIX}{name}"), id)
            }
            Provider::GitLab => {
                let name = header("x-gitlab-event")
                    .ok_or_else(|| bad("bad-payload", "X-Gitlab-Event is required".into()))?;
                let Some((_, _, suffix)) = GITLAB_EVENTS.iter().find(|(_, h, _)| *h == name) else {
                    return Ok(None);
                };
                if !self.accepted.contains(&name) {
                    return Ok(None);
                }
                // GitLab names each delivery; without it the body's digest stands in, so a
                // redelivery of the same payload keeps its id.
                let id = header("x-gitlab-event-uuid").unwrap_or_else(|| {
                    Sha256::digest(body)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect()
                });
                (format!("{GITLAB_TYPE_PREFIX}{suffix}"), id)
            }
        };
        let mut event = Event::new(&id, &self.source, &kind);
        event.set("datacontenttype", "application/json");
        event.data = Some(body.clone());
        Ok(Some(event))
    }
}

// === impl Receiver ===

impl Receiver {
    /// Answers one webhook delivery, its body read within `budget` (the listener's).
    pub async fn handle<B>(&self, budget: &BodyBudget, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if request.method() != Method::POST {
            let refusal = Refusal {
                status: StatusCode::METHOD_NOT_ALLOWED,
                reason: "method",
                message: format!("{} is not allowed: webhooks are POSTed", request.method()),
            };
            let mut response = self.refused(&refusal);
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
        // Whole, within the listener's budget and time, before the signature can be checked;
        // held until the answer.
        let (parts, body) = request.into_parts();
        let body = match budget
            .collect(&parts.headers, body, self.config.max_body)
            .await
        {
            Ok(body) => body,
            Err(error) => {
                self.cx.rejected(error.reason());
                tracing::info!(source = %format!("{}/{}", self.cx.namespace, self.cx.name), kind = %self.cx.kind, status = error.status().as_u16(), reason = error.reason(), "webhook delivery refused");
                return error.response();
            }
        };
        match self.receive(&parts.headers, body.bytes()).await {
            Ok((status, message)) => answer(status, &message),
            Err(refusal) => self.refused(&refusal),
        }
    }

    fn refused(&self, refusal: &Refusal) -> Response<Full<Bytes>> {
        self.cx.rejected(refusal.reason);
        tracing::info!(source = %format!("{}/{}", self.cx.namespace, self.cx.name), kind = %self.cx.kind, status = refusal.status.as_u16(), reason = refusal.reason, "webhook delivery refused");
        answer(refusal.status, &refusal.message)
    }

    async fn receive(
        &self,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<(StatusCode, String), Refusal> {
        let config = &self.config;
        config.authenticate(headers, body)?;
        let Some(event) = config.event(headers, body)? else {
            return Ok((
                StatusCode::OK,
                "not sent: the source does not list this event in eventTypes".into(),
            ));
        };
        let id = event.id();
        match self.cx.emit(event).await {
            Ok(()) => Ok((
                StatusCode::ACCEPTED,
                format!("event {id} accepted by the sink"),
            )),
            Err(error) => Err(Refusal {
                status: StatusCode::BAD_GATEWAY,
                reason: "sink",
                message: format!("event {id} was not delivered: {error}"),
            }),
        }
    }
}

/// Whether `body` is one JSON object, checked without building it (any number of nested
/// values costs nothing but time).
fn serde_json_is_object(body: &[u8]) -> Result<(), ()> {
    let starts_as_object = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    if starts_as_object && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
        Ok(())
    } else {
        Err(())
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

pub(crate) fn answer(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;
    use std::sync::Arc;

    use mecha_common::ShutdownSignal;
    use prometheus::Registry;

    use super::*;
    use crate::metrics::SourceMetrics;
    use crate::sink::{MemorySink, SinkError};

    const SECRET: &str = "It's a Secret to Everybody";
    const BODY: &str = r#"{"zen": "Keep it logically awesome.", "hook_id": 1}"#;

    fn github(sink: &MemorySink) -> Receiver {
        let yaml = "apiVersion: sources.knative.dev/v1alpha1\nkind: GitHubSource\nmetadata:\n  name: repo\n  annotations: {mecha.dev/secret-token-env: GH_SECRET}\nspec:\n  ownerAndRepository: octo/hello\n  eventTypes: [push, pull_request]\n  sink: {uri: http://127.0.0.1:1/}\n";
        receiver(yaml, sink)
    }

    fn gitlab(sink: &MemorySink) -> Receiver {
        let yaml = "apiVersion: sources.knative.dev/v1alpha1\nkind: GitLabSource\nmetadata:\n  name: proj\n  annotations: {mecha.dev/secret-token-env: GL_SECRET}\nspec:\n  projectUrl: https://gitlab.com/group/proj\n  eventTypes: [push_events]\n  sink: {uri: http://127.0.0.1:1/}\n";
        receiver(yaml, sink)
    }

    fn receiver(yaml: &str, sink: &MemorySink) -> Receiver {
        let (loaded, errors) =
            crds::load_str(std::path::Path::new("w.yaml"), yaml, crds::Mode::Local);
        assert!(errors.is_empty(), "{errors:?}");
        let crds::Resource::Source(source) = &loaded[0].resource else {
            panic!("not a source")
        };
        let secret = Secret::read(&source.secret_ref().unwrap(), |_| {
            Some(format!("{SECRET}\n"))
        })
        .unwrap();
        let cx = SourceContext::new(
            (source.kind().into(), "default".into(), source.name().into()),
            ShutdownSignal::never(),
            Arc::new(sink.clone()),
            BTreeMap::new(),
            SourceMetrics::new(&Registry::new()),
        );
        WebhookConfig::from_resource(source, secret)
            .unwrap()
            .with_max_body(1024)
            .build(cx)
    }

    /// GitHub's documented example: this secret and body "Hello, World!" sign as below.
    #[test]
    fn signatures_match_githubs_documented_example() {
        let config = WebhookConfig {
            provider: Provider::GitHub,
            source: String::new(),
            accepted: vec![],
            secret: Secret::new(SECRET),
            max_body: 1024,
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-hub-signature-256",
            HeaderValue::from_static(
                "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            ),
        );
        assert_eq!(config.authenticate(&headers, b"Hello, World!"), Ok(()));
        assert!(config.authenticate(&headers, b"Hello, World?").is_err());
    }

    fn sign(body: &str) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(body.as_bytes());
        let bytes = mac.finalize().into_bytes();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256={hex}")
    }

    fn request(headers: &[(&str, &str)], body: &str) -> Request<Full<Bytes>> {
        let mut builder = Request::post("/webhooks/github/default/repo");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    }

    fn budget() -> BodyBudget {
        BodyBudget::new(
            "test",
            mecha_common::BudgetSettings::default(),
            &Registry::new(),
        )
    }

    async fn status(receiver: &Receiver, headers: &[(&str, &str)], body: &str) -> u16 {
        receiver
            .handle(&budget(), request(headers, body))
            .await
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn github_deliveries_are_checked_then_sent() {
        let sink = MemorySink::default();
        let receiver = github(&sink);
        let signature = sign(BODY);
        let good = [
            ("x-hub-signature-256", signature.as_str()),
            ("x-github-event", "push"),
            ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        ];
        assert_eq!(status(&receiver, &good, BODY).await, 202);
        let events = sink.events();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!(event.id(), "72d3162e-cc78-11e3-81ab-4c9367dc0958");
        assert_eq!(
            event.string("type").as_deref(),
            Some("dev.knative.source.github.push")
        );
        assert_eq!(
            event.string("source").as_deref(),
            Some("https://github.com/octo/hello")
        );
        assert_eq!(event.data.as_deref(), Some(BODY.as_bytes()));

        // Wrong, missing and SHA-1-only signatures: 401, nothing sent.
        let tampered = BODY.replace("awesome", "awful");
        assert_eq!(status(&receiver, &good, &tampered).await, 401);
        assert_eq!(status(&receiver, &good[1..], BODY).await, 401);
        let sha1 = [(
            "x-hub-signature",
            "sha1=0123456789abcdef0123456789abcdef01234567",
        )];
        assert_eq!(
            status(&receiver, &[sha1[0], good[1], good[2]], BODY).await,
            401
        );
        let short = [("x-hub-signature-256", "sha256=abc"), good[1], good[2]];
        assert_eq!(status(&receiver, &short, BODY).await, 401);
        // Two signatures, the good one first or last: neither counts.
        let wrong = sign("another body");
        for pair in [
            [signature.as_str(), wrong.as_str()],
            [wrong.as_str(), signature.as_str()],
        ] {
            let twice = [
                ("x-hub-signature-256", pair[0]),
                ("x-hub-signature-256", pair[1]),
                good[1],
                good[2],
            ];
            assert_eq!(status(&receiver, &twice, BODY).await, 401);
        }
        let both_good = [good[0], good[0], good[1], good[2]];
        assert_eq!(status(&receiver, &both_good, BODY).await, 401);
        assert_eq!(sink.events().len(), 1);

        // Signed, but not JSON, or without the delivery id: 400.
        assert_eq!(
            status(
                &receiver,
                &[
                    ("x-hub-signature-256", &sign("payload=x")),
                    good[1],
                    good[2]
                ],
                "payload=x"
            )
            .await,
            400
        );
        assert_eq!(status(&receiver, &good[..2], BODY).await, 400);
        // An event the source does not list: answered, not sent.
        let star = [good[0], ("x-github-event", "star"), good[2]];
        assert_eq!(status(&receiver, &star, BODY).await, 200);
        // Too large: 413 before any check.
        let large = format!(r#"{{"x": "{}"}}"#, "a".repeat(2000));
        assert_eq!(status(&receiver, &good, &large).await, 413);
        assert_eq!(sink.events().len(), 1);

        // The sink refuses: 502, so GitHub marks the delivery failed.
        sink.refuse(Some(SinkError {
            code: 503,
            message: "down".into(),
            attempts: 6,
        }));
        assert_eq!(status(&receiver, &good, BODY).await, 502);
        let get = Request::get("/").body(Full::new(Bytes::new())).unwrap();
        assert_eq!(receiver.handle(&budget(), get).await.status(), 405);
    }

    #[tokio::test]
    async fn gitlab_tokens_are_compared_and_events_named() {
        let sink = MemorySink::default();
        let receiver = gitlab(&sink);
        let good = [
            ("x-gitlab-token", SECRET),
            ("x-gitlab-event", "Push Hook"),
            (
                "x-gitlab-event-uuid",
                "13792a34-cac6-4fda-95a8-c58e00a3954e",
            ),
        ];
        assert_eq!(status(&receiver, &good, BODY).await, 202);
        let event = &sink.events()[0];
        assert_eq!(
            event.string("type").as_deref(),
            Some("dev.knative.sources.gitlab.push")
        );
        assert_eq!(
            event.string("source").as_deref(),
            Some("https://gitlab.com/group/proj")
        );
        assert_eq!(event.id(), "13792a34-cac6-4fda-95a8-c58e00a3954e");
        assert_eq!(
            status(
                &receiver,
                &[("x-gitlab-token", "wrong"), good[1], good[2]],
                BODY
            )
            .await,
            401
        );
        assert_eq!(status(&receiver, &good[1..], BODY).await, 401);
        let twice = [good[0], ("x-gitlab-token", "wrong"), good[1], good[2]];
        assert_eq!(status(&receiver, &twice, BODY).await, 401);
        let issue = [good[0], ("x-gitlab-event", "Issue Hook"), good[2]];
        assert_eq!(status(&receiver, &issue, BODY).await, 200);
        assert_eq!(sink.events().len(), 1);
    }

    #[test]
    fn secrets_are_never_shown() {
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        let missing = Secret::read(&SecretRef::Env("NOPE".into()), |_| None).unwrap_err();
        assert!(missing.contains("NOPE"), "{missing}");
    }

    #[test]
    fn a_secret_file_is_a_small_regular_file() {
        let dir = std::env::temp_dir().join(format!("mecha-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let read = |path: &std::path::Path| {
            Secret::read(&SecretRef::File(path.display().to_string()), |_| None)
        };
        let good = dir.join("token");
        std::fs::write(&good, "s3cret\n").expect("write");
        assert_eq!(read(&good).expect("read").0, b"s3cret");
        // Through a symlink, as Kubernetes mounts a Secret.
        let link = dir.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&good, &link).expect("symlink");
        assert!(read(&link).is_ok());
        // A device or a FIFO would never end or never answer: refused without reading.
        let zero = read(std::path::Path::new("/dev/zero")).expect_err("a device");
        assert!(zero.contains("not a regular file"), "{zero}");
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .expect("mkfifo")
                .success()
        );
        let refused = read(&fifo).expect_err("a FIFO");
        assert!(refused.contains("not a regular file"), "{refused}");
        let big = dir.join("big");
        std::fs::write(&big, vec![b'a'; 64 * 1024 + 1]).expect("write");
        let refused = read(&big).expect_err("too big");
        assert!(refused.contains("larger than 65536 bytes"), "{refused}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
