//! The runtime API (SPEC §10) through the real binary: drain, weight, add and
//! remove under load, access control, concurrent writers, the state file,
//! and `sluice ctl`.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(15);

/// One HTTP/1.1 request to the admin endpoint: (status, JSON body or Null).
async fn api(
    admin: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let body = body.unwrap_or("");
    let auth = token.map_or(String::new(), |token| {
        format!("Authorization: Bearer {token}\r\n")
    });
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn status(admin: &str) -> Value {
    let (code, body) = api(admin, "GET", "/status", None, None).await;
    assert_eq!(code, 200);
    body
}

fn peers(status: &Value) -> Vec<Value> {
    status["upstreams"]["pool"]["peers"]
        .as_array()
        .unwrap()
        .clone()
}

fn peer<'a>(group: &'a Value, name: &str) -> Option<&'a Value> {
    group["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|peer| peer["name"] == name)
}

fn with_admin(config: String, admin: &str, extra: &str) -> String {
    format!("{config}\n[admin]\nbind = \"{admin}\"\n{extra}\n")
}

/// A connection through sluice to an announcing backend, with its name read.
async fn open(listen: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(listen).await.unwrap();
    let mut name = [0u8; 1];
    stream.read_exact(&mut name).await.unwrap();
    (stream, String::from_utf8(name.to_vec()).unwrap())
}

async fn names_of_next(listen: &str, count: usize) -> String {
    let mut names = String::new();
    for _ in 0..count {
        names.push_str(&open(listen).await.1);
    }
    names
}

/// Bytes still flow both ways on an open relayed connection.
async fn still_flows(stream: &mut TcpStream) {
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
}

fn metric(text: &str, name: &str, server: &str) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(&format!("server=\"{server}\"")))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

