//! The process: `--workers` event loops, one per thread, each accepting
//! on its own socket bound to `--listen` (`SO_REUSEPORT`, so the kernel
//! spreads new clients over them with no shared accept lock), and what
//! they share: the backend pool, the limits, the counters, shutdown.
//!
//! The calling thread supervises: it takes the signals, starts a graceful
//! shutdown or ends one at once, and waits for the workers. What the
//! workers share is in `shared`.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook_mio::v1_0::Signals;

use crate::balancer::{Backends, FailPolicy};
use crate::budget::Budget;
use crate::config::{Config, ConfigError, show_size};
use crate::event_loop::{ShutdownTally, Worker};
use crate::io_error::is_out_of_resources;
use crate::logging;
use crate::metrics::MetricsServer;
use crate::relay::BufferPlan;
use crate::resolver::{self, Resolver};
use crate::shared::{Lifecycle, Shared};
use crate::stats::Stats;

/// The supervisor's tokens (the workers have their own polls).
const SIGNALS: Token = Token(0);
const WAKER: Token = Token(1);

/// Listen backlog per worker socket: what mio and nginx use.
const BACKLOG: i32 = 1024;

/// Why the proxy could not start. A bad configuration (a flag, an address
/// that cannot be bound, an unusable temp dir) is the operator's to fix
/// and exits 2, like any bad flag; anything else the system refused (no
/// fds for an epoll instance, no thread) exits 1.
#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    System {
        doing: &'static str,
        error: io::Error,
    },
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => e.fmt(f),
            StartError::System { doing, error } => write!(f, "cannot start: {doing}: {error}"),
        }
    }
}

impl std::error::Error for StartError {}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        StartError::Config(e)
    }
}

/// `doing` failed for want of something the system has to give.
fn system(doing: &'static str) -> impl Fn(io::Error) -> StartError {
    move |error| StartError::System { doing, error }
}

/// Stops a running proxy from another thread, at once.
#[derive(Clone)]
pub struct Stopper {
    shared: Arc<Shared>,
}

impl Stopper {
    pub fn stop(&self) {
        self.shared.lifecycle.stop_all();
    }
}

pub struct Proxy {
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    /// `--metrics-listen`, bound at once like `--listen`.
    metrics_listener: Option<TcpListener>,
    poll: Poll,
    signals: Option<Signals>,
    local_addr: SocketAddr,
}

impl Proxy {
    /// Validate `config` and bind one listening socket per worker. Nothing
    /// is accepted until `run`; an error here means nothing is listening.
    pub fn bind(config: Config) -> Result<Proxy, StartError> {
        config.validate()?;
        let listeners = bind_listeners(config.listen, config.workers)?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).map_err(|e| {
                if is_out_of_resources(&e) {
                    system("opening the metrics socket")(e)
                } else {
                    StartError::Config(ConfigError {
                        flag: "--metrics-listen",
                        problem: format!("cannot listen on {addr}: {e}"),
                    })
                }
            })?),
            None => None,
        };
        let local_addr = listeners[0]
            .local_addr()
            .map_err(system("reading the listening address"))?;
        let poll = Poll::new().map_err(system("creating an epoll instance"))?;
        let supervisor = Waker::new(poll.registry(), WAKER).map_err(system("creating a waker"))?;
        let mut polls = Vec::with_capacity(listeners.len());
        let mut wakers = Vec::with_capacity(listeners.len());
        for mut listener in listeners {
            let worker_poll = Poll::new().map_err(system("creating an epoll instance"))?;
            worker_poll
                .registry()
                .register(&mut listener, Worker::LISTENER, Interest::READABLE)
                .map_err(system("registering a listener"))?;
            let waker = Waker::new(worker_poll.registry(), Worker::WAKER)
                .map_err(system("creating a waker"))?;
            polls.push((worker_poll, listener));
            wakers.push(waker);
        }
        let policy = FailPolicy {
            max_fails: config.max_fails,
            fail_timeout: config.fail_timeout,
        };
        let (initial, capacity) = match config.resolve_every {
            // Every address a name resolves to, and room for more.
            Some(_) => {
                let all = resolver::initial(&config.backends);
                let room = (4 * all.len()).max(resolver::MIN_CAPACITY);
                (all, room)
            }
            None => (config.backends.clone(), config.backends.len()),
        };
        let backends = Backends::with_capacity(&initial, config.balance, policy, seed(), capacity);
        let plan = BufferPlan {
            memory: config.memory_buffer as usize,
            memory_max: config.memory_buffer_max as usize,
            max_spill: config.max_spill,
            temp_dir: Arc::<Path>::from(config.temp_dir.as_path()),
            disk: Arc::new(Budget::new(config.max_disk)),
            memory_budget: Arc::new(Budget::new(config.max_memory)),
            spill_after: config.spill_after,
        };
        let lifecycle = Lifecycle::new(wakers, supervisor);
        let shared = Arc::new(Shared::new(config, backends, plan, lifecycle));
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
            metrics_listener,
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
        self.log_start();
        let threads = self.spawn_workers()?;
        let resolver = Resolver::start(self.shared.clone());
        let metrics = match self.metrics_listener.take() {
            Some(listener) => match MetricsServer::start(listener, self.shared.clone()) {
                Ok(server) => Some(server),
                Err(e) => {
                    self.shared.lifecycle.stop_all();
                    let _ = join_workers(threads);
                    return Err(e);
                }
            },
            None => None,
        };
        let supervised = self.supervise(threads.len());
        let joined = join_workers(threads);
        if let Some(resolver) = resolver {
            resolver.stop();
        }
        if let Some(server) = metrics {
            server.stop();
        }
        supervised.and(joined)
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    fn log_start(&self) {
        let config = &self.shared.config;
        let backends: Vec<String> = config.backends.iter().map(|b| b.to_string()).collect();
        log::info!(
            "listening on {} mode={} backends={} balance={} workers={} memory_buffer={} memory_buffer_max={} max_memory={} max_spill={} max_disk={} max_connections={} temp_dir={} metrics={}",
            self.local_addr,
            config.mode,
            backends.join(","),
            config.balance,
            config.workers,
            show_size(config.memory_buffer),
            show_size(config.memory_buffer_max),
            show_memory_budget(config),
            show_size(config.max_spill),
            config.max_disk.map_or("unlimited".into(), show_size),
            config.max_connections,
            config.temp_dir.display(),
            self.metrics_listener
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .map_or_else(|| "off".to_string(), |a| a.to_string()),
        );
    }

    /// One thread per worker. If one cannot be started, those that were
    /// are stopped and joined.
    fn spawn_workers(&mut self) -> io::Result<Vec<WorkerThread>> {
        let mut threads = Vec::with_capacity(self.workers.len());
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
                    shared.lifecycle.stop_all();
                }
                outcome
            });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    self.shared.lifecycle.stop_all();
                    let _ = join_workers(threads);
                    return Err(e);
                }
            }
        }
        Ok(threads)
    }

    /// Take signals until all `count` workers have returned.
    fn supervise(&mut self, count: usize) -> io::Result<()> {
        let mut events = Events::with_capacity(8);
        let mut stop_logged = false;
        while self.shared.lifecycle.workers_finished() < count {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.shared.lifecycle.stop_all();
                return Err(e);
            }
            if events.iter().any(|e| e.token() == SIGNALS) {
                self.on_signals();
            }
            if self.shared.lifecycle.stopping() && !stop_logged {
                stop_logged = true;
                log::info!(
                    "stopping; {} connection(s) were still open",
                    self.shared.limit.open()
                );
            }
        }
        Ok(())
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
        let open = self.shared.limit.open();
        let lifecycle = &self.shared.lifecycle;
        if lifecycle.shutdown_deadline().is_some() {
            log::warn!("received {name} again: exiting now, cutting {open} connection(s)");
            lifecycle.stop_all();
            return;
        }
        let timeout = self.shared.config.shutdown_timeout;
        log::info!(
            "received {name}: no longer accepting; {open} connection(s) may finish within {timeout:?} (send it again to exit now)"
        );
        lifecycle.begin_shutdown(Instant::now() + timeout);
    }
}

