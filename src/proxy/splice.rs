//! The relay for plaintext socket pairs on Linux. Bulk data is spliced
//! socket → pipe → socket inside the kernel, never passing through user
//! memory; small messages are copied through a buffer, which costs the same
//! two system calls without a pipe. Buffers and pipes come from per-thread
//! pools only while bytes are in flight and go back once drained: an idle
//! connection holds neither.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::Interest;

use super::buffers::{give_back_buffer, take_buffer, Seed, BUFFER_SIZE};
use super::recycle::Watch;
use super::relay::{drive, CopyError, Direction, RelayOutcome};
use crate::net::stream::PlainSocket;

/// Bytes asked for per splice from a socket; the kernel moves at most what
/// the pipe holds, which bounds memory per direction.
const SPLICE_CHUNK: usize = 1 << 20;

/// What each pipe is asked to hold instead of the kernel's 64 KiB: four times
/// fewer system calls and wake-ups per byte of a bulk transfer (one stream
/// went from 59% to 72% of the direct rate, docs/BENCHMARKS.md). Page
/// references are held only while bytes are in the pipe.
const PIPE_CAPACITY: libc::c_int = 256 * 1024;

/// Linux counts pipe capacity per unprivileged user (fs.pipe-user-pages-soft,
/// 64 MiB by default); past it every new pipe of that user, in any process,
/// gets less than the default (pipe(7)). Pipes beyond this many keep the
/// default size, so sluice's larger pipes use at most 32 MiB of the budget.
const MAX_LARGE_PIPES: usize = 128;

/// Pipes of PIPE_CAPACITY open in the process, pooled ones included.
static LARGE_PIPES: AtomicUsize = AtomicUsize::new(0);

/// Empty pipes kept per worker thread for the next connection with data.
const POOL_PER_THREAD: usize = 64;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Counted in LARGE_PIPES until dropped.
    large: bool,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if self.large {
            LARGE_PIPES.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(pipe) = POOL.with(|pool| pool.borrow_mut().pop()) {
            return Ok(pipe);
        }
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: `write` is an open pipe descriptor; F_SETPIPE_SZ takes an int.
        // A refusal (the per-user limit) leaves a working pipe of the default size.
        let large = LARGE_PIPES.fetch_add(1, Ordering::Relaxed) < MAX_LARGE_PIPES
            && unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_CAPACITY) } >= 0;
        if !large {
            LARGE_PIPES.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(Pipe { read, write, large })
    }

    /// Only an empty pipe may go back: the next user must not see old bytes.
    fn give_back(self) {
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_PER_THREAD {
                pool.push(self);
            }
        });
    }
}

/// The relay's reads, writes and splices enter the kernel through
/// `syscall(2)`, not glibc's wrappers: those are thread-cancellation points,
/// which cost two calls into libc around every system call (3.4% of
/// sluice's user space per keep-alive request, docs/BENCHMARKS.md), and no
/// thread of sluice is ever cancelled. Every argument is passed as a full
/// register (`c_long` or a pointer), as `syscall` reads them.
fn syscall_result(returned: libc::c_long) -> io::Result<usize> {
    usize::try_from(returned).map_err(|_| io::Error::last_os_error())
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null
    // offsets mean "current position", as required for pipes and sockets.
    syscall_result(unsafe {
        libc::syscall(
            libc::SYS_splice,
            libc::c_long::from(from),
            ptr::null_mut::<libc::loff_t>(),
            libc::c_long::from(to),
            ptr::null_mut::<libc::loff_t>(),
            len,
            libc::c_long::from(libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK),
        )
    })
}

/// The fewest bytes spliced at once. A `forward` watch lets the relay splice
/// only the rest of a payload it skips; a shorter rest is copied with the
/// framing after it, one read instead of a splice and a read.
const MIN_SPLICE: u64 = BUFFER_SIZE as u64;

