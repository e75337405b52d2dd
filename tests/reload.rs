//! SIGHUP reload (SPEC §6): listeners keep their sockets, peers keep their
//! state, open connections are never cut, an invalid file changes nothing.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Log lines that end a reload, one per SIGHUP.
fn reload_outcomes(sluice: &Sluice) -> Vec<String> {
    sluice
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("configuration reloaded") || l.contains("reload failed"))
        .collect()
}

/// Writes `config` over sluice's file, sends SIGHUP and returns the line
/// that reports the outcome.
async fn reload(sluice: &Sluice, config: &str) -> String {
    std::fs::write(&sluice.config_path, config).unwrap();
    let before = reload_outcomes(sluice).len();
    sluice.signal(Signal::SIGHUP);
    let done = wait_until(Duration::from_secs(10), || {
        reload_outcomes(sluice).len() > before
    })
    .await;
    assert!(done, "no reload outcome logged:\n{}", sluice.log_text());
    reload_outcomes(sluice)[before].clone()
}

async fn echo_once(addr: &str, message: &[u8]) {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|err| panic!("connect to {addr}: {err}"));
    stream.write_all(message).await.unwrap();
    let mut answer = vec![0; message.len()];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer, message);
}

async fn round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    let mut answer = vec![0; message.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_is_refused_while_reloading() {
    let backend = Backend::tcp("echo", Behavior::Echo).await;
    let listen = free_addr();
    let servers = [server(backend.addr, "")];
    // The reloads alternate the listener's settings and its name: a renamed
    // listener on the same address takes the socket over.
    let configs = [
        config(&listen, "idle_timeout = \"30s\"", "", &servers),
        config(&listen, "idle_timeout = \"20s\"", "", &servers).replace("\"front\"", "\"renamed\""),
    ];
    let sluice = Sluice::start(&configs[0]).await;

    let reloading = Arc::new(AtomicBool::new(true));
    let (client_listen, client_reloading) = (listen.clone(), Arc::clone(&reloading));
    let clients = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut served = 0u32;
        while client_reloading.load(Ordering::SeqCst) {
            assert!(
                served < 20_000 && Instant::now() < deadline,
                "the reloads took too long"
            );
            echo_once(&client_listen, format!("hello {served}").as_bytes()).await;
            served += 1;
        }
        served
    });
    for round in 0..6 {
        let outcome = reload(&sluice, &configs[(round + 1) % 2]).await;
        assert!(outcome.contains("configuration reloaded"), "{outcome}");
    }
    reloading.store(false, Ordering::SeqCst);
    let served = clients.await.unwrap();
    assert!(served > 0);
    assert_eq!(backend.accepted(), served as usize);
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_change_applies_to_new_connections() {
    let backends = [
        Backend::tcp("a", Behavior::Announce).await,
        Backend::tcp("b", Behavior::Announce).await,
        Backend::tcp("c", Behavior::Announce).await,
    ];
    let listen = free_addr();
    let with_weights = |weights: [u32; 3]| {
        let servers: Vec<String> = backends
            .iter()
            .zip(weights)
            .map(|(b, w)| server(b.addr, &format!("name = \"{}\"\nweight = {w}", b.name)))
            .collect();
        config(&listen, "", "", &servers)
    };
    let sluice = Sluice::start(&with_weights([1, 1, 1])).await;
    let mut order = String::new();
    for _ in 0..3 {
        order.push_str(&announced(&listen, 1).await);
    }
    assert_eq!(order, "abc");

    let outcome = reload(&sluice, &with_weights([5, 1, 1])).await;
    assert!(outcome.contains("upstreams changed: pool"), "{outcome}");
    let mut order = String::new();
    for _ in 0..14 {
        order.push_str(&announced(&listen, 1).await);
    }
    assert_eq!(order, "aabacaaaabacaa");
    for backend in backends {
        backend.finish().await;
    }
}

