//! Requests a role answers itself once it has their whole body (the broker ingress), served
//! on the fast path without hyper: the head parsed into [`http::request::Parts`], the body
//! read from the connection into the listener's [`BodyBudget`] as it arrives, the role's
//! answer written back, and the connection kept for the next request.
//!
//! Only bodies framed by `Content-Length` (or none) without `Expect: 100-continue` come here;
//! the role's `dispatch` says [`super::Decision::Whole`], its [`super::Role::before_body`]
//! says how much may be read (or answers at once), and its [`super::Role::answer_whole`]
//! answers with the body or with why there is none — the same function the role's hyper
//! path calls after [`BodyBudget::collect`], so both paths answer alike. The limits are
//! those of the hyper path: the role's maximum (413 before reading a declared length above
//! it), the budget (503 with `Retry-After`), the budget's body timeout (408), and the
//! listener's pause timeout, during which the connection counts as idle for the connection
//! limit (`BodyWatch`, as when a body is relayed). Budget taken is given back as soon as the
//! request is done, whatever its end: the [`mecha_common::budget::Buffered`] body or the
//! [`mecha_common::budget::Collecting`] one holds it and is dropped with it.
//!
//! Once the body is whole the role's answer is awaited to its end: a client that leaves then
//! does not abandon it (hyper's path drops a handler whose client left after a grace), so
//! events whose body arrived are stored whether or not anyone reads the 202.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Response, StatusCode, header};
use http_body::Body as _;
use http_body_util::Full;
use mecha_common::ShutdownSignal;
use mecha_common::budget::{BodyBudget, BodyError, Collecting};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::codec::{self, Framing, RequestHead};
use super::{BodyWatch, READ_BUFFER, Role};
use crate::error::ProxyError;
use crate::rules::Refusal;

/// What a role says about a request it answers itself, before its body is read.
#[derive(Debug)]
pub enum Whole<'a> {
    /// Read the body, at most `max` bytes, within `budget`; then
    /// [`super::Role::answer_whole`].
    Read { budget: &'a BodyBudget, max: usize },
    /// The answer, without reading the body (a wrong path, an unknown broker).
    Answer(Response<Full<Bytes>>),
    /// The general server (hyper) answers it, as for [`super::Decision::Fallback`].
    Fallback,
}

/// How a request answered here left the connection.
pub(super) enum Served {
    /// Answered; the next request may follow.
    Next,
    /// Answered (or there was no one to answer); the connection closes.
    Close,
    /// Not for this path: nothing of the request was consumed, hyper answers it.
    Fallback,
}

/// How reading the body ended.
enum Read {
    Whole(mecha_common::budget::Buffered),
    /// Refused by the budget's rules (too large, no budget, too slow overall).
    Refused(BodyError),
    /// The client paused longer than the pause timeout.
    Paused,
    /// The client closed, the connection failed, or it was closed for room mid-body.
    Gone,
}

