//! Relaying bytes both ways between two streams with half-close, idle
//! timeout and bounded buffers.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep, Instant};

/// Bytes held per direction. A reader that does not keep up leaves the
/// buffer full, so sluice stops reading the other side: back-pressure,
/// never more memory.
const BUFFER_SIZE: usize = 16 * 1024;

/// Which side of a relayed connection an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// Why a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides finished sending.
    Done,
    /// No byte moved in either direction for `idle_timeout`.
    Idle,
    /// A read or write on one side failed (often a reset).
    Error(Side, io::Error),
}

/// Bytes relayed so far on one connection, readable while the relay runs so
/// long connections can report progress. Local to the connection: never
/// contended.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Client → upstream.
    pub sent: AtomicU64,
    /// Upstream → client.
    pub received: AtomicU64,
}

#[derive(Debug)]
pub struct RelayOutcome {
    /// Client → upstream.
    pub sent: u64,
    /// Upstream → client.
    pub received: u64,
    pub end: RelayEnd,
}

/// One direction of the relay: reads into its buffer, writes it out, and
/// after the reader's end of stream shuts the writer's write half.
struct HalfDuplex {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    read_done: bool,
    need_flush: bool,
}

pub(super) enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

impl HalfDuplex {
    fn new() -> Self {
        HalfDuplex {
            buf: vec![0; BUFFER_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            read_done: false,
            need_flush: false,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        bytes: &AtomicU64,
        progressed: &mut bool,
    ) -> Poll<Result<(), CopyError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.start == self.end && !self.read_done {
                let mut read_buf = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut read_buf) {
                    Poll::Ready(Ok(())) => {
                        let filled = read_buf.filled().len();
                        if filled == 0 {
                            self.read_done = true;
                        } else {
                            self.start = 0;
                            self.end = filled;
                            *progressed = true;
                        }
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(CopyError::Read(err))),
                    Poll::Pending => {
                        // Streams that buffer internally (TLS) must not sit on
                        // written bytes while we wait for more input.
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx)).map_err(CopyError::Write)?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.start < self.end {
                let written = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.start..self.end]))
                .map_err(CopyError::Write)?;
                if written == 0 {
                    return Poll::Ready(Err(CopyError::Write(io::ErrorKind::WriteZero.into())));
                }
                self.start += written;
                bytes.fetch_add(written as u64, Ordering::Relaxed);
                self.need_flush = true;
                *progressed = true;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx)).map_err(CopyError::Write)?;
                ready!(writer.as_mut().poll_shutdown(cx)).map_err(CopyError::Write)?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Relays until both directions have finished, one side fails, or nothing
/// moves for `idle_timeout`, counting the bytes written each way in `traffic`.
pub async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle_timeout: Option<Duration>,
    traffic: &Traffic,
) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut to_upstream = HalfDuplex::new();
    let mut to_client = HalfDuplex::new();
    let end = drive(idle_timeout, |cx, direction, progressed| match direction {
        Direction::ToUpstream => to_upstream.poll_copy(
            cx,
            Pin::new(&mut *client),
            Pin::new(&mut *upstream),
            &traffic.sent,
            progressed,
        ),
        Direction::ToClient => to_client.poll_copy(
            cx,
            Pin::new(&mut *upstream),
            Pin::new(&mut *client),
            &traffic.received,
            progressed,
        ),
    })
    .await;
    RelayOutcome {
        sent: traffic.sent.load(Ordering::Relaxed),
        received: traffic.received.load(Ordering::Relaxed),
        end,
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Direction {
    ToUpstream,
    ToClient,
}

/// Polls both directions until both are done, one fails, or nothing moves
/// for `idle_timeout`. A direction reports whether it moved a byte through
/// its `progressed` flag.
pub(super) async fn drive<P>(idle_timeout: Option<Duration>, mut poll_direction: P) -> RelayEnd
where
    P: FnMut(&mut Context<'_>, Direction, &mut bool) -> Poll<Result<(), CopyError>>,
{
    let mut upstream_done = false;
    let mut client_done = false;
    let mut idle_timer = idle_timeout.map(|timeout| (timeout, Box::pin(sleep(timeout))));
    let mut last_progress = Instant::now();

    poll_fn(|cx| {
        let mut progressed = false;
        if !upstream_done {
            match poll_direction(cx, Direction::ToUpstream, &mut progressed) {
                Poll::Ready(Ok(())) => upstream_done = true,
                Poll::Ready(Err(CopyError::Read(err))) => {
                    return Poll::Ready(RelayEnd::Error(Side::Client, err))
                }
                Poll::Ready(Err(CopyError::Write(err))) => {
                    return Poll::Ready(RelayEnd::Error(Side::Upstream, err))
                }
                Poll::Pending => {}
            }
        }
        if !client_done {
            match poll_direction(cx, Direction::ToClient, &mut progressed) {
                Poll::Ready(Ok(())) => client_done = true,
                Poll::Ready(Err(CopyError::Read(err))) => {
                    return Poll::Ready(RelayEnd::Error(Side::Upstream, err))
                }
                Poll::Ready(Err(CopyError::Write(err))) => {
                    return Poll::Ready(RelayEnd::Error(Side::Client, err))
                }
                Poll::Pending => {}
            }
        }
        if upstream_done && client_done {
            return Poll::Ready(RelayEnd::Done);
        }
        if let Some((timeout, timer)) = idle_timer.as_mut() {
            if progressed {
                last_progress = Instant::now();
            }
            // The timer is re-armed only when it fires, not on every byte.
            while timer.as_mut().poll(cx).is_ready() {
                let deadline = last_progress + *timeout;
                if Instant::now() >= deadline {
                    return Poll::Ready(RelayEnd::Idle);
                }
                timer.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    })
    .await
}
