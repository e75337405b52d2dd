//! The data path: accept a client, connect to a peer with next-upstream
//! retries, relay until done.

pub mod listener;
pub mod proxy_header;
pub mod relay;
#[cfg(target_os = "linux")]
mod splice;
pub mod stream;

use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, UnixStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::access_log::{AccessRecord, Close, TryOutcome};
use crate::balancer::Tried;
use crate::config::{Balance, HashKey, ListenerConfig, ProxyProtocol, ValueError};
use crate::tls::handshake_errors::{HandshakeError, HandshakeErrors};
use crate::tls::read_ahead::ReadAhead;
use crate::tls::{self, TlsOrigin};
use crate::upstream::{Lease, Peer, PeerTarget, SharedUpstream, Upstream};
use proxy_header::Origin;
use relay::{relay, RelayEnd, RelayOutcome, Side};
use stream::Stream;

/// What a listener's connections need: its settings and its upstream group.
/// A reload stores a new context; connections keep the one they started with.
pub struct ListenerContext {
    pub config: ListenerConfig,
    pub upstream: SharedUpstream,
    /// TLS termination, loaded from the listener's files once per load.
    pub tls: Option<TlsAcceptor>,
    /// Counts and log limits of failed client handshakes, with `tls`.
    handshake_errors: Option<HandshakeErrors>,
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
        Ok(ListenerContext {
            config,
            upstream,
            tls,
            handshake_errors,
        })
    }
}

/// A client's address: TCP clients have one; UNIX-socket clients usually do not.
#[derive(Debug, Clone, Copy)]
pub enum ClientAddr {
    Inet(SocketAddr),
    Unix,
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientAddr::Inet(addr) => write!(f, "{addr}"),
            ClientAddr::Unix => f.write_str("unix"),
        }
    }
}

/// Why no peer took a client connection.
enum Unavailable {
    NoEligiblePeer,
    /// Every eligible peer was tried and failed; the last failure's reason.
    AllFailed {
        attempts: u32,
        last: String,
    },
    TriesExhausted(u32),
    TimeoutExhausted(Duration),
    /// sluice itself could not open a socket.
    LocalResources(io::Error),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::NoEligiblePeer => f.write_str("no eligible peer"),
            Unavailable::AllFailed { attempts: 1, last } => {
                write!(f, "the only eligible peer failed: {last}")
            }
            Unavailable::AllFailed { attempts, last } => {
                write!(f, "all {attempts} eligible peers failed; the last: {last}")
            }
            Unavailable::TriesExhausted(tries) => {
                write!(f, "next_upstream_tries ({tries}) used up")
            }
            Unavailable::TimeoutExhausted(timeout) => {
                write!(
                    f,
                    "next_upstream_timeout ({}) passed",
                    humantime::format_duration(*timeout)
                )
            }
            Unavailable::LocalResources(err) => write!(f, "cannot open a socket: {err}"),
        }
    }
}

/// Serves one client connection from accept to close.
pub async fn serve_connection(
    client: Stream,
    client_addr: ClientAddr,
    context: Arc<ListenerContext>,
) {
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
    }) = Box::pin(establish(client, client_addr, &context, &group)).await
    else {
        return;
    };
    // The lease came from `group`, so its index names the same peer there.
    let peer = &group.peers[lease.index()];
    #[cfg(debug_assertions)]
    test_hooks::panic_if_asked(&peer.label);
    let outcome = relay_streams(
        &mut client,
        &mut upstream_stream,
        context.config.idle_timeout,
        |sent, received| peer.stats.relayed(sent, received),
    )
    .await;
    // Free the peer before reporting, so whoever reads the report sees it free.
    drop(lease);
    let listener = context.config.name.as_str();
    let upstream = group.name.as_str();
    let peer = peer.label.as_str();
    let (sent, received) = (outcome.sent, outcome.received);
    let close = match &outcome.end {
        RelayEnd::Done => Close::Done,
        RelayEnd::Idle => Close::Idle,
        RelayEnd::Error(Side::Client, err) => Close::ClientError(err),
        RelayEnd::Error(Side::Upstream, err) => Close::UpstreamError(err),
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
        client = match terminate_tls(acceptor, client, context.config.connect_timeout).await {
            Ok(client) => client,
            Err(error) => {
                if let Some(errors) = &context.handshake_errors {
                    errors.record(&error, listener, upstream, &client_addr);
                }
                access.finish(None, 0, 0, Close::ClientError(&error.message));
                return None;
            }
        };
    }
    let client_spoke = has_bytes_waiting(&client);
    match connect_upstream(
        &context.config,
        group,
        client_addr,
        &proxy_header,
        client_spoke,
        &mut access,
    )
    .await
    {
        Ok((lease, upstream_stream)) => Some(Established {
            client,
            upstream_stream,
            lease,
            client_addr,
            access,
        }),
        Err(reason) => {
            // Dropping the client closes it at once with nothing written.
            group.count_unavailable();
            warn!(listener, upstream, client = %client_addr, reason = %reason, "client turned away: no peer could take the connection");
            access.finish(None, 0, 0, Close::NoPeer(&reason));
            None
        }
    }
}

