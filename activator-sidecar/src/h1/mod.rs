//! The HTTP/1.1 fast path: one task per client connection relays each request and response
//! over a kept-alive replica connection taken from its thread's [`pool::Pool`] for the
//! exchange — heads parsed and rewritten in place, bodies passed through in the framing they
//! arrived in, no channel, no task per request.
//!
//! This is where the sidecar's CPU per request goes, so it does the least a proxy can: about
//! four system calls per exchange (read the request, write it to the replica, read the
//! response, write it back).
//!
//! Every HTTP/1.x request head on a connection is read and checked here, against
//! [`crate::rules`], whichever path then answers it: a request the rules refuse is answered
//! here; one the role answers itself with its whole body (the broker ingress) is read and
//! answered here too when its body is framed by `Content-Length` ([`whole`]); one the general
//! hyper server answers (HTTP/1.0, `OPTIONS *`, an h2c replica, a role's other own routes and
//! chunked or `100-continue` bodies of the former, or every request when the fast path is off)
//! is handed over alone, with the connection coming back afterwards ([`Handover::Request`]);
//! HTTP/2 and upgrades hand the whole connection over.

pub mod codec;
pub mod guard;
pub mod pool;
pub mod whole;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use mecha_common::ShutdownSignal;
use mecha_common::budget::{BodyError, Buffered};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::limits::{ConnState, Limits};
use crate::rules::{HopPolicy, Peer, Refusal};
use codec::{Framing, ParsedRequest, RequestHead};
use guard::Guarded;
use pool::{Pool, Upstream};
pub use whole::Whole;

/// Where a connection's timer starts, before its first request: far off, so the first
/// request's (earlier) deadline replaces it. It is not a wait; after that the timer only moves
/// when it fires before the current request's deadline.
const TIMER_PARKED: Duration = Duration::from_secs(3600);

/// Read buffer of each side; grows only for larger heads.
const READ_BUFFER: usize = 16 * 1024;

/// What a role decides for one request.
#[derive(Debug)]
pub enum Decision<T> {
    /// Forward to the HTTP/1.1 replica at `addr` until `deadline`; `ticket` (which counts the
    /// request against the replica) is held until the response has been relayed.
    Forward {
        addr: SocketAddr,
        deadline: Instant,
        ticket: T,
    },
    /// Answer it without forwarding (an error, a probe).
    Answer(Answer),
    /// Not for the fast path (an h2c replica): the general server takes the connection.
    Fallback,
    /// The role answers it itself once it has its whole body ([`whole`]): on the fast path
    /// for a body framed by `Content-Length` (or none) without `Expect: 100-continue`, by
    /// the general server otherwise, as for `Fallback`.
    Whole,
}

/// A response of the sidecar's own.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: String,
    pub headers: Vec<(&'static str, &'static str)>,
}

pub use crate::error::Failure;

