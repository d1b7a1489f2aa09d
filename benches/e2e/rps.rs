//! **rps**: many short HTTP/1.1 exchanges, driven by `wrk`.
//!
//! The backend is nginx serving a 1KiB `index.html` (sendfile on, logs
//! off, one worker per core: the same backend for every row, so it cancels
//! out of the ratios). The client is `wrk -t2 -c50 -d5s --latency`, in two
//! modes: keep-alive, and a new connection per request (`Connection:
//! close`, which the backend honours by closing). Each proxy runs at one
//! worker, then at one per core. Figures: requests/s, p50 and p99 latency
//! as wrk reports them, and errors (non-2xx/3xx responses and socket
//! errors), summed over the runs. Before wrk, one request through the
//! proxy checks the file arrives byte for byte.
//!
//! At one worker spillway has three rows: as shipped (INFO logs: a line
//! per connection), `spillway warn` (`--log-level warn`) and `spillway
//! +metrics` (`--metrics-listen`, scraped every second during the run);
//! the column `x spillway` gives their ratios to the first. The `http`
//! workload runs the same tables with HTTP proxies ([`table`], [`Spec`]).

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::peers::{self, Peer, Proxy, Setup, Variant};
use crate::process::{self, Kind, Running};
use crate::report::{Table, median, problems_note, ratio};
use crate::scrape::{self, Scraper, ScraperReport};
use crate::{Options, run_order};

const SECS: u64 = 5;
const SMOKE_SECS: u64 = 2;
const THREADS: usize = 2;
const CONNECTIONS: usize = 50;

/// wrk counts a request that took longer than this as a timeout.
const WRK_TIMEOUT: &str = "2s";

/// How long wrk may run past its duration before it is killed.
const WRK_GRACE: Duration = Duration::from_secs(20);

const INDEX_LEN: usize = 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    KeepAlive,
    /// `Connection: close`: one TCP connection per request.
    Close,
}

impl Mode {
    pub const BOTH: [Mode; 2] = [Mode::KeepAlive, Mode::Close];

    fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::Close => "connection per request",
        }
    }
}

/// What wrk said about one run.
#[derive(Default, Debug)]
struct WrkRun {
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    connect: u64,
    read: u64,
    write: u64,
    timeout: u64,
}

impl WrkRun {
    /// Failed requests: everything but timeouts, which only say a request
    /// was slower than WRK_TIMEOUT.
    fn errors(&self) -> u64 {
        self.non_2xx + self.connect + self.read + self.write
    }
}

/// Which row a table's ratio column divides by.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Against {
    /// The faster of nginx stream and HAProxy tcp: the TCP proxies
    /// spillway's `tcp` mode replaces.
    BestTcpPeer,
    /// nginx `http`: what spillway's `http` mode replaces.
    NginxHttp,
}

/// One table of wrk runs: the direct row, then `proxies`, each set up as
/// `setup` says.
pub struct Spec {
    /// The table's name: "rps" or "http rps".
    pub name: &'static str,
    pub mode: Mode,
    pub setup: Setup,
    pub proxies: Vec<Proxy>,
    pub against: Against,
}

struct Row {
    label: String,
    proxy: Option<Proxy>,
    skipped: Option<String>,
    runs: Vec<WrkRun>,
    problems: Vec<String>,
    /// `+metrics` rows: what the scrapes during each run saw.
    scrapes: Vec<ScraperReport>,
}

/// How long each wrk run lasts.
pub fn secs(opts: &Options) -> u64 {
    if opts.smoke { SMOKE_SECS } else { SECS }
}

/// The worker counts every table is run at: one, and one per core (full
/// mode only, on a machine with more than one).
pub fn worker_counts(opts: &Options) -> Vec<usize> {
    let mut workers = vec![1];
    if !opts.smoke && peers::cores() > 1 {
        workers.push(peers::cores());
    }
    workers
}

