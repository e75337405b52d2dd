//! Recycling long-lived connections at a quiet moment, and rebalancing them
//! over the peers (SPEC §9).
//!
//! Each listener whose connections may be recycled keeps a [`Registry`] of
//! them: the peer each is relayed to, its age limit, and a
//! [`RecycleSignal`] to ask its relay to recycle it. The listener's
//! rebalancer task ([`run`]) compares the peers' connection counts with
//! their fair shares and asks the excess, oldest first, at most
//! `rebalance_rate` per second; the relay ([`Watch`]) closes the connection
//! at its next quiet moment.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Waker};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::direction::Direction;
use super::forward::ForwardFollower;
use super::ListenerContext;
use crate::balancer::{effective_weight, PeerState};
use crate::config::{Protocol, RecycleConfig};
use crate::metrics::names;
use crate::upstream::Upstream;

/// How often the rebalancer looks at the shares and ages.
const REBALANCE_TICK: Duration = Duration::from_millis(100);

/// How long a recycled connection may take to finish: after sluice's FIN,
/// the client should close within this (it still may send what it had in
/// flight), and the upstream after the client's FIN reached it.
pub const RECYCLE_LINGER: Duration = Duration::from_secs(30);

/// Why a connection was recycled: the `reason` label of
/// `sluice_connections_recycled_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// It reached `max_connection_age`.
    Age = 1,
    /// Its peer held more than its fair share.
    Rebalance = 2,
    /// Its peer is draining or was removed, or sluice is shutting down.
    Drain = 3,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Age => "age",
            Reason::Rebalance => "rebalance",
            Reason::Drain => "drain",
        }
    }

    fn from_code(code: u8) -> Option<Reason> {
        match code {
            1 => Some(Reason::Age),
            2 => Some(Reason::Rebalance),
            3 => Some(Reason::Drain),
            _ => None,
        }
    }
}

/// Adds to `sluice_connections_recycled_total`.
fn count_recycled_by(listener: &str, reason: Reason, recycles: u64) {
    metrics::counter!(
        names::CONNECTIONS_RECYCLED_TOTAL,
        "listener" => listener.to_owned(),
        "reason" => reason.as_str(),
    )
    .increment(recycles);
}

/// How the rebalancer asks one connection's relay to recycle it. The relay
/// is on a worker thread, the rebalancer on the control thread.
#[derive(Debug, Default)]
pub struct RecycleSignal {
    /// 0 while not asked; else the first reason asked for.
    reason: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

impl RecycleSignal {
    fn waker(&self) -> MutexGuard<'_, Option<Waker>> {
        self.waker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks for a recycle; the first reason stays.
    pub fn request(&self, reason: Reason) {
        if self
            .reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            if let Some(waker) = self.waker().take() {
                waker.wake();
            }
        }
    }

    /// The reason asked for, if any; else the task is woken when one is.
    pub fn poll_requested(&self, cx: &mut Context<'_>) -> Option<Reason> {
        if let Some(reason) = Reason::from_code(self.reason.load(Ordering::Acquire)) {
            return Some(reason);
        }
        let mut waker = self.waker();
        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waker = Some(cx.waker().clone());
        }
        drop(waker);
        // Asked between the first look and the waker being stored.
        Reason::from_code(self.reason.load(Ordering::Acquire))
    }
}

