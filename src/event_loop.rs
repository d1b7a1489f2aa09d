//! One worker: an event loop on its own thread, with its own `Poll`,
//! listening socket, slabs of connections and backend sockets, and
//! timers. What the workers share is in `shared`.
//!
//! One turn: poll (sleeping until the earliest timer when nothing is
//! ready), note readiness on the sockets the events name, look at what the
//! other threads said, run due timers, drive every connection touched
//! once, in the order its first event came, then accept. Work that a turn
//! leaves (a connection whose budget ran out, a listener with more
//! clients) makes the next poll not wait.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Poll, Token};

use crate::buffer_pool;
use crate::config::Mode;
use crate::connection::{Ctx, Key, Session, Status, Tokens};
use crate::health::HealthChecks;
use crate::http::HttpConnection;
use crate::io_error::is_transient_accept_error;
use crate::logging;
use crate::shared::Shared;
use crate::slab::Slab;
use crate::tcp::TcpConnection;
use crate::timers::{Timer, Timers};
use crate::upstream::{IdlePool, LegOwner, LegTable};

/// Token of backend 0's health probe; backend i's is `FIRST_PROBE + i`.
const FIRST_PROBE: usize = 2;

/// Accepts per turn before the connections already open get theirs. Each
/// accept also dials a backend, which on loopback runs the whole handshake
/// inside our call, so a long run of accepts holds every open
/// connection's response: the latency tail under a connection-per-request
/// load. (Why 16: docs/performance.md, "What each change bought".)
const ACCEPTS_PER_TURN: usize = 16;

/// How long to stop accepting when the process is out of file descriptors
/// or memory and no connection has closed to free one: accepting again at
/// once would only fail again, in a spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How often directions that could not get disk space try again, when no
/// spill file has given space back meanwhile (the disk may be shared).
const DISK_RETRY: Duration = Duration::from_millis(250);

/// The same under `--max-memory`, where room is given back by connections
/// of other workers, whose releases this one sees only when it wakes.
const MEMORY_RETRY: Duration = Duration::from_millis(20);

/// During a graceful shutdown, how often to look for connections that have
/// gone quiet, and how long one must have been quiet to be closed.
const SHUTDOWN_TICK: Duration = Duration::from_millis(100);
const QUIET_AT_SHUTDOWN: Duration = Duration::from_secs(1);

/// Open connections that must have been reached before their closing
/// hands memory back to the OS.
const MIN_PEAK_TO_TRIM: usize = 64;

/// The spill path's scratch buffer (one per worker) is `--memory-buffer`
/// clamped to this range: a spilling direction then makes one read and one
/// `pwrite` per 256KiB at least (why: docs/performance.md, "What each change
/// bought").
const MIN_SCRATCH: usize = 256 * 1024;
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
struct ShuttingDown {
    deadline: Instant,
    /// When to look for quiet connections again.
    next_check: Instant,
    /// Connections that finished on their own, and those closed quiet.
    finished: usize,
    quiet_closed: usize,
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

/// What a connection borrows from its worker while it runs: kept apart
/// from the slab of connections so that both can be borrowed at once.
struct Env {
    poll: Poll,
    shared: Arc<Shared>,
    tokens: Tokens,
    legs: LegTable,
    idle: IdlePool,
    timers: Timers,
    scratch: Vec<u8>,
    /// A graceful shutdown has begun.
    stopping: bool,
    /// This worker's index (its counters in `shared.metrics`).
    worker: usize,
    /// Backends one connection may try: the first, then
    /// `--connect-retries` others (default: all of them, once each).
    max_attempts: usize,
}

impl Env {
    fn ctx(&mut self) -> Ctx<'_> {
        let config = &self.shared.config;
        Ctx {
            registry: self.poll.registry(),
            tokens: self.tokens,
            backends: &self.shared.backends,
            legs: &mut self.legs,
            idle: &mut self.idle,
            timers: &mut self.timers,
            scratch: &mut self.scratch,
            stats: &self.shared.stats,
            plan: &self.shared.plan,
            metrics: &self.shared.metrics[self.worker],
            connect_timeout: config.connect_timeout,
            max_attempts: self.max_attempts,
            keep_half_open: config.keep_half_open,
            config,
            stopping: self.stopping,
        }
    }
}

pub struct Worker {
    index: usize,
    env: Env,
    conns: Slab<Session>,
    /// `None` once a shutdown has begun: new clients are refused.
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    accepting: Accepting,
    /// The most connections open since memory was last given back.
    peak_live: usize,
    health: Option<HealthChecks>,
    /// Connections that stopped reading for want of disk space.
    space_waiters: Vec<usize>,
    space_releases_seen: u64,
    space_retry_at: Option<Instant>,
    shutting_down: Option<ShuttingDown>,
}

