//! **slow clients**: 100 clients each read an 8MiB response at 1MiB/s,
//! all at once: what spillway is for.
//!
//! Every client fixes its socket's receive buffer at 64KiB (SO_RCVBUF
//! before connect) and the backend fixes its send buffer at 64KiB
//! (SO_SNDBUF on the accepted socket), so neither kernel can soak up the
//! difference in speed. The backend lives in this process; per connection
//! it records the hold time, from accept to close: what a backend worker
//! or database connection would be tied up for.
//!
//! Rows: the clients straight to the backend, paced (the backend waits
//! for them) and reading as fast as they can (the reference: a proxy that
//! hides slow clients makes the backend see this); then each proxy at one
//! worker. Figures: backend hold p50/p99, the clients' own time (sanity:
//! about size/rate), the proxy's peak RSS (VmHWM summed over its
//! processes), what it wrote to disk (spillway: the `up_spilled` and
//! `down_spilled` of its close lines; nginx http: its temp files, sampled
//! every 50ms), and whether every body arrived byte for byte.

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
use crate::{Options, run_order};

/// SO_RCVBUF of every client and SO_SNDBUF of every backend socket.
const SOCKET_BUFFER: usize = 64 * 1024;

struct Params {
    clients: usize,
    body: u64,
    bytes_per_s: u64,
}

const FULL: Params = Params {
    clients: 100,
    body: 8 << 20,
    bytes_per_s: 1 << 20,
};

const SMOKE: Params = Params {
    clients: 10,
    body: 1 << 20,
    bytes_per_s: 1 << 20,
};

struct Row {
    label: String,
    proxy: Option<Proxy>,
    pace: Pace,
    skipped: Option<String>,
    hold_p50_ms: Vec<f64>,
    hold_p99_ms: Vec<f64>,
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
            hold_p50_ms: Vec::new(),
            hold_p99_ms: Vec::new(),
            client_p50_s: Vec::new(),
            peak_rss_kib: Vec::new(),
            spilled: Vec::new(),
            exact_runs: 0,
            runs_done: 0,
            problems: Vec::new(),
        }
    }
}

/// Run the slow-clients workload, print its table; the checks that failed.
pub fn run(opts: &Options, work: &Path) -> Vec<String> {
    let p = if opts.smoke { SMOKE } else { FULL };
    let paced = Pace::Paced {
        bytes_per_s: p.bytes_per_s,
    };
    let backend = HttpBackend::start(p.body, Some(SOCKET_BUFFER));
    let mut rows = vec![
        Row::new("direct, slow clients", None, paced),
        Row::new("direct, fast clients", None, Pace::Fast),
    ];
    rows.extend(
        peers::rows(&opts.peers, &[Variant::Shipped], false)
            .into_iter()
            .map(|proxy| Row::new(&proxy.label(false), Some(proxy), paced)),
    );
    let mut failures = Vec::new();
    for run in 0..opts.runs {
        for i in run_order(rows.len(), 2, run) {
            let row = &mut rows[i];
            if row.skipped.is_some() {
                continue;
            }
            let cell = format!("slow, {}, run {}", row.label, run + 1);
            failures.extend(one(row, run, &p, &backend, work).map(|e| format!("{cell}: {e}")));
        }
    }
    print(opts, &p, &rows);
    failures
}

