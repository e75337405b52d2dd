//! Relaying through the real binary: bytes intact, half-close, timeouts, drain.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

async fn echo_setup(listener_extra: &str) -> (Backend, String, Sluice) {
    let backend = Backend::tcp("echo", Behavior::Echo).await;
    let listen = free_addr();
    let sluice = Sluice::start(&config(
        &listen,
        listener_extra,
        "",
        &[server(backend.addr, "")],
    ))
    .await;
    (backend, listen, sluice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_mib_pass_intact_both_ways() {
    let (backend, listen, _sluice) = echo_setup("").await;
    let data = payload(32 * 1024 * 1024, 1);
    let expected = sha256(&data);
    let stream = TcpStream::connect(&listen).await.unwrap();
    assert_eq!(echo_digest(stream, data).await, expected);
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_flows_back_after_the_client_half_closes() {
    let backend = Backend::tcp("digest", Behavior::DigestOnEof).await;
    let listen = free_addr();
    let _sluice = Sluice::start(&config(&listen, "", "", &[server(backend.addr, "")])).await;
    let data = payload(3 * 1024 * 1024 + 17, 2);
    let mut stream = TcpStream::connect(&listen).await.unwrap();
    stream.write_all(&data).await.unwrap();
    // The backend answers only after it sees our EOF through sluice.
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, sha256(&data));
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_full_duplex_echoes() {
    let (backend, listen, _sluice) = echo_setup("").await;
    let mut clients = tokio::task::JoinSet::new();
    for seed in 0..64 {
        let listen = listen.clone();
        clients.spawn(async move {
            let data = payload(256 * 1024 + seed as usize, seed);
            let expected = sha256(&data);
            let stream = TcpStream::connect(&listen).await.unwrap();
            assert_eq!(echo_digest(stream, data).await, expected, "client {seed}");
        });
    }
    while let Some(result) = clients.join_next().await {
        result.unwrap();
    }
    assert_eq!(backend.accepted(), 64);
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_listener_and_unix_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let upstream_path = dir.path().join("backend.sock");
    let listen_path = dir.path().join("front.sock");
    let backend = Backend::unix(&upstream_path, "u", Behavior::Echo).await;
    // A stale socket file from a crashed run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&listen_path).unwrap());
    assert!(listen_path.exists());
    let listen = format!("unix:{}", listen_path.display());
    let text = config(
        &listen,
        "unix_mode = \"0600\"",
        "",
        &[server(format!("unix:{}", upstream_path.display()), "")],
    );
    let mut sluice = Sluice::start(&text).await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&listen_path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let data = payload(1024 * 1024, 3);
    let stream = UnixStream::connect(&listen_path).await.unwrap();
    assert_eq!(echo_digest(stream, data.clone()).await, sha256(&data));
    assert_eq!(backend.accepted(), 1);

    // A second sluice must not steal the live socket.
    let mut second = Sluice::spawn(&text, &[]);
    let status = second
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("second sluice kept running");
    assert_eq!(status.code(), Some(2), "log:\n{}", second.log_text());
    assert!(listen_path.exists());

    sluice.signal(Signal::SIGTERM);
    let status = sluice.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(status.success());
    assert!(!listen_path.exists(), "socket file left behind");
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_a_silent_connection_but_not_a_busy_one() {
    let (backend, listen, sluice) = echo_setup("idle_timeout = \"600ms\"").await;
    let mut silent = TcpStream::connect(&listen).await.unwrap();
    let mut busy = TcpStream::connect(&listen).await.unwrap();
    let started = Instant::now();
    let silent_closed = tokio::spawn(async move {
        let mut rest = Vec::new();
        let _ = silent.read_to_end(&mut rest).await;
        started.elapsed()
    });
    // The busy connection moves a byte every 200 ms for 1.5 s and survives.
    let mut byte = [0u8; 1];
    while started.elapsed() < Duration::from_millis(1500) {
        busy.write_all(b"x").await.unwrap();
        busy.read_exact(&mut byte).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let closed_after = tokio::time::timeout(Duration::from_secs(5), silent_closed)
        .await
        .unwrap()
        .unwrap();
    assert!(
        closed_after >= Duration::from_millis(550),
        "closed after {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_millis(1500),
        "closed after {closed_after:?}"
    );
    busy.write_all(b"y").await.unwrap();
    busy.read_exact(&mut byte).await.unwrap();
    assert_eq!(&byte, b"y");
    assert!(
        sluice
            .wait_for_log("idle_timeout", Duration::from_secs(1))
            .await
    );
    backend.finish().await;
}

/// Sluice in front of a backend the test drives by hand: the backend's
/// listening socket, sluice's address, and sluice.
async fn sluice_before_a_manual_backend() -> (std::net::TcpListener, String, Sluice) {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let listen = free_addr();
    let sluice = Sluice::start(&config(&listen, "", "", &[server(backend_addr, "")])).await;
    (backend, listen, sluice)
}

/// The next connection sluice opens to `backend`.
async fn accept_from(backend: &std::net::TcpListener) -> std::net::TcpStream {
    let backend = backend.try_clone().unwrap();
    tokio::task::spawn_blocking(move || backend.accept().unwrap().0)
        .await
        .unwrap()
}

/// Writes `bytes`, then closes with a reset instead of a FIN (linger 0).
fn reset_after(stream: std::net::TcpStream, bytes: &[u8]) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    std::io::Write::write_all(&mut &stream, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_from_the_backend_closes_the_client() {
    let (backend, listen, _sluice) = sluice_before_a_manual_backend().await;
    let mut client = TcpStream::connect(&listen).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    reset_after(accept_from(&backend).await, b"");
    // Closed (FIN or reset) within the timeout, with no byte written to the client.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "client was not closed");
    assert!(rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_drains_open_connections() {
    let backend = Backend::tcp("echo", Behavior::Echo).await;
    let listen = free_addr();
    let mut sluice = Sluice::start(&config(&listen, "", "", &[server(backend.addr, "")])).await;
    let mut open = TcpStream::connect(&listen).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut reply = [0u8; 4];
    open.read_exact(&mut reply).await.unwrap();

    sluice.signal(Signal::SIGTERM);
    assert!(
        sluice
            .wait_for_log("draining", Duration::from_secs(5))
            .await
    );
    // The signal is announced, as SIGHUP is.
    assert!(
        sluice
            .log_text()
            .contains("SIGTERM received: shutting down"),
        "{}",
        sluice.log_text()
    );
    // The listener is closed at once...
    assert!(
        TcpStream::connect(&listen).await.is_err(),
        "still accepting after SIGTERM"
    );
    // ...while the open connection keeps working.
    open.write_all(b"pong").await.unwrap();
    open.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"pong");
    assert!(
        sluice.wait_exit(Duration::from_millis(300)).await.is_none(),
        "exited before the drain"
    );
    drop(open);
    let status = sluice
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("did not exit after the drain");
    assert!(status.success());
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_closes_connections_that_outlive_it() {
    let backend = Backend::tcp("echo", Behavior::Echo).await;
    let listen = free_addr();
    let text = config(&listen, "", "", &[server(backend.addr, "")])
        .replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"700ms\"");
    let mut sluice = Sluice::start(&text).await;
    let mut open = TcpStream::connect(&listen).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut reply = [0u8; 4];
    open.read_exact(&mut reply).await.unwrap();
    let signalled = Instant::now();
    sluice.signal(Signal::SIGINT);
    let status = sluice
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("did not exit");
    assert!(status.success());
    assert!(
        signalled.elapsed() >= Duration::from_millis(650),
        "exited after {:?}",
        signalled.elapsed()
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(read.is_err() || rest.is_empty());
    backend.finish().await;
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_back_pressures_the_backend() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let firehose = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let firehose_addr = firehose.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&written);
    let writer = tokio::spawn(async move {
        let (mut stream, _) = firehose.accept().await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        // Bounded: stops at 1 GiB or when the stream fails.
        while counter.load(Ordering::SeqCst) < 1 << 30 {
            if stream.write_all(&chunk).await.is_err() {
                return;
            }
            counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
    });
    let listen = free_addr();
    let sluice = Sluice::start(&config(&listen, "", "", &[server(firehose_addr, "")])).await;
    let baseline = rss_kib(sluice.pid());
    let client = TcpStream::connect(&listen).await.unwrap();

    // Wait until the backend's writes stall: back-pressure reached it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = written.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backend never stalled: {now} bytes written"
        );
        last = now;
    }
    // Only socket buffers hold data; sluice itself keeps one bounded buffer.
    assert!(
        last < 64 << 20,
        "{last} bytes were accepted from the backend"
    );
    let growth = rss_kib(sluice.pid()).saturating_sub(baseline);
    assert!(growth < 4 * 1024, "sluice grew by {growth} KiB");
    drop(client);
    writer.abort();
}

/// sluice lets the handshake's last ACK ride on the first bytes when the
/// client has already sent some; a server that speaks first must still get
/// its connection at once, not after a delayed ACK (200 ms here when the
/// guard is taken out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_speaks_first_is_not_kept_waiting() {
    let backend = Backend::tcp("greeter", Behavior::Announce).await;
    let listen = free_addr();
    let sluice = Sluice::start(&config(&listen, "", "", &[server(backend.addr, "")])).await;
    const CONNECTIONS: u32 = 40;
    let started = Instant::now();
    for _ in 0..CONNECTIONS {
        assert_eq!(announced(&listen, 7).await, "greeter");
    }
    let elapsed = started.elapsed();
    // Linux delays an ACK by 40 ms at least: 40 connections held up take 1.6 s.
    assert!(
        elapsed < Duration::from_millis(40) * CONNECTIONS / 2,
        "{CONNECTIONS} server-first connections took {elapsed:?}"
    );
    assert_eq!(backend.accepted(), CONNECTIONS as usize);
    drop(sluice);
    backend.finish().await;
}

/// The upstream half-closes first and the client finishes after it: the
/// relay then ends without a shutdown towards the upstream (its close sends
/// the FIN, issue 19), which must still reach the upstream as a clean end of
/// stream after every byte the client sent, never as a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_and_a_clean_end_reach_an_upstream_that_half_closed_first() {
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        let (mut stream, _) = backend.accept().await.unwrap();
        stream.write_all(b"greeting").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut heard = Vec::new();
        // A reset would be an error here; a FIN is Ok after every byte.
        stream.read_to_end(&mut heard).await.map(|_| heard)
    });
    let listen = free_addr();
    let _sluice = Sluice::start(&config(&listen, "", "", &[server(backend_addr, "")])).await;
    let mut stream = TcpStream::connect(&listen).await.unwrap();
    let mut greeting = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, b"greeting");
    let data = payload(256 * 1024 + 5, 3);
    stream.write_all(&data).await.unwrap();
    drop(stream);
    let heard = tokio::time::timeout(Duration::from_secs(10), upstream)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(heard.len(), data.len());
    assert!(heard == data, "the upstream heard other bytes than sent");
}

/// The bytes a client sent before sluice connected its peer are read as the
/// connect completes (issue 19) and written first by the relay: each reaches
/// the peer once and in order, whether they fill less than the read buffer,
/// exactly all of it (the relay then splices the rest) or the client sends
/// more than it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_before_the_connect_reach_the_upstream_once_and_in_order() {
    let (backend, listen, _sluice) = echo_setup("accept_proxy_protocol = true").await;
    for (first, rest) in [
        (1, 0),
        (5_000, 300_000),
        (16 * 1024, 0),
        (16 * 1024, 70_000),
        (300_000, 2_000_000),
    ] {
        let data = payload(first + rest, first as u64);
        let digest = early_echo_digest(&listen, &data[..first], data[first..].to_vec()).await;
        assert!(
            digest == sha256(&data),
            "{first} bytes with the header and {rest} after came back changed"
        );
    }
    backend.finish().await;
}

