//! The data path: one client connection from accept to close: its PROXY
//! header and TLS handshake, the connect attempts (next upstream), the
//! relay, and its access line.

pub mod access_log;
mod buffers;
mod direction;
mod forward;
pub mod proxy_protocol;
pub mod recycle;
pub mod relay;
pub mod retry;
#[cfg(target_os = "linux")]
mod splice;

use std::future::{ready, Future};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tracing::{debug, info, warn};

use crate::balancer::Tried;
use crate::config::{Balance, HashKey, ListenerConfig, ProxyProtocol, ValueError};
use crate::net::connect::{connect_within, send_handshake_ack, Connected};
#[cfg(target_os = "linux")]
use crate::net::stream::StreamPair;
use crate::net::{ClientAddr, Stream};
use crate::tls::{self, handshake_errors::HandshakeErrors};
use crate::upstream::queue::Place;
use crate::upstream::{Attempt, Lease, SharedUpstream, Upstream};
use access_log::{AccessRecord, Close, TryOutcome};
use buffers::{give_back_buffer, take_buffer, Seed};
use proxy_protocol::Origin;
use recycle::{Registry, Watch};
use relay::{relay, RelayEnd, RelayOutcome, Side, TRAFFIC_REPORT_INTERVAL};
use retry::{connect_first, AttemptError, Candidates, RetryLimits, Unavailable};

/// What a listener's connections need: its settings and its upstream group.
/// A reload stores a new context; connections keep the one they started with.
pub struct ListenerContext {
    pub config: ListenerConfig,
    pub upstream: SharedUpstream,
    /// TLS termination, loaded from the listener's files once per load.
    pub tls: Option<TlsAcceptor>,
    /// Counts and log limits of failed client handshakes, with `tls`.
    handshake_errors: Option<HandshakeErrors>,
    /// The listener's open connections that may be recycled (SPEC §9). A
    /// reload keeps the running listener's registry in its new context.
    pub recycling: Arc<Registry>,
    /// The listener's series of connection durations, looked up once per
    /// load instead of once per connection.
    connection_duration: metrics::Histogram,
}

impl ListenerContext {
    /// Builds the context, reading the listener's TLS files if it has any;
    /// an error names the line naming the file.
    pub fn new(config: ListenerConfig, upstream: SharedUpstream) -> Result<Self, ValueError> {
        let tls = match &config.tls {
            Some(settings) => Some(tls::acceptor(settings).map_err(|err| {
                let message = format!("listener {:?}: TLS: {err}", config.name);
                match config.tls_lines.naming(&err) {
                    Some(line) => ValueError::At(line.error(message)),
                    None => ValueError::Unplaced(message),
                }
            })?),
            None => None,
        };
        let handshake_errors = tls.as_ref().map(|_| HandshakeErrors::new(&config.name));
        let connection_duration = metrics::histogram!(
            crate::metrics::names::CONNECTION_DURATION,
            "listener" => config.name.clone()
        );
        Ok(ListenerContext {
            connection_duration,
            config,
            upstream,
            tls,
            handshake_errors,
            recycling: Arc::default(),
        })
    }
}

