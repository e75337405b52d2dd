//! Feeds arbitrary text to the TOML configuration parser and validator.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sluice::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(config) => {
            // What validation promises the rest of sluice.
            assert!(!config.listeners.is_empty());
            for listener in &config.listeners {
                assert!(config.upstreams.contains_key(&listener.upstream));
            }
            for upstream in config.upstreams.values() {
                assert!(!upstream.servers.is_empty());
                assert!(upstream.servers.iter().all(|server| server.weight > 0));
            }
        }
        Err(err) => {
            if let Some(line) = err.line {
                assert!(line >= 1 && line <= text.lines().count().max(1) + 1);
            }
        }
    }
});
