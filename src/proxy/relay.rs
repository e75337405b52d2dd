//! Relaying bytes both ways between two streams with half-close, idle
//! timeout, periodic byte counts and bounded buffers.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::coop::has_budget_remaining;
use tokio::time::{sleep_until, Instant, Sleep};

use super::buffers::Seed;
pub(super) use super::direction::Direction;
use super::recycle::{Quiet, Reason, Watch};
use crate::net::Stream;

/// How often a long connection's byte counts are reported, unless the
/// listener's `access_log_interval` is shorter; short connections report
/// once, at close.
pub const TRAFFIC_REPORT_INTERVAL: Duration = Duration::from_secs(5);

/// When neither a report nor an idle deadline is due (no idle_timeout, no
/// bytes since the last report) the timer cannot be left unset: it is set
/// this far ahead and set again when it fires.
const NOTHING_DUE_RECHECK: Duration = Duration::from_secs(24 * 60 * 60);

/// Bytes held per direction at first. A reader that does not keep up
/// leaves the buffer full, so sluice stops reading the other side:
/// back-pressure, never more memory.
const BUFFER_SIZE: usize = 16 * 1024;

/// What a direction's buffer grows to once a read fills it: bulk transfers
/// then move four TLS records per system call instead of one, and the
/// records are encrypted or decrypted in one go between two system calls.
const BULK_BUFFER_SIZE: usize = 64 * 1024;

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
    /// Recycled at a quiet moment (SPEC §9); whatever happened after
    /// sluice's FIN to the client is part of the recycle.
    Recycled(Reason),
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
    /// Recycling: the client's side is shut; bytes read are dropped.
    discarding: bool,
    /// A read error that came after bytes of the same fill: reported once
    /// those are written.
    read_error: Option<io::Error>,
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
            discarding: false,
            read_error: None,
        }
    }

    /// Starts with the seed's bytes to write, as if read first; its buffer
    /// is as large as a new direction's.
    fn seeded(seed: Seed) -> Self {
        HalfDuplex {
            buf: seed.buffer,
            start: 0,
            end: seed.len,
            read_done: false,
            need_flush: false,
            discarding: false,
            read_error: None,
        }
    }

    /// Reads into the empty buffer, and goes on reading into the rest of
    /// it while the reader has bytes at hand (a TLS session hands out one
    /// record per read), so one write carries them all.
    fn poll_fill<R>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
    ) -> Poll<Result<(), CopyError>>
    where
        R: AsyncRead + ?Sized,
    {
        if let Some(err) = self.read_error.take() {
            return Poll::Ready(Err(CopyError::Read(err)));
        }
        if self.end == self.buf.len() && self.buf.len() < BULK_BUFFER_SIZE {
            // The last fill took the whole buffer: a bulk transfer.
            self.buf = vec![0; BULK_BUFFER_SIZE].into_boxed_slice();
        }
        self.start = 0;
        self.end = 0;
        while self.end < self.buf.len() {
            let mut read_buf = ReadBuf::new(&mut self.buf[self.end..]);
            match reader.as_mut().poll_read(cx, &mut read_buf) {
                Poll::Ready(Ok(())) => {
                    let filled = read_buf.filled().len();
                    if filled == 0 {
                        self.read_done = true;
                        break;
                    }
                    self.end += filled;
                }
                Poll::Ready(Err(err)) if self.end == 0 => {
                    return Poll::Ready(Err(CopyError::Read(err)))
                }
                Poll::Ready(Err(err)) => {
                    self.read_error = Some(err);
                    break;
                }
                Poll::Pending if self.end == 0 => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(()))
    }

    #[allow(clippy::too_many_arguments)]
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        bytes: &mut u64,
        progressed: &mut bool,
        direction: Direction,
        mut watch: Option<&mut Watch>,
    ) -> Poll<Result<(), CopyError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if direction == Direction::ToClient
            && !self.discarding
            && watch.as_ref().is_some_and(|watch| watch.closing.is_some())
        {
            // The recycle's FIN to the client; what the upstream still
            // sends cannot reach the client any more.
            ready!(writer.as_mut().poll_flush(cx)).map_err(CopyError::Write)?;
            ready!(writer.as_mut().poll_shutdown(cx)).map_err(CopyError::Write)?;
            self.discarding = true;
            self.need_flush = false;
            self.start = self.end;
            if let Some(watch) = watch.as_deref_mut() {
                watch.dropped(direction);
            }
        }
        loop {
            if self.start == self.end && !self.read_done {
                match self.poll_fill(cx, reader.as_mut()) {
                    Poll::Ready(Ok(())) => {
                        if self.end > 0 {
                            *progressed = true;
                            if self.discarding {
                                self.start = self.end;
                            } else if let Some(watch) = watch.as_deref_mut() {
                                watch.read(direction, &self.buf[..self.end]);
                            }
                        }
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
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
                *bytes += written as u64;
                self.need_flush = true;
                *progressed = true;
                if let Some(watch) = watch.as_deref_mut() {
                    watch.wrote(direction, written);
                }
            }
            if self.read_done && self.discarding {
                return Poll::Ready(Ok(()));
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx)).map_err(CopyError::Write)?;
                ready!(writer.as_mut().poll_shutdown(cx)).map_err(CopyError::Write)?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Relays until both directions have finished, one side fails, nothing
/// moves for `idle_timeout`, or (with a `watch`) the connection is recycled.
/// The `seed` goes to the upstream first. `report` is given the bytes
/// written each way (client → upstream, upstream → client) since its
/// previous call, every `report_interval` while bytes move, and at the end.
pub fn relay<'a, U, R>(
    client: &'a mut Stream,
    upstream: &'a mut U,
    idle_timeout: Option<Duration>,
    report_interval: Duration,
    mut watch: Option<Watch>,
    seed: Option<Seed>,
    report: R,
) -> impl Future<Output = RelayOutcome> + 'a
where
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    R: FnMut(u64, u64) + 'a,
{
    let mut to_upstream = match seed {
        Some(seed) => {
            if let Some(watch) = &mut watch {
                watch.read(Direction::ToUpstream, seed.bytes());
            }
            HalfDuplex::seeded(seed)
        }
        None => HalfDuplex::new(),
    };
    let mut to_client = HalfDuplex::new();
    drive(
        idle_timeout,
        report_interval,
        watch,
        report,
        move |cx, direction, bytes, progressed, watch| match direction {
            Direction::ToUpstream => to_upstream.poll_copy(
                cx,
                Pin::new(&mut *client),
                Pin::new(&mut *upstream),
                bytes,
                progressed,
                direction,
                watch,
            ),
            Direction::ToClient => {
                let mut watch = watch;
                if let Some(watch) = watch.as_deref_mut() {
                    watch.send_fin_unless(|| client.has_unread_input());
                }
                to_client.poll_copy(
                    cx,
                    Pin::new(&mut *upstream),
                    Pin::new(&mut *client),
                    bytes,
                    progressed,
                    direction,
                    watch,
                )
            }
        },
    )
}

/// Polls both directions until both are done, one fails, nothing moves
/// for `idle_timeout`, or the `watch` recycles the connection, reporting the
/// bytes written as [`relay`] describes. A direction adds the bytes it
/// writes to its `bytes`, tells whether it moved a byte through its
/// `progressed` flag, and shows the bytes it moves to the watch it is given.
///
/// The future holds just this state (the relays are plain functions, not
/// nested `async fn`s that would each keep copies of their arguments): it
/// lives in the connection's task for the connection's whole life.
pub(super) fn drive<R, P>(
    idle_timeout: Option<Duration>,
    report_interval: Duration,
    watch: Option<Watch>,
    report: R,
    poll_direction: P,
) -> impl Future<Output = RelayOutcome>
where
    R: FnMut(u64, u64),
    P: PollDirection,
{
    let now = Instant::now();
    let next_report = Some(now + report_interval);
    let mut driver = Driver {
        poll_direction,
        report,
        idle_timeout,
        report_interval,
        watch,
        upstream_done: false,
        client_done: false,
        sent: 0,
        received: 0,
        sent_reported: 0,
        received_reported: 0,
        last_progress: now,
        next_report,
        timer_armed_for: None,
        timer: Box::pin(sleep_until(timer_deadline(
            now,
            next_report,
            // A deadline past what an Instant holds is never reached.
            idle_timeout.and_then(|timeout| now.checked_add(timeout)),
        ))),
    };
    poll_fn(move |cx| driver.poll(cx))
}

/// What [`drive`] polls for one direction: `(cx, direction, bytes,
/// progressed, watch)`.
pub(super) trait PollDirection:
    FnMut(
    &mut Context<'_>,
    Direction,
    &mut u64,
    &mut bool,
    Option<&mut Watch>,
) -> Poll<Result<(), CopyError>>
{
}

impl<P> PollDirection for P where
    P: FnMut(
        &mut Context<'_>,
        Direction,
        &mut u64,
        &mut bool,
        Option<&mut Watch>,
    ) -> Poll<Result<(), CopyError>>
{
}

/// The state of one relay. One timer serves the idle timeout, the reports
/// and recycling: it is set for the earliest deadline and re-armed only
/// when it fires, not on every byte.
struct Driver<R, P> {
    poll_direction: P,
    report: R,
    idle_timeout: Option<Duration>,
    report_interval: Duration,
    /// Recycling at a quiet moment, on listeners that recycle.
    watch: Option<Watch>,
    upstream_done: bool,
    client_done: bool,
    /// Bytes written so far, and as of the last report, each way.
    sent: u64,
    received: u64,
    sent_reported: u64,
    received_reported: u64,
    /// When a byte last moved; kept only with an idle timeout.
    last_progress: Instant,
    /// None while nothing moved since the last report: an idle connection
    /// is not woken for reports with nothing in them.
    next_report: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    /// The waker the timer holds: it was last polled pending with it, with
    /// cooperative budget left (without budget, a poll returns before the
    /// timer sees the waker), and has not been reset since. Until the timer
    /// fires, polls with the same waker (the wake-ups that bytes cause) need
    /// not poll it again: that poll was 3.5% of sluice's user space per
    /// keep-alive request.
    timer_armed_for: Option<Waker>,
}

impl<R, P> Driver<R, P>
where
    R: FnMut(u64, u64),
    P: PollDirection,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<RelayOutcome> {
        let end = ready!(self.poll_end(cx));
        self.report_unreported();
        Poll::Ready(RelayOutcome {
            sent: self.sent,
            received: self.received,
            end,
        })
    }

    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let mut progressed = false;
        if !self.upstream_done {
            match (self.poll_direction)(
                cx,
                Direction::ToUpstream,
                &mut self.sent,
                &mut progressed,
                self.watch.as_mut(),
            ) {
                Poll::Ready(Ok(())) => self.upstream_done = true,
                Poll::Ready(Err(CopyError::Read(err))) => {
                    return Poll::Ready(self.ended(RelayEnd::Error(Side::Client, err)))
                }
                Poll::Ready(Err(CopyError::Write(err))) => {
                    return Poll::Ready(self.ended(RelayEnd::Error(Side::Upstream, err)))
                }
                Poll::Pending => {}
            }
        }
        if !self.client_done {
            match (self.poll_direction)(
                cx,
                Direction::ToClient,
                &mut self.received,
                &mut progressed,
                self.watch.as_mut(),
            ) {
                Poll::Ready(Ok(())) => self.client_done = true,
                Poll::Ready(Err(CopyError::Read(err))) => {
                    return Poll::Ready(self.ended(RelayEnd::Error(Side::Upstream, err)))
                }
                Poll::Ready(Err(CopyError::Write(err))) => {
                    return Poll::Ready(self.ended(RelayEnd::Error(Side::Client, err)))
                }
                Poll::Pending => {}
            }
        }
        if self.upstream_done && self.client_done {
            return Poll::Ready(self.ended(RelayEnd::Done));
        }
        if progressed {
            if self.idle_timeout.is_some() {
                self.last_progress = Instant::now();
            }
            if let Some(watch) = &mut self.watch {
                watch.last_progress = Instant::now();
            }
            if self.next_report.is_none() {
                // The first bytes after a quiet spell: reports resume.
                let next_report = Instant::now() + self.report_interval;
                self.next_report = Some(next_report);
                if next_report < self.timer.deadline() {
                    self.reset_timer(next_report);
                }
            }
        }
        while self.timer_due_a_poll(cx) && self.poll_timer(cx) {
            let now = Instant::now();
            if self.next_report.is_some_and(|at| now >= at) {
                let moved =
                    (self.sent, self.received) != (self.sent_reported, self.received_reported);
                self.next_report = moved.then_some(now + self.report_interval);
                self.report_unreported();
            }
            let idle_deadline = self
                .idle_timeout
                .and_then(|timeout| self.last_progress.checked_add(timeout));
            if idle_deadline.is_some_and(|deadline| now >= deadline) {
                return Poll::Ready(self.ended(RelayEnd::Idle));
            }
            self.reset_timer(timer_deadline(now, self.next_report, idle_deadline));
        }
        match self.poll_recycle(cx) {
            Some(end) => Poll::Ready(end),
            None => Poll::Pending,
        }
    }

    /// Starts the recycle once it was asked for and a quiet moment came,
    /// or ends it once RECYCLE_LINGER has passed; arms the timer for what
    /// it waits for.
    fn poll_recycle(&mut self, cx: &mut Context<'_>) -> Option<RelayEnd> {
        let watch = self.watch.as_mut()?;
        if self.client_done {
            // The client has had its FIN since the upstream's end: no
            // answer can be lost, and no turn on the client will come.
            watch.send_fin_unless(|| false);
        }
        let now = Instant::now();
        let wake_at = match watch.closing {
            Some((reason, deadline)) if now >= deadline => return Some(RelayEnd::Recycled(reason)),
            Some((_, deadline)) => deadline,
            None => {
                let reason = watch.signal.poll_requested(cx)?;
                match watch.quiet(now) {
                    Quiet::Now => {
                        watch.fin_is_due(reason);
                        // Polled again at once, the relay sends the FIN,
                        // then arms the timer for the linger.
                        cx.waker().wake_by_ref();
                        return None;
                    }
                    Quiet::At(at) => at,
                    // Bytes moving wake the relay to look again.
                    Quiet::No => return None,
                }
            }
        };
        if wake_at < self.timer.deadline() {
            self.reset_timer(wake_at);
            if self.poll_timer(cx) {
                cx.waker().wake_by_ref();
            }
        }
        None
    }

    /// Whether the timer may have fired unseen, or holds no waker that
    /// would wake this poll's task.
    fn timer_due_a_poll(&self, cx: &Context<'_>) -> bool {
        match &self.timer_armed_for {
            Some(waker) => !waker.will_wake(cx.waker()) || self.timer.is_elapsed(),
            None => true,
        }
    }

    /// Polls the timer: true once it fired.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let budget = has_budget_remaining();
        let fired = self.timer.as_mut().poll(cx).is_ready();
        self.timer_armed_for = (budget && !fired).then(|| cx.waker().clone());
        fired
    }

    fn reset_timer(&mut self, deadline: Instant) {
        self.timer.as_mut().reset(deadline);
        self.timer_armed_for = None;
    }

    /// Once a recycle started, any end is the recycle's.
    fn ended(&self, end: RelayEnd) -> RelayEnd {
        match self.watch.as_ref().and_then(|watch| watch.closing) {
            Some((reason, _)) => RelayEnd::Recycled(reason),
            None => end,
        }
    }

    fn report_unreported(&mut self) {
        if (self.sent, self.received) == (self.sent_reported, self.received_reported) {
            return;
        }
        (self.report)(
            self.sent - self.sent_reported,
            self.received - self.received_reported,
        );
        (self.sent_reported, self.received_reported) = (self.sent, self.received);
    }
}