/// Serves one client connection from accept to close.
pub async fn serve_connection(
    client: Stream,
    client_addr: ClientAddr,
    context: Arc<ListenerContext>,
) {
    let accepted = Instant::now();
    let group = context.upstream.load_full();
    // Boxed: the PROXY header, the TLS handshake and the connect attempts
    // take far more state than the relay and are over in moments; inline,
    // that state would be part of every connection's task for its whole life.
    let Some(Established {
        mut client,
        mut upstream_stream,
        lease,
        client_addr,
        access,
        sent_early,
    }) = Box::pin(establish(client, client_addr, &context, &group)).await
    else {
        return;
    };
    // The build the lease came from: the one accepted with, or a newer one
    // for a client that waited in the queue.
    let build = Arc::clone(lease.group());
    let peer = &build.peers[lease.index()];
    #[cfg(debug_assertions)]
    test_hooks::panic_if_asked(&peer.label);
    let recycle = &context.config.recycle;
    let registration = recycle.recycles().then(|| {
        context
            .recycling
            .register(&peer.label, recycle.max_connection_age)
    });
    let watch = registration.as_ref().map(|registration| {
        Watch::new(
            &context.config.name,
            recycle,
            Arc::clone(&registration.signal),
        )
    });
    let report_interval = recycle
        .access_log_interval
        .map_or(TRAFFIC_REPORT_INTERVAL, |interval| {
            interval.min(TRAFFIC_REPORT_INTERVAL)
        });
    let mut interim = recycle
        .access_log_interval
        .map(|interval| InterimLines::new(interval, accepted));
    // What was relayed so far, for the access line of a connection closed
    // through the runtime API.
    let (total_sent, total_received) = (AtomicU64::new(0), AtomicU64::new(0));
    let relay = relay_streams(
        &mut client,
        &mut upstream_stream,
        context.config.idle_timeout,
        report_interval,
        watch,
        sent_early,
        |sent, received| {
            peer.stats.relayed(sent, received);
            total_sent.fetch_add(sent, Ordering::Relaxed);
            total_received.fetch_add(received, Ordering::Relaxed);
            if let Some(interim) = &mut interim {
                interim.relayed(sent, received, &access, &peer.label);
            }
        },
    );
    let outcome = match peer.close.guard(relay).await {
        Some(outcome) => outcome,
        None => RelayOutcome {
            sent: total_sent.load(Ordering::Relaxed),
            received: total_received.load(Ordering::Relaxed),
            end: RelayEnd::Error(
                Side::Upstream,
                std::io::Error::other("closed through the runtime API (DELETE ?force=true)"),
            ),
        },
    };
    // Free the peer before reporting, so whoever reads the report sees it free.
    drop(registration);
    drop(lease);
    let listener = context.config.name.as_str();
    context
        .connection_duration
        .record(accepted.elapsed().as_secs_f64());
    let upstream = group.name.as_str();
    let peer = peer.label.as_str();
    let (sent, received) = (outcome.sent, outcome.received);
    let close = match &outcome.end {
        RelayEnd::Done => Close::Done,
        RelayEnd::Idle => Close::Idle,
        RelayEnd::Error(Side::Client, err) => Close::ClientError(err),
        RelayEnd::Error(Side::Upstream, err) => Close::UpstreamError(err),
        RelayEnd::Recycled(reason) => Close::Recycled(reason.as_str()),
    };
    access.finish(Some(peer), sent, received, close);
    match outcome.end {
        RelayEnd::Done => {
            debug!(listener, upstream, peer, client = %client_addr, sent, received, "connection closed")
        }
        RelayEnd::Idle => {
            info!(listener, upstream, peer, client = %client_addr, sent, received, "connection closed: idle_timeout")
        }
        RelayEnd::Error(side, err) => {
            warn!(listener, upstream, peer, client = %client_addr, sent, received, side = ?side, reason = %err, "connection closed on error")
        }
        RelayEnd::Recycled(reason) => {
            info!(listener, upstream, peer, client = %client_addr, sent, received, reason = reason.as_str(), "connection recycled at a quiet moment")
        }
    }
}

/// Interim access lines of a long connection, one per `access_log_interval`
/// while bytes move, each with the bytes so far.
struct InterimLines {
    interval: Duration,
    next: Instant,
    sent: u64,
    received: u64,
}

impl InterimLines {
    fn new(interval: Duration, accepted: Instant) -> Self {
        InterimLines {
            interval,
            next: accepted + interval,
            sent: 0,
            received: 0,
        }
    }

    /// The relay reports bytes moved since its last report.
    fn relayed(&mut self, sent: u64, received: u64, access: &AccessRecord<'_>, peer: &str) {
        self.sent += sent;
        self.received += received;
        let now = Instant::now();
        if now >= self.next {
            access.interim(peer, self.sent, self.received);
            self.next = now + self.interval;
        }
    }
}

/// A client with a peer connected for it, ready to relay.
struct Established<'a> {
    client: Stream,
    upstream_stream: Stream,
    lease: Lease,
    /// Who the client is, as its PROXY header tells if it sent one.
    client_addr: ClientAddr,
    access: AccessRecord<'a>,
    /// What the client had sent by the time its peer was connected.
    sent_early: SentEarly,
}

