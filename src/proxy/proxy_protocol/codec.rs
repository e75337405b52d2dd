//! HAProxy PROXY protocol, versions 1 (text) and 2 (binary): header encoders
//! for connections to upstreams and a parser for headers sent by a trusted
//! downstream proxy.
//!
//! Format reference: haproxy's `doc/proxy-protocol.txt`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use tokio::io::{AsyncRead, AsyncReadExt};

/// Addresses carried by a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxiedAddrs {
    /// The original client (`source`) and the address it connected to
    /// (`destination`).
    Inet {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// No usable origin: v1 `UNKNOWN`, v2 `LOCAL`, or a v2 family or transport
    /// this crate does not relay. The receiver uses the real connection's
    /// endpoints.
    Unknown,
}

/// Result of [`parse`] over a prefix of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// A full header; the payload starts at `buf[header_len..]`.
    Complete {
        addrs: ProxiedAddrs,
        header_len: usize,
    },
    /// Everything so far is a valid beginning of a header; more bytes are needed.
    Incomplete,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("stream does not start with a PROXY protocol signature")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("unsupported PROXY protocol version {0} (only 2 has a binary format)")]
    UnsupportedVersion(u8),
    #[error("connection closed after {received} bytes, before a complete PROXY header")]
    Truncated { received: usize },
    #[error("reading PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

const V1_SIGNATURE: &[u8] = b"PROXY";
/// "PROXY UNKNOWN\r\n", the shortest v1 header and so the shortest of either
/// version (v2 is at least 16 bytes).
const V1_MIN_LEN: usize = 15;
/// Longest line a receiver must accept, CRLF included (spec section 2.1).
const V1_MAX_LEN: usize = 107;
/// Shortest complete lines per protocol, `PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n`
/// and `PROXY TCP6 :: :: 0 0\r\n`: lower bounds that let the reader take
/// larger steps without reaching past a valid header.
const V1_TCP4_MIN_LEN: usize = 32;
const V1_TCP6_MIN_LEN: usize = 22;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/transport, and the 16-bit length.
const V2_FIXED_LEN: usize = 16;
const V2_VERSION: u8 = 2;
const V2_COMMAND_LOCAL: u8 = 0x0;
const V2_COMMAND_PROXY: u8 = 0x1;
const V2_FAMILY_UNSPEC: u8 = 0x0;
const V2_FAMILY_INET: u8 = 0x1;
const V2_FAMILY_INET6: u8 = 0x2;
const V2_FAMILY_UNIX: u8 = 0x3;
const V2_TRANSPORT_UNSPEC: u8 = 0x0;
const V2_TRANSPORT_STREAM: u8 = 0x1;
const V2_TRANSPORT_DGRAM: u8 = 0x2;
/// Address block sizes: two addresses plus two 16-bit ports (none for UNIX).
const V2_INET_ADDRESS_LEN: usize = 2 * 4 + 2 * 2;
const V2_INET6_ADDRESS_LEN: usize = 2 * 16 + 2 * 2;
const V2_UNIX_ADDRESS_LEN: usize = 2 * 108;

/// Source and destination brought to one family, as both versions require.
enum SameFamilyPair {
    V4 {
        source: SocketAddrV4,
        destination: SocketAddrV4,
    },
    V6 {
        source: SocketAddrV6,
        destination: SocketAddrV6,
    },
}

impl SameFamilyPair {
    /// Mixed families (a v4 client on a v6 listener, or the reverse) become
    /// IPv6 with the v4 side v4-mapped, since a header has one family.
    fn new(source: SocketAddr, destination: SocketAddr) -> Self {
        match (source, destination) {
            (SocketAddr::V4(source), SocketAddr::V4(destination)) => SameFamilyPair::V4 {
                source,
                destination,
            },
            _ => SameFamilyPair::V6 {
                source: as_v6(source),
                destination: as_v6(destination),
            },
        }
    }
}

fn as_v6(addr: SocketAddr) -> SocketAddrV6 {
    match addr {
        SocketAddr::V4(v4) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
        SocketAddr::V6(v6) => v6,
    }
}