/// A role of the data path (the inbound sidecar, the gateway and its outbound and `mecha up`
/// forms): how it decides for the fast path, and how it answers what the general server
/// parsed. One implementation per role serves both paths, so they cannot disagree.
pub trait Role: Send + Sync + 'static {
    /// Held while a request is forwarded.
    type Ticket: Send;

    /// Whether [`RequestHead::host`] is needed (routing by host).
    const NEEDS_HOST: bool;

    /// What this role does to forwarding headers.
    fn policy(&self) -> &HopPolicy;

    /// Answers a request the general server parsed (checked by the rules already).
    fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<ProxyBody>> + Send;

    /// Decides where `head` goes; may wait (admission, activation). `retry` lists replicas
    /// that could not be reached for this request already.
    fn dispatch(
        &self,
        head: &RequestHead,
        retry: &[SocketAddr],
    ) -> impl Future<Output = Decision<Self::Ticket>> + Send;

    /// Whether a request without a body that could not reach its replica may be dispatched
    /// again (to another replica) rather than failing.
    fn may_retry(&self, _ticket: &Self::Ticket, _attempts: usize) -> bool {
        false
    }

    /// Whether one attempt at the replica got a response head (`Ok`) or not (the failure):
    /// once per attempt, retried or not — what outlier detection counts. A kept-alive
    /// connection found closed and retried on a fresh one is not an attempt.
    fn replied(&self, ticket: &Self::Ticket, reply: Result<(), &Failure>);

    /// The error a failure becomes.
    fn failed(&self, ticket: &Self::Ticket, failure: Failure) -> ProxyError;

    /// An exchange ended with `status` (the ticket is `None` for the role's own answers).
    fn finished(&self, ticket: Option<Self::Ticket>, status: StatusCode);

    /// For a request `dispatch` said [`Decision::Whole`] of, before its body is read: how
    /// much of it to read and within which budget, or the answer without it. Roles that never
    /// say `Whole` leave it to the general server.
    fn before_body(&self, _parts: &Parts) -> Whole<'_> {
        Whole::Fallback
    }

    /// Answers a request [`Role::before_body`] said to read: with its whole body, or with why
    /// there is none (too large, no budget, too slow, broken off). Called only once the body
    /// is complete or has failed; what it answers is written as hyper would write it.
    fn answer_whole(
        &self,
        _parts: Parts,
        _body: Result<Buffered, BodyError>,
        _peer: SocketAddr,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send {
        async {
            // Never called for a role whose `before_body` says `Fallback`.
            tracing::error!("a role that reads no whole body was asked to answer one");
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

/// What the fast path hands to the general server.
#[derive(Debug)]
pub enum Handover {
    /// One request (at the start of `buf`, checked); the connection comes back after it
    /// unless `close`. `upgrade`: it asks to switch protocols, so it never comes back.
    Request {
        stream: TcpStream,
        buf: BytesMut,
        close: bool,
        upgrade: bool,
    },
    /// HTTP/2: the whole connection, with what was read of it.
    Connection(Guarded),
}

/// How one exchange ended.
enum Exchanged {
    /// Relayed; `keep_client`/`keep_upstream`: whether each connection can carry another.
    Done {
        status: u16,
        keep_client: bool,
        keep_upstream: bool,
    },
    /// No response came; nothing was written to the client yet.
    Failed { failure: Failure, stale: bool },
    /// The client went away, or the exchange broke after part of the response was written:
    /// both connections close.
    Broken { status: u16 },
    /// The request body broke its framing, or the client stopped (or paused too long)
    /// before its end.
    Malformed(Refusal),
    /// The client closed its connection after its request, before the response: the replica
    /// connection is closed too, so the replica is not left working for nobody (and the
    /// request stops counting) until the timeout.
    Abandoned,
}

/// How long a request whose client closed (or half-closed) its connection still waits for
/// the response to begin before it is abandoned.
pub const ABANDON_GRACE: Duration = Duration::from_secs(1);

/// The status recorded for an abandoned request (nginx's "client closed request"); nothing
/// is written, there is no one to write it to.
const CLIENT_CLOSED: u16 = 499;

/// How the request body is read from the client: a pause is bounded, and while the client
/// pauses, its connection counts as idle for the connection limit (the longest waiting is
/// closed first), so a body sent a byte at a time cannot hold a place.
struct BodyWatch<'a, E> {
    state: &'a ConnState,
    evicted: Pin<&'a mut E>,
    timeout: Duration,
}

/// What one client connection is served with.
#[derive(Debug)]
pub struct Connection<'a> {
    pub peer: SocketAddr,
    /// Replica connections of this thread.
    pub pool: &'a Arc<Pool>,
    pub shutdown: &'a ShutdownSignal,
    /// Relay requests here; otherwise every request is handed to the general server.
    pub fast: bool,
    pub limits: &'a Limits,
    /// Where the accept loop sees whether this connection is idle, and tells it to close.
    pub state: &'a ConnState,
}

/// Serves `client` (with `buf` already read from it) until the client closes, shutdown, a
/// limit, or a request for the general server (then returned with what was read).
pub async fn serve<D: Role>(
    mut client: TcpStream,
    mut buf: BytesMut,
    connection: &Connection<'_>,
    dispatch: &D,
) -> Option<Handover> {
    let Connection {
        peer,
        pool,
        shutdown,
        fast,
        limits,
        state,
    } = *connection;
    buf.reserve(READ_BUFFER);
    let mut request = Vec::with_capacity(1024);
    let mut response = Vec::with_capacity(1024);
    let mut upstream: Option<Upstream> = None;
    let peer_info = Peer::new(peer.ip(), dispatch.policy());
    // Registered once per connection, not once per request.
    let stop = shutdown.clone().recv();
    tokio::pin!(stop);
    let evicted = state.evicted();
    tokio::pin!(evicted);
    // One timer per connection: it only moves when it fires before the current request's
    // deadline, or when a request's deadline is earlier than where it stands.
    let timer = tokio::time::sleep(TIMER_PARKED);
    tokio::pin!(timer);
    'requests: loop {
        request.clear();
        let now = Instant::now();
        state.idle_at(now);
        let idle_deadline = now + limits.idle_timeout;
        if idle_deadline < timer.deadline() {
            timer.as_mut().reset(idle_deadline);
        }
        let mut head_deadline: Option<Instant> = None;
        let head = loop {
            if !buf.is_empty() {
                match codec::parse_request(
                    &buf,
                    &peer_info,
                    dispatch.policy(),
                    D::NEEDS_HOST,
                    &mut request,
                ) {
                    ParsedRequest::Head(head) if fast => break head,
                    ParsedRequest::Head(head) => {
                        state.busy();
                        return Some(one_request(client, buf, head.close, false));
                    }
                    ParsedRequest::General { close, upgrade } => {
                        state.busy();
                        return Some(one_request(client, buf, close, upgrade));
                    }
                    ParsedRequest::Http2 => return Some(handover(client, buf)),
                    ParsedRequest::Refused(refusal) => {
                        tracing::debug!(%refusal, %peer, "request refused");
                        let answer = Answer::from(&ProxyError::Refused(refusal));
                        let _ = write_answer(&mut client, &mut response, &answer, true).await;
                        dispatch.finished(None, answer.status);
                        return None;
                    }
                    ParsedRequest::Partial => {
                        request.clear();
                        if head_deadline.is_none() {
                            let deadline = Instant::now() + limits.header_read_timeout;
                            if deadline < timer.deadline() {
                                timer.as_mut().reset(deadline);
                            }
                            head_deadline = Some(deadline);
                        }
                    }
                }
            }
            buf.reserve(READ_BUFFER / 2);
            let read = if let Some(deadline) = head_deadline {
                // Part of a head: it must be complete in time (slow clients hold a place).
                tokio::select! {
                    read = client.read_buf(&mut buf) => read,
                    () = &mut evicted => return None,
                    () = &mut timer => {
                        if Instant::now() < deadline {
                            timer.as_mut().reset(deadline);
                            continue;
                        }
                        let answer = Answer::new(
                            StatusCode::REQUEST_TIMEOUT,
                            format!(
                                "the request head was not complete within {:?}\n",
                                limits.header_read_timeout
                            ),
                        );
                        let _ = write_answer(&mut client, &mut response, &answer, true).await;
                        dispatch.finished(None, answer.status);
                        return None;
                    }
                }
            } else {
                // Idle between requests: where shutdown, the idle timeout and the connection
                // limit close the connection.
                tokio::select! {
                    read = client.read_buf(&mut buf) => read,
                    () = &mut stop => return None,
                    () = &mut evicted => return None,
                    () = &mut timer => {
                        if Instant::now() >= idle_deadline {
                            return None;
                        }
                        timer.as_mut().reset(idle_deadline);
                        continue;
                    }
                }
            };
            if !matches!(read, Ok(n) if n > 0) {
                return None;
            }
        };
        state.busy();
        let close = head.close || shutdown.is_triggered();
        let (mut addr, mut deadline, mut ticket) = match dispatch.dispatch(&head, &[]).await {
            Decision::Forward {
                addr,
                deadline,
                ticket,
            } => (addr, deadline, ticket),
            Decision::Fallback => return Some(one_request(client, buf, head.close, false)),
            Decision::Whole => {
                let watch = BodyWatch {
                    state,
                    evicted: evicted.as_mut(),
                    timeout: limits.body_read_timeout,
                };
                let served = whole::serve(
                    &mut client,
                    &mut buf,
                    &head,
                    close,
                    &mut response,
                    dispatch,
                    peer,
                    watch,
                    shutdown,
                )
                .await;
                match served {
                    whole::Served::Next => continue,
                    whole::Served::Close => return None,
                    whole::Served::Fallback => {
                        return Some(one_request(client, buf, head.close, false));
                    }
                }
            }
            Decision::Answer(answer) => {
                // A request whose body was not read cannot be followed by another.
                let keep = !close && head.framing.is_done();
                buf.advance(head.len);
                let written = write_answer(&mut client, &mut response, &answer, !keep).await;
                dispatch.finished(None, answer.status);
                if written.is_err() || !keep {
                    return None;
                }
                continue;
            }
        };
        // The hop that wants the body asks for it (the replica never sees `Expect`).
        if head.expect_continue
            && !head.framing.is_done()
            && client
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            dispatch.finished(Some(ticket), status_code(499));
            return None;
        }
        // The head goes out with as much of the body as has arrived, in one write.
        buf.advance(head.len);
        let mut framing = head.framing;
        match framing.consume(&buf) {
            Ok(n) => {
                request.extend_from_slice(&buf[..n]);
                buf.advance(n);
            }
            Err(_) => {
                let answer = Answer::from(&ProxyError::Refused(Refusal::BAD_BODY));
                let _ = write_answer(&mut client, &mut response, &answer, true).await;
                dispatch.finished(Some(ticket), answer.status);
                return None;
            }
        }
        // Everything of the request is in `request`: it can be sent again.
        let replayable = framing.is_done();
        let mut failed: Vec<SocketAddr> = Vec::new();
        let mut stale_retried = false;
        // Whether anything of the final response reached the client, for the last attempt.
        let mut responded;
        let outcome = loop {
            responded = false;
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }
            let attempted = {
                let attempt = async {
                    // After a kept-alive connection turned out closed, a new one.
                    let taken = pool.take(addr, stale_retried).await.map_err(|error| {
                        Exchanged::Failed {
                            failure: Failure::Connect(error.into()),
                            stale: false,
                        }
                    })?;
                    let connection = upstream.insert(taken);
                    Ok::<_, Exchanged>(
                        exchange(
                            &mut client,
                            &mut buf,
                            connection,
                            &request,
                            &mut framing,
                            &head,
                            close,
                            &mut response,
                            &mut responded,
                            BodyWatch {
                                state,
                                evicted: evicted.as_mut(),
                                timeout: limits.body_read_timeout,
                            },
                        )
                        .await,
                    )
                };
                tokio::pin!(attempt);
                loop {
                    tokio::select! {
                        biased;
                        attempted = &mut attempt => break Some(attempted),
                        () = &mut timer => {
                            if Instant::now() >= deadline {
                                break None;
                            }
                            timer.as_mut().reset(deadline);
                        }
                    }
                }
            };
            let exchanged = match attempted {
                Some(Ok(exchanged) | Err(exchanged)) => exchanged,
                None if responded => Exchanged::Broken { status: 504 },
                None => Exchanged::Failed {
                    failure: Failure::Timeout,
                    stale: false,
                },
            };
            let Exchanged::Failed { failure, stale } = exchanged else {
                break exchanged;
            };
            // The replica connection is in an unknown state: never reuse it.
            let used = upstream.take().is_some_and(|u| u.used > 0);
            if stale && used && replayable && !stale_retried {
                // A kept-alive connection the replica had closed: once more on a fresh one.
                stale_retried = true;
                continue;
            }
            dispatch.replied(&ticket, Err(&failure));
            if matches!(failure, Failure::Connect(_))
                && replayable
                && dispatch.may_retry(&ticket, failed.len())
            {
                failed.push(addr);
                match dispatch.dispatch(&head, &failed).await {
                    Decision::Forward {
                        addr: next,
                        deadline: next_deadline,
                        ticket: next_ticket,
                    } => {
                        // Replacing the ticket stops counting the request on the failed one.
                        (addr, deadline, ticket) = (next, next_deadline, next_ticket);
                        continue;
                    }
                    Decision::Answer(answer) => {
                        let _ = write_answer(&mut client, &mut response, &answer, true).await;
                        dispatch.finished(None, answer.status);
                        return None;
                    }
                    Decision::Fallback | Decision::Whole => {}
                }
            }
            let error = dispatch.failed(&ticket, failure);
            let answer = Answer::from(&error);
            if error.status().is_server_error() {
                let trace_id = head.trace.map(tracing::field::display);
                tracing::warn!(trace_id, %error, "request failed");
            }
            let keep = !close && replayable;
            let written = write_answer(&mut client, &mut response, &answer, !keep).await;
            dispatch.finished(Some(ticket), answer.status);
            if written.is_err() || !keep {
                return None;
            }
            continue 'requests;
        };
        if let Exchanged::Done { .. } | Exchanged::Broken { .. } = outcome {
            // A response head came (a broken exchange broke after it).
            dispatch.replied(&ticket, Ok(()));
        }
        match outcome {
            Exchanged::Done {
                status,
                keep_client,
                keep_upstream,
            } => {
                dispatch.finished(Some(ticket), status_code(status));
                // Only a connection whose bytes matched the framing exactly is reused: anything
                // the replica sent past its response would reach the next request's client.
                if let Some(connection) = upstream.take()
                    && keep_upstream
                    && connection.buf.is_empty()
                {
                    pool.give_back(connection);
                }
                if !keep_client {
                    return None;
                }
            }
            Exchanged::Broken { status } => {
                dispatch.finished(Some(ticket), status_code(status));
                return None;
            }
            Exchanged::Malformed(refusal) => {
                // The replica saw part of a request: its connection is never reused.
                drop(upstream.take());
                let error = ProxyError::Refused(refusal);
                let status = error.status();
                if !responded {
                    let answer = Answer::from(&error);
                    let _ = write_answer(&mut client, &mut response, &answer, true).await;
                }
                dispatch.finished(Some(ticket), status);
                return None;
            }
            Exchanged::Abandoned => {
                drop(upstream.take());
                dispatch.finished(Some(ticket), status_code(CLIENT_CLOSED));
                return None;
            }
            Exchanged::Failed { .. } => return None,
        }
    }
}

