//! `--watch-config`: a change of the configuration file's content sends
//! sluice a SIGHUP, through the real binary.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use common::*;

const INTERVAL: &str = "100ms";
/// Long enough for several polls: a change that should not fire would have.
const QUIET_PERIOD: Duration = Duration::from_millis(600);
const CHANGED: &str = "configuration file changed";

/// Starts sluice with `--watch-config` and waits until it serves and watches.
async fn watched_sluice(backend: &Backend) -> (Sluice, String) {
    let listen = free_addr();
    let text = config(&listen, "", "", &[server(backend.addr, "name = \"a\"")]);
    let sluice = Sluice::spawn(&text, &["--watch-config", INTERVAL]);
    assert!(
        sluice
            .wait_for_log("listening", Duration::from_secs(10))
            .await
            && sluice
                .wait_for_log("watching the configuration file", Duration::from_secs(5))
                .await,
        "sluice did not start watching; log:\n{}",
        sluice.log_text()
    );
    (sluice, text)
}

fn count(sluice: &Sluice, needle: &str) -> usize {
    sluice
        .log_lines()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Replaces `path` at once, as editors and kubelet do: write aside, rename over.
fn replace(path: &Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

async fn wait_for_count(sluice: &Sluice, needle: &str, expected: usize) -> bool {
    wait_until(Duration::from_secs(5), || count(sluice, needle) >= expected).await
}

#[tokio::test]
async fn a_content_change_sends_one_sighup_and_sluice_keeps_serving() {
    let backend = Backend::tcp("a", Behavior::Announce).await;
    let (mut sluice, text) = watched_sluice(&backend).await;
    let listen = text
        .lines()
        .find_map(|l| l.strip_prefix("bind = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();

    replace(&sluice.config_path, &format!("{text}\n# edited\n"));
    assert!(
        wait_for_count(&sluice, CHANGED, 1).await,
        "no change noticed; log:\n{}",
        sluice.log_text()
    );
    // The signal reached sluice's own SIGHUP handling instead of killing it.
    assert!(
        sluice
            .wait_for_log("SIGHUP received", Duration::from_secs(5))
            .await,
        "{}",
        sluice.log_text()
    );
    tokio::time::sleep(QUIET_PERIOD).await;
    assert_eq!(count(&sluice, CHANGED), 1, "{}", sluice.log_text());
    assert_eq!(
        count(&sluice, "SIGHUP received"),
        1,
        "{}",
        sluice.log_text()
    );
    assert!(sluice.wait_exit(Duration::ZERO).await.is_none());
    assert_eq!(announced(&listen, 1).await, "a");
    backend.finish().await;
}

#[tokio::test]
async fn a_configmap_symlink_swap_is_a_change_and_the_same_bytes_are_not() {
    let backend = Backend::tcp("a", Behavior::Echo).await;
    let (sluice, text) = watched_sluice(&backend).await;

    // Kubernetes' layout of a mounted ConfigMap: sluice.toml -> ..data/sluice.toml,
    // ..data -> a timestamped directory; an update swaps ..data.
    let dir = sluice.dir.path();
    let first = dir.join("..2024_01_01");
    std::fs::create_dir(&first).unwrap();
    std::fs::write(first.join("sluice.toml"), &text).unwrap();
    symlink("..2024_01_01", dir.join("..data")).unwrap();
    symlink("..data/sluice.toml", dir.join("sluice.toml.link")).unwrap();
    std::fs::rename(dir.join("sluice.toml.link"), &sluice.config_path).unwrap();

    // A new inode and modification time with the same bytes is no change.
    tokio::time::sleep(QUIET_PERIOD).await;
    assert_eq!(count(&sluice, CHANGED), 0, "{}", sluice.log_text());

    let second = dir.join("..2024_01_02");
    std::fs::create_dir(&second).unwrap();
    std::fs::write(second.join("sluice.toml"), text.replace("5s", "6s")).unwrap();
    symlink("..2024_01_02", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    assert!(
        wait_for_count(&sluice, CHANGED, 1).await,
        "the swap was not noticed; log:\n{}",
        sluice.log_text()
    );
    tokio::time::sleep(QUIET_PERIOD).await;
    assert_eq!(count(&sluice, CHANGED), 1, "{}", sluice.log_text());
    backend.finish().await;
}

#[tokio::test]
async fn an_unreadable_file_is_reported_once_and_its_return_is_a_change() {
    let backend = Backend::tcp("a", Behavior::Echo).await;
    let (sluice, text) = watched_sluice(&backend).await;

    std::fs::remove_file(&sluice.config_path).unwrap();
    assert!(
        sluice
            .wait_for_log("cannot read the configuration file", Duration::from_secs(5))
            .await,
        "{}",
        sluice.log_text()
    );
    tokio::time::sleep(QUIET_PERIOD).await;
    assert_eq!(
        count(&sluice, "cannot read the configuration file"),
        1,
        "{}",
        sluice.log_text()
    );
    assert_eq!(count(&sluice, CHANGED), 0, "{}", sluice.log_text());

    replace(&sluice.config_path, &format!("{text}\n# back\n"));
    assert!(
        wait_for_count(&sluice, CHANGED, 1).await,
        "{}",
        sluice.log_text()
    );
    backend.finish().await;
}

#[tokio::test]
async fn without_the_flag_nothing_is_watched() {
    let backend = Backend::tcp("a", Behavior::Echo).await;
    let text = config(&free_addr(), "", "", &[server(backend.addr, "")]);
    let sluice = Sluice::start(&text).await;
    replace(&sluice.config_path, &format!("{text}\n# edited\n"));
    tokio::time::sleep(QUIET_PERIOD).await;
    assert_eq!(count(&sluice, "watching"), 0, "{}", sluice.log_text());
    assert_eq!(count(&sluice, CHANGED), 0, "{}", sluice.log_text());
    backend.finish().await;
}

#[test]
fn an_invalid_interval_exits_1_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        config("127.0.0.1:1", "", "", &[server("127.0.0.1:2", "")]),
    )
    .unwrap();
    for (args, env) in [
        (vec!["--watch-config", "soon"], vec![]),
        (vec![], vec![("SLUICE_WATCH_CONFIG", "10 parsecs")]),
    ] {
        let mut all = vec!["--config", path.to_str().unwrap()];
        all.extend(args);
        let (code, _, stderr) = run_sluice(&all, &env, dir.path());
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("invalid --watch-config"), "{stderr}");
    }
}
