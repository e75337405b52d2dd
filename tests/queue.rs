//! The queue when every peer is at max_conns (SPEC §11), through the binary:
//! FIFO order, the first slot that frees, the queue's bound and timeout,
//! nothing the client sent lost, and the queue's length in `/status` and
//! `sluice_upstream_queued`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(15);

async fn get(admin: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}

async fn queued(admin: &str) -> u64 {
    let status: serde_json::Value = serde_json::from_str(&get(admin, "/status").await).unwrap();
    status["upstreams"]["pool"]["queued"].as_u64().unwrap()
}

async fn wait_queued(admin: &str, count: u64) {
    let deadline = Instant::now() + WAIT;
    while queued(admin).await != count {
        assert!(Instant::now() < deadline, "queue never held {count}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn queued_metric(text: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with("sluice_upstream_queued{"))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

/// A client that connected and sent `greeting` at once, before any peer was free.
async fn waiting_client(listen: &str, greeting: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(listen).await.unwrap();
    stream.write_all(greeting).await.unwrap();
    stream
}

/// Reads the backend's name then the echo of `greeting`.
async fn served(stream: &mut TcpStream, greeting: &[u8]) -> bool {
    let mut answer = vec![0; 1 + greeting.len()];
    match tokio::time::timeout(WAIT, stream.read_exact(&mut answer)).await {
        Ok(Ok(_)) => answer[0] == b'a' && &answer[1..] == greeting,
        _ => false,
    }
}

/// Closed by sluice: end of stream (or a reset) with nothing written.
async fn closed_empty(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    match tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await {
        Ok(_) => rest.is_empty(),
        Err(_) => false,
    }
}

#[tokio::test]
async fn clients_wait_in_order_for_the_first_free_slot_and_a_full_queue_closes() {
    let backend = Backend::tcp("a", Behavior::Announce).await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        "{}\n[admin]\nbind = \"{admin}\"\n",
        config(
            &listen,
            "",
            "queue = 2\nqueue_timeout = \"20s\"",
            &[server(backend.addr, "max_conns = 1")],
        )
    );
    let _sluice = Sluice::start(&config).await;
    let mut holder = TcpStream::connect(&listen).await.unwrap();
    let mut name = [0u8; 1];
    holder.read_exact(&mut name).await.unwrap();

    let mut first = waiting_client(&listen, b"first").await;
    wait_queued(&admin, 1).await;
    let mut second = waiting_client(&listen, b"second").await;
    wait_queued(&admin, 2).await;
    assert_eq!(queued_metric(&get(&admin, "/metrics").await), Some(2.0));
    // The queue is full: the next client is closed at once, nothing written.
    let mut third = waiting_client(&listen, b"third").await;
    assert!(closed_empty(&mut third).await);

    // The slot that frees goes to the first in line, with what it sent.
    drop(holder);
    assert!(served(&mut first, b"first").await);
    wait_queued(&admin, 1).await;
    drop(first);
    assert!(served(&mut second, b"second").await);
    wait_queued(&admin, 0).await;
    assert_eq!(queued_metric(&get(&admin, "/metrics").await), Some(0.0));
    assert_eq!(backend.accepted(), 3);
    backend.finish().await;
}

#[tokio::test]
async fn a_client_is_closed_when_queue_timeout_passes() {
    let backend = Backend::tcp("a", Behavior::Announce).await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        "{}\n[admin]\nbind = \"{admin}\"\n",
        config(
            &listen,
            "",
            "queue = 5\nqueue_timeout = \"600ms\"",
            &[server(backend.addr, "max_conns = 1")],
        )
    );
    let _sluice = Sluice::start(&config).await;
    let mut holder = TcpStream::connect(&listen).await.unwrap();
    let mut name = [0u8; 1];
    holder.read_exact(&mut name).await.unwrap();
    let started = Instant::now();
    let mut waiting = waiting_client(&listen, b"late").await;
    assert!(closed_empty(&mut waiting).await);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(550),
        "closed after {waited:?}"
    );
    wait_queued(&admin, 0).await;
    let metrics = get(&admin, "/metrics").await;
    assert!(
        metrics.lines().any(
            |line| line.starts_with("sluice_upstream_unavailable_total{") && line.ends_with(" 1")
        ),
        "{metrics}"
    );
    // The holder's relay is untouched.
    holder.write_all(b"x").await.unwrap();
    let mut echo = [0u8; 1];
    holder.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"x");
    backend.finish().await;
}

#[tokio::test]
async fn without_a_queue_a_full_group_closes_at_once() {
    let backend = Backend::tcp("a", Behavior::Announce).await;
    let listen = free_addr();
    let _sluice = Sluice::start(&config(
        &listen,
        "",
        "",
        &[server(backend.addr, "max_conns = 1")],
    ))
    .await;
    let mut holder = TcpStream::connect(&listen).await.unwrap();
    let mut name = [0u8; 1];
    holder.read_exact(&mut name).await.unwrap();
    let mut turned_away = waiting_client(&listen, b"x").await;
    assert!(closed_empty(&mut turned_away).await);
    backend.finish().await;
}

#[tokio::test]
async fn queue_and_queue_timeout_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, key) in [
        ("queue = 100001", "`queue` must be at most 100000"),
        (
            "queue = 1\nqueue_timeout = \"0s\"",
            "`queue_timeout` must be between",
        ),
        (
            "queue = 1\nqueue_timeout = \"2h\"",
            "`queue_timeout` must be between",
        ),
    ] {
        let path = dir.path().join("sluice.toml");
        std::fs::write(
            &path,
            config(&free_addr(), "", extra, &[server("127.0.0.1:1", "")]),
        )
        .unwrap();
        let (code, _, stderr) = run_sluice(
            &["--check", "--config", path.to_str().unwrap()],
            &[],
            dir.path(),
        );
        assert_eq!(code, 1, "{extra}: {stderr}");
        assert!(stderr.contains(key), "{extra}: {stderr}");
    }
}

#[tokio::test]
async fn raising_max_conns_through_the_runtime_api_lets_waiting_clients_through() {
    let backend = Backend::tcp("a", Behavior::Announce).await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        "{}\n[admin]\nbind = \"{admin}\"\n",
        config(
            &listen,
            "",
            "queue = 5\nqueue_timeout = \"20s\"",
            &[server(backend.addr, "name = \"a\"\nmax_conns = 1")],
        )
    );
    let _sluice = Sluice::start(&config).await;
    let mut holder = TcpStream::connect(&listen).await.unwrap();
    let mut name = [0u8; 1];
    holder.read_exact(&mut name).await.unwrap();
    let mut first = waiting_client(&listen, b"one").await;
    wait_queued(&admin, 1).await;
    let mut second = waiting_client(&listen, b"two").await;
    wait_queued(&admin, 2).await;

    let body = r#"{"max_conns": 3}"#;
    let mut stream = TcpStream::connect(&admin).await.unwrap();
    let request = format!(
        "PATCH /api/upstreams/pool/servers/a HTTP/1.1\r\nHost: s\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // Both are served while the holder stays open.
    assert!(served(&mut first, b"one").await);
    assert!(served(&mut second, b"two").await);
    wait_queued(&admin, 0).await;
    drop(holder);
    backend.finish().await;
}
