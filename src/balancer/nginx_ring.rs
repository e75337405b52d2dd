//! `hash` on nginx's ring (`hash KEY consistent`, as Cache::Memcached::Fast
//! builds it), so a group moved from nginx keeps every key on its server.
//!
//! Each peer owns 160 points per unit of weight: CRC32 of the server's
//! address as written, split into `HOST`, a zero byte and `PORT`, followed by
//! the previous point (4 bytes, little-endian; 0 for the first). Peers of one
//! server (a host name with several addresses) share its points. A key maps
//! to the first point at or after CRC32(key); among the eligible peers of
//! that point's server, round-robin decides. When none is eligible the next
//! point is tried; after 20 such misses in one client connection, plain
//! round-robin over the group picks.

use super::{Algorithm, PeerView, RoundRobin, Walk, MAX_MISSES};

/// Ring points per unit of weight, as nginx.
const POINTS_PER_WEIGHT: u32 = 160;

/// CRC-32 (IEEE 802.3, reflected, as zlib and nginx's `ngx_crc32`), one
/// table lookup per byte.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut index = 0;
    while index < 256 {
        let mut crc = index as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[index] = crc;
        index += 1;
    }
    table
};

/// A CRC-32 in progress, so a common prefix is hashed once.
#[derive(Clone, Copy)]
struct Crc32(u32);

impl Crc32 {
    fn new() -> Self {
        Crc32(0xFFFF_FFFF)
    }

    fn update(mut self, bytes: &[u8]) -> Self {
        for &byte in bytes {
            self.0 = CRC_TABLE[usize::from((self.0 as u8) ^ byte)] ^ (self.0 >> 8);
        }
        self
    }