/// When the timer should fire next: the earlier of the next report and the
/// idle deadline, or NOTHING_DUE_RECHECK from `now` when neither is set.
fn timer_deadline(
    now: Instant,
    next_report: Option<Instant>,
    idle_deadline: Option<Instant>,
) -> Instant {
    match (next_report, idle_deadline) {
        (Some(report), Some(idle)) => report.min(idle),
        (report, idle) => report.or(idle).unwrap_or(now + NOTHING_DUE_RECHECK),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::{Cell, RefCell};
    use std::pin::pin;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    use super::*;

    /// The (sent, received) pairs a relay reported.
    type Reports = Rc<RefCell<Vec<(u64, u64)>>>;

    /// A relay whose client sends whatever `pending` holds when polled and
    /// that never ends, with the reports it made.
    fn fake_relay(
        idle_timeout: Option<Duration>,
    ) -> (impl Future<Output = RelayOutcome>, Rc<Cell<u64>>, Reports) {
        let pending = Rc::new(Cell::new(0));
        let reports = Rc::new(RefCell::new(Vec::new()));
        let relay = drive(
            idle_timeout,
            TRAFFIC_REPORT_INTERVAL,
            None,
            {
                let reports = Rc::clone(&reports);
                move |sent, received| reports.borrow_mut().push((sent, received))
            },
            {
                let pending = Rc::clone(&pending);
                move |_: &mut Context<'_>,
                      direction,
                      bytes: &mut u64,
                      progressed: &mut bool,
                      _: Option<&mut Watch>| {
                    if let Direction::ToUpstream = direction {
                        let moved = pending.replace(0);
                        *bytes += moved;
                        *progressed |= moved > 0;
                    }
                    Poll::Pending
                }
            },
        );
        (relay, pending, reports)
    }

    /// Counts the wake-ups of the task it is given to.
    #[derive(Default)]
    struct WakeCount(AtomicUsize);

    impl Wake for WakeCount {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn poll_once<F: Future>(future: Pin<&mut F>, waker: &Waker) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(waker))
    }

    #[tokio::test(start_paused = true)]
    async fn reports_while_bytes_move_and_sleeps_while_idle() {
        let (relay, pending, reports) = fake_relay(None);
        let mut relay = pin!(relay);
        let wakes = Arc::new(WakeCount::default());
        let waker = Waker::from(Arc::clone(&wakes));
        pending.set(100);
        assert!(poll_once(relay.as_mut(), Waker::noop()).is_pending());
        tokio::time::advance(TRAFFIC_REPORT_INTERVAL).await;
        assert!(poll_once(relay.as_mut(), Waker::noop()).is_pending());
        assert_eq!(*reports.borrow(), [(100, 0)]);

        // Nothing moves: one more check finds nothing to report, then the
        // connection's task is not woken again (for a day).
        tokio::time::advance(TRAFFIC_REPORT_INTERVAL).await;
        assert!(poll_once(relay.as_mut(), &waker).is_pending());
        let woken = wakes.0.load(Ordering::Relaxed);
        tokio::time::advance(TRAFFIC_REPORT_INTERVAL * 100).await;
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            woken,
            "an idle relay was woken"
        );
        assert!(poll_once(relay.as_mut(), &waker).is_pending());
        assert_eq!(*reports.borrow(), [(100, 0)]);

        // Bytes again: reports resume one interval later.
        pending.set(7);
        assert!(poll_once(relay.as_mut(), Waker::noop()).is_pending());
        tokio::time::advance(TRAFFIC_REPORT_INTERVAL).await;
        assert!(poll_once(relay.as_mut(), Waker::noop()).is_pending());
        assert_eq!(*reports.borrow(), [(100, 0), (7, 0)]);
    }

    /// A connected pair of loopback TCP sockets.
    pub(in crate::proxy) async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let connected = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        (connected, accepted)
    }

    /// Sends `data` through one direction (with the end of stream) and
    /// returns what came out and the direction's buffer size at the end.
    async fn copy_through(data: Vec<u8>, write_chunk: usize) -> (Vec<u8>, usize) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut source, mut from) = tcp_pair().await;
        let (mut to, mut sink) = tcp_pair().await;
        let sending = tokio::spawn(async move {
            for chunk in data.chunks(write_chunk) {
                source.write_all(chunk).await.expect("send");
            }
            source.shutdown().await.expect("end");
        });
        let receiving = tokio::spawn(async move {
            let mut received = Vec::new();
            sink.read_to_end(&mut received).await.expect("receive");
            received
        });
        let mut direction = HalfDuplex::new();
        let (mut bytes, mut progressed) = (0, false);
        let copied = poll_fn(|cx| {
            direction.poll_copy(
                cx,
                Pin::new(&mut from),
                Pin::new(&mut to),
                &mut bytes,
                &mut progressed,
                Direction::ToUpstream,
                None,
            )
        });
        let copied = tokio::time::timeout(Duration::from_secs(20), copied).await;
        assert!(matches!(copied, Ok(Ok(()))), "the copy ends cleanly");
        sending.await.expect("sender");
        let received = receiving.await.expect("receiver");
        assert_eq!(bytes, received.len() as u64);
        (received, direction.buf.len())
    }

    #[tokio::test]
    async fn a_bulk_direction_grows_its_buffer_and_keeps_every_byte() {
        let data: Vec<u8> = (0..2_000_000u32).map(|n| (n % 253) as u8).collect();
        let (received, buffer) = copy_through(data.clone(), 256 * 1024).await;
        assert!(received == data, "bytes changed on the way");
        assert_eq!(buffer, BULK_BUFFER_SIZE);
    }

    #[tokio::test]
    async fn a_trickle_keeps_the_small_buffer() {
        let data = vec![9; 100];
        let (received, buffer) = copy_through(data.clone(), 10).await;
        assert_eq!(received, data);
        assert_eq!(buffer, BUFFER_SIZE);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_still_ends_a_relay_whose_reports_stopped() {
        let idle = Duration::from_secs(60);
        let (relay, pending, reports) = fake_relay(Some(idle));
        let mut relay = pin!(relay);
        pending.set(10);
        assert!(poll_once(relay.as_mut(), Waker::noop()).is_pending());
        tokio::time::advance(idle - Duration::from_millis(1)).await;
        assert!(poll_once(relay.as_mut(), Waker::noop()).is_pending());
        // Past the deadline (the timer works in whole milliseconds).
        tokio::time::advance(Duration::from_millis(2)).await;
        match poll_once(relay.as_mut(), Waker::noop()) {
            Poll::Ready(RelayOutcome {
                sent: 10,
                received: 0,
                end: RelayEnd::Idle,
            }) => {}
            other => panic!(
                "expected an idle end after 10 bytes, got {:?}",
                other.map(|o| o.end)
            ),
        }
        assert_eq!(*reports.borrow(), [(10, 0)]);
    }

    /// Polls `relay` once with the calling task's own waker, as the
    /// connection's task does, after using up the task's cooperative budget
    /// when `no_budget`.
    async fn poll_in_task<F: Future>(relay: Pin<&mut F>, no_budget: bool) -> Poll<F::Output> {
        let mut relay = Some(relay);
        poll_fn(|cx| {
            if no_budget {
                while let Poll::Ready(restore) = tokio::task::coop::poll_proceed(cx) {
                    restore.made_progress();
                }
            }
            let relay = relay.take().expect("polled once");
            Poll::Ready(relay.poll(cx))
        })
        .await
    }

    fn assert_idle_end(polled: Poll<RelayOutcome>, sent: u64) {
        match polled {
            Poll::Ready(outcome) if outcome.sent == sent => {
                assert!(matches!(outcome.end, RelayEnd::Idle), "{outcome:?}")
            }
            other => panic!("expected an idle end after {sent} bytes, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn wake_ups_by_bytes_still_see_the_timer_fire() {
        let idle = Duration::from_secs(60);
        let (relay, pending, reports) = fake_relay(Some(idle));
        let mut relay = pin!(relay);
        // Bytes wake the relay, always with the same waker: the timer armed
        // at the first poll is not polled again, but its firing is seen.
        for _ in 0..10 {
            pending.set(3);
            assert!(poll_in_task(relay.as_mut(), false).await.is_pending());
            tokio::time::advance(TRAFFIC_REPORT_INTERVAL / 4).await;
        }
        // The reports at 5 s and 10 s, each with the bytes polled since.
        assert_eq!(*reports.borrow(), [(15, 0), (12, 0)]);
        tokio::time::advance(idle).await;
        assert_idle_end(poll_in_task(relay.as_mut(), false).await, 30);
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_first_polled_without_budget_still_times_out() {
        let idle = Duration::from_secs(60);
        let (relay, pending, _) = fake_relay(Some(idle));
        let mut relay = pin!(relay);
        pending.set(10);
        // Without budget the timer returns before it holds the waker: the
        // next poll must poll it again.
        assert!(poll_in_task(relay.as_mut(), true).await.is_pending());
        tokio::time::advance(idle + Duration::from_millis(2)).await;
        assert_idle_end(poll_in_task(relay.as_mut(), false).await, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_beyond_any_instant_means_never() {
        let (relay, pending, reports) = fake_relay(Some(Duration::MAX));
        let mut relay = pin!(relay);
        pending.set(5);
        assert!(poll_once(relay.as_mut(), Waker::noop()).is_pending());
        tokio::time::advance(TRAFFIC_REPORT_INTERVAL * 3).await;
        assert!(poll_once(relay.as_mut(), Waker::noop()).is_pending());
        assert_eq!(*reports.borrow(), [(5, 0)]);
    }
}
