//! One type for every kind of byte stream sluice relays, so the relay and the
//! connect logic are written once.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::tls::read_ahead::ReadAhead;

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// TLS originated by sluice towards a peer, over TCP or UNIX. Boxed: a
    /// TLS session is large and the enum nests.
    TlsToPeer(Box<tokio_rustls::client::TlsStream<ReadAhead<Stream>>>),
    /// TLS terminated by sluice for a client of a listener.
    TlsFromClient(Box<tokio_rustls::server::TlsStream<ReadAhead<Stream>>>),
}

macro_rules! delegate {
    ($self:ident, $stream:ident => $call:expr) => {
        match $self.get_mut() {
            Stream::Tcp($stream) => $call,
            Stream::Unix($stream) => $call,
            Stream::TlsToPeer($stream) => $call,
            Stream::TlsFromClient($stream) => $call,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, stream => Pin::new(stream).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, stream => Pin::new(stream).poll_write(cx, buf))
    }

    // A TLS session hands its transport every record it has ready at once.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, stream => Pin::new(stream).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(stream) => stream.is_write_vectored(),
            Stream::Unix(stream) => stream.is_write_vectored(),
            Stream::TlsToPeer(stream) => stream.is_write_vectored(),
            Stream::TlsFromClient(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, stream => Pin::new(stream).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, stream => Pin::new(stream).poll_shutdown(cx))
    }
}

/// The two streams of a connection, as the relay will move bytes between
/// them: as plain sockets when neither has a TLS layer, the bytes may then
/// bypass user space; as streams otherwise.
pub enum StreamPair<'a> {
    Plain(PlainSocket<'a>, PlainSocket<'a>),
    Layered(&'a mut Stream, &'a mut Stream),
}

impl<'a> StreamPair<'a> {
    pub fn of(client: &'a mut Stream, upstream: &'a mut Stream) -> StreamPair<'a> {
        // The pair is taken apart by moving both references in, so either
        // way the caller gets them back for the relay's whole life.
        match (client, upstream) {
            (Stream::Tcp(client), Stream::Tcp(upstream)) => {
                StreamPair::Plain(PlainSocket::Tcp(client), PlainSocket::Tcp(upstream))
            }
            (Stream::Tcp(client), Stream::Unix(upstream)) => {
                StreamPair::Plain(PlainSocket::Tcp(client), PlainSocket::Unix(upstream))
            }
            (Stream::Unix(client), Stream::Tcp(upstream)) => {
                StreamPair::Plain(PlainSocket::Unix(client), PlainSocket::Tcp(upstream))
            }
            (Stream::Unix(client), Stream::Unix(upstream)) => {
                StreamPair::Plain(PlainSocket::Unix(client), PlainSocket::Unix(upstream))
            }
            (client, upstream) => StreamPair::Layered(client, upstream),
        }
    }
}

impl Stream {
    /// Whether the other end has sent bytes not read yet, asked of the
    /// kernel: the runtime's readiness may not show them yet.
    pub fn has_unread_input(&self) -> bool {
        let read_ahead = match self {
            Stream::Tcp(stream) => return PlainSocket::Tcp(stream).has_unread_input(),
            Stream::Unix(stream) => return PlainSocket::Unix(stream).has_unread_input(),
            Stream::TlsToPeer(tls) => tls.get_ref().0,
            Stream::TlsFromClient(tls) => tls.get_ref().0,
        };
        read_ahead.holds_bytes() || read_ahead.get_ref().has_unread_input()
    }
}

/// A borrowed plaintext socket, driven by readiness rather than by reads
/// into a buffer.
#[derive(Clone, Copy)]
pub enum PlainSocket<'a> {
    Tcp(&'a TcpStream),
    Unix(&'a UnixStream),
}

impl PlainSocket<'_> {
    pub fn poll_ready(&self, cx: &mut Context<'_>, interest: Interest) -> Poll<io::Result<()>> {
        match (self, interest.is_readable()) {
            (PlainSocket::Tcp(stream), true) => stream.poll_read_ready(cx),
            (PlainSocket::Tcp(stream), false) => stream.poll_write_ready(cx),
            (PlainSocket::Unix(stream), true) => stream.poll_read_ready(cx),
            (PlainSocket::Unix(stream), false) => stream.poll_write_ready(cx),
        }
    }

    /// Whether the peer has finished sending: its FIN (or a reset) has
    /// arrived, so a read after the queued bytes ends the stream at once.
    /// Asked while the socket is ready to read (right after a read), it
    /// returns at once, without waiting or a system call: it reads the
    /// closed bit of the runtime's readiness that `poll_read_ready` hides.
    pub fn peer_finished(&self, cx: &mut Context<'_>) -> bool {
        let readiness = match self {
            PlainSocket::Tcp(stream) => pin!(stream.ready(Interest::READABLE)).poll(cx),
            PlainSocket::Unix(stream) => pin!(stream.ready(Interest::READABLE)).poll(cx),
        };
        matches!(readiness, Poll::Ready(Ok(ready)) if ready.is_read_closed())
    }

    /// Whether a send may hold a short tail back for the FIN that follows
    /// it (TCP's MSG_MORE; a UNIX socket has no segments to merge).
    pub fn merges_fin(&self) -> bool {
        matches!(self, PlainSocket::Tcp(_))
    }

    /// Runs a non-blocking operation on the socket; a `WouldBlock` from it
    /// clears the readiness so the next `poll_ready` waits for the OS.
    pub fn try_io<R>(
        &self,
        interest: Interest,
        operation: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        match self {
            PlainSocket::Tcp(stream) => stream.try_io(interest, operation),
            PlainSocket::Unix(stream) => stream.try_io(interest, operation),
        }
    }

    pub fn shutdown_write(&self) -> io::Result<()> {
        self.socket().shutdown(Shutdown::Write)
    }

    /// Whether the peer has sent bytes not read yet: a `MSG_PEEK` of one
    /// byte, which neither consumes it nor waits.
    pub fn has_unread_input(&self) -> bool {
        let mut byte = [std::mem::MaybeUninit::uninit()];
        matches!(self.socket().peek(&mut byte), Ok(1))
    }

    fn socket(&self) -> SockRef<'_> {
        match self {
            PlainSocket::Tcp(stream) => SockRef::from(*stream),
            PlainSocket::Unix(stream) => SockRef::from(*stream),
        }
    }
}

impl AsRawFd for PlainSocket<'_> {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            PlainSocket::Tcp(stream) => stream.as_raw_fd(),
            PlainSocket::Unix(stream) => stream.as_raw_fd(),
        }
    }
}