/// Serves the request whose head is `head` (at the start of `buf`) if it is one for this
/// path; see the module's documentation. `close`: the connection ends after it.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve<D: Role, E: Future<Output = ()>>(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    head: &RequestHead,
    close: bool,
    out: &mut Vec<u8>,
    role: &D,
    peer: SocketAddr,
    watch: BodyWatch<'_, E>,
    shutdown: &ShutdownSignal,
) -> Served {
    // Bodies whose framing or pacing hyper handles (chunked, 100-continue): hyper's.
    if head.expect_continue || !matches!(head.framing, Framing::Length(_) | Framing::Done) {
        return Served::Fallback;
    }
    // The head, taken off the buffer without a copy: the parts' target and field values are
    // slices of it (as hyper's are of its read buffer), and the buffer is whole again for the
    // next request once they are dropped.
    let head_bytes = buf.split_to(head.len).freeze();
    let Some(parts) = codec::request_parts(&head_bytes) else {
        put_back(buf, &head_bytes);
        return Served::Fallback;
    };
    let head_method = parts.method == Method::HEAD;
    let (budget, max) = match role.before_body(&parts) {
        Whole::Fallback => {
            put_back(buf, &head_bytes);
            return Served::Fallback;
        }
        Whole::Answer(response) => {
            // A request whose body was not read cannot be followed by another.
            let keep = !close && head.framing.is_done() && !shutdown.is_triggered();
            drop(parts);
            return respond(client, out, response, head_method, keep).await;
        }
        Whole::Read { budget, max } => (budget, max),
    };
    let declared = usize::try_from(head.content_length).unwrap_or(usize::MAX);
    let pause = watch.timeout;
    let read = match budget.start(Some(declared), max) {
        // Declared too large: refused before a byte of it is read.
        Err(error) => Read::Refused(error),
        Ok(collecting) => read_body(client, buf, collecting, declared, watch).await,
    };
    let (body, refusal) = match read {
        Read::Whole(body) => (Ok(body), None),
        Read::Refused(error) => (Err(error), None),
        // As on the hyper path, the role is told the body broke off (its refusal is counted)
        // and the answer is the connection's refusal.
        Read::Paused => (
            Err(broke_off("the client paused past the pause timeout")),
            Some(Refusal::SlowBody(pause)),
        ),
        Read::Gone => (
            Err(broke_off("the connection ended before the body")),
            Some(Refusal::BAD_BODY),
        ),
    };
    let complete = body.is_ok();
    let response = role.answer_whole(parts, body, peer).await;
    if let Some(refusal) = refusal {
        let answer = super::Answer::from(&ProxyError::Refused(refusal));
        let _ = super::write_answer(client, out, &answer, true).await;
        return Served::Close;
    }
    let keep = complete && !close && !shutdown.is_triggered();
    respond(client, out, response, head_method, keep).await
}

/// Reads the rest of a `declared`-byte body (after what `buf` holds) into `collecting`; bytes
/// after it stay in `buf`. A read that finds bytes waiting costs no timer; one that has to
/// wait marks the connection idle and is bounded by the pause timeout and the body's deadline.
async fn read_body<E: Future<Output = ()>>(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    mut collecting: Collecting,
    declared: usize,
    mut watch: BodyWatch<'_, E>,
) -> Read {
    let mut remaining = declared;
    while remaining > 0 {
        if buf.is_empty() {
            buf.reserve(READ_BUFFER.min(remaining));
            let read = match client.try_read_buf(buf) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    watch.state.idle();
                    let read = tokio::select! {
                        read = client.read_buf(buf) => read,
                        () = tokio::time::sleep(watch.timeout) => return Read::Paused,
                        () = tokio::time::sleep_until(collecting.deadline()) => {
                            return Read::Refused(collecting.timed_out());
                        }
                        () = watch.evicted.as_mut() => return Read::Gone,
                    };
                    watch.state.busy();
                    read
                }
                read => read,
            };
            if !matches!(read, Ok(n) if n > 0) {
                return Read::Gone;
            }
        }
        let n = buf.len().min(remaining);
        if let Err(error) = collecting.push(&buf[..n]) {
            return Read::Refused(error);
        }
        buf.advance(n);
        remaining -= n;
    }
    Read::Whole(collecting.finish())
}

/// Puts a head taken off `buf` back in front of what follows it, for hyper to read.
fn put_back(buf: &mut BytesMut, head: &Bytes) {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len() + READ_BUFFER);
    whole.extend_from_slice(head);
    whole.extend_from_slice(buf);
    *buf = whole;
}

fn broke_off(why: &'static str) -> BodyError {
    BodyError::Read(why.into())
}

/// Writes `response` as hyper writes it on the general path (its headers in order, then
/// `content-length` and `date` unless it has them), with `connection: close` when the
/// connection ends after it.
async fn respond(
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    response: Response<Full<Bytes>>,
    head_method: bool,
    keep: bool,
) -> Served {
    out.clear();
    encode(out, response, head_method, !keep);
    match client.write_all(out).await {
        Ok(()) if keep => Served::Next,
        _ => Served::Close,
    }
}

