//! 10,000 relayed connections open at once, every byte intact.
//!
//! sluice holds two descriptors per connection, and so does this test
//! process (client and backend side): 10,000 connections need
//! RLIMIT_NOFILE above 20,000 in both. The test raises its soft limit to the
//! hard limit (sluice inherits it) and, where the hard limit is lower than
//! that and cannot be raised (a container without CAP_SYS_RESOURCE, such as
//! the development machine with its hard limit of 20,000), runs as many
//! connections as the limit allows, but never fewer than 9,000.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

const WANTED: usize = 10_000;
const AT_LEAST: usize = 9_000;
const IN_FLIGHT: usize = 256;
/// Descriptors each process needs besides two per connection.
const SPARE_DESCRIPTORS: u64 = 256;

/// Raises RLIMIT_NOFILE as far as allowed; returns how many connections fit.
fn raise_descriptor_limit() -> usize {
    let wanted = 2 * WANTED as u64 + SPARE_DESCRIPTORS;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write the struct passed, which outlives the call.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit.rlim_max = limit.rlim_max.max(wanted);
    limit.rlim_cur = wanted;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        // Not allowed to raise the hard limit: go as far as it allows.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    }
    let fits = (limit.rlim_cur.saturating_sub(SPARE_DESCRIPTORS) / 2) as usize;
    let connections = fits.min(WANTED);
    assert!(
        connections >= AT_LEAST,
        "RLIMIT_NOFILE {} allows only {connections} connections; raise `ulimit -Hn`",
        limit.rlim_cur
    );
    connections
}

/// The echo backend's connections: open now, the most open at once, and
/// those open that have not received a byte yet.
#[derive(Default)]
struct Counts {
    open: AtomicUsize,
    peak: AtomicUsize,
    silent: AtomicUsize,
}

/// An echo backend with small buffers that counts its connections.
async fn counting_echo_backend() -> (std::net::SocketAddr, Arc<Counts>) {
    // TcpListener::bind listens with a backlog of 128, below IN_FLIGHT: the
    // SYN queue overflowed, the kernel answered with SYN cookies, and a
    // listener in that mode takes a stray ACK that fits a cookie for a new
    // connection, one nobody opened and that never ends (the test failed
    // now and then on it, and every SYN dropped cost a 1 s retransmit).
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4096).unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let task_counts = Arc::clone(&counts);
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let now = task_counts.open.fetch_add(1, Ordering::SeqCst) + 1;
            task_counts.peak.fetch_max(now, Ordering::SeqCst);
            task_counts.silent.fetch_add(1, Ordering::SeqCst);
            let counts = Arc::clone(&task_counts);
            tokio::spawn(async move {
                let mut buf = [0; 256];
                let mut silent = true;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if std::mem::take(&mut silent) {
                                counts.silent.fetch_sub(1, Ordering::SeqCst);
                            }
                            if stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = stream.shutdown().await;
                if silent {
                    counts.silent.fetch_sub(1, Ordering::SeqCst);
                }
                counts.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

fn warnings(sluice: &Sluice) -> String {
    let lines: Vec<String> = sluice
        .log_lines()
        .into_iter()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .take(20)
        .collect();
    lines.join("\n")
}

fn descriptors_of(sluice: &Sluice) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", sluice.pid()))
        .unwrap()
        .count()
}

fn message(round: &str, index: usize) -> Vec<u8> {
    let mut text = format!("{round} {index:05} ").into_bytes();
    text.extend(payload(48, index as u64));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_connections_relay_every_byte() {
    let connections = raise_descriptor_limit();
    let started = Instant::now();
    let (backend, counts) = counting_echo_backend().await;
    let listen = free_addr();
    // On a busy loopback a SYN now and then meets a TIME_WAIT and is
    // retransmitted after a second: connect_timeout leaves room for that.
    let text = config(&listen, "", "", &[server(backend, "max_fails = 0")])
        .replace("connect_timeout = \"1s\"", "connect_timeout = \"10s\"");
    let sluice = Sluice::start(&text).await;

    // Open every connection and check one echo on each, IN_FLIGHT at a time;
    // all of them stay open.
    let mut held = Vec::with_capacity(connections);
    let mut batch = JoinSet::new();
    for index in 0..connections {
        let listen = listen.clone();
        batch.spawn(async move {
            let mut stream = TcpStream::connect(&listen).await.unwrap();
            let sent = message("first", index);
            stream.write_all(&sent).await.unwrap();
            let mut echoed = vec![0; sent.len()];
            stream.read_exact(&mut echoed).await.unwrap();
            assert_eq!(echoed, sent, "connection {index}");
            (index, stream)
        });
        if batch.len() == IN_FLIGHT || index + 1 == connections {
            while let Some(result) = batch.join_next().await {
                match result {
                    Ok(opened) => held.push(opened),
                    Err(err) => panic!("{err}\n{}", warnings(&sluice)),
                }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "opening took too long"
        );
    }
    assert_eq!(held.len(), connections);
    assert_eq!(counts.open.load(Ordering::SeqCst), connections);
    // Two descriptors per relayed connection in sluice, all at once.
    let descriptors = descriptors_of(&sluice);
    assert!(
        descriptors >= 2 * connections,
        "sluice holds {descriptors} descriptors"
    );

    // A second message on every connection, then a clean close both ways.
    let mut closing = JoinSet::new();
    for (index, mut stream) in held {
        closing.spawn(async move {
            let sent = message("second", index);
            stream.write_all(&sent).await.unwrap();
            stream.shutdown().await.unwrap();
            let mut echoed = Vec::new();
            stream.read_to_end(&mut echoed).await.unwrap();
            assert_eq!(echoed, sent, "connection {index}");
        });
    }
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(result) = closing.join_next().await {
            result.unwrap();
        }
    })
    .await;
    assert!(closed.is_ok(), "closing took too long");
    let drained = wait_until(Duration::from_secs(10), || {
        counts.open.load(Ordering::SeqCst) == 0
    })
    .await;
    // Every relayed connection carried two messages: one that never received
    // a byte was not opened by sluice for this test's clients.
    assert!(
        drained,
        "{} backend connections still open, {} of them without a byte received; sluice holds {} descriptors\n{}",
        counts.open.load(Ordering::SeqCst),
        counts.silent.load(Ordering::SeqCst),
        descriptors_of(&sluice),
        warnings(&sluice)
    );
    assert_eq!(counts.peak.load(Ordering::SeqCst), connections);
    eprintln!(
        "{connections} concurrent connections relayed in {:.1}s; sluice held {descriptors} descriptors",
        started.elapsed().as_secs_f64()
    );
}
