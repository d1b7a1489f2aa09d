//! **http**: spillway's `--mode http` beside the HTTP proxies it replaces,
//! nginx `http` and HAProxy `mode http`, each buffering requests and
//! responses as far as it can (peers.rs has the configs), with the same
//! upstream keep-alive pool ([`peers::UPSTREAM_KEEPALIVE`]).
//!
//! Four works:
//! - **rps, keep-alive** and **rps, connection per request**: the rps
//!   tables (`wrk -t2 -c50`, the nginx backend serving 1KiB) with HTTP
//!   proxies, at one worker and at one per core; the ratio is against
//!   nginx `http`. Here a proxy can reuse its backend connections, which a
//!   TCP proxy cannot. At one worker "spillway http warn" (`--log-level
//!   warn`) stands beside it: in this mode the INFO log has a line per
//!   request.
//! - **slow downloads**: 100 clients, each fetching 8MiB twice, one after
//!   the other on one keep-alive connection, reading at 1MiB/s. The figure
//!   is the backend's hold per request, from the first byte of the request
//!   head to the last byte of the response written: what a backend worker
//!   is tied up for. Then the clients' own time (about 2 x size / rate),
//!   the proxy's peak RSS, what it wrote to disk, and every body checked.
//! - **slow uploads**: 100 clients, each POSTing 8MiB at 1MiB/s. The
//!   backend checks every body against what the client sent, byte for
//!   byte, and records its busy time per request, from the first byte of
//!   the head to its answer written: a proxy that buffers the whole body
//!   first makes that the time to read 8MiB locally.
//!
//! The slow works have the backend's and the clients' socket buffers
//! fixed at 64KiB both ways (as slow.rs), and two direct rows for
//! reference: the paced clients straight to the backend (what a proxy
//! saves the backend from), and clients as fast as they go (what a proxy
//! that hides slow clients should make the backend see). Proxies run at
//! one worker. The budget a proxy's peak RSS is held to is 4MiB plus,
//! per connection, two memory buffers and 16KiB.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::backend::{self, HttpBackend, Pace};
use crate::peers::{self, Peer, Proxy, Setup, Variant};
use crate::report::{
    Table, median, median_bytes, median_cell, mib, percentile, problems_note, ratio,
};
use crate::rps::{self, Against, Mode, Spec};
use crate::{Options, run_order};

/// SO_RCVBUF and SO_SNDBUF of every client and backend socket.
const SOCKET_BUFFER: usize = 64 * 1024;

/// spillway's `--memory-buffer`, and the peers' equivalents.
const MEMORY_BUFFER: u64 = 64 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Work {
    Downloads,
    Uploads,
}

impl Work {
    fn name(self) -> &'static str {
        match self {
            Work::Downloads => "slow downloads",
            Work::Uploads => "slow uploads",
        }
    }

    /// Requests per client.
    fn requests(self) -> usize {
        match self {
            Work::Downloads => 2,
            Work::Uploads => 1,
        }
    }
}

struct Params {
    clients: usize,
    size: u64,
    bytes_per_s: u64,
}

const FULL: Params = Params {
    clients: 100,
    size: 8 << 20,
    bytes_per_s: 1 << 20,
};

const SMOKE: Params = Params {
    clients: 10,
    size: 1 << 20,
    bytes_per_s: 1 << 20,
};

/// Run every HTTP work, print their tables; the checks that failed.
pub fn run(opts: &Options, work: &Path) -> Vec<String> {
    let mut failures = rps_tables(opts, work);
    for w in [Work::Downloads, Work::Uploads] {
        failures.extend(slow(opts, w, work));
    }
    failures
}

/// The rps tables with HTTP proxies: keep-alive and a connection per
/// request, at each worker count.
fn rps_tables(opts: &Options, work: &Path) -> Vec<String> {
    let Some(wrk) = peers::which("wrk") else {
        println!("\nhttp rps: skipped: wrk is not installed (apt-get install wrk)");
        return Vec::new();
    };
    let backend = match rps::start_backend(work) {
        Ok(b) => b,
        Err(e) => {
            println!("\nhttp rps: skipped: the backend (nginx) would not start: {e}");
            return Vec::new();
        }
    };
    let mut failures = Vec::new();
    for mode in Mode::BOTH {
        for n in rps::worker_counts(opts) {
            // In http mode spillway logs a line per request, not per
            // connection: at one worker, a warn row prices that.
            let variants: &[Variant] = if n == 1 {
                &[Variant::Shipped, Variant::Warn]
            } else {
                &[Variant::Shipped]
            };
            let spec = Spec {
                name: "http rps",
                mode,
                setup: Setup::http(n),
                proxies: peers::rows(&opts.peers, variants, true),
                against: Against::NginxHttp,
            };
            failures.extend(rps::table(opts, &wrk, backend.addr, work, &spec));
        }
    }
    rps::finish_backend(backend);
    failures
}

