//! What the `fluentbit` fuzz target does with one input, shared with
//! `tests/fuzz_corpora.rs`, which replays the target's corpus through it as
//! an ordinary test.

use std::path::Path;

use sluice::config::fluent_bit::reader::{parse_classic, parse_yaml};
use sluice::config::limits::{MAX_KEYS_PER_SECTION, MAX_LINE_BYTES, MAX_SERVERS};

/// However long the input, an error stays short (SPEC §8): the file name,
/// the line, and a message of at most 1000 characters.
const MAX_ERROR_CHARS: usize = 1100;

fn env(name: &str) -> Option<String> {
    (name == "HOST").then(|| "127.0.0.1".to_owned())
}

/// Arbitrary text through both Fluent Bit Upstream file parsers. The first
/// byte picks the format; `${HOST}` expands to a fixed value.
pub fn fluentbit(data: &[u8]) {
    let Some((&format, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    // A directory that does not exist: a relative `@INCLUDE` reaches no file.
    let result = if format % 2 == 0 {
        parse_classic(text, Path::new("/nonexistent-sluice-fuzz/up.conf"), &env)
    } else {
        parse_yaml(text, Path::new("/nonexistent-sluice-fuzz/up.yaml"), &env)
    };
    match result {
        Ok(file) => {
            assert!(!file.nodes.is_empty() && file.nodes.len() <= MAX_SERVERS);
            for node in &file.nodes {
                assert!(node.key_lines.len() <= MAX_KEYS_PER_SECTION);
                let values = [&node.name, &node.host]
                    .into_iter()
                    .chain(node.extra.iter().map(|(_, value)| value));
                assert!(values
                    .into_iter()
                    .all(|value| value.len() <= MAX_LINE_BYTES));
            }
        }
        Err(err) => {
            let shown = err.to_string();
            assert!(shown.chars().count() <= MAX_ERROR_CHARS, "{shown}");
        }
    }
}