/// Short reads of a direction after which it no longer asks whether the
/// peer finished sending. The FIN that can ride with the last bytes matters
/// to short connections, which end within a few reads; asking costs a lock
/// in the runtime, which a long-lived connection would pay on every read.
const PEER_FINISHED_READS: u8 = 8;

/// What a `forward` direction reads after a splice, beyond the short rest of
/// the payload: enough for the framing between two payloads (the rest of a
/// message, the next one's tag and entries header), so the next payload is
/// spliced nearly whole instead of its first 16 KiB being copied.
const FRAMING_READ: usize = 1024;

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length; `fd` is open; null
    // source address and length, as recv(2) passes them.
    syscall_result(unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            libc::c_long::from(fd),
            buf.as_mut_ptr(),
            buf.len(),
            0 as libc::c_long,
            ptr::null_mut::<libc::sockaddr>(),
            ptr::null_mut::<libc::socklen_t>(),
        )
    })
}

/// `fin_follows`: these are the last bytes and the FIN comes right after
/// them, so a short tail may wait for it and leave in the same segment.
fn send(fd: RawFd, buf: &[u8], fin_follows: bool) -> io::Result<usize> {
    let flags = if fin_follows {
        libc::MSG_NOSIGNAL | libc::MSG_MORE
    } else {
        libc::MSG_NOSIGNAL
    };
    // SAFETY: `buf` is valid for reads of its length; `fd` is open; no
    // destination, as send(2) passes it.
    syscall_result(unsafe {
        libc::syscall(
            libc::SYS_sendto,
            libc::c_long::from(fd),
            buf.as_ptr(),
            buf.len(),
            libc::c_long::from(flags),
            ptr::null::<libc::sockaddr>(),
            0 as libc::c_long,
        )
    })
}

/// One direction: small messages are copied through a buffer (one read and
/// one write each); once a read fills the buffer the direction carries bulk
/// data and splices socket → pipe → socket from then on. The buffer or pipe
/// is held only while bytes are in flight. After the reader's end of stream
/// the writer's write half is shut down, unless the close that ends the
/// relay sends the same FIN.
#[derive(Default)]
struct PlainHalf {
    buffer: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    pipe: Option<Pipe>,
    in_pipe: usize,
    bulk: bool,
    /// The last read was a splice that ended at the watch's unseen run.
    after_splice: bool,
    read_done: bool,
    /// Reads that emptied the socket's queue so far, up to u8::MAX.
    short_reads: u8,
    /// A read error met while reading ahead for the end of stream, due once
    /// the bytes read before it are written.
    read_error: Option<io::Error>,
    /// Recycling: the client's side is shut; bytes read are dropped.
    discarding: bool,
}

