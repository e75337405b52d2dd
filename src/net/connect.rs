//! Connecting to a peer: the socket, the PROXY header sent in the clear, and
//! TLS origination, within one timeout.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};

use super::{PeerTarget, Stream};
use crate::tls::{self, TlsOrigin};

/// Connects to `target`, sends `proxy_header` (if not empty) in the clear,
/// and, with `tls`, completes the handshake. Health checks connect the same
/// way. `bytes_follow`: the caller expects to send bytes right after the
/// connect; if none come, it calls [`send_handshake_ack`].
pub async fn connect_peer(
    target: &PeerTarget,
    tls: Option<&TlsOrigin>,
    proxy_header: &[u8],
    bytes_follow: bool,
) -> io::Result<Stream> {
    // When bytes go out right after the handshake, its last ACK can ride on
    // them: one packet fewer per connection (HAProxy does the same). Never
    // otherwise: a server that speaks first would wait for a delayed ACK.
    let sends_at_once = bytes_follow || !proxy_header.is_empty() || tls.is_some();
    let mut stream = connect(target, sends_at_once).await?;
    if !proxy_header.is_empty() {
        stream.write_all(proxy_header).await.map_err(|err| {
            io::Error::new(err.kind(), format!("cannot send the PROXY header: {err}"))
        })?;
    }
    match tls {
        Some(tls) => Ok(Stream::TlsToPeer(Box::new(
            tls::originate(tls, stream).await?,
        ))),
        None => Ok(stream),
    }
}

/// How a connect within a timeout ended.
pub enum Connected {
    Stream(Stream),
    Failed(io::Error),
    TimedOut,
    /// sluice could not open a socket until the timeout.
    LocalResources(io::Error),
}

/// [`connect_peer`] within `timeout`. When sluice is out of descriptors it
/// waits for one to free up rather than turning away a client it has
/// already accepted.
pub async fn connect_within(
    timeout: Duration,
    target: &PeerTarget,
    tls: Option<&TlsOrigin>,
    proxy_header: &[u8],
    bytes_follow: bool,
) -> Connected {
    let mut local_error = None;
    let outcome = tokio::time::timeout(timeout, async {
        let mut pause = Duration::from_millis(5);
        loop {
            local_error = None;
            match connect_peer(target, tls, proxy_header, bytes_follow).await {
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

/// Sends the connect's last ACK now, where [`connect_peer`] held it back for
/// bytes that did not come: a server that speaks first waits for it.
pub fn send_handshake_ack(stream: &Stream) {
    if let Stream::Tcp(stream) = stream {
        // Only an optimisation was asked for: a refusal leaves the delayed ACK.
        let _ = SockRef::from(stream).set_quickack(true);
    }
}

/// Opens a TCP connection. tokio's own connect asks every new connection
/// for its error (`getsockopt(SO_ERROR)`); the readiness that ends the
/// connect already tells a refused or reset one (EPOLLERR or EPOLLHUP) from
/// an established one, so the error is fetched only then: one system call
/// fewer per proxied connection, with the same outcome.
async fn connect_tcp(addr: SocketAddr, delay_handshake_ack: bool) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_nodelay(true)?;
    if delay_handshake_ack {
        // Only an optimisation: a refusal changes nothing else.
        let _ = socket.set_quickack(false);
    }
    match socket.connect(&addr.into()) {
        Err(err) if err.raw_os_error() != Some(libc::EINPROGRESS) => return Err(err),
        _ => {}
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        if let Some(err) = stream.take_error()? {
            return Err(err);
        }
    }
    Ok(stream)
}

fn is_local_resource_error(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

async fn connect(target: &PeerTarget, delay_handshake_ack: bool) -> io::Result<Stream> {
    match target {
        PeerTarget::Tcp(addr) => Ok(Stream::Tcp(connect_tcp(*addr, delay_handshake_ack).await?)),
        PeerTarget::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
    }
}