type WorkerThread = thread::JoinHandle<io::Result<Option<ShutdownTally>>>;

/// Join every worker; if each finished a graceful shutdown (none was
/// stopped), write the summary of what they drained.
fn join_workers(threads: Vec<WorkerThread>) -> io::Result<()> {
    let mut outcome = Ok(());
    let mut tally = Some(ShutdownTally::default());
    for (index, thread) in threads.into_iter().enumerate() {
        match thread.join() {
            Ok(Ok(Some(t))) => {
                if let Some(sum) = &mut tally {
                    sum.add(&t);
                }
            }
            Ok(Ok(None)) => tally = None,
            Ok(Err(e)) => outcome = outcome.and(Err(e)),
            Err(_) => {
                outcome = outcome.and(Err(io::Error::other(format!("worker {index} panicked"))))
            }
        }
    }
    if let (Ok(()), Some(t)) = (&outcome, tally) {
        log::info!(
            "shutdown complete: {} connection(s) finished, {} closed while quiet, {} cut at the timeout with {} undelivered",
            t.finished,
            t.quiet_closed,
            t.cut,
            show_size(t.undelivered)
        );
    }
    outcome
}

/// Tells the supervisor a worker has returned (or panicked: then the
/// others are stopped too, since the process cannot go on short of one).
struct Finished(Arc<Shared>);

impl Drop for Finished {
    fn drop(&mut self) {
        // The worker's last lines, whatever ended it.
        logging::flush();
        self.0.lifecycle.worker_finished(thread::panicking());
    }
}

/// One listening socket per worker. With more than one, each sets
/// `SO_REUSEPORT` so that they can share the address; the kernel hashes
/// each new client to one of them. Port 0 is resolved by the first bind and
/// the others take the same port.
fn bind_listeners(listen: SocketAddr, count: usize) -> Result<Vec<TcpListener>, StartError> {
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
        let socket = bound.map_err(|e| {
            if is_out_of_resources(&e) {
                system("opening a listening socket")(e)
            } else {
                StartError::Config(ConfigError {
                    flag: "--listen",
                    problem: format!("cannot listen on {listen}: {e}"),
                })
            }
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

/// `--max-memory` for the start-up line: the limit, or that there is none
/// and the most the other flags let buffers come to, so an operator sees
/// what an unlimited budget can cost (each connection has two directions).
fn show_memory_budget(config: &Config) -> String {
    let worst = (config.max_connections as u64)
        .saturating_mul(2)
        .saturating_mul(config.memory_buffer_max);
    match config.max_memory {
        Some(limit) => show_size(limit),
        None => format!("unlimited(worst_case={})", show_size(worst)),
    }
}
