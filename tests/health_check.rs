//! Active health checks through the real binary, against real memcached and
//! in-process backends.

#[path = "common/certs.rs"]
mod certs;
mod common;
#[path = "common/tls_backend.rs"]
mod tls_backend;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use tls_backend::{server_settings, TlsBackend};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A memcached process on 127.0.0.1 (TCP only); killed when dropped.
struct Memcached {
    child: Child,
}

impl Memcached {
    async fn start(port: u16) -> Memcached {
        let child = Command::new("memcached")
            .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0"])
            // As root memcached insists on a user to switch to; otherwise -u is ignored.
            .args(["-u", "nobody"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("memcached is not installed (.ci/run installs it)");
        let memcached = Memcached { child };
        let addr = format!("127.0.0.1:{port}");
        let mut up = false;
        for _ in 0..500 {
            if version(&addr).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(up, "memcached on port {port} did not start");
        memcached
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One client connection: `version`, expecting memcached's `VERSION x.y.z`.
async fn version(addr: &str) -> Result<(), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream
            .write_all(b"version\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&mut stream)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if line.starts_with("VERSION ") {
            Ok(())
        } else {
            Err(format!("unexpected reply {line:?}"))
        }
    };
    tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// Log lines from index `from` on that contain every needle.
fn count_from(sluice: &Sluice, from: usize, needles: &[&str]) -> usize {
    sluice
        .log_lines()
        .iter()
        .skip(from)
        .filter(|line| needles.iter().all(|needle| line.contains(needle)))
        .count()
}

/// The index of the first log line from index `from` on that contains every needle.
fn position_from(sluice: &Sluice, from: usize, needles: &[&str]) -> Option<usize> {
    sluice
        .log_lines()
        .iter()
        .skip(from)
        .position(|line| needles.iter().all(|needle| line.contains(needle)))
        .map(|offset| from + offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memcached_that_stops_leaves_and_comes_back_without_a_client_noticing() {
    let (port_a, port_b) = (free_port(), free_port());
    let memcached_a = Memcached::start(port_a).await;
    let _memcached_b = Memcached::start(port_b).await;
    let listen = free_addr();
    // max_fails = 0: only the health checks take a peer out of rotation.
    let mut text = config(
        &listen,
        "",
        "",
        &[
            server(
                format!("127.0.0.1:{port_a}"),
                "name = \"mc-a\"\nmax_fails = 0",
            ),
            server(
                format!("127.0.0.1:{port_b}"),
                "name = \"mc-b\"\nmax_fails = 0",
            ),
        ],
    );
    text.push_str(
        "\n[upstream.pool.health_check]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nfails = 2\npasses = 2\nsend = \"version\\r\\n\"\nexpect = \"VERSION\"\n",
    );
    let sluice = Sluice::spawn(&text, &["--log-level", "debug"]);
    assert!(
        sluice
            .wait_for_log("listening", Duration::from_secs(10))
            .await
    );

    let mut failures = Vec::new();
    let mut clients = 0;
    let mut client = |result: Result<(), String>| {
        clients += 1;
        if let Err(err) = result {
            failures.push(err);
        }
    };
    for _ in 0..10 {
        client(version(&listen).await);
    }
    let closed = |sluice: &Sluice, from: usize, peer: &str| {
        count_from(sluice, from, &["connection closed", peer])
    };
    assert!(wait_until(Duration::from_secs(5), || closed(&sluice, 0, "mc-a") == 5).await);

    // Stop mc-a between client connections; clients keep coming meanwhile.
    // (A slow check may have flapped it earlier: only what follows counts.)
    let stopped = sluice.log_lines().len();
    drop(memcached_a);
    let unhealthy = ["health check: peer is unhealthy", "mc-a"];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while position_from(&sluice, stopped, &unhealthy).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "mc-a never marked unhealthy:\n{}",
            sluice.log_text()
        );
        client(version(&listen).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Once unhealthy, mc-a is not even tried.
    let marked = position_from(&sluice, stopped, &unhealthy).unwrap();
    for _ in 0..10 {
        client(version(&listen).await);
    }
    assert!(
        wait_until(Duration::from_secs(5), || closed(&sluice, marked, "mc-b")
            >= 10)
        .await
    );
    assert_eq!(
        closed(&sluice, marked, "mc-a"),
        0,
        "{}",
        sluice.log_lines()[marked..].join("\n")
    );
    assert_eq!(count_from(&sluice, marked, &["connect attempt failed"]), 0);

    // Start it again: two passed checks bring it back into rotation.
    let restarted = sluice.log_lines().len();
    let _memcached_a = Memcached::start(port_a).await;
    let healthy = ["health check: peer is healthy again", "mc-a"];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while position_from(&sluice, restarted, &healthy).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "mc-a never came back:\n{}",
            sluice.log_text()
        );
        client(version(&listen).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let back = position_from(&sluice, restarted, &healthy).unwrap();
    for _ in 0..10 {
        client(version(&listen).await);
    }
    assert!(
        wait_until(Duration::from_secs(5), || closed(
            &sluice,
            back,
            "connection closed"
        ) >= 10)
        .await
    );
    // Equal weights again: 10 connections split 5/5, give or take the one
    // the round-robin state may carry.
    let on_a = closed(&sluice, back, "mc-a");
    assert!(on_a.abs_diff(5) <= 1, "mc-a took {on_a} of 10");
    assert!(clients >= 30);
    assert_eq!(failures, Vec::<String>::new(), "of {clients} clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_reply_or_a_refused_connect_makes_a_peer_unhealthy() {
    let a = Backend::tcp("a", Behavior::Announce).await;
    let b = Backend::tcp("b", Behavior::Announce).await;
    let (dead, _dead_socket) = refusing_addr();
    let listen = free_addr();
    let mut text = config(
        &listen,
        "",
        "",
        &[
            server(a.addr, "name = \"peer-a\"\nmax_fails = 0"),
            server(b.addr, "name = \"peer-b\"\nmax_fails = 0"),
            server(&dead, "name = \"peer-dead\"\nmax_fails = 0"),
        ],
    );
    // Without send, the check only reads: Announce backends greet with their name.
    text.push_str("\n[upstream.pool.health_check]\ninterval = \"50ms\"\ntimeout = \"500ms\"\nfails = 1\nexpect = \"b\"\n");
    let sluice = Sluice::start(&text).await;
    let marked = wait_until(Duration::from_secs(5), || {
        count_from(&sluice, 0, &["peer is unhealthy"]) == 2
    })
    .await;
    assert!(marked, "log:\n{}", sluice.log_text());
    let log = sluice.log_text();
    assert!(
        log.contains("peer-a") && log.contains("does not start with"),
        "{log}"
    );
    assert!(
        log.contains("peer-dead") && log.contains("connect:"),
        "{log}"
    );
    let from = sluice.log_lines().len();
    for _ in 0..10 {
        assert_eq!(announced(&listen, 1).await, "b");
    }
    assert_eq!(count_from(&sluice, from, &["connect attempt failed"]), 0);
    // peer-b passes every check and is never reported.
    assert_eq!(count_from(&sluice, 0, &["peer-b", "health check"]), 0);
    a.finish().await;
    b.finish().await;
}

/// GETs `path` from the admin endpoint; returns the body.
async fn admin_get(admin: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    body.to_owned()
}

/// The peer's `/status` state and its `sluice_upstream_server_up` value.
async fn peer_state(admin: &str, peer: &str) -> (String, String) {
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/status").await).unwrap();
    let state = status["upstreams"]["pool"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == peer)
        .unwrap_or_else(|| panic!("no peer {peer}: {status:#}"))["state"]
        .as_str()
        .unwrap()
        .to_owned();
    let metrics = admin_get(admin, "/metrics").await;
    let series = format!("sluice_upstream_server_up{{upstream=\"pool\",server=\"{peer}\"}} ");
    let up = metrics
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
        .to_owned();
    (state, up)
}

async fn wait_for_state(admin: &str, peer: &str, expected: (&str, &str)) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = peer_state(admin, peer).await;
        if (got.0.as_str(), got.1.as_str()) == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{peer} stayed {got:?}, not {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_peer_is_failed_in_status_and_down_in_metrics() {
    let a = Backend::tcp("a", Behavior::Announce).await;
    let later = free_addr();
    let listen = free_addr();
    let admin = free_addr();
    let mut text = config(
        &listen,
        "",
        "",
        &[
            server(a.addr, "name = \"peer-a\""),
            server(&later, "name = \"peer-later\""),
        ],
    );
    text.push_str("\n[upstream.pool.health_check]\ninterval = \"50ms\"\ntimeout = \"500ms\"\nfails = 1\npasses = 1\n");
    text.push_str(&format!("\n[admin]\nbind = \"{admin}\"\n"));
    let sluice = Sluice::start(&text).await;
    // No client has touched peer-later: only the checks mark it.
    wait_for_state(&admin, "peer-later", ("failed", "0")).await;
    assert_eq!(
        peer_state(&admin, "peer-a").await,
        ("up".to_owned(), "1".to_owned())
    );
    assert_eq!(count_from(&sluice, 0, &["connect attempt failed"]), 0);
    let b = Backend::tcp_on(&later, "b", Behavior::Announce).await;
    wait_for_state(&admin, "peer-later", ("up", "1")).await;
    let order = [announced(&listen, 1).await, announced(&listen, 1).await];
    assert!(order.contains(&"b".to_owned()), "{order:?}");
    a.finish().await;
    b.finish().await;
}

fn toml_path(key: &str, path: &Path) -> String {
    format!("{key} = {:?}\n", path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_speak_tls_to_tls_servers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = certs::generate_pki(dir.path());
    let trusted = TlsBackend::start(
        "t",
        server_settings(&pki.server.cert, &pki.server.key),
        Behavior::Announce,
    )
    .await;
    let impostor = TlsBackend::start(
        "t",
        server_settings(&pki.impostor.cert, &pki.impostor.key),
        Behavior::Announce,
    )
    .await;
    let listen = free_addr();
    let tls_table = format!(
        "[upstream.pool.server.tls]\n{}",
        toml_path("ca_file", &pki.ca)
    );
    let mut text = config(
        &listen,
        "",
        "",
        &[
            server(
                trusted.addr,
                &format!("name = \"trusted\"\nmax_fails = 0\n{tls_table}"),
            ),
            server(
                impostor.addr,
                &format!("name = \"impostor\"\nmax_fails = 0\n{tls_table}"),
            ),
        ],
    );
    // The name arrives only inside TLS: a plain check would never see it.
    text.push_str("\n[upstream.pool.health_check]\ninterval = \"50ms\"\ntimeout = \"1s\"\nfails = 1\nexpect = \"t\"\n");
    let sluice = Sluice::start(&text).await;
    assert!(
        sluice
            .wait_for_log("health check: peer is unhealthy", Duration::from_secs(5))
            .await
    );
    // Let a few more rounds pass: the trusted server keeps passing.
    let handshakes = trusted.handshakes();
    assert!(
        wait_until(Duration::from_secs(5), || trusted.handshakes()
            >= handshakes + 3)
        .await
    );
    let log = sluice.log_text();
    assert_eq!(
        count_from(&sluice, 0, &["peer is unhealthy", "impostor"]),
        1,
        "{log}"
    );
    assert_eq!(
        count_from(&sluice, 0, &["health check", "trusted"]),
        0,
        "{log}"
    );
    assert!(impostor.failed_handshakes() >= 1);
    trusted.finish().await;
    impostor.finish().await;
}
