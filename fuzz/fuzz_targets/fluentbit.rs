//! Feeds arbitrary text to both Fluent Bit Upstream file parsers. The first
//! byte picks the format; `${VAR}` expands to a fixed value.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sluice::config::fluent_bit::reader::{parse_classic, parse_yaml};

fn env(name: &str) -> Option<String> {
    (name == "HOST").then(|| "127.0.0.1".to_owned())
}

fuzz_target!(|data: &[u8]| {
    let Some((&format, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    // A directory that does not exist: `@INCLUDE` cannot reach real files.
    if format % 2 == 0 {
        let _ = parse_classic(text, Path::new("/nonexistent-sluice-fuzz/up.conf"), &env);
    } else {
        let _ = parse_yaml(text, Path::new("/nonexistent-sluice-fuzz/up.yaml"), &env);
    }
});