struct Row {
    label: String,
    proxy: Option<Proxy>,
    pace: Pace,
    skipped: Option<String>,
    busy_p50_ms: Vec<f64>,
    busy_p99_ms: Vec<f64>,
    client_p50_s: Vec<f64>,
    peak_rss_kib: Vec<u64>,
    spilled: Vec<u64>,
    /// Runs in which every body arrived exact, out of `runs_done`.
    exact_runs: usize,
    runs_done: usize,
    problems: Vec<String>,
}

impl Row {
    fn new(label: &str, proxy: Option<Proxy>, pace: Pace) -> Row {
        Row {
            label: label.to_string(),
            proxy,
            pace,
            skipped: None,
            busy_p50_ms: Vec::new(),
            busy_p99_ms: Vec::new(),
            client_p50_s: Vec::new(),
            peak_rss_kib: Vec::new(),
            spilled: Vec::new(),
            exact_runs: 0,
            runs_done: 0,
            problems: Vec::new(),
        }
    }
}

/// One slow work over every row, interleaved; prints its table.
fn slow(opts: &Options, w: Work, work: &Path) -> Vec<String> {
    let p = if opts.smoke { SMOKE } else { FULL };
    let paced = Pace::Paced {
        bytes_per_s: p.bytes_per_s,
    };
    let backend = HttpBackend::keep_alive(p.size, p.size, SOCKET_BUFFER);
    let mut rows = vec![
        Row::new("direct, slow clients", None, paced),
        Row::new("direct, fast clients", None, Pace::Fast),
    ];
    rows.extend(
        peers::rows(&opts.peers, &[Variant::Shipped], true)
            .into_iter()
            .map(|proxy| Row::new(&proxy.label(true), Some(proxy), paced)),
    );
    let mut failures = Vec::new();
    for run in 0..opts.runs {
        for i in run_order(rows.len(), 2, run) {
            let row = &mut rows[i];
            if row.skipped.is_some() {
                continue;
            }
            let cell = format!("{}, {}, run {}", w.name(), row.label, run + 1);
            failures.extend(one(row, w, run, &p, &backend, work).map(|e| format!("{cell}: {e}")));
        }
    }
    print(opts, w, &p, &rows);
    failures
}

/// One run of every client through `row`'s proxy; a failed check, if any.
fn one(
    row: &mut Row,
    w: Work,
    run: usize,
    p: &Params,
    backend: &HttpBackend,
    work: &Path,
) -> Option<String> {
    let proxy = match row.proxy {
        None => None,
        Some(proxy) => match proxy.start(backend.addr, Setup::http(1), work) {
            Ok(proxy) => Some(proxy),
            Err(why) => {
                row.skipped = Some(why);
                return None;
            }
        },
    };
    let addr = proxy.as_ref().map_or(backend.addr, |p| p.addr);
    let results = clients(addr, w, run, p, row.pace);
    let expected = p.clients * w.requests();
    let served = backend.take_served(expected, Duration::from_secs(10));
    if let Some(proxy) = proxy {
        let finished = proxy.finish();
        row.peak_rss_kib.push(finished.peak_rss_kib);
        row.spilled.extend(finished.spilled);
        row.problems.extend(finished.problems);
    }

    row.runs_done += 1;
    let busy: Vec<Duration> = served.iter().map(|s| s.busy).collect();
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    row.busy_p50_ms.push(ms(percentile(&busy, 50.0)));
    row.busy_p99_ms.push(ms(percentile(&busy, 99.0)));
    let took: Vec<Duration> = results.iter().flatten().copied().collect();
    row.client_p50_s
        .push(percentile(&took, 50.0).map_or(f64::NAN, |d| d.as_secs_f64()));
    // A wrong upload is told twice, by the backend and in the 422 its
    // client gets: count the clients and the backend's findings apart.
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    let wrong: Vec<&String> = served.iter().filter_map(|s| s.wrong.as_ref()).collect();
    if failed.is_empty() && wrong.is_empty() && served.len() == expected {
        row.exact_runs += 1;
        return None;
    }
    let first = failed
        .first()
        .or(wrong.first().copied())
        .map_or("-", String::as_str);
    Some(format!(
        "{} of {} client(s) failed, the backend found {} wrong body/bodies and served {} of {expected} request(s); first: {first}",
        failed.len(),
        p.clients,
        wrong.len(),
        served.len()
    ))
}

