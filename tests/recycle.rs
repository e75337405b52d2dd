//! Long-lived connections (SPEC §9) with `protocol = "opaque"`: clients in
//! a request/response loop are recycled at quiet moments, so a new,
//! recovered or reweighted server gets its share, ages are bounded, a busy
//! stream is never cut, and SIGTERM or a removed server drains by recycling.

mod common;
#[path = "common/recycling.rs"]
mod recycling;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use recycling::{metric, metrics_text, reload, OpenCount};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Request size: client id and sequence number, 4 bytes each.
const REQUEST: usize = 8;

/// A backend answering each request with its one-byte id and the request,
/// counting its open connections.
struct AnsweringBackend {
    addr: String,
    open: OpenCount,
}

impl AnsweringBackend {
    async fn start(id: u8) -> AnsweringBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        AnsweringBackend::serve(listener, id)
    }

    fn serve(listener: TcpListener, id: u8) -> AnsweringBackend {
        let addr = listener.local_addr().unwrap().to_string();
        let open = OpenCount::default();
        let counter = open.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let guard = counter.hold();
                tokio::spawn(async move {
                    let _guard = guard;
                    let mut request = [0u8; REQUEST];
                    while stream.read_exact(&mut request).await.is_ok() {
                        let mut answer = vec![id];
                        answer.extend_from_slice(&request);
                        if stream.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                    let _ = stream.shutdown().await;
                });
            }
        });
        AnsweringBackend { addr, open }
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct ClientReport {
    answered: u64,
    /// EOFs found between requests: the recycles of this client.
    recycled_at: Vec<Instant>,
    /// How long each recycled connection had been open.
    lifetimes: Vec<Duration>,
    errors: Vec<String>,
}

/// A client in a request/response loop until `stop`: before each request
/// it checks whether sluice closed the connection (a recycle, between
/// requests), reconnects if so, then sends and waits for the answer.
async fn request_loop(
    listen: String,
    client: u32,
    think: Duration,
    stop: Arc<AtomicBool>,
) -> ClientReport {
    let mut report = ClientReport::default();
    let mut stream = TcpStream::connect(&listen).await.unwrap();
    let mut opened = Instant::now();
    let mut seq = 0u32;
    while !stop.load(Ordering::SeqCst) {
        match recycling::peek_end(&stream) {
            Ok(0) => {
                report.recycled_at.push(Instant::now());
                report.lifetimes.push(opened.elapsed());
                stream = TcpStream::connect(&listen).await.unwrap();
                opened = Instant::now();
            }
            Ok(_) => report.errors.push("a byte nobody asked for".to_owned()),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => report.errors.push(format!("between requests: {err}")),
        }
        let mut request = [0u8; REQUEST];
        request[..4].copy_from_slice(&client.to_be_bytes());
        request[4..].copy_from_slice(&seq.to_be_bytes());
        if let Err(err) = stream.write_all(&request).await {
            report.errors.push(format!("request {seq}: write: {err}"));
            return report;
        }
        let mut answer = [0u8; REQUEST + 1];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut answer));
        match read.await {
            Ok(Ok(_)) if answer[1..] == request => report.answered += 1,
            Ok(Ok(_)) => report.errors.push(format!("request {seq}: a wrong answer")),
            Ok(Err(err)) => {
                report
                    .errors
                    .push(format!("request {seq} unanswered: {err}"));
                return report;
            }
            Err(_) => {
                report
                    .errors
                    .push(format!("request {seq}: no answer in 10 s"));
                return report;
            }
        }
        seq += 1;
        tokio::time::sleep(think + Duration::from_millis(fastrand::u64(0..50))).await;
    }
    report
}

/// Clients started one after the other (so round-robin deals them in turn).
struct Clients {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<ClientReport>>,
}

impl Clients {
    async fn start(listen: &str, count: u32, think: Duration, open: impl Fn() -> usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for client in 0..count {
            tasks.push(tokio::spawn(request_loop(
                listen.to_owned(),
                client,
                think,
                Arc::clone(&stop),
            )));
            let connected = wait_until(Duration::from_secs(10), || open() > client as usize).await;
            assert!(connected, "client {client} did not reach a backend");
        }
        Clients { stop, tasks }
    }

