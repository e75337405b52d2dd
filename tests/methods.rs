//! Balancing methods other than round-robin, through the real binary.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// Connects from `source` (an address on loopback) and reads the 1-byte name
/// of the backend that took the connection; the connection stays open.
async fn connect_from(source: &str, listen: &str) -> (TcpStream, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket
        .connect(listen.parse::<SocketAddr>().unwrap())
        .await
        .unwrap();
    let mut name = [0u8; 1];
    stream.read_exact(&mut name).await.unwrap();
    (stream, String::from_utf8(name.to_vec()).unwrap())
}

/// Starts sluice with debug logs, which name every closed connection.
async fn start_with_debug_log(config: &str) -> Sluice {
    let sluice = Sluice::spawn(config, &["--log-level", "debug"]);
    assert!(
        sluice
            .wait_for_log("listening", Duration::from_secs(10))
            .await,
        "sluice did not start; log:\n{}",
        sluice.log_text()
    );
    sluice
}

async fn backends(names: &[&str]) -> Vec<Backend> {
    let mut backends = Vec::new();
    for name in names {
        backends.push(Backend::tcp(name, Behavior::Announce).await);
    }
    backends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_sends_new_connections_to_the_least_loaded_peer() {
    let backends = backends(&["a", "b", "c"]).await;
    let listen = free_addr();
    let servers: Vec<String> = backends.iter().map(|b| server(b.addr, "")).collect();
    let sluice =
        start_with_debug_log(&config(&listen, "", "balance = \"least_conn\"", &servers)).await;

    // Nothing active: ties go round-robin.
    let mut held = Vec::new();
    let mut order = String::new();
    for _ in 0..3 {
        let (stream, name) = connect_from("127.0.0.1", &listen).await;
        order.push_str(&name);
        held.push((stream, name));
    }
    assert_eq!(order, "abc");
    // Close b's connection and wait until sluice has seen it end: b is now
    // the least loaded and must take the next connection.
    let position = held.iter().position(|(_, name)| name == "b").unwrap();
    drop(held.remove(position));
    let closed = wait_until(Duration::from_secs(5), || {
        sluice
            .log_lines()
            .iter()
            .any(|line| line.contains("connection closed"))
    })
    .await;
    assert!(closed, "log:\n{}", sluice.log_text());
    let (stream, name) = connect_from("127.0.0.1", &listen).await;
    assert_eq!(name, "b");
    held.push((stream, name));
    // Every peer holds one again; hold one more on each, in round-robin order.
    let mut more = String::new();
    for _ in 0..3 {
        let (stream, name) = connect_from("127.0.0.1", &listen).await;
        more.push_str(&name);
        held.push((stream, name));
    }
    let mut sorted: Vec<char> = more.chars().collect();
    sorted.sort_unstable();
    assert_eq!(sorted, vec!['a', 'b', 'c'], "order {more}");
    drop(held);
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_weighs_active_connections() {
    let backends = backends(&["a", "b"]).await;
    let listen = free_addr();
    let servers = vec![
        server(backends[0].addr, "weight = 3"),
        server(backends[1].addr, ""),
    ];
    let _sluice = Sluice::start(&config(&listen, "", "balance = \"least_conn\"", &servers)).await;
    // Held connections split 3:1 as they pile up.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from("127.0.0.1", &listen).await);
    }
    let on_a = held.iter().filter(|(_, name)| name == "a").count();
    assert_eq!(on_a, 6);
    drop(held);
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_two_with_two_peers_always_picks_the_less_loaded() {
    let backends = backends(&["a", "b"]).await;
    let listen = free_addr();
    let servers: Vec<String> = backends.iter().map(|b| server(b.addr, "")).collect();
    let _sluice = Sluice::start(&config(&listen, "", "balance = \"random_two\"", &servers)).await;
    // With two peers the two picks are both of them, so held connections
    // alternate exactly however the coin falls.
    let mut held = Vec::new();
    for round in 1..=5 {
        for _ in 0..2 {
            held.push(connect_from("127.0.0.1", &listen).await);
        }
        let on_a = held.iter().filter(|(_, name)| name == "a").count();
        assert_eq!(on_a, round);
    }
    drop(held);
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_uses_every_peer_and_never_a_down_one() {
    let backends = backends(&["a", "b", "c"]).await;
    let listen = free_addr();
    let servers = vec![
        server(backends[0].addr, ""),
        server(backends[1].addr, ""),
        server(backends[2].addr, "down = true"),
    ];
    let _sluice = Sluice::start(&config(&listen, "", "balance = \"random\"", &servers)).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..60 {
        *counts.entry(announced(&listen, 1).await).or_default() += 1;
    }
    // Exact splits are checked with seeded unit tests; here only what cannot
    // fail by chance (each of a and b missing 60 draws: 2^-60).
    assert_eq!(counts.get("c"), None);
    assert!(counts["a"] > 0 && counts["b"] > 0, "{counts:?}");
    assert_eq!(counts["a"] + counts["b"], 60);
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_client_ip_keeps_each_client_on_one_peer() {
    let backends = backends(&["a", "b", "c", "d"]).await;
    let listen = free_addr();
    let servers: Vec<String> = backends.iter().map(|b| server(b.addr, "")).collect();
    let sluice = Sluice::start(&config(&listen, "", "balance = \"hash\"", &servers)).await;
    let sources: Vec<String> = (1..=24).map(|n| format!("127.0.0.{n}")).collect();
    let mut first: HashMap<String, String> = HashMap::new();
    for source in &sources {
        let (_, name) = connect_from(source, &listen).await;
        first.insert(source.clone(), name);
    }
    // Every source port differs, yet each IP sticks to its peer.
    for _ in 0..2 {
        for source in &sources {
            let (_, name) = connect_from(source, &listen).await;
            assert_eq!(name, first[source], "{source} moved");
        }
    }
    let used: std::collections::HashSet<&String> = first.values().collect();
    assert!(used.len() >= 2, "24 IPs all on one peer: {first:?}");

    // A peer that goes away hands only its own clients to others.
    drop(sluice);
    let gone = first["127.0.0.1"].clone();
    let listen2 = free_addr();
    let servers: Vec<String> = backends
        .iter()
        .map(|b| server(b.addr, if b.name == gone { "down = true" } else { "" }))
        .collect();
    let _sluice = Sluice::start(&config(&listen2, "", "balance = \"hash\"", &servers)).await;
    for source in &sources {
        let (_, name) = connect_from(source, &listen2).await;
        assert_ne!(name, gone);
        if first[source] != gone {
            assert_eq!(name, first[source], "{source} moved though its peer stayed");
        }
    }
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_client_addr_spreads_one_ip_over_peers() {
    let backends = backends(&["a", "b", "c"]).await;
    let listen = free_addr();
    let servers: Vec<String> = backends.iter().map(|b| server(b.addr, "")).collect();
    let _sluice = Sluice::start(&config(
        &listen,
        "",
        "balance = \"hash\"\nhash_key = \"client_addr\"",
        &servers,
    ))
    .await;
    // One IP, many source ports: the port is part of the key, so more than one
    // peer is used (40 connections all on one of 3 peers: about 3^-39).
    let mut used = std::collections::HashSet::new();
    for _ in 0..40 {
        let (_, name) = connect_from("127.0.0.1", &listen).await;
        used.insert(name);
    }
    assert!(used.len() >= 2, "{used:?}");
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_recovered_peer_back_in() {
    let b = Backend::tcp("b", Behavior::Announce).await;
    let a_addr = free_addr();
    let listen = free_addr();
    let _sluice = Sluice::start(&config(
        &listen,
        "",
        "",
        &[
            server(&a_addr, "fail_timeout = \"1s\"\nslow_start = \"4s\""),
            server(b.addr, ""),
        ],
    ))
    .await;
    // a refuses: it is marked failed; then it comes back.
    assert_eq!(announced(&listen, 1).await, "b");
    let a = Backend::tcp_on(&a_addr, "a", Behavior::Announce).await;
    // After fail_timeout one connection probes a and succeeds: a recovers.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while a.accepted() == 0 {
        assert!(std::time::Instant::now() < deadline, "a was never probed");
        announced(&listen, 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = std::time::Instant::now();
    // In the first 10% of slow_start a's weight is at most a tenth of b's:
    // of 20 connections it takes at most 3 (the round-robin state may owe it one);
    // without slow start it would take 10.
    let mut early = String::new();
    for _ in 0..20 {
        early.push_str(&announced(&listen, 1).await);
    }
    assert!(
        recovered.elapsed() < Duration::from_millis(400),
        "too slow to observe the ramp"
    );
    assert!(early.matches('a').count() <= 3, "order {early}");
    // Once slow_start is over, a has its full weight again.
    tokio::time::sleep_until((recovered + Duration::from_secs(4)).into()).await;
    let mut late = String::new();
    for _ in 0..20 {
        late.push_str(&announced(&listen, 1).await);
    }
    assert!(late.matches('a').count().abs_diff(10) <= 1, "order {late}");
    a.finish().await;
    b.finish().await;
}