/// One open connection of a listener.
struct Entry {
    peer: Arc<str>,
    /// When it is old enough to be recycled (its age spread by +-10%).
    age_limit: Option<Instant>,
    signal: Arc<RecycleSignal>,
    requested: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct PeerCount {
    open: usize,
    /// Of those, asked to recycle and not closed yet.
    requested: usize,
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    /// By id, which is the order they were opened: oldest first.
    open: BTreeMap<u64, Entry>,
    per_peer: HashMap<Arc<str>, PeerCount>,
}

impl Connections {
    fn request(&mut self, id: u64, reason: Reason) {
        if let Some(entry) = self.open.get_mut(&id) {
            if !entry.requested {
                entry.requested = true;
                entry.signal.request(reason);
                if let Some(count) = self.per_peer.get_mut(&entry.peer) {
                    count.requested += 1;
                }
            }
        }
    }
}

/// The open connections of one listener, shared by its accept loops on
/// every worker and kept across reloads.
#[derive(Default)]
pub struct Registry {
    connections: Mutex<Connections>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Connections> {
        // Every update leaves the maps consistent.
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes a connection relayed to `peer`; it leaves the registry when
    /// the registration drops.
    pub fn register(self: &Arc<Self>, peer: &str, max_age: Option<Duration>) -> Registration {
        let signal = Arc::new(RecycleSignal::default());
        // Spread by +-10%, so connections opened together are not all due at once.
        let age_limit =
            max_age.map(|age| Instant::now() + age.mul_f64(0.9 + 0.2 * fastrand::f64()));
        let mut connections = self.lock();
        let id = connections.next_id;
        connections.next_id += 1;
        let peer: Arc<str> = match connections.per_peer.get_key_value(peer) {
            Some((known, _)) => Arc::clone(known),
            None => Arc::from(peer),
        };
        connections
            .per_peer
            .entry(Arc::clone(&peer))
            .or_default()
            .open += 1;
        connections.open.insert(
            id,
            Entry {
                peer,
                age_limit,
                signal: Arc::clone(&signal),
                requested: false,
            },
        );
        Registration {
            registry: Arc::clone(self),
            id,
            signal,
        }
    }

    /// Asks every open connection to recycle (shutdown).
    pub fn request_all(&self, reason: Reason) {
        let mut connections = self.lock();
        let ids: Vec<u64> = connections.open.keys().copied().collect();
        for id in ids {
            connections.request(id, reason);
        }
    }

    /// The peers (indices in `group`) a new connection should avoid while
    /// the shares drift: those at or above their fair share counting the
    /// newcomer, so it goes to a peer below its share. Empty when the
    /// shares match, or when every eligible peer would be avoided.
    pub fn over_share(&self, group: &Upstream) -> Vec<usize> {
        let eligible = eligible_weights(group);
        let weights: u64 = eligible.iter().map(|(_, weight)| weight).sum();
        if weights == 0 {
            return Vec::new();
        }
        let connections = self.lock();
        let total = connections.open.len() as u64;
        let count = |index: usize| {
            connections
                .per_peer
                .get(group.peers[index].label.as_str())
                .map_or(0, |count| count.open as u64)
        };
        let drifting = eligible.iter().any(|&(index, weight)| {
            let open = count(index);
            open * weights > (total * weight).div_ceil(weights) * weights
                || open < total * weight / weights
        });
        if !drifting {
            return Vec::new();
        }
        let avoid: Vec<usize> = eligible
            .iter()
            .filter(|&&(index, weight)| count(index) * weights >= (total + 1) * weight)
            .map(|&(index, _)| index)
            .collect();
        if avoid.len() == eligible.len() {
            return Vec::new();
        }
        avoid
    }

    /// One round of the rebalancer: asks connections past their age, and
    /// (with `rebalance`) the excess of each peer over its share, oldest
    /// first, at most `budget` of them. Returns how many it asked.
    fn ask(&self, config: &RecycleConfig, group: &Upstream, budget: usize, now: Instant) -> usize {
        if budget == 0 {
            return 0;
        }
        let mut connections = self.lock();
        let mut excess: HashMap<Arc<str>, (usize, Reason)> = HashMap::new();
        if config.rebalance {
            let eligible = eligible_weights(group);
            let weights: u64 = eligible.iter().map(|(_, weight)| weight).sum();
            // With no eligible peer, a moved client would find nowhere to go.
            if weights > 0 {
                let total = connections.open.len() as u64;
                for (peer, count) in &connections.per_peer {
                    let in_group = group.peers.iter().position(|p| *p.label == **peer);
                    let (share, reason) = match in_group {
                        Some(index) if group.peers[index].draining => (0, Reason::Drain),
                        Some(index) => {
                            let weight = eligible
                                .iter()
                                .find(|(eligible, _)| *eligible == index)
                                .map_or(0, |(_, weight)| *weight);
                            ((total * weight).div_ceil(weights), Reason::Rebalance)
                        }
                        // Removed from the group by a reload.
                        None => (0, Reason::Drain),
                    };
                    let over = (count.open - count.requested).saturating_sub(share as usize);
                    if over > 0 {
                        excess.insert(Arc::clone(peer), (over, reason));
                    }
                }
            }
        }
        if excess.is_empty() && config.max_connection_age.is_none() {
            return 0;
        }
        let mut chosen = Vec::new();
        for (&id, entry) in &connections.open {
            if chosen.len() == budget {
                break;
            }
            if entry.requested {
                continue;
            }
            if entry.age_limit.is_some_and(|limit| limit <= now) {
                chosen.push((id, Reason::Age));
            } else if let Some((over, reason)) = excess.get_mut(&entry.peer) {
                if *over > 0 {
                    *over -= 1;
                    chosen.push((id, *reason));
                }
            }
        }
        for &(id, reason) in &chosen {
            connections.request(id, reason);
        }
        chosen.len()
    }

    #[cfg(test)]
    fn requested(&self) -> Vec<(String, Reason)> {
        self.lock()
            .open
            .values()
            .filter(|entry| entry.requested)
            .map(|entry| {
                let reason = Reason::from_code(entry.signal.reason.load(Ordering::Acquire));
                (entry.peer.to_string(), reason.unwrap_or(Reason::Age))
            })
            .collect()
    }
}

/// The eligible primary peers of the group's build and their weights: the
/// peers a fair share is computed over. A peer in its `slow_start` counts
/// with its ramped weight, so its share grows as the ramp climbs.
fn eligible_weights(group: &Upstream) -> Vec<(usize, u64)> {
    let now = std::time::Instant::now();
    group
        .peers
        .iter()
        .enumerate()
        .filter(|(index, peer)| {
            !peer.server.backup && !peer.draining && group.peer_state(*index) == PeerState::Up
        })
        .map(|(index, peer)| {
            let weight = effective_weight(
                peer.server.weight,
                peer.server.slow_start,
                peer.health.recovered_at(),
                now,
            );
            (index, weight)
        })
        .collect()
}

/// A connection's place in its listener's registry.
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
    pub signal: Arc<RecycleSignal>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut connections = self.registry.lock();
        if let Some(entry) = connections.open.remove(&self.id) {
            if let Some(count) = connections.per_peer.get_mut(&entry.peer) {
                count.open -= 1;
                if entry.requested {
                    count.requested -= 1;
                }
                if count.open == 0 {
                    connections.per_peer.remove(&entry.peer);
                }
            }
        }
    }
}