/// Run the rps workload, print a table per mode and worker count; the
/// checks that failed.
///
/// At one worker spillway has three rows: as shipped (INFO logs), `warn`
/// (the difference is what logging costs) and `+metrics` (scraped every
/// second: the difference is what metrics cost).
pub fn run(opts: &Options, work: &Path) -> Vec<String> {
    let Some(wrk) = peers::which("wrk") else {
        println!("\nrps: skipped: wrk is not installed (apt-get install wrk)");
        return Vec::new();
    };
    let backend = match start_backend(work) {
        Ok(b) => b,
        Err(e) => {
            println!("\nrps: skipped: the backend (nginx) would not start: {e}");
            return Vec::new();
        }
    };
    let mut failures = Vec::new();
    for mode in Mode::BOTH {
        for n in worker_counts(opts) {
            let variants: &[Variant] = if n == 1 {
                &[Variant::Shipped, Variant::Warn, Variant::Metrics]
            } else {
                &[Variant::Shipped]
            };
            let spec = Spec {
                name: "rps",
                mode,
                setup: Setup::tcp(n),
                proxies: peers::rows(&opts.peers, variants, false),
                against: Against::BestTcpPeer,
            };
            failures.extend(table(opts, &wrk, backend.addr, work, &spec));
        }
    }
    finish_backend(backend);
    failures
}

/// Stop the rps backend and say if its logs had trouble.
pub fn finish_backend(backend: Running) {
    let finished = backend.finish();
    if let Some(note) = problems_note("rps backend (nginx)", &finished.problems) {
        println!("  note: {note}");
    }
}

/// Run one table's rows, interleaved, `opts.runs` times, and print it;
/// the checks that failed.
pub fn table(
    opts: &Options,
    wrk: &Path,
    backend: SocketAddr,
    work: &Path,
    spec: &Spec,
) -> Vec<String> {
    let http = spec.setup.http;
    let mut rows: Vec<Row> = std::iter::once(None)
        .chain(spec.proxies.iter().copied().map(Some))
        .map(|proxy| Row {
            label: proxy.map_or("direct (nginx backend)".into(), |p| p.label(http)),
            proxy,
            skipped: None,
            runs: Vec::new(),
            problems: Vec::new(),
            scrapes: Vec::new(),
        })
        .collect();
    let mut failures = Vec::new();
    let workers = spec.setup.workers;
    for run in 0..opts.runs {
        for i in run_order(rows.len(), 1, run) {
            let row = &mut rows[i];
            if row.skipped.is_some() {
                continue;
            }
            let cell = format!(
                "{}, {}, {workers} worker(s), {}, run {}",
                spec.name,
                spec.mode.name(),
                row.label,
                run + 1
            );
            match one(row, wrk, spec, secs(opts), backend, work) {
                Ok(Some(r)) => {
                    if r.requests == 0 {
                        failures.push(format!("{cell}: no request completed"));
                    } else if r.errors() > 0 {
                        failures.push(format!(
                            "{cell}: {} failed request(s) (non-2xx {}, connect {}, read {}, write {})",
                            r.errors(),
                            r.non_2xx,
                            r.connect,
                            r.read,
                            r.write
                        ));
                    }
                    row.runs.push(r);
                }
                Ok(None) => {}
                Err(e) => failures.push(format!("{cell}: {e}")),
            }
            if let Some(scrapes) = row.scrapes.last() {
                failures.extend(
                    scrapes
                        .failures
                        .first()
                        .map(|e| format!("{cell}: a scrape of /metrics failed: {e}")),
                );
            }
        }
    }
    print(opts, spec, &rows);
    failures
}

/// One wrk run through `row`'s proxy, started for it and stopped after.
/// Ok(None) when the proxy could not start (the row is then skipped).
fn one(
    row: &mut Row,
    wrk: &Path,
    spec: &Spec,
    secs: u64,
    backend: SocketAddr,
    work: &Path,
) -> Result<Option<WrkRun>, String> {
    let proxy = match row.proxy {
        None => None,
        Some(proxy) => match proxy.start(backend, spec.setup, work) {
            Ok(p) => Some(p),
            Err(why) => {
                row.skipped = Some(why);
                return Ok(None);
            }
        },
    };
    let addr = proxy.as_ref().map_or(backend, |p| p.addr);
    let scraper = proxy.as_ref().and_then(|p| p.metrics).map(Scraper::start);
    let result = check_index(addr).and_then(|()| run_wrk(wrk, addr, spec.mode, secs, work));
    if let Some(scraper) = scraper {
        row.scrapes.push(scraper.finish());
    }
    if let Some(p) = proxy {
        row.problems.extend(p.finish().problems);
    }
    result.map(Some)
}

