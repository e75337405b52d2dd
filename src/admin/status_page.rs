//! The status page (SPEC §12): one HTML file with its style and script
//! inline, built into the binary, that reads `/status` every 2 s.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

const PAGE: &str = include_str!("status_page.html");

/// The SHA-256 of the page's one inline script, base64: the only script the
/// page's Content-Security-Policy lets run, so markup that got into the page
/// by mistake (a server name, say) could not run script even if the page
/// failed to escape it. A unit test checks it against the script.
const SCRIPT_HASH: &str = "sha256-WG9//dqtypSriYIVuocYj0hTUp6olvEBi21oSAmIhF4=";

/// No external source of anything; the page talks to its own origin only,
/// and no other site may frame it (its controls change servers).
fn content_security_policy() -> String {
    format!(
        "default-src 'none'; script-src '{SCRIPT_HASH}'; style-src 'unsafe-inline'; \
         img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

pub(super) fn response() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    if let Ok(policy) = HeaderValue::from_str(&content_security_policy()) {
        headers.insert("content-security-policy", policy);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn inline_script() -> &'static str {
        let start = PAGE.find("<script>").expect("the page has a script") + "<script>".len();
        let end = PAGE.find("</script>").expect("the script ends");
        assert_eq!(
            PAGE.matches("<script").count(),
            1,
            "the policy allows exactly one script"
        );
        &PAGE[start..end]
    }

    fn base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let word = chunk.iter().enumerate().fold(0u32, |word, (i, &byte)| {
                word | u32::from(byte) << (16 - 8 * i)
            });
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(word >> (18 - 6 * i) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in vectors {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn the_policy_names_the_hash_of_the_inline_script() {
        let hash = format!(
            "sha256-{}",
            base64(&Sha256::digest(inline_script().as_bytes()))
        );
        assert_eq!(
            SCRIPT_HASH, hash,
            "the script changed: set SCRIPT_HASH to {hash:?}"
        );
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        // The SVG namespace is a name, never fetched.
        for external in [
            "http://", "https://", "\"//", "'//", "src=", "@import", "url(",
        ] {
            let found: Vec<&str> = PAGE
                .lines()
                .filter(|line| line.contains(external))
                .filter(|line| !line.contains("\"http://www.w3.org/2000/svg\""))
                .collect();
            assert!(found.is_empty(), "{external:?} in the page: {found:?}");
        }
    }

    #[test]
    fn the_page_never_parses_data_as_html() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!PAGE.contains(sink), "the page uses {sink}");
        }
    }
}
