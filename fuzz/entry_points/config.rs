//! What the `config` fuzz target does with one input, shared with
//! `tests/fuzz_corpora.rs`, which replays the target's corpus through it as
//! an ordinary test.

use std::path::Path;

use sluice::config::limits::{
    MAX_DURATION, MAX_HASH_TOTAL_WEIGHT, MAX_LISTENERS, MAX_SERVERS, MAX_WEIGHT,
};
use sluice::config::{Balance, Config};

/// However long the input, an error stays short (SPEC §8): the file name,
/// the line, and a message of at most 1000 characters.
const MAX_ERROR_CHARS: usize = 1100;

/// Arbitrary text through the TOML configuration parser and validator.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(config) => {
            // What validation promises the rest of sluice, bounds included.
            assert!(!config.listeners.is_empty());
            assert!(config.listeners.len() <= MAX_LISTENERS);
            let mut durations = vec![config.shutdown_timeout];
            for listener in &config.listeners {
                assert!(config.upstreams.contains_key(&listener.upstream));
                durations.push(listener.connect_timeout);
                durations.extend(listener.idle_timeout);
                durations.extend(listener.next_upstream_timeout);
            }
            let mut servers = 0;
            for upstream in config.upstreams.values() {
                assert!(!upstream.servers.is_empty());
                servers += upstream.servers.len();
                for server in &upstream.servers {
                    assert!((1..=MAX_WEIGHT).contains(&server.weight));
                    durations.extend([
                        server.fail_timeout,
                        server.slow_start,
                        server.resolve_interval,
                    ]);
                }
                if let Some(check) = &upstream.health_check {
                    durations.extend([check.interval, check.timeout]);
                }
                if let Balance::Hash(_) = upstream.balance {
                    let total: u64 = upstream
                        .servers
                        .iter()
                        .map(|server| u64::from(server.weight))
                        .sum();
                    assert!(total <= MAX_HASH_TOTAL_WEIGHT);
                }
            }
            assert!(servers <= MAX_SERVERS);
            assert!(durations.iter().all(|duration| *duration <= MAX_DURATION));
        }
        Err(err) => {
            if let Some(line) = err.line {
                assert!(line >= 1 && line <= text.lines().count().max(1) + 1);
            }
            let shown = err.to_string();
            assert!(shown.chars().count() <= MAX_ERROR_CHARS, "{shown}");
        }
    }
}
