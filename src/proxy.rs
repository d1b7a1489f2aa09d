//! The process: `--workers` event loops, one per thread, each accepting
//! on its own socket bound to `--listen` (`SO_REUSEPORT`, so the kernel
//! spreads new clients over them with no shared accept lock), and what
//! they share: the backend pool, the limits, the counters, shutdown.
//!
//! The calling thread supervises: it takes the signals, starts a graceful
//! shutdown or ends one at once, and waits for the workers. Everything the
//! workers share is atomics (or set once), so no worker ever waits for
//! another; they wake each other with `mio::Waker`s when one's action
//! concerns the others (a slot freed below `--max-connections`, a
//! shutdown, a stop).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Instant;

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook_mio::v1_0::Signals;

use crate::balancer::{FailPolicy, Pool};
use crate::config::{Config, ConfigError, show_size};
use crate::connection::BufferPlan;
use crate::disk::DiskBudget;
use crate::event_loop::{Drained, Worker};
use crate::logging;
use crate::stats::Stats;

/// The supervisor's tokens (the workers have their own polls).
const SIGNALS: Token = Token(0);
const WAKER: Token = Token(1);

/// Listen backlog per worker socket: what mio and nginx use.
const BACKLOG: i32 = 1024;

/// State every worker reads and changes; all of it lock-free.
pub struct Shared {
    pub config: Config,
    pub pool: Pool,
    pub stats: Arc<Stats>,
    pub plan: BufferPlan,
    /// Client connections open in all workers: `--max-connections` counts
    /// these. A worker reserves one before it accepts.
    open: AtomicUsize,
    next_id: AtomicU64,
    /// Exit now (a second signal, or `Stopper::stop`).
    stop: AtomicBool,
    /// Set once: when the graceful shutdown must end.
    shutdown_deadline: OnceLock<Instant>,
    /// The one WARN per episode of `--max-connections` reached, whichever
    /// worker meets it.
    limit_logged: AtomicBool,
    /// The worker (index + 1) whose burst of accept failures (out of fds)
    /// has been logged; 0 when none is. Fds are the process's, so one
    /// ERROR serves every worker until that worker's backlog drains.
    accept_burst: AtomicUsize,
    /// Workers that have returned, and how the supervisor learns of it.
    finished: AtomicUsize,
    workers: Vec<Waker>,
    supervisor: Waker,
}

impl Shared {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Take a place under `--max-connections` for a client about to be
    /// accepted. False (and a WARN, once per episode) at the limit.
    /// Compare-and-swap, never add-then-undo: a count that went over the
    /// limit even for a moment could make another worker see the limit
    /// reached when it was not, and pause with no one left to wake it.
    pub fn reserve_connection(&self) -> bool {
        let max = self.config.max_connections;
        let reserved = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if reserved.is_ok() {
            return true;
        }
        if !self.limit_logged.swap(true, Ordering::AcqRel) {
            log::warn!("--max-connections {max} reached: new clients wait in the listen backlog");
        }
        false
    }

    /// Give back a place taken by `reserve_connection`, for `worker`. If
    /// the limit was reached, the other workers are woken: those paused at
    /// it may accept again (`worker` itself looks before its next poll).
    pub fn release_connection(&self, worker: usize) {
        let before = self.open.fetch_sub(1, Ordering::AcqRel);
        if before >= self.config.max_connections {
            for (i, waker) in self.workers.iter().enumerate() {
                if i != worker {
                    wake(waker);
                }
            }
        }
    }

    /// A worker paused at the limit found room again: the INFO line, once.
    pub fn below_limit(&self) {
        if self.limit_logged.swap(false, Ordering::AcqRel) {
            log::info!(
                "below --max-connections {} again: accepting",
                self.config.max_connections
            );
        }
    }

