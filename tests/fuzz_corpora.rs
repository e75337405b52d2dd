//! Replays every file of each fuzz target's seed corpus (`fuzz/seeds/TARGET/`,
//! kept in git; `fuzz/corpus/` is what fuzzing grows, and is not) through the
//! target's own entry point, so the inputs that found bugs, and one of each
//! class of bound (SPEC §8), are checked by every test run, with or without a
//! nightly toolchain for cargo-fuzz.

use std::path::Path;
use std::time::{Duration, Instant};

#[path = "../fuzz/entry_points/config.rs"]
mod config;
#[path = "../fuzz/entry_points/fluentbit.rs"]
mod fluentbit;
#[path = "../fuzz/entry_points/proxy_header.rs"]
mod proxy_header;

/// Each input is small; a bound that failed would show as seconds or a hang.
const PER_INPUT: Duration = Duration::from_secs(10);

/// Feeds every corpus file of `target` to `entry_point`; returns how many.
fn replay(target: &str, entry_point: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let started = Instant::now();
        entry_point(&data);
        assert!(
            started.elapsed() < PER_INPUT,
            "{} took {:?}",
            file.display(),
            started.elapsed()
        );
    }
    files.len()
}

#[test]
fn config_corpus() {
    assert!(replay("config", config::config) > 0);
}

#[test]
fn fluentbit_corpus() {
    assert!(replay("fluentbit", fluentbit::fluentbit) > 0);
}

#[test]
fn proxy_header_corpus() {
    assert!(replay("proxy_header", proxy_header::proxy_header) > 0);
}
