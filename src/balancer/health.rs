//! One peer's live state, in its three concerns: the connections it carries,
//! the passive failure accounting of real attempts (nginx's `fails`,
//! `checked`, `accessed` and working weight), and the verdict of active
//! health checks. Each has its own lock, so a health check never waits for a
//! pick and a release never waits for a check.
//!
//! It is shared, so a rebuilt group (reload, re-resolution) keeps the state of
//! peers it still has, and connections opened before the rebuild release into
//! the same counters.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::PeerParams;

/// Locks `mutex`; every update leaves its fields consistent, so a panic
/// elsewhere while the lock was held leaves nothing to repair.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Passive accounting of attempts, as nginx's round-robin module keeps it.
#[derive(Debug, Clone, Default)]
struct Failures {
    /// Failures since the last forgiven success (nginx `fails`).
    fails: u32,
    /// When a failure or a pick last opened a `fail_timeout` window (nginx `checked`).
    checked: Option<Instant>,
    /// When the last failure happened (nginx `accessed`).
    accessed: Option<Instant>,
    /// How far the working weight is below `weight` (nginx keeps
    /// `effective_weight = weight - deficit`); kept as a deficit so a rebuild
    /// that changes the weight keeps the peer's penalty, not a stale weight.
    deficit: u32,
    /// The pick that opened the current window went to a peer marked failed:
    /// its successful connect is a recovery (for slow start).
    probing: bool,
    /// When a probe last connected after the peer was marked failed.
    recovered_at: Option<Instant>,
}

impl Failures {
    /// Marked failed by max_fails and still inside fail_timeout.
    fn is_failed(&self, params: &PeerParams, now: Instant) -> bool {
        params.max_fails > 0
            && self.fails >= params.max_fails
            && self.checked.is_some_and(|checked| {
                now.saturating_duration_since(checked) <= params.fail_timeout
            })
    }
}

/// Active health-check state.
#[derive(Debug, Clone, Default)]
struct Checks {
    /// Active health checks found the peer unhealthy.
    unhealthy: bool,
    /// Consecutive failed (or, while unhealthy, passed) health checks.
    streak: u32,
    /// When checks last brought the peer back.
    recovered_at: Option<Instant>,
}

/// A change of a peer's health-check state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckTransition {
    BecameUnhealthy,
    BecameHealthy,
}

/// One peer's live state; see the module documentation.
#[derive(Debug, Default)]
pub struct PeerHealth {
    active: AtomicU32,
    failures: Mutex<Failures>,
    checks: Mutex<Checks>,
}

/// One peer's health at the moment of a pick or a status report.
pub(super) struct Snapshot {
    pub active: u32,
    /// Failed (max_fails) or unhealthy (health checks).
    pub failed: bool,
    pub unhealthy: bool,
    /// `weight` minus the working weight.
    pub deficit: u32,
    pub recovered_at: Option<Instant>,
}

impl PeerHealth {
    /// A connection attempt to the peer connected: if its pick was the probe
    /// of a failed peer, the peer's slow start begins now. Its failures are
    /// forgiven only when the connection ends ([`PeerHealth::closed`]), as
    /// nginx does.
    pub fn connected(&self, now: Instant) {
        let mut failures = lock(&self.failures);
        if failures.probing {
            failures.recovered_at = Some(now);
        }
        failures.probing = false;
    }

    /// A connection attempt failed and is no longer active: one more failure,
    /// a new `fail_timeout` window, and (with `max_fails`) the working weight
    /// drops by `weight / max_fails`, not below 0.
    pub fn failed(&self, params: &PeerParams, now: Instant) {
        self.release();
        let mut failures = lock(&self.failures);
        failures.fails = failures.fails.saturating_add(1);
        failures.accessed = Some(now);
        failures.checked = Some(now);
        failures.probing = false;
        // Without max_fails (0) the working weight stays.
        if let Some(penalty) = params.weight.checked_div(params.max_fails) {
            failures.deficit = failures.deficit.saturating_add(penalty).min(params.weight);
        }
    }

    /// A connected (relayed) connection ended: if a pick opened a new window
    /// since the last failure, the failures are forgiven (nginx's "mark peer
    /// live if check passed", done when the session is freed).
    pub fn closed(&self) {
        self.release();
        let mut failures = lock(&self.failures);
        if failures.accessed < failures.checked {
            failures.fails = 0;
        }
    }

    /// An attempt ended without an outcome (the client went away while
    /// connecting): it is no longer active, and nothing is counted.
    pub fn abandoned(&self) {
        self.release();
    }

    fn release(&self) {
        // Never below zero: a release always follows its own pick.
        let _ = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |active| {
                Some(active.saturating_sub(1))
            });
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    /// Failed attempts counted since the last forgiven success.
    pub fn fails(&self) -> u32 {
        lock(&self.failures).fails
    }

    /// Whether active health checks have taken the peer out of rotation.
    pub fn is_unhealthy(&self) -> bool {
        lock(&self.checks).unhealthy
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
        let mut checks = lock(&self.checks);
        // The streak counts results that point away from the current state.
        if passed == checks.unhealthy {
            checks.streak = checks.streak.saturating_add(1);
        } else {
            checks.streak = 0;
        }
        if checks.unhealthy && checks.streak >= passes {
            checks.unhealthy = false;
            checks.streak = 0;
            checks.recovered_at = Some(now);
            Some(CheckTransition::BecameHealthy)
        } else if !checks.unhealthy && checks.streak >= fails {
            checks.unhealthy = true;
            checks.streak = 0;
            Some(CheckTransition::BecameUnhealthy)
        } else {
            None
        }
    }

    /// When the peer last recovered (a probe connected after it was marked
    /// failed, or health checks brought it back); `None` if never.
    pub fn recovered_at(&self) -> Option<Instant> {
        let passive = lock(&self.failures).recovered_at;
        let active = lock(&self.checks).recovered_at;
        passive.max(active)
    }

    pub(super) fn snapshot(&self, params: &PeerParams, now: Instant) -> Snapshot {
        let (failed, deficit, passive_recovery) = {
            let failures = lock(&self.failures);
            (
                failures.is_failed(params, now),
                failures.deficit,
                failures.recovered_at,
            )
        };
        let (unhealthy, active_recovery) = {
            let checks = lock(&self.checks);
            (checks.unhealthy, checks.recovered_at)
        };
        Snapshot {
            active: self.active(),
            failed,
            unhealthy,
            deficit,
            recovered_at: passive_recovery.max(active_recovery),
        }
    }

    /// The peer was picked: it is active, and a pick once `fail_timeout` has
    /// passed opens a new window (nginx's `checked = now`); if the peer had
    /// been marked failed, this pick is the one probe the window lets through.
    pub(super) fn picked(&self, params: &PeerParams, now: Instant) {
        self.active.fetch_add(1, Ordering::AcqRel);
        let mut failures = lock(&self.failures);
        if failures
            .checked
            .is_none_or(|checked| now.saturating_duration_since(checked) > params.fail_timeout)
        {
            failures.probing = params.max_fails > 0 && failures.fails >= params.max_fails;
            failures.checked = Some(now);
        }
    }

    /// The pick added the working weight to the rotation while it was below
    /// `weight`: it climbs back by one (nginx's `effective_weight++`).
    pub(super) fn raise_working_weight(&self) {
        let mut failures = lock(&self.failures);
        failures.deficit = failures.deficit.saturating_sub(1);
    }
}
