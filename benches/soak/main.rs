//! Soak test: the real binary under a random mix of clients, backends and
//! faults for `--duration`, at a seed it prints, keeping books of every
//! byte; non-zero exit on any violation.
//!
//! ```sh
//! cargo bench --bench soak -- --duration 60s             # what CI runs
//! cargo bench --bench soak -- --duration 1h --seed 42    # by hand
//! ```
//!
//! - Clients ([`client`]): fast, slow readers (1-256KiB/s, small receive
//!   buffers), slow writers, early and late half-closers, resets at a
//!   random upload byte, vanishing (linger 0) at a random download byte.
//! - Backends ([`backend`]): echo, responders of 0B-64MiB, a slow reader, a
//!   half-closer, a resetter, a blackhole, a flapping listener, two refusers.
//! - Faults ([`faults`]): the spill dir on a small tmpfs filled by a ballast
//!   file (skipped, and said so, where no tmpfs can be mounted),
//!   --max-disk and --max-connections below what the load wants, log
//!   rotation with SIGHUP, outages of every backend, SIGTERM at the end.
//! - Books ([`books`]): per connection, what the client, the backend and
//!   the proxy's close line say, joined and checked as they complete: bytes
//!   exact or within bounds, cut streams never ending in a clean EOF,
//!   every completed body byte-exact. At the end: no fd, spill file, disk
//!   byte or thread leaked, RSS within 2x of after warm-up, the proxy's
//!   counters agreeing with the books.
//!
//! Every wait has a deadline, and a watchdog ends the run (non-zero) if it
//! outlasts warm-up + duration + a fixed allowance.

#[path = "../../tests/common/mod.rs"]
mod common;

mod backend;
mod books;
mod client;
mod data;
mod faults;
mod log;
mod metrics;
mod net;
mod plan;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use books::Books;
use plan::{MIB, Plan};

const USAGE: &str = "usage: cargo bench --bench soak -- [--duration 60s] [--seed N] [--workers N] [--clients N] [--keep]";

/// Load without faults before the baseline memory figure is taken, and
/// how long its connections may take to finish.
const WARMUP: Duration = Duration::from_secs(6);
const WARMUP_DRAIN: Duration = Duration::from_secs(60);
/// After the load stops: for the last clients to finish (a slow one
/// started just before the end may need a few times its nominal time) and
/// the proxy to go idle.
const DRAIN_ALLOWANCE: Duration = Duration::from_secs(150);
/// Resource checks, SIGTERM, books.
const TEARDOWN_ALLOWANCE: Duration = Duration::from_secs(60);

/// The spill tmpfs: small, so that spills fill it.
const TMPFS_SIZE: u64 = 32 * MIB;

/// New clients per second at most: keeps the CPU for the proxy and the
/// byte checks on a shared two-core machine.
const SPAWN_RATE: f64 = 100.0;

