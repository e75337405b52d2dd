//! Peer selection with nginx `upstream` semantics (nginx 1.22's stream
//! modules), as pure logic over peer state: no I/O, time passed in, so every
//! rule is unit-tested here. The judge of these rules is real nginx:
//! `tests/nginx_parity.rs` drives both on the same servers.
//!
//! The [`Selector`] owns what is common to every method (down, max_conns,
//! max_fails/fail_timeout, the backup tier, the peers one client connection
//! has tried, the single-server group); an [`Algorithm`] only chooses among
//! the peers it is told are eligible.

mod health;
mod ketama;
mod least_conn;
mod nginx_ring;
mod random;
mod round_robin;
mod slow_start;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use health::{CheckTransition, PeerHealth};
pub use ketama::Ketama;
pub use least_conn::LeastConn;
pub use nginx_ring::NginxRing;
pub use random::{Random, RandomTwo};
pub use round_robin::RoundRobin;
pub use slow_start::{effective_weight, WEIGHT_SCALE};

/// A balancing method (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    RoundRobin,
    LeastConn,
    Random,
    RandomTwo,
    Hash(Ring),
}

/// Which consistent-hash ring `hash` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// nginx's `hash ... consistent`: CRC32 points of the server as written.
    Nginx,
    /// libmemcached's ketama: MD5 points of the resolved address.
    Ketama,
}

/// What the selector needs to know of one peer; fixed for a configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerParams {
    pub weight: u32,
    /// `0`: unlimited.
    pub max_conns: u32,
    /// `0`: never mark failed.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub backup: bool,
    pub down: bool,
    /// Zero: no slow start.
    pub slow_start: Duration,
}

/// How one peer is named, for the hash rings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The server's address as written in the configuration (nginx's ring
    /// hashes it; every address of one host name shares it).
    pub server: String,
    /// The peer's resolved address, `IP:PORT` or `unix:/path` (the ketama ring's).
    pub address: String,
}

/// One peer as an algorithm sees it at the moment of a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    /// The configured weight (ramped by slow start), in [`WEIGHT_SCALE`] units.
    pub weight: u64,
    /// nginx's working weight (`effective_weight`) in the same units: the
    /// weight lowered by failures, never above `weight`.
    pub working: u64,
    pub active: u32,
    pub eligible: bool,
    /// Set by an algorithm that added the peer's working weight to a
    /// rotation: nginx then raises a lowered working weight by one.
    pub rotated: bool,
}

/// Where one client connection's hash or random picks stand, kept across
/// its attempts as nginx keeps them per session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Walk {
    /// Draws or ring points that gave no eligible peer (nginx's `tries` of
    /// the hash and random modules); past 20, round-robin decides.
    pub misses: u32,
    /// The ring point the last hash pick stopped at.
    pub point: Option<usize>,
}

/// nginx's hash and random modules give up after this many misses and let
/// round-robin pick.
pub const MAX_MISSES: u32 = 20;

/// A balancing method. Implementations keep their own per-peer state, indexed
/// like the peer slice they are given (which is stable for their lifetime).
pub trait Algorithm: Send {
    /// Picks one of the peers whose `eligible` is true, or `None` if there
    /// is none. `key` is the client's hash key, for methods that use one;
    /// `walk` is this client connection's state across its attempts.
    fn pick(&mut self, peers: &mut [PeerView], key: &[u8], walk: &mut Walk) -> Option<usize>;
}

/// Builds the algorithm for a method over these peers, in order.
pub fn algorithm_for(
    method: Method,
    identities: &[PeerIdentity],
    params: &[PeerParams],
) -> Box<dyn Algorithm> {
    let peers = params.len();
    match method {
        Method::RoundRobin => Box::new(RoundRobin::new(peers)),
        Method::LeastConn => Box::new(LeastConn::new(peers)),
        Method::Random => Box::new(Random::new(peers)),
        Method::RandomTwo => Box::new(RandomTwo::new(peers)),
        Method::Hash(Ring::Nginx) => {
            let members: Vec<(&str, u32)> = identities
                .iter()
                .zip(params)
                .map(|(identity, params)| (identity.server.as_str(), params.weight))
                .collect();
            Box::new(NginxRing::new(&members))
        }
        Method::Hash(Ring::Ketama) => {
            let members: Vec<(&str, u32)> = identities
                .iter()
                .zip(params)
                .map(|(identity, params)| (identity.address.as_str(), params.weight))
                .collect();
            Box::new(Ketama::new(&members))
        }
    }
}

