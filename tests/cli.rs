//! The command line and configuration errors, through the real binary.

mod common;

use common::*;

const VALID: &str = r#"
[[listener]]
name = "front"
bind = "127.0.0.1:1"
upstream = "pool"

[upstream.pool]
[[upstream.pool.server]]
address = "127.0.0.1:2"
name = "node-1"
"#;

/// Runs `sluice --check` on `text`; returns (exit code, stdout, stderr).
fn check(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    run_sluice(
        &["--check", "--config", path.to_str().unwrap()],
        &[],
        dir.path(),
    )
}

#[test]
fn check_prints_a_summary_and_exits_0() {
    let (code, stdout, stderr) = check(VALID);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("listener \"front\" on 127.0.0.1:1 -> upstream \"pool\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("peer \"node-1\" 127.0.0.1:2 weight 1"),
        "{stdout}"
    );
    assert!(stdout.contains("is valid"), "{stdout}");
}

#[test]
fn each_configuration_error_exits_1_naming_file_line_and_key() {
    let second_listener =
        "\n[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:3\"\nupstream = \"pool\"\n";
    let cases: Vec<(&str, String, &str, &[&str])> = vec![
        (
            "unknown key",
            VALID.replace("name = \"node-1\"", "name = \"node-1\"\ncolour = \"red\""),
            ":11:",
            &["colour"],
        ),
        (
            "bad duration",
            VALID.replace(
                "upstream = \"pool\"",
                "upstream = \"pool\"\nconnect_timeout = \"5 fortnights\"",
            ),
            ":6:",
            &["connect_timeout", "5 fortnights"],
        ),
        (
            "unknown upstream",
            VALID.replace("upstream = \"pool\"", "upstream = \"nowhere\""),
            ":5:",
            &["upstream", "nowhere"],
        ),
        (
            "port above range",
            VALID.replace("127.0.0.1:2", "127.0.0.1:65536"),
            ":9:",
            &["address", "65536"],
        ),
        (
            "port zero",
            VALID.replace("127.0.0.1:1", "127.0.0.1:0"),
            ":4:",
            &["bind", "\"0\""],
        ),
        (
            "duplicate listener",
            format!("{VALID}{second_listener}"),
            ":13:",
            &["duplicate listener name", "front"],
        ),
        (
            "backup with hash",
            VALID
                .replace("[upstream.pool]", "[upstream.pool]\nbalance = \"hash\"")
                .replace("name = \"node-1\"", "name = \"node-1\"\nbackup = true"),
            ":12:",
            &["backup", "hash"],
        ),
        (
            "backup with random",
            VALID
                .replace("[upstream.pool]", "[upstream.pool]\nbalance = \"random\"")
                .replace("name = \"node-1\"", "name = \"node-1\"\nbackup = true"),
            ":12:",
            &["backup", "random"],
        ),
        (
            "unknown method",
            VALID.replace("[upstream.pool]", "[upstream.pool]\nbalance = \"fastest\""),
            ":8:",
            &["balance", "fastest"],
        ),
        (
            "TOML syntax",
            VALID.replace("name = \"front\"", "name = \"front"),
            ":3:",
            &["name"],
        ),
        (
            "weight zero",
            VALID.replace("name = \"node-1\"", "name = \"node-1\"\nweight = 0"),
            ":11:",
            &["weight"],
        ),
        (
            "host that does not resolve",
            VALID.replace("127.0.0.1:2", "nohost.invalid:2"),
            ":9:",
            &[
                "cannot resolve server address nohost.invalid:2",
                "(in `address = \"nohost.invalid:2\"`)",
            ],
        ),
        (
            "two servers of one name",
            format!(
                "{VALID}[[upstream.pool.server]]\naddress = \"127.0.0.1:3\"\nname = \"node-1\"\n"
            ),
            ":13:",
            &[
                "server name \"node-1\" is already used",
                "(in `name = \"node-1\"`)",
            ],
        ),
        (
            "one address twice without names",
            format!(
                "{}[[upstream.pool.server]]\naddress = \"127.0.0.1:2\"\n",
                VALID.replace("name = \"node-1\"\n", "")
            ),
            ":11:",
            &["distinct `name`s", "(in `address = \"127.0.0.1:2\"`)"],
        ),
    ];
    for (what, text, line, needles) in cases {
        let (code, _, stderr) = check(&text);
        assert_eq!(code, 1, "{what}: {stderr}");
        assert!(
            stderr.contains("bad.toml"),
            "{what} does not name the file: {stderr}"
        );
        assert!(
            stderr.contains(line),
            "{what} does not name line {line}: {stderr}"
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{what} does not name {needle}: {stderr}"
            );
        }
    }
}