    /// An accept failed for want of fds or memory: true if this is the
    /// first of a burst, to be logged.
    pub fn accept_burst_begins(&self, worker: usize) -> bool {
        self.accept_burst
            .compare_exchange(0, worker + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// `worker`'s backlog is drained: if its burst was the one logged, it
    /// is over.
    pub fn accept_burst_ends(&self, worker: usize) {
        let _ =
            self.accept_burst
                .compare_exchange(worker + 1, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub fn shutdown_deadline(&self) -> Option<Instant> {
        self.shutdown_deadline.get().copied()
    }

    fn wake_workers(&self) {
        self.workers.iter().for_each(wake);
    }

    fn stop_all(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake_workers();
        let _ = self.supervisor.wake();
    }
}

/// Stops a running proxy from another thread, at once.
#[derive(Clone)]
pub struct Stopper {
    shared: Arc<Shared>,
}

impl Stopper {
    pub fn stop(&self) {
        self.shared.stop_all();
    }
}

pub struct Proxy {
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    poll: Poll,
    signals: Option<Signals>,
    local_addr: SocketAddr,
}

impl Proxy {
    /// Validate `config` and bind one listening socket per worker. Nothing
    /// is accepted until `run`; an error here means nothing is listening.
    pub fn bind(config: Config) -> Result<Proxy, ConfigError> {
        config.validate()?;
        let startup = |e: io::Error| ConfigError {
            flag: "startup",
            problem: e.to_string(),
        };
        let listeners = bind_listeners(config.listen, config.workers)?;
        let local_addr = listeners[0].local_addr().map_err(startup)?;
        let poll = Poll::new().map_err(startup)?;
        let supervisor = Waker::new(poll.registry(), WAKER).map_err(startup)?;
        let mut polls = Vec::with_capacity(listeners.len());
        let mut wakers = Vec::with_capacity(listeners.len());
        for mut listener in listeners {
            let worker_poll = Poll::new().map_err(startup)?;
            worker_poll
                .registry()
                .register(&mut listener, Worker::LISTENER, Interest::READABLE)
                .map_err(startup)?;
            let waker = Waker::new(worker_poll.registry(), Worker::WAKER).map_err(startup)?;
            polls.push((worker_poll, listener));
            wakers.push(waker);
        }
        let disk = Arc::new(DiskBudget::new(config.max_disk));
        let shared = Arc::new(Shared {
            pool: Pool::new(
                &config.backends,
                config.balance,
                FailPolicy {
                    max_fails: config.max_fails,
                    fail_timeout: config.fail_timeout,
                },
                seed(),
            ),
            stats: Arc::default(),
            plan: BufferPlan {
                memory: config.memory_buffer as usize,
                max_spill: config.max_spill,
                temp_dir: Arc::<Path>::from(config.temp_dir.as_path()),
                disk,
                spill_after: config.spill_after,
            },
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            shutdown_deadline: OnceLock::new(),
            limit_logged: AtomicBool::new(false),
            accept_burst: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            workers: wakers,
            supervisor,
            config,
        });
        let workers = polls
            .into_iter()
            .enumerate()
            .map(|(index, (poll, listener))| {
                Worker::new(index, poll, listener, local_addr, shared.clone())
            })
            .collect();
        Ok(Proxy {
            shared,
            workers,
            poll,
            signals: None,
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    pub fn stopper(&self) -> Stopper {
        Stopper {
            shared: self.shared.clone(),
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

    /// Serve until stopped, or until a graceful shutdown has finished.
    pub fn run(mut self) -> io::Result<()> {
        let config = &self.shared.config;
        let backends: Vec<String> = config.backends.iter().map(|b| b.to_string()).collect();
        log::info!(
            "listening on {} backends={} balance={} workers={} memory_buffer={} max_spill={} max_disk={} max_connections={} temp_dir={}",
            self.local_addr,
            backends.join(","),
            config.balance,
            config.workers,
            show_size(config.memory_buffer),
            show_size(config.max_spill),
            config.max_disk.map_or("unlimited".into(), show_size),
            config.max_connections,
            config.temp_dir.display()
        );
        let count = self.workers.len();
        let mut threads = Vec::with_capacity(count);
        for worker in std::mem::take(&mut self.workers) {
            let name = format!("spillway-w{}", worker.index());
            let finished = Finished(self.shared.clone());
            let shared = self.shared.clone();
            let spawned = thread::Builder::new().name(name).spawn(move || {
                let _finished = finished;
                let outcome = worker.run();
                if outcome.is_err() {
                    // One worker short, the process cannot keep its
                    // promises (a drain would never complete): stop all.
                    shared.stop_all();
                }
                outcome
            });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    self.shared.stop_all();
                    for thread in threads {
                        let _ = thread.join();
                    }
                    return Err(e);
                }
            }
        }
        let mut events = Events::with_capacity(8);
        let mut stop_logged = false;
        while self.shared.finished.load(Ordering::Acquire) < count {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.shared.stop_all();
                return Err(e);
            }
            if events.iter().any(|e| e.token() == SIGNALS) {
                self.on_signals();
            }
            if self.shared.stopping() && !stop_logged {
                stop_logged = true;
                log::info!(
                    "stopping; {} connection(s) were still open",
                    self.shared.open_connections()
                );
            }
        }
        let mut outcome = Ok(());
        // The shutdown summary, if every worker drained (none was stopped).
        let mut drained = Some(Drained::default());
        for (index, thread) in threads.into_iter().enumerate() {
            match thread.join() {
                Ok(Ok(Some(d))) => {
                    if let Some(sum) = &mut drained {
                        sum.finished += d.finished;
                        sum.quiet_closed += d.quiet_closed;
                        sum.cut += d.cut;
                        sum.undelivered += d.undelivered;
                    }
                }
                Ok(Ok(None)) => drained = None,
                Ok(Err(e)) => outcome = outcome.and(Err(e)),
                Err(_) => {
                    outcome = outcome.and(Err(io::Error::other(format!("worker {index} panicked"))))
                }
            }
        }
        if let (Ok(()), Some(d)) = (&outcome, drained) {
            log::info!(
                "shutdown complete: {} connection(s) finished, {} closed while quiet, {} cut at the timeout with {} undelivered",
                d.finished,
                d.quiet_closed,
                d.cut,
                show_size(d.undelivered)
            );
        }
        outcome
    }

    fn on_signals(&mut self) {
        let Some(signals) = &mut self.signals else {
            return;
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
                    self.on_stop_signal(name);
                }
            }
        }
    }

    /// The first SIGTERM/SIGINT starts a graceful shutdown: every worker
    /// stops accepting and gives its connections `--shutdown-timeout`. The
    /// second exits at once.
    fn on_stop_signal(&mut self, name: &str) {
        let open = self.shared.open_connections();
        if self.shared.shutdown_deadline().is_some() {
            log::warn!("received {name} again: exiting now, cutting {open} connection(s)");
            self.shared.stop_all();
            return;
        }
        let timeout = self.shared.config.shutdown_timeout;
        log::info!(
            "received {name}: no longer accepting; {open} connection(s) may finish within {timeout:?} (send it again to exit now)"
        );
        let _ = self.shared.shutdown_deadline.set(Instant::now() + timeout);
        self.shared.wake_workers();
    }
}

/// Tells the supervisor a worker has returned (or panicked: then the
/// others are stopped too, since the process cannot go on short of one).
struct Finished(Arc<Shared>);

impl Drop for Finished {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.stop_all();
        }
        self.0.finished.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.0.supervisor.wake() {
            log::error!("cannot wake the supervisor: {e}");
        }
    }
}

/// One listening socket per worker. With more than one, each sets
/// `SO_REUSEPORT` so that they can share the address; the kernel hashes
/// each new client to one of them. Port 0 is resolved by the first bind and
/// the others take the same port.
fn bind_listeners(listen: SocketAddr, count: usize) -> Result<Vec<TcpListener>, ConfigError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut at = listen;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let bound = (|| {
            let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            if count > 1 {
                socket.set_reuse_port(true)?;
            }
            socket.set_nonblocking(true)?;
            socket.bind(&at.into())?;
            socket.listen(BACKLOG)?;
            Ok::<_, io::Error>(socket)
        })();
        let socket = bound.map_err(|e| ConfigError {
            flag: "--listen",
            problem: format!("cannot listen on {listen}: {e}"),
        })?;
        if let Some(addr) = socket.local_addr().ok().and_then(|a| a.as_socket()) {
            at = addr;
        }
        listeners.push(TcpListener::from_std(socket.into()));
    }
    Ok(listeners)
}

/// A seed for random2 that differs between runs.
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
}

/// Wake one worker; a failure is logged, as there is no one to return it to.
fn wake(waker: &Waker) {
    if let Err(e) = waker.wake() {
        log::error!("cannot wake a worker: {e}");
    }
}