/// The rebalancer of one listener: every REBALANCE_TICK, asks connections
/// to recycle as [`Registry::ask`] says, within `rebalance_rate`. It reads
/// the listener's settings and group as they are at each round, so a reload
/// applies at once. Ends when `stop` fires.
pub async fn run(listener: Arc<ArcSwap<ListenerContext>>, stop: CancellationToken) {
    let name = listener.load().config.name.clone();
    // Every series exists from the start, at 0, so dashboards and alerts
    // see the listener before its first recycle (the listener's context
    // registered its connection durations).
    for reason in [Reason::Age, Reason::Rebalance, Reason::Drain] {
        count_recycled_by(&name, reason, 0);
    }
    let mut ticks = tokio::time::interval(REBALANCE_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whole recycles the rate allows now; at most one tick's worth is kept,
    // so a quiet spell does not save up a burst.
    let mut allowance = 0.0f64;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let context = listener.load();
        let config = &context.config.recycle;
        if !config.rebalance && config.max_connection_age.is_none() {
            continue;
        }
        let per_tick = f64::from(config.rebalance_rate) * REBALANCE_TICK.as_secs_f64();
        allowance = (allowance + per_tick).min(per_tick.max(1.0));
        let group = context.upstream.load();
        let asked = context
            .recycling
            .ask(config, &group, allowance as usize, Instant::now());
        allowance -= asked as f64;
    }
}

