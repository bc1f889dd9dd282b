//! A port that relays nothing, behind the data path's HTTP rules and limits: every request is
//! answered by the component itself (the standalone broker's ingress, the importers' webhook
//! receivers). Until the component has what it needs from the control plane it answers 503
//! with `Retry-After: 1` and says what it waits for. The bodies the component reads whole are
//! bounded by the listener's byte budget (`mecha_common::budget`), which its [`Answer`] holds;
//! a component whose [`Answer::before_body`] says so has them read on the fast path
//! ([`crate::h1::whole`]), the others get them from hyper.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use mecha_common::budget::{BodyError, Buffered};

use crate::ProxyError;
use crate::body::ProxyBody;
use crate::h1::codec::RequestHead;
use crate::h1::{Decision, Failure, Role, Whole};
use crate::rules::{HopPolicy, TrustedProxies};

/// What answers every request of an [`Answering`] port.
pub trait Answer: Send + Sync + 'static {
    /// Answers a request the general server (hyper) parsed, its body still to be read.
    fn answer(
        &self,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;

    /// Whether the fast path reads this request's whole body and answers it with
    /// [`Answer::answer_whole`] (see [`Role::before_body`]); by default, no: `answer` does.
    fn before_body(&self, _parts: &Parts) -> Whole<'_> {
        Whole::Fallback
    }

    /// Answers a request [`Answer::before_body`] said to read (see [`Role::answer_whole`]).
    fn answer_whole(
        &self,
        parts: Parts,
        body: Result<Buffered, BodyError>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send {
        async move {
            drop((parts, body));
            tracing::error!("a port that reads no whole body was asked to answer one");
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

/// The [`Role`] of a port that answers everything itself.
#[derive(Debug)]
pub struct Answering<A> {
    answer: A,
    ready: Arc<AtomicBool>,
    /// The body of the 503 before `ready`: what the component waits for.
    waiting: &'static str,
    policy: HopPolicy,
}

impl<A: Answer> Answering<A> {
    /// Answers with `answer` once `ready` is set, 503 saying `waiting` before. Nobody's
    /// forwarding headers are believed and no trace is started: what a client sent stays
    /// what it sent.
    pub fn new(answer: A, ready: Arc<AtomicBool>, waiting: &'static str) -> Self {
        Self {
            answer,
            ready,
            waiting,
            policy: HopPolicy {
                trusted: TrustedProxies::none(),
                start_trace: false,
            },
        }
    }
}

impl<A: Answer> Role for Answering<A> {
    type Ticket = ();

    const NEEDS_HOST: bool = false;

    fn policy(&self) -> &HopPolicy {
        &self.policy
    }

    async fn handle(&self, request: Request<Incoming>, _peer: SocketAddr) -> Response<ProxyBody> {
        let response = if self.ready.load(Ordering::Acquire) {
            self.answer.answer(request).await
        } else {
            let mut response =
                Response::new(Full::new(Bytes::from_static(self.waiting.as_bytes())));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        };
        response.map(|body| body.map_err(|never| match never {}).boxed_unsync())
    }

    async fn dispatch(&self, _head: &RequestHead, _retry: &[SocketAddr]) -> Decision<()> {
        // Nothing is relayed: every request is answered here, by `answer_whole` on the fast
        // path or `handle` on the general server.
        if self.ready.load(Ordering::Acquire) {
            Decision::Whole
        } else {
            Decision::Answer(crate::h1::Answer {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: self.waiting.to_string(),
                headers: vec![("retry-after", "1")],
            })
        }
    }

    fn before_body(&self, parts: &Parts) -> Whole<'_> {
        self.answer.before_body(parts)
    }

    async fn answer_whole(
        &self,
        parts: Parts,
        body: Result<Buffered, BodyError>,
        _peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        self.answer.answer_whole(parts, body).await
    }

    fn replied(&self, _ticket: &(), _reply: Result<(), &Failure>) {}

    fn failed(&self, _ticket: &(), failure: Failure) -> ProxyError {
        // Never called: no request is forwarded, so nothing fails on the way to a replica.
        tracing::error!(
            ?failure,
            "a port that relays nothing was asked about a forwarded request"
        );
        ProxyError::MissingHost
    }

    fn finished(&self, _ticket: Option<()>, _status: StatusCode) {}
}
