//! Binding listeners and accepting clients.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use metrics::{Counter, Gauge};

use super::{ClientAddr, Stream};
use crate::config::Address;
use crate::metrics::names;

/// A listener that could not be bound: a start-up failure (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("listener {listener:?}: cannot listen on {address}: {source}")]
pub struct BindError {
    pub listener: String,
    pub address: String,
    #[source]
    pub source: io::Error,
}

/// A bound listening address: the sockets, not yet tied to any runtime, so
/// that every worker can accept on it through its own event loop.
pub enum BoundSocket {
    /// One socket per worker, sharing the address through SO_REUSEPORT: the
    /// kernel spreads new clients over the workers, and no worker is woken
    /// for a client another one takes.
    Tcp(Vec<std::net::TcpListener>),
    /// UNIX sockets have no SO_REUSEPORT: every worker accepts on the one socket.
    Unix(std::os::unix::net::UnixListener, UnixSocketFile),
}

/// Removes a UNIX listener's socket file when the listener goes away.
pub struct UnixSocketFile(PathBuf);

impl Drop for UnixSocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const LISTEN_BACKLOG: i32 = 1024;

/// Binds the listener's address, for `workers` workers to accept on. A host
/// name binds its first address.
pub async fn bind(
    name: &str,
    address: &Address,
    unix_mode: u32,
    workers: usize,
) -> Result<BoundSocket, BindError> {
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
            bind_tcp(addr, workers.max(1))
                .map(BoundSocket::Tcp)
                .map_err(error)
        }
        Address::Unix(path) => bind_unix(path, unix_mode).map_err(error),
    }
}

fn bind_tcp(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if count == 1 {
        return Ok(vec![tcp_socket(addr, false)?]);
    }
    // SO_REUSEPORT would let this bind join sockets another process (a
    // second sluice started by mistake) holds with it. A plain bind first
    // fails on any address in use, and picks the port when `addr` has none.
    let probe = tcp_socket(addr, false)?;
    let addr = probe.local_addr()?;
    drop(probe);
    (0..count).map(|_| tcp_socket(addr, true)).collect()
}

fn tcp_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // Lets a restarted sluice bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // `[::1]` means IPv6 only; `[::]` keeps the OS's dual-stack default.
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    // Accepted sockets inherit it on Linux: no setsockopt per client.
    socket.set_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
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
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    let guard = UnixSocketFile(path.to_owned());
    listener.set_nonblocking(true)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(BoundSocket::Unix(listener, guard))
}

impl BoundSocket {
    /// Worker `worker`'s accepting end, registered with the runtime this is
    /// called on. It holds a duplicate of the descriptor, so the socket stays
    /// open for the other workers (and for a listener taking it over on
    /// reload) after this accept loop ends.
    pub(crate) fn acceptor(&self, worker: usize) -> io::Result<Acceptor> {
        match self {
            BoundSocket::Tcp(sockets) => {
                let socket = &sockets[worker % sockets.len()];
                Ok(Acceptor::Tcp(TcpListener::from_std(socket.try_clone()?)?))
            }
            BoundSocket::Unix(listener, _) => Ok(Acceptor::Unix(UnixListener::from_std(
                listener.try_clone()?,
            )?)),
        }
    }

    /// `delayed_ack` (docs/SPEC.md): on Linux, a listening socket that
    /// leaves quick-ACK mode (TCP_QUICKACK off, set after `listen`, which
    /// resets it) passes that to every socket it accepts, so the ACK of a
    /// client's first bytes waits to ride on the reply instead of being a
    /// segment of its own, at no system call per client. The kernel sends it
    /// alone after its delayed-ACK time (40 ms at least) if no reply comes
    /// first. UNIX sockets have no ACKs.
    pub fn set_delayed_ack(&self, delayed: bool) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            BoundSocket::Tcp(sockets) => sockets
                .iter()
                .try_for_each(|socket| socket2::SockRef::from(socket).set_quickack(!delayed)),
            #[cfg(not(target_os = "linux"))]
            BoundSocket::Tcp(_) => Ok(()),
            BoundSocket::Unix(..) => Ok(()),
        }
    }

    pub fn local_addr(&self) -> String {
        match self {
            BoundSocket::Tcp(sockets) => match sockets.first().map(|socket| socket.local_addr()) {
                Some(Ok(addr)) => addr.to_string(),
                Some(Err(err)) => err.to_string(),
                None => "no socket".to_owned(),
            },
            BoundSocket::Unix(_, UnixSocketFile(path)) => format!("unix:{}", path.display()),
        }
    }
}

