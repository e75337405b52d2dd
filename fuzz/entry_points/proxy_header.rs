//! What the `proxy_header` fuzz target does with one input, shared with
//! `tests/fuzz_corpora.rs`, which replays the target's corpus through it as
//! an ordinary test.

use sluice::proxy::proxy_protocol::codec::{encode_v1, encode_v2, parse, Parse};

/// Arbitrary stream prefixes through the PROXY header parser.
pub fn proxy_header(data: &[u8]) {
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
}
