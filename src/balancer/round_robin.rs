//! nginx's smooth weighted round-robin, with its working weight.

use super::{Algorithm, PeerView, Walk};

/// On each pick every eligible peer's `current` grows by its working weight;
/// the largest wins (ties: configuration order) and gives back the total.
pub struct RoundRobin {
    current: Vec<i64>,
}

impl RoundRobin {
    pub fn new(peers: usize) -> Self {
        RoundRobin {
            current: vec![0; peers],
        }
    }

    /// One rotation over the eligible peers for which `among` holds (nginx's
    /// loop in `get_peer`, which least_conn and hash run over a subset):
    /// each is marked `rotated`.
    pub(super) fn rotate(
        &mut self,
        peers: &mut [PeerView],
        among: impl Fn(usize, &PeerView) -> bool,
    ) -> Option<usize> {
        let mut total: i64 = 0;
        let mut best: Option<usize> = None;
        for (index, peer) in peers.iter_mut().enumerate() {
            if !peer.eligible || !among(index, peer) {
                continue;
            }
            let working = i64::try_from(peer.working).unwrap_or(i64::MAX);
            self.current[index] = self.current[index].saturating_add(working);
            total = total.saturating_add(working);
            peer.rotated = true;
            if best.is_none_or(|best| self.current[index] > self.current[best]) {
                best = Some(index);
            }
        }
        let best = best?;
        self.current[best] = self.current[best].saturating_sub(total);
        Some(best)
    }
}

impl Algorithm for RoundRobin {
    fn pick(&mut self, peers: &mut [PeerView], _key: &[u8], _walk: &mut Walk) -> Option<usize> {
        self.rotate(peers, |_, _| true)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub fn views(weights: &[u64]) -> Vec<PeerView> {
        weights
            .iter()
            .map(|&weight| PeerView {
                weight,
                working: weight,
                active: 0,
                eligible: true,
                rotated: false,
            })
            .collect()
    }

    fn sequence(weights: &[u64], count: usize) -> String {
        let mut peers = views(weights);
        let mut algorithm = RoundRobin::new(peers.len());
        (0..count)
            .map(|_| {
                let index = algorithm
                    .pick(&mut peers, b"", &mut Walk::default())
                    .unwrap();
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
    fn the_working_weight_is_what_rotates() {
        // Weight 3 working at 0 beside two of weight 1: nginx's order after
        // the failure of a `weight=3 max_fails=1` peer, before any climb.
        let mut peers = views(&[3, 1, 1]);
        peers[0].working = 0;
        let mut algorithm = RoundRobin::new(3);
        let index = algorithm
            .pick(&mut peers, b"", &mut Walk::default())
            .unwrap();
        assert_eq!(index, 1);
        assert!(peers.iter().all(|peer| peer.rotated));
    }

    #[test]
    fn ineligible_peers_are_skipped_and_not_rotated() {
        let mut peers = views(&[1, 1, 1]);
        peers[1].eligible = false;
        let mut algorithm = RoundRobin::new(3);
        let got: Vec<usize> = (0..4)
            .filter_map(|_| algorithm.pick(&mut peers, b"", &mut Walk::default()))
            .collect();
        assert_eq!(got, vec![0, 2, 0, 2]);
        assert!(!peers[1].rotated);
        for peer in &mut peers {
            peer.eligible = false;
        }
        assert_eq!(algorithm.pick(&mut peers, b"", &mut Walk::default()), None);
    }
}