/// Encodes a v1 (text) header.
pub fn encode_v1(addrs: &ProxiedAddrs) -> Vec<u8> {
    let line = match *addrs {
        ProxiedAddrs::Unknown => "PROXY UNKNOWN\r\n".to_owned(),
        ProxiedAddrs::Inet {
            source,
            destination,
        } => match SameFamilyPair::new(source, destination) {
            SameFamilyPair::V4 {
                source,
                destination,
            } => format!(
                "PROXY TCP4 {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            ),
            SameFamilyPair::V6 {
                source,
                destination,
            } => format!(
                "PROXY TCP6 {} {} {} {}\r\n",
                HexIpv6(*source.ip()),
                HexIpv6(*destination.ip()),
                source.port(),
                destination.port()
            ),
        },
    };
    line.into_bytes()
}

/// RFC 5952 text for an IPv6 address using hex groups only. The spec's v1
/// format is colon-separated hex, while std's `Display` writes v4-mapped
/// addresses as `::ffff:a.b.c.d`, which strict receivers may reject.
struct HexIpv6(Ipv6Addr);

impl fmt::Display for HexIpv6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups = self.0.segments();
        // The longest run of two or more zero groups (the first on ties) is
        // written as "::".
        let mut longest_zero_run: Option<(usize, usize)> = None;
        let mut run_start = None;
        for (index, &group) in groups.iter().enumerate() {
            match (group == 0, run_start) {
                (true, None) => run_start = Some(index),
                (false, Some(start)) => {
                    longest_zero_run = longer_run(longest_zero_run, start, index);
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run_start {
            longest_zero_run = longer_run(longest_zero_run, start, groups.len());
        }

        let write_groups = |f: &mut fmt::Formatter<'_>, groups: &[u16]| -> fmt::Result {
            for (index, group) in groups.iter().enumerate() {
                if index > 0 {
                    f.write_str(":")?;
                }
                write!(f, "{group:x}")?;
            }
            Ok(())
        };
        match longest_zero_run {
            None => write_groups(f, &groups),
            Some((start, end)) => {
                write_groups(f, &groups[..start])?;
                f.write_str("::")?;
                write_groups(f, &groups[end..])
            }
        }
    }
}

/// `best` or the zero run `start..end`, whichever is longer; runs of a single
/// group are never compressed.
fn longer_run(best: Option<(usize, usize)>, start: usize, end: usize) -> Option<(usize, usize)> {
    match best {
        Some((best_start, best_end)) if best_end - best_start >= end - start => best,
        _ if end - start >= 2 => Some((start, end)),
        _ => best,
    }
}

/// Encodes a v2 (binary) header with the PROXY command and no TLVs.
pub fn encode_v2(addrs: &ProxiedAddrs) -> Vec<u8> {
    let mut header = Vec::with_capacity(V2_FIXED_LEN + V2_INET6_ADDRESS_LEN);
    header.extend_from_slice(V2_SIGNATURE);
    header.push(V2_VERSION << 4 | V2_COMMAND_PROXY);
    match *addrs {
        // The spec's choice for an origin the sender cannot describe:
        // AF_UNSPEC with no address block.
        ProxiedAddrs::Unknown => {
            header.push(V2_FAMILY_UNSPEC << 4 | V2_TRANSPORT_UNSPEC);
            header.extend_from_slice(&0u16.to_be_bytes());
        }
        ProxiedAddrs::Inet {
            source,
            destination,
        } => match SameFamilyPair::new(source, destination) {
            SameFamilyPair::V4 {
                source,
                destination,
            } => {
                header.push(V2_FAMILY_INET << 4 | V2_TRANSPORT_STREAM);
                header.extend_from_slice(&(V2_INET_ADDRESS_LEN as u16).to_be_bytes());
                header.extend_from_slice(&source.ip().octets());
                header.extend_from_slice(&destination.ip().octets());
                header.extend_from_slice(&source.port().to_be_bytes());
                header.extend_from_slice(&destination.port().to_be_bytes());
            }
            SameFamilyPair::V6 {
                source,
                destination,
            } => {
                header.push(V2_FAMILY_INET6 << 4 | V2_TRANSPORT_STREAM);
                header.extend_from_slice(&(V2_INET6_ADDRESS_LEN as u16).to_be_bytes());
                header.extend_from_slice(&source.ip().octets());
                header.extend_from_slice(&destination.ip().octets());
                header.extend_from_slice(&source.port().to_be_bytes());
                header.extend_from_slice(&destination.port().to_be_bytes());
            }
        },
    }
    header
}

/// Parses one v1 or v2 header at the start of `buf`, which may hold payload
/// after it. Fails as soon as the bytes seen cannot begin a valid header.
pub fn parse(buf: &[u8]) -> Result<Parse, ProxyHeaderError> {
    if buf.starts_with(V2_SIGNATURE) {
        parse_v2(buf)
    } else if buf.starts_with(V1_SIGNATURE) {
        parse_v1(buf)
    } else if V2_SIGNATURE.starts_with(buf) || V1_SIGNATURE.starts_with(buf) {
        Ok(Parse::Incomplete)
    } else {
        Err(ProxyHeaderError::Missing)
    }
}

/// `buf` starts with "PROXY".
fn parse_v1(buf: &[u8]) -> Result<Parse, ProxyHeaderError> {
    if buf
        .get(V1_SIGNATURE.len())
        .is_some_and(|&byte| byte != b' ')
    {
        return Err(ProxyHeaderError::Malformed("expected a space after PROXY"));
    }
    let searched = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(line_end) = searched.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"))
        } else {
            Ok(Parse::Incomplete)
        };
    };
    // The spec forbids ending the line with a lone CR or LF.
    if searched[line_end] == b'\n' {
        return Err(ProxyHeaderError::Malformed(
            "line feed without carriage return",
        ));
    }
    let header_len = line_end + 2;
    if header_len > V1_MAX_LEN {
        return Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"));
    }
    match buf.get(line_end + 1) {
        None => Ok(Parse::Incomplete),
        Some(b'\n') => {
            let fields = buf[..line_end]
                .strip_prefix(b"PROXY ")
                .ok_or(ProxyHeaderError::Malformed("expected a space after PROXY"))?;
            Ok(Parse::Complete {
                addrs: parse_v1_fields(fields)?,
                header_len,
            })
        }
        Some(_) => Err(ProxyHeaderError::Malformed(
            "carriage return without line feed",
        )),
    }
}