    /// Stops the clients; asserts none saw anything but clean EOFs between
    /// requests and every request was answered.
    async fn finish(self) -> Vec<ClientReport> {
        self.stop.store(true, Ordering::SeqCst);
        let mut reports = Vec::new();
        for task in self.tasks {
            let report = task.await.unwrap();
            assert!(
                report.errors.is_empty(),
                "client errors: {:?}",
                report.errors
            );
            assert!(report.answered > 0);
            reports.push(report);
        }
        reports
    }
}

fn opaque_config(listen: &str, admin: &str, extra: &str, servers: &[String]) -> String {
    let text = config(
        listen,
        &format!("quiet_period = \"50ms\"\n{extra}"),
        "",
        servers,
    );
    format!("{text}\n[admin]\nbind = \"{admin}\"\n")
}

fn counts(backends: &[&AnsweringBackend]) -> Vec<usize> {
    backends.iter().map(|backend| backend.open.get()).collect()
}

/// Waits until the backends hold `expected` connections each, +-1, all
/// `total` of them; panics with the last counts after `within`.
async fn wait_for_shares(backends: &[&AnsweringBackend], expected: &[usize], within: Duration) {
    let total: usize = expected.iter().sum();
    let balanced = || {
        let now = counts(backends);
        now.iter().sum::<usize>() == total
            && now.iter().zip(expected).all(|(n, e)| n.abs_diff(*e) <= 1)
    };
    let reached = wait_until(within, balanced).await;
    assert!(
        reached,
        "shares {:?}, expected {expected:?} +-1",
        counts(backends)
    );
}

