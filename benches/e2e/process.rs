//! A proxy (or the rps backend) as a child process: spawned tied to the
//! bench, watched through /proc (CPU, peak memory, the temp files it holds
//! open), stopped with everything it forked, and its logs read for trouble
//! and for what it spilled.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a proxy gets to listen after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a proxy gets to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How to read what a process says about trouble and spilling.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Spillway,
    Nginx,
    Haproxy,
}

/// A proxy (or the rps backend) running as a child process, with its
/// directory. Dropping it kills the process and anything it forked.
pub struct Running {
    child: Child,
    kind: Kind,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    /// Where it serves `GET /metrics`, if it does.
    pub metrics: Option<SocketAddr>,
    sampler: Option<DiskSampler>,
}

/// What a proxy left behind when it was stopped.
pub struct Finished {
    /// Peak resident memory (VmHWM), summed over its processes, in KiB.
    pub peak_rss_kib: u64,
    /// Bytes written to spill/temp files, if this proxy spills at all.
    pub spilled: Option<u64>,
    /// Warnings and errors from its logs, one per line.
    pub problems: Vec<String>,
}

impl Running {
    /// Spawn `cmd` with its stdout and stderr in files in `dir`.
    pub fn spawn(
        mut cmd: Command,
        kind: Kind,
        addr: SocketAddr,
        dir: PathBuf,
    ) -> Result<Running, String> {
        let output = |name: &str| {
            File::create(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
        };
        cmd.stdin(Stdio::null())
            .stdout(output("stdout.log")?)
            .stderr(output("stderr.log")?);
        let child = spawn_tied(&mut cmd).map_err(|e| format!("cannot start: {e}"))?;
        Ok(Running {
            child,
            kind,
            addr,
            dir,
            metrics: None,
            sampler: None,
        })
    }

    /// Wait (bounded) until something accepts on our address; if the
    /// process exits first or never listens, say why from its own logs.
    pub fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited at start ({status}): {}", self.log_tail()));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "not listening on {} within {START_TIMEOUT:?}: {}",
            self.addr,
            self.log_tail()
        ))
    }

    fn log_tail(&self) -> String {
        let mut lines = self.problem_lines(true);
        let keep = lines.len().saturating_sub(3);
        lines.drain(..keep);
        if lines.is_empty() {
            "(nothing in its logs)".into()
        } else {
            lines.join(" | ")
        }
    }

    /// Wait (bounded) until its metrics listener at `at` answers a scrape.
    pub fn wait_metrics(&mut self, at: SocketAddr) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited at start ({status}): {}", self.log_tail()));
            }
            match crate::scrape::get(at) {
                Ok(_) => {
                    self.metrics = Some(at);
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("no metrics at {at} within {START_TIMEOUT:?}: {e}"));
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// From now until `finish`, total up what it writes to temp files
    /// under `dirs` (see [`DiskSampler`]); `finish` reports that as spilled.
    pub fn watch_temp_files(&mut self, dirs: Vec<PathBuf>) {
        self.sampler = Some(DiskSampler::start(self.child.id(), dirs));
    }

    /// The process and its children (nginx's workers).
    fn processes(&self) -> Vec<u32> {
        let root = self.child.id();
        let mut all = vec![root];
        all.extend(children(root));
        all
    }

    /// User + system CPU of all its processes, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let ticks: u64 = self
            .processes()
            .iter()
            .filter_map(|pid| proc_stat(*pid))
            .map(|f| f.utime + f.stime)
            .sum();
        ticks as f64 / 100.0 // USER_HZ on Linux
    }

    /// Peak resident memory (VmHWM) summed over its processes, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.processes()
            .iter()
            .filter_map(|pid| {
                let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .sum()
    }

    /// Read the peak memory, stop the process (SIGTERM, so spillway
    /// flushes its close lines), and read its logs.
    pub fn finish(mut self) -> Finished {
        let peak_rss_kib = self.peak_rss_kib();
        let sampled = self.sampler.take().map(DiskSampler::finish);
        self.stop();
        let spilled = match self.kind {
            Kind::Spillway => Some(spillway_spilled(&self.dir.join("spillway.log"))),
            _ => sampled,
        };
        Finished {
            peak_rss_kib,
            spilled,
            problems: self.problem_lines(false),
        }
    }

    /// SIGTERM, wait a bounded time for a clean exit, then kill whatever
    /// is left of the tree.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let kids = children(self.child.id());
        // SAFETY: kill(2) on the pid of our own child, which we have not
        // reaped yet, so the pid cannot have been reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            // An nginx master exits only after its workers have: nothing
            // is left to kill.
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        kill_tree(&mut self.child, &kids);
    }

    /// Warning and error lines from its logs; with `all`, every line of
    /// stderr too (for start-up failures).
    fn problem_lines(&self, all: bool) -> Vec<String> {
        let read = |name: &str| fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let stderr = read("stderr.log");
        let mut lines: Vec<String> = match self.kind {
            // Its first spill per direction is a WARN (the cue to tune
            // --memory-buffer); here spilling is the point, not a problem.
            // The HTTP mode words it as nginx does.
            Kind::Spillway => read("spillway.log")
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .filter(|l| {
                    !l.contains(" spilling to disk: ")
                        && !l.contains(" is buffered to a temporary file: ")
                })
                .map(String::from)
                .collect(),
            // The error log is at `warn`: everything in it is a problem,
            // but for its word that a response went to a temp file, which
            // is spillway's first-spill WARN again.
            Kind::Nginx => read("error.log")
                .lines()
                .filter(|l| !l.contains(" is buffered to a temporary file "))
                .map(String::from)
                .collect(),
            Kind::Haproxy => Vec::new(),
        };
        lines.extend(
            stderr
                .lines()
                .filter(|l| {
                    all || match self.kind {
                        Kind::Haproxy => l.contains("[ALERT]") || l.contains("[WARNING]"),
                        _ => !l.trim().is_empty(),
                    }
                })
                .map(String::from),
        );
        lines
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(sampler) = self.sampler.take() {
            sampler.finish();
        }
        // Reaped already (by `finish`): its pid may belong to another
        // process by now, and so may its children's.
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let kids = children(self.child.id());
        kill_tree(&mut self.child, &kids);
    }
}

