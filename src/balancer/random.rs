//! `random` and `random_two` (nginx's `random` and `random two least_conn`).
//!
//! As nginx: a draw picks among every peer by configured weight, and a draw
//! that lands on a peer that cannot be used is a miss; after 20 misses in one
//! client connection round-robin picks instead. `random_two` draws two
//! distinct usable peers and takes the second unless it carries more
//! connections per unit of weight than the first.

use super::{Algorithm, PeerView, RoundRobin, Walk, MAX_MISSES};

/// One weighted draw over every peer, eligible or not.
fn draw(rng: &mut fastrand::Rng, peers: &[PeerView]) -> Option<usize> {
    let total: u64 = peers.iter().map(|peer| peer.weight).sum();
    if total == 0 {
        return None;
    }
    let mut point = rng.u64(..total);
    for (index, peer) in peers.iter().enumerate() {
        if point < peer.weight {
            return Some(index);
        }
        point -= peer.weight;
    }
    None
}

pub struct Random {
    rng: fastrand::Rng,
    /// After too many misses, as nginx.
    fallback: RoundRobin,
}

impl Random {
    /// Seeded from the process's entropy.
    pub fn new(peers: usize) -> Self {
        Random::with_rng(peers, fastrand::Rng::new())
    }

    pub fn with_seed(peers: usize, seed: u64) -> Self {
        Random::with_rng(peers, fastrand::Rng::with_seed(seed))
    }

    fn with_rng(peers: usize, rng: fastrand::Rng) -> Self {
        Random {
            rng,
            fallback: RoundRobin::new(peers),
        }
    }
}

impl Algorithm for Random {
    fn pick(&mut self, peers: &mut [PeerView], _key: &[u8], walk: &mut Walk) -> Option<usize> {
        while walk.misses <= MAX_MISSES {
            let index = draw(&mut self.rng, peers)?;
            if peers[index].eligible {
                return Some(index);
            }
            walk.misses += 1;
        }
        self.fallback.rotate(peers, |_, _| true)
    }
}

pub struct RandomTwo {
    rng: fastrand::Rng,
    fallback: RoundRobin,
}

impl RandomTwo {
    /// Seeded from the process's entropy.
    pub fn new(peers: usize) -> Self {
        RandomTwo::with_rng(peers, fastrand::Rng::new())
    }

    pub fn with_seed(peers: usize, seed: u64) -> Self {
        RandomTwo::with_rng(peers, fastrand::Rng::with_seed(seed))
    }

    fn with_rng(peers: usize, rng: fastrand::Rng) -> Self {
        RandomTwo {
            rng,
            fallback: RoundRobin::new(peers),
        }
    }
}

/// Whether `a` carries more connections per unit of weight than `b`.
fn more_loaded(a: &PeerView, b: &PeerView) -> bool {
    u128::from(a.active) * u128::from(b.weight) > u128::from(b.active) * u128::from(a.weight)
}

