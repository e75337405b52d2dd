//! Peer selection with nginx `upstream` semantics, as pure logic over peer
//! state: no I/O, time passed in, so every rule is unit-tested here.
//!
//! The [`Selector`] owns what is common to every method (down, max_conns,
//! max_fails/fail_timeout, backup tier, peers already tried by this client);
//! an [`Algorithm`] only chooses among the peers it is told are eligible.

mod hash;
mod least_conn;
mod random;
mod round_robin;
mod slow_start;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub use hash::{ConsistentHash, RingMember};
pub use least_conn::LeastConn;
pub use random::{Random, RandomTwo};
pub use round_robin::RoundRobin;
pub use slow_start::{effective_weight, WEIGHT_SCALE};

use crate::config::Balance;

/// What the selector needs to know of one peer; fixed for a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// One peer as an algorithm sees it at the moment of a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    pub weight: u64,
    pub active: u32,
    pub eligible: bool,
}

/// A balancing method. Implementations keep their own per-peer state, indexed
/// like the peer slice they are given (which is stable for their lifetime).
pub trait Algorithm: Send {
    /// Picks one of the peers whose `eligible` is true, or `None` if there is none.
    /// `key` is the client's hash key, for methods that use one.
    fn pick(&mut self, peers: &[PeerView], key: &[u8]) -> Option<usize>;
}

