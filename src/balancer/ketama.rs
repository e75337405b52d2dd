//! `hash` with `hash_ring = "ketama"`: libmemcached's ketama consistent hashing. Every peer owns 160 points per unit of
//! weight on a ring of 32-bit values; a key maps to the first point at or
//! after its own hash. Points derive from the peer's identity (its address),
//! not its position, so adding or removing one of N peers moves only the keys
//! whose points it gains or loses: about 1/N of them.

use md5::{Digest, Md5};

use super::{Algorithm, PeerView, Walk};

/// Ring points per unit of weight, as in libketama.
const POINTS_PER_WEIGHT: u32 = 160;
/// One MD5 digest gives four 32-bit points.
const POINTS_PER_DIGEST: u32 = 4;

pub struct Ketama {
    /// `(point, peer index)`, sorted by point (then identity, for determinism).
    ring: Vec<(u32, usize)>,
}

impl Ketama {
    /// `members[i]`: peer i's identity (its resolved address, stable across
    /// rebuilds) and its weight.
    pub fn new(members: &[(&str, u32)]) -> Self {
        let mut ring: Vec<(u32, usize)> = Vec::new();
        for (index, &(identity, weight)) in members.iter().enumerate() {
            let digests = weight.saturating_mul(POINTS_PER_WEIGHT) / POINTS_PER_DIGEST;
            for digest_index in 0..digests {
                let digest = Md5::digest(format!("{identity}-{digest_index}"));
                for chunk in digest.chunks_exact(4) {
                    let point = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    ring.push((point, index));
                }
            }
        }
        ring.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| members[a.1].0.cmp(members[b.1].0))
        });
        Ketama { ring }
    }
}

/// A key's position on the ring: the first four bytes of its MD5, as libketama does.
fn key_point(key: &[u8]) -> u32 {
    let digest = Md5::digest(key);
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

impl Algorithm for Ketama {
    fn pick(&mut self, peers: &mut [PeerView], key: &[u8], _walk: &mut Walk) -> Option<usize> {
        if self.ring.is_empty() {
            return None;
        }
        let point = key_point(key);
        let start = self.ring.partition_point(|&(p, _)| p < point);
        // Walk on from the mapped point to the first one whose peer can take
        // the connection; stop after one turn.
        (0..self.ring.len())
            .map(|step| self.ring[(start + step) % self.ring.len()].1)
            .find(|&index| peers.get(index).is_some_and(|peer| peer.eligible))
    }
}

#[cfg(test)]
mod tests {
    use super::super::round_robin::tests::views;
    use super::*;

    fn ring(addresses: &[String]) -> Ketama {
        let members: Vec<(&str, u32)> = addresses.iter().map(|a| (a.as_str(), 1)).collect();
        Ketama::new(&members)
    }

    fn addresses(count: usize) -> Vec<String> {
        (1..=count).map(|n| format!("10.0.0.{n}:11211")).collect()
    }

    fn eligible(count: usize) -> Vec<PeerView> {
        views(&vec![1; count])
    }

    /// Maps `keys` to peer identities.
    fn mapping(addresses: &[String], keys: &[Vec<u8>]) -> Vec<String> {
        let mut hash = ring(addresses);
        let mut peers = eligible(addresses.len());
        keys.iter()
            .map(|key| addresses[hash.pick(&mut peers, key, &mut Walk::default()).unwrap()].clone())
            .collect()
    }

    fn keys() -> Vec<Vec<u8>> {
        (0..10_000)
            .map(|n| format!("192.168.{}.{}", n / 256, n % 256).into_bytes())
            .collect()
    }

    #[test]
    fn each_weight_unit_owns_160_points() {
        let hash = Ketama::new(&[("a:1", 1), ("b:1", 3)]);
        let owned = |index| hash.ring.iter().filter(|&&(_, i)| i == index).count();
        assert_eq!((owned(0), owned(1)), (160, 480));
        assert!(hash.ring.windows(2).all(|pair| pair[0].0 <= pair[1].0));
    }

    #[test]
    fn the_same_key_always_maps_to_the_same_peer() {
        let peers = addresses(5);
        let keys = keys();
        assert_eq!(mapping(&peers, &keys), mapping(&peers, &keys));
        // The configuration order does not matter either: points follow identities.
        let mut reversed = peers.clone();
        reversed.reverse();
        assert_eq!(mapping(&peers, &keys), mapping(&reversed, &keys));
    }

    #[test]
    fn keys_spread_over_every_peer() {
        let peers = addresses(5);
        let got = mapping(&peers, &keys());
        for peer in &peers {
            let share = got.iter().filter(|p| *p == peer).count();
            // 2,000 each on average; 800 points per ring keep arcs within a few tens of percent.
            assert!((1_200..2_800).contains(&share), "{peer}: {share}");
        }
    }

    #[test]
    fn adding_a_sixth_peer_moves_about_a_sixth_of_the_keys_only_to_it() {
        let keys = keys();
        let five = addresses(5);
        let six = addresses(6);
        let before = mapping(&five, &keys);
        let after = mapping(&six, &keys);
        let mut moved = 0;
        for (old, new) in before.iter().zip(&after) {
            if old != new {
                moved += 1;
                assert_eq!(new, &six[5], "a key moved between two old peers");
            }
        }
        let fraction = moved as f64 / keys.len() as f64;
        assert!((0.10..0.25).contains(&fraction), "moved {fraction}");
    }

    #[test]
    fn removing_one_of_five_peers_moves_only_its_keys() {
        let keys = keys();
        let five = addresses(5);
        let four: Vec<String> = five.iter().filter(|a| *a != &five[2]).cloned().collect();
        let before = mapping(&five, &keys);
        let after = mapping(&four, &keys);
        let mut moved = 0;
        for (old, new) in before.iter().zip(&after) {
            if old != new {
                moved += 1;
                assert_eq!(old, &five[2], "a key of a remaining peer moved");
            }
        }
        assert_eq!(moved, before.iter().filter(|p| *p == &five[2]).count());
        let fraction = moved as f64 / keys.len() as f64;
        assert!((0.12..0.30).contains(&fraction), "moved {fraction}");
    }

    #[test]
    fn an_ineligible_peer_hands_its_keys_to_the_next_point() {
        let five = addresses(5);
        let keys = keys();
        let mut hash = ring(&five);
        let mut peers = eligible(5);
        let mut pick =
            |peers: &mut [PeerView], key: &[u8]| hash.pick(peers, key, &mut Walk::default());
        let before: Vec<usize> = keys.iter().map(|k| pick(&mut peers, k).unwrap()).collect();
        peers[3].eligible = false;
        let after: Vec<usize> = keys.iter().map(|k| pick(&mut peers, k).unwrap()).collect();
        // The same remapping as removing the peer from the ring.
        let four: Vec<String> = five.iter().filter(|a| *a != &five[3]).cloned().collect();
        let removed = mapping(&four, &keys);
        for ((old, new), expected) in before.iter().zip(&after).zip(&removed) {
            assert_ne!(*new, 3);
            if *old != 3 {
                assert_eq!(old, new);
            }
            assert_eq!(&five[*new], expected);
        }
        for peer in &mut peers {
            peer.eligible = false;
        }
        assert_eq!(pick(&mut peers, b"k"), None);
    }
}