/// How a peer stands, for `/status` and `server_up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Up,
    /// Marked failed by `max_fails`, or unhealthy by active health checks.
    Failed,
    Down,
}

/// The peers of one upstream group: their parameters, their shared health,
/// and the method that picks among them.
pub struct Selector {
    params: Vec<PeerParams>,
    health: Vec<Arc<PeerHealth>>,
    algorithm: Box<dyn Algorithm>,
    /// nginx's `single`: one peer and no backup. It is picked whenever it is
    /// not down or full, and its failures are never counted.
    single: bool,
    /// Reused by every pick, so a pick allocates nothing.
    views: Vec<PeerView>,
}

/// What one client connection carries from attempt to attempt: the peers it
/// has tried, so next-upstream never repeats one, and its hash/random walk.
#[derive(Debug, Clone, Default)]
pub struct Tried {
    bits: Vec<u64>,
    walk: Walk,
    /// No primary could be picked once: from then on only backups are (as
    /// nginx moves the connection to its backup list).
    backups_only: bool,
}

impl Tried {
    pub fn insert(&mut self, index: usize) {
        let (word, bit) = (index / 64, index % 64);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        self.bits[word] |= 1 << bit;
    }

    pub fn contains(&self, index: usize) -> bool {
        self.bits
            .get(index / 64)
            .is_some_and(|word| word & (1 << (index % 64)) != 0)
    }
}

/// Whether a new connection could be given to a peer in this state.
fn is_eligible(params: &PeerParams, active: u32, out_of_rotation: bool) -> bool {
    let full = params.max_conns > 0 && active >= params.max_conns;
    !(params.down || full || out_of_rotation)
}

impl Selector {
    /// `health[i]` is peer i's state, fresh or kept from a previous group.
    pub fn new(
        mut params: Vec<PeerParams>,
        health: Vec<Arc<PeerHealth>>,
        algorithm: Box<dyn Algorithm>,
    ) -> Self {
        debug_assert_eq!(params.len(), health.len());
        let single = params.len() == 1 && !params[0].backup;
        if single {
            // As nginx: a failure of the only server is never counted.
            params[0].max_fails = 0;
        }
        Selector {
            views: Vec::with_capacity(params.len()),
            params,
            health,
            algorithm,
            single,
        }
    }

    /// A selector running `method` over these peers.
    pub fn for_method(
        method: Method,
        identities: &[PeerIdentity],
        params: Vec<PeerParams>,
        health: Vec<Arc<PeerHealth>>,
    ) -> Self {
        let algorithm = algorithm_for(method, identities, &params);
        Selector::new(params, health, algorithm)
    }

    /// Picks a peer for a new attempt of the client connection `tried`
    /// belongs to, counts it active and records it as tried; the caller must
    /// report the outcome on [`Selector::health`] with the peer's
    /// [`Selector::params`]: `failed`, or `connected` and later `closed`.
    /// Backups are used only when no primary is eligible.
    pub fn select(&mut self, now: Instant, tried: &mut Tried, key: &[u8]) -> Option<usize> {
        let picked = if self.single {
            self.pick_single(now, tried)
        } else {
            let primary = if tried.backups_only {
                None
            } else {
                self.pick_tier(now, tried, key, false)
            };
            primary.or_else(|| {
                tried.backups_only = true;
                self.pick_tier(now, tried, key, true)
            })
        }?;
        self.health[picked].picked(&self.params[picked], now);
        tried.insert(picked);
        Some(picked)
    }

    /// nginx's `single` path: the peer unless it is down, full, unhealthy
    /// by active checks, or already tried by this connection.
    fn pick_single(&self, now: Instant, tried: &Tried) -> Option<usize> {
        let params = &self.params[0];
        let health = self.health[0].snapshot(params, now);
        (!tried.contains(0) && is_eligible(params, health.active, health.unhealthy)).then_some(0)
    }

