//! The event loop: one `Poll`, the listener, a slab of connections, and the
//! signals that stop it.
//!
//! Tokens: 0 the listener, 1 signals, 2 the stop waker, then one per
//! backend for its health probe, then two per connection slot, client and
//! backend: `conn_base + slot * 2 (+1)`.

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
use crate::health::HealthChecks;
use crate::stats::Stats;
use crate::timers::{Timer, Timers};

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const WAKER: Token = Token(2);
const FIRST_PROBE: usize = 3;

/// Accepts per listener event before other work gets a turn.
const ACCEPTS_PER_TURN: usize = 64;

/// How long to stop accepting when the process is out of file descriptors
/// or memory: accepting again at once would only fail again, in a spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Largest read into the spill path's scratch buffer.
const MAX_SCRATCH: usize = 1 << 20;

/// Stops a running proxy from another thread.
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

pub struct Proxy {
    poll: Poll,
    listener: TcpListener,
    local_addr: SocketAddr,
    config: Config,
    plan: BufferPlan,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    signals: Option<Signals>,
    slots: Vec<Option<Connection>>,
    free_slots: Vec<usize>,
    /// First connection token: after the probes'.
    conn_base: usize,
    next_id: u64,
    accept_paused_until: Option<Instant>,
    scratch: Vec<u8>,
    stats: Arc<Stats>,
    pool: Pool,
    timers: Timers,
    health: Option<HealthChecks>,
}

impl Proxy {
    /// Validate `config` and bind the listener. Nothing is accepted until
    /// `run`; an error here means nothing is listening.
    pub fn bind(config: Config) -> Result<Proxy, ConfigError> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen).map_err(|e| ConfigError {
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
        let mut proxy = Proxy {
            listener,
            local_addr,
            plan: BufferPlan {
                memory: config.memory_buffer as usize,
                max_spill: config.max_spill,
                temp_dir: Arc::<Path>::from(config.temp_dir.as_path()),
            },
            scratch: vec![0; (config.memory_buffer as usize).clamp(64 * 1024, MAX_SCRATCH)],
            poll,
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            signals: None,
            slots: Vec::new(),
            free_slots: Vec::new(),
            conn_base: FIRST_PROBE + config.backends.len(),
            next_id: 1,
            accept_paused_until: None,
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
            config,
        };
        proxy
            .poll
            .registry()
            .register(&mut proxy.listener, LISTENER, Interest::READABLE)
            .map_err(startup)?;
        Ok(proxy)
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

    /// Stop on SIGINT or SIGTERM (what the binary wants; an embedding
    /// program may prefer its own handling).
    pub fn stop_on_signals(&mut self) -> io::Result<()> {
        let mut signals = Signals::new([libc::SIGINT, libc::SIGTERM])?;
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
            "listening on {} backends={} balance={} memory_buffer={} max_spill={} temp_dir={}",
            self.local_addr,
            backends.join(","),
            self.config.balance,
            show_size(self.config.memory_buffer),
            show_size(self.config.max_spill),
            self.config.temp_dir.display()
        );
        if self.health.is_some() {
            self.timers.arm(Instant::now(), Timer::HealthRound);
        }
        let mut events = Events::with_capacity(1024);
        // Connections whose last turn ran out of budget with work left, and
        // those to drive this turn: both reused, never reallocated per turn.
        let mut busy: Vec<usize> = Vec::new();
        let mut touched: Vec<usize> = Vec::new();
        let mut accept_pending = false;
        loop {
            let timeout = if !busy.is_empty() || accept_pending {
                Some(Duration::ZERO)
            } else {
                let next = [self.timers.next_deadline(), self.accept_paused_until]
                    .into_iter()
                    .flatten()
                    .min();
                next.map(|t| t.saturating_duration_since(Instant::now()))
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
                    LISTENER => accept_pending = true,
                    SIGNALS => self.note_signals(),
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
                log::info!(
                    "stopping; {} connection(s) were still open",
                    self.open_connections()
                );
                return Ok(());
            }
            self.fire_timers(&mut touched);
            touched.sort_unstable();
            touched.dedup();
            for &slot in &touched {
                let mut ctx = Ctx {
                    registry: self.poll.registry(),
                    pool: &mut self.pool,
                    timers: &mut self.timers,
                    scratch: &mut self.scratch,
                    stats: &self.stats,
                    connect_timeout: self.config.connect_timeout,
                    max_attempts: max_attempts(&self.config),
                };
                let Some(conn) = self.slots[slot].as_mut() else {
                    continue;
                };
                match conn.drive(&mut ctx) {
                    Status::Waiting => {}
                    Status::Busy => busy.push(slot),
                    Status::Finished => {
                        self.slots[slot] = None;
                        self.free_slots.push(slot);
                    }
                }
            }
            if self
                .accept_paused_until
                .is_some_and(|t| Instant::now() >= t)
            {
                self.accept_paused_until = None;
                accept_pending = true;
            }
            if accept_pending && self.accept_paused_until.is_none() {
                accept_pending = self.accept_some(&mut busy);
            }
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
                    let mut ctx = Ctx {
                        registry: self.poll.registry(),
                        pool: &mut self.pool,
                        timers: &mut self.timers,
                        scratch: &mut self.scratch,
                        stats: &self.stats,
                        connect_timeout: self.config.connect_timeout,
                        max_attempts: max_attempts(&self.config),
                    };
                    // The slot may hold another connection by now.
                    if let Some(c) = self.slots.get_mut(slot).and_then(Option::as_mut) {
                        if c.id.0 == conn {
                            c.on_connect_timeout(attempt, &mut ctx);
                            touched.push(slot);
                        }
                    }
                }
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

    fn on_probe_event(&mut self, token: Token) {
        if let Some(health) = &mut self.health {
            if let Some(idx) = health.backend_of(token) {
                health.on_event(idx, &mut self.pool, self.poll.registry());
            }
        }
    }

    fn note_signals(&mut self) {
        if let Some(signals) = &mut self.signals {
            for signal in signals.pending() {
                let name = if signal == libc::SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                log::info!("received {name}");
                self.stop.store(true, Ordering::SeqCst);
            }
        }
    }

    fn open_connections(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Accept up to a turn's worth of clients. Returns whether more may be
    /// waiting (the listener is edge-triggered: we must come back ourselves).
    fn accept_some(&mut self, busy: &mut Vec<usize>) -> bool {
        for _ in 0..ACCEPTS_PER_TURN {
            match self.listener.accept() {
                // Bytes the client sent before registration are not lost:
                // epoll reports a socket's current readiness when it is added.
                Ok((client, client_addr)) => {
                    if let Some(slot) = self.open(client, client_addr) {
                        // Opening may already have failed over or given up
                        // (no backend could even be dialled): let it run.
                        busy.push(slot);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if is_transient_accept_error(&e) => {
                    log::debug!("accept: {e}");
                }
                Err(e) => {
                    log::error!(
                        "accept on {} failed: {e}; pausing accepts for {:?}",
                        self.local_addr,
                        ACCEPT_BACKOFF
                    );
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return true;
                }
            }
        }
        true
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
        let mut ctx = Ctx {
            registry: self.poll.registry(),
            pool: &mut self.pool,
            timers: &mut self.timers,
            scratch: &mut self.scratch,
            stats: &self.stats,
            connect_timeout: self.config.connect_timeout,
            max_attempts: max_attempts(&self.config),
        };
        match Connection::open(id, slot, client, client_addr, &self.plan, tokens, &mut ctx) {
            Ok(conn) => {
                log::debug!("{} accepted client {client_addr}", conn.id);
                self.slots[slot] = Some(conn);
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
    t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
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