fn print(opts: &Options, spec: &Spec, rows: &[Row]) {
    let rps = |r: &Row| {
        (!r.runs.is_empty()).then(|| median(&r.runs.iter().map(|w| w.rps).collect::<Vec<_>>()))
    };
    let reference = match spec.against {
        Against::BestTcpPeer => rows
            .iter()
            .filter(|r| r.proxy.is_some_and(|p| peers::TCP_PEERS.contains(&p.peer)))
            .filter_map(rps)
            .reduce(f64::max),
        Against::NginxHttp => rows
            .iter()
            .find(|r| r.proxy.is_some_and(|p| p.peer == Peer::NginxHttp))
            .and_then(rps),
    };
    let shipped = Proxy {
        peer: Peer::Spillway,
        variant: Variant::Shipped,
    };
    let spillway = rows.iter().find(|r| r.proxy == Some(shipped)).and_then(rps);
    // The column that prices logging and metrics, when there is a row
    // to price.
    let variants = rows
        .iter()
        .any(|r| r.proxy.is_some_and(|p| p.variant != Variant::Shipped));
    let (against, against_note) = match spec.against {
        Against::BestTcpPeer => (
            "x best TCP peer",
            "x best TCP peer: against the faster of nginx stream and HAProxy tcp",
        ),
        Against::NginxHttp => ("x nginx http", "x nginx http: against nginx http's req/s"),
    };
    let mut header = vec!["", "req/s", against];
    if variants {
        header.push("x spillway");
    }
    header.extend(["p50 ms", "p99 ms", "errors", "timeouts"]);
    let mut table = Table::new(
        format!(
            "{}, {}: wrk -t{THREADS} -c{CONNECTIONS} -d{}s, {INDEX_LEN}B file, proxies at {} worker(s), median of {} run(s)",
            spec.name,
            spec.mode.name(),
            secs(opts),
            spec.setup.workers,
            opts.runs
        ),
        &header,
    );
    for row in rows {
        if let Some(why) = &row.skipped {
            table.note(format!("skipped {}: {why}", row.label));
            continue;
        }
        let med = |f: fn(&WrkRun) -> f64| {
            if row.runs.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}", median(&row.runs.iter().map(f).collect::<Vec<_>>()))
            }
        };
        let r = rps(row);
        let mut cells = vec![
            row.label.clone(),
            r.map_or("-".into(), |v| format!("{v:.0}")),
            ratio(r, reference),
        ];
        if variants {
            let priced = row.proxy.is_some_and(|p| p.peer == Peer::Spillway);
            cells.push(if priced {
                ratio(r, spillway)
            } else {
                "-".into()
            });
        }
        cells.extend([
            med(|w| w.p50_ms),
            med(|w| w.p99_ms),
            row.runs.iter().map(WrkRun::errors).sum::<u64>().to_string(),
            row.runs.iter().map(|w| w.timeout).sum::<u64>().to_string(),
        ]);
        table.row(cells);
        table.notes_extend(problems_note(&row.label, &row.problems));
        table.notes_extend(scrape::note(&row.label, &row.scrapes));
    }
    let mut note = format!("{against_note}; errors and timeouts: summed over the runs");
    if variants {
        note.push_str("; x spillway: against spillway as shipped (INFO logs, no metrics)");
    }
    table.note(note);
    table.print();
}

/// The 1KiB file the backend serves: printable, and different at every
/// offset within a line so a shifted copy does not compare equal.
fn index_body() -> Vec<u8> {
    (0..INDEX_LEN)
        .map(|i| {
            if i % 64 == 63 {
                b'\n'
            } else {
                b'a' + ((i * 7 + i / 64) % 26) as u8
            }
        })
        .collect()
}

/// nginx serving `index.html`, one worker per core.
pub fn start_backend(work: &Path) -> Result<Running, String> {
    let dir = peers::fresh_dir(work, "rps-backend")?;
    let www = dir.join("www");
    fs::create_dir_all(&www).map_err(|e| format!("{}: {e}", www.display()))?;
    fs::write(www.join("index.html"), index_body()).map_err(|e| e.to_string())?;
    let addr = SocketAddr::from(([127, 0, 0, 1], peers::free_port()?));
    let mut body = String::from("http {\n  access_log off;\n  sendfile on;\n");
    body.push_str("  keepalive_requests 1000000;\n  default_type text/html;\n");
    body.push_str(&peers::nginx_temp_paths(&dir));
    let _ = writeln!(
        body,
        "  server {{\n    listen {addr};\n    root {};\n  }}\n}}",
        www.display()
    );
    let conf = peers::nginx_conf(&dir, peers::cores(), false, &body);
    let cmd = peers::nginx_command(&dir, &conf)?;
    let mut backend = Running::spawn(cmd, Kind::Nginx, addr, dir)?;
    backend.wait_listening()?;
    Ok(backend)
}