/// The proxy's flags beyond --listen, --log-file, --temp-dir and the
/// backends. Limits are small so that the load reaches them.
const MAX_CONNECTIONS: u32 = 64;
const MAX_DISK: u64 = 8 * MIB;
fn proxy_flags(workers: u32) -> Vec<String> {
    [
        "--workers",
        &workers.to_string(),
        "--memory-buffer",
        "16KiB",
        "--max-spill",
        "4MiB",
        "--max-disk",
        "8MiB", // MAX_DISK
        "--max-connections",
        &MAX_CONNECTIONS.to_string(),
        "--idle-timeout",
        "10s",
        "--connect-timeout",
        "1s",
        "--max-fails",
        "3",
        "--fail-timeout",
        "1s",
        "--shutdown-timeout",
        "10s",
        "--metrics-listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// What every thread of the run shares.
pub struct World {
    pub seed: u64,
    proxy: OnceLock<SocketAddr>,
    /// Tear down: every client and backend stops and resets.
    pub abort: AtomicBool,
    pub stop_backends: AtomicBool,
    pub books: Books,
    pub live_clients: AtomicUsize,
    pub live_backend_conns: AtomicUsize,
    /// "log file reopened" lines the tailer has read.
    pub sighups_seen: AtomicU64,
}

impl World {
    pub fn proxy(&self) -> SocketAddr {
        *self
            .proxy
            .get()
            .expect("the proxy is started before any client")
    }
}

struct Options {
    duration: Duration,
    seed: u64,
    workers: u32,
    clients: u32,
    /// Keep the proxy's logs even when the run passes.
    keep: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 60s, 5m, 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?} is not a duration like 60s, 5m, 1h")),
    };
    Ok(Duration::from_secs(secs))
}

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        let mut opts = Options {
            duration: Duration::from_secs(60),
            seed: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ u64::from(std::process::id()) << 32,
            workers: 2,
            clients: 96,
            keep: false,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or(format!("{key} needs a value"))
            };
            match key.as_str() {
                "--duration" => opts.duration = parse_duration(&value()?)?,
                "--seed" => opts.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
                "--workers" => {
                    opts.workers = value()?.parse().map_err(|e| format!("--workers: {e}"))?
                }
                "--clients" => {
                    opts.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?
                }
                "--keep" => opts.keep = true,
                // `cargo bench` passes this to every bench binary.
                "--bench" => {}
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if opts.duration.is_zero() || opts.workers == 0 || opts.clients == 0 {
            return Err("--duration, --workers and --clients must be above 0".into());
        }
        Ok(opts)
    }
}

pub fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn main() -> ExitCode {
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("soak: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    println!(
        "soak: seed={} duration={} workers={} clients={} (again: cargo bench --bench soak -- --duration {} --seed {} --workers {} --clients {})",
        opts.seed,
        show(opts.duration),
        opts.workers,
        opts.clients,
        show(opts.duration),
        opts.seed,
        opts.workers,
        opts.clients
    );
    let bound = WARMUP + WARMUP_DRAIN + opts.duration + DRAIN_ALLOWANCE + TEARDOWN_ALLOWANCE;
    let watchdog = Watchdog::start(bound);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&opts, &watchdog)));
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(())) => ExitCode::FAILURE,
        Err(p) => {
            eprintln!("soak: FAILED: {}", panic_text(&p));
            ExitCode::FAILURE
        }
    }
}