/// A client that spoke and finds no peer is reset (the kernel resets a socket
/// closed with bytes unread; sluice reads them only once a peer is
/// connected): it cannot take the close for a clean end after its bytes were
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_turned_away_after_speaking_is_reset() {
    let (refusing, _held) = refusing_addr();
    let listen = free_addr();
    let _sluice = Sluice::start(&config(
        &listen,
        "accept_proxy_protocol = true",
        "",
        &[server(&refusing, "")],
    ))
    .await;
    for first in [1, 16 * 1024, 40_000] {
        let mut stream = TcpStream::connect(&listen).await.unwrap();
        stream
            .write_all(&[PROXY_HEADER, &payload(first, 9)].concat())
            .await
            .unwrap();
        let mut heard = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut heard))
            .await
            .expect("the client was not closed");
        assert!(
            matches!(&end, Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset),
            "after {first} bytes: {end:?}, not a reset"
        );
        assert!(heard.is_empty());
    }
}

/// Issue 19: a reply whose FIN has arrived with it is read to its end of
/// stream before it is written, so the reply and the FIN reach the client in
/// one segment: the client receives the SYN-ACK and that segment, no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_and_its_end_reach_the_client_in_one_segment() {
    let reply = b"greeting from a server that speaks first";
    let backend_addr = one_segment_backend(0, reply).await;
    let listen = free_addr();
    let _sluice = Sluice::start(&config(&listen, "", "", &[server(&backend_addr, "")])).await;
    let (heard, segments, _) = exchange_segments(&listen, b"").await;
    assert_eq!(heard, reply);
    assert_eq!(segments, 2);
}

