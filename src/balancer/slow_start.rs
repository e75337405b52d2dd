//! `slow_start`: after a peer recovers, its weight climbs from near zero to
//! its configured weight over the slow-start period.
//!
//! Weights handed to algorithms are scaled by [`WEIGHT_SCALE`] so the ramp has
//! fine steps even for weight 1; every method compares weights only relative
//! to each other, so the common factor changes no pick.

use std::time::{Duration, Instant};

/// Steps per unit of weight.
pub const WEIGHT_SCALE: u64 = 1000;

/// The weight an algorithm sees for a peer of `weight` that recovered at
/// `recovered_at`: `weight × elapsed / slow_start`, never below one step,
/// and the full weight once the period is over (or without slow start).
pub fn effective_weight(
    weight: u32,
    slow_start: Duration,
    recovered_at: Option<Instant>,
    now: Instant,
) -> u64 {
    let full = u64::from(weight) * WEIGHT_SCALE;
    let Some(recovered_at) = recovered_at else {
        return full;
    };
    let elapsed = now.saturating_duration_since(recovered_at);
    if slow_start.is_zero() || elapsed >= slow_start {
        return full;
    }
    let ramped = u128::from(full) * elapsed.as_nanos() / slow_start.as_nanos();
    u64::try_from(ramped).unwrap_or(full).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weight_climbs_linearly_over_the_period() {
        let recovered = Instant::now();
        let period = Duration::from_secs(30);
        let at = |secs: f64| {
            effective_weight(
                4,
                period,
                Some(recovered),
                recovered + Duration::from_secs_f64(secs),
            )
        };
        assert_eq!(at(0.0), 1);
        assert_eq!(at(7.5), 1000);
        assert_eq!(at(15.0), 2000);
        assert_eq!(at(29.97), 3996);
        assert_eq!(at(30.0), 4000);
        assert_eq!(at(300.0), 4000);
    }

    #[test]
    fn no_recovery_or_no_slow_start_means_the_full_weight() {
        let now = Instant::now();
        assert_eq!(
            effective_weight(2, Duration::from_secs(30), None, now),
            2000
        );
        assert_eq!(effective_weight(2, Duration::ZERO, Some(now), now), 2000);
    }
}
