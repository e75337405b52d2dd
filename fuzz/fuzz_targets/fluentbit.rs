//! Feeds arbitrary text to both Fluent Bit Upstream file parsers.
#![no_main]

#[path = "../entry_points/fluentbit.rs"]
mod entry_point;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| entry_point::fluentbit(data));