/// Reused from turn to turn, never reallocated.
#[derive(Default)]
struct TurnLists {
    /// Connections whose last turn ran out of budget with work left.
    busy: Vec<usize>,
    /// Connections to drive this turn.
    touched: Vec<usize>,
    /// Scratch for `dedup_in_order`.
    seen: Vec<bool>,
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
        let health = config.health_check.filter(|_| index == 0).map(|every| {
            HealthChecks::new(
                every,
                shared.backends.capacity(),
                FIRST_PROBE,
                config.send_proxy,
            )
        });
        // Every backend once, as many as there are (names may bring more):
        // the candidates end when none is left untried.
        let max_attempts = config
            .connect_retries
            .map_or(usize::MAX, |n| n.saturating_add(1));
        let scratch = vec![0; (config.memory_buffer as usize).clamp(MIN_SCRATCH, MAX_SCRATCH)];
        let tokens = Tokens {
            conn_base: FIRST_PROBE + shared.backends.capacity(),
        };
        Worker {
            index,
            env: Env {
                poll,
                tokens,
                legs: LegTable::default(),
                idle: IdlePool::new(shared.backends.capacity(), config.upstream_keepalive),
                timers: Timers::default(),
                scratch,
                max_attempts,
                stopping: false,
                worker: index,
                shared,
            },
            conns: Slab::default(),
            listener: Some(listener),
            local_addr,
            accepting: Accepting::default(),
            peak_live: 0,
            health,
            space_waiters: Vec::new(),
            space_releases_seen: 0,
            space_retry_at: None,
            shutting_down: None,
        }
    }

    pub fn index(&self) -> usize {
        self.index
    }

    fn shared(&self) -> &Shared {
        &self.env.shared
    }

    /// Serve until stopped (`None`) or until this worker's part of a
    /// graceful shutdown is over (what it came to).
    pub fn run(mut self) -> io::Result<Option<ShutdownTally>> {
        if self.health.is_some() {
            self.env.timers.arm(Instant::now(), Timer::HealthRound);
        }
        let sweep = idle_sweep_every(self.shared().config.idle_timeout);
        self.env
            .timers
            .arm(Instant::now() + sweep, Timer::IdleSweep);
        let mut events = Events::with_capacity(1024);
        let mut lists = TurnLists::default();
        logging::batch_this_thread();
        loop {
            // What this turn logged goes out in one write, before sleeping.
            logging::flush();
            self.publish_gauges();
            self.poll(&mut events, &lists)?;
            logging::turn();
            lists.touched.clear();
            lists.touched.append(&mut lists.busy);
            self.note_events(&events, &mut lists.touched);
            if self.shared().lifecycle.stopping() {
                return Ok(None);
            }
            self.hear_the_others();
            self.fire_timers(&mut lists.touched);
            self.wake_space_waiters(&mut lists.touched);
            // First come, first driven: sorting by slot instead would serve
            // low slots first in every busy turn and give the high ones the
            // latency tail (docs/performance.md, "What each change bought").
            dedup_in_order(&mut lists.touched, &mut lists.seen);
            self.drive_touched(&lists.touched, &mut lists.busy);
            if let Some(tally) = self.shutdown_step() {
                return Ok(Some(tally));
            }
            if self.can_accept() {
                self.accept_some(&mut lists.busy);
            }
        }
    }

    /// The gauge a scrape reads from each worker: memory held. (Connections
    /// open are the shared `--max-connections` count.)
    fn publish_gauges(&self) {
        let m = &self.shared().metrics[self.index];
        m.memory.set(crate::spill::memory_in_use());
    }

    /// Wait for events: not at all if work is left over, else until the
    /// earliest deadline (or forever).
    fn poll(&mut self, events: &mut Events, lists: &TurnLists) -> io::Result<()> {
        let timeout = if !lists.busy.is_empty() || self.can_accept() {
            Some(Duration::ZERO)
        } else {
            self.next_deadline()
                .map(|t| t.saturating_duration_since(Instant::now()))
        };
        loop {
            match self.env.poll.poll(events, timeout) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                outcome => return outcome,
            }
        }
    }

    /// Hand each event to the socket it names; connections touched go on
    /// `touched`.
    fn note_events(&mut self, events: &Events, touched: &mut Vec<usize>) {
        for event in events.iter() {
            match event.token() {
                Self::LISTENER => self.accepting.pending = true,
                Self::WAKER => {}
                token => match self.env.tokens.key(token) {
                    Key::Fixed(_) => self.on_probe_event(token),
                    Key::Client(slot) => {
                        if let Some(conn) = self.conns.get_mut(slot) {
                            conn.on_client_event(event);
                            touched.push(slot);
                        }
                    }
                    Key::Leg(key) => match self.env.legs.get(key) {
                        Some(&LegOwner::Conn { slot, id }) => {
                            if let Some(conn) = connection(&mut self.conns, slot, id) {
                                conn.on_leg_event(key, event);
                                touched.push(slot);
                            }
                        }
                        Some(&LegOwner::Idle { backend }) => {
                            let env = &mut self.env;
                            env.idle.on_event(backend, key, event, &mut env.legs);
                        }
                        None => {}
                    },
                },
            }
        }
    }

    /// Drive each touched connection once; note what it said.
    fn drive_touched(&mut self, touched: &[usize], busy: &mut Vec<usize>) {
        for &slot in touched {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            let status = conn.drive(&mut self.env.ctx());
            if conn.waiting_for_space() && !self.space_waiters.contains(&slot) {
                self.space_waiters.push(slot);
                let retry = if self.shared().plan.memory_budget.is_limited() {
                    MEMORY_RETRY
                } else {
                    DISK_RETRY
                };
                self.space_retry_at.get_or_insert(Instant::now() + retry);
            }
            match status {
                Status::Waiting => {}
                Status::Busy => busy.push(slot),
                Status::Finished => self.retire(slot),
            }
        }
    }

    /// What other threads may have changed since the last turn: a graceful
    /// shutdown begun, room again under `--max-connections`. Two atomic
    /// loads when nothing did.
    fn hear_the_others(&mut self) {
        if self.shutting_down.is_none() {
            if let Some(deadline) = self.shared().lifecycle.shutdown_deadline() {
                self.begin_shutdown(deadline);
            }
        }
        if self.accepting.at_limit && self.shared().limit.has_room() {
            self.accepting.at_limit = false;
            self.accepting.pending = true;
            self.shared().limit.below_limit();
        }
    }

    /// The earliest moment something is due without an event.
    fn next_deadline(&self) -> Option<Instant> {
        let disk = self
            .space_retry_at
            .filter(|_| !self.space_waiters.is_empty());
        let shutdown = self.shutting_down.as_ref().map(|d| d.next_check);
        [
            self.env.timers.next_deadline(),
            self.accepting.paused_until,
            disk,
            shutdown,
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
        self.conns.remove(slot);
        self.shared().release_connection(self.index);
        self.give_back_memory();
        if let Some(s) = &mut self.shutting_down {
            s.finished += 1;
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
        let live = self.conns.len();
        self.peak_live = self.peak_live.max(live + 1);
        let dropped =
            self.peak_live >= MIN_PEAK_TO_TRIM && (live == 0 || live * 2 <= self.peak_live);
        if dropped && self.peak_live > live {
            self.peak_live = live;
            buffer_pool::clear();
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only walks the allocator's own free lists.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Directions waiting for disk space or memory get a turn when a spill
    /// file or a buffer gave some back, or every `DISK_RETRY` (the disk may
    /// be freed by others; `MEMORY_RETRY` under `--max-memory`).
    fn wake_space_waiters(&mut self, touched: &mut Vec<usize>) {
        if self.space_waiters.is_empty() {
            return;
        }
        let plan = &self.shared().plan;
        let releases = plan.disk.releases() + plan.memory_budget.releases();
        let due = self.space_retry_at.is_some_and(|t| Instant::now() >= t);
        if releases != self.space_releases_seen || due {
            self.space_releases_seen = releases;
            self.space_retry_at = None;
            touched.append(&mut self.space_waiters);
        }
    }

    /// Run every timer that is due; connections it concerns are added to
    /// `touched` so they get a turn.
    fn fire_timers(&mut self, touched: &mut Vec<usize>) {
        let now = Instant::now();
        while let Some(timer) = self.env.timers.pop_due(now) {
            match timer {
                Timer::ConnectTimeout {
                    slot,
                    conn,
                    attempt,
                } => {
                    if let Some(c) = connection(&mut self.conns, slot, conn) {
                        c.on_connect_timeout(attempt, &mut self.env.ctx());
                        touched.push(slot);
                    }
                }
                Timer::ConnectRetry { slot, conn } => {
                    if let Some(c) = connection(&mut self.conns, slot, conn) {
                        c.on_connect_retry(&mut self.env.ctx());
                        touched.push(slot);
                    }
                }
                Timer::LingerEnd { slot, conn }
                | Timer::SpillDue { slot, conn }
                | Timer::Deadline { slot, conn } => {
                    if connection(&mut self.conns, slot, conn).is_some() {
                        touched.push(slot);
                    }
                }
                Timer::IdleSweep => self.close_idle(now),
                Timer::HealthRound => {
                    if let Some(health) = &mut self.health {
                        let env = &mut self.env;
                        health.round(
                            &env.shared.backends,
                            env.poll.registry(),
                            &mut env.timers,
                            env.shared.config.connect_timeout,
                        );
                    }
                }
                Timer::HealthTimeout { backend, probe } => {
                    if let Some(health) = &mut self.health {
                        let env = &self.env;
                        health.on_timeout(
                            backend,
                            probe,
                            &env.shared.backends,
                            env.poll.registry(),
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
        let limit = self.shared().config.idle_timeout;
        for slot in 0..self.conns.capacity() {
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            let idle = conn.idle_for(now);
            if idle < limit {
                continue;
            }
            // With bytes still held, a close would cut a stream: reset.
            let gentle = conn.held() == 0;
            log::info!("[conn {}] idle for {idle:?}: closing", conn.id());
            if conn.close_now("idle timeout", gentle, &mut self.env.ctx()) == Status::Finished {
                self.retire(slot);
            }
        }
        let env = &mut self.env;
        env.idle.close_stale(now, &mut env.legs);
        env.timers
            .arm(now + idle_sweep_every(limit), Timer::IdleSweep);
    }

    fn on_probe_event(&mut self, token: Token) {
        if let Some(health) = &mut self.health {
            if let Some(idx) = health.backend_of(token) {
                let env = &self.env;
                health.on_event(idx, &env.shared.backends, env.poll.registry());
            }
        }
    }

    /// Stop accepting (the listener is closed, so new clients hashed to it
    /// are refused at once), and give in-flight connections until
    /// `deadline`.
    fn begin_shutdown(&mut self, deadline: Instant) {
        if let Some(mut listener) = self.listener.take() {
            let _ = self.env.poll.registry().deregister(&mut listener);
        }
        self.env.stopping = true;
        self.shutting_down = Some(ShuttingDown {
            deadline,
            next_check: Instant::now(),
            finished: 0,
            quiet_closed: 0,
        });
    }

    /// One step of a graceful shutdown: close connections that have gone
    /// quiet, and everything once the deadline has passed. What the
    /// shutdown came to once it is over and this worker may return.
    fn shutdown_step(&mut self) -> Option<ShutdownTally> {
        let now = Instant::now();
        let s = self.shutting_down.as_ref()?;
        if !self.conns.is_empty() && now < s.next_check {
            return None;
        }
        let deadline = s.deadline;
        let out_of_time = now >= deadline;
        let (mut cut, mut undelivered, mut quiet_closed) = (0, 0, 0);
        for slot in 0..self.conns.capacity() {
            let Some(conn) = self.conns.get_mut(slot) else {
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
            if conn.close_now(reason, gentle, &mut self.env.ctx()) == Status::Finished {
                self.conns.remove(slot);
                self.shared().release_connection(self.index);
                if quiet {
                    quiet_closed += 1;
                } else {
                    cut += 1;
                    undelivered += held;
                }
            }
        }
        let s = self.shutting_down.as_mut().expect("shutting down");
        s.quiet_closed += quiet_closed;
        if self.conns.is_empty() || out_of_time {
            return Some(ShutdownTally {
                finished: s.finished,
                quiet_closed: s.quiet_closed,
                cut,
                undelivered,
            });
        }
        s.next_check = (now + SHUTDOWN_TICK).min(deadline);
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
            if !self.shared().limit.reserve() {
                self.accepting.at_limit = true;
                return;
            }
            let accepted = listener.accept();
            if accepted.is_err() {
                self.shared().release_connection(self.index);
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
                        self.shared().release_connection(self.index);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The backlog is drained: a burst of accept errors, if
                    // there was one, is over. (Resetting on each success
                    // would log again after every close while fds stay
                    // short, one accept at a time.)
                    self.shared().accept_errors.burst_ends(self.index);
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
                    if self.shared().accept_errors.burst_begins(self.index) {
                        log::error!(
                            "accept on {} failed: {e}; pausing accepts until a connection closes (at most {ACCEPT_BACKOFF:?})",
                            self.local_addr,
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
        let id = self.shared().next_id();
        let slot = self.conns.vacant();
        let token = self.env.tokens.client(slot);
        let ctx = &mut self.env.ctx();
        let opened = match ctx.config.mode {
            Mode::Tcp => {
                TcpConnection::open(id, slot, client, client_addr, token, ctx).map(Session::Tcp)
            }
            Mode::Http => HttpConnection::open(id, slot, client, client_addr, token, ctx)
                .map(|c| Session::Http(Box::new(c))),
        };
        match opened {
            Ok(conn) => {
                log::debug!("[conn {id}] accepted client {client_addr}");
                // The slot was promised to the connection (its token, its
                // timers): it must be the one it gets.
                let placed = self.conns.insert(conn);
                assert_eq!(placed, slot, "the slab gave another place than vacant()");
                Some(slot)
            }
            Err(e) => {
                log::warn!("[conn {id}] client {client_addr}: cannot set up the connection: {e}");
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
fn connection(conns: &mut Slab<Session>, slot: usize, id: u64) -> Option<&mut Session> {
    conns.get_mut(slot).filter(|c| c.id() == id)
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
