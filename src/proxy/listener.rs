//! Binding listeners and accepting clients.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::stream::Stream;
use super::{serve_connection, ClientAddr, ListenerContext};
use crate::config::Address;
use crate::stats::ListenerMetrics;

/// A listener that could not be bound: a start-up failure (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("listener {listener:?}: cannot listen on {address}: {source}")]
pub struct BindError {
    pub listener: String,
    pub address: String,
    #[source]
    pub source: io::Error,
}

pub enum BoundSocket {
    Tcp(TcpListener),
    Unix(UnixListener, UnixSocketFile),
}

/// Removes a UNIX listener's socket file when the listener goes away.
pub struct UnixSocketFile(PathBuf);

impl Drop for UnixSocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const LISTEN_BACKLOG: i32 = 1024;

/// Binds the listener's address. A host name binds its first address.
pub async fn bind(name: &str, address: &Address, unix_mode: u32) -> Result<BoundSocket, BindError> {
    let error = |source: io::Error| BindError {
        listener: name.to_owned(),
        address: address.to_string(),
        source,
    };
    match address {
        Address::Inet { host, port } => {
            let addr = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(error)?
                .next()
                .ok_or_else(|| {
                    error(io::Error::new(
                        io::ErrorKind::NotFound,
                        "the name has no addresses",
                    ))
                })?;
            bind_tcp(addr).map(BoundSocket::Tcp).map_err(error)
        }
        Address::Unix(path) => bind_unix(path, unix_mode).map_err(error),
    }
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // Lets a restarted sluice bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // `[::1]` means IPv6 only; `[::]` keeps the OS's dual-stack default.
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

fn bind_unix(path: &Path, mode: u32) -> io::Result<BoundSocket> {
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        // A socket file nobody answers on is left over from a crash: replace it.
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                ))
            }
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)?
            }
            Err(err) => return Err(err),
        }
    }
    let listener = UnixListener::bind(path)?;
    let guard = UnixSocketFile(path.to_owned());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(BoundSocket::Unix(listener, guard))
}

impl BoundSocket {
    pub(crate) async fn accept(&self) -> io::Result<(Stream, ClientAddr)> {
        match self {
            BoundSocket::Tcp(listener) => {
                let (stream, addr) = listener.accept().await?;
                // A client connection that cannot take the option is still served.
                let _ = stream.set_nodelay(true);
                Ok((Stream::Tcp(stream), ClientAddr::Inet(addr)))
            }
            BoundSocket::Unix(listener, _) => {
                let (stream, _) = listener.accept().await?;
                Ok((Stream::Unix(stream), ClientAddr::Unix))
            }
        }
    }

    pub fn local_addr(&self) -> String {
        match self {
            BoundSocket::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|err| err.to_string(), |addr| addr.to_string()),
            BoundSocket::Unix(_, UnixSocketFile(path)) => format!("unix:{}", path.display()),
        }
    }
}

/// Errors that concern one client, not the listener: accept again at once.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts clients until `stop` fires, serving each in a task tracked by `connections`.
pub async fn accept_loop(
    socket: BoundSocket,
    context: Arc<ArcSwap<ListenerContext>>,
    stop: CancellationToken,
    connections: TaskTracker,
) {
    let name = context.load().config.name.clone();
    let metrics = ListenerMetrics::new(&name);
    info!(listener = name.as_str(), address = %socket.local_addr(), upstream = context.load().config.upstream.as_str(), "listening");
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = socket.accept() => accepted,
        };
        match accepted {
            Ok((stream, client_addr)) => {
                backoff = Duration::from_millis(5);
                let active = metrics.accepted();
                let serve = serve_connection(stream, client_addr, context.load_full());
                connections.spawn(async move {
                    serve.await;
                    drop(active);
                });
            }
            Err(err) if is_connection_error(&err) => {}
            Err(err) => {
                // Out of descriptors or memory: wait for connections to close
                // instead of spinning on a listener that stays readable.
                warn!(listener = name.as_str(), reason = %err, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
    info!(listener = name.as_str(), "stopped accepting");
}