/// Issue 19: `delayed_ack` (on by default) lets the ACK of a client's request
/// ride on the reply; off, the client gets it as a segment of its own, as
/// from nginx. Either way the bytes are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_of_a_request_rides_on_the_reply_unless_delayed_ack_is_off() {
    let backend_addr = one_segment_backend(7, b"VERSION 1.6\r\n").await;
    let servers = [server(&backend_addr, "")];
    let listen = free_addr();
    let _sluice = Sluice::start(&config(&listen, "", "", &servers)).await;
    assert_ack_rides_on_reply(&listen, b"version", b"VERSION 1.6\r\n").await;
    let listen = free_addr();
    let _sluice = Sluice::start(&config(&listen, "delayed_ack = false", "", &servers)).await;
    assert_ack_goes_alone(&listen, b"version", b"VERSION 1.6\r\n").await;
}

/// A reply cut short by a reset: the relay may read the reset together with
/// the bytes before it (reading ahead for the end of stream); the bytes still
/// reach the client first, then the client is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_before_a_reset_from_the_backend_reach_the_client() {
    let (backend, listen, sluice) = sluice_before_a_manual_backend().await;
    for round in 0..20 {
        let mut client = TcpStream::connect(&listen).await.unwrap();
        reset_after(accept_from(&backend).await, b"partial reply");
        let mut heard = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut heard))
            .await
            .expect("the client was not closed");
        assert!(end.is_ok(), "round {round}: {end:?}");
        assert_eq!(heard, b"partial reply", "round {round}");
    }
    assert!(
        sluice
            .wait_for_log("Connection reset", Duration::from_secs(5))
            .await,
        "the reset is reported"
    );
}
