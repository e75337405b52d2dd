//! Feeds arbitrary text to the TOML configuration parser and validator.
#![no_main]

#[path = "../entry_points/config.rs"]
mod entry_point;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| entry_point::config(data));
