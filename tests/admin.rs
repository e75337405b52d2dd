//! The admin endpoint (SPEC §5): metrics after known traffic, /status,
//! /readyz through a drain, the access log, and the Grafana dashboard.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Sends one GET and returns (status, body).
async fn get_on<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

async fn get(admin: &str, path: &str) -> (u16, String) {
    get_on(TcpStream::connect(admin).await.unwrap(), path).await
}

/// One scrape of /metrics: series (name plus sorted labels) to value.
struct Scrape {
    series: HashMap<String, f64>,
    text: String,
}

fn series_key(name: &str, labels: &[(&str, &str)]) -> String {
    let labels: BTreeSet<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{name}{labels:?}")
}

impl Scrape {
    async fn take(admin: &str) -> Scrape {
        let (status, text) = get(admin, "/metrics").await;
        assert_eq!(status, 200);
        let mut series = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (name_labels, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match name_labels.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap();
                    let labels: Vec<(&str, &str)> = inner
                        .split("\",")
                        .map(|pair| {
                            let (k, v) = pair.split_once("=\"").unwrap();
                            (k, v.trim_end_matches('"'))
                        })
                        .collect();
                    (name, labels)
                }
                None => (name_labels, Vec::new()),
            };
            series.insert(series_key(name, &labels), value.parse().unwrap());
        }
        Scrape { series, text }
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.series.get(&series_key(name, labels)) {
            Some(value) => *value,
            None => panic!("no series {name} {labels:?} in:\n{}", self.text),
        }
    }

    fn peer(&self, name: &str, server: &str) -> f64 {
        self.value(name, &[("upstream", "pool"), ("server", server)])
    }

    fn listener(&self, name: &str) -> f64 {
        self.value(name, &[("listener", "front")])
    }
}

/// Scrapes until `condition` holds, or fails after a few seconds.
async fn scrape_until(admin: &str, what: &str, condition: impl Fn(&Scrape) -> bool) -> Scrape {
    scrape_within(Duration::from_secs(5), admin, what, condition).await
}

