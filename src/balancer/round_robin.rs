//! nginx's smooth weighted round-robin.

use super::{Algorithm, PeerView};

/// On each pick every eligible peer's `current` grows by its weight; the
/// largest wins (ties: configuration order) and gives back the total.
pub struct RoundRobin {
    current: Vec<i64>,
}

impl RoundRobin {
    pub fn new(peers: usize) -> Self {
        RoundRobin {
            current: vec![0; peers],
        }
    }
}

impl Algorithm for RoundRobin {
    fn pick(&mut self, peers: &[PeerView], _key: &[u8]) -> Option<usize> {
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (index, peer) in peers.iter().enumerate() {
            if !peer.eligible {
                continue;
            }
            let weight = i64::try_from(peer.weight).unwrap_or(i64::MAX);
            self.current[index] += weight;
            total += weight;
            if best.is_none_or(|best| self.current[index] > self.current[best]) {
                best = Some(index);
            }
        }
        let best = best?;
        self.current[best] -= total;
        Some(best)
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

    fn sequence(weights: &[u64], count: usize) -> String {
        let peers = views(weights);
        let mut algorithm = RoundRobin::new(peers.len());
        (0..count)
            .map(|_| {
                let index = algorithm.pick(&peers, b"").unwrap();
                char::from(b'a' + index as u8)
            })
            .collect()
    }

    #[test]
    fn weights_5_1_1_give_the_nginx_order() {
        assert_eq!(sequence(&[5, 1, 1], 7), "aabacaa");
        assert_eq!(sequence(&[5, 1, 1], 14), "aabacaaaabacaa");
    }

    #[test]
    fn every_window_of_the_total_splits_exactly_by_weight() {
        let weights = [5, 1, 1];
        let picks = sequence(&weights, 70);
        for start in 0..=(70 - 7) {
            let window = &picks[start..start + 7];
            for (index, &weight) in weights.iter().enumerate() {
                let letter = char::from(b'a' + index as u8);
                assert_eq!(window.matches(letter).count(), weight as usize, "{window}");
            }
        }
    }

    #[test]
    fn equal_weights_alternate_in_configuration_order() {
        assert_eq!(sequence(&[1, 1, 1], 6), "abcabc");
    }

    #[test]
    fn ineligible_peers_are_skipped() {
        let mut peers = views(&[1, 1, 1]);
        peers[1].eligible = false;
        let mut algorithm = RoundRobin::new(3);
        let got: Vec<usize> = (0..4).filter_map(|_| algorithm.pick(&peers, b"")).collect();
        assert_eq!(got, vec![0, 2, 0, 2]);
        for peer in &mut peers {
            peer.eligible = false;
        }
        assert_eq!(algorithm.pick(&peers, b""), None);
    }
}
