//! The event loop: one `Poll`, the listener, a slab of connections, and the
//! signals that stop it.
//!
//! Tokens: 0 the listener, 1 signals, 2 the stop waker; then two per
//! connection slot, client and backend: `slot * 2 + FIRST_CONN (+1)`.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook_mio::v1_0::Signals;

use crate::config::{Config, ConfigError, show_size};
use crate::connection::{BufferPlan, Connection, Side, Status};
use crate::stats::Stats;

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const WAKER: Token = Token(2);
const FIRST_CONN: usize = 3;

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
    next_id: u64,
    next_backend: usize,
    accept_paused_until: Option<Instant>,
    scratch: Vec<u8>,
    stats: Arc<Stats>,
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
            config,
            poll,
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            signals: None,
            slots: Vec::new(),
            free_slots: Vec::new(),
            next_id: 1,
            next_backend: 0,
            accept_paused_until: None,
            stats: Arc::default(),
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
            "listening on {} backends={} memory_buffer={} max_spill={} temp_dir={}",
            self.local_addr,
            backends.join(","),
            show_size(self.config.memory_buffer),
            show_size(self.config.max_spill),
            self.config.temp_dir.display()
        );
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
                self.accept_paused_until
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
                    LISTENER => accept_pending = true,
                    SIGNALS => self.note_signals(),
                    WAKER => {}
                    Token(t) => {
                        let slot = (t - FIRST_CONN) / 2;
                        let side = if (t - FIRST_CONN) % 2 == 0 {
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
            touched.sort_unstable();
            touched.dedup();
            for &slot in &touched {
                let Some(conn) = self.slots[slot].as_mut() else {
                    continue;
                };
                match conn.drive(self.poll.registry(), &mut self.scratch, &self.stats) {
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
                accept_pending = self.accept_some();
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
    fn accept_some(&mut self) -> bool {
        for _ in 0..ACCEPTS_PER_TURN {
            match self.listener.accept() {
                // Bytes the client sent before registration are not lost:
                // epoll reports a socket's current readiness when it is added.
                Ok((client, client_addr)) => self.open(client, client_addr),
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
    fn open(&mut self, client: mio::net::TcpStream, client_addr: SocketAddr) {
        let id = self.next_id;
        self.next_id += 1;
        let backend_addr = self.config.backends[self.next_backend % self.config.backends.len()];
        self.next_backend = self.next_backend.wrapping_add(1);
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let tokens = (
            Token(FIRST_CONN + slot * 2),
            Token(FIRST_CONN + slot * 2 + 1),
        );
        match Connection::open(
            id,
            client,
            client_addr,
            backend_addr,
            &self.plan,
            self.poll.registry(),
            tokens,
        ) {
            Ok(conn) => {
                log::debug!(
                    "{} accepted client {client_addr}, connecting to backend {backend_addr}",
                    conn.id
                );
                self.slots[slot] = Some(conn);
            }
            Err(e) => {
                log::warn!(
                    "[conn {id}] client {client_addr}: cannot start connection to backend {backend_addr}: {e}"
                );
                self.free_slots.push(slot);
            }
        }
    }
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