/// A listening socket registered with one runtime.
pub(crate) enum Acceptor {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Acceptor {
    pub(crate) async fn accept(&self) -> io::Result<(Stream, ClientAddr)> {
        match self {
            Acceptor::Tcp(listener) => {
                let (stream, addr) = listener.accept().await?;
                Ok((Stream::Tcp(stream), ClientAddr::Inet(addr)))
            }
            Acceptor::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                Ok((Stream::Unix(stream), ClientAddr::Unix))
            }
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

/// The first pause after a failed accept; it doubles up to MAX_ACCEPT_BACKOFF.
const FIRST_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Worker `worker`'s share of the listener `name`: accepts clients until
/// `stop` fires, serving each in a task on this worker's runtime, tracked by
/// `connections`. `server()` is called at each accept and gives what serves
/// that client (the listener's settings as they are at that moment).
pub async fn accept_loop<F, H, S>(
    name: String,
    socket: Arc<BoundSocket>,
    worker: usize,
    server: F,
    stop: CancellationToken,
    connections: TaskTracker,
    counts: Arc<ListenerCounts>,
) where
    F: Fn() -> H,
    H: FnOnce(Stream, ClientAddr) -> S + Send + 'static,
    S: Future<Output = ()> + Send,
{
    let metrics = ListenerMetrics::new(&name, counts);
    let mut backoff = FIRST_ACCEPT_BACKOFF;
    // Clients the kernel queues on this worker's socket wait until it
    // accepts, so a failure here is retried, never given up.
    let acceptor = loop {
        match socket.acceptor(worker) {
            Ok(acceptor) => break acceptor,
            Err(err) => {
                warn!(listener = name.as_str(), worker, reason = %err, backoff_ms = backoff.as_millis() as u64, "cannot register the listening socket; retrying");
                if backed_off(&stop, &mut backoff).await {
                    return;
                }
            }
        }
    };
    backoff = FIRST_ACCEPT_BACKOFF;
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = acceptor.accept() => accepted,
        };
        match accepted {
            Ok((stream, client_addr)) => {
                backoff = FIRST_ACCEPT_BACKOFF;
                let active = metrics.accepted();
                let serve = server();
                // Built inside the task: a future built outside and awaited
                // in it would be stored twice for the connection's life.
                // Boxed: spawning moves a task's future several times on its
                // way into the runtime, a copy of some 900 bytes each; a box
                // moves as a pointer.
                connections.spawn(Box::pin(async move {
                    serve(stream, client_addr).await;
                    drop(active);
                }));
            }
            Err(err) if is_connection_error(&err) => {}
            Err(err) => {
                // Out of descriptors or memory: wait for connections to close
                // instead of spinning on a listener that stays readable.
                warn!(listener = name.as_str(), reason = %err, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                if backed_off(&stop, &mut backoff).await {
                    break;
                }
            }
        }
    }
}

/// Sleeps `backoff`, then doubles it up to MAX_ACCEPT_BACKOFF; true if
/// `stop` fired meanwhile.
async fn backed_off(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => return true,
        () = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(MAX_ACCEPT_BACKOFF);
    false
}

/// A listener's counts for `/status`, shared by its accept loops on every
/// worker and kept across reloads while the listener keeps its name.
#[derive(Debug, Default)]
pub struct ListenerCounts {
    accepted: AtomicU64,
    active: AtomicU64,
}

impl ListenerCounts {
    /// (accepted, active).
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.accepted.load(Ordering::Relaxed),
            self.active.load(Ordering::Relaxed),
        )
    }
}

/// One running listener as `/status` reports it.
#[derive(Debug, Clone)]
pub struct ListenerReport {
    pub name: String,
    /// The address bound (the port chosen when the configuration gave 0).
    pub address: String,
    pub upstream: String,
    pub counts: Arc<ListenerCounts>,
}

/// A listener's series in the recorder, looked up once per accept loop, and
/// its shared counts.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    total: Counter,
    active: Gauge,
    counts: Arc<ListenerCounts>,
}

