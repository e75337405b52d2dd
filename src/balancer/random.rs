//! `random`: a weighted random pick; `random_two`: two weighted random picks,
//! the one with fewer active connections relative to weight wins (nginx's
//! `random two least_conn`).

use super::{Algorithm, PeerView};

/// Picks an eligible peer with probability proportional to its weight,
/// leaving out `except`.
fn weighted_pick(
    rng: &mut fastrand::Rng,
    peers: &[PeerView],
    except: Option<usize>,
) -> Option<usize> {
    let candidates = || {
        peers
            .iter()
            .enumerate()
            .filter(move |&(index, peer)| peer.eligible && Some(index) != except)
    };
    let total: u64 = candidates().map(|(_, peer)| peer.weight).sum();
    if total == 0 {
        return None;
    }
    let mut point = rng.u64(..total);
    for (index, peer) in candidates() {
        if point < peer.weight {
            return Some(index);
        }
        point -= peer.weight;
    }
    None
}

/// `Default` seeds from the process's entropy.
#[derive(Default)]
pub struct Random {
    rng: fastrand::Rng,
}

impl Random {
    pub fn with_seed(seed: u64) -> Self {
        Random {
            rng: fastrand::Rng::with_seed(seed),
        }
    }
}

impl Algorithm for Random {
    fn pick(&mut self, peers: &[PeerView], _key: &[u8]) -> Option<usize> {
        weighted_pick(&mut self.rng, peers, None)
    }
}

/// `Default` seeds from the process's entropy.
#[derive(Default)]
pub struct RandomTwo {
    rng: fastrand::Rng,
}

impl RandomTwo {
    pub fn with_seed(seed: u64) -> Self {
        RandomTwo {
            rng: fastrand::Rng::with_seed(seed),
        }
    }
}

impl Algorithm for RandomTwo {
    fn pick(&mut self, peers: &[PeerView], _key: &[u8]) -> Option<usize> {
        let first = weighted_pick(&mut self.rng, peers, None)?;
        let Some(second) = weighted_pick(&mut self.rng, peers, Some(first)) else {
            return Some(first);
        };
        let (a, b) = (&peers[first], &peers[second]);
        // Fewer connections per unit of weight wins; a tie goes to the first pick.
        let second_lighter = u128::from(b.active) * u128::from(a.weight)
            < u128::from(a.active) * u128::from(b.weight);
        Some(if second_lighter { second } else { first })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views(weights: &[u64]) -> Vec<PeerView> {
        weights
            .iter()
            .map(|&weight| PeerView {
                weight,
                active: 0,
                eligible: true,
            })
            .collect()
    }

    fn counts(algorithm: &mut dyn Algorithm, peers: &[PeerView], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; peers.len()];
        for _ in 0..picks {
            counts[algorithm.pick(peers, b"").unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn random_follows_the_weights() {
        let peers = views(&[3, 1, 4]);
        let got = counts(&mut Random::with_seed(7), &peers, 80_000);
        // Expected 30k / 10k / 40k; a seeded generator, so the band is not luck:
        // it allows 2% either way, far beyond the binomial spread (~0.2%).
        for (count, expected) in got.iter().zip([30_000.0, 10_000.0, 40_000.0]) {
            let ratio = *count as f64 / expected;
            assert!((0.98..1.02).contains(&ratio), "{got:?}");
        }
    }

    #[test]
    fn random_is_reproducible_from_a_seed() {
        let peers = views(&[1, 1, 1]);
        let first = counts(&mut Random::with_seed(42), &peers, 100);
        let second = counts(&mut Random::with_seed(42), &peers, 100);
        assert_eq!(first, second);
    }

    #[test]
    fn random_never_picks_an_ineligible_peer() {
        let mut peers = views(&[1, 5, 1]);
        peers[1].eligible = false;
        let got = counts(&mut Random::with_seed(1), &peers, 1000);
        assert_eq!(got[1], 0);
        assert_eq!(got[0] + got[2], 1000);
        for peer in &mut peers {
            peer.eligible = false;
        }
        assert_eq!(Random::with_seed(1).pick(&peers, b""), None);
    }

    #[test]
    fn random_two_prefers_the_less_loaded_of_its_picks() {
        let mut peers = views(&[1, 1]);
        peers[0].active = 3;
        // With two peers the two picks are always both of them: the lighter wins.
        let got = counts(&mut RandomTwo::with_seed(3), &peers, 200);
        assert_eq!(got, vec![0, 200]);
        // Load is weighed: 3 on weight 4 is lighter than 1 on weight 1.
        peers[0].weight = 4;
        peers[1].active = 1;
        let got = counts(&mut RandomTwo::with_seed(3), &peers, 200);
        assert_eq!(got, vec![200, 0]);
    }

    #[test]
    fn random_two_never_picks_the_most_loaded_of_three() {
        let mut peers = views(&[1, 1, 1]);
        peers[2].active = 10;
        let got = counts(&mut RandomTwo::with_seed(9), &peers, 3000);
        assert_eq!(got[2], 0);
        // Peer 0 and 1 tie; each is the first pick about half the time.
        for count in &got[..2] {
            assert!((1350..1650).contains(count), "{got:?}");
        }
    }

    #[test]
    fn random_two_with_one_eligible_peer_picks_it() {
        let mut peers = views(&[1, 1, 1]);
        peers[0].eligible = false;
        peers[2].eligible = false;
        assert_eq!(
            counts(&mut RandomTwo::with_seed(5), &peers, 10),
            vec![0, 10, 0]
        );
    }
}
