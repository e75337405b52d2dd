//! Peer selection through the real binary: which backend got each connection.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_gives_the_exact_nginx_order() {
    let a = Backend::tcp("a", Behavior::Announce).await;
    let b = Backend::tcp("b", Behavior::Announce).await;
    let c = Backend::tcp("c", Behavior::Announce).await;
    let listen = free_addr();
    let sluice = Sluice::start(&config(
        &listen,
        "",
        "",
        &[
            server(a.addr, "weight = 5"),
            server(b.addr, ""),
            server(c.addr, ""),
        ],
    ))
    .await;

    let mut order = String::new();
    for _ in 0..70 {
        order.push_str(&announced(&listen, 1).await);
    }
    assert_eq!(order, "aabacaa".repeat(10));
    assert_eq!((a.accepted(), b.accepted(), c.accepted()), (50, 10, 10));
    drop(sluice);
    for backend in [a, b, c] {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_peer_is_never_used() {
    let a = Backend::tcp("a", Behavior::Announce).await;
    let b = Backend::tcp("b", Behavior::Announce).await;
    let c = Backend::tcp("c", Behavior::Announce).await;
    let listen = free_addr();
    let _sluice = Sluice::start(&config(
        &listen,
        "",
        "",
        &[
            server(a.addr, "down = true"),
            server(b.addr, ""),
            server(c.addr, ""),
        ],
    ))
    .await;
    let mut order = String::new();
    for _ in 0..30 {
        order.push_str(&announced(&listen, 1).await);
    }
    assert_eq!(order, "bc".repeat(15));
    assert_eq!(a.accepted(), 0);
    for backend in [a, b, c] {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_is_used_only_when_no_primary_is_eligible() {
    let a = Backend::tcp("a", Behavior::Announce).await;
    let b = Backend::tcp("b", Behavior::Announce).await;
    let spare = Backend::tcp("s", Behavior::Announce).await;
    let (dead, _dead_socket) = refusing_addr();
    let listen = free_addr();
    let _sluice = Sluice::start(&config(
        &listen,
        "",
        "",
        &[
            server(a.addr, ""),
            server(b.addr, ""),
            server(spare.addr, "backup = true"),
        ],
    ))
    .await;
    let mut order = String::new();
    for _ in 0..20 {
        order.push_str(&announced(&listen, 1).await);
    }
    assert_eq!(order, "ab".repeat(10));
    assert_eq!(spare.accepted(), 0);

    // Every primary down: the backup takes every connection.
    let listen2 = free_addr();
    let _sluice2 = Sluice::start(&config(
        &listen2,
        "",
        "",
        &[
            server(&dead, ""),
            server(a.addr, "down = true"),
            server(spare.addr, "backup = true"),
        ],
    ))
    .await;
    for _ in 0..5 {
        assert_eq!(announced(&listen2, 1).await, "s");
    }
    assert_eq!(spare.accepted(), 5);
    for backend in [a, b, spare] {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peer_is_hidden_by_next_upstream() {
    let alive = Backend::tcp("b", Behavior::Announce).await;
    let (dead, _dead_socket) = refusing_addr();
    let listen = free_addr();
    let sluice = Sluice::start(&config(
        &listen,
        "",
        "",
        &[server(&dead, "max_fails = 0"), server(alive.addr, "")],
    ))
    .await;
    // max_fails = 0 keeps the dead peer eligible, so half the connections try it first.
    for _ in 0..10 {
        assert_eq!(announced(&listen, 1).await, "b");
    }
    assert_eq!(alive.accepted(), 10);
    let failures = sluice
        .log_lines()
        .iter()
        .filter(|line| line.contains("upstream connect attempt failed") && line.contains(&dead))
        .count();
    assert_eq!(failures, 5, "log:\n{}", sluice.log_text());
    alive.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_peer_is_skipped_inside_fail_timeout_and_tried_after() {
    let b = Backend::tcp("b", Behavior::Announce).await;
    let a_addr = free_addr();
    let listen = free_addr();
    let sluice = Sluice::start(&config(
        &listen,
        "",
        "",
        &[
            server(&a_addr, "max_fails = 1\nfail_timeout = \"2s\""),
            server(b.addr, ""),
        ],
    ))
    .await;
    // The first connection tries a (refused), fails over to b, and marks a failed.
    assert_eq!(announced(&listen, 1).await, "b");
    let marked = std::time::Instant::now();
    // Bring a up: inside fail_timeout it must still not be used.
    let a = Backend::tcp_on(&a_addr, "a", Behavior::Announce).await;
    while marked.elapsed() < Duration::from_millis(1500) {
        assert_eq!(announced(&listen, 1).await, "b");
    }
    assert_eq!(a.accepted(), 0);
    // Marking a peer failed is logged once, as nginx's "temporarily disabled".
    let marked_lines = |sluice: &Sluice| {
        sluice
            .log_lines()
            .iter()
            .filter(|line| {
                line.contains("WARN")
                    && line.contains("peer marked failed")
                    && line.contains(&a_addr)
            })
            .count()
    };
    assert_eq!(marked_lines(&sluice), 1, "log:\n{}", sluice.log_text());
    // After fail_timeout a gets its probe, succeeds, and is back in rotation
    // at nginx's working weight: 0 after its failure, +1 per pick, so b
    // takes two connections before a alternates with it again. As in
    // nginx, a's failure is forgiven when its probe connection closes, so
    // each connection is over (its access line logged) before the next.
    let after = marked + Duration::from_millis(2100);
    tokio::time::sleep_until(after.into()).await;
    let access_lines = || {
        sluice
            .log_lines()
            .iter()
            .filter(|line| line.contains(" INFO access "))
            .count()
    };
    let mut order = String::new();
    for _ in 0..6 {
        let logged = access_lines();
        order.push_str(&announced(&listen, 1).await);
        assert!(wait_until(Duration::from_secs(10), || access_lines() > logged).await);
    }
    assert_eq!(order, "bbabab");
    assert!(
        sluice
            .wait_for_log("peer recovered", Duration::from_secs(5))
            .await,
        "log:\n{}",
        sluice.log_text()
    );
    assert_eq!(marked_lines(&sluice), 1, "log:\n{}", sluice.log_text());
    a.finish().await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_spills_to_backup_and_without_one_closes_the_client() {
    let a = Backend::tcp("a", Behavior::Announce).await;
    let spare = Backend::tcp("s", Behavior::Announce).await;
    let listen = free_addr();
    let _sluice = Sluice::start(&config(
        &listen,
        "",
        "",
        &[
            server(a.addr, "max_conns = 1"),
            server(spare.addr, "backup = true"),
        ],
    ))
    .await;
    let mut held = TcpStream::connect(&listen).await.unwrap();
    let mut name = [0u8; 1];
    held.read_exact(&mut name).await.unwrap();
    assert_eq!(&name, b"a");
    assert_eq!(announced(&listen, 1).await, "s");
    drop(held);
    // Once a's connection closes, a is eligible again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while announced(&listen, 1).await != "a" {
        assert!(
            std::time::Instant::now() < deadline,
            "a never became eligible again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Without a backup, a client over max_conns is closed with nothing written.
    let listen2 = free_addr();
    let sluice2 = Sluice::start(&config(
        &listen2,
        "",
        "",
        &[server(a.addr, "max_conns = 1")],
    ))
    .await;
    let mut held = TcpStream::connect(&listen2).await.unwrap();
    held.read_exact(&mut name).await.unwrap();
    let mut refused = TcpStream::connect(&listen2).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), refused.read_to_end(&mut rest))
        .await
        .expect("client was not closed at once");
    assert!(
        read.is_ok_and(|n| n == 0),
        "something was written: {rest:?}"
    );
    assert!(
        sluice2
            .wait_for_log("client turned away", Duration::from_secs(5))
            .await
    );
    assert!(
        sluice2
            .log_lines()
            .iter()
            .any(|line| line.contains("client turned away") && line.contains("no eligible peer")),
        "{}",
        sluice2.log_text()
    );
    drop(held);
    a.finish().await;
    spare.finish().await;
}