/// What a connection's relay watches to recycle it at a quiet moment.
pub struct Watch {
    /// The listener's name, the metric's label.
    listener: String,
    pub(super) signal: Arc<RecycleSignal>,
    quiet_period: Duration,
    /// `protocol = "forward"`; `None` for opaque.
    forward: Option<Box<ForwardFollower>>,
    /// Bytes read and not yet written, client -> upstream and back.
    in_flight: [u64; 2],
    /// The last bytes written went upstream -> client.
    answered: bool,
    /// When a byte last moved either way.
    pub(super) last_progress: Instant,
    /// A quiet moment came after a recycle was asked for: the FIN to the
    /// client is due at the relay's next turn on the client, unless a byte
    /// moved or the client spoke by then.
    fin_due: Option<Reason>,
    /// When the kernel held client bytes the relay had not read yet, at a
    /// due FIN: no quiet moment before they are read or, should they never
    /// be (a TLS record with no data), before `quiet_period` has passed.
    unread_seen_at: Option<Instant>,
    /// Recycling: the FIN went to the client. The reason, and when the
    /// connection is closed whatever the client and upstream still do.
    pub(super) closing: Option<(Reason, Instant)>,
}

impl Watch {
    pub fn new(listener: &str, config: &RecycleConfig, signal: Arc<RecycleSignal>) -> Watch {
        Watch {
            listener: listener.to_owned(),
            signal,
            quiet_period: config.quiet_period,
            forward: (config.protocol == Protocol::Forward).then(Box::default),
            in_flight: [0; 2],
            answered: false,
            last_progress: Instant::now(),
            fin_due: None,
            unread_seen_at: None,
            closing: None,
        }
    }

    /// A quiet moment came after a recycle was asked for: the relay sends
    /// the client its FIN at its next turn on the client
    /// ([`Watch::send_fin_unless`]).
    pub(super) fn fin_is_due(&mut self, reason: Reason) {
        self.fin_due = Some(reason);
    }

    /// Right before the due FIN: a request the client sent since the quiet
    /// moment, even one the runtime has not reported yet (`client_spoke`
    /// asks the kernel), would be forwarded but its answer dropped, so the
    /// recycle waits for the next quiet moment instead. Otherwise the FIN
    /// is sent now (counted as the recycle) and the connection closed by
    /// RECYCLE_LINGER at the latest.
    pub(super) fn send_fin_unless(&mut self, client_spoke: impl FnOnce() -> bool) {
        let Some(reason) = self.fin_due.take() else {
            return;
        };
        let now = Instant::now();
        if client_spoke() {
            self.unread_seen_at = Some(now);
            return;
        }
        self.closing = Some((reason, now + RECYCLE_LINGER));
        count_recycled_by(&self.listener, reason, 1);
    }

    /// How many of the next bytes one way may pass unseen (spliced): all of
    /// them when only their counts matter (`opaque`); with `forward`, the
    /// rest of a payload the framing follower skips anyway.
    pub(super) fn unseen_run(&self, direction: Direction) -> u64 {
        match &self.forward {
            Some(forward) => forward.unseen_run(direction == Direction::ToUpstream),
            None => u64::MAX,
        }
    }

    /// `count` bytes of the unseen run were read from one side, to be
    /// written to the other.
    pub(super) fn passed_unseen(&mut self, direction: Direction, count: usize) {
        self.arrived(direction, count);
        if let Some(forward) = &mut self.forward {
            forward.passed_unseen(direction == Direction::ToUpstream, count as u64);
        }
    }

    fn arrived(&mut self, direction: Direction, count: usize) {
        // Not quiet any more: no FIN before the next quiet moment.
        self.fin_due = None;
        self.unread_seen_at = None;
        self.in_flight[direction as usize] += count as u64;
    }