fn show(d: Duration) -> String {
    let s = d.as_secs();
    if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 && s > 60 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Ends the run if it outlasts its bound: kills the proxy, unmounts the
/// tmpfs, exits non-zero. What the run could not finish is a hang.
struct Watchdog {
    pid: Arc<AtomicU32>,
    tmpfs: Arc<OnceLock<PathBuf>>,
    log: Arc<OnceLock<(PathBuf, u64)>>,
}

impl Watchdog {
    fn start(bound: Duration) -> Watchdog {
        let pid = Arc::new(AtomicU32::new(0));
        let tmpfs: Arc<OnceLock<PathBuf>> = Arc::new(OnceLock::new());
        let log: Arc<OnceLock<(PathBuf, u64)>> = Arc::new(OnceLock::new());
        let (p, t, l) = (pid.clone(), tmpfs.clone(), log.clone());
        thread::spawn(move || {
            thread::sleep(bound);
            eprintln!(
                "soak: VIOLATION: the run did not finish within its bound of {bound:?} (warm-up + duration + drain and teardown allowances): something hung"
            );
            let pid = p.load(Ordering::SeqCst);
            if pid != 0 {
                // SAFETY: kill only takes integers; the proxy is our child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            if let Some(dir) = t.get() {
                faults::unmount(dir);
            }
            if let Some((path, seed)) = l.get() {
                eprintln!(
                    "soak: the proxy's logs are kept in {}",
                    keep_logs(path, *seed).display()
                );
            }
            std::process::exit(1);
        });
        Watchdog { pid, tmpfs, log }
    }
}

fn run(opts: &Options, watchdog: &Watchdog) -> Result<(), ()> {
    let world = Arc::new(World {
        seed: opts.seed,
        proxy: OnceLock::new(),
        abort: AtomicBool::new(false),
        stop_backends: AtomicBool::new(false),
        books: Books::new(),
        live_clients: AtomicUsize::new(0),
        live_backend_conns: AtomicUsize::new(0),
        sighups_seen: AtomicU64::new(0),
    });
    let disk = match faults::Tmpfs::mount(TMPFS_SIZE) {
        Ok(d) => {
            let _ = watchdog.tmpfs.set(d.dir.clone());
            Some(d)
        }
        Err(why) => {
            println!(
                "soak: SKIPPED the full-disk fault: needs a tmpfs to fill (root, mount rights): {why}"
            );
            None
        }
    };
    let spill_dir = disk.as_ref().map(|d| d.dir.join("spill"));
    if let Some(dir) = &spill_dir {
        fs::create_dir_all(dir).expect("create the spill dir on the tmpfs");
    }
    let backends = match backend::Backends::start(&world) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("soak: FAILED to start the backends: {e}");
            return Err(());
        }
    };
    world.books.set_backends(&backends.list);
    let mut args = backends.args();
    args.extend(proxy_flags(opts.workers));
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proxy = common::Proxy::start_with(
        &arg_refs,
        common::Launch {
            temp_dir: spill_dir.clone(),
            ..common::Launch::default()
        },
    );
    let metrics_addr: Option<SocketAddr> = proxy
        .wait_for_log(" metrics=", Duration::from_secs(10))
        .rsplit_once(" metrics=")
        .and_then(|(_, a)| a.trim().parse().ok());
    if metrics_addr.is_none() {
        world
            .books
            .note("no metrics address in the proxy's start-up line".into());
    }
    watchdog.pid.store(proxy.pid, Ordering::SeqCst);
    let _ = watchdog.log.set((proxy.log_path.clone(), opts.seed));
    let _ = world.proxy.set(proxy.addr);
    let used_at_start = disk.as_ref().map_or(0, |d| d.used());
    // Its threads and fds once started: the baseline every check returns to.
    thread::sleep(Duration::from_millis(200));
    let base = Resources::of(&proxy, disk.as_ref());
    println!(
        "soak: proxy pid {} on {}: {} fds, {} threads, {} KiB RSS at start; spill dir {}",
        proxy.pid,
        proxy.addr,
        base.fds,
        base.threads,
        base.rss_kib,
        proxy.temp_dir.display()
    );

    // The books thread: tails the log, checks connections as they complete.
    let books_stop = Arc::new(AtomicBool::new(false));
    let tailer_thread = {
        let (world, stop) = (world.clone(), books_stop.clone());
        let mut tailer = log::Tailer::new(proxy.log_path.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                tailer.poll(&world.books);
                world.books.settle(false);
                world
                    .sighups_seen
                    .store(tailer.stats.sighup, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(200));
            }
            tailer
        })
    };

    let mut next_id = 1u64;
    let started = Instant::now();

    // Warm-up: the mix without faults, at the connection limit, so that
    // the proxy's buffer pools and pipes reach their working size.
    let warm = Shape::Flat(MAX_CONNECTIONS);
    load(&world, WARMUP, warm, &mut next_id, proxy.pid);
    let warm_ok = wait_quiet(&world, WARMUP_DRAIN);
    let after_warmup = Resources::of(&proxy, disk.as_ref());
    if !warm_ok {
        world.books.note(format!(
            "the warm-up's connections did not all finish within {WARMUP_DRAIN:?}"
        ));
    }
    println!(
        "soak: warm-up: {} connections in {:.1}s; {} fds, {} threads, {} KiB RSS",
        next_id - 1,
        started.elapsed().as_secs_f64(),
        after_warmup.fds,
        after_warmup.threads,
        after_warmup.rss_kib
    );

    // The run: the load rises and falls past --max-connections while the
    // faults come.
    let injected = faults::Injected::default();
    let faults_stop = AtomicBool::new(false);
    let main_start = Instant::now();
    thread::scope(|scope| {
        // However the load ends (a panic too), the faults stop, or the
        // scope would wait for them for ever.
        let _stop = SetOnDrop(&faults_stop);
        let f = faults::Faults {
            world: &world,
            backends: &backends,
            disk: disk.as_ref(),
            log_path: proxy.log_path.clone(),
            pid: proxy.pid,
            injected: &injected,
            stop: &faults_stop,
            metrics: metrics_addr,
            max_disk: MAX_DISK,
            max_connections: u64::from(MAX_CONNECTIONS),
            disk_base: used_at_start,
        };
        let seed = opts.seed;
        let faults_thread = scope.spawn(move || f.run(seed));
        let wave = Shape::Wave {
            low: 16,
            high: opts.clients,
            period: Duration::from_secs(20),
        };
        load(&world, opts.duration, wave, &mut next_id, proxy.pid);
        faults_stop.store(true, Ordering::Relaxed);
        let _ = faults_thread.join();
    });
    let load_secs = main_start.elapsed().as_secs_f64();
    let clients_started = next_id - 1;

    // Drain: every client and backend thread ends, every close line is in.
    let drained = wait_quiet(&world, DRAIN_ALLOWANCE);
    if !drained {
        world.books.note(format!(
            "after {DRAIN_ALLOWANCE:?} {} clients and {} backend connections were still running: aborted",
            world.live_clients.load(Ordering::SeqCst),
            world.live_backend_conns.load(Ordering::SeqCst)
        ));
        world.abort.store(true, Ordering::SeqCst);
        wait_threads(&world, Duration::from_secs(10));
    }

    // The proxy, idle: back to its baseline. (Unless it died: that is
    // booked already, and a dead process has nothing left to look at.)
    let end = alive(proxy.pid).then(|| wait_resources(&proxy, disk.as_ref(), &base, used_at_start));
    if let Some(end) = &end {
        let leaks = [
            ("fds", end.fds as u64, base.fds as u64),
            ("threads", end.threads as u64, base.threads as u64),
            ("spill files", end.spill_files as u64, 0),
            (
                "tmpfs bytes in use",
                end.disk_used.unwrap_or(0),
                used_at_start,
            ),
        ];
        for (what, now, then) in leaks {
            if now != then {
                world.books.note(format!(
                    "the idle proxy holds {now} {what} (at start: {then}): leaked"
                ));
            }
        }
        if end.spill_files > 0 {
            let files: Vec<String> = proxy
                .spill_files()
                .iter()
                .map(|f| format!("{f:?}"))
                .collect();
            world
                .books
                .note(format!("spill files still open: {}", files.join(", ")));
        }
        if end.rss_kib > 2 * after_warmup.rss_kib {
            world.books.note(format!(
                "RSS {} KiB at the end, more than twice the {} KiB after warm-up",
                end.rss_kib, after_warmup.rss_kib
            ));
        }
    }

    // The proxy's own counters, idle: compared with the books once the
    // log is read to its end.
    let last_scrape = match (end.is_some(), metrics_addr) {
        (true, Some(addr)) => match metrics::Scrape::get(addr) {
            Ok(s) => Some(s),
            Err(e) => {
                world
                    .books
                    .note(format!("the last scrape of /metrics failed: {e}"));
                None
            }
        },
        _ => None,
    };

    // SIGTERM: a graceful shutdown with nothing left to drain, exit 0.
    let status = proxy.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    if !status.success() {
        world
            .books
            .note(format!("after SIGTERM the proxy exited with {status}"));
    }
    books_stop.store(true, Ordering::Relaxed);
    let mut tailer = tailer_thread.join().expect("the books thread");
    tailer.poll(&world.books);
    world.stop_backends.store(true, Ordering::SeqCst);
    let backends_list = backends.list.clone();
    backends.join();
    world.books.settle(true);
    let stats = tailer.stats.clone();
    let figures = world.books.figures();
    compare_counters(&world.books, &stats, &figures, &injected, clients_started);
    if let Some(scrape) = &last_scrape {
        let anonymous = world.books.anonymous();
        for what in metrics::compare(
            scrape,
            &figures,
            &stats,
            &backends_list,
            &anonymous,
            MAX_DISK,
        ) {
            world.books.note(what);
        }
    }

    let (violations, shown) = world.books.violations();
    let (closes, max_conn_id) = world.books.conn_ids();
    println!(
        "soak: {} clients over {:.0}s of load (+{:.0}s warm-up), {} close lines (conn ids up to {}), {} log lines in {} files, {} of {} connections exact ({} of them with bytes dropped, {} of the {} that kept sending after their response ended), the rest within bounds",
        figures.connections,
        load_secs,
        WARMUP.as_secs_f64(),
        closes,
        max_conn_id,
        stats.lines,
        stats.segments,
        figures.exact,
        figures.connections,
        figures.exact_dropping,
        figures.kept_sending_exact,
        figures.kept_sending
    );
    let per_backend: Vec<String> = backends_kinds()
        .iter()
        .zip(&figures.by_backend)
        .map(|(k, n)| format!("{}={n}", k.name()))
        .collect();
    println!(
        "soak: connections by the backend their close line names: {}",
        per_backend.join(" ")
    );
    match &end {
        Some(end) => println!(
            "soak: proxy at the end: {} fds (start {}), {} threads (start {}), {} KiB RSS (after warm-up {}), {} spill files, tmpfs {} bytes used; {status}",
            end.fds,
            base.fds,
            end.threads,
            base.threads,
            end.rss_kib,
            after_warmup.rss_kib,
            end.spill_files,
            end.disk_used.map_or("-".into(), |u| u.to_string())
        ),
        None => println!("soak: the proxy had died before the end: {status}"),
    }
    let fault = |a: &AtomicU64| a.load(Ordering::Relaxed);
    // Times a direction stopped reading for want of disk: the proxy's
    // counters count every time, its WARNs only each connection's first.
    let counted = |key: &str, warns: u64| {
        last_scrape
            .as_ref()
            .and_then(|s| s.value(key).ok())
            .unwrap_or(warns)
    };
    let disk_errors = counted(
        "spillway_backpressure_events_total{cause=\"disk_error\"}",
        stats.disk_full,
    );
    let max_disk_hits = counted(
        "spillway_backpressure_events_total{cause=\"max_disk\"}",
        stats.max_disk,
    );
    println!(
        "soak: seed={} duration={} connections={} bytes_up={} bytes_down={} spilled={} dropped={} faults{{client_reset={}, vanish={}, backend_reset={}, refused={}, no_backend={}, blackhole={}, flaps={}, outages={}, back_after_outage={}/{}, disk_full={}, spill_disk_peak={}, max_disk_hits={}, max_conn_hits={}, idle_timeouts={}, kept_sending={}, sighup={}, scrapes={}}} losses={} violations={}",
        opts.seed,
        show(opts.duration),
        figures.connections,
        figures.bytes_up,
        figures.bytes_down,
        figures.spilled,
        figures.dropped,
        figures.client_reset,
        figures.vanish,
        figures.backend_reset,
        stats.refused,
        figures.no_backend,
        figures.by_backend[blackhole_index(&backends_kinds())],
        fault(&injected.flaps),
        fault(&injected.outages),
        fault(&injected.recovered),
        fault(&injected.recovered) + fault(&injected.not_recovered),
        if disk.is_some() {
            format!("{}/{}", disk_errors, fault(&injected.disk_full))
        } else {
            "skipped".into()
        },
        fault(&injected.spill_disk_peak),
        max_disk_hits,
        stats.max_conn,
        figures.idle_timeouts,
        figures.kept_sending,
        fault(&injected.sighup),
        fault(&injected.scrapes),
        figures.losses,
        violations
    );
    let failed = violations > 0 || figures.losses > 0;
    if opts.keep && !failed {
        println!(
            "soak: the proxy's logs are kept in {}",
            keep_logs(&proxy.log_path, opts.seed).display()
        );
    }
    if failed {
        let kept = keep_logs(&proxy.log_path, opts.seed);
        eprintln!(
            "soak: FAILED: {violations} violation(s){} (seed {}; the proxy's logs are kept in {})",
            if violations as usize > shown.len() {
                format!(", the first {} shown above", shown.len())
            } else {
                String::new()
            },
            opts.seed,
            kept.display()
        );
    }
    drop(proxy);
    drop(disk);
    if failed { Err(()) } else { Ok(()) }
}