async fn scrape_within(
    timeout: Duration,
    admin: &str,
    what: &str,
    condition: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let scrape = Scrape::take(admin).await;
        if condition(&scrape) {
            return scrape;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never held; last scrape:\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status(admin: &str) -> serde_json::Value {
    let (code, body) = get(admin, "/status").await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

fn peer_status<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["upstreams"]["pool"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|peer| peer["name"] == name)
        .unwrap_or_else(|| panic!("no peer {name} in {status:#}"))
}

fn with_admin(config: String, admin: &str) -> String {
    format!("{config}\n[admin]\nbind = \"{admin}\"\n")
}

/// Connects and expects to be closed with nothing written.
async fn turned_away(listen: &str) {
    let mut client = TcpStream::connect(listen).await.unwrap();
    let mut buf = [0; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "client got {read:?}");
}

const LISTENER_TOTAL: &str = "sluice_listener_connections_total";
const LISTENER_ACTIVE: &str = "sluice_listener_connections_active";
const TOTAL: &str = "sluice_upstream_connections_total";
const ACTIVE: &str = "sluice_upstream_connections_active";
const FAILURES: &str = "sluice_upstream_connect_failures_total";
const SENT: &str = "sluice_upstream_bytes_sent_total";
const RECEIVED: &str = "sluice_upstream_bytes_received_total";
const UP: &str = "sluice_upstream_server_up";
const UNAVAILABLE: &str = "sluice_upstream_unavailable_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_exactly_with_the_traffic() {
    let a = Backend::tcp("a", Behavior::Echo).await;
    let b = Backend::tcp("b", Behavior::Echo).await;
    let (dead, _dead_socket) = refusing_addr();
    let (listen, admin) = (free_addr(), free_addr());
    let b_label = b.addr.to_string();
    let _sluice = Sluice::start(&with_admin(
        config(
            &listen,
            "",
            "",
            &[
                server(a.addr, "name = \"a\""),
                server(&dead, "name = \"dead\""),
                server(b.addr, ""),
            ],
        ),
        &admin,
    ))
    .await;

    const CLIENTS: usize = 6;
    const LEN: usize = 40_000;
    for seed in 0..CLIENTS {
        let data = payload(LEN, seed as u64);
        let stream = TcpStream::connect(&listen).await.unwrap();
        assert_eq!(echo_digest(stream, data.clone()).await, sha256(&data));
    }
    let scrape = scrape_until(&admin, "every connection closed", |s| {
        s.listener(LISTENER_TOTAL) == CLIENTS as f64 && s.listener(LISTENER_ACTIVE) == 0.0
    })
    .await;

    let (to_a, to_b) = (a.accepted(), b.accepted());
    assert_eq!(to_a + to_b, CLIENTS);
    for (label, accepted) in [("a", to_a), (b_label.as_str(), to_b)] {
        let relayed = (accepted * LEN) as f64;
        assert_eq!(scrape.peer(TOTAL, label), accepted as f64, "{label}");
        assert_eq!(scrape.peer(ACTIVE, label), 0.0, "{label}");
        assert_eq!(scrape.peer(SENT, label), relayed, "{label}");
        assert_eq!(scrape.peer(RECEIVED, label), relayed, "{label}");
        assert_eq!(scrape.peer(FAILURES, label), 0.0, "{label}");
        assert_eq!(scrape.peer(UP, label), 1.0, "{label}");
        assert_eq!(
            scrape.peer("sluice_upstream_connect_duration_seconds_count", label),
            accepted as f64,
            "{label}"
        );
        let all = [("upstream", "pool"), ("server", label), ("le", "+Inf")];
        assert_eq!(
            scrape.value("sluice_upstream_connect_duration_seconds_bucket", &all),
            accepted as f64
        );
    }
    assert_eq!(scrape.peer(TOTAL, "dead"), 0.0);
    assert_eq!(scrape.peer(FAILURES, "dead"), 1.0);
    assert_eq!(scrape.peer(UP, "dead"), 0.0);
    assert_eq!(scrape.value(UNAVAILABLE, &[("upstream", "pool")]), 0.0);
    assert!(scrape
        .text
        .contains("# TYPE sluice_upstream_connect_duration_seconds histogram"));

    // /status counts the same traffic.
    let status = status(&admin).await;
    let peer = peer_status(&status, "a");
    assert_eq!(peer["total"], to_a);
    assert_eq!(peer["bytes_sent"], to_a * LEN);
    assert_eq!(peer["bytes_received"], to_a * LEN);
    assert_eq!(peer["active"], 0);
    a.finish().await;
    b.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_connections_report_bytes_while_open() {
    let backend = Backend::tcp("b", Behavior::Echo).await;
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &[server(backend.addr, "name = \"b\"")]),
        &admin,
    ))
    .await;
    let mut held = TcpStream::connect(&listen).await.unwrap();
    let data = payload(1500, 9);
    held.write_all(&data).await.unwrap();
    let mut echo = vec![0; data.len()];
    held.read_exact(&mut echo).await.unwrap();
    assert_eq!(echo, data);
    // Reported every 5 s while the connection stays open.
    let scrape = scrape_within(
        Duration::from_secs(10),
        &admin,
        "bytes of an open connection",
        |s| s.peer(SENT, "b") == 1500.0,
    )
    .await;
    assert_eq!(scrape.peer(RECEIVED, "b"), 1500.0);
    assert_eq!(scrape.peer(ACTIVE, "b"), 1.0);
    assert_eq!(scrape.listener(LISTENER_ACTIVE), 1.0);
    // At close, only what is new is added.
    held.write_all(b"tail").await.unwrap();
    let mut tail = [0; 4];
    held.read_exact(&mut tail).await.unwrap();
    drop(held);
    let scrape = scrape_until(&admin, "the connection closed", |s| {
        s.listener(LISTENER_ACTIVE) == 0.0
    })
    .await;
    assert_eq!(scrape.peer(SENT, "b"), 1504.0);
    assert_eq!(scrape.peer(RECEIVED, "b"), 1504.0);
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_closes_are_counted_and_server_up_recovers() {
    // Two peers: a group of one server never marks it failed (as nginx).
    let (dead, dead_socket) = refusing_addr();
    let (spare, _spare_socket) = refusing_addr();
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(
            &listen,
            "",
            "",
            &[
                server(&dead, "name = \"only\"\nfail_timeout = \"1s\""),
                server(&spare, "name = \"spare\"\nfail_timeout = \"1s\""),
            ],
        ),
        &admin,
    ))
    .await;
    let scrape = Scrape::take(&admin).await;
    assert_eq!(scrape.peer(UP, "only"), 1.0);
    assert_eq!(scrape.value(UNAVAILABLE, &[("upstream", "pool")]), 0.0);

    // Both connects fail; then both peers sit out.
    turned_away(&listen).await;
    turned_away(&listen).await;
    let scrape = scrape_until(&admin, "two unavailable closes", |s| {
        s.value(UNAVAILABLE, &[("upstream", "pool")]) == 2.0
    })
    .await;
    assert_eq!(scrape.peer(FAILURES, "only"), 1.0);
    assert_eq!(scrape.peer(UP, "only"), 0.0);
    assert_eq!(
        peer_status(&status(&admin).await, "only")["state"],
        "failed"
    );

    // The backend comes back; once fail_timeout has passed the peer is up again.
    drop(dead_socket);
    let revived = Backend::tcp_on(&dead, "revived", Behavior::Echo).await;
    scrape_until(&admin, "server_up back to 1", |s| s.peer(UP, "only") == 1.0).await;
    assert_eq!(peer_status(&status(&admin).await, "only")["state"], "up");
    let data = payload(1000, 7);
    let stream = TcpStream::connect(&listen).await.unwrap();
    assert_eq!(echo_digest(stream, data.clone()).await, sha256(&data));
    let scrape = scrape_until(&admin, "the connection closed", |s| {
        s.listener(LISTENER_ACTIVE) == 0.0 && s.listener(LISTENER_TOTAL) == 3.0
    })
    .await;
    assert_eq!(scrape.peer(TOTAL, "only"), 1.0);
    assert_eq!(scrape.peer(UP, "only"), 1.0);
    assert_eq!(scrape.value(UNAVAILABLE, &[("upstream", "pool")]), 2.0);
    assert_eq!(revived.accepted(), 1);
    revived.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_add_up_until_a_success_even_across_fail_timeout() {
    // As nginx counts them: only a success after a new window forgives
    // failures, so two failures further apart than fail_timeout still mark
    // the peer (a group of one server would never be marked: `good` is
    // there for that, and serves every client).
    let (dead, _dead_socket) = refusing_addr();
    let good = Backend::tcp("good", Behavior::Echo).await;
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(
            &listen,
            "",
            "",
            &[
                server(
                    &dead,
                    "name = \"only\"\nmax_fails = 2\nfail_timeout = \"2s\"",
                ),
                server(good.addr, "name = \"good\""),
            ],
        ),
        &admin,
    ))
    .await;
    let served = || async {
        let data = payload(100, 3);
        let stream = TcpStream::connect(&listen).await.unwrap();
        assert_eq!(echo_digest(stream, data.clone()).await, sha256(&data));
    };

    // Round-robin tries `only` first: one failure, still up.
    served().await;
    let first = std::time::Instant::now();
    let scrape = scrape_until(&admin, "the failure counted", |s| {
        s.peer(FAILURES, "only") == 1.0
    })
    .await;
    assert_eq!(scrape.peer(UP, "only"), 1.0);

    // After fail_timeout, connections until `only` is tried again: that
    // second failure marks it although the first is older than fail_timeout.
    tokio::time::sleep_until((first + Duration::from_millis(2300)).into()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Scrape::take(&admin).await.peer(FAILURES, "only") < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "only was not tried again"
        );
        served().await;
    }
    let scrape = Scrape::take(&admin).await;
    assert_eq!(scrape.peer(FAILURES, "only"), 2.0);
    assert_eq!(scrape.peer(UP, "only"), 0.0);
    assert_eq!(
        peer_status(&status(&admin).await, "only")["state"],
        "failed"
    );
    good.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_failed_down_up_and_backup_peers() {
    let live = Backend::tcp("live", Behavior::Echo).await;
    let spare = Backend::tcp("spare", Behavior::Echo).await;
    let (dead, _dead_socket) = refusing_addr();
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(
            &listen,
            "",
            "",
            &[
                server(&dead, "name = \"dead\""),
                server(free_addr(), "name = \"off\"\ndown = true"),
                server(live.addr, "name = \"live\""),
                server(spare.addr, "name = \"spare\"\nbackup = true\nweight = 2"),
            ],
        ),
        &admin,
    ))
    .await;

    // Round-robin starts with `dead`: the attempt fails and `live` takes over.
    let data = payload(5000, 1);
    let stream = TcpStream::connect(&listen).await.unwrap();
    assert_eq!(echo_digest(stream, data.clone()).await, sha256(&data));
    scrape_until(&admin, "the connection closed", |s| {
        s.listener(LISTENER_TOTAL) == 1.0 && s.listener(LISTENER_ACTIVE) == 0.0
    })
    .await;

    let status = status(&admin).await;
    assert_eq!(status["ready"], true);
    assert_eq!(status["draining"], false);
    assert_eq!(status["upstreams"]["pool"]["balance"], "round_robin");
    let names: Vec<&str> = status["upstreams"]["pool"]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|peer| peer["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dead", "off", "live", "spare"]);

    let failed = peer_status(&status, "dead");
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["address"], dead.as_str());
    assert_eq!(failed["failures"], 1);
    assert_eq!(failed["total"], 0);
    let reason = failed["last_failure_reason"].as_str().unwrap();
    assert!(reason.contains("refused"), "{reason}");
    let time = failed["last_failure_time"].as_str().unwrap();
    assert!(time.ends_with('Z') && time.contains('T'), "{time}");

    let down = peer_status(&status, "off");
    assert_eq!(down["state"], "down");
    assert_eq!(down["total"], 0);

    let up = peer_status(&status, "live");
    assert_eq!(up["state"], "up");
    assert_eq!(up["weight"], 1);
    assert_eq!(up["backup"], false);
    assert_eq!(
        (&up["total"], &up["active"], &up["failures"]),
        (&1.into(), &0.into(), &0.into())
    );
    assert_eq!(up["bytes_sent"], 5000);
    assert_eq!(up["bytes_received"], 5000);
    assert_eq!(up["last_failure_reason"], serde_json::Value::Null);
    assert_eq!(up["last_failure_time"], serde_json::Value::Null);

    let backup = peer_status(&status, "spare");
    assert_eq!(backup["state"], "backup");
    assert_eq!(backup["backup"], true);
    assert_eq!(backup["weight"], 2);
    assert_eq!(backup["total"], 0);

    // A relayed connection is active while it is open.
    let mut held = TcpStream::connect(&listen).await.unwrap();
    held.write_all(b"ping").await.unwrap();
    let mut echo = [0; 4];
    held.read_exact(&mut echo).await.unwrap();
    let status_open = self::status(&admin).await;
    assert_eq!(peer_status(&status_open, "live")["active"], 1);
    drop(held);
    live.finish().await;
    spare.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_while_draining_and_healthz_stays_200() {
    let backend = Backend::tcp("b", Behavior::Echo).await;
    let (listen, admin) = (free_addr(), free_addr());
    let mut sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &[server(backend.addr, "")]),
        &admin,
    ))
    .await;
    assert_eq!(get(&admin, "/readyz").await.0, 200);
    assert_eq!(get(&admin, "/healthz").await, (200, "ok\n".to_owned()));

    // An open connection keeps the drain going for up to shutdown_timeout (5s).
    let mut held = TcpStream::connect(&listen).await.unwrap();
    held.write_all(b"ping").await.unwrap();
    let mut echo = [0; 4];
    held.read_exact(&mut echo).await.unwrap();
    sluice.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        sluice
            .wait_for_log("draining", Duration::from_secs(5))
            .await
    );
    assert_eq!(get(&admin, "/readyz").await, (503, "draining\n".to_owned()));
    assert_eq!(get(&admin, "/healthz").await.0, 200);
    assert_eq!(status(&admin).await["draining"], true);

    // The connection still works during the drain; closing it ends the process.
    held.write_all(b"pong").await.unwrap();
    held.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"pong");
    drop(held);
    let exit = sluice.wait_exit(Duration::from_secs(5)).await.unwrap();
    assert_eq!(exit.code(), Some(0));
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_are_refused() {
    let backend = Backend::tcp("b", Behavior::Echo).await;
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &[server(backend.addr, "")]),
        &admin,
    ))
    .await;
    assert_eq!(get(&admin, "/nope").await.0, 404);
    let mut stream = TcpStream::connect(&admin).await.unwrap();
    stream
        .write_all(
            b"POST /metrics HTTP/1.1\r\nHost: s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert!(response.to_ascii_lowercase().contains("allow: get, head"));
    backend.finish().await;
}