async fn metrics(admin: &str) -> String {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

async fn announcing(names: &[&str]) -> Vec<Backend> {
    let mut backends = Vec::new();
    for name in names {
        backends.push(Backend::tcp(name, Behavior::Announce).await);
    }
    backends
}

fn servers(backends: &[Backend]) -> Vec<String> {
    backends
        .iter()
        .map(|backend| server(backend.addr, &format!("name = \"{}\"", backend.name)))
        .collect()
}

#[tokio::test]
async fn drain_sends_new_connections_elsewhere_and_delete_waits_for_the_open_ones() {
    let backends = announcing(&["a", "b"]).await;
    let (listen, admin) = (free_addr(), free_addr());
    let sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        "",
    ))
    .await;
    let mut open_on_a = Vec::new();
    for _ in 0..4 {
        let (stream, name) = open(&listen).await;
        if name == "a" {
            open_on_a.push(stream);
        }
    }
    assert_eq!(open_on_a.len(), 2, "round-robin gives a two of four");

    let (code, group) = api(
        &admin,
        "PATCH",
        "/api/upstreams/pool/servers/a",
        None,
        Some(r#"{"state": "drain"}"#),
    )
    .await;
    assert_eq!(code, 200, "{group}");
    assert_eq!(peer(&group, "a").unwrap()["state"], "draining");
    // New connections go elsewhere at once; open ones keep flowing.
    assert_eq!(names_of_next(&listen, 6).await, "bbbbbb");
    for stream in &mut open_on_a {
        still_flows(stream).await;
    }
    let during = status(&admin).await;
    let a = peer(&during["upstreams"]["pool"], "a").unwrap();
    assert_eq!(
        (a["state"].as_str(), a["active"].as_u64()),
        (Some("draining"), Some(2))
    );
    let text = metrics(&admin).await;
    assert_eq!(
        metric(&text, "sluice_upstream_draining_connections", "a"),
        Some(2.0),
        "{text}"
    );
    assert!(sluice.wait_for_log("runtime change", WAIT).await);
    let line = sluice
        .log_lines()
        .into_iter()
        .find(|line| line.contains("runtime change"))
        .unwrap();
    assert!(
        line.contains("who=127.0.0.1:")
            && line.contains("old=\"state=up weight=1 max_conns=0\"")
            && line.contains("new=\"state=drain weight=1 max_conns=0\""),
        "{line}"
    );

    // DELETE answers only once the drained connections are gone.
    let delete = tokio::spawn({
        let admin = admin.clone();
        async move {
            api(
                &admin,
                "DELETE",
                "/api/upstreams/pool/servers/a",
                None,
                None,
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !delete.is_finished(),
        "DELETE returned with connections open"
    );
    for stream in &mut open_on_a {
        still_flows(stream).await;
    }
    drop(open_on_a);
    let (code, group) = tokio::time::timeout(WAIT, delete).await.unwrap().unwrap();
    assert_eq!(code, 200, "{group}");
    assert!(peer(&group, "a").is_none(), "{group}");
    assert_eq!(peers(&status(&admin).await).len(), 1);
    assert_eq!(names_of_next(&listen, 3).await, "bbb");
    for backend in backends {
        backend.finish().await;
    }
}

/// With `rebalance` on, a drained server's open connections are recycled
/// at their next quiet moment (SPEC §9, §10), so a DELETE without `force`
/// completes while the clients keep their other connections.
#[tokio::test]
async fn with_rebalance_a_drain_recycles_the_open_connections_at_a_quiet_moment() {
    let backends = announcing(&["a", "b"]).await;
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(
            &listen,
            "rebalance = true\nquiet_period = \"50ms\"",
            "",
            &servers(&backends),
        ),
        &admin,
        "",
    ))
    .await;
    let (mut on_a, first) = open(&listen).await;
    let (mut on_b, second) = open(&listen).await;
    assert_eq!((first.as_str(), second.as_str()), ("a", "b"));
    // An answered request, then silence: both are at a quiet moment.
    still_flows(&mut on_a).await;
    still_flows(&mut on_b).await;

    let (code, group) = api(
        &admin,
        "PATCH",
        "/api/upstreams/pool/servers/a",
        None,
        Some(r#"{"state": "drain"}"#),
    )
    .await;
    assert_eq!(code, 200, "{group}");
    // sluice closes the drained connection: a clean end of stream.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, on_a.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?} {rest:?}");
    // The client answers the end of stream with its own close, as a
    // reconnecting client does; then the recycle is complete.
    drop(on_a);
    // The connection to b is not touched.
    still_flows(&mut on_b).await;
    let text = metrics(&admin).await;
    let recycled = text
        .lines()
        .find(|line| {
            line.starts_with("sluice_connections_recycled_total")
                && line.contains("reason=\"drain\"")
        })
        .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(recycled, Some(1.0), "{text}");
    // Nothing is left on a, so the removal completes without `force`.
    let (code, group) = tokio::time::timeout(
        WAIT,
        api(
            &admin,
            "DELETE",
            "/api/upstreams/pool/servers/a",
            None,
            None,
        ),
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{group}");
    assert!(peer(&group, "a").is_none(), "{group}");
    still_flows(&mut on_b).await;
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test]
async fn a_weight_change_shows_in_the_next_picks_order() {
    let backends = announcing(&["a", "b"]).await;
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        "",
    ))
    .await;
    assert_eq!(names_of_next(&listen, 4).await, "abab");
    let (code, group) = api(
        &admin,
        "PATCH",
        "/api/upstreams/pool/servers/a",
        None,
        Some(r#"{"weight": 3}"#),
    )
    .await;
    assert_eq!(code, 200, "{group}");
    assert_eq!(peer(&group, "a").unwrap()["weight"], 3);
    // Smooth weighted round-robin over 3:1 from a fresh selector.
    assert_eq!(names_of_next(&listen, 8).await, "aabaaaba");
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test]
async fn add_then_remove_under_load_fails_no_connection() {
    let backends = announcing(&["a", "b"]).await;
    let added = Backend::tcp("c", Behavior::Announce).await;
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        "",
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (listen, stop, done, failed) = (
            listen.clone(),
            Arc::clone(&stop),
            Arc::clone(&done),
            Arc::clone(&failed),
        );
        load.push(tokio::spawn(async move {
            // Bounded: at most 20 s or 5,000 connections per task.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            for _ in 0..5000 {
                if stop.load(Ordering::SeqCst) || std::time::Instant::now() > deadline {
                    break;
                }
                let result = tokio::time::timeout(Duration::from_secs(5), async {
                    let mut stream = TcpStream::connect(&listen).await?;
                    let mut name = [0u8; 1];
                    stream.read_exact(&mut name).await?;
                    stream.write_all(b"data").await?;
                    let mut echo = [0u8; 4];
                    stream.read_exact(&mut echo).await?;
                    Ok::<_, std::io::Error>(echo == *b"data")
                })
                .await;
                match result {
                    Ok(Ok(true)) => done.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    assert!(wait_until(WAIT, || done.load(Ordering::SeqCst) >= 20).await);
    let body = json!({"address": added.addr.to_string(), "name": "c", "weight": 2}).to_string();
    let (code, group) = api(
        &admin,
        "POST",
        "/api/upstreams/pool/servers",
        None,
        Some(&body),
    )
    .await;
    assert_eq!(code, 201, "{group}");
    assert_eq!(peer(&group, "c").unwrap()["weight"], 2);
    assert!(wait_until(WAIT, || added.accepted() >= 10).await);
    let (code, group) = api(
        &admin,
        "DELETE",
        "/api/upstreams/pool/servers/c",
        None,
        None,
    )
    .await;
    assert_eq!(code, 200, "{group}");
    assert!(peer(&group, "c").is_none());
    let served_by_c = added.accepted();
    let after = done.load(Ordering::SeqCst);
    assert!(wait_until(WAIT, || done.load(Ordering::SeqCst) >= after + 20).await);
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "failed connections");
    assert_eq!(
        added.accepted(),
        served_by_c,
        "c got connections after its removal"
    );
    for backend in backends {
        backend.finish().await;
    }
    added.finish().await;
}

#[tokio::test]
async fn bad_input_unknown_names_and_conflicts_get_json_errors() {
    let backends = announcing(&["a", "b"]).await;
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        "",
    ))
    .await;
    let patch = |body: &'static str| {
        let admin = admin.clone();
        async move {
            api(
                &admin,
                "PATCH",
                "/api/upstreams/pool/servers/a",
                None,
                Some(body),
            )
            .await
        }
    };
    for (body, field) in [
        (r#"{"weight": 0}"#, "weight"),
        (r#"{"weight": 1001}"#, "weight"),
        (r#"{"weight": "3"}"#, "weight"),
        (r#"{"max_conns": -1}"#, "max_conns"),
        (r#"{"state": "sleepy"}"#, "state"),
        (r#"{"colour": "red"}"#, "colour"),
        (r#"{}"#, "body"),
        (r#"[1]"#, "body"),
        (r#"{"weight": "#, "body"),
    ] {
        let (code, error) = patch(body).await;
        assert_eq!(
            (code, error["field"].as_str()),
            (400, Some(field)),
            "{body}: {error}"
        );
        assert!(error["error"].is_string());
    }
    let (code, _) = api(
        &admin,
        "PATCH",
        "/api/upstreams/nope/servers/a",
        None,
        Some(r#"{"weight": 2}"#),
    )
    .await;
    assert_eq!(code, 404);
    let (code, error) = api(
        &admin,
        "PATCH",
        "/api/upstreams/pool/servers/zz",
        None,
        Some(r#"{"weight": 2}"#),
    )
    .await;
    assert_eq!(code, 404, "{error}");
    let (code, _) = api(
        &admin,
        "DELETE",
        "/api/upstreams/pool/servers/zz",
        None,
        None,
    )
    .await;
    assert_eq!(code, 404);
    let (code, group) = api(&admin, "GET", "/api/upstreams/pool", None, None).await;
    assert_eq!(
        (code, peers(&json!({"upstreams": {"pool": group}})).len()),
        (200, 2)
    );
    let add = |body: String| {
        let admin = admin.clone();
        async move {
            api(
                &admin,
                "POST",
                "/api/upstreams/pool/servers",
                None,
                Some(&body),
            )
            .await
        }
    };
    let taken = json!({"address": "127.0.0.1:1", "name": "a"}).to_string();
    assert_eq!(add(taken).await.0, 409);
    let (code, error) = add(json!({"name": "x"}).to_string()).await;
    assert_eq!((code, error["field"].as_str()), (400, Some("address")));
    let (code, error) = add(json!({"address": "nowhere"}).to_string()).await;
    assert_eq!((code, error["field"].as_str()), (400, Some("address")));
    let long = json!({"address": "127.0.0.1:1", "name": "n".repeat(129)}).to_string();
    let (code, error) = add(long).await;
    assert_eq!((code, error["field"].as_str()), (400, Some("name")));
    // The body is bounded.
    let huge = format!(
        r#"{{"address": "127.0.0.1:1", "name": "{}"}}"#,
        "n".repeat(8000)
    );
    assert_eq!(add(huge).await.0, 413);
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test]
async fn writes_need_the_token_and_a_local_endpoint_without_one() {
    let backends = announcing(&["a", "b"]).await;
    let (listen, admin) = (free_addr(), free_addr());
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let _sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        &format!("token_file = \"{}\"", token_file.display()),
    ))
    .await;
    let drain = Some(r#"{"state": "drain"}"#);
    let path = "/api/upstreams/pool/servers/a";
    assert_eq!(api(&admin, "PATCH", path, None, drain).await.0, 401);
    assert_eq!(
        api(&admin, "PATCH", path, Some("s3cret-tokeN"), drain)
            .await
            .0,
        401
    );
    assert_eq!(
        api(&admin, "PATCH", path, Some("s3cret"), drain).await.0,
        401
    );
    // Reads stay open.
    assert_eq!(
        api(&admin, "GET", "/api/upstreams/pool", None, None)
            .await
            .0,
        200
    );
    assert_eq!(
        peer(&status(&admin).await["upstreams"]["pool"], "a").unwrap()["state"],
        "up"
    );
    assert_eq!(
        api(&admin, "PATCH", path, Some("s3cret-token"), drain)
            .await
            .0,
        200
    );

    // An endpoint on every address, without a token: writes refused, a warning at start.
    let port = free_port();
    let sluice = Sluice::start(&with_admin(
        config(&free_addr(), "", "", &servers(&backends)),
        &format!("0.0.0.0:{port}"),
        "",
    ))
    .await;
    let open_admin = format!("127.0.0.1:{port}");
    let (code, error) = api(&open_admin, "PATCH", path, None, drain).await;
    assert_eq!(code, 403, "{error}");
    assert!(error["error"].as_str().unwrap().contains("token_file"));
    assert!(
        sluice.log_text().contains("reachable from other hosts"),
        "{}",
        sluice.log_text()
    );
    assert_eq!(
        api(&open_admin, "GET", "/api/upstreams/pool", None, None)
            .await
            .0,
        200
    );
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test]
async fn eight_concurrent_writers_leave_every_change_in_place() {
    let backends = announcing(&["a", "b", "c", "d", "e", "f", "g", "h"]).await;
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        "",
    ))
    .await;
    let mut writers = Vec::new();
    for (index, backend) in backends.iter().enumerate() {
        let (admin, name, target) = (admin.clone(), backend.name.clone(), backend.addr);
        writers.push(tokio::spawn(async move {
            let weight = json!({ "weight": index + 2 }).to_string();
            let path = format!("/api/upstreams/pool/servers/{name}");
            let patched = api(&admin, "PATCH", &path, None, Some(&weight)).await.0;
            let added =
                json!({"address": target.to_string(), "name": format!("{name}2")}).to_string();
            let posted = api(
                &admin,
                "POST",
                "/api/upstreams/pool/servers",
                None,
                Some(&added),
            )
            .await
            .0;
            (patched, posted)
        }));
    }
    for writer in writers {
        assert_eq!(writer.await.unwrap(), (200, 201));
    }
    let after = status(&admin).await;
    let group = &after["upstreams"]["pool"];
    assert_eq!(peers(&after).len(), 16);
    for (index, backend) in backends.iter().enumerate() {
        assert_eq!(
            peer(group, &backend.name).unwrap()["weight"],
            index as u64 + 2
        );
        assert!(peer(group, &format!("{}2", backend.name)).is_some());
    }
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test]
async fn the_state_file_survives_a_restart_and_a_corrupt_one_is_ignored() {
    let backends = announcing(&["a", "b"]).await;
    let extra_backend = Backend::tcp("c", Behavior::Announce).await;
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let (listen, admin) = (free_addr(), free_addr());
    let config_text = with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        &format!("state_file = \"{}\"", state_file.display()),
    );
    let mut sluice = Sluice::start(&config_text).await;
    let path = "/api/upstreams/pool/servers";
    assert_eq!(
        api(
            &admin,
            "PATCH",
            &format!("{path}/a"),
            None,
            Some(r#"{"state": "drain"}"#)
        )
        .await
        .0,
        200
    );
    assert_eq!(
        api(
            &admin,
            "PATCH",
            &format!("{path}/b"),
            None,
            Some(r#"{"weight": 5, "max_conns": 7}"#)
        )
        .await
        .0,
        200
    );
    let added = json!({"address": extra_backend.addr.to_string(), "name": "c"}).to_string();
    assert_eq!(api(&admin, "POST", path, None, Some(&added)).await.0, 201);
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    assert_eq!(
        written["upstreams"]["pool"]["servers"]["a"]["state"],
        "drain"
    );
    assert!(!dir.path().join("state.json.tmp").exists());
    sluice.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sluice.wait_exit(WAIT).await.is_some());

    let check = |status: Value| {
        let group = status["upstreams"]["pool"].clone();
        (
            peer(&group, "a").map(|a| a["state"].clone()),
            peer(&group, "b").map(|b| (b["weight"].clone(), b["max_conns"].clone())),
            peer(&group, "c").is_some(),
        )
    };
    let sluice = Sluice::start(&config_text).await;
    assert_eq!(
        check(status(&admin).await),
        (Some(json!("draining")), Some((json!(5), json!(7))), true)
    );
    // c was added, a drained: new connections go to b and c only.
    let names = names_of_next(&listen, 7).await;
    assert_eq!(names.matches('a').count(), 0, "{names}");
    assert!(names.contains('c'), "{names}");
    drop(sluice);

    std::fs::write(&state_file, "{ not json").unwrap();
    let sluice = Sluice::start(&config_text).await;
    assert_eq!(
        check(status(&admin).await),
        (Some(json!("up")), Some((json!(1), json!(0))), false)
    );
    assert!(
        sluice.log_text().contains("state_file ignored"),
        "{}",
        sluice.log_text()
    );
    drop(sluice);

    // Unknown upstreams and servers are reported and the rest applied.
    std::fs::write(
        &state_file,
        r#"{"version": 1, "upstreams": {"pool": {"servers": {"a": {"weight": 4}, "b": {"weight": 0}, "zz": {"state": "down"}}}, "gone": {}}}"#,
    )
    .unwrap();
    let sluice = Sluice::start(&config_text).await;
    let group = status(&admin).await["upstreams"]["pool"].clone();
    assert_eq!(peer(&group, "a").unwrap()["weight"], 4);
    assert_eq!(peer(&group, "b").unwrap()["weight"], 1);
    let log = sluice.log_text();
    assert!(log.contains("out of range"), "{log}");
    assert!(
        log.contains("server=\"zz\"") || log.contains("server=zz"),
        "{log}"
    );
    assert!(
        log.contains("upstream=gone") || log.contains("upstream=\"gone\""),
        "{log}"
    );
    for backend in backends {
        backend.finish().await;
    }
    extra_backend.finish().await;
}

#[tokio::test]
async fn reload_keeps_runtime_changes_only_with_a_state_file() {
    let backends = announcing(&["a", "b"]).await;
    let dir = tempfile::tempdir().unwrap();
    for state_file in [None, Some(dir.path().join("state.json"))] {
        let (listen, admin) = (free_addr(), free_addr());
        let extra = state_file.as_ref().map_or(String::new(), |path| {
            format!("state_file = \"{}\"", path.display())
        });
        let sluice = Sluice::start(&with_admin(
            config(&listen, "", "", &servers(&backends)),
            &admin,
            &extra,
        ))
        .await;
        let drain = Some(r#"{"state": "drain"}"#);
        assert_eq!(
            api(
                &admin,
                "PATCH",
                "/api/upstreams/pool/servers/a",
                None,
                drain
            )
            .await
            .0,
            200
        );
        sluice.signal(nix::sys::signal::Signal::SIGHUP);
        assert!(sluice.wait_for_log("configuration reloaded", WAIT).await);
        let state = peer(&status(&admin).await["upstreams"]["pool"], "a").unwrap()["state"].clone();
        let expected = if state_file.is_some() {
            "draining"
        } else {
            "up"
        };
        assert_eq!(state, expected, "state_file {state_file:?}");
    }
    // A reload whose configuration no longer has `a` drops its state.
    let state_file = dir.path().join("state.json");
    let (listen, admin) = (free_addr(), free_addr());
    let extra = format!("state_file = \"{}\"", state_file.display());
    let sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        &extra,
    ))
    .await;
    let written = std::fs::read_to_string(&state_file).unwrap();
    assert!(written.contains("\"a\""), "{written}");
    std::fs::write(
        &sluice.config_path,
        with_admin(
            config(&listen, "", "", &servers(&backends[1..])),
            &admin,
            &extra,
        ),
    )
    .unwrap();
    sluice.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(sluice.wait_for_log("configuration reloaded", WAIT).await);
    let written = std::fs::read_to_string(&state_file).unwrap();
    assert!(!written.contains("\"a\""), "{written}");
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test]
async fn force_remove_closes_the_servers_connections_at_once() {
    let backends = announcing(&["a", "b"]).await;
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        "",
    ))
    .await;
    let (mut on_a, name) = open(&listen).await;
    assert_eq!(name, "a");
    let (mut on_b, _) = open(&listen).await;
    let (code, group) = tokio::time::timeout(
        WAIT,
        api(
            &admin,
            "DELETE",
            "/api/upstreams/pool/servers/a?force=true",
            None,
            None,
        ),
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{group}");
    let mut rest = Vec::new();
    // Closed by sluice (end of stream or a reset), nothing more written.
    let closed = tokio::time::timeout(WAIT, on_a.read_to_end(&mut rest)).await;
    assert!(closed.is_ok() && rest.is_empty());
    still_flows(&mut on_b).await;
    for backend in backends {
        backend.finish().await;
    }
}

fn ctl(admin: &str, args: &[&str], token_file: Option<&Path>) -> (i32, String, String) {
    let mut command = Command::new(SLUICE);
    command.args(["ctl", "--admin", admin]);
    if let Some(path) = token_file {
        command.arg("--token-file").arg(path);
    }
    let output = command
        .args(args)
        .env_remove("SLUICE_CONFIG")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The table row of server `name` of `pool`, split into its columns.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|columns| columns.len() > 4 && columns[0] == "pool" && columns[1] == name)
        .unwrap_or_default()
}

#[tokio::test]
async fn ctl_prints_tables_or_json_and_exits_non_zero_with_the_servers_error() {
    let backends = announcing(&["a", "b"]).await;
    let added = Backend::tcp("c", Behavior::Announce).await;
    let (listen, admin) = (free_addr(), free_addr());
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "tok\n").unwrap();
    let _sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        &format!("token_file = \"{}\"", token_file.display()),
    ))
    .await;
    let token = Some(token_file.as_path());
    let (code, out, err) = ctl(&admin, &["drain", "pool", "a"], token);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("UPSTREAM"), "{out}");
    assert_eq!(row(&out, "a")[3], "draining", "{out}");
    let (code, out, _) = ctl(&admin, &["weight", "pool", "b", "4"], token);
    assert_eq!(code, 0);
    assert_eq!(row(&out, "b")[4], "4", "{out}");
    let (code, out, err) = ctl(&admin, &["--json", "status", "pool"], None);
    assert_eq!(code, 0, "{err}");
    let group: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(peer(&group, "b").unwrap()["weight"], 4);
    let (code, out, _) = ctl(&admin, &["status"], None);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 3, "{out}");
    let address = added.addr.to_string();
    let (code, _, err) = ctl(
        &admin,
        &["add", "pool", &address, "--name", "c", "--weight", "2"],
        token,
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = ctl(&admin, &["add", "pool", &address, "--name", "c"], token);
    assert_eq!(code, 1);
    assert!(
        err.contains("409") && err.contains("already has a server named"),
        "{err}"
    );
    let (code, _, err) = ctl(&admin, &["weight", "pool", "b", "0"], token);
    assert_eq!(code, 1);
    assert!(err.contains("weight must be"), "{err}");
    let (code, _, err) = ctl(&admin, &["up", "pool", "a"], None);
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    let (code, _, err) = ctl(&admin, &["remove", "pool", "c"], token);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = ctl(&admin, &["up", "pool", "a"], token);
    assert_eq!(code, 0);
    let (code, _, err) = ctl(&free_addr(), &["status"], None);
    assert_eq!(code, 2, "{err}");
    for backend in backends {
        backend.finish().await;
    }
    added.finish().await;
}

#[tokio::test]
async fn the_token_file_is_bounded_and_must_hold_one_word() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    for (content, reason) in [
        ("".to_owned(), "the file is empty"),
        ("two words".to_owned(), "one word"),
        ("x".repeat(5000), "larger than 4096 bytes"),
    ] {
        std::fs::write(&token_file, &content).unwrap();
        let text = with_admin(
            config(&free_addr(), "", "", &[server("127.0.0.1:1", "")]),
            &free_addr(),
            &format!("token_file = \"{}\"", token_file.display()),
        );
        // `--check` reads it too.
        let config_path = dir.path().join("sluice.toml");
        std::fs::write(&config_path, &text).unwrap();
        let (code, _, stderr) = run_sluice(
            &["--check", "--config", config_path.to_str().unwrap()],
            &[],
            dir.path(),
        );
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains(reason), "{stderr}");
        let mut sluice = Sluice::spawn(&text, &[]);
        let status = sluice.wait_exit(WAIT).await.expect("sluice did not exit");
        assert_eq!(status.code(), Some(1), "{}", sluice.log_text());
        assert!(
            sluice.wait_for_log(reason, WAIT).await,
            "{}",
            sluice.log_text()
        );
        let log = sluice.log_text();
        assert!(log.contains("token_file") && log.contains(reason), "{log}");
    }
}

#[tokio::test]
async fn an_oversized_state_file_is_ignored() {
    let backends = announcing(&["a", "b"]).await;
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    // Valid JSON past 16 MiB: whitespace after a drain of a.
    let mut text =
        r#"{"version": 1, "upstreams": {"pool": {"servers": {"a": {"state": "drain"}}}}}"#
            .to_owned();
    text.push_str(&" ".repeat(17 * 1024 * 1024));
    std::fs::write(&state_file, text).unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        &format!("state_file = \"{}\"", state_file.display()),
    ))
    .await;
    assert_eq!(
        peer(&status(&admin).await["upstreams"]["pool"], "a").unwrap()["state"],
        "up"
    );
    assert!(
        sluice.log_text().contains("larger than 16777216 bytes"),
        "{}",
        sluice.log_text()
    );
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test]
async fn at_most_256_servers_are_added_to_one_upstream() {
    let backends = announcing(&["a"]).await;
    let (listen, admin) = (free_addr(), free_addr());
    let _sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        "",
    ))
    .await;
    let target = backends[0].addr.to_string();
    let mut adders = Vec::new();
    for worker in 0..8 {
        let (admin, target) = (admin.clone(), target.clone());
        adders.push(tokio::spawn(async move {
            for index in (worker..256).step_by(8) {
                let body = json!({"address": target, "name": format!("n{index}")}).to_string();
                let (code, _) = api(
                    &admin,
                    "POST",
                    "/api/upstreams/pool/servers",
                    None,
                    Some(&body),
                )
                .await;
                assert_eq!(code, 201, "n{index}");
            }
        }));
    }
    for adder in adders {
        adder.await.unwrap();
    }
    let body = json!({"address": target, "name": "one-too-many"}).to_string();
    let (code, error) = api(
        &admin,
        "POST",
        "/api/upstreams/pool/servers",
        None,
        Some(&body),
    )
    .await;
    assert_eq!(code, 409, "{error}");
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("the most allowed"),
        "{error}"
    );
    assert_eq!(peers(&status(&admin).await).len(), 257);
    for backend in backends {
        backend.finish().await;
    }
}

#[tokio::test]
async fn ctl_speaks_to_an_admin_endpoint_on_a_unix_socket() {
    let backends = announcing(&["a", "b"]).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let admin = format!("unix:{}", socket.display());
    let listen = free_addr();
    let _sluice = Sluice::start(&with_admin(
        config(&listen, "", "", &servers(&backends)),
        &admin,
        "",
    ))
    .await;
    // A UNIX socket takes writes without a token.
    let (code, out, err) = ctl(&admin, &["drain", "pool", "a"], None);
    assert_eq!(code, 0, "{err}");
    assert_eq!(row(&out, "a")[3], "draining", "{out}");
    assert_eq!(names_of_next(&listen, 3).await, "bbb");
    for backend in backends {
        backend.finish().await;
    }
}
