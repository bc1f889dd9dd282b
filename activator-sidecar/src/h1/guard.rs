//! A connection lent to the general server (hyper): for exactly one request, or whole (an
//! upgrade after its request, an HTTP/2 connection).
//!
//! Reads stop at the end of that request — its head, then its body as the rules framed it —
//! and a body that breaks its framing is a read error. So hyper never parses a byte the rules
//! did not check (a pipelined request behind this one, a chunk size the rules refuse), and the
//! connection comes back with every byte after the request still unread.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::codec::Framing;
use crate::limits::ConnState;
use crate::rules::Refusal;

/// Why a request's body broke, in [`Guarded::broken`].
const INTACT: u8 = 0;
const BAD_BODY: u8 = 1;
const SLOW_BODY: u8 = 2;

/// A client connection whose reads end with one request.
#[derive(Debug)]
pub struct Guarded {
    inner: TcpStream,
    /// Read from the socket, not yet given to the reader.
    pending: BytesMut,
    /// Bytes of the request head not yet given.
    head_left: usize,
    /// The rest of the body.
    body: Framing,
    /// Let reads pass unchecked once the request is complete (an upgrade's new protocol).
    then_open: bool,
    /// Set when the body broke its framing, the client stopped before its end, or paused
    /// too long.
    broken: Arc<AtomicU8>,
    /// The connection's place in the limit and the longest pause in the body.
    watch: Option<(Arc<ConnState>, Duration)>,
    pause: Option<Pin<Box<Sleep>>>,
    /// After the request: watches for the client leaving before the answer (see
    /// [`Guarded::watching_departure`]).
    departure: Option<Departure>,
}

/// The client's end of stream after its request, as on the fast path: unless the answer
/// (`answered`) came within [`super::ABANDON_GRACE`] of it, the reader gets end of stream too —
/// hyper then closes the connection and drops the request, and with it the replica's.
#[derive(Debug)]
struct Departure {
    answered: Arc<AtomicBool>,
    grace: Option<Pin<Box<Sleep>>>,
}

/// Socket reads of the general server's requests.
const READ_SIZE: usize = 8 * 1024;

// === impl Guarded ===

impl Guarded {
    /// `buf` starts with a request whose head is `head_len` bytes and whose body is framed by
    /// `body`.
    pub fn new(inner: TcpStream, buf: BytesMut, head_len: usize, body: Framing) -> Self {
        Self {
            inner,
            pending: buf,
            head_left: head_len,
            body,
            then_open: false,
            broken: Arc::default(),
            watch: None,
            pause: None,
            departure: None,
        }
    }

    /// Once the request is read, a client that closes (or half-closes) its connection and
    /// gets no answer — `answered` still false — within [`super::ABANDON_GRACE`] abandons the
    /// request: the reader sees end of stream.
    pub fn watching_departure(mut self, answered: Arc<AtomicBool>) -> Self {
        self.departure = Some(Departure {
            answered,
            grace: None,
        });
        self
    }

    /// Whether the client left (end of stream with no answer within the grace); `Pending`
    /// otherwise, woken when that may have changed.
    fn poll_departed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(departure) = &mut self.departure else {
            return Poll::Pending;
        };
        if departure.grace.is_none() {
            if !self.pending.is_empty() {
                // The client already sent more (a pipelined request): it is there.
                self.departure = None;
                return Poll::Pending;
            }
            let mut byte = [0u8; 1];
            let mut peek = ReadBuf::new(&mut byte);
            match self.inner.poll_peek(cx, &mut peek) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.departure = None;
                    return Poll::Pending;
                }
                Poll::Ready(_) => {
                    departure.grace = Some(Box::pin(tokio::time::sleep(super::ABANDON_GRACE)));
                }
            }
        }
        let Some(grace) = departure.grace.as_mut() else {
            return Poll::Pending;
        };
        if grace.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if departure.answered.load(Ordering::Acquire) {
            self.departure = None;
            return Poll::Pending;
        }
        Poll::Ready(())
    }

    /// While the body is awaited the connection counts as idle in `state`, may be told to
    /// close for room, and may pause at most `timeout` (as on the fast path).
    pub fn watched(mut self, state: Arc<ConnState>, timeout: Duration) -> Self {
        self.watch = Some((state, timeout));
        self
    }

    /// Set when the request's body broke its framing, ended early or paused too long: the
    /// answer to such a request is that refusal, whatever forwarding made of it. Read it with
    /// [`Guarded::refusal`].
    pub fn broken(&self) -> Arc<AtomicU8> {
        self.broken.clone()
    }

    /// The refusal a [`Guarded::broken`] flag stands for, if any.
    pub fn refusal(broken: &AtomicU8, timeout: Duration) -> Option<Refusal> {
        match broken.load(Ordering::Acquire) {
            INTACT => None,
            SLOW_BODY => Some(Refusal::SlowBody(timeout)),
            _ => Some(Refusal::BAD_BODY),
        }
    }

    /// A connection with `buf` already read from it put back in front, and nothing checked
    /// (an HTTP/2 connection, whose framing is hyper's).
    pub fn open(inner: TcpStream, buf: BytesMut) -> Self {
        Self::new(inner, buf, 0, Framing::Done).then_open()
    }

    /// After the request, bytes flow unchecked (for a protocol upgrade).
    pub fn then_open(mut self) -> Self {
        self.then_open = true;
        self
    }

    /// The socket and what was read from it past the request.
    pub fn into_parts(self) -> (TcpStream, BytesMut) {
        (self.inner, self.pending)
    }

    /// Whether the whole request was read: only then can the connection carry another (an
    /// answer given before the body was read leaves the rest of it on the connection, which
    /// must never be parsed as a request).
    pub fn complete(&self) -> bool {
        self.head_left == 0 && self.body.is_done()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.complete() && !this.then_open {
            // The general server is stopped once it has answered; until then its reads only
            // say whether the client left.
            return match this.poll_departed(cx) {
                Poll::Ready(()) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            };
        }
        if this.pending.is_empty() && this.then_open && this.complete() {
            // Unchecked from here: straight into the reader's buffer.
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.pending.is_empty() {
            if let Some((state, _)) = &this.watch
                && state.poll_evicted(cx.waker())
            {
                this.broken.store(BAD_BODY, Ordering::Release);
                return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
            }
            let mut chunk = [0u8; READ_SIZE];
            let mut read = ReadBuf::new(&mut chunk);
            if Pin::new(&mut this.inner)
                .poll_read(cx, &mut read)?
                .is_pending()
            {
                if let Some((state, timeout)) = &this.watch {
                    state.idle();
                    let pause = this
                        .pause
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(*timeout)));
                    if pause.as_mut().poll(cx).is_ready() {
                        this.broken.store(SLOW_BODY, Ordering::Release);
                        return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                    }
                }
                return Poll::Pending;
            }
            if let Some((state, _)) = &this.watch {
                state.busy();
                this.pause = None;
            }
            if read.filled().is_empty() {
                if !this.complete() {
                    this.broken.store(BAD_BODY, Ordering::Release);
                }
                return Poll::Ready(Ok(()));
            }
            this.pending.extend_from_slice(read.filled());
        }
        let room = buf.remaining().min(this.pending.len());
        let n = if this.complete() {
            room
        } else if this.head_left > 0 {
            let n = this.head_left.min(room);
            this.head_left -= n;
            n
        } else {
            this.body.consume(&this.pending[..room]).map_err(|error| {
                this.broken.store(BAD_BODY, Ordering::Release);
                io::Error::new(io::ErrorKind::InvalidData, error)
            })?
        };
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        if n == 0 {
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
