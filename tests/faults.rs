//! Faults: backends that die, reset, stall or cannot be reached, silent
//! clients, running out of descriptors, and a panicking connection task.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A backend whose connections are handed to the test as they are accepted.
async fn manual_backend() -> (SocketAddr, mpsc::UnboundedReceiver<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if sender.send(stream).is_err() {
                return;
            }
        }
    });
    (addr, receiver)
}

async fn next_connection(connections: &mut mpsc::UnboundedReceiver<TcpStream>) -> TcpStream {
    tokio::time::timeout(Duration::from_secs(5), connections.recv())
        .await
        .expect("no connection reached the backend")
        .unwrap()
}

/// Closes with a reset instead of a FIN.
fn reset(stream: TcpStream) {
    stream.set_zero_linger().unwrap();
    drop(stream);
}

/// Reads until end of stream or an error, failing the test after `timeout`.
/// Returns how many bytes came.
async fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> usize {
    let mut total = 0;
    let mut buf = vec![0; 64 * 1024];
    tokio::time::timeout(timeout, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("the connection was not closed");
    total
}

/// Connect attempts that timed out, as warned (the access log repeats the reason).
fn timeouts(sluice: &Sluice) -> usize {
    sluice
        .log_lines()
        .iter()
        .filter(|l| l.contains("upstream connect attempt failed") && l.contains("timed out"))
        .count()
}

fn count(sluice: &Sluice, needle: &str) -> usize {
    sluice
        .log_lines()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dying_mid_transfer_closes_the_client() {
    let (backend, mut connections) = manual_backend().await;
    let listen = free_addr();
    let sluice = Sluice::start(&config(&listen, "", "", &[server(backend, "")])).await;

    let client = TcpStream::connect(&listen).await.unwrap();
    let (mut reader, mut writer) = client.into_split();
    // The client keeps sending (bounded) while the backend dies.
    let sender = tokio::spawn(async move {
        let chunk = payload(64 * 1024, 7);
        for _ in 0..1024 {
            writer.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut upstream = next_connection(&mut connections).await;
    let mut seen = vec![0; 100 * 1024];
    upstream.read_exact(&mut seen).await.unwrap();
    upstream.write_all(&payload(50 * 1024, 8)).await.unwrap();
    reset(upstream);

    let received = tokio::time::timeout(Duration::from_secs(10), async {
        let mut total = 0;
        let mut buf = vec![0; 64 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("the client hung after the backend died");
    assert!(received <= 50 * 1024);
    let sent = tokio::time::timeout(Duration::from_secs(10), sender)
        .await
        .expect("the client's writes hung after the backend died")
        .unwrap();
    assert!(sent.is_err(), "64 MiB went into a dead connection");
    assert!(
        sluice
            .wait_for_log("connection closed on error", Duration::from_secs(5))
            .await
    );
    assert_eq!(count(&sluice, "side=Upstream"), 1, "{}", sluice.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_resetting_at_once_closes_the_client_but_is_not_a_failed_peer() {
    let (backend, mut connections) = manual_backend().await;
    let listen = free_addr();
    let sluice = Sluice::start(&config(
        &listen,
        "",
        "",
        &[server(backend, "max_fails = 0")],
    ))
    .await;

    // Whether sluice sees the reset before its connect completes is a race
    // (then it counts as a failed attempt, as in nginx); max_fails = 0 keeps
    // the peer eligible either way.
    for _ in 0..2 {
        let mut client = TcpStream::connect(&listen).await.unwrap();
        reset(next_connection(&mut connections).await);
        let _ = client.write_all(b"hello").await;
        assert_eq!(
            read_until_closed(&mut client, Duration::from_secs(5)).await,
            0
        );
    }
    assert!(
        sluice
            .wait_for_log("side=Upstream", Duration::from_secs(5))
            .await
            || count(&sluice, "upstream connect attempt failed") > 0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_is_ended_by_idle_timeout() {
    let (backend, mut connections) = manual_backend().await;
    let listen = free_addr();
    let sluice = Sluice::start(&config(
        &listen,
        "idle_timeout = \"500ms\"",
        "",
        &[server(backend, "")],
    ))
    .await;

    let mut client = TcpStream::connect(&listen).await.unwrap();
    client.write_all(b"anyone there?").await.unwrap();
    let started = Instant::now();
    let mut upstream = next_connection(&mut connections).await;
    assert_eq!(
        read_until_closed(&mut client, Duration::from_secs(5)).await,
        0
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");
    // sluice closed its side towards the backend too.
    assert_eq!(
        read_until_closed(&mut upstream, Duration::from_secs(5)).await,
        b"anyone there?".len()
    );
    assert!(
        sluice
            .wait_for_log("connection closed: idle_timeout", Duration::from_secs(5))
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_ended_by_idle_timeout() {
    let (backend, mut connections) = manual_backend().await;
    let listen = free_addr();
    let sluice = Sluice::start(&config(
        &listen,
        "idle_timeout = \"500ms\"",
        "",
        &[server(backend, "")],
    ))
    .await;

    let mut client = TcpStream::connect(&listen).await.unwrap();
    // The upstream connection is made at once, before any client byte.
    let mut upstream = next_connection(&mut connections).await;
    let started = Instant::now();
    assert_eq!(
        read_until_closed(&mut upstream, Duration::from_secs(5)).await,
        0
    );
    assert_eq!(
        read_until_closed(&mut client, Duration::from_secs(5)).await,
        0
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");
    assert!(
        sluice
            .wait_for_log("connection closed: idle_timeout", Duration::from_secs(5))
            .await
    );
}

/// A listener that never accepts, its queue filled: SYNs to it are dropped,
/// so connecting to it hangs until the connector gives up.
fn blackhole() -> (SocketAddr, socket2::Socket, Vec<std::net::TcpStream>) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(stream) => queued.push(stream),
            Err(_) => return (addr, socket, queued),
        }
    }
    panic!("the accept queue of a backlog-0 listener never filled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_backend_times_out_and_the_next_peer_serves() {
    let (hole, _socket, _queued) = blackhole();
    let good = Backend::tcp("g", Behavior::Announce).await;
    let listen = free_addr();
    let text = config(
        &listen,
        "",
        "",
        &[
            server(hole, "name = \"hole\""),
            server(good.addr, "name = \"good\""),
        ],
    )
    .replace("connect_timeout = \"1s\"", "connect_timeout = \"300ms\"");
    let sluice = Sluice::start(&text).await;

    let started = Instant::now();
    assert_eq!(announced(&listen, 1).await, "g");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(290),
        "answered after {took:?}"
    );
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    assert!(
        sluice
            .wait_for_log("connect timed out after 300ms", Duration::from_secs(5))
            .await
    );
    assert_eq!(timeouts(&sluice), 1, "{}", sluice.log_text());

    // `hole` is now failed (max_fails 1): the next client goes straight to `good`.
    let started = Instant::now();
    assert_eq!(announced(&listen, 1).await, "g");
    assert!(started.elapsed() < Duration::from_millis(250));
    assert_eq!(timeouts(&sluice), 1, "{}", sluice.log_text());
    good.finish().await;
}

/// The descriptor limit that leaves exactly `free` descriptor numbers
/// available to a process. Counting alone is not enough: a process may hold
/// inherited descriptors with high numbers, and the limit bounds numbers.
fn limit_leaving(pid: i32, free: usize) -> u64 {
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|entry| {
            entry
                .unwrap()
                .file_name()
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let (mut limit, mut left) = (0, free);
    while left > 0 {
        if !open.contains(&limit) {
            left -= 1;
        }
        limit += 1;
    }
    limit
}

/// CPU time (user + system, seconds) a process has used.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn set_descriptor_limit(pid: i32, soft: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads and writes the two structs passed; both outlive the call.
    let got = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(got, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());
}

async fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    let mut answer = vec![0; message.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut answer))
        .await
        .expect("no echo")
        .unwrap();
    assert_eq!(answer, message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_sluice_backs_off_keeps_serving_and_recovers() {
    let backend = Backend::tcp("echo", Behavior::Echo).await;
    let listen = free_addr();
    let sluice = Sluice::start(&config(&listen, "", "", &[server(backend.addr, "")])).await;
    let pid = sluice.pid();

    // Room for exactly three relayed connections (two descriptors each).
    set_descriptor_limit(pid, limit_leaving(pid, 6));
    let mut held = Vec::new();
    for n in 0..3 {
        let mut stream = TcpStream::connect(&listen).await.unwrap();
        let message = format!("held {n}");
        stream.write_all(message.as_bytes()).await.unwrap();
        let mut answer = vec![0; message.len()];
        let echoed =
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut answer)).await;
        assert!(
            matches!(echoed, Ok(Ok(_))),
            "held {n}: {echoed:?}\n{}",
            sluice.log_text()
        );
        held.push(stream);
    }
    // These complete the handshake in the kernel's queue, but sluice's accept fails.
    let mut waiting = Vec::new();
    for n in 0..3 {
        let mut stream = TcpStream::connect(&listen).await.unwrap();
        stream
            .write_all(format!("waiting {n}").as_bytes())
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
        waiting.push(stream);
    }
    assert!(
        sluice
            .wait_for_log("Too many open files", Duration::from_secs(5))
            .await,
        "{}",
        sluice.log_text()
    );

    // Over two seconds of EMFILE a spinning accept loop would burn a core.
    let cpu_before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    eprintln!("sluice used {cpu:.2}s of CPU in 2s out of descriptors");
    assert!(
        cpu < 0.1,
        "sluice used {cpu:.2}s of CPU in 2s while out of descriptors"
    );

    // The connections it has are still served.
    for (n, stream) in held.iter_mut().enumerate() {
        let message = format!("still {n}");
        stream.write_all(message.as_bytes()).await.unwrap();
        let mut answer = vec![0; message.len()];
        let echoed =
            tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut answer)).await;
        assert!(
            matches!(echoed, Ok(Ok(_))),
            "held {n}: {echoed:?}\n{}",
            sluice.log_text()
        );
    }
    assert_eq!(backend.accepted(), 3);

    // Descriptors free up: the waiting clients are accepted and relayed.
    drop(held);
    for (n, stream) in waiting.iter_mut().enumerate() {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("a waiting client was never served\n{}", sluice.log_text()))
            .unwrap_or_else(|err| panic!("waiting client {n}: {err}\n{}", sluice.log_text()));
        assert_eq!(answer, format!("waiting {n}").as_bytes());
    }
    // And new clients are served again.
    for n in 0..3 {
        let mut stream = TcpStream::connect(&listen).await.unwrap();
        round_trip(&mut stream, format!("fresh {n}").as_bytes()).await;
    }
    assert_eq!(count(&sluice, "upstream connect attempt failed"), 0);
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_connection_task_takes_down_only_its_connection() {
    // A panic must unwind: only the task fails, not the process.
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    assert!(
        !manifest.contains("panic ="),
        "Cargo.toml sets a panic strategy"
    );

    let steady = Backend::tcp("steady", Behavior::Echo).await;
    let boom = Backend::tcp("boom", Behavior::Echo).await;
    let (steady_listen, boom_listen) = (free_addr(), free_addr());
    let text = format!(
        "[[listener]]\nname = \"steady\"\nbind = \"{steady_listen}\"\nupstream = \"steady\"\n\n\
         [[listener]]\nname = \"boom\"\nbind = \"{boom_listen}\"\nupstream = \"boom\"\n\n\
         [upstream.steady]\n[[upstream.steady.server]]\naddress = \"{}\"\n\n\
         [upstream.boom]\n[[upstream.boom.server]]\naddress = \"{}\"\nname = \"panic-me\"\nmax_conns = 1\n",
        steady.addr, boom.addr
    );
    let sluice = Sluice::start_with_env(&text, &[("SLUICE_TEST_PANIC_PEER", "panic-me")]).await;

    let mut open = TcpStream::connect(&steady_listen).await.unwrap();
    round_trip(&mut open, b"before").await;

    for _ in 0..5 {
        let mut client = TcpStream::connect(&boom_listen).await.unwrap();
        let _ = client.write_all(b"x").await;
        assert_eq!(
            read_until_closed(&mut client, Duration::from_secs(5)).await,
            0
        );
    }
    // Each panic released the peer: with max_conns = 1 a leaked lease would
    // have turned every later client away before reaching the backend.
    assert!(wait_until(Duration::from_secs(5), || boom.accepted() == 5).await);
    assert!(
        wait_until(Duration::from_secs(5), || count(
            &sluice,
            "panicking the connection to panic-me"
        ) == 5)
        .await,
        "{}",
        sluice.log_text()
    );
    assert_eq!(count(&sluice, "no peer could take"), 0);

    // The other connection, and sluice, carry on.
    round_trip(&mut open, b"after").await;
    let mut fresh = TcpStream::connect(&steady_listen).await.unwrap();
    round_trip(&mut fresh, b"fresh").await;
    steady.finish().await;
    boom.finish().await;
}
