//! A connection lent to the general server (hyper): for exactly one request, or whole (an
//! upgrade after its request, an HTTP/2 connection).
//!
//! Reads stop at the end of that request — its head, then its body as the rules framed it —
//! and a body that breaks its framing is a read error. So hyper never parses a byte the rules
//! did not check (a pipelined request behind this one, a chunk size the rules refuse), and the
//! connection comes back with every byte after the request still unread.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::codec::Framing;

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
    /// Set when the body broke its framing or the client stopped before its end.
    broken: Arc<AtomicBool>,
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
        }
    }

    /// Turns true when the request's body broke its framing or ended early: the answer to such
    /// a request is a 400, whatever forwarding it made of it.
    pub fn broken(&self) -> Arc<AtomicBool> {
        self.broken.clone()
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
            // Never woken: the general server is stopped once it has answered.
            return Poll::Pending;
        }
        if this.pending.is_empty() && this.then_open && this.complete() {
            // Unchecked from here: straight into the reader's buffer.
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if this.pending.is_empty() {
            let mut chunk = [0u8; READ_SIZE];
            let mut read = ReadBuf::new(&mut chunk);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                if !this.complete() {
                    this.broken.store(true, Ordering::Release);
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
                this.broken.store(true, Ordering::Release);
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