/// Waits for `count` access lines. A connection's access line is logged after
/// its failed attempts, so once it is in, so are they.
async fn connections_logged(sluice: &Sluice, count: usize) -> bool {
    wait_until(Duration::from_secs(5), || {
        sluice
            .log_lines()
            .iter()
            .filter(|line| line.contains(" INFO access "))
            .count()
            == count
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_peer_stays_failed_across_a_reload() {
    let good = Backend::tcp("g", Behavior::Announce).await;
    let dead = free_addr();
    let listen = free_addr();
    let servers = |good_weight: u32| {
        [
            server(&dead, "name = \"dead\"\nfail_timeout = \"60s\""),
            server(
                good.addr,
                &format!("name = \"good\"\nweight = {good_weight}"),
            ),
        ]
    };
    let sluice = Sluice::start(&config(&listen, "", "", &servers(1))).await;
    let failures = || {
        sluice
            .log_lines()
            .iter()
            .filter(|l| l.contains("upstream connect attempt failed") && l.contains("dead"))
            .count()
    };
    // The first pick is `dead`: refused, then `good` takes the client.
    assert_eq!(announced(&listen, 1).await, "g");
    assert!(
        connections_logged(&sluice, 1).await,
        "{}",
        sluice.log_text()
    );
    assert_eq!(failures(), 1);

    // A rebuilt group starts round-robin afresh with `dead` first; only its
    // kept failure state keeps it from being tried again.
    let outcome = reload(&sluice, &config(&listen, "", "", &servers(2))).await;
    assert!(outcome.contains("upstreams changed: pool"), "{outcome}");
    for _ in 0..4 {
        assert_eq!(announced(&listen, 1).await, "g");
    }
    assert!(
        connections_logged(&sluice, 5).await,
        "{}",
        sluice.log_text()
    );
    assert_eq!(failures(), 1, "{}", sluice.log_text());
    assert_eq!(good.accepted(), 5);
    good.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_outlive_the_removal_of_their_listener() {
    let backend = Backend::tcp("echo", Behavior::Echo).await;
    let (first, second) = (free_addr(), free_addr());
    let listener = |name: &str, addr: &str| {
        format!("[[listener]]\nname = \"{name}\"\nbind = \"{addr}\"\nupstream = \"pool\"\n")
    };
    let upstream = format!(
        "[upstream.pool]\n[[upstream.pool.server]]\naddress = \"{}\"\n",
        backend.addr
    );
    let sluice = Sluice::start(&format!("{}\n{upstream}", listener("first", &first))).await;

    let mut open = TcpStream::connect(&first).await.unwrap();
    round_trip(&mut open, b"before").await;

    let outcome = reload(
        &sluice,
        &format!("{}\n{upstream}", listener("second", &second)),
    )
    .await;
    assert!(outcome.contains("listeners added: second"), "{outcome}");
    assert!(outcome.contains("listeners removed: first"), "{outcome}");

    // The removed listener stops accepting; the new one serves.
    let refused = wait_until(Duration::from_secs(5), || {
        std::net::TcpStream::connect(&first).is_err()
    })
    .await;
    assert!(refused, "the removed listener still accepts");
    echo_once(&second, b"via second").await;

    // The connection accepted by the removed listener carries on, both ways.
    for round in 0..3 {
        round_trip(&mut open, format!("after {round}").as_bytes()).await;
    }
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(backend.accepted(), 2);
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_keeps_the_running_configuration() {
    let backends = [
        Backend::tcp("a", Behavior::Announce).await,
        Backend::tcp("b", Behavior::Announce).await,
    ];
    let listen = free_addr();
    let servers: Vec<String> = backends.iter().map(|b| server(b.addr, "")).collect();
    let running = config(&listen, "", "", &servers);
    let sluice = Sluice::start(&running).await;

    // A syntax error: one error line naming the file and line.
    let broken = running.replace("upstream = \"pool\"", "upstream = ");
    let outcome = reload(&sluice, &broken).await;
    assert!(outcome.contains("ERROR"), "{outcome}");
    assert!(outcome.contains("reload failed"), "{outcome}");
    assert!(outcome.contains("sluice.toml:6"), "{outcome}");

    // A host that does not resolve: found after reading, named like a
    // syntax error, with the line of its `address`.
    let unresolvable = running.replacen(&backends[0].addr.to_string(), "nohost.invalid:1", 1);
    let line = unresolvable
        .lines()
        .position(|line| line.contains("nohost.invalid"))
        .unwrap()
        + 1;
    let outcome = reload(&sluice, &unresolvable).await;
    assert!(outcome.contains("reload failed"), "{outcome}");
    assert!(
        outcome.contains(&format!("sluice.toml:{line}: ")),
        "{outcome}"
    );
    assert!(
        outcome.contains("(in `address = ") && outcome.contains("nohost.invalid:1"),
        "{outcome}"
    );

    // A valid file whose new listener cannot bind: nothing of it applies,
    // not even the weights.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let weighted: Vec<String> = backends
        .iter()
        .map(|b| server(b.addr, "weight = 3"))
        .collect();
    let unbindable = format!(
        "{}\n[[listener]]\nname = \"taken\"\nbind = \"{}\"\nupstream = \"pool\"\n",
        config(&listen, "", "", &weighted),
        taken.local_addr().unwrap()
    );
    let outcome = reload(&sluice, &unbindable).await;
    assert!(outcome.contains("reload failed"), "{outcome}");
    assert!(outcome.contains("\"taken\""), "{outcome}");

    let errors = sluice
        .log_lines()
        .iter()
        .filter(|l| l.contains("ERROR"))
        .count();
    assert_eq!(errors, 3, "{}", sluice.log_text());
    // Still weights 1 and 1, from the same round-robin state.
    let mut order = String::new();
    for _ in 0..4 {
        order.push_str(&announced(&listen, 1).await);
    }
    assert_eq!(order, "abab");
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reloaded_shutdown_timeout_applies() {
    let backend = Backend::tcp("echo", Behavior::Echo).await;
    let listen = free_addr();
    let servers = [server(backend.addr, "")];
    let mut sluice = Sluice::start(&config(&listen, "", "", &servers)).await;
    let outcome = reload(
        &sluice,
        &config(&listen, "", "", &servers)
            .replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"300ms\""),
    )
    .await;
    assert!(outcome.contains("configuration reloaded"), "{outcome}");

    let mut open = TcpStream::connect(&listen).await.unwrap();
    round_trip(&mut open, b"held").await;
    let signalled = Instant::now();
    sluice.signal(Signal::SIGTERM);
    let status = sluice
        .wait_exit(Duration::from_secs(4))
        .await
        .expect("sluice did not exit");
    assert!(status.success());
    let took = signalled.elapsed();
    assert!(took >= Duration::from_millis(250), "exited after {took:?}");
    assert!(
        took < Duration::from_secs(3),
        "exited after {took:?}: the old 5s applied"
    );
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_moved_to_another_address_stops_on_the_old_one() {
    let backend = Backend::tcp("echo", Behavior::Echo).await;
    let (old, new) = (free_addr(), free_addr());
    let servers = [server(backend.addr, "")];
    let sluice = Sluice::start(&config(&old, "", "", &servers)).await;
    echo_once(&old, b"on the old address").await;

    let outcome = reload(&sluice, &config(&new, "", "", &servers)).await;
    assert!(outcome.contains("listeners changed: front"), "{outcome}");
    echo_once(&new, b"on the new address").await;
    let refused = wait_until(Duration::from_secs(5), || {
        std::net::TcpStream::connect(&old).is_err()
    })
    .await;
    assert!(refused, "the old address still accepts");
    backend.finish().await;
}

/// One GET on the admin endpoint: (status, body).
async fn admin_get(admin: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_shows_the_reloaded_groups() {
    let (a, b) = (
        Backend::tcp("a", Behavior::Echo).await,
        Backend::tcp("b", Behavior::Echo).await,
    );
    let (listen, admin) = (free_addr(), free_addr());
    let with_admin = |servers: &[String], extra: &str| {
        format!(
            "{}{extra}\n[admin]\nbind = \"{admin}\"\n",
            config(&listen, "", "", servers)
        )
    };
    let one = [server(a.addr, "name = \"a\"")];
    let sluice = Sluice::start(&with_admin(&one, "")).await;

    let two = [
        server(a.addr, "name = \"a\""),
        server(b.addr, "name = \"b\"\nweight = 4"),
    ];
    let extra = format!(
        "\n[upstream.spare]\n[[upstream.spare.server]]\naddress = \"{}\"\n",
        b.addr
    );
    let outcome = reload(&sluice, &with_admin(&two, &extra)).await;
    assert!(outcome.contains("upstreams added: spare"), "{outcome}");
    assert!(outcome.contains("peers added: pool/b"), "{outcome}");

    let (code, body) = admin_get(&admin, "/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let peers: Vec<(String, u64)> = status["upstreams"]["pool"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|peer| {
            (
                peer["name"].as_str().unwrap().to_owned(),
                peer["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(peers, [("a".to_owned(), 1), ("b".to_owned(), 4)]);
    assert!(status["upstreams"]["spare"].is_object(), "{status:#}");
    assert_eq!(admin_get(&admin, "/readyz").await.0, 200);
    a.finish().await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_stops_the_background_tasks_of_the_old_group() {
    let backend = Backend::tcp("checked", Behavior::Echo).await;
    let listen = free_addr();
    let servers = [server(backend.addr, "")];
    let checked = config(
        &listen,
        "",
        "[upstream.pool.health_check]\ninterval = \"50ms\"\ntimeout = \"1s\"",
        &servers,
    );
    let sluice = Sluice::start(&checked).await;
    assert!(wait_until(Duration::from_secs(5), || backend.accepted() >= 3).await);

    let outcome = reload(&sluice, &config(&listen, "", "", &servers)).await;
    assert!(outcome.contains("upstreams changed: pool"), "{outcome}");
    // Checking is asynchronous: one round may have been under way.
    let after_reload = backend.accepted() + 1;
    // Absence over a window: a leaked task would check every 50 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        backend.accepted() <= after_reload,
        "health checks went on after the reload"
    );
    echo_once(&listen, b"still relayed").await;
    backend.finish().await;
}

/// `delayed_ack` changes on reload for the socket the listener keeps: off,
/// the client gets the ACK of its request as a segment of its own; back on,
/// it rides on the reply (SYN-ACK and the reply with its FIN: two segments).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_ack_follows_a_reload() {
    let backend_addr = one_segment_backend(4, b"pong").await;
    let listen = free_addr();
    let servers = [server(&backend_addr, "")];
    let sluice = Sluice::start(&config(&listen, "delayed_ack = false", "", &servers)).await;
    assert_ack_goes_alone(&listen, b"ping", b"pong").await;
    let outcome = reload(&sluice, &config(&listen, "", "", &servers)).await;
    assert!(outcome.contains("configuration reloaded"), "{outcome}");
    assert_ack_rides_on_reply(&listen, b"ping", b"pong").await;
    let outcome = reload(
        &sluice,
        &config(&listen, "delayed_ack = false", "", &servers),
    )
    .await;
    assert!(outcome.contains("configuration reloaded"), "{outcome}");
    assert_ack_goes_alone(&listen, b"ping", b"pong").await;
}