/// Everything between accept and relay: the client's PROXY header, its TLS
/// handshake, the connect attempts. `None` when the client was turned away,
/// which is logged here.
async fn establish<'a>(
    mut client: Stream,
    client_addr: ClientAddr,
    context: &'a ListenerContext,
    group: &'a Arc<Upstream>,
) -> Option<Established<'a>> {
    let accepted = Instant::now();
    let listener = context.config.name.as_str();
    let upstream = group.name.as_str();
    // The PROXY header comes first on the connection, before any TLS. The
    // local address (one more system call) is needed only to send one.
    let local_addr = match &client {
        Stream::Tcp(stream) if context.config.proxy_protocol != ProxyProtocol::Off => {
            stream.local_addr().ok()
        }
        Stream::Tcp(_) | Stream::Unix(_) | Stream::TlsToPeer(_) | Stream::TlsFromClient(_) => None,
    };
    let mut origin = Origin::of_connection(client_addr, local_addr);
    if context.config.accept_proxy_protocol {
        match Origin::receive(&mut client, origin, context.config.connect_timeout).await {
            Ok(carried) => origin = carried,
            Err(reason) => {
                warn!(listener, upstream, client = %client_addr, reason = %reason, "client closed: no valid PROXY header");
                AccessRecord::new(
                    context.config.access_log,
                    listener,
                    client_addr,
                    upstream,
                    accepted,
                )
                .finish(None, 0, 0, Close::ClientError(&reason));
                return None;
            }
        }
    }
    // From here on the client is who the PROXY header says it is.
    let client_addr = origin.client;
    let proxy_header = origin.header(context.config.proxy_protocol);
    let mut access = AccessRecord::new(
        context.config.access_log,
        listener,
        client_addr,
        upstream,
        accepted,
    );
    if let Some(acceptor) = &context.tls {
        // Boxed: the handshake's state is over a kilobyte; inline, it would
        // make every connection's establishing future that large, TLS or
        // not, and each connection copies that future as it starts.
        let handshake = Box::pin(tls::terminate(
            acceptor,
            client,
            context.config.connect_timeout,
        ));
        client = match handshake.await {
            Ok(client) => Stream::TlsFromClient(Box::new(client)),
            Err(error) => {
                if let Some(errors) = &context.handshake_errors {
                    errors.record(&error, listener, upstream, &client_addr);
                }
                access.finish(None, 0, 0, Close::ClientError(&error.message));
                return None;
            }
        };
    }
    let limits = RetryLimits {
        connect_timeout: context.config.connect_timeout,
        tries: context.config.next_upstream_tries,
        total: context.config.next_upstream_timeout,
    };
    // When every peer is at max_conns, the client may wait for a slot (SPEC
    // §11); while others wait, it queues behind them.
    let queue = &group.runtime.queue;
    let queue_limit = group.config.queue;
    let queue_deadline = Instant::now() + group.config.queue_timeout;
    // A client that waited picks from the newest build: a runtime change
    // (a higher max_conns, a server added) may be what freed its slot.
    let mut build = Arc::clone(group);
    let mut turn = None;
    if queue_limit > 0 && queue.is_busy() {
        match queue.wait(queue_limit, queue_deadline, Place::Back).await {
            Ok(woken) => turn = Some(woken),
            Err(reason) => return turned_away(group, listener, client_addr, access, &reason),
        }
        build = context.upstream.load_full();
    }
    let connected = loop {
        let over_share = if context.config.recycle.rebalance {
            context.recycling.over_share(&build)
        } else {
            Vec::new()
        };
        let mut candidates = GroupCandidates {
            listener,
            group: &build,
            client_addr,
            key: hash_key(&build.balance, client_addr),
            tried: Tried::default(),
            over_share,
            proxy_header: &proxy_header,
            client_may_speak: may_speak(&client),
            access: &mut access,
        };
        match connect_first(&mut candidates, limits).await {
            Err(Unavailable::NoEligiblePeer) if queue_limit > 0 && build.has_full_peer() => {
                let place = match turn.take() {
                    Some(turn) => {
                        turn.give_back();
                        Place::Front
                    }
                    None => Place::Back,
                };
                match queue.wait(queue_limit, queue_deadline, place).await {
                    Ok(woken) => turn = Some(woken),
                    Err(reason) => {
                        return turned_away(group, listener, client_addr, access, &reason)
                    }
                }
                build = context.upstream.load_full();
            }
            connected => break connected,
        }
    };
    // Taken (or not): the next waiting client may try for another slot.
    drop(turn);
    match connected {
        Ok((attempt, upstream_stream)) => {
            let sent_early = read_sent(&client);
            // The connect held its last ACK back for the client's bytes to
            // carry; with none, it goes now: the server may be waiting for it
            // to speak first.
            if matches!(sent_early, SentEarly::Nothing)
                && may_speak(&client)
                && proxy_header.is_empty()
            {
                send_handshake_ack(&upstream_stream);
            }
            Some(Established {
                client,
                upstream_stream,
                lease: {
                    access.tried(&attempt.peer().label, TryOutcome::Connected);
                    attempt.succeeded()
                },
                client_addr,
                access,
                sent_early,
            })
        }
        Err(reason) => turned_away(group, listener, client_addr, access, &reason),
    }
}