impl Algorithm for RandomTwo {
    fn pick(&mut self, peers: &mut [PeerView], _key: &[u8], walk: &mut Walk) -> Option<usize> {
        let mut first: Option<usize> = None;
        while walk.misses <= MAX_MISSES {
            let index = draw(&mut self.rng, peers)?;
            if Some(index) != first && peers[index].eligible {
                if let Some(first) = first {
                    let second = index;
                    return Some(if more_loaded(&peers[second], &peers[first]) {
                        first
                    } else {
                        second
                    });
                }
                first = Some(index);
            }
            // nginx counts the first good draw as a try too.
            walk.misses += 1;
        }
        self.fallback.rotate(peers, |_, _| true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::round_robin::tests::views;
    use super::*;

    fn counts(algorithm: &mut dyn Algorithm, peers: &mut [PeerView], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; peers.len()];
        for _ in 0..picks {
            counts[algorithm.pick(peers, b"", &mut Walk::default()).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn random_follows_the_weights() {
        let mut peers = views(&[3, 1, 4]);
        let got = counts(&mut Random::with_seed(3, 7), &mut peers, 80_000);
        // Expected 30k / 10k / 40k; a seeded generator, so the band is not luck:
        // it allows 2% either way, far beyond the binomial spread (~0.2%).
        for (count, expected) in got.iter().zip([30_000.0, 10_000.0, 40_000.0]) {
            let ratio = *count as f64 / expected;
            assert!((0.98..1.02).contains(&ratio), "{got:?}");
        }
    }

    #[test]
    fn random_is_reproducible_from_a_seed() {
        let mut peers = views(&[1, 1, 1]);
        let first = counts(&mut Random::with_seed(3, 42), &mut peers, 100);
        let second = counts(&mut Random::with_seed(3, 42), &mut peers, 100);
        assert_eq!(first, second);
    }

    #[test]
    fn random_never_picks_an_ineligible_peer() {
        let mut peers = views(&[1, 5, 1]);
        peers[1].eligible = false;
        let got = counts(&mut Random::with_seed(3, 1), &mut peers, 1000);
        assert_eq!(got[1], 0);
        assert_eq!(got[0] + got[2], 1000);
        for peer in &mut peers {
            peer.eligible = false;
        }
        let mut random = Random::with_seed(3, 1);
        assert_eq!(random.pick(&mut peers, b"", &mut Walk::default()), None);
    }

    #[test]
    fn random_falls_back_to_round_robin_after_twenty_misses() {
        // One eligible peer of weight 1 among weight 1000: a draw almost
        // always misses, so round-robin (which only sees peer 1) decides.
        let mut peers = views(&[1000, 1]);
        peers[0].eligible = false;
        let mut random = Random::with_seed(2, 5);
        let mut walk = Walk::default();
        assert_eq!(random.pick(&mut peers, b"", &mut walk), Some(1));
        assert_eq!(walk.misses, MAX_MISSES + 1);
        assert!(peers[1].rotated);
    }

    #[test]
    fn random_two_prefers_the_less_loaded_of_its_picks() {
        let mut peers = views(&[1, 1]);
        peers[0].active = 3;
        // With two peers the two picks are always both of them: the lighter wins.
        let got = counts(&mut RandomTwo::with_seed(2, 3), &mut peers, 200);
        assert_eq!(got, vec![0, 200]);
    }

    #[test]
    fn random_two_weighs_the_load() {
        // 3 on weight 4 is lighter than 1 on weight 1 (weights this far
        // apart make a draw miss often, so the comparison is tested alone).
        let mut peers = views(&[4, 1]);
        peers[0].active = 3;
        peers[1].active = 1;
        assert!(more_loaded(&peers[1], &peers[0]));
        assert!(!more_loaded(&peers[0], &peers[1]));
        peers[1].active = 0;
        assert!(more_loaded(&peers[0], &peers[1]));
    }

    #[test]
    fn random_two_gives_a_tie_to_the_second_pick() {
        // Equal loads: nginx keeps the second draw, so with two peers the
        // pick is whichever was drawn second; over many picks both appear,
        // and each pick equals the second of its two draws.
        let mut peers = views(&[1, 1]);
        let mut algorithm = RandomTwo::with_seed(2, 11);
        let mut replay = fastrand::Rng::with_seed(11);
        for _ in 0..50 {
            let mut walk = Walk::default();
            let picked = algorithm.pick(&mut peers, b"", &mut walk).unwrap();
            let first = draw(&mut replay, &peers).unwrap();
            let second = loop {
                let index = draw(&mut replay, &peers).unwrap();
                if index != first {
                    break index;
                }
            };
            assert_eq!(picked, second);
        }
    }

    #[test]
    fn random_two_never_picks_the_most_loaded_of_three() {
        let mut peers = views(&[1, 1, 1]);
        peers[2].active = 10;
        let got = counts(&mut RandomTwo::with_seed(3, 9), &mut peers, 3000);
        assert_eq!(got[2], 0);
        for count in &got[..2] {
            assert!((1350..1650).contains(count), "{got:?}");
        }
    }

    #[test]
    fn random_two_with_one_eligible_peer_picks_it_by_round_robin() {
        let mut peers = views(&[1, 1, 1]);
        peers[0].eligible = false;
        peers[2].eligible = false;
        assert_eq!(
            counts(&mut RandomTwo::with_seed(3, 5), &mut peers, 10),
            vec![0, 10, 0]
        );
    }
}