/// Builds the algorithm for a method over these peers, in order.
pub fn algorithm_for(balance: &Balance, peers: &[RingMember<'_>]) -> Box<dyn Algorithm> {
    match balance {
        Balance::RoundRobin => Box::new(RoundRobin::new(peers.len())),
        Balance::LeastConn => Box::new(LeastConn::new(peers.len())),
        Balance::Random => Box::<Random>::default(),
        Balance::RandomTwo => Box::<RandomTwo>::default(),
        Balance::Hash(_) => Box::new(ConsistentHash::new(peers)),
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

#[derive(Debug, Clone, Default)]
struct Health {
    active: u32,
    /// Failures in the current window (nginx `fails`).
    fails: u32,
    /// When the current failure window started or the last probe was let through (nginx `checked`).
    checked: Option<Instant>,
    /// When the last failure happened (nginx `accessed`).
    accessed: Option<Instant>,
    /// The pick that opened the current window went to a peer marked failed:
    /// its success is a recovery.
    probing: bool,
    /// When the peer last recovered from failure, for slow start.
    recovered_at: Option<Instant>,
    /// Active health checks found the peer unhealthy.
    unhealthy: bool,
    /// Consecutive failed (or, while unhealthy, passed) health checks.
    check_streak: u32,
}

/// A change of a peer's health-check state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckTransition {
    BecameUnhealthy,
    BecameHealthy,
}

/// One peer's live state: active connections and failure accounting. It is
/// shared, so a rebuilt group (reload, re-resolution) keeps the counts of
/// peers it still has, and connections opened before the rebuild release
/// into the same counters.
#[derive(Debug, Default)]
pub struct PeerHealth(Mutex<Health>);

impl PeerHealth {
    fn lock(&self) -> MutexGuard<'_, Health> {
        // Every update leaves the fields consistent, so a panic elsewhere
        // while the lock was held leaves nothing to repair.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection attempt succeeded: a failure streak that started before
    /// this attempt's window is forgiven.
    pub fn succeeded(&self) {
        self.succeeded_at(Instant::now());
    }

    /// [`PeerHealth::succeeded`] at `now`; a successful probe of a failed
    /// peer starts its slow start.
    pub fn succeeded_at(&self, now: Instant) {
        let mut health = self.lock();
        if health.accessed < health.checked {
            health.fails = 0;
            if health.probing {
                health.recovered_at = Some(now);
            }
        }
        health.probing = false;
    }

    /// A connection attempt failed; it is no longer active.
    pub fn failed(&self, now: Instant) {
        let mut health = self.lock();
        health.active = health.active.saturating_sub(1);
        health.fails = health.fails.saturating_add(1);
        health.accessed = Some(now);
        health.checked = Some(now);
        health.probing = false;
    }

    /// A connection (attempted or relayed) ended.
    pub fn released(&self) {
        let mut health = self.lock();
        health.active = health.active.saturating_sub(1);
    }

    pub fn active(&self) -> u32 {
        self.lock().active
    }

    /// Whether active health checks have taken the peer out of rotation.
    /// `/status` and `sluice_upstream_server_up` show such a peer as not up:
    /// [`Selector::state`] reports it as [`PeerState::Failed`].
    pub fn is_unhealthy(&self) -> bool {
        self.lock().unhealthy
    }

    /// Records one health check's result: `fails` consecutive failures make
    /// a healthy peer unhealthy, `passes` consecutive passes bring an
    /// unhealthy one back (and start its slow start).
    pub fn check_result(
        &self,
        passed: bool,
        fails: u32,
        passes: u32,
        now: Instant,
    ) -> Option<CheckTransition> {
        let mut health = self.lock();
        // The streak counts results that point away from the current state.
        if passed == health.unhealthy {
            health.check_streak = health.check_streak.saturating_add(1);
        } else {
            health.check_streak = 0;
        }
        if health.unhealthy && health.check_streak >= passes {
            health.unhealthy = false;
            health.check_streak = 0;
            health.recovered_at = Some(now);
            Some(CheckTransition::BecameHealthy)
        } else if !health.unhealthy && health.check_streak >= fails {
            health.unhealthy = true;
            health.check_streak = 0;
            Some(CheckTransition::BecameUnhealthy)
        } else {
            None
        }
    }

    /// When the peer last recovered (a successful probe after being marked
    /// failed, or a health check bringing it back); `None` if never.
    pub fn recovered_at(&self) -> Option<Instant> {
        self.lock().recovered_at
    }

    /// Failed attempts counted since the last success.
    pub fn fails(&self) -> u32 {
        self.lock().fails
    }

    /// The peer as a pick sees it, read under one lock so the fields agree.
    fn snapshot(&self, params: &PeerParams, now: Instant) -> Snapshot {
        let health = self.lock();
        Snapshot {
            active: health.active,
            out_of_rotation: health.unhealthy || health.is_failed(params, now),
            recovered_at: health.recovered_at,
        }
    }
}

impl Health {
    /// Marked failed by max_fails and still inside fail_timeout.
    fn is_failed(&self, params: &PeerParams, now: Instant) -> bool {
        params.max_fails > 0
            && self.fails >= params.max_fails
            && self.checked.is_some_and(|checked| {
                now.saturating_duration_since(checked) <= params.fail_timeout
            })
    }
}

/// One peer's health at the moment of a pick or a status report.
struct Snapshot {
    active: u32,
    /// Failed (max_fails) or unhealthy (health checks).
    out_of_rotation: bool,
    recovered_at: Option<Instant>,
}

/// The peers of one upstream group: their parameters, their shared health,
/// and the method that picks among them.
pub struct Selector {
    params: Vec<PeerParams>,
    health: Vec<Arc<PeerHealth>>,
    algorithm: Box<dyn Algorithm>,
}

/// The peers one client connection has already tried, so next-upstream never repeats one.
#[derive(Debug, Clone, Default)]
pub struct Tried {
    bits: Vec<u64>,
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
fn is_eligible(params: &PeerParams, health: &Snapshot) -> bool {
    let full = params.max_conns > 0 && health.active >= params.max_conns;
    !(params.down || full || health.out_of_rotation)
}

impl Selector {
    /// `health[i]` is peer i's state, fresh or kept from a previous group.
    pub fn new(
        params: Vec<PeerParams>,
        health: Vec<Arc<PeerHealth>>,
        algorithm: Box<dyn Algorithm>,
    ) -> Self {
        debug_assert_eq!(params.len(), health.len());
        Selector {
            params,
            health,
            algorithm,
        }
    }

    /// A selector running `balance` over these peers. `identities` place the
    /// peers on a hash ring (their addresses, so a peer keeps its keys
    /// whatever else is added, removed or renamed); other methods ignore them.
    pub fn for_method(
        balance: &Balance,
        identities: &[String],
        params: Vec<PeerParams>,
        health: Vec<Arc<PeerHealth>>,
    ) -> Self {
        let members: Vec<RingMember<'_>> = identities
            .iter()
            .zip(&params)
            .map(|(identity, params)| RingMember {
                identity,
                weight: params.weight,
            })
            .collect();
        let algorithm = algorithm_for(balance, &members);
        Selector::new(params, health, algorithm)
    }

    /// Picks a peer for a new attempt and counts it active; the caller must
    /// report the outcome on [`Selector::health`]: `failed`, or `succeeded`
    /// and later `released`. Backups are used only when no primary is eligible.
    pub fn select(&mut self, now: Instant, tried: &Tried, key: &[u8]) -> Option<usize> {
        let picked = self
            .pick_tier(now, tried, key, false)
            .or_else(|| self.pick_tier(now, tried, key, true))?;
        let params = &self.params[picked];
        let mut health = self.health[picked].lock();
        health.active += 1;
        // Once fail_timeout has passed, a pick opens a new window: if the peer
        // had failed, this is the single probe the window lets through;
        // otherwise its earlier failures are too old to count (§3: max_fails
        // failures *within* fail_timeout).
        if health
            .checked
            .is_none_or(|checked| now.saturating_duration_since(checked) > params.fail_timeout)
        {
            health.probing = params.max_fails > 0 && health.fails >= params.max_fails;
            if !health.probing {
                health.fails = 0;
            }
            health.checked = Some(now);
        }
        Some(picked)
    }

    fn pick_tier(
        &mut self,
        now: Instant,
        tried: &Tried,
        key: &[u8],
        backup: bool,
    ) -> Option<usize> {
        let mut any = false;
        let views: Vec<PeerView> = (0..self.params.len())
            .map(|index| {
                let params = &self.params[index];
                let health = self.health[index].snapshot(params, now);
                let eligible = params.backup == backup
                    && !tried.contains(index)
                    && is_eligible(params, &health);
                any |= eligible;
                PeerView {
                    weight: effective_weight(
                        params.weight,
                        params.slow_start,
                        health.recovered_at,
                        now,
                    ),
                    active: health.active,
                    eligible,
                }
            })
            .collect();
        if !any {
            return None;
        }
        self.algorithm.pick(&views, key)
    }

    pub fn state(&self, index: usize, now: Instant) -> PeerState {
        let params = &self.params[index];
        if params.down {
            PeerState::Down
        } else if self.health[index].snapshot(params, now).out_of_rotation {
            PeerState::Failed
        } else {
            PeerState::Up
        }
    }

    /// Peer `index`'s shared state, to report outcomes on.
    pub fn health(&self, index: usize) -> &Arc<PeerHealth> {
        &self.health[index]
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

    fn round_robin(params: Vec<PeerParams>) -> Selector {
        let algorithm = Box::new(RoundRobin::new(params.len()));
        let health = params.iter().map(|_| Arc::default()).collect();
        Selector::new(params, health, algorithm)
    }

    /// Picks a peer at `now` and fails the attempt.
    fn fail_one(selector: &mut Selector, now: Instant) {
        let index = selector.select(now, &Tried::default(), b"").unwrap();
        selector.health(index).failed(now);
    }

    /// Picks `count` times, releasing each pick at once, and returns the indices.
    fn picks(selector: &mut Selector, now: Instant, count: usize) -> Vec<usize> {
        (0..count)
            .map(|_| {
                let index = selector.select(now, &Tried::default(), b"").unwrap();
                selector.health(index).succeeded();
                selector.health(index).released();
                index
            })
            .collect()
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
    fn backup_only_when_no_primary_is_eligible() {
        let mut backup = params(1);
        backup.backup = true;
        let mut selector = round_robin(vec![params(1), params(1), backup]);
        let now = Instant::now();
        assert!(!picks(&mut selector, now, 6).contains(&2));

        // Fail both primaries: the backup takes over.
        for index in [0, 1] {
            let mut tried = Tried::default();
            for skip in 0..index {
                tried.insert(skip);
            }
            let picked = selector.select(now, &tried, b"").unwrap();
            assert_eq!(picked, index);
            selector.health(picked).failed(now);
        }
        assert_eq!(picks(&mut selector, now, 3), vec![2, 2, 2]);
    }

    #[test]
    fn tried_peers_are_skipped_then_backup_is_used() {
        let mut backup = params(1);
        backup.backup = true;
        let mut selector = round_robin(vec![params(1), backup]);
        let now = Instant::now();
        let mut tried = Tried::default();
        tried.insert(0);
        assert_eq!(selector.select(now, &tried, b""), Some(1));
        tried.insert(1);
        selector.health(1).released();
        assert_eq!(selector.select(now, &tried, b""), None);
    }

    #[test]
    fn max_conns_makes_a_peer_ineligible_while_full() {
        let mut limited = params(1);
        limited.max_conns = 2;
        let mut selector = round_robin(vec![limited]);
        let now = Instant::now();
        let tried = Tried::default();
        assert_eq!(selector.select(now, &tried, b""), Some(0));
        assert_eq!(selector.select(now, &tried, b""), Some(0));
        assert_eq!(selector.select(now, &tried, b""), None);
        selector.health(0).released();
        assert_eq!(selector.select(now, &tried, b""), Some(0));
    }

    #[test]
    fn failed_peer_sits_out_fail_timeout_then_gets_one_probe() {
        let mut selector = round_robin(vec![params(1), params(1)]);
        let start = Instant::now();
        let tried = Tried::default();
        assert_eq!(selector.select(start, &tried, b""), Some(0));
        selector.health(0).failed(start);
        assert_eq!(selector.state(0, start), PeerState::Failed);

        // Inside fail_timeout only peer 1 is used.
        let inside = start + Duration::from_secs(9);
        assert_eq!(picks(&mut selector, inside, 4), vec![1, 1, 1, 1]);

        // After it, exactly one connection probes peer 0 while the probe is open.
        let after = start + Duration::from_secs(11);
        let mut probes = 0;
        let mut held = Vec::new();
        for _ in 0..6 {
            let index = selector.select(after, &tried, b"").unwrap();
            probes += usize::from(index == 0);
            held.push(index);
        }
        assert_eq!(probes, 1);

        // The probe fails: a new fail_timeout starts.
        selector.health(0).failed(after);
        let later = after + Duration::from_secs(5);
        assert_eq!(selector.state(0, later), PeerState::Failed);

        // After that window a probe succeeds: the peer is healthy again.
        let recovered = after + Duration::from_secs(11);
        for index in held.into_iter().filter(|&i| i != 0) {
            selector.health(index).released();
        }
        let index = selector.select(recovered, &tried, b"").unwrap();
        let index = if index == 0 {
            index
        } else {
            selector.health(index).released();
            selector.select(recovered, &tried, b"").unwrap()
        };
        assert_eq!(index, 0);
        selector.health(0).succeeded();
        selector.health(0).released();
        assert_eq!(selector.state(0, recovered), PeerState::Up);
        let got = picks(&mut selector, recovered, 4);
        assert_eq!(got.iter().filter(|&&i| i == 0).count(), 2);
    }

    #[test]
    fn max_fails_counts_failures_before_marking() {
        let mut tolerant = params(1);
        tolerant.max_fails = 3;
        let mut selector = round_robin(vec![tolerant]);
        let now = Instant::now();
        for _ in 0..2 {
            fail_one(&mut selector, now);
            assert_eq!(selector.state(0, now), PeerState::Up);
        }
        fail_one(&mut selector, now);
        assert_eq!(selector.state(0, now), PeerState::Failed);
        assert_eq!(selector.select(now, &Tried::default(), b""), None);
    }

    #[test]
    fn failures_further_apart_than_fail_timeout_do_not_add_up() {
        let mut tolerant = params(1);
        tolerant.max_fails = 2;
        let mut selector = round_robin(vec![tolerant]);
        let start = Instant::now();
        fail_one(&mut selector, start);
        let apart = start + Duration::from_secs(11);
        fail_one(&mut selector, apart);
        assert_eq!(selector.state(0, apart), PeerState::Up);

        // A second failure inside the window does mark it.
        let inside = apart + Duration::from_secs(9);
        fail_one(&mut selector, inside);
        assert_eq!(selector.state(0, inside), PeerState::Failed);
    }

    #[test]
    fn a_success_inside_the_window_does_not_forgive_its_failures() {
        let mut tolerant = params(1);
        tolerant.max_fails = 2;
        let mut selector = round_robin(vec![tolerant]);
        let start = Instant::now();
        fail_one(&mut selector, start);
        let later = start + Duration::from_secs(3);
        assert_eq!(picks(&mut selector, later, 1), vec![0]);
        fail_one(&mut selector, later);
        assert_eq!(selector.state(0, later), PeerState::Failed);
    }

    #[test]
    fn max_fails_zero_never_marks_failed() {
        let mut never = params(1);
        never.max_fails = 0;
        let mut selector = round_robin(vec![never]);
        let now = Instant::now();
        for _ in 0..5 {
            fail_one(&mut selector, now);
        }
        assert_eq!(selector.state(0, now), PeerState::Up);
    }

    #[test]
    fn a_rebuilt_selector_keeps_shared_health() {
        let mut first = round_robin(vec![params(1), params(1)]);
        let now = Instant::now();
        let held = first.select(now, &Tried::default(), b"").unwrap();
        let failed = first.select(now, &Tried::default(), b"").unwrap();
        first.health(failed).failed(now);

        // The rebuilt group shares peer state: one active, one failed.
        let health = vec![Arc::clone(first.health(0)), Arc::clone(first.health(1))];
        let mut second = Selector::new(
            vec![params(1), params(1)],
            health,
            Box::new(RoundRobin::new(2)),
        );
        assert_eq!(second.health(held).active(), 1);
        assert_eq!(second.state(failed, now), PeerState::Failed);
        assert_eq!(second.select(now, &Tried::default(), b""), Some(held));
        // A connection from before the rebuild releases into the same counter.
        first.health(held).released();
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
    use super::tests::params;
    use super::*;
    use crate::config::HashKey;

    /// A selector for `balance` over fresh peers at 10.0.0.N:1.
    pub(crate) fn selector(balance: &Balance, params: Vec<PeerParams>) -> Selector {
        let identities: Vec<String> = (0..params.len()).map(|i| format!("10.0.0.{i}:1")).collect();
        let health = params.iter().map(|_| Arc::default()).collect();
        Selector::for_method(balance, &identities, params, health)
    }

    const METHODS: [Balance; 5] = [
        Balance::RoundRobin,
        Balance::LeastConn,
        Balance::Random,
        Balance::RandomTwo,
        Balance::Hash(HashKey::ClientIp),
    ];

    #[test]
    fn every_method_honours_down_max_conns_and_failures() {
        for balance in &METHODS {
            let mut down = params(1);
            down.down = true;
            let mut limited = params(1);
            limited.max_conns = 1;
            let mut selector = selector(balance, vec![down, limited, params(1), params(1)]);
            let now = Instant::now();
            // Fill peer 1 and fail peer 2; only peer 3 is left.
            selector.health(1).lock().active = 1;
            selector.health(2).failed(now);
            for n in 0..50u32 {
                let key = n.to_string();
                let picked = selector.select(now, &Tried::default(), key.as_bytes());
                assert_eq!(picked, Some(3), "{}", balance.name());
                selector.health(3).succeeded();
                selector.health(3).released();
            }
            selector.health(3).failed(now);
            assert_eq!(
                selector.select(now, &Tried::default(), b"k"),
                None,
                "{}",
                balance.name()
            );
        }
    }
}

#[cfg(test)]
mod slow_start_tests {
    use super::tests::params;
    use super::*;

    fn selector(balance: Balance, params: Vec<PeerParams>) -> Selector {
        super::method_tests::selector(&balance, params)
    }

    /// Fails peer 0 at `start` and lets its probe succeed after fail_timeout;
    /// returns when it recovered.
    fn fail_and_recover(selector: &mut Selector, start: Instant) -> Instant {
        let tried = Tried::default();
        assert_eq!(selector.select(start, &tried, b""), Some(0));
        selector.health(0).failed(start);
        let probe_time = start + Duration::from_secs(11);
        loop {
            let index = selector.select(probe_time, &tried, b"").unwrap();
            if index == 0 {
                selector.health(0).succeeded_at(probe_time);
                selector.health(0).released();
                return probe_time;
            }
            selector.health(index).succeeded_at(probe_time);
            selector.health(index).released();
        }
    }

    fn count_picks(selector: &mut Selector, now: Instant, picks: usize) -> usize {
        (0..picks)
            .filter(|_| {
                let index = selector.select(now, &Tried::default(), b"").unwrap();
                selector.health(index).succeeded_at(now);
                selector.health(index).released();
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
        let mut selector = selector(Balance::RoundRobin, vec![slow(10), params(1)]);
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
        let mut selector = selector(Balance::LeastConn, vec![slow(20), params(1)]);
        let recovered = fail_and_recover(&mut selector, Instant::now());
        // At a quarter of the period the weights are 0.25:1; held connections
        // pile up 1:4.
        let now = recovered + Duration::from_secs(5);
        let mut on_recovered = 0;
        for _ in 0..10 {
            let index = selector.select(now, &Tried::default(), b"").unwrap();
            selector.health(index).succeeded_at(now);
            on_recovered += usize::from(index == 0);
        }
        assert_eq!(on_recovered, 2);
    }

    #[test]
    fn a_failure_below_max_fails_is_no_recovery() {
        let mut tolerant = slow(10);
        tolerant.max_fails = 3;
        let mut selector = selector(Balance::RoundRobin, vec![tolerant]);
        let now = Instant::now();
        let index = selector.select(now, &Tried::default(), b"").unwrap();
        selector.health(index).failed(now);
        let later = now + Duration::from_secs(11);
        let index = selector.select(later, &Tried::default(), b"").unwrap();
        selector.health(index).succeeded_at(later);
        assert_eq!(selector.health(0).recovered_at(), None);
    }

    #[test]
    fn a_peer_never_failed_has_its_full_weight_at_once() {
        let mut selector = selector(Balance::RoundRobin, vec![slow(10), params(1)]);
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
            let index = selector.select(now, &Tried::default(), b"").unwrap();
            assert_eq!(index, 1);
            selector.health(index).released();
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
        assert_eq!(selector.select(later, &Tried::default(), b""), Some(0));
    }
}