/// `fields` is the line after "PROXY " and before CRLF.
fn parse_v1_fields(fields: &[u8]) -> Result<ProxiedAddrs, ProxyHeaderError> {
    // Whatever follows UNKNOWN is to be ignored, per the spec.
    if fields == b"UNKNOWN" || fields.starts_with(b"UNKNOWN ") {
        return Ok(ProxiedAddrs::Unknown);
    }
    let text = std::str::from_utf8(fields)
        .map_err(|_| ProxyHeaderError::Malformed("v1 line is not ASCII"))?;
    // Splitting on single spaces makes doubled spaces yield empty fields,
    // which then fail to parse: the spec demands exactly one space.
    let mut parts = text.split(' ');
    let (
        Some(protocol),
        Some(source),
        Some(destination),
        Some(source_port),
        Some(destination_port),
        None,
    ) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    )
    else {
        return Err(ProxyHeaderError::Malformed(
            "expected protocol, two addresses and two ports",
        ));
    };
    let (source_ip, destination_ip): (IpAddr, IpAddr) = match protocol {
        "TCP4" => (
            parse_v1_ip::<Ipv4Addr>(source)?.into(),
            parse_v1_ip::<Ipv4Addr>(destination)?.into(),
        ),
        "TCP6" => (
            parse_v1_ip::<Ipv6Addr>(source)?.into(),
            parse_v1_ip::<Ipv6Addr>(destination)?.into(),
        ),
        _ => {
            return Err(ProxyHeaderError::Malformed(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    Ok(ProxiedAddrs::Inet {
        source: SocketAddr::new(source_ip, parse_v1_port(source_port)?),
        destination: SocketAddr::new(destination_ip, parse_v1_port(destination_port)?),
    })
}

/// std's parsers are strict enough for the spec: dotted quads without
/// leading zeros for IPv4, and only textual IPv6 forms (as `inet_pton`
/// accepts) for IPv6.
fn parse_v1_ip<T: std::str::FromStr>(text: &str) -> Result<T, ProxyHeaderError> {
    text.parse()
        .map_err(|_| ProxyHeaderError::Malformed("address does not match the protocol family"))
}

fn parse_v1_port(text: &str) -> Result<u16, ProxyHeaderError> {
    // `u16::from_str` alone would accept a leading '+', and the spec forbids
    // leading zeros.
    let is_canonical_decimal = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !is_canonical_decimal {
        return Err(ProxyHeaderError::Malformed(
            "port is not a decimal number without leading zeros",
        ));
    }
    text.parse()
        .map_err(|_| ProxyHeaderError::Malformed("port is above 65535"))
}

/// The 16-byte fixed part of a v2 header.
struct V2Prefix {
    version: u8,
    command: u8,
    family: u8,
    transport: u8,
    /// Bytes after the fixed part: address block plus TLVs.
    remaining_len: usize,
}

impl V2Prefix {
    fn read(buf: &[u8]) -> Option<Self> {
        let fixed: &[u8; V2_FIXED_LEN] = buf.get(..V2_FIXED_LEN)?.try_into().ok()?;
        let [.., version_command, family_transport, len_high, len_low] = *fixed;
        Some(V2Prefix {
            version: version_command >> 4,
            command: version_command & 0x0f,
            family: family_transport >> 4,
            transport: family_transport & 0x0f,
            remaining_len: usize::from(u16::from_be_bytes([len_high, len_low])),
        })
    }
}

/// `buf` starts with the v2 signature.
fn parse_v2(buf: &[u8]) -> Result<Parse, ProxyHeaderError> {
    let Some(prefix) = V2Prefix::read(buf) else {
        return Ok(Parse::Incomplete);
    };
    if prefix.version != V2_VERSION {
        return Err(ProxyHeaderError::UnsupportedVersion(prefix.version));
    }
    // Validate everything the fixed part tells before waiting for the rest.
    let required_address_len = match prefix.command {
        // LOCAL: the spec says to ignore the family and address block.
        V2_COMMAND_LOCAL => 0,
        V2_COMMAND_PROXY => match (prefix.family, prefix.transport) {
            (family, _) if family > V2_FAMILY_UNIX => {
                return Err(ProxyHeaderError::Malformed("unknown address family"))
            }
            (_, transport) if transport > V2_TRANSPORT_DGRAM => {
                return Err(ProxyHeaderError::Malformed("unknown transport protocol"))
            }
            (V2_FAMILY_UNSPEC, _) | (_, V2_TRANSPORT_UNSPEC) => 0,
            (V2_FAMILY_INET, _) => V2_INET_ADDRESS_LEN,
            (V2_FAMILY_INET6, _) => V2_INET6_ADDRESS_LEN,
            _ => V2_UNIX_ADDRESS_LEN,
        },
        _ => return Err(ProxyHeaderError::Malformed("unknown command")),
    };
    if prefix.remaining_len < required_address_len {
        return Err(ProxyHeaderError::Malformed(
            "length is shorter than the address block of its family",
        ));
    }
    let header_len = V2_FIXED_LEN + prefix.remaining_len;
    // Anything past the address block is TLVs, which this crate ignores.
    let Some(address_block) = buf.get(V2_FIXED_LEN..header_len) else {
        return Ok(Parse::Incomplete);
    };
    let addrs = match (prefix.command, prefix.family, prefix.transport) {
        (V2_COMMAND_PROXY, V2_FAMILY_INET, V2_TRANSPORT_STREAM) => {
            read_inet_addrs::<4>(address_block)
        }
        (V2_COMMAND_PROXY, V2_FAMILY_INET6, V2_TRANSPORT_STREAM) => {
            read_inet_addrs::<16>(address_block)
        }
        // LOCAL, AF_UNSPEC, AF_UNIX, and datagram or unspecified transports:
        // the spec has receivers fall back to the real endpoints for
        // combinations they do not relay.
        _ => Some(ProxiedAddrs::Unknown),
    }
    // Unreachable after the length check above; kept as an error, not a panic.
    .ok_or(ProxyHeaderError::Malformed(
        "address block shorter than its family requires",
    ))?;
    Ok(Parse::Complete { addrs, header_len })
}

/// Source address, destination address (`IP_LEN` bytes each), then the two
/// ports, all in network byte order.
fn read_inet_addrs<const IP_LEN: usize>(address_block: &[u8]) -> Option<ProxiedAddrs>
where
    IpAddr: From<[u8; IP_LEN]>,
{
    let source_ip: [u8; IP_LEN] = address_block.get(..IP_LEN)?.try_into().ok()?;
    let destination_ip: [u8; IP_LEN] = address_block.get(IP_LEN..2 * IP_LEN)?.try_into().ok()?;
    let ports: [u8; 4] = address_block
        .get(2 * IP_LEN..2 * IP_LEN + 4)?
        .try_into()
        .ok()?;
    let [source_high, source_low, destination_high, destination_low] = ports;
    Some(ProxiedAddrs::Inet {
        source: SocketAddr::new(
            IpAddr::from(source_ip),
            u16::from_be_bytes([source_high, source_low]),
        ),
        destination: SocketAddr::new(
            IpAddr::from(destination_ip),
            u16::from_be_bytes([destination_high, destination_low]),
        ),
    })
}

/// Reads one v1 or v2 header and consumes exactly its bytes: no read asks for
/// more than the header can still need, so the payload after it stays in
/// `reader` for the caller. Has no timeout of its own; the caller sets one.
pub async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<ProxiedAddrs, ProxyHeaderError> {
    let mut buf = Vec::with_capacity(V1_MAX_LEN);
    loop {
        if let Parse::Complete { addrs, header_len } = parse(&buf)? {
            debug_assert_eq!(header_len, buf.len(), "read past the end of the header");
            return Ok(addrs);
        }
        let received = buf.len();
        buf.resize(received + min_bytes_still_needed(&buf), 0);
        let read = reader.read(&mut buf[received..]).await?;
        buf.truncate(received + read);
        if read == 0 {
            return Err(ProxyHeaderError::Truncated { received });
        }
    }
}

/// A lower bound, at least 1, on how many more bytes a valid header starting
/// with `buf` needs, for a `buf` that `parse` found incomplete. Reading no
/// more than this can never consume payload, yet takes far fewer reads than
/// going byte by byte.
fn min_bytes_still_needed(buf: &[u8]) -> usize {
    let is_v2 = buf.first() == Some(&V2_SIGNATURE[0]);
    let min_header_len = if is_v2 {
        V2Prefix::read(buf).map_or(V2_FIXED_LEN, |prefix| V2_FIXED_LEN + prefix.remaining_len)
    } else if buf.starts_with(b"PROXY TCP4 ") {
        V1_TCP4_MIN_LEN
    } else if buf.starts_with(b"PROXY TCP6 ") {
        V1_TCP6_MIN_LEN
    } else {
        // Also the bound for an empty `buf`, whose version is not known yet.
        V1_MIN_LEN
    };
    // A v1 line whose CR has not arrived still needs the whole CRLF.
    let line_end_pending = if is_v2 || buf.last() == Some(&b'\r') {
        1
    } else {
        2
    };
    min_header_len
        .saturating_sub(buf.len())
        .max(line_end_pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn inet(source: &str, destination: &str) -> ProxiedAddrs {
        ProxiedAddrs::Inet {
            source: addr(source),
            destination: addr(destination),
        }
    }

    /// The v1 example of the spec, section 2.1.
    fn spec_example_v4() -> ProxiedAddrs {
        inet("192.168.0.1:56324", "192.168.0.11:443")
    }

    fn example_v6() -> ProxiedAddrs {
        inet("[2001:db8::1]:56324", "[2001:db8::2]:443")
    }

    const SIG: [u8; 12] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
    ];

    fn v2_header(version_command: u8, family_transport: u8, rest: &[u8]) -> Vec<u8> {
        let mut header = SIG.to_vec();
        header.push(version_command);
        header.push(family_transport);
        header.extend_from_slice(&u16::try_from(rest.len()).unwrap().to_be_bytes());
        header.extend_from_slice(rest);
        header
    }

    fn complete(buf: &[u8]) -> (ProxiedAddrs, usize) {
        match parse(buf) {
            Ok(Parse::Complete { addrs, header_len }) => (addrs, header_len),
            other => panic!("expected a complete header in {buf:?}, got {other:?}"),
        }
    }

    fn assert_malformed(buf: &[u8]) {
        match parse(buf) {
            Err(ProxyHeaderError::Malformed(_)) => {}
            other => panic!(
                "expected Malformed for {:?}, got {other:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }

    // ---- v1 encoding ----

    #[test]
    fn v1_tcp4_is_the_spec_example() {
        assert_eq!(
            encode_v1(&spec_example_v4()),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
    }

    #[test]
    fn v1_tcp6() {
        assert_eq!(
            encode_v1(&example_v6()),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n"
        );
    }

    #[test]
    fn v1_unknown_is_the_short_form() {
        assert_eq!(encode_v1(&ProxiedAddrs::Unknown), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v1_mixed_families_become_tcp6_with_hex_v4_mapped_address() {
        let v4_client_on_v6_listener = inet("192.168.0.1:56324", "[2001:db8::2]:443");
        assert_eq!(
            encode_v1(&v4_client_on_v6_listener),
            b"PROXY TCP6 ::ffff:c0a8:1 2001:db8::2 56324 443\r\n"
        );
        let v6_client_on_v4_listener = inet("[2001:db8::1]:56324", "192.168.0.11:443");
        assert_eq!(
            encode_v1(&v6_client_on_v4_listener),
            b"PROXY TCP6 2001:db8::1 ::ffff:c0a8:b 56324 443\r\n"
        );
    }

    #[test]
    fn v1_longest_lines_fit_the_spec_limits() {
        let max_v4 = inet("255.255.255.255:65535", "255.255.255.255:65535");
        assert_eq!(encode_v1(&max_v4).len(), 56);
        let max_v6 = inet(
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        );
        assert_eq!(encode_v1(&max_v6).len(), 104);
    }

    #[test]
    fn ipv6_text_compresses_the_longest_zero_run_and_never_uses_dotted_quads() {
        let cases = [
            ("::", "::"),
            ("::1", "::1"),
            ("1::", "1::"),
            ("1:0:0:2:0:0:0:3", "1:0:0:2::3"),
            // Ties go to the first run.
            ("1:0:0:2:3:0:0:4", "1::2:3:0:0:4"),
            // A single zero group stays as it is.
            ("1:0:2:3:4:5:6:7", "1:0:2:3:4:5:6:7"),
            ("2001:DB8:0:0:0:0:0:AB", "2001:db8::ab"),
            ("::ffff:192.0.2.1", "::ffff:c000:201"),
            ("::192.0.2.1", "::c000:201"),
        ];
        for (input, expected) in cases {
            let ip: Ipv6Addr = input.parse().unwrap();
            assert_eq!(HexIpv6(ip).to_string(), expected, "for {input}");
        }
    }

    // ---- v2 encoding ----

    #[test]
    fn v2_ipv4() {
        #[rustfmt::skip]
        let expected: [u8; 28] = [
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
            0x21,                   // version 2, PROXY
            0x11,                   // AF_INET, STREAM
            0x00, 0x0C,             // 12 address bytes
            0xC0, 0xA8, 0x00, 0x01, // 192.168.0.1
            0xC0, 0xA8, 0x00, 0x0B, // 192.168.0.11
            0xDC, 0x04,             // 56324
            0x01, 0xBB,             // 443
        ];
        assert_eq!(encode_v2(&spec_example_v4()), expected);
    }

    #[test]
    fn v2_ipv6() {
        #[rustfmt::skip]
        let expected: [u8; 52] = [
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
            0x21,                   // version 2, PROXY
            0x21,                   // AF_INET6, STREAM
            0x00, 0x24,             // 36 address bytes
            0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, // 2001:db8::1
            0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, // 2001:db8::2
            0xDC, 0x04,             // 56324
            0x01, 0xBB,             // 443
        ];
        assert_eq!(encode_v2(&example_v6()), expected);
    }

    #[test]
    fn v2_unknown_is_proxy_command_with_af_unspec_and_no_addresses() {
        #[rustfmt::skip]
        let expected: [u8; 16] = [
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
            0x21,       // version 2, PROXY
            0x00,       // AF_UNSPEC, UNSPEC
            0x00, 0x00, // no address block
        ];
        assert_eq!(encode_v2(&ProxiedAddrs::Unknown), expected);
    }

    #[test]
    fn v2_mixed_families_become_ipv6_with_v4_mapped_address() {
        let encoded = encode_v2(&inet("192.168.0.1:56324", "[2001:db8::2]:443"));
        assert_eq!(encoded[13], 0x21);
        assert_eq!(
            encoded[16..32],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xC0, 0xA8, 0x00, 0x01]
        );
        assert_eq!(
            complete(&encoded).0,
            inet("[::ffff:192.168.0.1]:56324", "[2001:db8::2]:443")
        );
    }

    // ---- parsing ----

    #[test]
    fn round_trips_through_both_versions() {
        for addrs in [spec_example_v4(), example_v6(), ProxiedAddrs::Unknown] {
            for encoded in [encode_v1(&addrs), encode_v2(&addrs)] {
                assert_eq!(complete(&encoded), (addrs, encoded.len()));
            }
        }
    }

    #[test]
    fn header_len_excludes_the_payload() {
        let mut stream = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec();
        let header_len = stream.len();
        stream.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(complete(&stream), (spec_example_v4(), header_len));

        let mut stream = encode_v2(&example_v6());
        let header_len = stream.len();
        stream.extend_from_slice(b"\r\n\r\n\0\r\nQUIT\n payload that looks like a signature");
        assert_eq!(complete(&stream), (example_v6(), header_len));
    }

    #[test]
    fn every_proper_prefix_of_a_header_is_incomplete() {
        let headers = [
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            encode_v2(&example_v6()),
            v2_header(0x21, 0x11, &[0; 40]),
        ];
        for header in headers {
            for len in 0..header.len() {
                assert!(
                    matches!(parse(&header[..len]), Ok(Parse::Incomplete)),
                    "prefix of {len} bytes of {header:?}"
                );
            }
            assert_eq!(complete(&header).1, header.len());
        }
    }

    #[test]
    fn v1_unknown_ignores_the_rest_of_the_line() {
        let line = b"PROXY UNKNOWN ffff:f::f:ffff ffff::ffff 65535 65535\r\nGET";
        assert_eq!(complete(line), (ProxiedAddrs::Unknown, line.len() - 3));
        let line = b"PROXY UNKNOWN anything \xff at all\r\n";
        assert_eq!(complete(line), (ProxiedAddrs::Unknown, line.len()));
    }

    #[test]
    fn v1_accepts_a_line_of_exactly_107_bytes() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX_LEN - 2, b'f');
        line.extend_from_slice(b"\r\n");
        assert_eq!(complete(&line), (ProxiedAddrs::Unknown, V1_MAX_LEN));
    }

    #[test]
    fn v1_rejects_lines_longer_than_107_bytes() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX_LEN - 1, b'f');
        // The CRLF would end at byte 108: rejected as soon as the CR is seen.
        line.push(b'\r');
        assert_malformed(&line);
        // No CR at all within 107 bytes.
        line.pop();
        line.push(b'f');
        assert_malformed(&line);
        line.extend_from_slice(b"\r\n");
        assert_malformed(&line);
    }

    #[test]
    fn v1_accepts_port_and_address_extremes() {
        let (addrs, _) = complete(b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n");
        assert_eq!(addrs, inet("0.0.0.0:0", "255.255.255.255:65535"));
        let (addrs, _) = complete(b"PROXY TCP6 :: FFFF::1 1 2\r\n");
        assert_eq!(addrs, inet("[::]:1", "[ffff::1]:2"));
    }

    #[test]
    fn v1_rejects_bad_ports() {
        for port in [
            "65536",
            "99999",
            "+80",
            "080",
            "00",
            "-1",
            "8O",
            "",
            "0x50",
            "4294967377",
        ] {
            let line = format!("PROXY TCP4 192.168.0.1 192.168.0.11 {port} 443\r\n");
            assert_malformed(line.as_bytes());
            let line = format!("PROXY TCP4 192.168.0.1 192.168.0.11 443 {port}\r\n");
            assert_malformed(line.as_bytes());
        }
    }

    #[test]
    fn v1_rejects_bad_addresses() {
        let lines: [&[u8]; 10] = [
            b"PROXY TCP4 192.168.0.01 192.168.0.11 1 2\r\n",
            b"PROXY TCP4 256.168.0.1 192.168.0.11 1 2\r\n",
            b"PROXY TCP4 192.168.0 192.168.0.11 1 2\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11. 1 2\r\n",
            b"PROXY TCP4 2001:db8::1 192.168.0.11 1 2\r\n",
            b"PROXY TCP6 192.168.0.1 2001:db8::2 1 2\r\n",
            b"PROXY TCP6 2001:db8::g 2001:db8::2 1 2\r\n",
            b"PROXY TCP6 2001:db8:::1 2001:db8::2 1 2\r\n",
            b"PROXY TCP6 [2001:db8::1] 2001:db8::2 1 2\r\n",
            b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n",
        ];
        for line in lines {
            assert_malformed(line);
        }
    }

    #[test]
    fn v1_rejects_bad_framing() {
        let lines: [&[u8]; 12] = [
            b"PROXY  TCP4 192.168.0.1 192.168.0.11 1 2\r\n",
            b"PROXY TCP4 192.168.0.1  192.168.0.11 1 2\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 1 2 \r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 1\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 1 2 3\r\n",
            b"PROXY tcp4 192.168.0.1 192.168.0.11 1 2\r\n",
            b"PROXY UDP4 192.168.0.1 192.168.0.11 1 2\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY\r\n",
            b"PROXY \r\n",
            b"PROXY\tTCP4 192.168.0.1 192.168.0.11 1 2\r\n",
            b"PROXY TCP4 192.168.0.1\x00 192.168.0.11 1 2\r\n",
        ];
        for line in lines {
            assert_malformed(line);
        }
    }

    #[test]
    fn v1_rejects_a_lone_cr_or_lf_as_soon_as_it_is_seen() {
        assert_malformed(b"PROXY UNKNOWN\n");
        assert_malformed(b"PROXY TCP4 192.168.0.1 192.168.0.11 1 2\n");
        assert_malformed(b"PROXY UNKNOWN\rX");
        assert_malformed(b"PROXY UNKNOWN\r\r\n");
    }

    #[test]
    fn v2_skips_tlvs_within_the_length() {
        let mut rest = vec![192, 168, 0, 1, 192, 168, 0, 11, 0xDC, 0x04, 0x01, 0xBB];
        rest.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']); // PP2_TYPE_ALPN "h2"
        rest.extend_from_slice(&[0x04, 0x00, 0x03, 0, 0, 0]); // PP2_TYPE_NOOP
        let mut stream = v2_header(0x21, 0x11, &rest);
        let header_len = stream.len();
        assert_eq!(header_len, 16 + 12 + 5 + 6);
        stream.extend_from_slice(b"payload");
        assert_eq!(complete(&stream), (spec_example_v4(), header_len));
    }

    #[test]
    fn v2_local_is_unknown_and_skips_any_address_block() {
        let local = v2_header(0x20, 0x00, &[]);
        assert_eq!(complete(&local), (ProxiedAddrs::Unknown, 16));
        // Receivers must honour the length even for LOCAL.
        let local_with_addresses = v2_header(0x20, 0x11, &[7; 12]);
        assert_eq!(complete(&local_with_addresses), (ProxiedAddrs::Unknown, 28));
    }

    #[test]
    fn v2_families_and_transports_not_relayed_are_unknown() {
        let cases = [
            (0x00, vec![]),       // AF_UNSPEC, UNSPEC
            (0x01, vec![1; 5]),   // AF_UNSPEC, STREAM, with bytes to skip
            (0x10, vec![]),       // AF_INET, UNSPEC: address information ignored
            (0x12, vec![1; 12]),  // UDP over IPv4
            (0x22, vec![1; 36]),  // UDP over IPv6
            (0x31, vec![1; 216]), // UNIX stream
            (0x32, vec![1; 216]), // UNIX datagram
        ];
        for (family_transport, rest) in cases {
            let header = v2_header(0x21, family_transport, &rest);
            assert_eq!(
                complete(&header),
                (ProxiedAddrs::Unknown, header.len()),
                "family/transport {family_transport:#04x}"
            );
        }
    }

    #[test]
    fn v2_rejects_a_length_shorter_than_the_family_address_block() {
        for (family_transport, too_short) in [(0x11, 11), (0x21, 12), (0x21, 35), (0x31, 215)] {
            let header = v2_header(0x21, family_transport, &vec![0; too_short]);
            // Rejected from the fixed part alone, without waiting for the rest.
            assert_malformed(&header[..V2_FIXED_LEN]);
            assert_malformed(&header);
        }
    }

    #[test]
    fn v2_rejects_unknown_versions() {
        for version_command in [0x01, 0x11, 0x31, 0xF1] {
            let header = v2_header(version_command, 0x11, &[0; 12]);
            assert!(matches!(
                parse(&header),
                Err(ProxyHeaderError::UnsupportedVersion(v)) if v == version_command >> 4
            ));
        }
    }

    #[test]
    fn v2_rejects_unknown_commands_families_and_transports() {
        assert_malformed(&v2_header(0x22, 0x11, &[0; 12]));
        assert_malformed(&v2_header(0x2F, 0x11, &[0; 12]));
        assert_malformed(&v2_header(0x21, 0x41, &[0; 12]));
        assert_malformed(&v2_header(0x21, 0x13, &[0; 12]));
        assert_malformed(&v2_header(0x21, 0xFF, &[0; 12]));
    }

    #[test]
    fn data_without_a_signature_is_missing() {
        let streams: [&[u8]; 8] = [
            b"GET / HTTP/1.1\r\n\r\n",
            b"G",
            b"\x16\x03\x01\x02\x00",
            b"proxy TCP4 192.168.0.1 192.168.0.11 1 2\r\n",
            b"PROXZ",
            b"PRX",
            b"\r\n\r\n\0\r\nQUIT\r",
            b"\r\n\r\n\x01",
        ];
        for stream in streams {
            assert!(
                matches!(parse(stream), Err(ProxyHeaderError::Missing)),
                "{stream:?}"
            );
        }
    }

    // ---- reading from a stream ----

    async fn read_header_and_rest(stream: &[u8]) -> (ProxiedAddrs, Vec<u8>) {
        // A slice reader returns as much as asked for: the harshest case for
        // over-reading.
        let mut reader = stream;
        let addrs = read_header(&mut reader).await.unwrap();
        (addrs, reader.to_vec())
    }

    #[tokio::test]
    async fn read_header_leaves_the_payload_untouched() {
        let payload = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n";
        for addrs in [spec_example_v4(), example_v6(), ProxiedAddrs::Unknown] {
            for header in [encode_v1(&addrs), encode_v2(&addrs)] {
                let stream = [header.as_slice(), payload].concat();
                assert_eq!(
                    read_header_and_rest(&stream).await,
                    (addrs, payload.to_vec())
                );
            }
        }
        // Shortest TCP lines, where the reader's lower bounds are tight.
        for (line, addrs) in [
            (
                &b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n"[..],
                inet("0.0.0.0:0", "0.0.0.0:0"),
            ),
            (&b"PROXY TCP6 :: :: 0 0\r\n"[..], inet("[::]:0", "[::]:0")),
        ] {
            let stream = [line, payload].concat();
            assert_eq!(
                read_header_and_rest(&stream).await,
                (addrs, payload.to_vec())
            );
        }
    }

    #[tokio::test]
    async fn read_header_skips_v2_tlvs_and_leaves_the_payload() {
        let mut rest = vec![192, 168, 0, 1, 192, 168, 0, 11, 0xDC, 0x04, 0x01, 0xBB];
        rest.extend_from_slice(&[0x05, 0x00, 0x04, 1, 2, 3, 4]); // PP2_TYPE_UNIQUE_ID
        let stream = [v2_header(0x21, 0x11, &rest).as_slice(), b"payload"].concat();
        assert_eq!(
            read_header_and_rest(&stream).await,
            (spec_example_v4(), b"payload".to_vec())
        );
    }

    #[tokio::test]
    async fn read_header_over_a_duplex_delivering_one_byte_at_a_time() {
        let payload = b"\x16\x03\x01 hello after the header".to_vec();
        for header in [encode_v1(&example_v6()), encode_v2(&example_v6())] {
            let (mut client, mut server) = tokio::io::duplex(1);
            let stream = [header.as_slice(), &payload].concat();
            let writer = tokio::spawn(async move {
                client.write_all(&stream).await.unwrap();
            });
            assert_eq!(read_header(&mut server).await.unwrap(), example_v6());
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, payload);
            writer.await.unwrap();
        }
    }

    #[tokio::test]
    async fn read_header_reports_missing_from_the_first_byte() {
        let (mut client, mut server) = tokio::io::duplex(64);
        // The client keeps the connection open after one byte: the verdict
        // must not wait for more.
        client.write_all(b"G").await.unwrap();
        let verdict = tokio::time::timeout(Duration::from_secs(5), read_header(&mut server))
            .await
            .expect("read_header waited for more bytes");
        assert!(matches!(verdict, Err(ProxyHeaderError::Missing)));

        let mut reader: &[u8] = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n";
        assert!(matches!(
            read_header(&mut reader).await,
            Err(ProxyHeaderError::Missing)
        ));
    }

    #[tokio::test]
    async fn read_header_reports_eof_before_a_full_header() {
        for partial in [
            &b""[..],
            b"PROXY TCP4 192.1",
            &encode_v2(&example_v6())[..40],
        ] {
            let mut reader = partial;
            match read_header(&mut reader).await {
                Err(ProxyHeaderError::Truncated { received }) => {
                    assert_eq!(received, partial.len())
                }
                other => panic!("expected Truncated for {partial:?}, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn read_header_rejects_malformed_headers() {
        let mut reader: &[u8] = b"PROXY TCP4 192.168.0.1 192.168.0.11 080 443\r\npayload";
        assert!(matches!(
            read_header(&mut reader).await,
            Err(ProxyHeaderError::Malformed(_))
        ));
    }

    // ---- properties ----

    fn any_socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
            // v4-mapped IPv6, which must stay IPv6 through a round trip.
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| {
                SocketAddr::new(IpAddr::from(Ipv4Addr::from(ip).to_ipv6_mapped()), port)
            }),
        ]
    }

    /// Arbitrary bytes, often behind a signature so the parser goes deep.
    fn header_like_bytes() -> impl Strategy<Value = Vec<u8>> {
        let tail = proptest::collection::vec(any::<u8>(), 0..300);
        prop_oneof![
            tail.clone(),
            tail.clone()
                .prop_map(|tail| [&b"PROXY "[..], &tail].concat()),
            tail.clone()
                .prop_map(|tail| [&b"PROXY TCP4 "[..], &tail].concat()),
            tail.clone()
                .prop_map(|tail| [&b"PROXY TCP6 "[..], &tail].concat()),
            (any::<[u8; 2]>(), 0u16..300, tail).prop_map(|(bytes, len, tail)| {
                // Valid version nibble so the family and length checks run.
                let version_command = 0x20 | (bytes[0] & 0x0f);
                let mut header = SIG.to_vec();
                header.extend_from_slice(&[version_command, bytes[1]]);
                header.extend_from_slice(&len.to_be_bytes());
                header.extend_from_slice(&tail);
                header
            }),
        ]
    }

    fn expected_after_round_trip(source: SocketAddr, destination: SocketAddr) -> ProxiedAddrs {
        match SameFamilyPair::new(source, destination) {
            SameFamilyPair::V4 {
                source,
                destination,
            } => ProxiedAddrs::Inet {
                source: source.into(),
                destination: destination.into(),
            },
            SameFamilyPair::V6 {
                source,
                destination,
            } => ProxiedAddrs::Inet {
                source: source.into(),
                destination: destination.into(),
            },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parse_never_panics_and_stays_within_the_buffer(bytes in header_like_bytes()) {
            if let Ok(Parse::Complete { addrs, header_len }) = parse(&bytes) {
                prop_assert!(header_len <= bytes.len());
                // Whatever is accepted survives re-encoding.
                for encoded in [encode_v1(&addrs), encode_v2(&addrs)] {
                    prop_assert_eq!(complete(&encoded), (addrs, encoded.len()));
                }
            }
        }

        #[test]
        fn encode_then_parse_round_trips(
            source in any_socket_addr(),
            destination in any_socket_addr(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let addrs = ProxiedAddrs::Inet { source, destination };
            let expected = expected_after_round_trip(source, destination);
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            for header in [encode_v1(&addrs), encode_v2(&addrs)] {
                let stream = [header.as_slice(), &payload].concat();
                prop_assert_eq!(complete(&stream), (expected, header.len()));
                let (read_addrs, rest) = runtime.block_on(read_header_and_rest(&stream));
                prop_assert_eq!(read_addrs, expected);
                prop_assert_eq!(rest, payload.clone());
            }
        }
    }
}