/// No peer could take the client: it is closed at once with nothing
/// written (dropping it closes it).
fn turned_away<T>(
    group: &Upstream,
    listener: &str,
    client_addr: ClientAddr,
    access: AccessRecord<'_>,
    reason: &(dyn std::fmt::Display + Sync),
) -> Option<T> {
    group.count_unavailable();
    warn!(listener, upstream = group.name.as_str(), client = %client_addr, reason = %reason, "client turned away: no peer could take the connection");
    access.finish(None, 0, 0, Close::NoPeer(reason));
    None
}

/// Plaintext socket pairs are relayed by the kernel-assisted path on Linux;
/// anything else (TLS, other systems) is copied through user-space buffers.
/// A plain function, not an `async fn`: that would keep its arguments (the
/// watch among them, 288 bytes in all) in the connection's task for the
/// connection's whole life, beside the relay that took them over.
fn relay_streams<'a>(
    client: &'a mut Stream,
    upstream: &'a mut Stream,
    idle_timeout: Option<Duration>,
    report_interval: Duration,
    watch: Option<Watch>,
    sent_early: SentEarly,
    report: impl FnMut(u64, u64) + 'a,
) -> impl Future<Output = RelayOutcome> + 'a {
    let seed = match sent_early {
        SentEarly::Read(seed) => Some(seed),
        SentEarly::Nothing => None,
        // The relay would have ended on this read, so it ends now, the same way.
        SentEarly::Failed(err) => {
            return Either::Left(ready(RelayOutcome {
                sent: 0,
                received: 0,
                end: RelayEnd::Error(Side::Client, err),
            }))
        }
    };
    #[cfg(target_os = "linux")]
    let (client, upstream) = match StreamPair::of(client, upstream) {
        StreamPair::Plain(client, upstream) => {
            return Either::Right(Either::Left(splice::relay(
                client,
                upstream,
                idle_timeout,
                report_interval,
                watch,
                seed,
                report,
            )))
        }
        StreamPair::Layered(client, upstream) => (client, upstream),
    };
    let copied = relay(
        client,
        upstream,
        idle_timeout,
        report_interval,
        watch,
        seed,
        report,
    );
    #[cfg(target_os = "linux")]
    let copied = Either::Right(copied);
    Either::Right(copied)
}

/// The peers of one group as one client connection may try them.
struct GroupCandidates<'r, 'a> {
    listener: &'r str,
    group: &'r Arc<Upstream>,
    client_addr: ClientAddr,
    /// What `balance = "hash"` hashes; empty for other methods.
    key: Vec<u8>,
    tried: Tried,
    /// Peers above their fair share while shares drift (`rebalance`): the
    /// first pick avoids them if another peer can take the connection.
    over_share: Vec<usize>,
    proxy_header: &'r [u8],
    /// A plaintext client, whose first bytes can carry the connect's last
    /// ACK (connect_peer).
    client_may_speak: bool,
    access: &'r mut AccessRecord<'a>,
}

impl Candidates for GroupCandidates<'_, '_> {
    type Attempt = Attempt;
    type Connection = Stream;

    fn next(&mut self) -> Option<Attempt> {
        if !self.over_share.is_empty() {
            let mut avoid = self.tried.clone();
            for &index in &std::mem::take(&mut self.over_share) {
                avoid.insert(index);
            }
            if let Some(attempt) = self.group.select(&mut avoid, &self.key) {
                self.tried.insert(attempt.index());
                return Some(attempt);
            }
        }
        self.group.select(&mut self.tried, &self.key)
    }