/// One run of all the clients through `row`'s proxy; a failed check, if any.
fn one(
    row: &mut Row,
    run: usize,
    p: &Params,
    backend: &HttpBackend,
    work: &Path,
) -> Option<String> {
    let proxy = match row.proxy {
        None => None,
        Some(proxy) => match proxy.start(backend.addr, Setup::tcp(1), work) {
            Ok(proxy) => Some(proxy),
            Err(why) => {
                row.skipped = Some(why);
                return None;
            }
        },
    };
    let addr = proxy.as_ref().map_or(backend.addr, |p| p.addr);
    let results = clients(addr, run, p, row.pace);
    let holds = backend.take_holds(p.clients, Duration::from_secs(10));
    if let Some(proxy) = proxy {
        let finished = proxy.finish();
        row.peak_rss_kib.push(finished.peak_rss_kib);
        row.spilled.extend(finished.spilled);
        row.problems.extend(finished.problems);
    }

    row.runs_done += 1;
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    row.hold_p50_ms.push(ms(percentile(&holds, 50.0)));
    row.hold_p99_ms.push(ms(percentile(&holds, 99.0)));
    let took: Vec<Duration> = results.iter().flatten().copied().collect();
    row.client_p50_s
        .push(percentile(&took, 50.0).map_or(f64::NAN, |d| d.as_secs_f64()));
    let wrong: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if wrong.is_empty() {
        row.exact_runs += 1;
    }
    if holds.len() != p.clients && wrong.is_empty() {
        row.problems.push(format!(
            "the backend served {} responses for {} clients",
            holds.len(),
            p.clients
        ));
    }
    let first = wrong.first()?;
    Some(format!(
        "{} of {} bodies not exact, first: {first}",
        wrong.len(),
        p.clients
    ))
}

/// Start every client at once (a barrier), each on its own thread; what
/// each one took, or why it failed.
fn clients(addr: SocketAddr, run: usize, p: &Params, pace: Pace) -> Vec<Result<Duration, String>> {
    let at_rate = Duration::from_secs_f64(p.body as f64 / p.bytes_per_s as f64);
    // Twice the paced time plus slack for a loaded machine: bounds a run
    // whatever the proxy does.
    let deadline = Instant::now() + at_rate * 2 + Duration::from_secs(30);
    let start = Arc::new(Barrier::new(p.clients));
    let threads: Vec<_> = (0..p.clients)
        .map(|i| {
            let start = start.clone();
            let id = (run * 100_000 + i) as u64;
            let body = p.body;
            thread::spawn(move || {
                start.wait();
                backend::fetch(addr, "slow", id, body, pace, Some(SOCKET_BUFFER), deadline)
                    .map(|f| f.took)
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

fn print(opts: &Options, p: &Params, rows: &[Row]) {
    let p99 = |r: &Row| (!r.hold_p99_ms.is_empty()).then(|| median(&r.hold_p99_ms));
    let fast = rows
        .iter()
        .find(|r| r.proxy.is_none() && matches!(r.pace, Pace::Fast))
        .and_then(p99);
    let nginx_http = rows
        .iter()
        .find(|r| r.proxy.is_some_and(|p| p.peer == Peer::NginxHttp))
        .and_then(p99);
    let mut table = Table::new(
        format!(
            "slow clients: {} clients x {} MiB at {} KiB/s each, SO_RCVBUF/SO_SNDBUF 64KiB, proxies at 1 worker, median of {} run(s)",
            p.clients,
            p.body >> 20,
            p.bytes_per_s >> 10,
            opts.runs
        ),
        &[
            "",
            "hold p50 ms",
            "hold p99 ms",
            "p99 x fast direct",
            "p99 x nginx http",
            "client p50 s",
            "peak RSS MiB",
            "to disk MiB",
            "bodies exact",
        ],
    );
    for row in rows {
        if let Some(why) = &row.skipped {
            table.note(format!("skipped {}: {why}", row.label));
            continue;
        }
        table.row(vec![
            row.label.clone(),
            median_cell(&row.hold_p50_ms, 0),
            median_cell(&row.hold_p99_ms, 0),
            ratio(p99(row), fast),
            ratio(p99(row), nginx_http),
            median_cell(&row.client_p50_s, 2),
            median_bytes(&row.peak_rss_kib).map_or("-".into(), |k| mib(k << 10)),
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
    table.note("hold: backend accept to close; to disk: spillway from its close lines, nginx http from its temp files");
    table.print();
}
