//! A shared budget of bytes, two of them: the disk all spill files
//! together may occupy (`--max-disk`), and the memory all buffers together
//! may hold (`--max-memory`).
//!
//! Every spill file charges the blocks it holds (written or reserved, and
//! not yet given back), so the disk limit is on what `df` would see, not
//! on bytes ever written; every memory buffer charges its size while it is
//! allocated, and every pipe its memory while it holds bytes. Atomics,
//! shared by every connection of every worker. An unlimited budget is
//! never touched on the way (`is_limited`), so it costs nothing.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    /// Bumped whenever space is given back: waiters compare it to know
    /// whether trying again can succeed.
    releases: AtomicU64,
}

impl Budget {
    /// `None`: no limit (the accounting still runs, for the logs).
    pub fn new(limit: Option<u64>) -> Budget {
        Budget {
            limit: limit.unwrap_or(u64::MAX),
            used: AtomicU64::new(0),
            releases: AtomicU64::new(0),
        }
    }

    /// Charge up to `want` bytes, in whole multiples of `unit`; returns what
    /// was granted (possibly 0).
    pub fn charge_up_to(&self, want: u64, unit: u64) -> u64 {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let free = self.limit.saturating_sub(used);
            let grant = want.min(free / unit * unit);
            if grant == 0 {
                return 0;
            }
            match self.used.compare_exchange_weak(
                used,
                used + grant,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return grant,
                Err(now) => used = now,
            }
        }
    }

    pub fn release(&self, bytes: u64) {
        if bytes > 0 {
            let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
            debug_assert!(before >= bytes, "released more disk than was charged");
            self.releases.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Give back a charge whose space was never obtained: nobody waiting
    /// should take this for space having freed.
    pub fn refund(&self, bytes: u64) {
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before >= bytes, "refunded more disk than was charged");
    }

    /// Is there a limit at all? An unlimited budget needs no accounting.
    pub fn is_limited(&self) -> bool {
        self.limit != u64::MAX
    }

    /// The limit, if there is one.
    pub fn limit(&self) -> Option<u64> {
        self.is_limited().then_some(self.limit)
    }

    /// Could `bytes` be charged now? (A hint: another thread may take them
    /// first; `charge_all` decides.)
    pub fn has_room(&self, bytes: u64) -> bool {
        !self.is_limited() || self.used().saturating_add(bytes) <= self.limit
    }

    /// Charge exactly `bytes`, or nothing: true if charged.
    pub fn charge_all(&self, bytes: u64) -> bool {
        bytes == 0 || self.charge_up_to(bytes, bytes) == bytes
    }

    /// Charge `bytes` whatever the limit: for memory that must be had to
    /// make progress at all (see `SpillBuffer::push`), never for bytes a
    /// sender offers.
    pub fn charge_forced(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// How many times space was given back so far.
    pub fn releases(&self) -> u64 {
        self.releases.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_whole_units_up_to_the_limit() {
        let b = Budget::new(Some(10_000));
        assert_eq!(b.charge_up_to(4096, 4096), 4096);
        assert_eq!(
            b.charge_up_to(8192, 4096),
            4096,
            "5904 free: one whole block"
        );
        assert_eq!(
            b.charge_up_to(4096, 4096),
            0,
            "1808 free: not a whole block"
        );
        let before = b.releases();
        b.release(4096);
        assert!(b.releases() > before);
        assert_eq!(b.used(), 4096);
        assert_eq!(b.charge_up_to(100_000, 4096), 4096);
    }

    #[test]
    fn unlimited_still_counts() {
        let b = Budget::new(None);
        assert_eq!(b.charge_up_to(1 << 40, 4096), 1 << 40);
        assert_eq!(b.used(), 1 << 40);
    }
}