impl PlainHalf {
    #[allow(clippy::too_many_arguments)]
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        from: PlainSocket<'_>,
        to: PlainSocket<'_>,
        bytes: &mut u64,
        progressed: &mut bool,
        direction: Direction,
        mut watch: Option<&mut Watch>,
        to_finished_sending: bool,
    ) -> Poll<Result<(), CopyError>> {
        if direction == Direction::ToClient
            && !self.discarding
            && watch.as_ref().is_some_and(|watch| watch.closing.is_some())
        {
            // The recycle's FIN to the client; what the upstream still
            // sends is read into the buffer and dropped.
            to.shutdown_write().map_err(CopyError::Write)?;
            self.discarding = true;
            self.bulk = false;
            self.start = self.end;
            // A pipe with bytes in it must not go back to the pool.
            if self.in_pipe > 0 {
                self.pipe = None;
                self.in_pipe = 0;
            }
            if let Some(watch) = watch.as_deref_mut() {
                watch.dropped(direction);
            }
        }
        loop {
            if self.start == self.end && self.in_pipe == 0 && !self.read_done {
                if let Some(err) = self.read_error.take() {
                    return Poll::Ready(Err(CopyError::Read(err)));
                }
                ready!(from.poll_ready(cx, Interest::READABLE)).map_err(CopyError::Read)?;
                // Bulk data is spliced as far as the watch need not see it:
                // all of it when opaque, a skipped payload's rest for forward.
                let unseen = match watch.as_deref() {
                    Some(watch) if self.bulk => watch.unseen_run(direction),
                    Some(_) => 0,
                    None if self.bulk => u64::MAX,
                    None => 0,
                };
                let spliced = unseen >= MIN_SPLICE;
                let moved = if spliced {
                    let len = usize::try_from(unseen).map_or(SPLICE_CHUNK, |n| n.min(SPLICE_CHUNK));
                    self.after_splice = true;
                    self.splice_in(from, len)
                } else if std::mem::take(&mut self.after_splice) {
                    // The short rest of the payload, and the framing after it.
                    let rest = usize::try_from(unseen).unwrap_or(BUFFER_SIZE);
                    let limit = rest.saturating_add(FRAMING_READ).min(BUFFER_SIZE);
                    self.read_in(cx, from, limit)
                } else {
                    self.read_in(cx, from, BUFFER_SIZE)
                };
                match moved {
                    Ok(Some(0)) => self.read_done = true,
                    Ok(Some(_)) if self.discarding => {
                        self.start = self.end;
                        self.bulk = false;
                        *progressed = true;
                    }
                    Ok(Some(read)) => {
                        *progressed = true;
                        match (watch.as_deref_mut(), &self.buffer) {
                            (Some(watch), _) if spliced => watch.passed_unseen(direction, read),
                            (Some(watch), Some(buffer)) => {
                                watch.read(direction, &buffer[self.start..self.end]);
                            }
                            _ => {}
                        }
                    }
                    Ok(None) => {}
                    Err(err) => return Poll::Ready(Err(CopyError::Read(err))),
                }
            }
            while self.start < self.end {
                ready!(to.poll_ready(cx, Interest::WRITABLE)).map_err(CopyError::Write)?;
                let Some(buffer) = self.buffer.as_ref() else {
                    break;
                };
                let pending = &buffer[self.start..self.end];
                let fin_follows = self.read_done && to.merges_fin();
                match to.try_io(Interest::WRITABLE, || {
                    send(to.as_raw_fd(), pending, fin_follows)
                }) {
                    Ok(0) => {
                        return Poll::Ready(Err(CopyError::Write(io::ErrorKind::WriteZero.into())))
                    }
                    Ok(sent) => {
                        self.start += sent;
                        *bytes += sent as u64;
                        *progressed = true;
                        if let Some(watch) = watch.as_deref_mut() {
                            watch.wrote(direction, sent);
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Poll::Ready(Err(CopyError::Write(err))),
                }
            }
            while self.in_pipe > 0 {
                ready!(to.poll_ready(cx, Interest::WRITABLE)).map_err(CopyError::Write)?;
                let Some(pipe) = self.pipe.as_ref() else {
                    break;
                };
                let pipe_out = pipe.read.as_raw_fd();
                match to.try_io(Interest::WRITABLE, || {
                    splice(pipe_out, to.as_raw_fd(), self.in_pipe)
                }) {
                    Ok(0) => {
                        return Poll::Ready(Err(CopyError::Write(io::ErrorKind::WriteZero.into())))
                    }
                    Ok(moved) => {
                        self.in_pipe -= moved;
                        *bytes += moved as u64;
                        *progressed = true;
                        if let Some(watch) = watch.as_deref_mut() {
                            watch.wrote(direction, moved);
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Poll::Ready(Err(CopyError::Write(err))),
                }
            }
            // Drained: an idle connection keeps neither buffer nor pipe.
            if let Some(buffer) = self.buffer.take() {
                give_back_buffer(buffer);
            }
            if let Some(pipe) = self.pipe.take() {
                pipe.give_back();
            }
            if self.read_done && self.discarding {
                return Poll::Ready(Ok(()));
            }
            if self.read_done {
                // When `to` already sent its FIN and everything before it was
                // read, this direction finishing ends the relay and the close
                // that follows sends the FIN: a shutdown first is one system
                // call more for the same packets. Unread bytes would turn
                // that close into a reset, so only end of stream counts.
                if !to_finished_sending {
                    to.shutdown_write().map_err(CopyError::Write)?;
                }
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Reads into the buffer: `Some(0)` at end of stream, `None` when the
    /// readiness was stale. When the peer has finished sending, a short
    /// read is followed at once by the read of its end of stream, so that
    /// the bytes and the FIN can leave together (one segment, not two);
    /// asked in the first PEER_FINISHED_READS reads only.
    fn read_in(
        &mut self,
        cx: &mut Context<'_>,
        from: PlainSocket<'_>,
        limit: usize,
    ) -> io::Result<Option<usize>> {
        let buffer = &mut self.buffer.get_or_insert_with(take_buffer)[..limit];
        let short_reads = &mut self.short_reads;
        let mut short_read = None;
        let mut after = None;
        let result = from.try_io(Interest::READABLE, || {
            let mut read = recv(from.as_raw_fd(), buffer)?;
            if read > 0 && read < buffer.len() {
                let asked = *short_reads < PEER_FINISHED_READS;
                *short_reads = short_reads.saturating_add(1);
                if asked && from.peer_finished(cx) {
                    // The same call the next pass would make, made now.
                    match recv(from.as_raw_fd(), &mut buffer[read..]) {
                        Ok(more) => {
                            read += more;
                            after = Some(Ok(more));
                        }
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(err) => after = Some(Err(err)),
                    }
                }
                // A stream socket returns less than asked only once its
                // queue is empty: report WouldBlock so the readiness is
                // cleared now instead of by one more read failing with
                // EAGAIN (tokio keeps an event that arrived meanwhile).
                short_read = Some(read);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(read)
        });
        match after {
            Some(Ok(0)) => self.read_done = true,
            Some(Err(err)) => self.read_error = Some(err),
            Some(Ok(_)) | None => {}
        }
        let read = match (result, short_read) {
            (_, Some(read)) => read,
            (Ok(read), None) => read,
            (Err(err), None) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            (Err(err), None) => return Err(err),
        };
        self.start = 0;
        self.end = read;
        self.bulk = read == limit;
        Ok(Some(read))
    }

    /// Splices into the pipe: `Some(0)` at end of stream, `None` when the
    /// readiness was stale.
    fn splice_in(&mut self, from: PlainSocket<'_>, len: usize) -> io::Result<Option<usize>> {
        let pipe = match self.pipe.take() {
            Some(pipe) => pipe,
            None => Pipe::take()?,
        };
        let pipe_in = pipe.write.as_raw_fd();
        self.pipe = Some(pipe);
        match from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe_in, len)
        }) {
            Ok(moved) => {
                self.in_pipe = moved;
                Ok(Some(moved))
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// Relays between two plaintext sockets with the same semantics as
/// [`super::relay::relay`]: half-close, idle timeout, bounded memory, byte
/// counts given to `report`, and recycling with a `watch`. A `forward`
/// watch sees every byte of the framing; the payloads it skips are spliced.
/// The `seed` goes to the upstream first.
pub fn relay<'a>(
    client: PlainSocket<'a>,
    upstream: PlainSocket<'a>,
    idle_timeout: Option<Duration>,
    report_interval: Duration,
    mut watch: Option<Watch>,
    seed: Option<Seed>,
    report: impl FnMut(u64, u64) + 'a,
) -> impl Future<Output = RelayOutcome> + 'a {
    let mut to_upstream = PlainHalf::default();
    let mut to_client = PlainHalf::default();
    if let Some(seed) = seed {
        if let Some(watch) = &mut watch {
            watch.read(Direction::ToUpstream, seed.bytes());
        }
        let Seed { buffer, len } = seed;
        // As if the direction's first read had returned these bytes.
        to_upstream.bulk = len == BUFFER_SIZE;
        to_upstream.buffer = Some(buffer);
        to_upstream.end = len;
    }
    drive(
        idle_timeout,
        report_interval,
        watch,
        report,
        move |cx, direction, bytes, progressed, watch| match direction {
            Direction::ToUpstream => to_upstream.poll_move(
                cx,
                client,
                upstream,
                bytes,
                progressed,
                direction,
                watch,
                to_client.read_done,
            ),
            Direction::ToClient => {
                let mut watch = watch;
                if let Some(watch) = watch.as_deref_mut() {
                    watch.send_fin_unless(|| client.has_unread_input());
                }
                to_client.poll_move(
                    cx,
                    upstream,
                    client,
                    bytes,
                    progressed,
                    direction,
                    watch,
                    to_upstream.read_done,
                )
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use std::pin::{pin, Pin};
    use std::sync::Arc;
    use std::task::Waker;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::config::RecycleConfig;
    use crate::net::stream::StreamPair;
    use crate::net::Stream;
    use crate::proxy::recycle::{Reason, RecycleSignal};
    use crate::proxy::relay::tests::tcp_pair;
    use crate::proxy::relay::RelayEnd;

    /// A relay of `client` and `upstream` (sockets sluice holds) with `watch`.
    type RelayUnderTest = for<'a> fn(
        &'a mut Stream,
        &'a mut Stream,
        Watch,
    ) -> Pin<Box<dyn Future<Output = RelayOutcome> + 'a>>;

    fn spliced<'a>(
        client: &'a mut Stream,
        upstream: &'a mut Stream,
        watch: Watch,
    ) -> Pin<Box<dyn Future<Output = RelayOutcome> + 'a>> {
        let StreamPair::Plain(client, upstream) = StreamPair::of(client, upstream) else {
            unreachable!("plain TCP sockets")
        };
        let interval = Duration::from_secs(5);
        Box::pin(relay(
            client,
            upstream,
            None,
            interval,
            Some(watch),
            None,
            |_, _| {},
        ))
    }

    fn copied<'a>(
        client: &'a mut Stream,
        upstream: &'a mut Stream,
        watch: Watch,
    ) -> Pin<Box<dyn Future<Output = RelayOutcome> + 'a>> {
        let interval = Duration::from_secs(5);
        let relayed = super::super::relay::relay(
            client,
            upstream,
            None,
            interval,
            Some(watch),
            None,
            |_, _| {},
        );
        Box::pin(relayed)
    }

    /// The upstream answers the request the client sent; the client reads
    /// the answer.
    async fn exchange(client_app: &mut TcpStream, upstream_app: &mut TcpStream) {
        let mut request = [0; 4];
        upstream_app
            .read_exact(&mut request)
            .await
            .expect("the request");
        upstream_app.write_all(b"ans.").await.expect("answer");
        let mut answer = [0; 4];
        client_app
            .read_exact(&mut answer)
            .await
            .expect("the answer");
        assert_eq!(&answer, b"ans.");
    }

    /// A recycle is due at a quiet moment while the client's next request
    /// sits in the kernel, not yet reported by the runtime (the relay is
    /// polled by hand, so the runtime's driver does not run): the relay
    /// must not send its FIN, which would lose the request's answer. It
    /// relays the exchange, then recycles at the next quiet moment.
    async fn a_request_the_runtime_has_not_reported_holds_the_fin(
        relay_under_test: RelayUnderTest,
    ) {
        let quiet_period = Duration::from_millis(30);
        let config = RecycleConfig {
            quiet_period,
            ..RecycleConfig::default()
        };
        let signal = Arc::new(RecycleSignal::default());
        let watch = Watch::new("l", &config, Arc::clone(&signal));
        let (mut client_app, client_side) = tcp_pair().await;
        let (upstream_side, mut upstream_app) = tcp_pair().await;
        let (mut client_side, mut upstream_side) =
            (Stream::Tcp(client_side), Stream::Tcp(upstream_side));
        let mut relay = pin!(relay_under_test(
            &mut client_side,
            &mut upstream_side,
            watch
        ));
        client_app.write_all(b"req1").await.expect("request");
        tokio::select! {
            outcome = &mut relay => panic!("the relay ended: {outcome:?}"),
            () = exchange(&mut client_app, &mut upstream_app) => {}
        }
        // Past the quiet period, with the runtime's driver given a turn.
        tokio::time::sleep(quiet_period * 2).await;

        signal.request(Reason::Age);
        client_app
            .try_write(b"req2")
            .expect("the request fits the socket");
        let mut cx = Context::from_waker(Waker::noop());
        // The first poll finds the quiet moment, the second is the turn
        // on the client where the FIN would go.
        assert!(relay.as_mut().poll(&mut cx).is_pending());
        assert!(relay.as_mut().poll(&mut cx).is_pending());
        tokio::select! {
            outcome = &mut relay => panic!("the relay ended: {outcome:?}"),
            () = exchange(&mut client_app, &mut upstream_app) => {}
        }

        // The recycle: the FIN to the client, whose close sluice passes on.
        let apps_close = async {
            let mut rest = Vec::new();
            client_app.read_to_end(&mut rest).await.expect("the FIN");
            assert!(rest.is_empty(), "nothing after the answer");
            client_app.shutdown().await.expect("the client's FIN");
            upstream_app.read_to_end(&mut rest).await.expect("its FIN");
            upstream_app.shutdown().await.expect("the upstream's FIN");
        };
        let both = async { tokio::join!(&mut relay, apps_close).0 };
        let outcome = tokio::time::timeout(Duration::from_secs(10), both).await;
        let outcome = outcome.expect("recycled at the next quiet moment");
        assert!(
            matches!(outcome.end, RelayEnd::Recycled(Reason::Age)),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn a_spliced_relay_holds_the_fin_for_an_unreported_request() {
        a_request_the_runtime_has_not_reported_holds_the_fin(spliced).await;
    }

    #[tokio::test]
    async fn a_copying_relay_holds_the_fin_for_an_unreported_request() {
        a_request_the_runtime_has_not_reported_holds_the_fin(copied).await;
    }

    fn capacity(pipe: &Pipe) -> libc::c_int {
        // SAFETY: the descriptor is an open pipe for the duration of the call.
        unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) }
    }

    /// One test, as the count of large pipes is process-wide.
    #[test]
    fn pipes_are_large_up_to_the_cap_and_pooled() {
        let pipe = Pipe::take().expect("a pipe");
        assert_eq!(capacity(&pipe), PIPE_CAPACITY);
        let fd = pipe.read.as_raw_fd();
        pipe.give_back();
        let again = Pipe::take().expect("a pipe");
        assert_eq!(again.read.as_raw_fd(), fd, "the pooled pipe is reused");

        let mut held = vec![again];
        for _ in 0..MAX_LARGE_PIPES {
            held.push(Pipe::take().expect("a pipe"));
        }
        let large = held
            .iter()
            .filter(|pipe| capacity(pipe) == PIPE_CAPACITY)
            .count();
        assert_eq!(large, MAX_LARGE_PIPES);
        assert!(held
            .last()
            .is_some_and(|pipe| !pipe.large && capacity(pipe) < PIPE_CAPACITY));
        assert_eq!(LARGE_PIPES.load(Ordering::Relaxed), MAX_LARGE_PIPES);
        drop(held);
        assert_eq!(LARGE_PIPES.load(Ordering::Relaxed), 0);
    }
}
