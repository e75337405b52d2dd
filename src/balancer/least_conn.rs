//! nginx's `least_conn`: the peer with the fewest active connections relative
//! to its weight; when several tie, nginx's smooth weighted round-robin
//! (working weights included) decides among the tied peers only.

use super::{Algorithm, PeerView, RoundRobin, Walk};

pub struct LeastConn {
    /// Breaks ties; it rotates only the tied peers.
    tie_break: RoundRobin,
}

impl LeastConn {
    pub fn new(peers: usize) -> Self {
        LeastConn {
            tie_break: RoundRobin::new(peers),
        }
    }
}

/// `a.active / a.weight` compared with `b.active / b.weight`, without division.
fn load_order(a: &PeerView, b: &PeerView) -> std::cmp::Ordering {
    (u128::from(a.active) * u128::from(b.weight))
        .cmp(&(u128::from(b.active) * u128::from(a.weight)))
}

impl Algorithm for LeastConn {
    fn pick(&mut self, peers: &mut [PeerView], _key: &[u8], _walk: &mut Walk) -> Option<usize> {
        let mut least: Option<usize> = None;
        let mut tied = false;
        for (index, peer) in peers.iter().enumerate() {
            if !peer.eligible {
                continue;
            }
            match least.map(|least| load_order(peer, &peers[least])) {
                None | Some(std::cmp::Ordering::Less) => {
                    least = Some(index);
                    tied = false;
                }
                Some(std::cmp::Ordering::Equal) => tied = true,
                Some(std::cmp::Ordering::Greater) => {}
            }
        }
        let least = least?;
        if !tied {
            // nginx rotates no weight when one peer is least loaded.
            return Some(least);
        }
        let floor = peers[least];
        self.tie_break
            .rotate(peers, |_, peer| load_order(peer, &floor).is_eq())
    }
}

#[cfg(test)]
mod tests {
    use super::super::round_robin::tests::views;
    use super::*;

    fn loaded(weight: u64, active: u32) -> PeerView {
        let mut view = views(&[weight])[0];
        view.active = active;
        view
    }

    fn pick(algorithm: &mut LeastConn, peers: &mut [PeerView]) -> Option<usize> {
        algorithm.pick(peers, b"", &mut Walk::default())
    }

    #[test]
    fn fewest_active_connections_wins() {
        let mut algorithm = LeastConn::new(3);
        let mut peers = [loaded(1, 3), loaded(1, 1), loaded(1, 2)];
        assert_eq!(pick(&mut algorithm, &mut peers), Some(1));
        // One least-loaded peer: no rotation happens.
        assert!(peers.iter().all(|peer| !peer.rotated));
    }

    #[test]
    fn active_connections_are_weighed() {
        let mut algorithm = LeastConn::new(2);
        // 4 connections on weight 5 (0.8 each) beat 1 on weight 1.
        let mut peers = [loaded(5, 4), loaded(1, 1)];
        assert_eq!(pick(&mut algorithm, &mut peers), Some(0));
        // 6 on weight 5 (1.2) lose to 1 on weight 1.
        let mut peers = [loaded(5, 6), loaded(1, 1)];
        assert_eq!(pick(&mut algorithm, &mut peers), Some(1));
    }

    #[test]
    fn ties_rotate_by_weighted_round_robin_among_the_tied_only() {
        let mut algorithm = LeastConn::new(3);
        let mut peers = [loaded(2, 0), loaded(1, 0), loaded(1, 5)];
        let order: Vec<usize> = (0..8)
            .map(|_| pick(&mut algorithm, &mut peers).unwrap())
            .collect();
        assert_eq!(order, vec![0, 1, 0, 0, 1, 0, 0, 1]);
        assert!(!peers[2].rotated);
    }

    #[test]
    fn ties_rotate_by_working_weight() {
        // Weight 2 working at 0 (it just failed) ties with weight 1: the
        // rotation gives the working weight, so peer 1 goes first.
        let mut algorithm = LeastConn::new(2);
        let mut peers = [loaded(2, 0), loaded(1, 0)];
        peers[0].working = 0;
        assert_eq!(pick(&mut algorithm, &mut peers), Some(1));
    }

    #[test]
    fn connections_spread_evenly_when_held() {
        let mut algorithm = LeastConn::new(3);
        let mut peers = [loaded(1, 0), loaded(1, 0), loaded(1, 0)];
        for _ in 0..9 {
            let index = pick(&mut algorithm, &mut peers).unwrap();
            peers[index].active += 1;
        }
        assert_eq!(peers.map(|p| p.active), [3, 3, 3]);
    }

    #[test]
    fn ineligible_peers_are_skipped_even_when_least_loaded() {
        let mut algorithm = LeastConn::new(3);
        let mut peers = [loaded(1, 0), loaded(1, 4), loaded(1, 2)];
        peers[0].eligible = false;
        assert_eq!(pick(&mut algorithm, &mut peers), Some(2));
        peers[2].eligible = false;
        assert_eq!(pick(&mut algorithm, &mut peers), Some(1));
        peers[1].eligible = false;
        assert_eq!(pick(&mut algorithm, &mut peers), None);
    }
}