/// One GET of the file through `addr`: status 200 and the exact bytes.
fn check_index(addr: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /index.html HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send the check request: {e}"))?;
    let mut got = Vec::new();
    s.take(64 * 1024)
        .read_to_end(&mut got)
        .map_err(|e| format!("read the check response: {e}"))?;
    let end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("check response: no end of head")?;
    let status = String::from_utf8_lossy(&got[..end.min(20)]).to_string();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("check response: status {status:?}"));
    }
    if got[end + 4..] != index_body()[..] {
        return Err(format!(
            "check response: body of {} bytes differs from the {INDEX_LEN}B file",
            got.len() - end - 4
        ));
    }
    Ok(())
}

/// Kills wrk if the bench gives up on it (deadline or panic).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_wrk(
    wrk: &Path,
    addr: SocketAddr,
    mode: Mode,
    secs: u64,
    work: &Path,
) -> Result<WrkRun, String> {
    let dir: PathBuf = peers::fresh_dir(work, "wrk")?;
    let out = dir.join("stdout.txt");
    let mut cmd = Command::new(wrk);
    cmd.args(["-t", &THREADS.to_string(), "-c", &CONNECTIONS.to_string()])
        .args([
            "-d",
            &format!("{secs}s"),
            "--timeout",
            WRK_TIMEOUT,
            "--latency",
        ]);
    if mode == Mode::Close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{addr}/index.html"))
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).map_err(|e| e.to_string())?)
        .stderr(fs::File::create(dir.join("stderr.txt")).map_err(|e| e.to_string())?);
    let mut child = Reaped(process::spawn_tied(&mut cmd).map_err(|e| format!("start wrk: {e}"))?);
    let deadline = Instant::now() + Duration::from_secs(secs) + WRK_GRACE;
    let status = loop {
        if let Some(status) = child.0.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "wrk still running {WRK_GRACE:?} after its duration"
            ));
        }
        thread::sleep(Duration::from_millis(50));
    };
    let text = fs::read_to_string(&out).unwrap_or_default();
    if !status.success() {
        let err = fs::read_to_string(dir.join("stderr.txt")).unwrap_or_default();
        return Err(format!("wrk exited with {status}: {}", err.trim()));
    }
    parse_wrk(&text)
}

/// The figures in wrk's report (4.x format).
fn parse_wrk(text: &str) -> Result<WrkRun, String> {
    let mut run = WrkRun::default();
    let mut found_rps = false;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", t] => run.p50_ms = parse_ms(t)?,
            ["99%", t] => run.p99_ms = parse_ms(t)?,
            ["Requests/sec:", v] => {
                run.rps = v.parse().map_err(|_| format!("wrk: bad rate {v:?}"))?;
                found_rps = true;
            }
            [n, "requests", "in", ..] => {
                run.requests = n.parse().map_err(|_| format!("wrk: bad count {n:?}"))?;
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                run.non_2xx = n.parse().map_err(|_| format!("wrk: bad count {n:?}"))?;
            }
            ["Socket", "errors:", rest @ ..] => {
                // connect 0, read 0, write 0, timeout 0
                for pair in rest.join(" ").split(',') {
                    let mut kv = pair.split_whitespace();
                    let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
                        continue;
                    };
                    let v: u64 = v.parse().map_err(|_| format!("wrk: bad count {v:?}"))?;
                    match k {
                        "connect" => run.connect = v,
                        "read" => run.read = v,
                        "write" => run.write = v,
                        "timeout" => run.timeout = v,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !found_rps {
        return Err(format!("no Requests/sec in wrk's report: {text:?}"));
    }
    Ok(run)
}

/// wrk's durations: 812.00us, 1.23ms, 2.00s, 1.00m.
fn parse_ms(t: &str) -> Result<f64, String> {
    let split = t
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| format!("wrk: no unit in {t:?}"))?;
    let (value, unit) = t.split_at(split);
    let value: f64 = value.parse().map_err(|_| format!("wrk: bad time {t:?}"))?;
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        "h" => 3600e3,
        _ => return Err(format!("wrk: unknown unit in {t:?}")),
    };
    Ok(value * scale)
}