/// Plaintext socket pairs are relayed by the kernel-assisted path on Linux;
/// anything else (TLS, other systems) is copied through user-space buffers.
async fn relay_streams(
    client: &mut Stream,
    upstream: &mut Stream,
    idle_timeout: Option<Duration>,
    report: impl FnMut(u64, u64),
) -> RelayOutcome {
    #[cfg(target_os = "linux")]
    if let Some((client, upstream)) = client.plain_socket().zip(upstream.plain_socket()) {
        return splice::relay(client, upstream, idle_timeout, report).await;
    }
    relay(client, upstream, idle_timeout, report).await
}

/// Tries peers until one accepts, within next_upstream_tries and next_upstream_timeout.
async fn connect_upstream(
    config: &ListenerConfig,
    group: &Arc<Upstream>,
    client_addr: ClientAddr,
    proxy_header: &[u8],
    client_spoke: bool,
    access: &mut AccessRecord<'_>,
) -> Result<(Lease, Stream), Unavailable> {
    let started = Instant::now();
    let key = hash_key(&group.balance, client_addr);
    let mut tried = Tried::default();
    let mut attempts = 0;
    let mut last_failure = None;
    loop {
        if config.next_upstream_tries > 0 && attempts >= config.next_upstream_tries {
            return Err(Unavailable::TriesExhausted(config.next_upstream_tries));
        }
        let mut timeout = config.connect_timeout;
        if let Some(total) = config.next_upstream_timeout {
            let left = total.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(Unavailable::TimeoutExhausted(total));
            }
            timeout = timeout.min(left);
        }
        let Some(attempt) = group.select(&mut tried, &key) else {
            return Err(match last_failure {
                Some(last) => Unavailable::AllFailed { attempts, last },
                None => Unavailable::NoEligiblePeer,
            });
        };
        attempts += 1;
        // One timeout covers the connect and the TLS handshake.
        let reason = match connect_within(timeout, attempt.peer(), proxy_header, client_spoke).await
        {
            Connected::Stream(stream) => {
                access.tried(&attempt.peer().label, TryOutcome::Connected);
                return Ok((attempt.succeeded(), stream));
            }
            // Out of descriptors or memory for the whole attempt is sluice's
            // trouble, not the peer's: released without counting a failure.
            Connected::LocalResources(err) => return Err(Unavailable::LocalResources(err)),
            Connected::Failed(err) => err.to_string(),
            Connected::TimedOut if attempt.peer().tls.is_some() => format!(
                "connect and TLS handshake timed out after {}",
                humantime::format_duration(timeout)
            ),
            Connected::TimedOut => format!(
                "connect timed out after {}",
                humantime::format_duration(timeout)
            ),
        };
        warn!(
            listener = config.name.as_str(),
            upstream = group.name.as_str(),
            peer = attempt.peer().label.as_str(),
            client = %client_addr,
            reason = %reason,
            "upstream connect attempt failed"
        );
        access.tried(&attempt.peer().label, TryOutcome::Failed(reason.clone()));
        attempt.failed(&reason);
        last_failure = Some(reason);
    }
}

