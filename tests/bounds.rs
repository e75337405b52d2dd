//! Bounds on input (SPEC §8), through the real binary: hostile or careless
//! configuration is refused with a short error naming file and line, never
//! a crash, a hang or unbounded memory.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LISTENER: &str = r#"
[[listener]]
name = "front"
bind = "127.0.0.1:1"
upstream = "pool"
"#;

/// Runs `sluice ARGS` in `dir`, killed if it has not exited within `limit`;
/// returns (exit code, stdout, stderr, how long it ran). A hang fails the test
/// instead of stopping the suite.
fn run_within(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> (i32, String, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new(SLUICE)
        .args(args)
        .env_remove("SLUICE_CONFIG")
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read while it runs, so a long summary cannot fill the pipe and stall it.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                pipe.read_to_end(&mut text).unwrap();
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|pipe| Box::new(pipe) as _));
    let stderr = drain(child.stderr.take().map(|pipe| Box::new(pipe) as _));
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("sluice {args:?} still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let status = child.wait().unwrap();
    (
        status.code().unwrap_or(-1),
        stdout.join().unwrap(),
        stderr.join().unwrap(),
        elapsed,
    )
}

/// `sluice --check` on the TOML `text`; (exit code, stdout, stderr, time).
fn check(text: &str) -> (i32, String, String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    run_within(
        dir.path(),
        &["--check", "--config", path.to_str().unwrap()],
        &[],
        Duration::from_secs(60),
    )
}

fn one_server(extra: &str) -> String {
    format!("{LISTENER}\n[upstream.pool]\n[[upstream.pool.server]]\naddress = \"127.0.0.1:2\"\n{extra}\n")
}

#[test]
fn a_duration_no_timer_can_hold_is_an_error_at_its_line() {
    for key in ["connect_timeout", "idle_timeout", "next_upstream_timeout"] {
        let text = LISTENER.replace(
            "upstream = \"pool\"",
            &format!("upstream = \"pool\"\n{key} = \"18446744073709551615s\""),
        ) + "\n[upstream.pool]\n[[upstream.pool.server]]\naddress = \"127.0.0.1:2\"\n";
        let (code, _, stderr, _) = check(&text);
        assert_eq!(code, 1, "{key}: {stderr}");
        assert!(stderr.contains("sluice.toml:6:"), "{key}: {stderr}");
        assert!(
            stderr.contains("longer than the longest allowed, 365d"),
            "{key}: {stderr}"
        );
    }
    for key in ["fail_timeout", "slow_start", "resolve_interval"] {
        let (code, _, stderr, _) = check(&one_server(&format!("{key} = \"366d\"")));
        assert_eq!(code, 1, "{key}: {stderr}");
        assert!(stderr.contains("sluice.toml:10:"), "{key}: {stderr}");
    }
    let (code, _, stderr, _) = check(&format!(
        "shutdown_timeout = \"9999999999h\"\n{}",
        one_server("")
    ));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("sluice.toml:1:"), "{stderr}");
    let (code, _, stderr, _) = check(&one_server(
        "[upstream.pool.health_check]\ninterval = \"18446744073709551615s\"",
    ));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("sluice.toml:11:"), "{stderr}");
}

#[tokio::test]
async fn the_longest_idle_timeout_relays_and_closes_cleanly() {
    let backend = Backend::tcp("b", Behavior::Echo).await;
    let listen = free_addr();
    let text = config(
        &listen,
        "idle_timeout = \"365d\"",
        "",
        &[server(backend.addr, "")],
    );
    let sluice = Sluice::start(&text).await;
    let digest = echo_digest(
        tokio::net::TcpStream::connect(&listen).await.unwrap(),
        payload(10_000, 7),
    )
    .await;
    assert_eq!(digest, sha256(&payload(10_000, 7)));
    assert!(
        sluice.wait_for_log("access", Duration::from_secs(20)).await,
        "{}",
        sluice.log_text()
    );
    assert!(
        !sluice.log_text().contains("panicked"),
        "{}",
        sluice.log_text()
    );
    backend.finish().await;
}

#[test]
fn a_bare_number_of_seconds_is_a_duration_as_in_nginx() {
    let (code, stdout, stderr, _) = check(&one_server("fail_timeout = 10\nslow_start = \"30\""));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("fail_timeout 10s"), "{stdout}");
    let (code, _, stderr, _) = check(&one_server("fail_timeout = -1"));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("sluice.toml:10:") && stderr.contains("negative"),
        "{stderr}"
    );
    let (code, _, stderr, _) = check(&one_server("fail_timeout = 1.5"));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("a duration like \"10s\""), "{stderr}");
}

#[test]
fn weights_are_1_to_1000() {
    let (code, _, stderr, _) = check(&one_server("weight = 1000"));
    assert_eq!(code, 0, "{stderr}");
    for weight in ["1001", "4294967295"] {
        let (code, _, stderr, elapsed) = check(
            &one_server(&format!("weight = {weight}"))
                .replace("[upstream.pool]", "[upstream.pool]\nbalance = \"hash\""),
        );
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("sluice.toml:11:"), "{stderr}");
        assert!(stderr.contains("`weight` must be at most 1000"), "{stderr}");
        assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
    }
}

#[test]
fn a_hash_upstream_bounds_the_sum_of_its_weights() {
    let servers: String = (0..21)
        .map(|index| {
            format!(
                "[[upstream.pool.server]]\naddress = \"127.0.0.{}:2\"\nweight = 1000\n",
                index + 1
            )
        })
        .collect();
    let text = format!("{LISTENER}\n[upstream.pool]\nbalance = \"hash\"\n{servers}");
    let (code, _, stderr, _) = check(&text);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("sluice.toml:7:"), "{stderr}");
    assert!(stderr.contains("add up to 21000"), "{stderr}");
    let (code, _, stderr, _) = check(&text.replace("balance = \"hash\"", ""));
    assert_eq!(code, 0, "round robin has no ring: {stderr}");
}