/// 12 clients on two servers; a third is added by reload: within 10 s the
/// connections are spread by weight, and no client saw an error.
async fn scale_up(weights: [u32; 3], before: [usize; 2], after: [usize; 3]) {
    let a = AnsweringBackend::start(1).await;
    let b = AnsweringBackend::start(2).await;
    let c = AnsweringBackend::start(3).await;
    let (listen, admin) = (free_addr(), free_addr());
    let server = |backend: &AnsweringBackend, weight: u32| {
        common::server(&backend.addr, &format!("weight = {weight}"))
    };
    let two = [server(&a, weights[0]), server(&b, weights[1])];
    let sluice = Sluice::start(&opaque_config(&listen, &admin, "rebalance = true", &two)).await;
    let clients = Clients::start(&listen, 12, Duration::from_millis(300), || {
        a.open.get() + b.open.get()
    })
    .await;
    assert_eq!(counts(&[&a, &b]), before, "round-robin deals the clients");

    let three = [two[0].clone(), two[1].clone(), server(&c, weights[2])];
    reload(
        &sluice,
        &opaque_config(&listen, &admin, "rebalance = true", &three),
    )
    .await;
    wait_for_shares(&[&a, &b, &c], &after, Duration::from_secs(10)).await;
    let series = "sluice_connections_recycled_total{listener=\"front\",reason=\"rebalance\"}";
    let moved = metric(&admin, series).await as usize;
    assert!(moved >= after[2] - 1, "{moved} recycles moved the clients");
    // Stopping the clients one by one skews the shares again, so sluice
    // may recycle a few more; the clients saw each as a clean EOF.
    let reports = clients.finish().await;
    let seen: usize = reports.iter().map(|r| r.recycled_at.len()).sum();
    // A client stopped before it noticed its last FIN does not count it.
    assert!(seen as f64 <= metric(&admin, series).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_added_by_reload_gets_its_share_of_long_connections() {
    scale_up([1, 1, 1], [6, 6], [4, 4, 4]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_follow_the_weights() {
    scale_up([2, 1, 1], [8, 4], [6, 3, 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_server_receives_its_share() {
    let a = AnsweringBackend::start(1).await;
    let b = AnsweringBackend::start(2).await;
    // C refuses connections at first: bound, not listening.
    let (c_addr, c_socket) = refusing_addr();
    let (listen, admin) = (free_addr(), free_addr());
    let servers = [
        server(&a.addr, ""),
        server(&b.addr, ""),
        server(&c_addr, "fail_timeout = \"2s\""),
    ];
    let sluice = Sluice::start(&opaque_config(
        &listen,
        &admin,
        "rebalance = true",
        &servers,
    ))
    .await;
    let clients = Clients::start(&listen, 12, Duration::from_millis(300), || {
        a.open.get() + b.open.get()
    })
    .await;
    assert_eq!(
        counts(&[&a, &b]),
        [6, 6],
        "C failed: A and B took every client"
    );
    // C comes back: once its fail_timeout passed, it gets its share.
    c_socket.listen(128).unwrap();
    c_socket.set_nonblocking(true).unwrap();
    let c = AnsweringBackend::serve(TcpListener::from_std(c_socket.into()).unwrap(), 3);
    wait_for_shares(&[&a, &b, &c], &[4, 4, 4], Duration::from_secs(12)).await;
    clients.finish().await;
    assert!(sluice
        .log_text()
        .contains("upstream connect attempt failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_recycles_each_connection_once_old_within_the_rate() {
    let a = AnsweringBackend::start(1).await;
    let (listen, admin) = (free_addr(), free_addr());
    let age = Duration::from_secs(2);
    let rate = 2;
    let extra = format!("max_connection_age = \"2s\"\nrebalance_rate = {rate}");
    let _sluice = Sluice::start(&opaque_config(
        &listen,
        &admin,
        &extra,
        &[server(&a.addr, "")],
    ))
    .await;
    let started = Instant::now();
    let clients = Clients::start(&listen, 8, Duration::from_millis(100), || a.open.get()).await;
    // All 8 are due within 2.2 s; at 2 per second the last goes by about 6 s.
    let all_recycled = wait_until(Duration::from_secs(15), || metric_blocking(&admin) >= 8.0).await;
    let reports = clients.finish().await;
    assert!(
        all_recycled,
        "not every connection was recycled for its age"
    );
    let mut times: Vec<Instant> = reports.iter().flat_map(|r| r.recycled_at.clone()).collect();
    times.sort();
    for lifetime in reports.iter().flat_map(|r| r.lifetimes.clone()) {
        assert!(
            lifetime >= age.mul_f64(0.9),
            "recycled after {lifetime:?}, before its age (-10%)"
        );
    }
    // No reconnect storm: by any time t after the first, at most one more
    // than `rate` per second of t (the clients see each EOF within their
    // think time, 100-150 ms).
    let first = times[0];
    for (index, at) in times.iter().enumerate() {
        let allowed = (at.duration_since(first).as_secs_f64() + 0.15) * f64::from(rate) + 1.0;
        assert!(
            (index + 1) as f64 <= allowed,
            "{} recycles within {:?}",
            index + 1,
            at.duration_since(first)
        );
    }
    assert!(first.duration_since(started) >= age.mul_f64(0.9));
}

/// `metric` for `wait_until`'s synchronous condition.
fn metric_blocking(admin: &str) -> f64 {
    let admin = admin.to_owned();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(metric(
                &admin,
                "sluice_connections_recycled_total{listener=\"front\",reason=\"age\"}",
            ))
    })
    .join()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuous_stream_is_never_cut() {
    let backend = Backend::tcp("echo", Behavior::Echo).await;
    let (listen, admin) = (free_addr(), free_addr());
    let extra = "quiet_period = \"300ms\"\nmax_connection_age = \"1s\"";
    let text = format!(
        "{}\n[admin]\nbind = \"{admin}\"\n",
        config(&listen, extra, "", &[server(backend.addr, "")])
    );
    let _sluice = Sluice::start(&text).await;
    // Every series exists, at 0, before the first recycle.
    let before = Instant::now();
    let registered = loop {
        let text = metrics_text(&admin).await;
        if text.contains("sluice_connections_recycled_total{listener=\"front\",reason=\"drain\"} 0")
            || before.elapsed() > Duration::from_secs(5)
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for reason in ["age", "rebalance", "drain"] {
        let series = format!(
            "sluice_connections_recycled_total{{listener=\"front\",reason=\"{reason}\"}} 0"
        );
        assert!(
            registered.contains(&series),
            "{series} missing:\n{registered}"
        );
    }
    assert!(registered.contains("sluice_connection_duration_seconds_count{listener=\"front\"} 0"));
    let mut stream = TcpStream::connect(&listen).await.unwrap();
    // A byte each way every 20 ms for 3 s: never quiet for 300 ms.
    let started = Instant::now();
    let mut byte = [0u8; 1];
    while started.elapsed() < Duration::from_secs(3) {
        stream.write_all(b"x").await.unwrap();
        stream.read_exact(&mut byte).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let series = "sluice_connections_recycled_total{listener=\"front\",reason=\"age\"}";
    assert_eq!(metric(&admin, series).await, 0.0);
    // Once it goes quiet, the connection (well past its age) is recycled.
    let quiet = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "not recycled once quiet");
    assert!(rest.is_empty());
    assert!(quiet.elapsed() >= Duration::from_millis(250));
    assert_eq!(metric(&admin, series).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_recycles_every_connection_at_its_next_quiet_moment() {
    let a = AnsweringBackend::start(1).await;
    let (listen, admin) = (free_addr(), free_addr());
    let text = opaque_config(&listen, &admin, "rebalance = true", &[server(&a.addr, "")])
        .replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"60s\"");
    let mut sluice = Sluice::start(&text).await;
    let stop = Arc::new(AtomicBool::new(false));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for client in 0..6 {
        let (listen, stop, reports) = (listen.clone(), Arc::clone(&stop), Arc::clone(&reports));
        tasks.push(tokio::spawn(async move {
            // Each client ends at its first recycle: the drain.
            let mut stream = TcpStream::connect(&listen).await.unwrap();
            let mut seq = 0u32;
            let mut errors = Vec::new();
            loop {
                match recycling::peek_end(&stream) {
                    Ok(0) => break,
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                    other => errors.push(format!("between requests: {other:?}")),
                }
                if stop.load(Ordering::SeqCst) {
                    errors.push("no recycle before the test gave up".to_owned());
                    break;
                }
                let mut request = [0u8; REQUEST];
                request[..4].copy_from_slice(&(client as u32).to_be_bytes());
                request[4..].copy_from_slice(&seq.to_be_bytes());
                stream.write_all(&request).await.unwrap();
                let mut answer = [0u8; REQUEST + 1];
                if let Err(err) = stream.read_exact(&mut answer).await {
                    errors.push(format!("request {seq} unanswered: {err}"));
                    break;
                }
                seq += 1;
                tokio::time::sleep(Duration::from_millis(200 + fastrand::u64(0..50))).await;
            }
            reports.lock().unwrap().push((seq, errors));
        }));
    }
    assert!(wait_until(Duration::from_secs(10), || a.open.get() == 6).await);
    let signalled = Instant::now();
    sluice.signal(Signal::SIGTERM);
    // Far sooner than shutdown_timeout (60 s): each connection closes at
    // its next quiet moment.
    let status = sluice.wait_exit(Duration::from_secs(15)).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "log:\n{}",
        sluice.log_text()
    );
    assert!(signalled.elapsed() < Duration::from_secs(15));
    for (answered, errors) in reports.lock().unwrap().iter() {
        assert!(errors.is_empty(), "{errors:?}");
        assert!(*answered > 0);
    }
    assert!(!sluice
        .log_text()
        .contains("closing the remaining connections"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_removed_by_reload_is_drained_by_recycling() {
    let a = AnsweringBackend::start(1).await;
    let b = AnsweringBackend::start(2).await;
    let (listen, admin) = (free_addr(), free_addr());
    let both = [server(&a.addr, ""), server(&b.addr, "")];
    let sluice = Sluice::start(&opaque_config(&listen, &admin, "rebalance = true", &both)).await;
    let clients = Clients::start(&listen, 8, Duration::from_millis(300), || {
        a.open.get() + b.open.get()
    })
    .await;
    assert_eq!(counts(&[&a, &b]), [4, 4]);
    reload(
        &sluice,
        &opaque_config(&listen, &admin, "rebalance = true", &both[..1]),
    )
    .await;
    wait_for_shares(&[&a, &b], &[8, 0], Duration::from_secs(10)).await;
    assert!(wait_until(Duration::from_secs(5), || b.open.get() == 0).await);
    clients.finish().await;
    let drained = metric(
        &admin,
        "sluice_connections_recycled_total{listener=\"front\",reason=\"drain\"}",
    )
    .await;
    assert_eq!(drained, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_connection_writes_interim_access_lines() {
    let backend = Backend::tcp("echo", Behavior::Echo).await;
    let listen = free_addr();
    let text = config(
        &listen,
        "access_log_interval = \"1s\"",
        "",
        &[server(backend.addr, "")],
    );
    let sluice = Sluice::start(&text).await;
    let mut stream = TcpStream::connect(&listen).await.unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    while started.elapsed() < Duration::from_millis(2500) {
        stream.write_all(b"x").await.unwrap();
        stream.read_exact(&mut byte).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let interim = |sluice: &Sluice| {
        sluice
            .log_lines()
            .iter()
            .filter(|l| l.contains("access") && l.contains("close=\"open\""))
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(5), || interim(&sluice) >= 2).await,
        "log:\n{}",
        sluice.log_text()
    );
    // Still open, and the lines carry the bytes so far.
    stream.write_all(b"y").await.unwrap();
    stream.read_exact(&mut byte).await.unwrap();
    let lines = sluice.log_text();
    assert!(lines.contains("sent="), "{lines}");
    drop(stream);
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_the_client_sends_after_the_recycle_fin_still_reach_the_upstream() {
    // An echo backend that keeps everything each connection sent.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let store = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut all = Vec::new();
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    all.extend_from_slice(&buf[..n]);
                    let _ = stream.write_all(&buf[..n]).await;
                }
                store.lock().unwrap().push(all);
                let _ = stream.shutdown().await;
            });
        }
    });
    let (listen, admin) = (free_addr(), free_addr());
    let text = opaque_config(
        &listen,
        &admin,
        "max_connection_age = \"1s\"",
        &[server(backend, "")],
    );
    let _sluice = Sluice::start(&text).await;
    let mut stream = TcpStream::connect(&listen).await.unwrap();
    stream.write_all(b"hello").await.unwrap();
    let mut echo = [0u8; 5];
    stream.read_exact(&mut echo).await.unwrap();
    // Recycled once 0.9-1.1 s old and quiet: the FIN.
    let mut rest = Vec::new();
    let fin = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(fin.is_ok(), "not recycled");
    assert!(rest.is_empty());
    // The client still sends (its half is open), then closes.
    stream.write_all(b" and goodbye").await.unwrap();
    stream.shutdown().await.unwrap();
    let delivered = wait_until(Duration::from_secs(5), || {
        received.lock().unwrap().len() == 1
    })
    .await;
    assert!(delivered, "the upstream connection was not closed");
    assert_eq!(received.lock().unwrap()[0], b"hello and goodbye");
    assert_eq!(
        metric(
            &admin,
            "sluice_connections_recycled_total{listener=\"front\",reason=\"age\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &admin,
            "sluice_connection_duration_seconds_count{listener=\"front\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_transfer_is_relayed_whole_then_recycled_once_quiet() {
    let backend = Backend::tcp("echo", Behavior::Echo).await;
    let (listen, admin) = (free_addr(), free_addr());
    let extra = "max_connection_age = \"1s\"\nquiet_period = \"100ms\"";
    let text = format!(
        "{}\n[admin]\nbind = \"{admin}\"\n",
        config(&listen, extra, "", &[server(backend.addr, "")])
    );
    let _sluice = Sluice::start(&text).await;
    let stream = TcpStream::connect(&listen).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    // 8 MiB each way, past the connection's age: bulk data is never cut.
    let data = payload(8 * 1024 * 1024, 7);
    let expected = sha256(&data);
    let sending = tokio::spawn(async move {
        for chunk in data.chunks(256 * 1024) {
            writer.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        writer
    });
    let mut echoed = vec![0u8; 8 * 1024 * 1024];
    reader.read_exact(&mut echoed).await.unwrap();
    let _writer = sending.await.unwrap();
    assert_eq!(sha256(&echoed), expected);
    // Quiet now, and older than its age: recycled.
    let mut rest = Vec::new();
    let fin = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest)).await;
    assert!(fin.is_ok(), "not recycled once quiet");
    assert!(rest.is_empty());
    let series = "sluice_connections_recycled_total{listener=\"front\",reason=\"age\"}";
    assert_eq!(metric(&admin, series).await, 1.0);
}

#[test]
fn check_prints_the_recycling_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    let text = config(
        "127.0.0.1:1",
        "protocol = \"forward\"\nrebalance = true\nmax_connection_age = \"15m\"",
        "",
        &[server("127.0.0.1:2", "")],
    );
    std::fs::write(&path, text).unwrap();
    let (code, stdout, stderr) = run_sluice(
        &["--check", "--config", path.to_str().unwrap()],
        &[],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(
            "recycling: protocol forward quiet_period 200ms max_connection_age 15m rebalance on rebalance_rate 20/s"
        ),
        "{stdout}"
    );
}