    fn finish(self) -> u32 {
        self.0 ^ 0xFFFF_FFFF
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    Crc32::new().update(bytes).finish()
}

/// nginx's split of a server address: `unix:PATH` is all host; otherwise
/// the digits after the last `:` are the port (none if not all digits).
fn host_and_port(server: &str) -> (&str, &str) {
    if server.len() >= 5 && server[..5].eq_ignore_ascii_case("unix:") {
        return (&server[5..], "");
    }
    match server.rfind(':') {
        Some(colon) if server[colon + 1..].bytes().all(|b| b.is_ascii_digit()) => {
            (&server[..colon], &server[colon + 1..])
        }
        _ => (server, ""),
    }
}

/// The points of one server of `weight`.
fn points(server: &str, weight: u32) -> impl Iterator<Item = u32> {
    let (host, port) = host_and_port(server);
    let base = Crc32::new()
        .update(host.as_bytes())
        .update(&[0])
        .update(port.as_bytes());
    let mut previous = 0u32;
    (0..weight.saturating_mul(POINTS_PER_WEIGHT)).map(move |_| {
        previous = base.update(&previous.to_le_bytes()).finish();
        previous
    })
}

pub struct NginxRing {
    /// `(point, server)`, sorted by point, one entry per distinct point.
    ring: Vec<(u32, usize)>,
    /// Each peer's server, as an index into the distinct servers.
    server_of: Vec<usize>,
    /// Shared by the rotation among one server's peers and the fallback,
    /// as nginx shares `current_weight`.
    rotation: RoundRobin,
}

impl NginxRing {
    /// `members[i]`: peer i's server as written and its weight.
    pub fn new(members: &[(&str, u32)]) -> Self {
        let mut servers: Vec<&str> = Vec::new();
        let mut server_of = Vec::with_capacity(members.len());
        let mut ring = Vec::new();
        for &(server, weight) in members {
            let id = servers
                .iter()
                .position(|s| *s == server)
                .unwrap_or_else(|| {
                    servers.push(server);
                    servers.len() - 1
                });
            server_of.push(id);
            ring.extend(points(server, weight).map(|point| (point, id)));
        }
        // A point two servers share stays with the first in configuration
        // order (nginx's qsort leaves that order unspecified).
        ring.sort_by_key(|&(point, _)| point);
        ring.dedup_by_key(|&mut (point, _)| point);
        NginxRing {
            ring,
            server_of,
            rotation: RoundRobin::new(members.len()),
        }
    }
}

impl Algorithm for NginxRing {
    fn pick(&mut self, peers: &mut [PeerView], key: &[u8], walk: &mut Walk) -> Option<usize> {
        if self.ring.is_empty() {
            return None;
        }
        let mut point = walk.point.unwrap_or_else(|| {
            let hash = crc32(key);
            self.ring.partition_point(|&(p, _)| p < hash)
        });
        while walk.misses <= MAX_MISSES {
            let server = self.ring[point % self.ring.len()].1;
            let server_of = &self.server_of;
            if let Some(picked) = self
                .rotation
                .rotate(peers, |index, _| server_of[index] == server)
            {
                walk.point = Some(point);
                return Some(picked);
            }
            point += 1;
            walk.misses += 1;
        }
        walk.point = Some(point);
        self.rotation.rotate(peers, |_, _| true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::round_robin::tests::views;
    use super::*;

    #[test]
    fn crc32_is_the_standard_one() {
        // The check value of CRC-32/ISO-HDLC, and two more from zlib.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"192.168.0.1"), 2_307_365_224);
    }

    #[test]
    fn points_follow_nginx_derivation() {
        // Values computed independently with zlib.crc32 over
        // HOST \0 PORT LE32(previous).
        let first: Vec<u32> = points("10.0.0.1:11211", 1).take(3).collect();
        assert_eq!(first, [1_016_082_558, 3_442_865_372, 2_772_144_616]);
        let unix: Vec<u32> = points("unix:/run/m.sock", 1).take(3).collect();
        assert_eq!(unix, [4_187_258_842, 1_050_414_316, 1_890_754_691]);
        let v6: Vec<u32> = points("[::1]:80", 1).take(3).collect();
        assert_eq!(v6, [1_028_208_324, 2_639_490_794, 3_656_028_380]);
        assert_eq!(points("a:1", 3).count(), 480);
    }

    #[test]
    fn host_and_port_split_as_nginx() {
        assert_eq!(host_and_port("10.0.0.1:11211"), ("10.0.0.1", "11211"));
        assert_eq!(host_and_port("[::1]:80"), ("[::1]", "80"));
        assert_eq!(host_and_port("UNIX:/tmp/s"), ("/tmp/s", ""));
        assert_eq!(host_and_port("name"), ("name", ""));
        assert_eq!(host_and_port("h:x1"), ("h:x1", ""));
    }

    fn mapping(servers: &[&str], keys: &[String]) -> Vec<usize> {
        let members: Vec<(&str, u32)> = servers.iter().map(|s| (*s, 1)).collect();
        let mut ring = NginxRing::new(&members);
        let mut peers = views(&vec![1; servers.len()]);
        keys.iter()
            .map(|key| {
                ring.pick(&mut peers, key.as_bytes(), &mut Walk::default())
                    .unwrap()
            })
            .collect()
    }

    fn keys() -> Vec<String> {
        (0..5_000)
            .map(|n| format!("10.{}.{}.7", n / 256, n % 256))
            .collect()
    }

    #[test]
    fn a_key_maps_to_the_first_point_at_or_after_its_crc() {
        let servers = ["10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"];
        let members: Vec<(&str, u32)> = servers.iter().map(|s| (*s, 1)).collect();
        let ring = NginxRing::new(&members);
        for key in keys().iter().take(200) {
            let hash = crc32(key.as_bytes());
            let expected = ring
                .ring
                .iter()
                .find(|&&(point, _)| point >= hash)
                .unwrap_or(&ring.ring[0])
                .1;
            assert_eq!(mapping(&servers, std::slice::from_ref(key)), vec![expected]);
        }
    }

    #[test]
    fn removing_a_server_moves_only_its_keys() {
        let keys = keys();
        let five = ["a:1", "b:1", "c:1", "d:1", "e:1"];
        let four = ["a:1", "b:1", "d:1", "e:1"];
        let before = mapping(&five, &keys);
        let after = mapping(&four, &keys);
        for (old, new) in before.iter().zip(&after) {
            if five[*old] != "c:1" {
                assert_eq!(five[*old], four[*new]);
            }
        }
    }

    #[test]
    fn an_ineligible_server_hands_its_keys_to_the_next_point() {
        let servers = ["a:1", "b:1", "c:1"];
        let members: Vec<(&str, u32)> = servers.iter().map(|s| (*s, 1)).collect();
        let mut ring = NginxRing::new(&members);
        let mut peers = views(&[1, 1, 1]);
        peers[1].eligible = false;
        for key in keys().iter().take(300) {
            let mut walk = Walk::default();
            let got = ring.pick(&mut peers, key.as_bytes(), &mut walk).unwrap();
            let hash = crc32(key.as_bytes());
            let start = ring.ring.partition_point(|&(p, _)| p < hash);
            let expected = (0..ring.ring.len())
                .map(|step| ring.ring[(start + step) % ring.ring.len()].1)
                .find(|&server| server != 1)
                .unwrap();
            assert_eq!(got, expected);
            assert_eq!(
                walk.point.map(|p| ring.ring[p % ring.ring.len()].1),
                Some(got)
            );
        }
    }

    #[test]
    fn twenty_misses_fall_back_to_round_robin() {
        let servers = ["a:1", "b:1", "c:1"];
        let members: Vec<(&str, u32)> = servers.iter().map(|s| (*s, 1)).collect();
        let mut ring = NginxRing::new(&members);
        let mut peers = views(&[1, 1, 1]);
        // The walk has used up its misses: round-robin picks, in order.
        let mut walk = Walk {
            misses: MAX_MISSES + 1,
            point: Some(0),
        };
        let got: Vec<usize> = (0..3)
            .map(|_| ring.pick(&mut peers, b"k", &mut walk).unwrap())
            .collect();
        assert_eq!(got, vec![0, 1, 2]);
        for peer in &mut peers {
            peer.eligible = false;
        }
        assert_eq!(ring.pick(&mut peers, b"k", &mut Walk::default()), None);
    }

    #[test]
    fn peers_of_one_server_share_its_points_and_rotate() {
        let members = [("cache:11211", 1), ("cache:11211", 1)];
        let mut ring = NginxRing::new(&members);
        assert_eq!(ring.ring.len(), 160);
        let mut peers = views(&[1, 1]);
        let got: Vec<usize> = (0..4)
            .map(|_| ring.pick(&mut peers, b"k", &mut Walk::default()).unwrap())
            .collect();
        assert_eq!(got, vec![0, 1, 0, 1]);
    }
}
