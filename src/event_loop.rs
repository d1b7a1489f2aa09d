//! One worker: an event loop on its own thread, with its own `Poll`,
//! listening socket, slab of connections and timers. What the workers
//! share (pool, limits, counters, shutdown) is in `proxy::Shared`.
//!
//! Tokens: 0 the listener, 1 the waker (another worker or the supervisor
//! has news), then one per backend for its health probe (worker 0 runs the
//! health checks), then two per connection slot, client and backend:
//! `conn_base + slot * 2 (+1)`.
//!
//! One turn: poll (sleeping until the earliest timer when nothing is
//! ready), note readiness, look at what the other threads said, run due
//! timers, drive every connection touched, then accept. Work that a turn
//! leaves (a connection whose budget ran out, a listener with more
//! clients) makes the next poll not wait.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Poll, Token};

use crate::buffer_pool;
use crate::config::Config;
use crate::connection::{Connection, Ctx, Side, Status};
use crate::health::HealthChecks;
use crate::io_error::is_transient_accept_error;
use crate::shared::Shared;
use crate::timers::{Timer, Timers};

const FIRST_PROBE: usize = 2;

/// Accepts per turn before the connections already open get theirs. Each
/// accept also dials a backend, which on loopback runs the whole handshake
/// inside our call: 64 in a row held every open connection's response for
/// a millisecond or more, the latency tail under a connection-per-request
/// load. With 16, wrk -c50 `Connection: close` went from 10.3k to 11.5k
/// req/s and p99 from ~9ms to ~7.5ms (8: 11.0k; 32: 10.7k).
const ACCEPTS_PER_TURN: usize = 16;

/// How long to stop accepting when the process is out of file descriptors
/// or memory and no connection has closed to free one: accepting again at
/// once would only fail again, in a spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How often directions that could not get disk space try again, when no
/// spill file has given space back meanwhile (the disk may be shared).
const DISK_RETRY: Duration = Duration::from_millis(250);

/// During a graceful shutdown, how often to look for connections that have
/// gone quiet, and how long one must have been quiet to be closed.
const SHUTDOWN_TICK: Duration = Duration::from_millis(100);
const QUIET_AT_SHUTDOWN: Duration = Duration::from_secs(1);

/// Open connections that must have been reached before their closing
/// hands memory back to the OS.
const MIN_PEAK_TO_TRIM: usize = 64;

/// Smallest read into the spill path's scratch buffer, whatever
/// `--memory-buffer` is: one per worker, so a larger one costs little, and
/// a spilling direction then makes one read and one `pwrite` per 256KiB
/// rather than per 64KiB (slow-client bench: backend hold p99 417ms at
/// 64KiB, 346ms at 256KiB; 1MiB did no better).
const MIN_SCRATCH: usize = 256 * 1024;

/// Largest read into the spill path's scratch buffer.
const MAX_SCRATCH: usize = 1 << 20;

/// Where accepting stands.
#[derive(Default)]
struct Accepting {
    /// The listener may have clients waiting (it is edge-triggered).
    pending: bool,
    /// Out of fds or memory: not before then (or until a connection closes).
    paused_until: Option<Instant>,
    /// `--max-connections` is reached: clients wait in the kernel backlog.
    at_limit: bool,
}

/// A graceful shutdown under way.
struct Draining {
    deadline: Instant,
    /// When to look for quiet connections again.
    next_check: Instant,
    quiet_closed: usize,
    drained: usize,
}

/// What one worker's part of a graceful shutdown came to.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShutdownTally {
    /// Connections that finished on their own.
    pub finished: usize,
    /// Closed gently once nothing was moving.
    pub quiet_closed: usize,
    /// Cut at the deadline, and the bytes they still held.
    pub cut: usize,
    pub undelivered: u64,
}

impl ShutdownTally {
    pub fn add(&mut self, other: &ShutdownTally) {
        self.finished += other.finished;
        self.quiet_closed += other.quiet_closed;
        self.cut += other.cut;
        self.undelivered += other.undelivered;
    }
}

pub struct Worker {
    index: usize,
    poll: Poll,
    /// `None` once a shutdown has begun: new clients are refused.
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    slots: Vec<Option<Connection>>,
    free_slots: Vec<usize>,
    /// This worker's connections open now, and the most open since memory
    /// was last given back to the OS.
    live: usize,
    peak_live: usize,
    /// First connection token: after the probes'.
    conn_base: usize,
    accepting: Accepting,
    scratch: Vec<u8>,
    timers: Timers,
    health: Option<HealthChecks>,
    /// Connections that stopped reading for want of disk space.
    disk_waiters: Vec<usize>,
    disk_releases_seen: u64,
    disk_retry_at: Option<Instant>,
    draining: Option<Draining>,
}