/// One request and its response over `upstream`: the request (head and the start of its
/// body) is written, the rest of the body relayed from the client while the response is
/// read, and the response relayed back. `responded` turns true once anything of the final
/// response was written to the client.
#[allow(clippy::too_many_arguments)]
async fn exchange<E: Future<Output = ()>>(
    client: &mut TcpStream,
    client_buf: &mut BytesMut,
    upstream: &mut Upstream,
    request: &[u8],
    framing: &mut Framing,
    head: &RequestHead,
    close: bool,
    response: &mut Vec<u8>,
    responded: &mut bool,
    mut watch: BodyWatch<'_, E>,
) -> Exchanged {
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.stream.split();
    let upstream_buf = &mut upstream.buf;
    let timeout = watch.timeout;
    let body_sent = AtomicBool::new(false);
    let response_started = AtomicBool::new(false);
    let send = async {
        upstream_write
            .write_all(request)
            .await
            .map_err(|_| Side::Destination)?;
        relay_request(
            &mut client_read,
            client_buf,
            &mut upstream_write,
            framing,
            &mut watch,
        )
        .await?;
        body_sent.store(true, Ordering::Relaxed);
        // The request is sent; from here the client's side only tells whether the client is
        // still there. Its end of stream — a close, or a half-close, which TCP cannot tell
        // apart — abandons the request unless a response has begun within ABANDON_GRACE
        // (Go's, nginx's and Envoy's servers give up at once; the grace keeps clients that
        // half-close and wait working with replicas that answer promptly). Bytes of a
        // pipelined request mean the client is there: they stay for after this response.
        let mut byte = [0u8; 1];
        if client_buf.is_empty() && matches!(client_read.peek(&mut byte).await, Ok(0) | Err(_)) {
            tokio::time::sleep(ABANDON_GRACE).await;
            if !response_started.load(Ordering::Relaxed) {
                return Err(Side::Gone);
            }
        }
        std::future::pending().await
    };
    let receive = async {
        let mut received = false;
        loop {
            let response_head = loop {
                if !upstream_buf.is_empty() {
                    response.clear();
                    match codec::parse_response(upstream_buf, head.head_method, close, response) {
                        Ok(Some(response_head)) => break response_head,
                        Ok(None) => {}
                        Err(error) => {
                            return Err(Received::Failed(Failure::Upstream(error.into()), false));
                        }
                    }
                }
                if received {
                    // Part of a head arrived and the rest may be held back.
                    ack_now(&upstream_read);
                }
                upstream_buf.reserve(READ_BUFFER / 2);
                match upstream_read.read_buf(upstream_buf).await {
                    Ok(0) => {
                        let error = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the replica closed the connection without responding",
                        );
                        return Err(Received::Failed(Failure::Upstream(error.into()), !received));
                    }
                    Ok(_) => received = true,
                    Err(error) => {
                        let stale = !received && is_reset(&error);
                        return Err(Received::Failed(Failure::Upstream(error.into()), stale));
                    }
                }
            };
            upstream_buf.advance(response_head.len);
            response_started.store(true, Ordering::Relaxed);
            let mut body = response_head.framing;
            let n = body
                .consume(upstream_buf)
                .map_err(|error| Received::Failed(Failure::Upstream(error.into()), false))?;
            response.extend_from_slice(&upstream_buf[..n]);
            upstream_buf.advance(n);
            if !response_head.interim {
                *responded = true;
            }
            client_write
                .write_all(response)
                .await
                .map_err(|_| Received::Broken(response_head.status))?;
            if response_head.interim {
                continue;
            }
            relay(
                &mut upstream_read,
                upstream_buf,
                &mut client_write,
                &mut body,
                ack_now,
            )
            .await
            .map_err(|_| Received::Broken(response_head.status))?;
            return Ok(response_head);
        }
    };
    tokio::pin!(send, receive);
    let mut sent: Option<Result<(), Side>> = None;
    let received = loop {
        tokio::select! {
            biased;
            result = &mut send, if sent.is_none() => {
                match result {
                    // The client stopped in the middle of its body, or broke its framing.
                    Err(Side::Source | Side::Malformed) => {
                        return Exchanged::Malformed(Refusal::BAD_BODY);
                    }
                    Err(Side::Slow) => return Exchanged::Malformed(Refusal::SlowBody(timeout)),
                    Err(Side::Gone) => return Exchanged::Abandoned,
                    _ => {}
                }
                sent = Some(result);
            }
            result = &mut receive => break result,
        }
    };
    match received {
        Ok(response_head) => {
            // A response before the whole request was sent leaves both connections in the
            // middle of a message.
            let complete = body_sent.load(Ordering::Relaxed) && !matches!(sent, Some(Err(_)));
            Exchanged::Done {
                status: response_head.status,
                keep_client: complete && !close && response_head.framing != Framing::UntilEof,
                keep_upstream: complete && !response_head.close,
            }
        }
        Err(Received::Failed(failure, stale)) => Exchanged::Failed { failure, stale },
        Err(Received::Broken(status)) => Exchanged::Broken { status },
    }
}

