//! The event loop: one `Poll`, the listener, a slab of connections, the
//! timers, and the signals.
//!
//! Tokens: 0 the listener, 1 signals, 2 the stop waker, then one per
//! backend for its health probe, then two per connection slot, client and
//! backend: `conn_base + slot * 2 (+1)`.
//!
//! One turn: poll (sleeping until the earliest timer when nothing is
//! ready), note readiness, run due timers, drive every connection touched,
//! then accept. Work that a turn leaves (a connection whose budget ran out,
//! a listener with more clients) makes the next poll not wait.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook_mio::v1_0::Signals;

use crate::balancer::{FailPolicy, Pool};
use crate::config::{Config, ConfigError, show_size};
use crate::connection::{BufferPlan, Connection, Ctx, Side, Status};
use crate::disk::DiskBudget;
use crate::health::HealthChecks;
use crate::logging;
use crate::stats::Stats;
use crate::timers::{Timer, Timers};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const WAKER: Token = Token(2);
const FIRST_PROBE: usize = 3;

/// Accepts per listener event before other work gets a turn.
const ACCEPTS_PER_TURN: usize = 64;

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

/// Largest read into the spill path's scratch buffer.
const MAX_SCRATCH: usize = 1 << 20;

/// Stops a running proxy from another thread, at once.
#[derive(Clone)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl Stopper {
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            log::error!("cannot wake the event loop to stop it: {e}");
        }
    }
}

/// Where accepting stands.
#[derive(Default)]
struct Accepting {
    /// The listener may have clients waiting (it is edge-triggered).
    pending: bool,
    /// Out of fds or memory: not before then (or until a connection closes).
    paused_until: Option<Instant>,
    /// The accept error of this burst was logged.
    error_logged: bool,
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

pub struct Proxy {
    poll: Poll,
    /// `None` once a shutdown has begun: new clients are refused.
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    config: Config,
    plan: BufferPlan,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    signals: Option<Signals>,
    slots: Vec<Option<Connection>>,
    free_slots: Vec<usize>,
    /// Connections open now, and the most open since memory was last
    /// given back to the OS.
    live: usize,
    peak_live: usize,
    /// First connection token: after the probes'.
    conn_base: usize,
    next_id: u64,
    accepting: Accepting,
    scratch: Vec<u8>,
    stats: Arc<Stats>,
    pool: Pool,
    timers: Timers,
    health: Option<HealthChecks>,
    disk: Arc<DiskBudget>,
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
            pool: &mut $p.pool,
            timers: &mut $p.timers,
            scratch: &mut $p.scratch,
            stats: &$p.stats,
            connect_timeout: $p.config.connect_timeout,
            max_attempts: max_attempts(&$p.config),
        }
    };
}