/// A connection's view of the loop, borrowed field by field so that the
/// slab can be borrowed beside it.
macro_rules! ctx {
    ($p:ident) => {
        Ctx {
            registry: $p.poll.registry(),
            pool: &$p.shared.backends,
            timers: &mut $p.timers,
            scratch: &mut $p.scratch,
            stats: &$p.shared.stats,
            connect_timeout: $p.shared.config.connect_timeout,
            max_attempts: max_attempts(&$p.shared.config),
            keep_half_open: $p.shared.config.keep_half_open,
        }
    };
}

impl Worker {
    pub const LISTENER: Token = Token(0);
    pub const WAKER: Token = Token(1);

    /// A worker around `poll`, on which the listener and the waker are
    /// registered already.
    pub fn new(
        index: usize,
        poll: Poll,
        listener: TcpListener,
        local_addr: SocketAddr,
        shared: Arc<Shared>,
    ) -> Worker {
        let config = &shared.config;
        // Health checks need doing once, not once per worker.
        let health = config
            .health_check
            .filter(|_| index == 0)
            .map(|every| HealthChecks::new(every, config.backends.len(), FIRST_PROBE));
        Worker {
            index,
            poll,
            listener: Some(listener),
            local_addr,
            slots: Vec::new(),
            free_slots: Vec::new(),
            live: 0,
            peak_live: 0,
            conn_base: FIRST_PROBE + config.backends.len(),
            accepting: Accepting::default(),
            scratch: vec![0; (config.memory_buffer as usize).clamp(MIN_SCRATCH, MAX_SCRATCH)],
            timers: Timers::default(),
            health,
            disk_waiters: Vec::new(),
            disk_releases_seen: 0,
            disk_retry_at: None,
            draining: None,
            shared,
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// Serve until stopped, or until this worker's part of a graceful
    /// shutdown is done.
    /// Serve until stopped (`None`) or until this worker's part of a
    /// graceful shutdown is over (what its drain came to).
    pub fn run(mut self) -> io::Result<Option<ShutdownTally>> {
        if self.health.is_some() {
            self.timers.arm(Instant::now(), Timer::HealthRound);
        }
        let sweep = idle_sweep_every(self.shared.config.idle_timeout);
        self.timers.arm(Instant::now() + sweep, Timer::IdleSweep);
        let mut events = Events::with_capacity(1024);
        // Connections whose last turn ran out of budget with work left, and
        // those to drive this turn: both reused, never reallocated per turn.
        let mut busy: Vec<usize> = Vec::new();
        let mut touched: Vec<usize> = Vec::new();
        let mut in_turn: Vec<bool> = Vec::new();
        loop {
            let timeout = if !busy.is_empty() || self.can_accept() {
                Some(Duration::ZERO)
            } else {
                self.next_deadline()
                    .map(|t| t.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            touched.clear();
            touched.append(&mut busy);
            for event in events.iter() {
                match event.token() {
                    Self::LISTENER => self.accepting.pending = true,
                    Self::WAKER => {}
                    token if token.0 < self.conn_base => self.on_probe_event(token),
                    Token(t) => {
                        let slot = (t - self.conn_base) / 2;
                        let side = if (t - self.conn_base) % 2 == 0 {
                            Side::Client
                        } else {
                            Side::Backend
                        };
                        if let Some(conn) = self.slots.get_mut(slot).and_then(Option::as_mut) {
                            conn.on_event(side, event);
                            touched.push(slot);
                        }
                    }
                }
            }
            if self.shared.lifecycle.stopping() {
                return Ok(None);
            }
            self.hear_the_others();
            self.fire_timers(&mut touched);
            self.wake_disk_waiters(&mut touched);
            // First come, first driven: sorting by slot instead would serve
            // low slots first in every busy turn and give the high ones the
            // latency tail (p99 +40% under a connection-per-request load).
            dedup_in_order(&mut touched, &mut in_turn);
            for &slot in &touched {
                let Some(conn) = self.slots[slot].as_mut() else {
                    continue;
                };
                let status = conn.drive(&mut ctx!(self));
                if conn.waiting_for_disk() && !self.disk_waiters.contains(&slot) {
                    self.disk_waiters.push(slot);
                    self.disk_retry_at
                        .get_or_insert(Instant::now() + DISK_RETRY);
                }
                match status {
                    Status::Waiting => {}
                    Status::Busy => busy.push(slot),
                    Status::Finished => self.retire(slot),
                }
            }
            if let Some(drained) = self.drain_step() {
                return Ok(Some(drained));
            }
            if self.can_accept() {
                self.accept_some(&mut busy);
            }
        }
    }

    /// What other threads may have changed since the last turn: a graceful
    /// shutdown begun, room again under `--max-connections`. Two atomic
    /// loads when nothing did.
    fn hear_the_others(&mut self) {
        if self.draining.is_none() {
            if let Some(deadline) = self.shared.lifecycle.shutdown_deadline() {
                self.begin_drain(deadline);
            }
        }
        if self.accepting.at_limit && self.shared.limit.has_room() {
            self.accepting.at_limit = false;
            self.accepting.pending = true;
            self.shared.limit.below_limit();
        }
    }

    /// The earliest moment something is due without an event.
    fn next_deadline(&self) -> Option<Instant> {
        let disk = self.disk_retry_at.filter(|_| !self.disk_waiters.is_empty());
        let drain = self.draining.as_ref().map(|d| d.next_check);
        [
            self.timers.next_deadline(),
            self.accepting.paused_until,
            disk,
            drain,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn can_accept(&mut self) -> bool {
        if self
            .accepting
            .paused_until
            .is_some_and(|t| Instant::now() >= t)
        {
            self.accepting.paused_until = None;
        }
        self.accepting.pending
            && self.accepting.paused_until.is_none()
            && !self.accepting.at_limit
            && self.listener.is_some()
    }

    /// A connection is gone: free its slot, and let waiting clients in if
    /// they were kept out by the limit or by fd exhaustion.
    fn retire(&mut self, slot: usize) {
        self.slots[slot] = None;
        self.free_slots.push(slot);
        self.live -= 1;
        self.shared.release_connection(self.index);
        self.give_back_memory();
        if let Some(d) = &mut self.draining {
            d.drained += 1;
        }
        if self.accepting.at_limit {
            self.hear_the_others();
        }
        if self.accepting.paused_until.take().is_some() {
            // An fd was just freed: the next accept may well succeed.
            self.accepting.pending = true;
        }
    }

    /// Connection buffers (`--memory-buffer`, 64KiB by default) come from
    /// the malloc heap, which keeps freed memory. When the number of open
    /// connections has halved since its peak (or dropped to none), hand
    /// what is free back to the OS, so RSS follows the load down. Not for
    /// a handful of connections (one at a time would trim at every close,
    /// and the buffer pool covers them): rare enough that the heap walk
    /// costs nothing that matters.
    fn give_back_memory(&mut self) {
        self.peak_live = self.peak_live.max(self.live + 1);
        let dropped = self.peak_live >= MIN_PEAK_TO_TRIM
            && (self.live == 0 || self.live * 2 <= self.peak_live);
        if dropped && self.peak_live > self.live {
            self.peak_live = self.live;
            buffer_pool::clear();
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only walks the allocator's own free lists.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Directions waiting for disk space get a turn when a spill file gave
    /// space back, or every `DISK_RETRY` (the disk may be freed by others).
    fn wake_disk_waiters(&mut self, touched: &mut Vec<usize>) {
        if self.disk_waiters.is_empty() {
            return;
        }
        let releases = self.shared.plan.disk.releases();
        let due = self.disk_retry_at.is_some_and(|t| Instant::now() >= t);
        if releases != self.disk_releases_seen || due {
            self.disk_releases_seen = releases;
            self.disk_retry_at = None;
            touched.append(&mut self.disk_waiters);
        }
    }

    /// Run every timer that is due; connections it concerns are added to
    /// `touched` so they get a turn.
    fn fire_timers(&mut self, touched: &mut Vec<usize>) {
        let now = Instant::now();
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::ConnectTimeout {
                    slot,
                    conn,
                    attempt,
                } => {
                    if let Some(c) = connection(&mut self.slots, slot, conn) {
                        c.on_connect_timeout(attempt, &mut ctx!(self));
                        touched.push(slot);
                    }
                }
                Timer::ConnectRetry { slot, conn } => {
                    if let Some(c) = connection(&mut self.slots, slot, conn) {
                        c.on_connect_retry(&mut ctx!(self));
                        touched.push(slot);
                    }
                }
                Timer::LingerEnd { slot, conn } | Timer::SpillDue { slot, conn } => {
                    if connection(&mut self.slots, slot, conn).is_some() {
                        touched.push(slot);
                    }
                }
                Timer::IdleSweep => self.close_idle(now),
                Timer::HealthRound => {
                    if let Some(health) = &mut self.health {
                        let timeout = self.shared.config.connect_timeout;
                        health.round(
                            &self.shared.backends,
                            self.poll.registry(),
                            &mut self.timers,
                            timeout,
                        );
                    }
                }
                Timer::HealthTimeout { backend, probe } => {
                    if let Some(health) = &mut self.health {
                        health.on_timeout(
                            backend,
                            probe,
                            &self.shared.backends,
                            self.poll.registry(),
                        );
                    }
                }
            }
        }
    }

    /// Close every connection with nothing moving for `--idle-timeout`,
    /// then look again in an eighth of it. One sweep for all connections
    /// keeps the timer heap from growing with connection churn; a
    /// connection is closed between 1 and 1.125 idle timeouts.
    fn close_idle(&mut self, now: Instant) {
        let limit = self.shared.config.idle_timeout;
        for slot in 0..self.slots.len() {
            let Some(conn) = self.slots[slot].as_mut() else {
                continue;
            };
            let idle = conn.idle_for(now);
            if idle < limit {
                continue;
            }
            // With bytes still held, a close would cut a stream: reset.
            let gentle = conn.held() == 0;
            log::info!("{} idle for {:?}: closing", conn.id, idle);
            if conn.close_now("idle timeout", gentle, &mut ctx!(self)) == Status::Finished {
                self.retire(slot);
            }
        }
        self.timers
            .arm(now + idle_sweep_every(limit), Timer::IdleSweep);
    }

    fn on_probe_event(&mut self, token: Token) {
        if let Some(health) = &mut self.health {
            if let Some(idx) = health.backend_of(token) {
                health.on_event(idx, &self.shared.backends, self.poll.registry());
            }
        }
    }

    /// Stop accepting (the listener is closed, so new clients hashed to it
    /// are refused at once), and give in-flight connections until
    /// `deadline`.
    fn begin_drain(&mut self, deadline: Instant) {
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.draining = Some(Draining {
            deadline,
            next_check: Instant::now(),
            quiet_closed: 0,
            drained: 0,
        });
    }

    /// One step of a graceful shutdown: close connections that have gone
    /// quiet, and everything once the deadline has passed. What the drain
    /// came to once it is over and this worker may return.
    fn drain_step(&mut self) -> Option<ShutdownTally> {
        let now = Instant::now();
        let d = self.draining.as_ref()?;
        if self.live > 0 && now < d.next_check {
            return None;
        }
        let deadline = d.deadline;
        let out_of_time = now >= deadline;
        let mut cut = 0;
        let mut undelivered = 0;
        for slot in 0..self.slots.len() {
            let Some(conn) = self.slots[slot].as_mut() else {
                continue;
            };
            let quiet = conn.is_quiet() && conn.idle_for(now) >= QUIET_AT_SHUTDOWN;
            if !(quiet || out_of_time) {
                continue;
            }
            let held = conn.held();
            let (reason, gentle) = if quiet {
                ("shutdown: quiet", true)
            } else {
                ("shutdown timeout", false)
            };
            if conn.close_now(reason, gentle, &mut ctx!(self)) == Status::Finished {
                self.retire(slot);
                if let Some(d) = &mut self.draining {
                    d.drained -= 1; // retire counted it; it was not drained
                    if quiet {
                        d.quiet_closed += 1;
                    }
                }
                if !quiet {
                    cut += 1;
                    undelivered += held;
                }
            }
        }
        if self.live == 0 || out_of_time {
            let d = self.draining.as_ref().expect("draining");
            return Some(ShutdownTally {
                finished: d.drained,
                quiet_closed: d.quiet_closed,
                cut,
                undelivered,
            });
        }
        if let Some(d) = &mut self.draining {
            d.next_check = (now + SHUTDOWN_TICK).min(deadline);
        }
        None
    }

    /// Accept up to a turn's worth of clients, within `--max-connections`.
    /// Leaves `pending` set if more may be waiting (the listener is
    /// edge-triggered: we must come back ourselves).
    fn accept_some(&mut self, busy: &mut Vec<usize>) {
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(listener) = &self.listener else {
                return;
            };
            // The place is taken before the accept, so that workers
            // accepting at once cannot go over the limit together.
            if !self.shared.limit.reserve() {
                self.accepting.at_limit = true;
                return;
            }
            let accepted = listener.accept();
            if accepted.is_err() {
                self.shared.release_connection(self.index);
            }
            match accepted {
                // Bytes the client sent before registration are not lost:
                // epoll reports a socket's current readiness when it is added.
                Ok((client, client_addr)) => {
                    if let Some(slot) = self.open(client, client_addr) {
                        // Opening may already have failed over or given up
                        // (no backend could even be dialled): let it run.
                        busy.push(slot);
                    } else {
                        self.shared.release_connection(self.index);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The backlog is drained: a burst of accept errors, if
                    // there was one, is over. (Resetting on each success
                    // would log again after every close while fds stay
                    // short, one accept at a time.)
                    self.shared.accept_errors.burst_ends(self.index);
                    self.accepting.pending = false;
                    return;
                }
                Err(e) if is_transient_accept_error(&e) => {
                    log::debug!("accept: {e}");
                }
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the client stays in
                    // the backlog. Try again when a connection closes, or
                    // after a pause; say so once per burst.
                    if self.shared.accept_errors.burst_begins(self.index) {
                        log::error!(
                            "accept on {} failed: {e}; pausing accepts until a connection closes (at most {:?})",
                            self.local_addr,
                            ACCEPT_BACKOFF
                        );
                    }
                    self.accepting.paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Set up a connection for a freshly accepted client. If that fails the
    /// client is closed and the reason logged.
    fn open(&mut self, client: mio::net::TcpStream, client_addr: SocketAddr) -> Option<usize> {
        let id = self.shared.next_id();
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let tokens = (
            Token(self.conn_base + slot * 2),
            Token(self.conn_base + slot * 2 + 1),
        );
        match Connection::open(
            id,
            slot,
            client,
            client_addr,
            &self.shared.plan,
            tokens,
            &mut ctx!(self),
        ) {
            Ok(conn) => {
                log::debug!("{} accepted client {client_addr}", conn.id);
                self.slots[slot] = Some(conn);
                self.live += 1;
                Some(slot)
            }
            Err(e) => {
                log::warn!("[conn {id}] client {client_addr}: cannot set up the connection: {e}");
                self.free_slots.push(slot);
                None
            }
        }
    }
}

/// Drop the repeats from `slots`, keeping each slot where it first came.
/// `seen` is scratch, all false between calls, grown as slots are.
fn dedup_in_order(slots: &mut Vec<usize>, seen: &mut Vec<bool>) {
    if let Some(&max) = slots.iter().max() {
        if seen.len() <= max {
            seen.resize(max + 1, false);
        }
    }
    slots.retain(|&slot| !std::mem::replace(&mut seen[slot], true));
    for &slot in slots.iter() {
        seen[slot] = false;
    }
}

/// How often idle connections are looked for: an eighth of the timeout,
/// within 10ms..60s.
fn idle_sweep_every(idle_timeout: Duration) -> Duration {
    (idle_timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(60))
}

/// The connection in `slot`, if it is still connection `id` (slots are
/// reused; timers are never cancelled).
fn connection(slots: &mut [Option<Connection>], slot: usize, id: u64) -> Option<&mut Connection> {
    slots
        .get_mut(slot)
        .and_then(Option::as_mut)
        .filter(|c| c.id.0 == id)
}

/// Backends one connection may try: the first, then `--connect-retries`
/// others (default: all of them, once each).
fn max_attempts(config: &Config) -> usize {
    let others = config.backends.len() - 1;
    1 + config.connect_retries.map_or(others, |n| n.min(others))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keeps_first_arrival_order_and_clears_its_scratch() {
        let mut seen = Vec::new();
        let mut slots = vec![7, 2, 7, 0, 2, 9, 0];
        dedup_in_order(&mut slots, &mut seen);
        assert_eq!(slots, [7, 2, 0, 9]);
        assert!(seen.iter().all(|s| !s), "scratch left clean");
        let mut again = vec![9, 9, 3];
        dedup_in_order(&mut again, &mut seen);
        assert_eq!(again, [9, 3]);
        let mut none: Vec<usize> = Vec::new();
        dedup_in_order(&mut none, &mut seen);
        assert!(none.is_empty());
    }
}