/// Which end of a relay failed.
enum Side {
    Source,
    Destination,
    /// The source paused longer than allowed.
    Slow,
    /// The source broke the body's framing.
    Malformed,
    /// The client left after its request, before the response.
    Gone,
}

enum Received {
    Failed(Failure, bool),
    Broken(u16),
}

/// Copies the rest of a body from `src` (after what `buf` holds) to `dst` until `framing` says
/// it ended; bytes after the end stay in `buf`. `before_read` runs before each read that
/// follows a short one (or starts the loop): see [`ack_now`].
async fn relay<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    framing: &mut Framing,
    before_read: impl Fn(&R),
) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut short = true;
    while !framing.is_done() {
        if buf.is_empty() {
            if short {
                before_read(src);
            }
            buf.reserve(READ_BUFFER);
            match src.read_buf(buf).await {
                Ok(0) if framing.end_of_stream() => return Ok(()),
                Ok(0) | Err(_) => return Err(Side::Source),
                Ok(n) => short = n < SHORT_READ,
            }
        }
        let n = framing.consume(buf).map_err(|_| Side::Malformed)?;
        dst.write_all(&buf[..n])
            .await
            .map_err(|_| Side::Destination)?;
        buf.advance(n);
    }
    Ok(())
}

/// The rest of a request body from the client to the replica (see [`BodyWatch`]). A read that
/// finds bytes waiting costs no timer; only one that has to wait arms the pause timeout and
/// marks the connection idle.
async fn relay_request<E: Future<Output = ()>>(
    src: &mut ReadHalf<'_>,
    buf: &mut BytesMut,
    dst: &mut WriteHalf<'_>,
    framing: &mut Framing,
    watch: &mut BodyWatch<'_, E>,
) -> Result<(), Side> {
    while !framing.is_done() {
        if buf.is_empty() {
            buf.reserve(READ_BUFFER);
            let read = match src.try_read_buf(buf) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    watch.state.idle();
                    let read = tokio::select! {
                        read = src.read_buf(buf) => read,
                        () = tokio::time::sleep(watch.timeout) => return Err(Side::Slow),
                        () = watch.evicted.as_mut() => return Err(Side::Source),
                    };
                    watch.state.busy();
                    read
                }
                read => read,
            };
            match read {
                Ok(0) | Err(_) => return Err(Side::Source),
                Ok(_) => {}
            }
        }
        let n = framing.consume(buf).map_err(|_| Side::Malformed)?;
        dst.write_all(&buf[..n])
            .await
            .map_err(|_| Side::Destination)?;
        buf.advance(n);
    }
    Ok(())
}

