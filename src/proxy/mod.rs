//! The data path: accept a client, connect to a peer with next-upstream
//! retries, relay until done.

pub mod listener;
pub mod relay;
#[cfg(target_os = "linux")]
mod splice;
pub mod stream;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::balancer::Tried;
use crate::config::{Balance, HashKey, ListenerConfig};
use crate::upstream::{Lease, PeerTarget, SharedUpstream, Upstream};
use relay::{relay, RelayEnd, RelayOutcome};
use stream::Stream;

/// What a listener's connections need: its settings and its upstream group.
/// A reload stores a new context; connections keep the one they started with.
pub struct ListenerContext {
    pub config: ListenerConfig,
    pub upstream: SharedUpstream,
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
    TriesExhausted(u32),
    TimeoutExhausted(Duration),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::NoEligiblePeer => f.write_str("no eligible peer"),
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
        }
    }
}

/// Serves one client connection from accept to close.
pub async fn serve_connection(
    mut client: Stream,
    client_addr: ClientAddr,
    context: Arc<ListenerContext>,
) {
    let group = context.upstream.load_full();
    let listener = context.config.name.as_str();
    let upstream = group.name.as_str();
    let (lease, mut upstream_stream) = match connect_upstream(&context.config, &group, client_addr)
        .await
    {
        Ok(connected) => connected,
        Err(reason) => {
            // Dropping the client closes it at once with nothing written.
            warn!(listener, upstream, client = %client_addr, reason = %reason, "client turned away: no peer could take the connection");
            return;
        }
    };
    let peer = lease.peer().label.as_str();
    let outcome = relay_streams(
        &mut client,
        &mut upstream_stream,
        context.config.idle_timeout,
    )
    .await;
    let (sent, received) = (outcome.sent, outcome.received);
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

/// Plaintext socket pairs are spliced inside the kernel on Linux; anything
/// else (TLS, other systems) is copied through user-space buffers.
async fn relay_streams(
    client: &mut Stream,
    upstream: &mut Stream,
    idle_timeout: Option<Duration>,
) -> RelayOutcome {
    #[cfg(target_os = "linux")]
    if let Some((client, upstream)) = client.plain_socket().zip(upstream.plain_socket()) {
        return splice::relay(client, upstream, idle_timeout).await;
    }
    relay(client, upstream, idle_timeout).await
}

/// Tries peers until one accepts, within next_upstream_tries and next_upstream_timeout.
async fn connect_upstream(
    config: &ListenerConfig,
    group: &Arc<Upstream>,
    client_addr: ClientAddr,
) -> Result<(Lease, Stream), Unavailable> {
    let started = Instant::now();
    let key = hash_key(&group.balance, client_addr);
    let mut tried = Tried::default();
    let mut attempts = 0;
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
        let attempt = group
            .select(&mut tried, &key)
            .ok_or(Unavailable::NoEligiblePeer)?;
        attempts += 1;
        let reason = match tokio::time::timeout(timeout, connect(&attempt.peer().target)).await {
            Ok(Ok(stream)) => return Ok((attempt.succeeded(), stream)),
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!(
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
        attempt.failed();
    }
}

async fn connect(target: &PeerTarget) -> io::Result<Stream> {
    match target {
        PeerTarget::Tcp(addr) => {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(Stream::Tcp(stream))
        }
        PeerTarget::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
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
