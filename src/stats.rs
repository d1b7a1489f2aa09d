//! Process-wide counters, updated as connections close. Atomics, so that
//! the demo (and later workers and metrics) can read them from any thread.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct Stats {
    /// Connections that have closed.
    pub connections_closed: AtomicU64,
    /// Bytes ever written to spill files, both directions.
    pub bytes_spilled: AtomicU64,
}

impl Stats {
    pub fn record_close(&self, spilled: u64) {
        self.connections_closed.fetch_add(1, Ordering::Relaxed);
        self.bytes_spilled.fetch_add(spilled, Ordering::Relaxed);
    }

    pub fn connections_closed(&self) -> u64 {
        self.connections_closed.load(Ordering::Relaxed)
    }

    pub fn bytes_spilled(&self) -> u64 {
        self.bytes_spilled.load(Ordering::Relaxed)
    }
}
