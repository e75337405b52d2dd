//! Worker threads (`--workers`, `SLUICE_WORKERS`): every worker accepts on
//! every listener, selection stays exact across them, and SO_REUSEPORT does
//! not let a second process share a listener's address.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

/// The worker threads of process `pid`, by name, with their voluntary
/// context switches so far (a worker blocks in its event loop once per
/// round of work, so the count moves only on a worker that served something).
fn worker_switches(pid: i32) -> BTreeMap<String, u64> {
    let mut workers = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = entry.unwrap().path();
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        let name = name.trim().to_owned();
        if !name.starts_with("sluice-worker-") {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or(0);
        workers.insert(name, switches);
    }
    workers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_exact_across_three_workers_sharing_the_clients() {
    let backends = [
        Backend::tcp("a", Behavior::Announce).await,
        Backend::tcp("b", Behavior::Announce).await,
        Backend::tcp("c", Behavior::Announce).await,
    ];
    let listen = free_addr();
    let servers: Vec<String> = backends.iter().map(|b| server(b.addr, "")).collect();
    let sluice = Sluice::start_with_env(
        &config(&listen, "", "", &servers),
        &[("SLUICE_WORKERS", "3")],
    )
    .await;
    let before = worker_switches(sluice.pid());
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["sluice-worker-0", "sluice-worker-1", "sluice-worker-2"]
    );

    let mut counts = BTreeMap::new();
    for _ in 0..60 {
        *counts.entry(announced(&listen, 1).await).or_insert(0) += 1;
    }
    assert_eq!(
        counts,
        BTreeMap::from([("a".into(), 20), ("b".into(), 20), ("c".into(), 20)])
    );

    // The kernel spreads clients over the workers' sockets by their
    // addresses: 60 clients all landing on one of three is a 1-in-10^28 event.
    let after = worker_switches(sluice.pid());
    let busy = after
        .iter()
        .filter(|(name, switches)| before.get(*name).is_some_and(|b| *switches > b))
        .count();
    assert!(busy >= 2, "before {before:?}, after {after:?}");
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_listener_serves_concurrent_clients_with_three_workers() {
    let dir = tempfile::tempdir().unwrap();
    let upstream_path = dir.path().join("upstream.sock");
    let listen_path = dir.path().join("listen.sock");
    let backend = Backend::unix(&upstream_path, "u", Behavior::Echo).await;
    let text = config(
        &format!("unix:{}", listen_path.display()),
        "",
        "",
        &[server(format!("unix:{}", upstream_path.display()), "")],
    );
    let sluice = Sluice::start_with_env(&text, &[("SLUICE_WORKERS", "3")]).await;
    let clients: Vec<_> = (0..24u64)
        .map(|seed| {
            let path = listen_path.clone();
            tokio::spawn(async move {
                let data = payload(64 * 1024, seed);
                let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
                assert_eq!(echo_digest(stream, data.clone()).await, sha256(&data));
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(backend.accepted(), 24);
    assert_eq!(worker_switches(sluice.pid()).len(), 3);
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sluice_on_the_same_address_exits_2_and_the_first_keeps_it() {
    let backend = Backend::tcp("a", Behavior::Announce).await;
    let listen = free_addr();
    let text = config(&listen, "", "", &[server(backend.addr, "")]);
    let _first = Sluice::start_with_env(&text, &[("SLUICE_WORKERS", "2")]).await;
    let mut second = Sluice::spawn_with_env(&text, &[], &[("SLUICE_WORKERS", "2")]);
    let status = second
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("the second sluice kept running");
    assert_eq!(status.code(), Some(2));
    // stderr is read by another thread: wait for the line, not only the exit.
    assert!(
        second.wait_for_log("in use", Duration::from_secs(5)).await,
        "{}",
        second.log_text()
    );
    let log = second.log_text();
    assert!(log.contains(&listen) && log.contains("in use"), "{log}");
    for _ in 0..20 {
        assert_eq!(announced(&listen, 1).await, "a");
    }
    assert_eq!(backend.accepted(), 20);
    backend.finish().await;
}

#[test]
fn workers_must_be_a_positive_whole_number() {
    let dir = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example");
    for bad in ["0", "-1", "two", ""] {
        let flag = format!("--workers={bad}");
        let (code, _, stderr) =
            run_sluice(&["--check", "--config", example, &flag], &[], dir.path());
        assert_eq!(code, 1, "--workers {bad:?}: {stderr}");
        assert!(stderr.contains("--workers"), "{stderr}");
    }
    let (code, _, stderr) = run_sluice(
        &["--check", "--config", example],
        &[("SLUICE_WORKERS", "none")],
        dir.path(),
    );
    assert_eq!(code, 1, "{stderr}");
    let (code, stdout, stderr) = run_sluice(
        &["--check", "--config", example, "--workers", "4"],
        &[],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("is valid"), "{stdout}");
}