/// Connects to the peer, sends `proxy_header` (if not empty) in the clear,
/// and, if the peer speaks TLS, completes the handshake. Health checks
/// connect the same way. `client_spoke`: the client has sent bytes that
/// will follow the connect at once.
pub(crate) async fn connect_peer(
    peer: &Peer,
    proxy_header: &[u8],
    client_spoke: bool,
) -> io::Result<Stream> {
    // When bytes go out right after the handshake, its last ACK can ride on
    // them: one packet fewer per connection (HAProxy does the same). Never
    // otherwise: a server that speaks first would wait for a delayed ACK.
    let sends_at_once = client_spoke || !proxy_header.is_empty() || peer.tls.is_some();
    let mut stream = connect(&peer.target, sends_at_once).await?;
    if !proxy_header.is_empty() {
        stream.write_all(proxy_header).await.map_err(|err| {
            io::Error::new(err.kind(), format!("cannot send the PROXY header: {err}"))
        })?;
    }
    match &peer.tls {
        Some(tls) => originate_tls(tls, stream).await,
        None => Ok(stream),
    }
}

async fn originate_tls(tls: &TlsOrigin, stream: Stream) -> io::Result<Stream> {
    match tls
        .connector
        .connect(tls.server_name.clone(), ReadAhead::new(stream))
        .await
    {
        Ok(stream) => Ok(Stream::TlsToPeer(Box::new(stream))),
        Err(err) => Err(io::Error::new(
            err.kind(),
            format!("TLS handshake failed: {err}"),
        )),
    }
}

/// The client's TLS handshake, within the listener's connect_timeout.
async fn terminate_tls(
    acceptor: &TlsAcceptor,
    client: Stream,
    timeout: Duration,
) -> Result<Stream, HandshakeError> {
    match tokio::time::timeout(timeout, acceptor.accept(ReadAhead::new(client))).await {
        Ok(Ok(stream)) => Ok(Stream::TlsFromClient(Box::new(stream))),
        Ok(Err(err)) => Err(HandshakeError::from_io(&err)),
        Err(_) => Err(HandshakeError::timed_out(timeout)),
    }
}

enum Connected {
    Stream(Stream),
    Failed(io::Error),
    TimedOut,
    /// sluice could not open a socket until the timeout.
    LocalResources(io::Error),
}

/// Connects within `timeout`. When sluice is out of descriptors it waits for
/// one to free up rather than turning away a client it has already accepted.
async fn connect_within(
    timeout: Duration,
    peer: &Peer,
    proxy_header: &[u8],
    client_spoke: bool,
) -> Connected {
    let mut local_error = None;
    let outcome = tokio::time::timeout(timeout, async {
        let mut pause = Duration::from_millis(5);
        loop {
            local_error = None;
            match connect_peer(peer, proxy_header, client_spoke).await {
                Err(err) if is_local_resource_error(&err) => {
                    local_error = Some(err);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    })
    .await;
    match (outcome, local_error) {
        (Ok(Ok(stream)), _) => Connected::Stream(stream),
        (Ok(Err(err)), _) => Connected::Failed(err),
        (Err(_), Some(err)) => Connected::LocalResources(err),
        (Err(_), None) => Connected::TimedOut,
    }
}

fn is_local_resource_error(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

async fn connect(target: &PeerTarget, delay_handshake_ack: bool) -> io::Result<Stream> {
    match target {
        PeerTarget::Tcp(addr) => {
            let socket = match addr {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            socket.set_nodelay(true)?;
            if delay_handshake_ack {
                // Only an optimisation: a refusal changes nothing else.
                let _ = SockRef::from(&socket).set_quickack(false);
            }
            Ok(Stream::Tcp(socket.connect(*addr).await?))
        }
        PeerTarget::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
    }
}

/// Whether the client has sent bytes not read yet; one non-blocking peek.
fn has_bytes_waiting(client: &Stream) -> bool {
    let socket = match client {
        Stream::Tcp(stream) => SockRef::from(stream),
        Stream::Unix(stream) => SockRef::from(stream),
        // Bytes a TLS client sent sit decrypted in the session, not here.
        Stream::TlsToPeer(_) | Stream::TlsFromClient(_) => return false,
    };
    // The socket is non-blocking: an empty queue is WouldBlock, not a wait.
    let mut byte = [MaybeUninit::uninit()];
    socket.peek(&mut byte).is_ok_and(|peeked| peeked > 0)
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
