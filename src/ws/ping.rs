//! When a connection's next ping falls due.
//!
//! Each connection pings its client once per interval, counted from its
//! own last ping. Left at that, 10,000 connections at the default 25 s
//! interval fall due at 400 different instants a second, and each wakes the
//! runtime for one ping. The grid rounds each due time up to the next slot
//! boundary (a tenth of the interval, at most a second), counted from one
//! instant for the whole pod: the pings due within a slot go out in one
//! wake-up, and their pongs come back together. A ping is then late by
//! less than a slot, never early.

use std::time::Duration;

use tokio::time::Instant;

/// The longest slot.
const MAX_SLOT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct PingGrid {
    interval: Duration,
    /// Where the slots are counted from.
    epoch: Instant,
    slot: Duration,
}

impl PingGrid {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            epoch: Instant::now(),
            slot: slot_of(interval),
        }
    }

    /// The longest a connection can go between two pings at `interval`: the
    /// interval and a slot. A client that only answers pings is heard from
    /// that often, so an idle timeout must be longer.
    pub fn longest_gap(interval: Duration) -> Duration {
        interval + slot_of(interval)
    }

    /// The next ping of a connection that last pinged (or connected) at
    /// `from`: one interval later, rounded up to the grid.
    pub fn due(&self, from: Instant) -> Instant {
        let at = from + self.interval;
        let since = at.saturating_duration_since(self.epoch).as_nanos();
        let slot = self.slot.as_nanos();
        let slots = since.div_ceil(slot);
        // Nanoseconds since the epoch fit a u64 for five centuries.
        self.epoch + Duration::from_nanos((slots * slot) as u64)
    }
}

fn slot_of(interval: Duration) -> Duration {
    (interval / 10).clamp(Duration::from_millis(1), MAX_SLOT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pings_due_within_a_slot_fall_due_together_never_early() {
        let interval = Duration::from_secs(25);
        let grid = PingGrid::new(interval);
        // The grid counts from its creation: `start` is a slot boundary, and
        // the slot is a second.
        let start = Instant::now();
        let within_one_slot = [1u64, 400, 999, 1_000].map(|ms| start + Duration::from_millis(ms));
        let dues = within_one_slot.map(|from| grid.due(from));
        assert!(dues.iter().all(|d| *d == dues[0]), "{dues:?}");
        for (from, due) in within_one_slot.iter().zip(dues) {
            let earliest = *from + interval;
            assert!(due >= earliest && due - earliest < MAX_SLOT);
        }
        let next_slot = grid.due(start + Duration::from_millis(1_001));
        assert_eq!(next_slot - dues[0], MAX_SLOT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_interval_gets_a_fine_grid() {
        let interval = Duration::from_millis(200);
        let grid = PingGrid::new(interval);
        let from = Instant::now() + Duration::from_millis(3);
        let due = grid.due(from);
        // Slots of 20 ms: 203 ms rounds up to 220 ms.
        assert_eq!(due - from, Duration::from_millis(217));
    }
}
