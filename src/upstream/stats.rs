//! What happened to each peer, kept two ways: atomics that `/status` reads,
//! and handles into the metrics recorder that `/metrics` renders. Both are
//! updated per connection event (open, close, failed attempt), never per
//! byte, and nothing here is a lock on the data path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use metrics::{Counter, Gauge, Histogram};

use crate::balancer::PeerState;
use crate::metrics::names;

/// One peer's counters. Shared like `PeerHealth`: a rebuilt group keeps the
/// stats of the peers it still has.
#[derive(Debug)]
pub struct PeerStats {
    total: AtomicU64,
    active: AtomicU64,
    failures: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    /// Written only when an attempt fails, read by `/status`.
    last_failure: Mutex<Option<LastFailure>>,
    /// Written by the admin endpoint, which samples each peer's state.
    state: Mutex<StateSince>,
    metrics: PeerMetrics,
}

/// The state a peer was last seen in (as `/status` names it) and since when.
#[derive(Debug)]
struct StateSince {
    /// `None` until first seen: the peer is taken to have been in its first
    /// seen state since it was built.
    state: Option<&'static str>,
    since: SystemTime,
}

/// The most recent failed attempt on a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastFailure {
    pub at: SystemTime,
    pub reason: String,
}

/// The peer's series in the recorder, looked up once when the peer is built.
#[derive(Debug)]
struct PeerMetrics {
    total: Counter,
    active: Gauge,
    failures: Counter,
    sent: Counter,
    received: Counter,
    up: Gauge,
    /// Connections left while the peer drains; 0 otherwise.
    draining: Gauge,
    weight: Gauge,
    connect_duration: Histogram,
}

/// A point-in-time copy of a peer's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub total: u64,
    pub active: u64,
    pub failures: u64,
    pub sent: u64,
    pub received: u64,
    pub last_failure: Option<LastFailure>,
}

impl PeerStats {
    /// Stats for peer `server` (its label) of upstream `upstream`.
    pub fn new(upstream: &str, server: &str) -> PeerStats {
        let labels = [
            ("upstream", upstream.to_owned()),
            ("server", server.to_owned()),
        ];
        let metrics = PeerMetrics {
            total: metrics::counter!(names::UPSTREAM_CONNECTIONS_TOTAL, &labels),
            active: metrics::gauge!(names::UPSTREAM_CONNECTIONS_ACTIVE, &labels),
            failures: metrics::counter!(names::UPSTREAM_CONNECT_FAILURES_TOTAL, &labels),
            sent: metrics::counter!(names::UPSTREAM_BYTES_SENT_TOTAL, &labels),
            received: metrics::counter!(names::UPSTREAM_BYTES_RECEIVED_TOTAL, &labels),
            up: metrics::gauge!(names::UPSTREAM_SERVER_UP, &labels),
            draining: metrics::gauge!(names::UPSTREAM_DRAINING_CONNECTIONS, &labels),
            weight: metrics::gauge!(names::UPSTREAM_SERVER_WEIGHT, &labels),
            connect_duration: metrics::histogram!(names::UPSTREAM_CONNECT_DURATION, &labels),
        };
        PeerStats {
            total: AtomicU64::new(0),
            active: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            last_failure: Mutex::new(None),
            state: Mutex::new(StateSince {
                state: None,
                since: SystemTime::now(),
            }),
            metrics,
        }
    }

    /// Records that the peer is in `state` now; returns since when it has
    /// been, as far as the samples tell (a change counts from the first
    /// sample that saw it).
    pub fn note_state(&self, state: &'static str, now: SystemTime) -> SystemTime {
        let mut seen = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.state.is_some_and(|before| before != state) {
            seen.since = now;
        }
        seen.state = Some(state);
        seen.since
    }

    /// An attempt connected after `took`: one more relayed connection.
    pub fn connected(&self, took: Duration) {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.total.increment(1);
        self.metrics.active.increment(1.0);
        self.metrics.connect_duration.record(took.as_secs_f64());
    }

    /// A relayed connection ended.
    pub fn closed(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.metrics.active.decrement(1.0);
    }

    /// An attempt failed (connect error or timeout, TLS handshake failure).
    pub fn failed(&self, reason: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.metrics.failures.increment(1);
        let mut last = self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *last = Some(LastFailure {
            at: SystemTime::now(),
            reason: reason.to_owned(),
        });
    }

    /// Bytes relayed since the last call: `sent` client → upstream,
    /// `received` upstream → client.
    pub fn relayed(&self, sent: u64, received: u64) {
        if sent > 0 {
            self.sent.fetch_add(sent, Ordering::Relaxed);
            self.metrics.sent.increment(sent);
        }
        if received > 0 {
            self.received.fetch_add(received, Ordering::Relaxed);
            self.metrics.received.increment(received);
        }
    }

    /// Sets `server_up` from the peer's state as of now; failure windows
    /// expire with time, so this is refreshed when metrics are rendered.
    pub fn refresh_up(&self, state: PeerState) {
        let up = match state {
            PeerState::Up => 1.0,
            PeerState::Failed | PeerState::Down => 0.0,
        };
        self.metrics.up.set(up);
    }

    /// Sets `draining_connections` to the connections left if the peer
    /// drains, else 0; refreshed when metrics are rendered.
    pub fn refresh_draining(&self, draining: bool) {
        let left = if draining {
            self.active.load(Ordering::Relaxed) as f64
        } else {
            0.0
        };
        self.metrics.draining.set(left);
    }

    /// Sets `server_weight`: the weight new connections are shared by, so 0
    /// for a peer taking none (down or draining); refreshed when metrics are
    /// rendered.
    pub fn refresh_weight(&self, weight: u32, down: bool) {
        let weight = if down { 0.0 } else { f64::from(weight) };
        self.metrics.weight.set(weight);
    }

    pub fn snapshot(&self) -> PeerSnapshot {
        PeerSnapshot {
            total: self.total.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            last_failure: self
                .last_failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// `sluice_upstream_unavailable_total` of one upstream group.
pub fn unavailable_counter(upstream: &str) -> Counter {
    metrics::counter!(names::UPSTREAM_UNAVAILABLE_TOTAL, "upstream" => upstream.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_events() {
        let stats = PeerStats::new("pool", "a");
        stats.connected(Duration::from_millis(2));
        stats.connected(Duration::from_millis(3));
        stats.relayed(10, 0);
        stats.relayed(5, 7);
        stats.closed();
        stats.failed("connection refused");
        let snapshot = stats.snapshot();
        assert_eq!(
            (
                snapshot.total,
                snapshot.active,
                snapshot.failures,
                snapshot.sent,
                snapshot.received
            ),
            (2, 1, 1, 15, 7)
        );
        let last = snapshot.last_failure.unwrap();
        assert_eq!(last.reason, "connection refused");
        assert!(last.at <= SystemTime::now());
    }

    #[test]
    fn state_since_moves_only_when_the_state_changes() {
        let stats = PeerStats::new("pool", "a");
        let start = SystemTime::now();
        let built = stats.note_state("up", start);
        assert!(built <= start, "the first state counts from the build");
        assert_eq!(
            stats.note_state("up", start + Duration::from_secs(5)),
            built
        );
        let failed = start + Duration::from_secs(7);
        assert_eq!(stats.note_state("failed", failed), failed);
        assert_eq!(
            stats.note_state("failed", failed + Duration::from_secs(3)),
            failed
        );
        let back = failed + Duration::from_secs(4);
        assert_eq!(stats.note_state("up", back), back);
    }
}