    /// Bytes were read from one side, to be written to the other.
    pub(super) fn read(&mut self, direction: Direction, bytes: &[u8]) {
        self.arrived(direction, bytes.len());
        if let Some(forward) = &mut self.forward {
            match direction {
                Direction::ToUpstream => forward.client_bytes(bytes),
                Direction::ToClient => forward.upstream_bytes(bytes),
            }
        }
    }

    /// Bytes read earlier were written.
    pub(super) fn wrote(&mut self, direction: Direction, written: usize) {
        let in_flight = &mut self.in_flight[direction as usize];
        *in_flight = in_flight.saturating_sub(written as u64);
        self.answered = matches!(direction, Direction::ToClient);
    }

    /// Bytes read earlier will never be written (the client's side is
    /// closed while recycling).
    pub(super) fn dropped(&mut self, direction: Direction) {
        self.in_flight[direction as usize] = 0;
    }

    /// A quiet moment now, or (opaque) when one will come if nothing moves.
    pub(super) fn quiet(&self, now: Instant) -> Quiet {
        if self.in_flight != [0, 0] {
            return Quiet::No;
        }
        if let Some(seen) = self.unread_seen_at {
            let at = seen + self.quiet_period;
            if now < at {
                return Quiet::At(at);
            }
        }
        match &self.forward {
            Some(forward) if forward.is_quiet() => Quiet::Now,
            Some(_) => Quiet::No,
            None if !self.answered => Quiet::No,
            None => {
                let at = self.last_progress + self.quiet_period;
                if now >= at {
                    Quiet::Now
                } else {
                    Quiet::At(at)
                }
            }
        }
    }
}

/// Whether a connection is at a quiet moment.
pub(super) enum Quiet {
    Now,
    /// Not yet: at this time, if nothing moves until then.
    At(Instant),
    No,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::net::PeerTarget;

    /// A group of servers `s0`, `s1`, ... with these weights.
    fn group(weights: &[u32]) -> Upstream {
        let mut text = String::from(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\nupstream = \"u\"\n[upstream.u]\n",
        );
        for (index, weight) in weights.iter().enumerate() {
            text.push_str(&format!(
                "[[upstream.u.server]]\naddress = \"127.0.0.1:{}\"\nname = \"s{index}\"\nweight = {weight}\n",
                7000 + index
            ));
        }
        let config = Config::parse(&text, std::path::Path::new("test.toml")).expect("valid");
        let targets = (0..weights.len())
            .map(|index| {
                let addr = format!("127.0.0.1:{}", 7000 + index);
                vec![PeerTarget::Tcp(addr.parse().expect("an address"))]
            })
            .collect();
        let upstream = &config.upstreams["u"];
        let runtime = crate::upstream::runtime::Runtime::new(upstream);
        Upstream::assemble(upstream, targets, None, runtime).expect("a group")
    }

    fn rebalancing() -> RecycleConfig {
        RecycleConfig {
            rebalance: true,
            ..RecycleConfig::default()
        }
    }

    fn open(registry: &Arc<Registry>, peer: &str, count: usize) -> Vec<Registration> {
        (0..count).map(|_| registry.register(peer, None)).collect()
    }

