//! **bulk**: one connection, 1GiB backend->client as fast as it goes.
//!
//! Figures: MB/s of the body, the proxy's CPU-seconds per GiB (all its
//! processes, from /proc), and what it wrote to disk. Every proxy runs one
//! worker. The client reads as fast as it can, but the backend writes
//! faster still, so a proxy that spills (spillway, nginx http) spills much
//! of the body, and one that does not (nginx stream, HAProxy) stops
//! reading instead: the table shows the price of the spill. `spillway
//! +metrics` is spillway with `--metrics-listen`, scraped every second
//! while it works: beside `spillway`, what metrics cost.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend::{self, HttpBackend, Pace};
use crate::peers::{self, Proxy, Setup, Variant};
use crate::report::{Table, median, median_bytes, mib, problems_note, ratio};
use crate::scrape::{self, Scraper, ScraperReport};
use crate::{Options, run_order};

const BYTES: u64 = 1 << 30;
const SMOKE_BYTES: u64 = 64 << 20;

/// Bound on one transfer: 1GiB at 10MB/s, far below any real figure.
const DEADLINE: Duration = Duration::from_secs(120);

struct Row {
    label: String,
    proxy: Option<Proxy>,
    skipped: Option<String>,
    mb_per_s: Vec<f64>,
    cpu_per_gib: Vec<f64>,
    spilled: Vec<u64>,
    problems: Vec<String>,
    /// `+metrics` rows: what the scrapes during each run saw.
    scrapes: Vec<ScraperReport>,
}

/// Run the bulk workload, print its table; the checks that failed.
pub fn run(opts: &Options, work: &Path) -> Vec<String> {
    let bytes = if opts.smoke { SMOKE_BYTES } else { BYTES };
    let backend = HttpBackend::start(bytes, None);
    let proxies = peers::rows(&opts.peers, &[Variant::Shipped, Variant::Metrics], false);
    let mut rows: Vec<Row> = std::iter::once(None)
        .chain(proxies.into_iter().map(Some))
        .map(|proxy| Row {
            label: proxy.map_or("direct (no proxy)".into(), |p| p.label(false)),
            proxy,
            skipped: None,
            mb_per_s: Vec::new(),
            cpu_per_gib: Vec::new(),
            spilled: Vec::new(),
            problems: Vec::new(),
            scrapes: Vec::new(),
        })
        .collect();
    let mut failures = Vec::new();
    for run in 0..opts.runs {
        for i in run_order(rows.len(), 1, run) {
            let row = &mut rows[i];
            if row.skipped.is_some() {
                continue;
            }
            let cell = format!("bulk, {}, run {}", row.label, run + 1);
            if let Err(e) = one(row, run as u64, bytes, backend.addr, work) {
                failures.push(format!("{cell}: {e}"));
            }
            if let Some(e) = row.scrapes.last().and_then(|s| s.failures.first()) {
                failures.push(format!("{cell}: a scrape of /metrics failed: {e}"));
            }
        }
    }
    print(opts, bytes, &rows);
    failures
}

/// One transfer through `row`'s proxy (started for it, stopped after).
fn one(row: &mut Row, id: u64, bytes: u64, backend: SocketAddr, work: &Path) -> Result<(), String> {
    let proxy = match row.proxy {
        None => None,
        Some(proxy) => match proxy.start(backend, Setup::tcp(1), work) {
            Ok(p) => Some(p),
            Err(why) => {
                row.skipped = Some(why);
                return Ok(());
            }
        },
    };
    let addr = proxy.as_ref().map_or(backend, |p| p.addr);
    let scraper = proxy.as_ref().and_then(|p| p.metrics).map(Scraper::start);
    let cpu_before = proxy.as_ref().map(|p| p.cpu_seconds());
    let fetched = backend::fetch(
        addr,
        "bulk",
        id,
        bytes,
        Pace::Fast,
        None,
        Instant::now() + DEADLINE,
    );
    let cpu = proxy
        .as_ref()
        .zip(cpu_before)
        .map(|(p, before)| p.cpu_seconds() - before);
    if let Some(scraper) = scraper {
        row.scrapes.push(scraper.finish());
    }
    if let Some(p) = proxy {
        let finished = p.finish();
        row.spilled.extend(finished.spilled);
        row.problems.extend(finished.problems);
    }
    let fetched = fetched?;
    row.mb_per_s
        .push(fetched.body_bytes as f64 / fetched.took.as_secs_f64() / 1e6);
    if let Some(cpu) = cpu {
        row.cpu_per_gib
            .push(cpu / (fetched.body_bytes as f64 / (1u64 << 30) as f64));
    }
    Ok(())
}

fn print(opts: &Options, bytes: u64, rows: &[Row]) {
    let speed = |r: &Row| (!r.mb_per_s.is_empty()).then(|| median(&r.mb_per_s));
    let direct = rows.first().and_then(speed);
    let best_tcp = rows
        .iter()
        .filter(|r| r.proxy.is_some_and(|p| peers::TCP_PEERS.contains(&p.peer)))
        .filter_map(speed)
        .reduce(f64::max);
    let mut table = Table::new(
        format!(
            "bulk: one connection, {} MiB backend->client, 1 worker, median of {} run(s)",
            bytes >> 20,
            opts.runs
        ),
        &[
            "",
            "MB/s",
            "x direct",
            "x best TCP peer",
            "CPU s per GiB",
            "spilled MiB",
        ],
    );
    for row in rows {
        if let Some(why) = &row.skipped {
            table.note(format!("skipped {}: {why}", row.label));
            continue;
        }
        let mbs = speed(row);
        table.row(vec![
            row.label.clone(),
            mbs.map_or("-".into(), |v| format!("{v:.0}")),
            ratio(mbs, direct),
            ratio(mbs, best_tcp),
            if row.cpu_per_gib.is_empty() {
                "-".into()
            } else {
                format!("{:.2}", median(&row.cpu_per_gib))
            },
            median_bytes(&row.spilled).map_or("-".into(), mib),
        ]);
        table.notes_extend(problems_note(&row.label, &row.problems));
        table.notes_extend(scrape::note(&row.label, &row.scrapes));
    }
    table.note("x best TCP peer: against the faster of nginx stream and HAProxy tcp");
    table.print();
}
