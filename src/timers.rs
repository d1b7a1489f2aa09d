//! Deadlines for the event loop: connect timeouts and health checks.
//!
//! A min-heap of (when, what). Entries are never removed early: whoever
//! pops one checks that it still applies (the connection may have
//! connected, or gone and its slot been reused), which keeps arming a
//! timer O(log n) and cancelling it free.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// Connection `conn` in `slot` gives up on connect attempt `attempt`.
    ConnectTimeout {
        slot: usize,
        conn: u64,
        attempt: u32,
    },
    /// Connection `conn` in `slot` could not open a backend socket (out of
    /// fds): try again.
    ConnectRetry { slot: usize, conn: u64 },
    /// Connection `conn` in `slot` has lingered long enough.
    LingerEnd { slot: usize, conn: u64 },
    /// Connection `conn` in `slot` paused reading to let a receiver catch
    /// up (`--spill-after`): time to look again, and spill if it has not.
    SpillDue { slot: usize, conn: u64 },
    /// Connection `conn` in `slot` has a deadline of its own to look at
    /// (an HTTP connection's header, body, keep-alive or backend timeout).
    Deadline { slot: usize, conn: u64 },
    /// Look for connections idle for `--idle-timeout`.
    IdleSweep,
    /// Time to probe every backend.
    HealthRound,
    /// Probe number `probe` of backend `backend` gives up.
    HealthTimeout { backend: usize, probe: u64 },
}

struct Entry {
    at: Instant,
    seq: u64,
    timer: Timer,
}

// Ordered by deadline, then by arming order; reversed so that the std
// max-heap pops the earliest first.
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}

#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Entry>,
    seq: u64,
}

impl Timers {
    pub fn arm(&mut self, at: Instant, timer: Timer) {
        self.seq += 1;
        self.heap.push(Entry {
            at,
            seq: self.seq,
            timer,
        });
    }

    /// When the earliest timer is due, if any is armed.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|e| e.at)
    }

    /// The earliest timer due by `now`, removed.
    pub fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        if self.heap.peek()?.at <= now {
            self.heap.pop().map(|e| e.timer)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn earliest_first_then_in_arming_order() {
        let mut t = Timers::default();
        let now = Instant::now();
        t.arm(now + Duration::from_secs(2), Timer::HealthRound);
        let a = Timer::HealthTimeout {
            backend: 0,
            probe: 1,
        };
        let b = Timer::HealthTimeout {
            backend: 1,
            probe: 1,
        };
        t.arm(now + Duration::from_secs(1), a);
        t.arm(now + Duration::from_secs(1), b);
        assert_eq!(t.next_deadline(), Some(now + Duration::from_secs(1)));
        assert_eq!(t.pop_due(now), None);
        let later = now + Duration::from_secs(1);
        assert_eq!(t.pop_due(later), Some(a));
        assert_eq!(t.pop_due(later), Some(b));
        assert_eq!(t.pop_due(later), None);
        assert_eq!(
            t.pop_due(now + Duration::from_secs(3)),
            Some(Timer::HealthRound)
        );
    }
}
