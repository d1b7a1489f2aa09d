//! What every worker reads and changes: the configuration, the backends,
//! how buffers are made, the connection limit, the accept-error log, the
//! process's lifecycle (stop, graceful shutdown) and the wakers that carry
//! news between threads. All of it atomics or set once, so no worker ever
//! waits for another.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use mio::Waker;

use crate::balancer::Backends;
use crate::config::Config;
use crate::metrics::WorkerMetrics;
use crate::relay::BufferPlan;
use crate::stats::Stats;

pub struct Shared {
    pub config: Config,
    pub backends: Backends,
    pub plan: BufferPlan,
    pub stats: Arc<Stats>,
    pub limit: ConnectionLimit,
    pub accept_errors: AcceptErrors,
    pub lifecycle: Lifecycle,
    /// Each worker's counters, by worker index.
    pub metrics: Vec<WorkerMetrics>,
    next_id: AtomicU64,
}

impl Shared {
    pub fn new(
        config: Config,
        backends: Backends,
        plan: BufferPlan,
        lifecycle: Lifecycle,
    ) -> Shared {
        let metrics = (0..config.workers)
            .map(|_| WorkerMetrics::new(backends.capacity()))
            .collect();
        Shared {
            metrics,
            limit: ConnectionLimit::new(config.max_connections),
            config,
            backends,
            plan,
            stats: Arc::default(),
            accept_errors: AcceptErrors::default(),
            lifecycle,
            next_id: AtomicU64::new(1),
        }
    }

    /// A new connection's number, for its `[conn N]` log prefix.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Give back a place under `--max-connections`, for `worker`. If the
    /// limit was reached, the other workers are woken: those paused at it
    /// may accept again (`worker` itself looks before its next poll).
    pub fn release_connection(&self, worker: usize) {
        if self.limit.release() {
            self.lifecycle.wake_others(worker);
        }
    }
}

/// `--max-connections`: client connections open in all workers. A worker
/// reserves a place before it accepts, so that two workers accepting at
/// once cannot overshoot together.
pub struct ConnectionLimit {
    max: usize,
    open: AtomicUsize,
    /// The one WARN per episode of the limit reached, whichever worker
    /// meets it.
    logged: AtomicBool,
}

impl ConnectionLimit {
    fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit {
            max,
            open: AtomicUsize::new(0),
            logged: AtomicBool::new(false),
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn has_room(&self) -> bool {
        self.open() < self.max
    }

    /// Take a place for a client about to be accepted. False (and a WARN,
    /// once per episode) at the limit. Compare-and-swap, never
    /// add-then-undo: a count that went over the limit even for a moment
    /// could make another worker see the limit reached when it was not,
    /// and pause with no one left to wake it.
    pub fn reserve(&self) -> bool {
        let max = self.max;
        let reserved = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if reserved.is_ok() {
            return true;
        }
        if !self.logged.swap(true, Ordering::AcqRel) {
            log::warn!("--max-connections {max} reached: new clients wait in the listen backlog");
        }
        false
    }

    /// Give a place back. True if the limit was reached: workers paused at
    /// it must hear of the room.
    fn release(&self) -> bool {
        self.open.fetch_sub(1, Ordering::AcqRel) >= self.max
    }

    /// A worker paused at the limit found room again: the INFO line, once.
    pub fn below_limit(&self) {
        if self.logged.swap(false, Ordering::AcqRel) {
            log::info!("below --max-connections {} again: accepting", self.max);
        }
    }
}

/// Accept failures for want of fds or memory: the fds are the process's,
/// so one ERROR serves every worker until the worker that logged it has
/// drained its backlog.
#[derive(Default)]
pub struct AcceptErrors {
    /// The worker (index + 1) whose burst has been logged; 0 when none is.
    burst: AtomicUsize,
}

impl AcceptErrors {
    /// True if this failure begins a burst, to be logged.
    pub fn burst_begins(&self, worker: usize) -> bool {
        self.burst
            .compare_exchange(0, worker + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// `worker`'s backlog is drained: if its burst was the one logged, it
    /// is over.
    pub fn burst_ends(&self, worker: usize) {
        let _ = self
            .burst
            .compare_exchange(worker + 1, 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Stopping and graceful shutdown, and the wakers that tell threads so.
pub struct Lifecycle {
    /// Exit now (a second signal, or `Stopper::stop`).
    stop: AtomicBool,
    /// Set once: when the graceful shutdown must end.
    shutdown_deadline: OnceLock<Instant>,
    /// Workers that have returned.
    finished: AtomicUsize,
    workers: Vec<Waker>,
    supervisor: Waker,
}

impl Lifecycle {
    pub fn new(workers: Vec<Waker>, supervisor: Waker) -> Lifecycle {
        Lifecycle {
            stop: AtomicBool::new(false),
            shutdown_deadline: OnceLock::new(),
            finished: AtomicUsize::new(0),
            workers,
            supervisor,
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub fn shutdown_deadline(&self) -> Option<Instant> {
        self.shutdown_deadline.get().copied()
    }

    /// Begin a graceful shutdown that must end by `deadline`. False if one
    /// had begun already.
    pub fn begin_shutdown(&self, deadline: Instant) -> bool {
        let first = self.shutdown_deadline.set(deadline).is_ok();
        self.workers.iter().for_each(wake);
        first
    }

    /// Exit now: every worker returns at its next turn.
    pub fn stop_all(&self) {
        self.stop.store(true, Ordering::Release);
        self.workers.iter().for_each(wake);
        let _ = self.supervisor.wake();
    }

    /// Every worker but `worker`.
    fn wake_others(&self, worker: usize) {
        for (i, waker) in self.workers.iter().enumerate() {
            if i != worker {
                wake(waker);
            }
        }
    }

    /// A worker has returned (or panicked: then the others are stopped
    /// too, since the process cannot keep its promises one short).
    pub fn worker_finished(&self, panicking: bool) {
        if panicking {
            self.stop_all();
        }
        self.finished.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.supervisor.wake() {
            log::error!("cannot wake the supervisor: {e}");
        }
    }

    pub fn workers_finished(&self) -> usize {
        self.finished.load(Ordering::Acquire)
    }
}

/// Wake one worker; a failure is logged, as there is no one to return it to.
fn wake(waker: &Waker) {
    if let Err(e) = waker.wake() {
        log::error!("cannot wake a worker: {e}");
    }
}