/// Found only when the value is used, but named like a parse error, and the
/// same whether checking or starting.
#[test]
fn a_host_that_does_not_resolve_names_its_line_at_start_up_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unres.toml");
    std::fs::write(&path, VALID.replace("127.0.0.1:2", "nohost.invalid:2")).unwrap();
    for args in [&["--check"][..], &[]] {
        let mut args = args.to_vec();
        args.extend(["--config", path.to_str().unwrap()]);
        let (code, _, stderr) = run_sluice(&args, &[], dir.path());
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "configuration error: {}:9: upstream \"pool\": cannot resolve server address nohost.invalid:2: ",
                path.display()
            )),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains("(in `address = \"nohost.invalid:2\"`)"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn a_missing_file_exits_1_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run_sluice(&["--config", "/nonexistent/sluice.toml"], &[], dir.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/sluice.toml"), "{stderr}");
}

#[test]
fn a_bad_command_line_is_a_configuration_error_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    for (args, names) in [
        (&["--log-format", "xml"][..], "xml"),
        (&["--no-such-flag"][..], "--no-such-flag"),
        (&["--config"][..], "--config"),
        (&["--fluent-bit", "nodes.conf"][..], "--bind"),
        (&["--bind", "127.0.0.1:24224"][..], "--fluent-bit"),
        (
            &[
                "--fluent-bit",
                "nodes.conf",
                "--bind",
                "127.0.0.1:24224",
                "--config",
                "x.toml",
            ][..],
            "--config",
        ),
        (&["--workers", "abc"][..], "--workers"),
        (&["--log-level", "=[[bad"][..], "--log-level"),
    ] {
        let (code, stdout, stderr) = run_sluice(args, &[], dir.path());
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?} printed to stdout: {stdout}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
    }
}

#[test]
fn config_comes_from_sluice_config_then_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("elsewhere.toml");
    std::fs::write(&path, VALID).unwrap();
    let (code, stdout, stderr) = run_sluice(
        &["--check"],
        &[("SLUICE_CONFIG", path.to_str().unwrap())],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("elsewhere.toml"), "{stdout}");

    std::fs::write(dir.path().join("sluice.toml"), VALID).unwrap();
    let (code, stdout, stderr) = run_sluice(&["--check"], &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("sluice.toml is valid"), "{stdout}");
}

#[test]
fn version_and_help() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, _) = run_sluice(&["--version"], &[], dir.path());
    assert_eq!(code, 0);
    assert_eq!(
        stdout.trim(),
        format!("sluice {}", env!("CARGO_PKG_VERSION"))
    );
    let (code, stdout, _) = run_sluice(&["--help"], &[], dir.path());
    assert_eq!(code, 0);
    for flag in [
        "--config",
        "--check",
        "--log-format",
        "--log-level",
        "SLUICE_CONFIG",
    ] {
        assert!(stdout.contains(flag), "--help lacks {flag}: {stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_in_use_exits_2_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let text = VALID.replace("127.0.0.1:1", &addr);
    let mut sluice = Sluice::spawn(&text, &[]);
    let status = sluice
        .wait_exit(std::time::Duration::from_secs(10))
        .await
        .expect("kept running");
    assert_eq!(status.code(), Some(2));
    let log = sluice.log_text();
    assert!(log.contains(&addr), "{log}");
    assert!(log.contains("in use"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let backend = Backend::tcp("a", Behavior::Echo).await;
    let listen = free_addr();
    let (dead, _dead_socket) = refusing_addr();
    let text = config(
        &listen,
        "",
        "",
        &[server(&dead, ""), server(backend.addr, "")],
    );
    let sluice = Sluice::spawn(&text, &["--log-format", "json"]);
    assert!(
        sluice
            .wait_for_log("listening", std::time::Duration::from_secs(10))
            .await
    );
    let stream = tokio::net::TcpStream::connect(&listen).await.unwrap();
    assert_eq!(echo_digest(stream, b"hi".to_vec()).await, sha256(b"hi"));
    assert!(
        sluice
            .wait_for_log(
                "upstream connect attempt failed",
                std::time::Duration::from_secs(5)
            )
            .await
    );
    for line in sluice.log_lines() {
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line}"));
        if value["message"] == "upstream connect attempt failed" {
            assert_eq!(value["level"], "WARN");
            assert_eq!(value["listener"], "front");
            assert_eq!(value["upstream"], "pool");
            assert_eq!(value["peer"], dead.as_str());
            assert!(
                value["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("refused")),
                "{line}"
            );
        }
    }
    backend.finish().await;
}

#[test]
fn the_shipped_example_configuration_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example");
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run_sluice(&["--check", "--config", example], &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("is valid"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_file_soft_limit_is_raised_to_the_hard_limit() {
    use std::os::unix::process::CommandExt;
    let backend = Backend::tcp("a", Behavior::Echo).await;
    let listen = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, config(&listen, "", "", &[server(backend.addr, "")])).unwrap();
    let mut command = std::process::Command::new(SLUICE);
    command
        .arg("--config")
        .arg(&path)
        .stderr(std::process::Stdio::null());
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let limits_path = format!("/proc/{}/limits", child.id());
    let soft_of = |text: &str| {
        text.lines()
            .find(|line| line.starts_with("Max open files"))
            .and_then(|line| line.split_whitespace().nth(3))
            .map(str::to_owned)
    };
    let raised = wait_until(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&limits_path)
            .ok()
            .and_then(|t| soft_of(&t))
            .as_deref()
            == Some("4096")
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(raised, "the soft limit stayed below the hard limit");
    backend.finish().await;
}