    #[test]
    fn a_new_peer_takes_its_share_from_the_oldest_excess() {
        let registry = Arc::new(Registry::default());
        let _held: Vec<Registration> = [open(&registry, "s0", 6), open(&registry, "s1", 6)]
            .into_iter()
            .flatten()
            .collect();
        let group = group(&[1, 1, 1]);
        // New connections avoid the two full peers.
        assert_eq!(registry.over_share(&group), vec![0, 1]);
        let now = Instant::now();
        // The budget bounds one round.
        assert_eq!(registry.ask(&rebalancing(), &group, 3, now), 3);
        assert_eq!(registry.ask(&rebalancing(), &group, 10, now), 1);
        assert_eq!(registry.ask(&rebalancing(), &group, 10, now), 0);
        let mut asked = registry.requested();
        asked.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            asked,
            [
                ("s0".to_owned(), Reason::Rebalance),
                ("s0".to_owned(), Reason::Rebalance),
                ("s1".to_owned(), Reason::Rebalance),
                ("s1".to_owned(), Reason::Rebalance),
            ]
        );
    }

    #[test]
    fn weights_set_the_shares_and_matched_shares_leave_picks_alone() {
        let registry = Arc::new(Registry::default());
        let mut held = open(&registry, "s0", 6);
        held.extend(open(&registry, "s1", 3));
        held.extend(open(&registry, "s2", 3));
        let group = group(&[2, 1, 1]);
        assert!(registry.over_share(&group).is_empty());
        assert_eq!(registry.ask(&rebalancing(), &group, 10, Instant::now()), 0);
        // Without `rebalance` nothing is asked even when shares drift.
        held.extend(open(&registry, "s1", 4));
        assert_eq!(
            registry.ask(&RecycleConfig::default(), &group, 10, Instant::now()),
            0
        );
        assert_eq!(registry.ask(&rebalancing(), &group, 10, Instant::now()), 3);
    }

    #[test]
    fn a_removed_peer_is_drained_and_ages_are_recycled() {
        let registry = Arc::new(Registry::default());
        let _gone = open(&registry, "removed", 2);
        let _kept = open(&registry, "s0", 1);
        assert_eq!(
            registry.ask(&rebalancing(), &group(&[1]), 10, Instant::now()),
            2
        );
        assert!(registry
            .requested()
            .iter()
            .all(|(peer, reason)| peer == "removed" && *reason == Reason::Drain));

        let registry = Arc::new(Registry::default());
        let age = Duration::from_secs(100);
        let _young = registry.register("s0", Some(age));
        let config = RecycleConfig {
            max_connection_age: Some(age),
            ..RecycleConfig::default()
        };
        let group = group(&[1]);
        let start = Instant::now();
        assert_eq!(
            registry.ask(&config, &group, 10, start + age.mul_f64(0.89)),
            0
        );
        assert_eq!(
            registry.ask(&config, &group, 10, start + age.mul_f64(1.11)),
            1
        );
        assert_eq!(registry.requested(), [("s0".to_owned(), Reason::Age)]);
    }

    #[test]
    fn a_draining_peer_is_drained_and_avoided() {
        let registry = Arc::new(Registry::default());
        let _held: Vec<Registration> = [open(&registry, "s0", 3), open(&registry, "s1", 2)]
            .into_iter()
            .flatten()
            .collect();
        let mut group = group(&[1, 1, 1]);
        group.peers[1].draining = true;
        // Shares over s0 and s2 only: s1 has none, s2 is below its share,
        // s0 at it (3 of 6 counting the newcomer).
        assert_eq!(registry.over_share(&group), vec![0]);
        assert_eq!(registry.ask(&rebalancing(), &group, 10, Instant::now()), 2);
        assert_eq!(
            registry.requested(),
            [
                ("s1".to_owned(), Reason::Drain),
                ("s1".to_owned(), Reason::Drain)
            ]
        );
    }

    fn is_now(quiet: Quiet) -> bool {
        matches!(quiet, Quiet::Now)
    }

    #[tokio::test(start_paused = true)]
    async fn opaque_quiet_needs_an_answer_then_silence() {
        let config = RecycleConfig {
            quiet_period: Duration::from_millis(200),
            ..RecycleConfig::default()
        };
        let mut watch = Watch::new("l", &config, Arc::default());
        watch.read(Direction::ToUpstream, b"get k\r\n");
        assert!(
            matches!(watch.quiet(Instant::now()), Quiet::No),
            "request in flight"
        );
        watch.wrote(Direction::ToUpstream, 7);
        assert!(
            matches!(watch.quiet(Instant::now()), Quiet::No),
            "not answered"
        );
        watch.read(Direction::ToClient, b"END\r\n");
        watch.wrote(Direction::ToClient, 3);
        assert!(
            matches!(watch.quiet(Instant::now()), Quiet::No),
            "answer half written"
        );
        watch.wrote(Direction::ToClient, 2);
        watch.last_progress = Instant::now();
        let at = watch.last_progress + config.quiet_period;
        assert!(matches!(watch.quiet(Instant::now()), Quiet::At(when) if when == at));
        tokio::time::advance(config.quiet_period).await;
        assert!(is_now(watch.quiet(Instant::now())));
        // The client speaks again: no longer answered.
        watch.read(Direction::ToUpstream, b"g");
        watch.wrote(Direction::ToUpstream, 1);
        assert!(matches!(watch.quiet(Instant::now()), Quiet::No));
    }

    #[test]
    fn forward_quiet_is_a_boundary_with_every_chunk_acked() {
        let config = RecycleConfig {
            protocol: Protocol::Forward,
            ..RecycleConfig::default()
        };
        let mut watch = Watch::new("l", &config, Arc::default());
        assert!(is_now(watch.quiet(Instant::now())));
        let options = rmpv::Value::Map(vec![("chunk".into(), "c1".into())]);
        let message = rmpv::Value::Array(vec![
            "tag".into(),
            1.into(),
            rmpv::Value::Map(vec![("log".into(), "x".into())]),
            options,
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &message).expect("encodes");
        watch.read(Direction::ToUpstream, &bytes);
        watch.wrote(Direction::ToUpstream, bytes.len());
        // No time passing makes it quiet: only the ack does.
        assert!(matches!(watch.quiet(Instant::now()), Quiet::No));
        let mut ack = Vec::new();
        let reply = rmpv::Value::Map(vec![("ack".into(), "c1".into())]);
        rmpv::encode::write_value(&mut ack, &reply).expect("encodes");
        watch.read(Direction::ToClient, &ack);
        assert!(
            matches!(watch.quiet(Instant::now()), Quiet::No),
            "ack not written yet"
        );
        watch.wrote(Direction::ToClient, ack.len());
        assert!(is_now(watch.quiet(Instant::now())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_due_fin_waits_while_the_client_has_spoken() {
        let config = RecycleConfig {
            protocol: Protocol::Forward,
            ..RecycleConfig::default()
        };
        let mut watch = Watch::new("l", &config, Arc::default());
        watch.fin_is_due(Reason::Age);
        watch.send_fin_unless(|| true);
        assert!(watch.closing.is_none(), "no FIN over unread bytes");
        // Not at once again (the relay would spin until the runtime
        // reports the bytes), but once they were read or quiet_period
        // passed without them.
        let at = Instant::now() + config.quiet_period;
        assert!(matches!(watch.quiet(Instant::now()), Quiet::At(when) if when == at));
        watch.read(Direction::ToUpstream, b"");
        assert!(is_now(watch.quiet(Instant::now())));
        watch.send_fin_unless(|| true);
        assert!(watch.closing.is_none(), "nothing was due");
        watch.fin_is_due(Reason::Age);
        watch.send_fin_unless(|| true);
        tokio::time::advance(config.quiet_period).await;
        assert!(is_now(watch.quiet(Instant::now())));
        watch.fin_is_due(Reason::Age);
        watch.send_fin_unless(|| false);
        let linger_end = Instant::now() + RECYCLE_LINGER;
        assert_eq!(watch.closing, Some((Reason::Age, linger_end)));
    }

    #[test]
    fn bytes_moving_after_the_quiet_moment_cancel_the_due_fin() {
        let mut watch = Watch::new("l", &RecycleConfig::default(), Arc::default());
        watch.fin_is_due(Reason::Rebalance);
        watch.read(Direction::ToUpstream, b"get k\r\n");
        watch.send_fin_unless(|| false);
        assert!(watch.closing.is_none());
        assert!(matches!(watch.quiet(Instant::now()), Quiet::No));
    }

    #[test]
    fn closed_connections_leave_the_registry() {
        let registry = Arc::new(Registry::default());
        let held = open(&registry, "s0", 3);
        registry.request_all(Reason::Drain);
        drop(held);
        let connections = registry.lock();
        assert!(connections.open.is_empty());
        assert!(connections.per_peer.is_empty());
    }
}