/// A read below this suggests the sender wrote a small piece and may be holding the next.
const SHORT_READ: usize = 4096;

/// Acknowledges what the replica sent so far at once. A replica that writes a response in
/// pieces with Nagle's algorithm on (Python's `http.server` writes the head, then the body)
/// holds the second piece until the first is acknowledged, and on a kept-alive connection
/// Linux delays that acknowledgement by up to 40 ms; this sends it now. Only called when a
/// response is incomplete after a short read, so whole responses cost nothing.
fn ack_now(upstream: &ReadHalf<'_>) {
    #[cfg(target_os = "linux")]
    let _ = upstream.as_ref().set_quickack(true);
    #[cfg(not(target_os = "linux"))]
    let _ = upstream;
}

fn is_reset(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY)
}

fn handover(stream: TcpStream, buf: BytesMut) -> Handover {
    Handover::Connection(Guarded::open(stream, buf))
}

fn one_request(stream: TcpStream, buf: BytesMut, close: bool, upgrade: bool) -> Handover {
    Handover::Request {
        stream,
        buf,
        close,
        upgrade,
    }
}

async fn write_answer(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    answer: &Answer,
    close: bool,
) -> io::Result<()> {
    out.clear();
    codec::write_answer(
        out,
        answer.status,
        &answer.headers,
        answer.body.as_bytes(),
        close,
    );
    stream.write_all(out).await
}

// === impl Answer ===

impl Answer {
    pub fn new(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into(),
            headers: vec![("content-type", "text/plain; charset=utf-8")],
        }
    }
}

impl From<&ProxyError> for Answer {
    fn from(error: &ProxyError) -> Self {
        Answer {
            status: error.status(),
            body: error.message(),
            headers: error.headers(),
        }
    }
}
