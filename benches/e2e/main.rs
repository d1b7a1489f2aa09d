//! End-to-end benchmark: the same work through a direct connection,
//! spillway, and — when installed — nginx `stream`, nginx `http` with
//! proxy buffering, and HAProxy (`mode tcp`, or `mode http` in the HTTP
//! workload), side by side in one run: one table per workload, quoted as
//! ratios between rows of that table.
//!
//! ```sh
//! apt-get install -y nginx libnginx-mod-stream haproxy wrk  # peers; skipped if absent
//! cargo bench --bench e2e                       # every workload, median of 3 runs
//! cargo bench --bench e2e -- --only http        # one workload: bulk, rps, slow, http or scrape
//! cargo bench --bench e2e -- --peers spillway,nginx-http  # only these proxies (direct rows always run)
//! cargo bench --bench e2e -- --smoke            # about a minute, for CI: checks it works
//! ```
//!
//! Workloads (each module says what it measures and why):
//! - [`bulk`]: one connection, 1GiB backend->client as fast as it goes;
//! - [`rps`]: many short HTTP/1.1 exchanges driven by `wrk`, keep-alive and
//!   a connection per request, at one worker and at one per core;
//! - [`slow`]: 100 clients reading 8MiB each at 1MiB/s: how long the
//!   backend is held, what the proxy holds in memory and on disk;
//! - [`http`]: spillway `--mode http` beside nginx `http` and HAProxy
//!   `mode http`: the rps tables, slow keep-alive downloads (100 clients x
//!   2 x 8MiB at 1MiB/s) and slow uploads (100 clients x 8MiB at 1MiB/s),
//!   with the backend's time per request;
//! - [`scrape`]: how long `GET /metrics` takes while spillway holds 1,000
//!   connections.
//!
//! spillway runs as shipped, INFO logs to a file included; the peers run
//! with their logs off. Where a spillway setting has a price, a row shows
//! it beside plain "spillway": "spillway warn" (`--log-level warn`, in
//! rps) for the INFO lines, "spillway +metrics" (`--metrics-listen`,
//! scraped every second, in rps and bulk) for metrics. `--peers spillway`
//! selects every spillway row; `haproxy` is HAProxy in `mode tcp` or
//! `mode http`, as the workload asks.
//!
//! Runs are interleaved (run 1 of every row, then run 2, ...) so a noisy
//! minute on a shared machine spreads over the rows instead of sinking one,
//! and every proxy is started afresh for each run. The proxies' order turns
//! by one each run (`run_order`): the slot right after the direct rows
//! cost whichever buffering proxy sat in it 150-200ms of slow-client hold
//! p99, and a fixed order gave that slot to spillway every time. Smoke mode
//! checks that every byte arrived (downloads at the client, uploads at the
//! backend), no request failed and every scrape answered, and exits
//! non-zero if not; no mode ever asserts on a timing.

mod backend;
mod bulk;
mod http;
mod peers;
mod process;
mod report;
mod rps;
mod scrape;
mod slow;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage: cargo bench --bench e2e -- [--smoke] [--only bulk|rps|slow|http|scrape] [--peers spillway,nginx-stream,haproxy,nginx-http]";

/// Runs per figure in full mode; the figure is their median.
const RUNS: usize = 3;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Bulk,
    Rps,
    Slow,
    Http,
    Scrape,
}

impl Workload {
    fn parse(s: &str) -> Result<Workload, String> {
        match s {
            "bulk" => Ok(Workload::Bulk),
            "rps" => Ok(Workload::Rps),
            "slow" => Ok(Workload::Slow),
            "http" => Ok(Workload::Http),
            "scrape" => Ok(Workload::Scrape),
            _ => Err(format!(
                "--only {s}: expected bulk, rps, slow, http or scrape"
            )),
        }
    }
}

pub struct Options {
    /// Small sizes, one run, and a non-zero exit on any wrong byte or
    /// failed request: what CI runs.
    pub smoke: bool,
    pub runs: usize,
    only: Option<Workload>,
    /// The proxies to run, in row order (`--peers`; default: all).
    pub peers: Vec<peers::Peer>,
}

/// The order of `len` rows in run `run`: the first `fixed` (the direct
/// references) as they are, then the rest turned by `run` places, so that
/// over the runs no proxy always follows the same row.
pub fn run_order(len: usize, fixed: usize, run: usize) -> Vec<usize> {
    let turning = len.saturating_sub(fixed);
    (0..fixed.min(len))
        .chain((0..turning).map(|k| fixed + (k + run) % turning))
        .collect()
}

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        let mut smoke = false;
        let mut only = None;
        let mut wanted = peers::ALL.to_vec();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--smoke" => smoke = true,
                "--only" => {
                    let value = args
                        .next()
                        .ok_or("--only needs bulk, rps, slow, http or scrape")?;
                    only = Some(Workload::parse(&value)?);
                }
                "--peers" => {
                    let value = args
                        .next()
                        .ok_or("--peers needs a list, e.g. spillway,haproxy")?;
                    wanted = peers::Peer::parse_list(&value)?;
                }
                // `cargo bench` passes this to every bench binary.
                "--bench" => {}
                other => match other.strip_prefix("--only=") {
                    Some(value) => only = Some(Workload::parse(value)?),
                    None => return Err(format!("unknown argument {other:?}")),
                },
            }
        }
        Ok(Options {
            smoke,
            runs: if smoke { 1 } else { RUNS },
            only,
            peers: wanted,
        })
    }

    fn wants(&self, w: Workload) -> bool {
        self.only.is_none_or(|o| o == w)
    }
}

fn main() -> ExitCode {
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("e2e: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut work = WorkDir::create();
    println!(
        "e2e: {} mode, median of {} run(s), {} core(s), load average {}, work dir {}",
        if opts.smoke { "smoke" } else { "full" },
        opts.runs,
        peers::cores(),
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        work.path().display()
    );

    let mut failures = Vec::new();
    if opts.wants(Workload::Bulk) {
        failures.extend(bulk::run(&opts, work.path()));
    }
    if opts.wants(Workload::Rps) {
        failures.extend(rps::run(&opts, work.path()));
    }
    if opts.wants(Workload::Slow) {
        failures.extend(slow::run(&opts, work.path()));
    }
    if opts.wants(Workload::Http) {
        failures.extend(http::run(&opts, work.path()));
    }
    if opts.wants(Workload::Scrape) {
        failures.extend(scrape::run(&opts, work.path()));
    }

    if failures.is_empty() {
        return ExitCode::SUCCESS;
    }
    // Keep the configs and logs of a failed run for whoever reads this.
    work.keep = true;
    eprintln!(
        "\ne2e: {} check(s) failed (configs and logs kept in {}):",
        failures.len(),
        work.path().display()
    );
    for f in &failures {
        eprintln!("  - {f}");
    }
    ExitCode::FAILURE
}

/// The directory every run writes its configs, logs and temp files into;
/// removed at the end, even after a panic, unless a check failed.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn create() -> WorkDir {
        let path = std::env::temp_dir().join(format!("spillway-e2e-{}", std::process::id()));
        fs::create_dir_all(&path).expect("create the work dir");
        // Canonical, as the links under /proc/PID/fd are: nginx's temp files
        // are found by their path starting with it, and a symlinked $TMPDIR
        // would make none match and its disk figure read 0.
        let path = fs::canonicalize(&path).expect("canonicalize the work dir");
        WorkDir { path, keep: false }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}
