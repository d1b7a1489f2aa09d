//! **scrape**: how long `GET /metrics` takes while spillway holds many
//! connections, and the scraper the `+metrics` rows of the other workloads
//! run beside their work.
//!
//! spillway runs as shipped (`tcp` mode, one worker per core, INFO logs)
//! with `--metrics-listen`, in front of a backend that accepts connections
//! and holds them without a word. 1,000 clients (100 in smoke mode)
//! connect through it, and once the backend has all of them, `GET
//! /metrics` is timed 20 times, one after the other, each on a new
//! connection: connect to the last byte of the answer. Figures: median and
//! max (the target is under 50ms), the size of the answer, and what it
//! said of the connections open (a check that the scrape sees them).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::Options;
use crate::peers::{Peer, Proxy, Setup, Variant, cores};
use crate::report::{Table, percentile, problems_note};

const CONNECTIONS: usize = 1000;
const SMOKE_CONNECTIONS: usize = 100;
const SCRAPES: usize = 20;

/// How often the `+metrics` rows are scraped while they work: far more
/// often than Prometheus would (15s is usual), so any cost would show.
const SCRAPE_EVERY: Duration = Duration::from_secs(1);

/// Bound on one scrape, and on the wait for the held connections.
const TIMEOUT: Duration = Duration::from_secs(10);

/// One answered scrape.
pub struct Scraped {
    /// Connect to the last byte of the answer.
    pub took: Duration,
    pub body: String,
}

/// `GET /metrics` from `at` on a new connection: a 200 with a body that
/// names spillway's metrics, or why not.
pub fn get(at: SocketAddr) -> Result<Scraped, String> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&at, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut got = Vec::new();
    s.take(16 << 20)
        .read_to_end(&mut got)
        .map_err(|e| format!("read: {e}"))?;
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of head")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("status {:?}", head.lines().next().unwrap_or("")));
    }
    if !body.contains("spillway_connections_open") {
        return Err("no spillway_connections_open in the answer".into());
    }
    Ok(Scraped {
        took,
        body: body.to_string(),
    })
}

