//! Which way bytes move on a relayed connection; shared by the relays and
//! the recycling watch that follows them.

/// Also an index: `as usize` gives 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    ToUpstream,
    ToClient,
}