/// Kill `child` and then `kids` (its children, listed before): the parent
/// first, because an nginx master would fork a new worker for one killed
/// under it.
fn kill_tree(child: &mut Child, kids: &[u32]) {
    let _ = child.kill();
    for pid in kids {
        // SAFETY: kill(2) has no memory effects; these are the pids of
        // processes our child forked, listed moments ago.
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
    }
    let _ = child.wait();
}

/// Spawn `cmd` so that it is stopped if the bench process dies without
/// running its destructors (killed by a CI timeout, say).
///
/// The signal is SIGTERM, not SIGKILL: an nginx master killed outright
/// leaves its workers running, while on SIGTERM it stops them first.
/// PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only the
/// main thread (which lives as long as the process) may call this.
pub fn spawn_tied(cmd: &mut Command) -> io::Result<Child> {
    // SAFETY: the closure runs between fork and exec and only calls
    // prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

struct ProcStat {
    ppid: u32,
    utime: u64,
    stime: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may
    // itself hold spaces or parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        ppid: fields.get(1)?.parse().ok()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

/// Direct children of `root`, from /proc.
fn children(root: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|s| s.ppid == root))
        .collect()
}

/// Bytes spillway wrote to spill files: the sum of `up_spilled=` and
/// `down_spilled=` over its lines. In `tcp` mode the close line of each
/// connection carries them; in `http` mode the access line of each request
/// does, and the close line does not, so no byte is counted twice.
fn spillway_spilled(log: &Path) -> u64 {
    let text = fs::read_to_string(log).unwrap_or_default();
    let field = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    text.lines()
        .filter(|l| l.contains(" up_spilled="))
        .map(|l| field(l, "up_spilled=") + field(l, "down_spilled="))
        .sum()
}

/// Watches the temp files a process tree holds open under some directories
/// (nginx's `proxy_temp_path` and `client_body_temp_path`) every 50ms, through /proc/PID/fd: nginx
/// unlinks a temp file as soon as it opens it, so the directory itself
/// always looks empty. nginx only appends to a response's temp file, so the
/// largest size each file reached, summed, is what it wrote, give or take
/// what a file gained in its last 50ms. Best effort: a file is known by
/// (pid, fd, inode), and a size going down means a new file took its place.
struct DiskSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// A bound on the sampler's loop: an hour of samples.
const MAX_SAMPLES: usize = 72_000;

impl DiskSampler {
    fn start(root: u32, dirs: Vec<PathBuf>) -> DiskSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut files = OpenFiles::default();
            for _ in 0..MAX_SAMPLES {
                for pid in std::iter::once(root).chain(children(root)) {
                    files.sample(pid, &dirs);
                }
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                thread::sleep(SAMPLE_EVERY);
            }
            files.total()
        });
        DiskSampler { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

#[derive(Default)]
struct OpenFiles {
    /// Largest size seen, by (pid, fd, inode).
    largest: HashMap<(u32, u64, u64), u64>,
    /// Sizes of files that were replaced under the same key.
    replaced: u64,
}

impl OpenFiles {
    fn sample(&mut self, pid: u32, dirs: &[PathBuf]) {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            return;
        };
        for fd in fds.flatten() {
            // The link reads "<dir>/<name> (deleted)" for an unlinked file.
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if !dirs.iter().any(|d| target.starts_with(d)) {
                continue;
            }
            // metadata() follows the link to the open file itself.
            let (Ok(meta), Ok(num)) = (
                fs::metadata(fd.path()),
                fd.file_name().to_string_lossy().parse::<u64>(),
            ) else {
                continue;
            };
            let size = self.largest.entry((pid, num, meta.ino())).or_default();
            if meta.len() < *size {
                self.replaced += *size;
                *size = 0;
            }
            *size = (*size).max(meta.len());
        }
    }

    fn total(&self) -> u64 {
        self.replaced + self.largest.values().sum::<u64>()
    }
}