    fn pick_tier(
        &mut self,
        now: Instant,
        tried: &mut Tried,
        key: &[u8],
        backup: bool,
    ) -> Option<usize> {
        self.views.clear();
        let mut any = false;
        for (index, (params, health)) in self.params.iter().zip(&self.health).enumerate() {
            let health = health.snapshot(params, now);
            let eligible = params.backup == backup
                && !tried.contains(index)
                && is_eligible(params, health.active, health.failed || health.unhealthy);
            any |= eligible;
            let weight =
                effective_weight(params.weight, params.slow_start, health.recovered_at, now);
            let working = u64::from(params.weight.saturating_sub(health.deficit)) * WEIGHT_SCALE;
            self.views.push(PeerView {
                weight,
                working: working.min(weight),
                active: health.active,
                eligible,
                rotated: false,
            });
        }
        if !any {
            return None;
        }
        let picked = self.algorithm.pick(&mut self.views, key, &mut tried.walk);
        for (index, view) in self.views.iter().enumerate() {
            let full = u64::from(self.params[index].weight) * WEIGHT_SCALE;
            if view.rotated && view.working < full {
                self.health[index].raise_working_weight();
            }
        }
        picked
    }

    pub fn state(&self, index: usize, now: Instant) -> PeerState {
        let params = &self.params[index];
        let health = self.health[index].snapshot(params, now);
        if params.down {
            PeerState::Down
        } else if health.failed || health.unhealthy {
            PeerState::Failed
        } else {
            PeerState::Up
        }
    }

    /// Peer `index`'s shared state, to report outcomes on.
    pub fn health(&self, index: usize) -> &Arc<PeerHealth> {
        &self.health[index]
    }