/// The access-log lines (target sluice::access, message "access") of a text log.
fn access_lines(sluice: &Sluice) -> Vec<String> {
    sluice
        .log_lines()
        .into_iter()
        .filter(|line| line.contains(" INFO access "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_a_line_for_success_failover_and_no_peer() {
    let good = Backend::tcp("good", Behavior::Echo).await;
    let (dead, _dead_socket) = refusing_addr();
    let listen = free_addr();
    let sluice = Sluice::start(&config(
        &listen,
        "",
        "",
        &[
            server(&dead, "name = \"dead\""),
            server(good.addr, "name = \"good\""),
        ],
    ))
    .await;

    // Failover: `dead` refuses, `good` relays.
    let data = payload(3000, 2);
    let stream = TcpStream::connect(&listen).await.unwrap();
    assert_eq!(echo_digest(stream, data.clone()).await, sha256(&data));
    assert!(wait_until(Duration::from_secs(5), || access_lines(&sluice).len() == 1).await);
    // Success on the first try (`dead` now sits out fail_timeout).
    let data = payload(1000, 3);
    let stream = TcpStream::connect(&listen).await.unwrap();
    assert_eq!(echo_digest(stream, data.clone()).await, sha256(&data));
    assert!(wait_until(Duration::from_secs(5), || access_lines(&sluice).len() == 2).await);
    // No peer: `good` goes away too.
    good.finish().await;
    turned_away(&listen).await;
    assert!(
        wait_until(Duration::from_secs(5), || access_lines(&sluice).len() == 3).await,
        "{}",
        sluice.log_text()
    );

    let lines = access_lines(&sluice);
    let failover = &lines[0];
    for field in [
        "listener=\"front\"",
        "upstream=\"pool\"",
        "peer=\"good\"",
        "sent=3000",
        "received=3000",
        "close=\"done\"",
        "connect_ms=",
        "duration_ms=",
    ] {
        assert!(failover.contains(field), "{field} missing in {failover}");
    }
    assert!(
        failover.contains("tries=\"dead failed (Connection refused")
            && failover.contains("), good connected\""),
        "{failover}"
    );
    assert!(failover.contains("client=127.0.0.1:"), "{failover}");

    let success = &lines[1];
    assert!(success.contains("tries=\"good connected\""), "{success}");
    assert!(success.contains("sent=1000 received=1000"), "{success}");
    assert!(success.contains("close=\"done\""), "{success}");

    let no_peer = &lines[2];
    for field in [
        "peer=\"-\"",
        "sent=0 received=0",
        "close=\"no_peer\"",
        "reason=\"the only eligible peer failed: Connection refused",
    ] {
        assert!(no_peer.contains(field), "{field} missing in {no_peer}");
    }
    assert!(
        no_peer.contains("tries=\"good failed (Connection refused"),
        "{no_peer}"
    );
    assert!(!no_peer.contains("connect_ms="), "{no_peer}");
    // The warn line per failed attempt stays.
    let warned = sluice
        .log_lines()
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("upstream connect attempt failed"))
        .count();
    assert_eq!(warned, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_is_json_with_log_format_json_and_can_be_turned_off() {
    let backend = Backend::tcp("b", Behavior::Echo).await;
    let (logged, quiet, admin) = (free_addr(), free_addr(), free_addr());
    let text = format!(
        "[[listener]]\nname = \"logged\"\nbind = \"{logged}\"\nupstream = \"pool\"\n\n\
         [[listener]]\nname = \"quiet\"\nbind = \"{quiet}\"\nupstream = \"pool\"\naccess_log = false\n\n\
         [upstream.pool]\n[[upstream.pool.server]]\naddress = \"{}\"\nname = \"b\"\n\n\
         [admin]\nbind = \"{admin}\"\n",
        backend.addr
    );
    let sluice = Sluice::spawn(&text, &["--log-format", "json"]);
    assert!(
        wait_until(Duration::from_secs(10), || sluice
            .log_lines()
            .iter()
            .filter(|l| l.contains("\"listening\""))
            .count()
            == 2)
        .await,
        "{}",
        sluice.log_text()
    );
    let access = || -> Vec<serde_json::Value> {
        sluice
            .log_lines()
            .iter()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["message"] == "access")
            .collect()
    };
    // The quiet listener's connection is over (its access line would be
    // written before it stops counting as active), and no line came.
    let data = payload(700, 4);
    let stream = TcpStream::connect(&quiet).await.unwrap();
    assert_eq!(echo_digest(stream, data.clone()).await, sha256(&data));
    let quiet_done = [("listener", "quiet")];
    scrape_until(&admin, "the quiet connection closed", |s| {
        s.value(LISTENER_TOTAL, &quiet_done) == 1.0 && s.value(LISTENER_ACTIVE, &quiet_done) == 0.0
    })
    .await;
    assert!(access().is_empty(), "{}", sluice.log_text());

    let stream = TcpStream::connect(&logged).await.unwrap();
    assert_eq!(echo_digest(stream, data.clone()).await, sha256(&data));
    assert!(wait_until(Duration::from_secs(5), || !access().is_empty()).await);
    let lines = access();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["listener"], "logged");
    assert_eq!(line["upstream"], "pool");
    assert_eq!(line["peer"], "b");
    assert_eq!(line["tries"], "b connected");
    assert_eq!(line["sent"], 700);
    assert_eq!(line["received"], 700);
    assert_eq!(line["close"], "done");
    assert!(line["connect_ms"].as_f64().unwrap() >= 0.0);
    assert!(line["duration_ms"].as_f64().unwrap() >= line["connect_ms"].as_f64().unwrap());
    assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(line["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_flag_overrides_the_config_and_serves_on_a_unix_socket() {
    let backend = Backend::tcp("b", Behavior::Echo).await;
    let (listen, configured) = (free_addr(), free_addr());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let flag = format!("unix:{}", socket.display());
    let sluice = Sluice::spawn(
        &with_admin(
            config(&listen, "", "", &[server(backend.addr, "")]),
            &configured,
        ),
        &["--admin", &flag],
    );
    assert!(
        sluice
            .wait_for_log("listening", Duration::from_secs(10))
            .await
    );
    let (code, body) = get_on(UnixStream::connect(&socket).await.unwrap(), "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (code, body) = get_on(UnixStream::connect(&socket).await.unwrap(), "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("sluice_listener_connections_total{listener=\"front\"} 0"));
    assert!(TcpStream::connect(&configured).await.is_err());
    backend.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_address_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        with_admin(
            config(&free_addr(), "", "", &[server(free_addr(), "")]),
            &taken_addr,
        ),
    )
    .unwrap();
    let config_arg = path.to_str().unwrap();

    let (code, _, stderr) = run_sluice(&["--config", config_arg], &[], dir.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&taken_addr), "{stderr}");
    assert!(stderr.contains("admin"), "{stderr}");

    let (code, _, stderr) = run_sluice(
        &["--config", config_arg, "--admin", "localhost"],
        &[],
        dir.path(),
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--admin"), "{stderr}");

    let (code, stdout, stderr) = run_sluice(&["--check", "--config", config_arg], &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("admin endpoint on {taken_addr}")),
        "{stdout}"
    );
}

/// The metric names SPEC §5 lists.
/// The metrics SPEC names: §5, and §9 (long-lived connections).
fn spec_metric_names() -> BTreeSet<String> {
    let spec =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/SPEC.md")).unwrap();
    let section = |start: &str, end: &str| {
        let from = spec.split(start).nth(1).unwrap();
        from.split(end).next().unwrap().to_owned()
    };
    let mut names = metric_names(&section("## 5.", "## 6."));
    names.extend(metric_names(&section(
        "## 9.",
        "Where the contract is silent",
    )));
    names
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("sluice_") {
        let name: String = rest[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[start + name.len()..];
        names.insert(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboard_queries_only_exported_metrics() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    let panels = dashboard["panels"].as_array().unwrap();
    let mut queried = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel {title}: {expr}");
            queried.extend(names);
        }
    }

    // Every queried series is in SPEC §5 or §9 (histograms through their
    // suffixes).
    let spec = spec_metric_names();
    assert_eq!(spec.len(), 12, "{spec:?}");
    for name in &queried {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| base.ends_with("_seconds"))
            .unwrap_or(name);
        assert!(spec.contains(base), "{name} is not in SPEC §5 or §9");
    }
    // The dashboard covers connections, bytes, peer state, latency and no-peer closes.
    for needed in [
        "sluice_listener_connections_active",
        "sluice_upstream_connections_total",
        "sluice_upstream_bytes_sent_total",
        "sluice_upstream_bytes_received_total",
        "sluice_upstream_server_up",
        "sluice_upstream_connect_duration_seconds_bucket",
        "sluice_upstream_unavailable_total",
        "sluice_connections_recycled_total",
    ] {
        assert!(
            queried.contains(needed),
            "the dashboard does not query {needed}"
        );
    }

    // And a running sluice exports every one of them.
    let backend = Backend::tcp("b", Behavior::Echo).await;
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &[server(backend.addr, "")]),
        &admin,
    ))
    .await;
    let exported = metric_names(&Scrape::take(&admin).await.text);
    for name in spec.iter().chain(&queried) {
        assert!(exported.contains(name), "sluice does not export {name}");
    }
    backend.finish().await;
}