impl ListenerMetrics {
    pub fn new(listener: &str, counts: Arc<ListenerCounts>) -> ListenerMetrics {
        let labels = [("listener", listener.to_owned())];
        ListenerMetrics {
            total: metrics::counter!(names::LISTENER_CONNECTIONS_TOTAL, &labels),
            active: metrics::gauge!(names::LISTENER_CONNECTIONS_ACTIVE, &labels),
            counts,
        }
    }

    /// A client was accepted; it counts as active until the guard drops.
    pub fn accepted(&self) -> ActiveClient {
        self.total.increment(1);
        self.active.increment(1.0);
        self.counts.accepted.fetch_add(1, Ordering::Relaxed);
        self.counts.active.fetch_add(1, Ordering::Relaxed);
        ActiveClient(self.active.clone(), Arc::clone(&self.counts))
    }
}

/// Keeps one client counted in `sluice_listener_connections_active` and
/// the listener's active count.
pub struct ActiveClient(Gauge, Arc<ListenerCounts>);

impl Drop for ActiveClient {
    fn drop(&mut self) {
        self.0.decrement(1.0);
        self.1.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `workers` TCP sockets on one free loopback port, and that address.
    async fn loopback_sockets(workers: usize) -> (BoundSocket, SocketAddr) {
        // Port 0: the probe bind picks a free port, which every socket shares.
        let address = Address::Inet {
            host: "127.0.0.1".into(),
            port: 0,
        };
        let socket = bind("test", &address, 0o600, workers).await.expect("bound");
        let BoundSocket::Tcp(sockets) = &socket else {
            panic!("a TCP address binds TCP sockets");
        };
        assert_eq!(sockets.len(), workers);
        let addr = sockets[0].local_addr().expect("an address");
        for socket in sockets {
            assert_eq!(socket.local_addr().expect("an address"), addr);
        }
        (socket, addr)
    }

    #[tokio::test]
    async fn accepted_clients_have_nodelay_from_the_listening_socket() {
        let (socket, addr) = loopback_sockets(2).await;
        let clients: Vec<_> = (0..8)
            .map(|_| std::net::TcpStream::connect(addr).expect("connected"))
            .collect();
        let acceptors = [
            socket.acceptor(0).expect("registered"),
            socket.acceptor(1).expect("registered"),
        ];
        let mut accepted = 0;
        // Each client is queued on one of the two sockets; 100 rounds of
        // 50 ms bound the wait.
        for _ in 0..100 {
            if accepted == clients.len() {
                break;
            }
            for acceptor in &acceptors {
                let ready = tokio::time::timeout(Duration::from_millis(50), acceptor.accept());
                if let Ok(Ok((Stream::Tcp(stream), _))) = ready.await {
                    assert!(stream.nodelay().expect("readable option"));
                    accepted += 1;
                }
            }
        }
        assert_eq!(accepted, clients.len());
    }

    /// `delayed_ack`: accepted sockets take the listening socket's
    /// quick-ACK mode, both ways, with no call on the accepted socket.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_clients_take_the_listening_sockets_ack_mode() {
        let (socket, addr) = loopback_sockets(1).await;
        let acceptor = socket.acceptor(0).expect("registered");
        for delayed in [true, false, true] {
            socket.set_delayed_ack(delayed).expect("set");
            let _client = std::net::TcpStream::connect(addr).expect("connected");
            let accepted = tokio::time::timeout(Duration::from_secs(5), acceptor.accept()).await;
            let Ok(Ok((Stream::Tcp(stream), _))) = accepted else {
                panic!("no client accepted");
            };
            let quick = socket2::SockRef::from(&stream)
                .quickack()
                .expect("readable option");
            assert_eq!(quick, !delayed, "delayed_ack = {delayed}");
        }
    }

    #[test]
    fn listener_counts_follow_accepts_and_closes() {
        let counts = Arc::new(ListenerCounts::default());
        let metrics = ListenerMetrics::new("front", Arc::clone(&counts));
        let first = metrics.accepted();
        let second = metrics.clone().accepted();
        assert_eq!(counts.snapshot(), (2, 2));
        drop(first);
        assert_eq!(counts.snapshot(), (2, 1));
        drop(second);
        assert_eq!(counts.snapshot(), (2, 0));
    }
}
