//! nginx's `least_conn`: the peer with the fewest active connections relative
//! to its weight; ties are broken by smooth weighted round-robin among the
//! tied peers.

use super::{Algorithm, PeerView, RoundRobin};

pub struct LeastConn {
    /// Breaks ties: only the tied peers are eligible in the views it sees.
    tie_break: RoundRobin,
}

impl LeastConn {
    pub fn new(peers: usize) -> Self {
        LeastConn {
            tie_break: RoundRobin::new(peers),
        }
    }
}

/// Whether `a` carries fewer connections per unit of weight than `b`
/// (`a.active / a.weight < b.active / b.weight`, without division).
fn less_loaded(a: &PeerView, b: &PeerView) -> bool {
    u128::from(a.active) * u128::from(b.weight) < u128::from(b.active) * u128::from(a.weight)
}

fn equally_loaded(a: &PeerView, b: &PeerView) -> bool {
    u128::from(a.active) * u128::from(b.weight) == u128::from(b.active) * u128::from(a.weight)
}

impl Algorithm for LeastConn {
    fn pick(&mut self, peers: &[PeerView], key: &[u8]) -> Option<usize> {
        let mut least: Option<usize> = None;
        let mut tied = 0;
        for (index, peer) in peers.iter().enumerate() {
            if !peer.eligible {
                continue;
            }
            match least {
                Some(best) if equally_loaded(peer, &peers[best]) => tied += 1,
                Some(best) if !less_loaded(peer, &peers[best]) => {}
                _ => {
                    least = Some(index);
                    tied = 1;
                }
            }
        }
        let least = least?;
        if tied == 1 {
            return Some(least);
        }
        let tied: Vec<PeerView> = peers
            .iter()
            .map(|peer| PeerView {
                eligible: peer.eligible && equally_loaded(peer, &peers[least]),
                ..*peer
            })
            .collect();
        self.tie_break.pick(&tied, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(weight: u64, active: u32) -> PeerView {
        PeerView {
            weight,
            active,
            eligible: true,
        }
    }

    #[test]
    fn fewest_active_connections_wins() {
        let mut algorithm = LeastConn::new(3);
        let peers = [view(1, 3), view(1, 1), view(1, 2)];
        assert_eq!(algorithm.pick(&peers, b""), Some(1));
    }

    #[test]
    fn active_connections_are_weighed() {
        let mut algorithm = LeastConn::new(2);
        // 4 connections on weight 5 (0.8 each) beat 1 on weight 1.
        let peers = [view(5, 4), view(1, 1)];
        assert_eq!(algorithm.pick(&peers, b""), Some(0));
        // 6 on weight 5 (1.2) lose to 1 on weight 1.
        let peers = [view(5, 6), view(1, 1)];
        assert_eq!(algorithm.pick(&peers, b""), Some(1));
    }

    #[test]
    fn ties_rotate_by_weighted_round_robin() {
        let mut algorithm = LeastConn::new(3);
        let peers = [view(2, 0), view(1, 0), view(1, 5)];
        let order: Vec<usize> = (0..8)
            .map(|_| algorithm.pick(&peers, b"").unwrap())
            .collect();
        assert_eq!(order, vec![0, 1, 0, 0, 1, 0, 0, 1]);
    }

    #[test]
    fn connections_spread_evenly_when_held() {
        let mut algorithm = LeastConn::new(3);
        let mut peers = [view(1, 0), view(1, 0), view(1, 0)];
        for _ in 0..9 {
            let index = algorithm.pick(&peers, b"").unwrap();
            peers[index].active += 1;
        }
        assert_eq!(peers.map(|p| p.active), [3, 3, 3]);
    }

    #[test]
    fn ineligible_peers_are_skipped_even_when_least_loaded() {
        let mut algorithm = LeastConn::new(3);
        let mut peers = [view(1, 0), view(1, 4), view(1, 2)];
        peers[0].eligible = false;
        assert_eq!(algorithm.pick(&peers, b""), Some(2));
        peers[2].eligible = false;
        assert_eq!(algorithm.pick(&peers, b""), Some(1));
        peers[1].eligible = false;
        assert_eq!(algorithm.pick(&peers, b""), None);
    }
}