fn backends_kinds() -> Vec<backend::Kind> {
    backend::LINEUP.iter().map(|(k, _)| *k).collect()
}

fn blackhole_index(kinds: &[backend::Kind]) -> usize {
    kinds
        .iter()
        .position(|k| *k == backend::Kind::Blackhole)
        .expect("a blackhole")
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// How many clients should be live at `t` into a phase.
#[derive(Clone, Copy)]
enum Shape {
    Flat(u32),
    /// From `low` to `high` and back every `period`.
    Wave {
        low: u32,
        high: u32,
        period: Duration,
    },
}

impl Shape {
    fn target(self, t: Duration) -> usize {
        match self {
            Shape::Flat(n) => n as usize,
            Shape::Wave { low, high, period } => {
                let phase = t.as_secs_f64() / period.as_secs_f64() * std::f64::consts::TAU;
                let x = 0.5 - 0.5 * phase.cos();
                (f64::from(low) + f64::from(high - low) * x).round() as usize
            }
        }
    }
}

/// Start clients for `duration`, keeping as many live as `shape` says, at
/// most SPAWN_RATE a second.
fn load(world: &Arc<World>, duration: Duration, shape: Shape, next_id: &mut u64, pid: u32) {
    let start = Instant::now();
    let mut spawned = 0u64;
    while start.elapsed() < duration && !world.abort.load(Ordering::Relaxed) {
        if !alive(pid) {
            world.books.note(format!(
                "the proxy (pid {pid}) exited in the middle of the run"
            ));
            world.abort.store(true, Ordering::SeqCst);
            return;
        }
        let allowed = (start.elapsed().as_secs_f64() * SPAWN_RATE) as u64 + 1;
        let target = shape.target(start.elapsed());
        while world.live_clients.load(Ordering::SeqCst) < target && spawned < allowed {
            spawn_client(world, *next_id);
            *next_id += 1;
            spawned += 1;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Is our child `pid` still running (not exited and waiting to be reaped)?
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

fn spawn_client(world: &Arc<World>, id: u64) {
    world.live_clients.fetch_add(1, Ordering::SeqCst);
    let w = world.clone();
    let spawned = thread::Builder::new()
        .name("soak-client".into())
        .stack_size(backend::STACK)
        .spawn(move || {
            let plan = Plan::new(w.seed, id);
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| client::run(&w, &plan)));
            match outcome {
                Ok(record) => w.books.client_done(record),
                Err(p) => w
                    .books
                    .note(format!("soak: client {id} panicked: {}", panic_text(&p))),
            }
            w.live_clients.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        world.live_clients.fetch_sub(1, Ordering::SeqCst);
        world
            .books
            .note(format!("soak: cannot spawn client {id}: {e}"));
    }
}

/// Wait until every client and backend thread has finished and the books
/// hold no open connection (every close line in). False at the deadline.
fn wait_quiet(world: &World, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let quiet = world.live_clients.load(Ordering::SeqCst) == 0
            && world.live_backend_conns.load(Ordering::SeqCst) == 0
            && world.books.open_entries() == 0;
        if quiet {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn wait_threads(world: &World, within: Duration) {
    let deadline = Instant::now() + within;
    while (world.live_clients.load(Ordering::SeqCst) > 0
        || world.live_backend_conns.load(Ordering::SeqCst) > 0)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(50));
    }
}

/// What the proxy holds, from /proc (and the tmpfs's statvfs).
struct Resources {
    fds: usize,
    threads: usize,
    rss_kib: u64,
    spill_files: usize,
    disk_used: Option<u64>,
}

impl Resources {
    fn of(proxy: &common::Proxy, disk: Option<&faults::Tmpfs>) -> Resources {
        Resources {
            fds: proxy.fd_count(),
            threads: fs::read_dir(format!("/proc/{}/task", proxy.pid)).map_or(0, |d| d.count()),
            rss_kib: proxy.rss_kib(),
            spill_files: proxy.spill_files().len(),
            disk_used: disk.map(faults::Tmpfs::used),
        }
    }
}

/// Wait (bounded) for the idle proxy to hold what it held at start: the
/// same fds and threads, no spill file, no byte on the tmpfs. Reports
/// what is still held at the deadline.
fn wait_resources(
    proxy: &common::Proxy,
    disk: Option<&faults::Tmpfs>,
    base: &Resources,
    used_at_start: u64,
) -> Resources {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = Resources::of(proxy, disk);
        let back = now.fds == base.fds
            && now.threads == base.threads
            && now.spill_files == 0
            && now.disk_used.is_none_or(|u| u == used_at_start);
        if back || Instant::now() >= deadline {
            return now;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The proxy's own counters against the books.
fn compare_counters(
    books: &Books,
    stats: &log::LogStats,
    f: &books::Figures,
    injected: &faults::Injected,
    clients: u64,
) {
    let differ = |what: &str, proxy: u64, ours: u64| {
        if proxy != ours {
            books.note(format!("{what}: the proxy says {proxy}, the books {ours}"));
        }
    };
    let (closes, max_conn) = books.conn_ids();
    differ("close lines", stats.closes, clients);
    differ("connection ids", max_conn, closes as u64);
    differ("close lines checked", closes as u64, f.connections);
    differ(
        "first-spill WARNs client->backend",
        stats.spill_warns[0],
        f.spilled_up_conns,
    );
    differ(
        "first-spill WARNs backend->client",
        stats.spill_warns[1],
        f.spilled_down_conns,
    );
    differ(
        "\"no backend could be reached\" ERRORs",
        stats.no_backend,
        f.no_backend,
    );
    differ("\"idle ...: closing\" lines", stats.idle, f.idle_timeouts);
    // An idle connection is closed at once, both sockets: one such line
    // each (it used to linger 2s and say it again at every sweep).
    differ(
        "repeated \"idle ...: closing\" lines",
        stats.idle_repeats,
        0,
    );
    // Rotation keeps every line whole in one file or the other.
    differ("log lines split over a rotation", stats.split_lines, 0);
    differ(
        "\"log file reopened\" lines",
        stats.sighup,
        injected.sighup.load(Ordering::Relaxed),
    );
    differ("\"listening on\" lines", stats.listening, 1);
    // ("stopping; N connection(s) were still open" comes only when the
    // workers are stopped outright: a second signal, or a worker's error.)
    let expected = [
        "received SIGTERM: no longer accepting; 0 connection(s) may finish",
        "shutdown complete: 0 connection(s) finished, 0 closed while quiet, 0 cut at the timeout with 0 B undelivered",
    ];
    let said = &stats.shutdown;
    let in_order = said.len() == expected.len()
        && said
            .iter()
            .zip(expected)
            .all(|(line, start)| line.starts_with(start));
    if !in_order {
        books.note(format!(
            "the shutdown said {said:?}, not lines starting {expected:?}"
        ));
    }
}

/// Copy the proxy's logs out of its work dir (removed with it) for
/// whoever looks into a failure.
fn keep_logs(log_path: &Path, seed: u64) -> PathBuf {
    let kept = std::env::temp_dir().join(format!("spillway-soak-{seed}-{}", std::process::id()));
    let _ = fs::create_dir_all(&kept);
    if let Some(dir) = log_path.parent() {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let _ = fs::copy(entry.path(), kept.join(entry.file_name()));
        }
    }
    kept
}
