//! Feeds arbitrary stream prefixes to the PROXY header parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::proxy::proxy_protocol::codec::{encode_v1, encode_v2, parse, Parse};

fuzz_target!(|data: &[u8]| {
    let Ok(Parse::Complete { addrs, header_len }) = parse(data) else {
        return;
    };
    assert!(header_len <= data.len(), "header extends past the input");
    // Anything accepted must come back unchanged through either encoder.
    for encoded in [encode_v1(&addrs), encode_v2(&addrs)] {
        match parse(&encoded) {
            Ok(Parse::Complete {
                addrs: reparsed,
                header_len,
            }) => {
                assert_eq!(reparsed, addrs);
                assert_eq!(header_len, encoded.len());
            }
            other => panic!("re-encoded {addrs:?} did not parse: {other:?}"),
        }
    }
});
