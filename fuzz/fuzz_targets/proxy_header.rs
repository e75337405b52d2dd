//! Feeds arbitrary stream prefixes to the PROXY header parser.
#![no_main]

#[path = "../entry_points/proxy_header.rs"]
mod entry_point;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| entry_point::proxy_header(data));