    async fn connect(
        &mut self,
        attempt: &Attempt,
        timeout: Duration,
    ) -> Result<Stream, AttemptError> {
        let peer = attempt.peer();
        let connected = connect_within(
            timeout,
            &peer.target,
            peer.tls.as_ref(),
            self.proxy_header,
            self.client_may_speak,
        )
        .await;
        match connected {
            Connected::Stream(stream) => Ok(stream),
            Connected::LocalResources(err) => Err(AttemptError::LocalResources(err)),
            Connected::Failed(err) => Err(AttemptError::Failed(err.to_string())),
            // One timeout covers the connect and the TLS handshake.
            Connected::TimedOut if peer.tls.is_some() => Err(AttemptError::Failed(format!(
                "connect and TLS handshake timed out after {}",
                humantime::format_duration(timeout)
            ))),
            Connected::TimedOut => Err(AttemptError::Failed(format!(
                "connect timed out after {}",
                humantime::format_duration(timeout)
            ))),
        }
    }

    fn failed(&mut self, attempt: Attempt, reason: &str) {
        warn!(
            listener = self.listener,
            upstream = self.group.name.as_str(),
            peer = attempt.peer().label.as_str(),
            client = %self.client_addr,
            reason = %reason,
            "upstream connect attempt failed"
        );
        self.access
            .tried(&attempt.peer().label, TryOutcome::Failed(reason.to_owned()));
        attempt.failed(reason);
    }
}

/// A plaintext client: the bytes it sends first are on its socket, where
/// [`read_sent`] finds them; a TLS client's sit decrypted in its session.
fn may_speak(client: &Stream) -> bool {
    matches!(client, Stream::Tcp(_) | Stream::Unix(_))
}

/// What the client had sent by the time its peer was connected.
enum SentEarly {
    /// Nothing yet, or end of stream (which stays for the relay to read).
    Nothing,
    /// Bytes read, which the relay writes first.
    Read(Seed),
    /// The read failed (a reset), which the relay reports.
    Failed(io::Error),
}

/// Reads, without waiting, what a plaintext client has sent: the relay's
/// first read, done as its peer is connected, so that a client that has not
/// spoken is known (the connect's last ACK then goes at once). Reading here
/// instead of peeking saves a system call per connection (issue 19). A read
/// that fills less than the buffer clears the runtime's readiness, as the
/// relay's own reads do.
fn read_sent(client: &Stream) -> SentEarly {
    let mut buffer = take_buffer();
    let mut short_read = None;
    let mut read = |socket: SockRef<'_>| {
        let read = (&*socket).read(&mut buffer)?;
        if read > 0 && read < buffer.len() {
            short_read = Some(read);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(read)
    };
    let result = match client {
        Stream::Tcp(stream) => stream.try_io(Interest::READABLE, || read(SockRef::from(stream))),
        Stream::Unix(stream) => stream.try_io(Interest::READABLE, || read(SockRef::from(stream))),
        Stream::TlsToPeer(_) | Stream::TlsFromClient(_) => Ok(0),
    };
    match (result, short_read) {
        (_, Some(len)) | (Ok(len), None) if len > 0 => SentEarly::Read(Seed { buffer, len }),
        (Err(err), None)
            if !matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            give_back_buffer(buffer);
            SentEarly::Failed(err)
        }
        _ => {
            give_back_buffer(buffer);
            SentEarly::Nothing
        }
    }
}

/// The bytes `balance = "hash"` hashes for this client; empty for other methods.
fn hash_key(balance: &Balance, client_addr: ClientAddr) -> Vec<u8> {
    match (balance, client_addr) {
        (Balance::Hash(HashKey::ClientIp), ClientAddr::Inet(addr)) => {
            addr.ip().to_string().into_bytes()
        }
        (Balance::Hash(HashKey::ClientAddr), ClientAddr::Inet(addr)) => {
            addr.to_string().into_bytes()
        }
        _ => Vec::new(),
    }
}

/// Hooks for the integration tests; compiled into debug builds only.
#[cfg(debug_assertions)]
mod test_hooks {
    use std::sync::OnceLock;

    /// Panics a connection's task once it holds a lease on the peer named by
    /// `SLUICE_TEST_PANIC_PEER`, to show that a panic ends only that
    /// connection and releases the peer.
    pub fn panic_if_asked(peer: &str) {
        static PEER: OnceLock<Option<String>> = OnceLock::new();
        let wanted = PEER.get_or_init(|| std::env::var("SLUICE_TEST_PANIC_PEER").ok());
        if wanted.as_deref() == Some(peer) {
            panic!("SLUICE_TEST_PANIC_PEER: panicking the connection to {peer}");
        }
    }
}