#[test]
fn twenty_thousand_servers_check_in_linear_time() {
    let mut text = format!("{LISTENER}\n[upstream.pool]\n");
    for index in 0..20_000 {
        text.push_str(&format!(
            "[[upstream.pool.server]]\naddress = \"127.0.{}.{}:{}\"\nname = \"s{index}\"\n",
            index / 250,
            index % 250 + 1,
            1000 + index
        ));
    }
    let (code, stdout, stderr, elapsed) = check(&text);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("peer \"s19999\""),
        "{}",
        &stdout[stdout.len().saturating_sub(300)..]
    );
    // The release build takes a fraction of a second; this debug build on a
    // loaded machine some seconds. Rescanning the file for each key's line
    // took minutes.
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
}

#[test]
fn an_error_quotes_at_most_100_characters_and_never_the_comment() {
    let long = "x".repeat(10_000);
    let text = LISTENER.replace(
        "upstream = \"pool\"",
        &format!("upstream = \"{long}\" # a comment with a secret"),
    ) + "\n[upstream.pool]\n[[upstream.pool.server]]\naddress = \"127.0.0.1:2\"\n";
    let (code, _, stderr, _) = check(&text);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("sluice.toml:5:"), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
    assert!(
        stderr.contains(&format!("\"{}\"...", "x".repeat(100))),
        "{stderr}"
    );
    assert!(!stderr.contains(&"x".repeat(101)), "{stderr}");
    assert!(stderr.len() < 600, "{} bytes: {stderr}", stderr.len());
}

#[test]
fn a_line_of_ten_megabytes_gives_a_short_error() {
    let text = format!("# {}\n{}", "y".repeat(10 << 20), one_server(""));
    let (code, _, stderr, _) = check(&text);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("sluice.toml:1: the line is longer than 16384 bytes"),
        "{stderr}"
    );
    assert!(stderr.len() < 600, "{} bytes", stderr.len());
}

#[test]
fn a_configuration_past_the_size_limit_is_refused_having_read_only_that_much() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr, _) = run_within(
        dir.path(),
        &["--check", "--config", "/dev/zero"],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("larger than 16777216 bytes"), "{stderr}");
}

#[test]
fn listeners_are_bounded() {
    let mut text = String::new();
    for index in 0..1001 {
        text.push_str(&format!(
            "[[listener]]\nname = \"l{index}\"\nbind = \"127.0.0.1:{}\"\nupstream = \"pool\"\n",
            10_000 + index
        ));
    }
    text.push_str("[upstream.pool]\n[[upstream.pool.server]]\naddress = \"127.0.0.1:2\"\n");
    let (code, _, stderr, _) = check(&text);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("sluice.toml:4002:"), "{stderr}");
    assert!(stderr.contains("more than 1000 listeners"), "{stderr}");
}

fn upstream_file(dir: &Path, body: &str) -> String {
    let path = dir.join("upstream.conf");
    std::fs::write(
        &path,
        format!("[UPSTREAM]\n    name up\n\n[NODE]\n    name n1\n    host 127.0.0.1\n    port 2\n{body}"),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

fn check_fluent_bit(dir: &Path, file: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let (code, stdout, stderr, _) = run_within(
        dir,
        &["--check", "--fluent-bit", file, "--bind", "127.0.0.1:1"],
        env,
        Duration::from_secs(30),
    );
    (code, stdout, stderr)
}

#[test]
fn a_long_variable_used_many_times_is_an_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let big = "v".repeat(100_000);
    let file = upstream_file(
        dir.path(),
        &format!("    shared_key {}\n", "${BIG}".repeat(16)),
    );
    let (code, _, stderr) = check_fluent_bit(dir.path(), &file, &[("BIG", &big)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("upstream.conf:8:"), "{stderr}");
    assert!(
        stderr.contains("longer than 16384 bytes after ${VAR} expansion"),
        "{stderr}"
    );
    assert!(stderr.len() < 600, "{} bytes", stderr.len());
}

#[test]
fn include_reads_only_regular_files_and_never_waits_on_a_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.conf");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    for target in [fifo.to_str().unwrap(), "/dev/zero"] {
        let file = upstream_file(dir.path(), &format!("@INCLUDE {target}\n"));
        let (code, _, stderr) = check_fluent_bit(dir.path(), &file, &[]);
        assert_eq!(code, 1, "{target}: {stderr}");
        assert!(stderr.contains("upstream.conf:8:"), "{target}: {stderr}");
        assert!(stderr.contains("not a regular file"), "{target}: {stderr}");
    }
}

#[test]
fn many_keys_in_one_section_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let keys: String = (0..80_000)
        .map(|index| format!("    key{index} v\n"))
        .collect();
    let file = upstream_file(dir.path(), &keys);
    let (code, _, stderr) = check_fluent_bit(dir.path(), &file, &[]);
    assert_eq!(code, 1, "{stderr}");
    // The section holds name, host and port; the 257th key is key253.
    assert!(
        stderr.contains("upstream.conf:261: more than 256 keys in one section"),
        "{stderr}"
    );
}

#[test]
fn check_with_both_config_and_fluent_bit_names_the_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr, _) = run_within(
        dir.path(),
        &["--check", "--config", "x.toml", "--fluent-bit", "y.conf"],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("--fluent-bit and --config cannot be used together"),
        "{stderr}"
    );
    assert!(!stderr.contains("--bind"), "{stderr}");
}