impl Proxy {
    /// Validate `config` and bind the listener. Nothing is accepted until
    /// `run`; an error here means nothing is listening.
    pub fn bind(config: Config) -> Result<Proxy, ConfigError> {
        config.validate()?;
        let mut listener = TcpListener::bind(config.listen).map_err(|e| ConfigError {
            flag: "--listen",
            problem: format!("cannot listen on {}: {e}", config.listen),
        })?;
        let startup = |e: io::Error| ConfigError {
            flag: "startup",
            problem: e.to_string(),
        };
        let local_addr = listener.local_addr().map_err(startup)?;
        let poll = Poll::new().map_err(startup)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(startup)?);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(startup)?;
        let disk = Arc::new(DiskBudget::new(config.max_disk));
        Ok(Proxy {
            listener: Some(listener),
            local_addr,
            plan: BufferPlan {
                memory: config.memory_buffer as usize,
                max_spill: config.max_spill,
                temp_dir: Arc::<Path>::from(config.temp_dir.as_path()),
                disk: disk.clone(),
                spill_after: config.spill_after,
            },
            scratch: vec![0; (config.memory_buffer as usize).clamp(64 * 1024, MAX_SCRATCH)],
            poll,
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            signals: None,
            slots: Vec::new(),
            free_slots: Vec::new(),
            live: 0,
            peak_live: 0,
            conn_base: FIRST_PROBE + config.backends.len(),
            next_id: 1,
            accepting: Accepting::default(),
            stats: Arc::default(),
            pool: Pool::new(
                &config.backends,
                config.balance,
                FailPolicy {
                    max_fails: config.max_fails,
                    fail_timeout: config.fail_timeout,
                },
                seed(),
            ),
            timers: Timers::default(),
            health: config
                .health_check
                .map(|every| HealthChecks::new(every, config.backends.len(), FIRST_PROBE)),
            disk,
            disk_waiters: Vec::new(),
            disk_releases_seen: 0,
            disk_retry_at: None,
            draining: None,
            config,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    pub fn stopper(&self) -> Stopper {
        Stopper {
            flag: self.stop.clone(),
            waker: self.waker.clone(),
        }
    }

    /// Handle SIGTERM/SIGINT (graceful shutdown; a second one exits at once)
    /// and SIGHUP (reopen the log file): what the binary wants; an
    /// embedding program may prefer its own handling.
    pub fn handle_signals(&mut self) -> io::Result<()> {
        let mut signals = Signals::new([libc::SIGINT, libc::SIGTERM, libc::SIGHUP])?;
        self.poll
            .registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        self.signals = Some(signals);
        Ok(())
    }

    /// Serve until stopped.
    pub fn run(mut self) -> io::Result<()> {
        let backends: Vec<String> = self.config.backends.iter().map(|b| b.to_string()).collect();
        log::info!(
            "listening on {} backends={} balance={} memory_buffer={} max_spill={} max_disk={} max_connections={} temp_dir={}",
            self.local_addr,
            backends.join(","),
            self.config.balance,
            show_size(self.config.memory_buffer),
            show_size(self.config.max_spill),
            self.config.max_disk.map_or("unlimited".into(), show_size),
            self.config.max_connections,
            self.config.temp_dir.display()
        );
        if self.health.is_some() {
            self.timers.arm(Instant::now(), Timer::HealthRound);
        }
        let sweep = idle_sweep_every(self.config.idle_timeout);
        self.timers.arm(Instant::now() + sweep, Timer::IdleSweep);
        let mut events = Events::with_capacity(1024);
        // Connections whose last turn ran out of budget with work left, and
        // those to drive this turn: both reused, never reallocated per turn.
        let mut busy: Vec<usize> = Vec::new();
        let mut touched: Vec<usize> = Vec::new();
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
                    LISTENER => self.accepting.pending = true,
                    SIGNALS => {
                        if self.on_signals() {
                            return Ok(());
                        }
                    }
                    WAKER => {}
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
            if self.stop.load(Ordering::SeqCst) {
                log::info!("stopping; {} connection(s) were still open", self.live);
                return Ok(());
            }
            self.fire_timers(&mut touched);
            self.wake_disk_waiters(&mut touched);
            touched.sort_unstable();
            touched.dedup();
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
            if self.draining.is_some() && self.drain_step() {
                return Ok(());
            }
            if self.can_accept() {
                self.accept_some(&mut busy);
            }
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
        self.give_back_memory();
        if let Some(d) = &mut self.draining {
            d.drained += 1;
        }
        if self.accepting.at_limit && self.live < self.config.max_connections {
            self.accepting.at_limit = false;
            self.accepting.pending = true;
            log::info!(
                "below --max-connections {} again: accepting",
                self.config.max_connections
            );
        }
        if self.accepting.paused_until.take().is_some() {
            // An fd was just freed: the next accept may well succeed.
            self.accepting.pending = true;
        }
    }

    /// Connection buffers (`--memory-buffer`, 64KiB by default) come from
    /// the malloc heap, which keeps freed memory. When the number of open
    /// connections has halved since its peak (or dropped to none), hand
    /// what is free back to the OS, so RSS follows the load down. Rare
    /// enough that the heap walk costs nothing that matters.
    fn give_back_memory(&mut self) {
        self.peak_live = self.peak_live.max(self.live + 1);
        let dropped = self.live == 0 || (self.peak_live >= 64 && self.live * 2 <= self.peak_live);
        if dropped && self.peak_live > self.live {
            self.peak_live = self.live;
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
        let releases = self.disk.releases();
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
                        let timeout = self.config.connect_timeout;
                        health.round(
                            &mut self.pool,
                            self.poll.registry(),
                            &mut self.timers,
                            timeout,
                        );
                    }
                }
                Timer::HealthTimeout { backend, probe } => {
                    if let Some(health) = &mut self.health {
                        health.on_timeout(backend, probe, &mut self.pool, self.poll.registry());
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
        let limit = self.config.idle_timeout;
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
                health.on_event(idx, &mut self.pool, self.poll.registry());
            }
        }
    }

    /// Act on pending signals. Returns true if the process must exit now.
    fn on_signals(&mut self) -> bool {
        let Some(signals) = &mut self.signals else {
            return false;
        };
        let pending: Vec<i32> = signals.pending().collect();
        for signal in pending {
            match signal {
                libc::SIGHUP => match logging::reopen() {
                    Ok(true) => log::info!("received SIGHUP: log file reopened"),
                    Ok(false) => {
                        log::info!("received SIGHUP: logging to stderr, nothing to reopen")
                    }
                    Err(e) => log::error!("received SIGHUP: cannot reopen the log file: {e}"),
                },
                _ => {
                    let name = if signal == libc::SIGINT {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    };
                    if self.draining.is_some() {
                        log::warn!(
                            "received {name} again: exiting now, cutting {} connection(s)",
                            self.live
                        );
                        return true;
                    }
                    self.begin_shutdown(name);
                }
            }
        }
        false
    }

    /// Stop accepting (the listener is closed, so new clients are refused
    /// at once), and give in-flight connections `--shutdown-timeout`.
    fn begin_shutdown(&mut self, signal: &str) {
        let timeout = self.config.shutdown_timeout;
        log::info!(
            "received {signal}: no longer accepting; {} connection(s) may finish within {timeout:?} (send it again to exit now)",
            self.live
        );
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.draining = Some(Draining {
            deadline: Instant::now() + timeout,
            next_check: Instant::now(),
            quiet_closed: 0,
            drained: 0,
        });
    }

    /// One step of a graceful shutdown: close connections that have gone
    /// quiet, and everything once the deadline has passed. Returns true
    /// when the process may exit.
    fn drain_step(&mut self) -> bool {
        let now = Instant::now();
        let Some(d) = &self.draining else {
            return false;
        };
        if self.live > 0 && now < d.next_check {
            return false;
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
            log::info!(
                "shutdown complete: {} connection(s) finished, {} closed while quiet, {} cut at the timeout with {} undelivered",
                d.drained,
                d.quiet_closed,
                cut,
                show_size(undelivered)
            );
            return true;
        }
        if let Some(d) = &mut self.draining {
            d.next_check = (now + SHUTDOWN_TICK).min(deadline);
        }
        false
    }

    /// Accept up to a turn's worth of clients, within `--max-connections`.
    /// Leaves `pending` set if more may be waiting (the listener is
    /// edge-triggered: we must come back ourselves).
    fn accept_some(&mut self, busy: &mut Vec<usize>) {
        for _ in 0..ACCEPTS_PER_TURN {
            if self.live >= self.config.max_connections {
                self.accepting.at_limit = true;
                log::warn!(
                    "--max-connections {} reached: new clients wait in the listen backlog",
                    self.config.max_connections
                );
                return;
            }
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                // Bytes the client sent before registration are not lost:
                // epoll reports a socket's current readiness when it is added.
                Ok((client, client_addr)) => {
                    if let Some(slot) = self.open(client, client_addr) {
                        // Opening may already have failed over or given up
                        // (no backend could even be dialled): let it run.
                        busy.push(slot);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The backlog is drained: a burst of accept errors, if
                    // there was one, is over. (Resetting on each success
                    // would log again after every close while fds stay
                    // short, one accept at a time.)
                    self.accepting.error_logged = false;
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
                    if !self.accepting.error_logged {
                        self.accepting.error_logged = true;
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
        let id = self.next_id;
        self.next_id += 1;
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
            &self.plan,
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

/// A seed for random2 that differs between runs.
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
}

/// Errors after which the next accept may well succeed at once.
fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionReset
    ) || e.raw_os_error() == Some(libc::EPROTO)
}