/// A response, serialized; `head_method`: the request was `HEAD` (no body is written).
pub fn encode(out: &mut Vec<u8>, response: Response<Full<Bytes>>, head_method: bool, close: bool) {
    let (parts, body) = response.into_parts();
    let body = whole(body);
    let status = parts.status;
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // Neither length nor body for 1xx, 204 and 304 (RFC 9110 §8.6); HEAD says the length of
    // the body it does not get.
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // (hyper says no length for an empty answer to HEAD: it cannot tell it from none.)
    let empty_head = head_method && body.is_empty();
    if !bodiless && !empty_head && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        DATE.with(|date| out.extend_from_slice(date.borrow_mut().now()));
        out.extend_from_slice(b"\r\n");
    }
    if close && !parts.headers.contains_key(header::CONNECTION) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !bodiless && !head_method {
        out.extend_from_slice(&body);
    }
}

/// The bytes of a [`Full`] body, which has them at once.
fn whole(body: Full<Bytes>) -> Bytes {
    let mut body = pin!(body);
    match body
        .as_mut()
        .poll_frame(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

/// `date`, formatted once a second per thread (as hyper does).
struct Date {
    second: u64,
    text: Vec<u8>,
}

thread_local! {
    static DATE: RefCell<Date> = const { RefCell::new(Date { second: u64::MAX, text: Vec::new() }) };
}

impl Date {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second {
            self.second = second;
            self.text = httpdate::fmt_http_date(now).into_bytes();
        }
        &self.text
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::convert::Infallible;

    use http::HeaderValue;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn response(
        status: StatusCode,
        body: &'static str,
        headers: &[(&'static str, &'static str)],
    ) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *response.status_mut() = status;
        for (name, value) in headers {
            response
                .headers_mut()
                .append(*name, HeaderValue::from_static(value));
        }
        response
    }

    type Make = fn() -> Response<Full<Bytes>>;

    /// What hyper's server writes for `make()` in answer to `request`, through a real hyper
    /// connection.
    async fn hyper_writes(request: &'static str, make: Make) -> String {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(async move {
            let service = service_fn(move |_request| async move { Ok::<_, Infallible>(make()) });
            let _ = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(TokioIo::new(server), service)
                .await;
        });
        client.write_all(request.as_bytes()).await.unwrap();
        client.shutdown().await.unwrap();
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        serving.await.unwrap();
        String::from_utf8(out).unwrap()
    }

    fn without_date(text: &str) -> String {
        text.split("\r\n")
            .filter(|line| !line.starts_with("date: "))
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    #[tokio::test]
    async fn answers_are_written_as_hyper_writes_them() {
        let cases: [(&'static str, Make); 6] = [
            ("POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n", || {
                response(StatusCode::ACCEPTED, "", &[])
            }),
            ("GET / HTTP/1.1\r\n\r\n", || {
                response(StatusCode::OK, "hello\n", &[])
            }),
            ("PUT /a/b HTTP/1.1\r\n\r\n", || {
                response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "PUT is not allowed: post events\n",
                    &[
                        ("content-type", "text/plain; charset=utf-8"),
                        ("allow", "POST, OPTIONS"),
                    ],
                )
            }),
            ("HEAD /a/b HTTP/1.1\r\n\r\n", || {
                response(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "not allowed\n",
                    &[("allow", "POST")],
                )
            }),
            ("HEAD /a/b HTTP/1.1\r\n\r\n", || {
                response(StatusCode::OK, "", &[])
            }),
            ("DELETE / HTTP/1.1\r\n\r\n", || {
                response(StatusCode::NO_CONTENT, "", &[("x-a", "1"), ("x-a", "2")])
            }),
        ];
        for (request, make) in cases {
            let head_method = request.starts_with("HEAD");
            let mut ours = Vec::new();
            encode(&mut ours, make(), head_method, false);
            let ours = String::from_utf8(ours).unwrap();
            let theirs = hyper_writes(request, make).await;
            assert!(ours.contains("\r\ndate: "), "{ours}");
            assert_eq!(without_date(&ours), without_date(&theirs), "{request}");
        }
    }

    #[test]
    fn a_closing_answer_says_so() {
        let mut out = Vec::new();
        encode(
            &mut out,
            response(StatusCode::PAYLOAD_TOO_LARGE, "too large\n", &[]),
            false,
            true,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 413 Payload Too Large\r\ncontent-length: 10\r\ndate: "),
            "{text}"
        );
        assert!(
            text.ends_with("\r\nconnection: close\r\n\r\ntoo large\n"),
            "{text}"
        );
    }
}