    /// Peer `index`'s parameters as this group applies them (a single
    /// server's `max_fails` is 0).
    pub fn params(&self, index: usize) -> PeerParams {
        self.params[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn params(weight: u32) -> PeerParams {
        PeerParams {
            weight,
            max_conns: 0,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            backup: false,
            down: false,
            slow_start: Duration::ZERO,
        }
    }

    pub(crate) fn round_robin(params: Vec<PeerParams>) -> Selector {
        let algorithm = Box::new(RoundRobin::new(params.len()));
        let health = params.iter().map(|_| Arc::default()).collect();
        Selector::new(params, health, algorithm)
    }

    /// Picks a peer at `now` for a new client connection and fails the attempt.
    pub(crate) fn fail_one(selector: &mut Selector, now: Instant) -> usize {
        let index = selector.select(now, &mut Tried::default(), b"").unwrap();
        selector.health(index).failed(&selector.params(index), now);
        index
    }

    /// A connection that has tried every other peer picks `index`, and the
    /// attempt fails.
    pub(crate) fn fail_at(selector: &mut Selector, index: usize, now: Instant) {
        let mut tried = Tried::default();
        (0..selector.params.len())
            .filter(|&other| other != index)
            .for_each(|other| tried.insert(other));
        assert_eq!(selector.select(now, &mut tried, b""), Some(index));
        selector.health(index).failed(&selector.params(index), now);
    }

    /// A whole successful connection to `index` at `now`: connected, then closed.
    pub(crate) fn serve(selector: &Selector, index: usize, now: Instant) {
        selector.health(index).connected(now);
        selector.health(index).closed();
    }

    /// Picks `count` times, each a connection that succeeds and closes, and
    /// returns the indices.
    pub(crate) fn picks(selector: &mut Selector, now: Instant, count: usize) -> Vec<usize> {
        (0..count)
            .map(|_| {
                let index = selector.select(now, &mut Tried::default(), b"").unwrap();
                serve(selector, index, now);
                index
            })
            .collect()
    }

    /// One client connection: tries peers until one is not in `dead`;
    /// returns every peer tried, in order.
    fn connection(selector: &mut Selector, now: Instant, dead: &[usize]) -> Vec<usize> {
        let mut tried = Tried::default();
        let mut order = Vec::new();
        while let Some(index) = selector.select(now, &mut tried, b"") {
            order.push(index);
            if dead.contains(&index) {
                selector.health(index).failed(&selector.params(index), now);
            } else {
                serve(selector, index, now);
                break;
            }
        }
        order
    }

    #[test]
    fn down_peer_is_never_picked() {
        let mut down = params(1);
        down.down = true;
        let mut selector = round_robin(vec![params(1), down, params(1)]);
        let got = picks(&mut selector, Instant::now(), 10);
        assert!(!got.contains(&1));
        assert_eq!(selector.state(1, Instant::now()), PeerState::Down);
    }

    #[test]
    fn a_failed_attempt_lowers_the_working_weight_which_climbs_back_per_pick() {
        // nginx with `s0 weight=3 max_fails=3` refusing beside two healthy
        // peers tries s0 at connections 1, 3 and 5, then no more: its
        // working weight drops by 3/3 per failure and climbs by 1 per pick.
        let mut dead = params(3);
        dead.max_fails = 3;
        let mut selector = round_robin(vec![dead, params(1), params(1)]);
        let now = Instant::now();
        let tries: Vec<Vec<usize>> = (0..8)
            .map(|_| connection(&mut selector, now, &[0]))
            .collect();
        assert_eq!(
            tries,
            vec![
                vec![0, 1],
                vec![2],
                vec![0, 1],
                vec![1],
                vec![0, 2],
                vec![2],
                vec![1],
                vec![2]
            ]
        );
        assert_eq!(selector.state(0, now), PeerState::Failed);
    }

    #[test]
    fn the_working_weight_never_goes_below_zero_and_climbs_to_the_weight() {
        let mut heavy = params(4);
        heavy.fail_timeout = Duration::ZERO;
        let mut selector = round_robin(vec![heavy, params(4)]);
        let start = Instant::now();
        // Two failures would take 8 from a weight of 4: it stops at 0.
        fail_at(&mut selector, 0, start);
        fail_at(&mut selector, 0, start + Duration::from_millis(1));
        // fail_timeout 0: a moment later peer 0 is eligible again at working
        // weight 0 and climbs one unit per pick (0, 1, 2, 3, 4) while peer 1
        // rotates its full 4; then the two alternate exactly.
        let later = start + Duration::from_millis(2);
        assert_eq!(picks(&mut selector, later, 8), vec![1, 1, 0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn backup_only_when_no_primary_is_eligible() {
        let mut backup = params(1);
        backup.backup = true;
        let mut selector = round_robin(vec![params(1), params(1), backup]);
        let now = Instant::now();
        assert!(!picks(&mut selector, now, 6).contains(&2));

        // Both primaries fail in one connection: the backup takes it.
        assert_eq!(connection(&mut selector, now, &[0, 1]), vec![0, 1, 2]);
        assert_eq!(picks(&mut selector, now, 3), vec![2, 2, 2]);
    }

    #[test]
    fn once_on_the_backups_a_connection_stays_there() {
        let mut limited = params(1);
        limited.max_conns = 1;
        let mut backup = params(1);
        backup.backup = true;
        let mut selector = round_robin(vec![limited, backup, backup]);
        let now = Instant::now();
        let held = selector.select(now, &mut Tried::default(), b"").unwrap();
        assert_eq!(held, 0);
        // Peer 0 is full: this connection goes to a backup, which fails.
        let mut tried = Tried::default();
        let first = selector.select(now, &mut tried, b"").unwrap();
        assert_eq!(first, 1);
        selector.health(first).failed(&selector.params(first), now);
        // Peer 0 frees up meanwhile, but the connection stays on the backups.
        selector.health(held).closed();
        assert_eq!(selector.select(now, &mut tried, b""), Some(2));
        assert_eq!(selector.select(now, &mut Tried::default(), b""), Some(0));
    }

    #[test]
    fn tried_peers_are_skipped_then_backup_is_used() {
        let mut backup = params(1);
        backup.backup = true;
        let mut selector = round_robin(vec![params(1), backup]);
        let now = Instant::now();
        let mut tried = Tried::default();
        tried.insert(0);
        assert_eq!(selector.select(now, &mut tried, b""), Some(1));
        assert!(tried.contains(1));
        selector.health(1).abandoned();
        assert_eq!(selector.select(now, &mut tried, b""), None);
    }

    #[test]
    fn max_conns_makes_a_peer_ineligible_while_full() {
        let mut limited = params(1);
        limited.max_conns = 2;
        let mut selector = round_robin(vec![limited, params(1)]);
        let now = Instant::now();
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(selector.select(now, &mut Tried::default(), b"").unwrap());
        }
        assert_eq!(held, vec![0, 1, 0, 1]);
        // Peer 0 filled up at the third pick: the fourth and fifth go to
        // peer 1, which gains round-robin credit meanwhile.
        assert_eq!(selector.select(now, &mut Tried::default(), b""), Some(1));
        selector.health(0).closed();
        let next: Vec<usize> = (0..2)
            .map(|_| selector.select(now, &mut Tried::default(), b"").unwrap())
            .collect();
        assert_eq!(next, vec![1, 0]);
    }

    #[test]
    fn a_single_full_or_down_server_takes_nothing() {
        let mut limited = params(1);
        limited.max_conns = 1;
        let mut selector = round_robin(vec![limited]);
        let now = Instant::now();
        assert_eq!(selector.select(now, &mut Tried::default(), b""), Some(0));
        assert_eq!(selector.select(now, &mut Tried::default(), b""), None);
        let mut down = params(1);
        down.down = true;
        let mut selector = round_robin(vec![down]);
        assert_eq!(selector.select(now, &mut Tried::default(), b""), None);
    }

    #[test]
    fn a_single_server_is_never_marked_failed() {
        let mut selector = round_robin(vec![params(1)]);
        let now = Instant::now();
        for _ in 0..5 {
            assert_eq!(fail_one(&mut selector, now), 0);
            assert_eq!(selector.state(0, now), PeerState::Up);
        }
        assert_eq!(selector.params(0).max_fails, 0);
        // With a backup the group is not single: the failure counts.
        let mut backup = params(1);
        backup.backup = true;
        let mut selector = round_robin(vec![params(1), backup]);
        assert_eq!(fail_one(&mut selector, now), 0);
        assert_eq!(selector.state(0, now), PeerState::Failed);
    }

    #[test]
    fn failed_peer_sits_out_fail_timeout_then_gets_one_probe() {
        let mut selector = round_robin(vec![params(1), params(1)]);
        let start = Instant::now();
        assert_eq!(fail_one(&mut selector, start), 0);
        assert_eq!(selector.state(0, start), PeerState::Failed);

        // Inside fail_timeout only peer 1 is used.
        let inside = start + Duration::from_secs(9);
        assert_eq!(picks(&mut selector, inside, 4), vec![1, 1, 1, 1]);

        // After it, exactly one connection probes peer 0 while the probe is open.
        let after = start + Duration::from_secs(11);
        let held: Vec<usize> = (0..6)
            .map(|_| selector.select(after, &mut Tried::default(), b"").unwrap())
            .collect();
        assert_eq!(held.iter().filter(|&&i| i == 0).count(), 1, "{held:?}");

        // The probe fails: a new fail_timeout starts.
        selector.health(0).failed(&selector.params(0), after);
        assert_eq!(
            selector.state(0, after + Duration::from_secs(5)),
            PeerState::Failed
        );

        // After that window a probe connects and closes: healthy again. Its
        // working weight, 0 after the failures, climbs back pick by pick.
        let recovered = after + Duration::from_secs(11);
        for index in held.into_iter().filter(|&i| i != 0) {
            selector.health(index).closed();
        }
        let got = picks(&mut selector, recovered, 4);
        assert!(got.contains(&0), "{got:?}");
        assert_eq!(selector.state(0, recovered), PeerState::Up);
        let got = picks(&mut selector, recovered, 4);
        assert_eq!(got.iter().filter(|&&i| i == 0).count(), 2, "{got:?}");
    }

    #[test]
    fn failures_are_forgiven_when_the_probe_connection_closes_not_when_it_connects() {
        let mut selector = round_robin(vec![params(1), params(1)]);
        let start = Instant::now();
        assert_eq!(fail_one(&mut selector, start), 0);
        let after = start + Duration::from_secs(11);
        let mut tried = Tried::default();
        let probe = loop {
            let index = selector.select(after, &mut tried, b"").unwrap();
            if index == 0 {
                break index;
            }
            serve(&selector, index, after);
            tried = Tried::default();
        };
        selector.health(probe).connected(after);
        assert_eq!(selector.health(0).fails(), 1);
        selector.health(probe).closed();
        assert_eq!(selector.health(0).fails(), 0);
    }

    #[test]
    fn max_fails_counts_failures_before_marking() {
        let mut tolerant = params(1);
        tolerant.max_fails = 3;
        let mut selector = round_robin(vec![tolerant, params(1)]);
        let now = Instant::now();
        for _ in 0..2 {
            assert_eq!(connection(&mut selector, now, &[0])[0], 0);
            assert_eq!(selector.state(0, now), PeerState::Up);
            picks(&mut selector, now, 1);
        }
        assert_eq!(connection(&mut selector, now, &[0])[0], 0);
        assert_eq!(selector.state(0, now), PeerState::Failed);
        assert_eq!(picks(&mut selector, now, 3), vec![1, 1, 1]);
    }

    #[test]
    fn failures_add_up_across_windows_until_a_success_forgives_them() {
        // nginx counts `fails` until a success: a window that closes with no
        // connection to the peer forgives nothing.
        let mut tolerant = params(2);
        tolerant.max_fails = 2;
        let mut selector = round_robin(vec![tolerant, params(1)]);
        let start = Instant::now();
        fail_at(&mut selector, 0, start);
        let apart = start + Duration::from_secs(11);
        assert_eq!(selector.state(0, apart), PeerState::Up);
        fail_at(&mut selector, 0, apart);
        assert_eq!(selector.state(0, apart), PeerState::Failed);
        assert_eq!(selector.health(0).fails(), 2);
    }

    #[test]
    fn a_success_inside_the_window_does_not_forgive_its_failures() {
        let mut tolerant = params(1);
        tolerant.max_fails = 2;
        let mut selector = round_robin(vec![tolerant, params(1)]);
        let start = Instant::now();
        fail_at(&mut selector, 0, start);
        let later = start + Duration::from_secs(3);
        assert!(picks(&mut selector, later, 2).contains(&0));
        fail_at(&mut selector, 0, later);
        assert_eq!(selector.state(0, later), PeerState::Failed);
    }

    #[test]
    fn max_fails_zero_never_marks_failed_nor_lowers_the_weight() {
        let mut never = params(2);
        never.max_fails = 0;
        let mut selector = round_robin(vec![never, params(2)]);
        let now = Instant::now();
        for _ in 0..5 {
            fail_at(&mut selector, 0, now);
        }
        assert_eq!(selector.state(0, now), PeerState::Up);
        // The working weight is untouched: the two alternate.
        assert_eq!(picks(&mut selector, now, 4), vec![0, 1, 0, 1]);
    }

    #[test]
    fn a_rebuilt_selector_keeps_shared_health() {
        let mut first = round_robin(vec![params(1), params(1)]);
        let now = Instant::now();
        let held = first.select(now, &mut Tried::default(), b"").unwrap();
        let failed = fail_one(&mut first, now);

        // The rebuilt group shares peer state: one active, one failed.
        let health = vec![Arc::clone(first.health(0)), Arc::clone(first.health(1))];
        let mut second = Selector::new(
            vec![params(1), params(1)],
            health,
            Box::new(RoundRobin::new(2)),
        );
        assert_eq!(second.health(held).active(), 1);
        assert_eq!(second.state(failed, now), PeerState::Failed);
        assert_eq!(second.select(now, &mut Tried::default(), b""), Some(held));
        // A connection from before the rebuild releases into the same counter.
        first.health(held).closed();
        assert_eq!(second.health(held).active(), 1);
    }

    #[test]
    fn tried_set_grows_past_one_word() {
        let mut tried = Tried::default();
        tried.insert(130);
        assert!(tried.contains(130));
        assert!(!tried.contains(2));
        assert!(!tried.contains(1000));
    }
}

#[cfg(test)]
mod method_tests {
    use super::tests::{params, serve};
    use super::*;

    /// A selector for `method` over fresh peers at 10.0.0.N:1.
    pub(crate) fn selector(method: Method, params: Vec<PeerParams>) -> Selector {
        let identities: Vec<PeerIdentity> = (0..params.len())
            .map(|i| PeerIdentity {
                server: format!("10.0.0.{i}:1"),
                address: format!("10.0.0.{i}:1"),
            })
            .collect();
        let health = params.iter().map(|_| Arc::default()).collect();
        Selector::for_method(method, &identities, params, health)
    }

    const METHODS: [Method; 6] = [
        Method::RoundRobin,
        Method::LeastConn,
        Method::Random,
        Method::RandomTwo,
        Method::Hash(Ring::Nginx),
        Method::Hash(Ring::Ketama),
    ];

    #[test]
    fn every_method_honours_down_max_conns_and_failures() {
        for method in METHODS {
            let mut down = params(1);
            down.down = true;
            let mut limited = params(1);
            limited.max_conns = 1;
            let mut selector = selector(method, vec![down, limited, params(1), params(1)]);
            let now = Instant::now();
            // Fill peer 1 and fail peer 2; only peer 3 is left.
            let mut tried = Tried::default();
            tried.insert(0);
            tried.insert(2);
            tried.insert(3);
            assert_eq!(selector.select(now, &mut tried, b""), Some(1), "{method:?}");
            selector.health(2).failed(&selector.params(2), now);
            for n in 0..50u32 {
                let key = n.to_string();
                let picked = selector.select(now, &mut Tried::default(), key.as_bytes());
                assert_eq!(picked, Some(3), "{method:?}");
                serve(&selector, 3, now);
            }
            selector.health(3).failed(&selector.params(3), now);
            assert_eq!(
                selector.select(now, &mut Tried::default(), b"k"),
                None,
                "{method:?}"
            );
        }
    }

    #[test]
    fn every_method_serves_a_single_server_after_failures() {
        for method in METHODS {
            let mut selector = selector(method, vec![params(1)]);
            let now = Instant::now();
            for _ in 0..3 {
                assert_eq!(super::tests::fail_one(&mut selector, now), 0, "{method:?}");
            }
            assert_eq!(selector.state(0, now), PeerState::Up, "{method:?}");
        }
    }
}

#[cfg(test)]
mod slow_start_tests {
    use super::tests::{params, serve};
    use super::*;

    fn selector(method: Method, params: Vec<PeerParams>) -> Selector {
        super::method_tests::selector(method, params)
    }

    /// Fails peer 0 at `start` and lets its probe connect after fail_timeout;
    /// returns when it recovered.
    fn fail_and_recover(selector: &mut Selector, start: Instant) -> Instant {
        assert_eq!(selector.select(start, &mut Tried::default(), b""), Some(0));
        selector.health(0).failed(&selector.params(0), start);
        let probe_time = start + Duration::from_secs(11);
        loop {
            let index = selector
                .select(probe_time, &mut Tried::default(), b"")
                .unwrap();
            serve(selector, index, probe_time);
            if index == 0 {
                return probe_time;
            }
        }
    }

    fn count_picks(selector: &mut Selector, now: Instant, picks: usize) -> usize {
        (0..picks)
            .filter(|_| {
                let index = selector.select(now, &mut Tried::default(), b"").unwrap();
                serve(selector, index, now);
                index == 0
            })
            .count()
    }

    fn slow(seconds: u64) -> PeerParams {
        let mut params = params(1);
        params.slow_start = Duration::from_secs(seconds);
        params
    }

    #[test]
    fn round_robin_ramps_a_recovered_peer_up() {
        let mut selector = selector(Method::RoundRobin, vec![slow(10), params(1)]);
        let start = Instant::now();
        let recovered = fail_and_recover(&mut selector, start);
        assert_eq!(selector.health(0).recovered_at(), Some(recovered));
        // Weights 1:1 ramped to 0.25:1, 0.5:1, 1:1; each count is exact up to
        // the one pick the round-robin state carries from the phase before.
        for (seconds, picks, expected) in [(2.5, 50, 10), (5.0, 60, 20), (10.0, 60, 30)] {
            let now = recovered + Duration::from_secs_f64(seconds);
            let got = count_picks(&mut selector, now, picks);
            assert!(
                got.abs_diff(expected) <= 1,
                "at {seconds}s: {got} of {picks}"
            );
        }
    }

    #[test]
    fn least_conn_weighs_a_recovering_peer_by_its_ramped_weight() {
        let mut selector = selector(Method::LeastConn, vec![slow(20), params(1)]);
        let recovered = fail_and_recover(&mut selector, Instant::now());
        // At a quarter of the period the weights are 0.25:1; held connections
        // pile up 1:4.
        let now = recovered + Duration::from_secs(5);
        let mut on_recovered = 0;
        for _ in 0..10 {
            let index = selector.select(now, &mut Tried::default(), b"").unwrap();
            selector.health(index).connected(now);
            on_recovered += usize::from(index == 0);
        }
        assert_eq!(on_recovered, 2);
    }

    #[test]
    fn a_failure_below_max_fails_is_no_recovery() {
        let mut tolerant = slow(10);
        tolerant.max_fails = 3;
        let mut selector = selector(Method::RoundRobin, vec![tolerant, params(1)]);
        let now = Instant::now();
        assert_eq!(selector.select(now, &mut Tried::default(), b""), Some(0));
        selector.health(0).failed(&selector.params(0), now);
        let later = now + Duration::from_secs(11);
        let got = (0..2)
            .map(|_| {
                let index = selector.select(later, &mut Tried::default(), b"").unwrap();
                serve(&selector, index, later);
                index
            })
            .collect::<Vec<_>>();
        assert!(got.contains(&0), "{got:?}");
        assert_eq!(selector.health(0).recovered_at(), None);
    }

    #[test]
    fn a_peer_never_failed_has_its_full_weight_at_once() {
        let mut selector = selector(Method::RoundRobin, vec![slow(10), params(1)]);
        assert_eq!(count_picks(&mut selector, Instant::now(), 10), 5);
    }
}

#[cfg(test)]
mod health_check_tests {
    use super::tests::params;
    use super::*;

    #[test]
    fn fails_in_a_row_make_a_peer_unhealthy_and_passes_bring_it_back() {
        let health = Arc::new(PeerHealth::default());
        let mut selector = Selector::new(
            vec![params(1), params(1)],
            vec![Arc::clone(&health), Arc::default()],
            Box::new(RoundRobin::new(2)),
        );
        let now = Instant::now();
        // A pass resets the failure streak: 2 fails, a pass, 2 fails is no mark.
        for passed in [false, false, true, false, false] {
            assert_eq!(health.check_result(passed, 3, 2, now), None);
        }
        assert_eq!(
            health.check_result(false, 3, 2, now),
            Some(CheckTransition::BecameUnhealthy)
        );
        assert!(health.is_unhealthy());
        assert_eq!(selector.state(0, now), PeerState::Failed);
        for _ in 0..4 {
            let index = selector.select(now, &mut Tried::default(), b"").unwrap();
            assert_eq!(index, 1);
            selector.health(index).abandoned();
        }
        // Further failures change nothing; a pass then a failure restarts the count.
        for passed in [false, true, false, true] {
            assert_eq!(health.check_result(passed, 3, 2, now), None);
        }
        let later = now + Duration::from_secs(1);
        assert_eq!(
            health.check_result(true, 3, 2, later),
            Some(CheckTransition::BecameHealthy)
        );
        assert!(!health.is_unhealthy());
        assert_eq!(health.recovered_at(), Some(later));
        assert_eq!(selector.state(0, later), PeerState::Up);
        assert_eq!(selector.select(later, &mut Tried::default(), b""), Some(0));
    }

    #[test]
    fn an_unhealthy_single_server_takes_nothing() {
        let mut selector = super::tests::round_robin(vec![params(1)]);
        let now = Instant::now();
        for _ in 0..3 {
            selector.health(0).check_result(false, 3, 2, now);
        }
        assert_eq!(selector.state(0, now), PeerState::Failed);
        assert_eq!(selector.select(now, &mut Tried::default(), b""), None);
    }
}