/// The value of a metric without labels in a scrape's text.
fn value(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Scrapes `at` every [`SCRAPE_EVERY`] on a thread of its own, from its
/// start until `finish`, as Prometheus would, only more often.
pub struct Scraper {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<ScraperReport>,
}

/// What the scrapes of one run saw.
#[derive(Default)]
pub struct ScraperReport {
    pub took: Vec<Duration>,
    pub failures: Vec<String>,
}

impl Scraper {
    pub fn start(at: SocketAddr) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut report = ScraperReport::default();
            // Bounded by `stop`, and by an hour of scrapes besides.
            for _ in 0..3600 {
                match get(at) {
                    Ok(s) => report.took.push(s.took),
                    Err(e) => report.failures.push(e),
                }
                let next = Instant::now() + SCRAPE_EVERY;
                while Instant::now() < next {
                    if flag.load(Ordering::Relaxed) {
                        return report;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
            report
        });
        Scraper { stop, thread }
    }

    pub fn finish(self) -> ScraperReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// A note for a table about a `+metrics` row's scrapes.
pub fn note(label: &str, runs: &[ScraperReport]) -> Option<String> {
    let took: Vec<Duration> = runs.iter().flat_map(|r| r.took.iter().copied()).collect();
    let failed: usize = runs.iter().map(|r| r.failures.len()).sum();
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    (!took.is_empty() || failed > 0).then(|| {
        format!(
            "{label}: {} scrape(s) during the runs, one a second: median {:.1} ms, max {:.1} ms, {failed} failed",
            took.len(),
            ms(percentile(&took, 50.0)),
            ms(percentile(&took, 100.0)),
        )
    })
}

/// A backend that accepts connections and holds them, silent, until
/// dropped; counts what it accepted.
struct Holder {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Holder {
    fn start() -> Result<Holder, String> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, held, stop) = (accepted.clone(), held.clone(), stop.clone());
            // Bounded by `stop`: Drop sets it, then connects to wake us.
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Ok(stream) = stream {
                        held.lock().unwrap().push(stream);
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Ok(Holder {
            addr,
            accepted,
            held,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let woken = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(t) = self.thread.take().filter(|_| woken) {
            let _ = t.join();
        }
        self.held.lock().unwrap().clear();
    }
}

/// Run the scrape workload, print its table; the checks that failed.
pub fn run(opts: &Options, work: &Path) -> Vec<String> {
    if !opts.peers.contains(&Peer::Spillway) {
        println!("\nscrape: skipped: spillway is not in --peers");
        return Vec::new();
    }
    let n = if opts.smoke {
        SMOKE_CONNECTIONS
    } else {
        CONNECTIONS
    };
    raise_fd_limit(4 * n + 256);
    let mut failures = Vec::new();
    let mut table = Table::new(
        format!(
            "scrape: GET /metrics while spillway (tcp, {} worker(s)) holds {n} connections to a silent backend, {SCRAPES} scrapes one after the other",
            cores()
        ),
        &[
            "",
            "median ms",
            "max ms",
            "answer KiB",
            "connections_open seen",
        ],
    );
    match scrape_held(n, work, &mut table) {
        Ok(()) => {}
        Err(e) => failures.push(format!("scrape: {e}")),
    }
    table.note("from connect to the last byte of the answer, a new connection each; the target is under 50 ms");
    table.print();
    failures
}

fn scrape_held(n: usize, work: &Path, table: &mut Table) -> Result<(), String> {
    let holder = Holder::start()?;
    let proxy = Proxy {
        peer: Peer::Spillway,
        variant: Variant::Metrics,
    };
    let running = proxy.start(holder.addr, Setup::tcp(cores()), work)?;
    let at = running.metrics.ok_or("spillway started without metrics")?;
    // The probe that found spillway listening went to the backend too.
    let before = holder.accepted.load(Ordering::Relaxed);
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let c = TcpStream::connect_timeout(&running.addr, TIMEOUT)
            .map_err(|e| format!("client {i} of {n}: connect: {e}"))?;
        clients.push(c);
    }
    let deadline = Instant::now() + TIMEOUT;
    while holder.accepted.load(Ordering::Relaxed) < before + n {
        if Instant::now() > deadline {
            return Err(format!(
                "the backend holds {} of {n} connections after {TIMEOUT:?}",
                holder.accepted.load(Ordering::Relaxed) - before
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
    let mut took = Vec::with_capacity(SCRAPES);
    let mut last = None;
    for _ in 0..SCRAPES {
        let s = get(at)?;
        took.push(s.took);
        last = Some(s);
    }
    let last = last.ok_or("no scrape")?;
    let open = value(&last.body, "spillway_connections_open");
    let ms = |d: Option<Duration>| {
        d.map_or("-".to_string(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
    };
    table.row(vec![
        format!("spillway +metrics, {n} held"),
        ms(percentile(&took, 50.0)),
        ms(percentile(&took, 100.0)),
        format!("{:.1}", last.body.len() as f64 / 1024.0),
        open.map_or("-".into(), |v| format!("{v:.0}")),
    ]);
    if open.is_none_or(|v| (v as usize) < n) {
        table.note(format!(
            "spillway_connections_open read {open:?} with {n} clients connected"
        ));
    }
    drop(clients);
    let finished = running.finish();
    table.notes_extend(problems_note("spillway +metrics", &finished.problems));
    Ok(())
}

/// Raise this process's soft limit on open files towards `want` (its
/// children inherit it): the clients and the backend's end of every
/// connection are both in this process.
fn raise_fd_limit(want: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass, and
    // nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = (want as libc::rlim_t).min(lim.rlim_max);
        if lim.rlim_cur < want {
            lim.rlim_cur = want;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