/// Start every client at once (a barrier), each on its own thread; what
/// each one took, connect to its last byte, or why it failed.
fn clients(
    addr: SocketAddr,
    w: Work,
    run: usize,
    p: &Params,
    pace: Pace,
) -> Vec<Result<Duration, String>> {
    let at_rate =
        Duration::from_secs_f64((p.size * w.requests() as u64) as f64 / p.bytes_per_s as f64);
    // Twice the paced time plus slack for a loaded machine: bounds a run
    // whatever the proxy does.
    let deadline = Instant::now() + at_rate * 2 + Duration::from_secs(30);
    let start = Arc::new(Barrier::new(p.clients));
    let (size, requests) = (p.size, w.requests());
    let threads: Vec<_> = (0..p.clients)
        .map(|i| {
            let start = start.clone();
            // Every request its own id, so its body its own offset.
            let id = ((run * 100_000 + i) * requests) as u64;
            thread::spawn(move || {
                start.wait();
                match w {
                    Work::Downloads => download(addr, id, requests, size, pace, deadline),
                    Work::Uploads => {
                        backend::post(addr, "up", id, size, pace, Some(SOCKET_BUFFER), deadline)
                    }
                }
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| {
            t.join()
                .unwrap_or_else(|_| Err("client thread panicked".into()))
        })
        .collect()
}

/// `requests` GETs of `size` bytes, one after the other on one keep-alive
/// connection; the whole session's time.
fn download(
    addr: SocketAddr,
    first_id: u64,
    requests: usize,
    size: u64,
    pace: Pace,
    deadline: Instant,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut stream = backend::connect(addr, Some(SOCKET_BUFFER), Some(SOCKET_BUFFER))?;
    for r in 0..requests {
        backend::get(&mut stream, "dl", first_id + r as u64, size, pace, deadline)
            .map_err(|e| format!("request {} of {requests}: {e}", r + 1))?;
    }
    Ok(started.elapsed())
}

fn print(opts: &Options, w: Work, p: &Params, rows: &[Row]) {
    let p99 = |r: &Row| (!r.busy_p99_ms.is_empty()).then(|| median(&r.busy_p99_ms));
    let fast = rows
        .iter()
        .find(|r| r.proxy.is_none() && matches!(r.pace, Pace::Fast))
        .and_then(p99);
    let nginx_http = rows
        .iter()
        .find(|r| r.proxy.is_some_and(|p| p.peer == Peer::NginxHttp))
        .and_then(p99);
    let rss = |r: &Row| median_bytes(&r.peak_rss_kib).map(|k| k as f64);
    let nginx_rss = rows
        .iter()
        .find(|r| r.proxy.is_some_and(|p| p.peer == Peer::NginxHttp))
        .and_then(rss);
    let (what, title) = match w {
        Work::Downloads => (
            "hold",
            format!(
                "{}: {} clients x {} GETs of {} MiB on one keep-alive connection, read at {} KiB/s",
                w.name(),
                p.clients,
                w.requests(),
                p.size >> 20,
                p.bytes_per_s >> 10
            ),
        ),
        Work::Uploads => (
            "busy",
            format!(
                "{}: {} clients x one POST of {} MiB, sent at {} KiB/s",
                w.name(),
                p.clients,
                p.size >> 20,
                p.bytes_per_s >> 10
            ),
        ),
    };
    let header = [
        format!("{what} p50 ms"),
        format!("{what} p99 ms"),
        "p99 x fast direct".into(),
        "p99 x nginx http".into(),
        "client p50 s".into(),
        "peak RSS MiB".into(),
        "RSS x nginx http".into(),
        "to disk MiB".into(),
        "bodies exact".into(),
    ];
    let header: Vec<&str> = std::iter::once("")
        .chain(header.iter().map(String::as_str))
        .collect();
    let mut table = Table::new(
        format!(
            "{title}, SO_RCVBUF/SO_SNDBUF 64KiB, proxies at 1 worker, median of {} run(s)",
            opts.runs
        ),
        &header,
    );
    for row in rows {
        if let Some(why) = &row.skipped {
            table.note(format!("skipped {}: {why}", row.label));
            continue;
        }
        table.row(vec![
            row.label.clone(),
            median_cell(&row.busy_p50_ms, 0),
            median_cell(&row.busy_p99_ms, 0),
            ratio(p99(row), fast),
            ratio(p99(row), nginx_http),
            median_cell(&row.client_p50_s, 2),
            median_bytes(&row.peak_rss_kib).map_or("-".into(), |k| mib(k << 10)),
            ratio(rss(row), nginx_rss),
            median_bytes(&row.spilled).map_or("-".into(), mib),
            if row.exact_runs == row.runs_done {
                "yes".into()
            } else {
                format!(
                    "no ({} of {} runs)",
                    row.runs_done - row.exact_runs,
                    row.runs_done
                )
            },
        ]);
        table.notes_extend(problems_note(&row.label, &row.problems));
    }
    let budget = (4 << 20) + p.clients as u64 * (2 * MEMORY_BUFFER + (16 << 10));
    let measured = match w {
        Work::Downloads => {
            "hold: per request, the backend's first byte of the request head to the last byte of its response written"
        }
        Work::Uploads => {
            "busy: per request, the backend's first byte of the request head to its answer written, the body read and checked"
        }
    };
    table.note(measured);
    table.note(format!(
        "peak RSS budget: 4MiB + {} connections x (2 x {}KiB + 16KiB) = {} MiB; to disk: spillway from its access lines, nginx from its temp files",
        p.clients,
        MEMORY_BUFFER >> 10,
        mib(budget)
    ));
    table.print();
}
