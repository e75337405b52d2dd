//! Connecting to a peer: the socket, the PROXY header sent in the clear, and
//! TLS origination, within one timeout.

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

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
        // Boxed: the handshake's state is over a kilobyte, and inline it
        // would make every connect's future that large, TLS or not, which
        // each connection then copies as it starts.
        Some(tls) => Ok(Stream::TlsToPeer(Box::new(
            Box::pin(tls::originate(tls, stream)).await?,
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
    // A deadline past what an Instant holds is never reached.
    let deadline = Instant::now().checked_add(timeout);
    let mut local_error = None;
    let outcome = {
        let attempts = pin!(async {
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
        });
        by_deadline(deadline, attempts).await
    };
    match (outcome, local_error) {
        (Some(Ok(stream)), _) => Connected::Stream(stream),
        (Some(Err(err)), _) => Connected::Failed(err),
        (None, Some(err)) => Connected::LocalResources(err),
        (None, None) => Connected::TimedOut,
    }
}

/// Runs `work` to its end, or until `deadline` (`None` when it ends only
/// by itself). A connect to a nearby peer ends by the runtime's next turn
/// on its events: `work` is given that turn before a timer is set, and
/// most connects are done without one: 2.5% fewer user-space
/// instructions per proxied connection than setting a timer and cancelling
/// it (docs/BENCHMARKS.md).
async fn by_deadline<F: Future>(
    deadline: Option<Instant>,
    mut work: Pin<&mut F>,
) -> Option<F::Output> {
    if let Poll::Ready(output) = poll_once(work.as_mut()).await {
        return Some(output);
    }
    // Woken after the runtime's next turn on its events.
    tokio::task::yield_now().await;
    if let Poll::Ready(output) = poll_once(work.as_mut()).await {
        return Some(output);
    }
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, work).await.ok(),
        None => Some(work.await),
    }
}

async fn poll_once<F: Future>(mut work: Pin<&mut F>) -> Poll<F::Output> {
    poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await
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

#[cfg(test)]
mod tests {
    use std::future::pending;

    use super::*;

    /// Work that ends after `turns` polls, waking itself after each.
    async fn after_turns(turns: usize) -> &'static str {
        for _ in 0..turns {
            tokio::task::yield_now().await;
        }
        "done"
    }

    #[tokio::test(start_paused = true)]
    async fn work_that_ends_before_the_deadline_gives_its_output() {
        let deadline = Some(Instant::now() + Duration::from_secs(1));
        for turns in [0, 1, 2, 10] {
            let work = pin!(after_turns(turns));
            assert_eq!(
                by_deadline(deadline, work).await,
                Some("done"),
                "{turns} turns"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn work_past_the_deadline_is_cut_at_it() {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(1);
        let work = pin!(pending::<()>());
        // A deadline left unset would leave the work pending: the guard,
        // later, ends the test instead of hanging it.
        let cut = tokio::time::timeout(Duration::from_secs(2), by_deadline(Some(deadline), work));
        assert_eq!(cut.await, Ok(None));
        assert_eq!(Instant::now(), deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadline_work_runs_to_its_end() {
        let work = pin!(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            7
        });
        assert_eq!(by_deadline(None, work).await, Some(7));
    }
}
