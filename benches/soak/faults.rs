//! Faults injected while the load runs, on a schedule drawn from the seed:
//! log rotation with SIGHUP, the flapper going down and up, an outage of
//! every backend at once, and the spill tmpfs filled to the brim by a
//! ballast file. (--max-disk and --max-connections are hit by the load
//! itself; SIGTERM comes at the end.)

use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::World;
use crate::backend::{Backend, Backends, Kind};
use crate::plan::Rng;

/// How long a backend listening again after an outage may go without a
/// connection. --fail-timeout is 1s: a backend is tried again a second
/// after it was marked down, or a few seconds if trials failed while it
/// was still down; at the soak's rate every backend in the pool gets
/// several connections a second.
const RECOVERY: Duration = Duration::from_secs(15);

/// A tmpfs mounted for the run, unmounted on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(size: u64) -> Result<Tmpfs, String> {
        let dir = std::env::temp_dir().join(format!("spillway-soak-tmpfs-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let dir = fs::canonicalize(&dir).map_err(|e| format!("canonicalize: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}")])
            .arg("tmpfs")
            .arg(&dir)
            .output();
        match out {
            Ok(out) if out.status.success() => Ok(Tmpfs { dir }),
            Ok(out) => {
                let _ = fs::remove_dir(&dir);
                Err(format!(
                    "mount -t tmpfs failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                Err(format!("cannot run mount: {e}"))
            }
        }
    }

    /// Bytes in use, as df sees them.
    pub fn used(&self) -> u64 {
        statvfs(&self.dir).map_or(u64::MAX, |(total, free)| total - free)
    }

    /// Bytes free.
    pub fn free(&self) -> u64 {
        statvfs(&self.dir).map_or(0, |(_, free)| free)
    }

    fn ballast_path(&self) -> PathBuf {
        self.dir.join("ballast")
    }

    /// Take all but `leave` bytes of what is free, so that the proxy's next
    /// reservations fail with ENOSPC.
    pub fn fill(&self, leave: u64) -> std::io::Result<File> {
        let file = File::create(self.ballast_path())?;
        let take = self.free().saturating_sub(leave);
        if take > 0 {
            // SAFETY: fallocate on an fd we own; lengths are plain integers.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, take as libc::off_t) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                // The proxy took some meanwhile: what we got is enough.
                if e.raw_os_error() != Some(libc::ENOSPC) {
                    return Err(e);
                }
            }
        }
        Ok(file)
    }

    pub fn empty(&self, ballast: File) {
        drop(ballast);
        let _ = fs::remove_file(self.ballast_path());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.ballast_path());
        unmount(&self.dir);
    }
}

/// Unmount `dir` (lazily if it is busy) and remove it.
pub fn unmount(dir: &Path) {
    let done = Command::new("umount")
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !done {
        let _ = Command::new("umount").arg("-l").arg(dir).status();
    }
    let _ = fs::remove_dir(dir);
}

/// (total, free) bytes of the file system holding `dir`.
fn statvfs(dir: &Path) -> Option<(u64, u64)> {
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    (rc == 0).then(|| {
        let unit = st.f_frsize as u64;
        (st.f_blocks as u64 * unit, st.f_bfree as u64 * unit)
    })
}

/// How many of each fault were injected.
#[derive(Default, Debug)]
pub struct Injected {
    pub sighup: AtomicU64,
    pub flaps: AtomicU64,
    pub outages: AtomicU64,
    pub disk_full: AtomicU64,
    /// Backends seen serving again after an outage, and those not.
    pub recovered: AtomicU64,
    pub not_recovered: AtomicU64,
    pub scrapes: AtomicU64,
    /// The most the tmpfs held beyond the ballast, as df sees it.
    pub spill_disk_peak: AtomicU64,
}

/// A backend back from an outage, and its accept count then.
struct Watch<'a> {
    backend: &'a Backend,
    since: Instant,
    accepted: u64,
}

pub struct Faults<'a> {
    pub world: &'a Arc<World>,
    pub backends: &'a Backends,
    pub disk: Option<&'a Tmpfs>,
    pub log_path: PathBuf,
    pub pid: u32,
    pub injected: &'a Injected,
    pub stop: &'a AtomicBool,
    pub metrics: Option<std::net::SocketAddr>,
    pub max_disk: u64,
    pub max_connections: u64,
    /// The tmpfs's use before the proxy spilled anything.
    pub disk_base: u64,
}

impl Faults<'_> {
    /// Inject faults until `stop`, then leave everything as it was: every
    /// backend up, the ballast gone.
    pub fn run(&self, seed: u64) {
        let mut rng = Rng::new(seed ^ 0xfa17_5eed);
        let start = Instant::now();
        let mut next_sighup = start + rng.millis(3_000, 8_000);
        let mut flapper_up = true;
        let mut next_flap = start + rng.millis(2_000, 5_000);
        let mut next_outage = start + rng.millis(15_000, 30_000);
        let mut next_fill = start + rng.millis(5_000, 12_000);
        let mut ballast: Option<(File, Instant)> = None;
        let flapper = self.backends.flapper();
        let mut watches: Vec<Watch> = Vec::new();
        let mut next_scrape = start + rng.millis(1_000, 4_000);
        let mut last_scrape = None;
        let mut disk_over = false;
        while !self.stop.load(Ordering::Relaxed) && !self.world.abort.load(Ordering::Relaxed) {
            let now = Instant::now();
            watches.retain(|w| !self.recovered(w, now));
            if let Some(addr) = self.metrics.filter(|_| now >= next_scrape) {
                self.scrape(addr, &mut last_scrape);
                next_scrape = Instant::now() + rng.millis(2_000, 6_000);
            }
            // --max-disk bounds what df sees of all spill files together:
            // the tmpfs's use, less the ballast and what was there before.
            if let Some(disk) = self.disk {
                let ballast_bytes = ballast
                    .as_ref()
                    .and_then(|(f, _)| f.metadata().ok())
                    .map_or(0, |m| m.blocks() * 512);
                let spill = disk.used().saturating_sub(ballast_bytes + self.disk_base);
                self.injected
                    .spill_disk_peak
                    .fetch_max(spill, Ordering::Relaxed);
                if spill > self.max_disk && !disk_over {
                    disk_over = true;
                    self.world.books.note(format!(
                        "spill files hold {spill} bytes of the tmpfs (what df sees, less the ballast), over --max-disk {}",
                        self.max_disk
                    ));
                }
            }
            if now >= next_sighup {
                self.rotate();
                next_sighup = Instant::now() + rng.millis(4_000, 9_000);
            }
            if now >= next_flap {
                flapper_up = !flapper_up;
                flapper.up.store(flapper_up, Ordering::Relaxed);
                if !flapper_up {
                    self.injected.flaps.fetch_add(1, Ordering::Relaxed);
                }
                next_flap = now
                    + if flapper_up {
                        rng.millis(2_000, 5_000)
                    } else {
                        rng.millis(500, 2_000)
                    };
            }
            if now >= next_outage {
                // Every backend down at once, briefly: clients that arrive
                // now find none, and the proxy takes them all out, then
                // tries them again.
                self.injected.outages.fetch_add(1, Ordering::Relaxed);
                self.backends.set_all_up(false);
                thread::sleep(rng.millis(300, 1_000));
                self.backends.set_all_up(true);
                flapper.up.store(flapper_up, Ordering::Relaxed);
                // Each must be back in the pool soon: watch all but the
                // flapper, which has its own ups and downs.
                let since = Instant::now();
                watches = self
                    .backends
                    .list
                    .iter()
                    .filter(|b| !matches!(b.kind, Kind::Refuser | Kind::Flapper))
                    .map(|b| Watch {
                        backend: b,
                        since,
                        accepted: b.accepted.load(Ordering::Relaxed),
                    })
                    .collect();
                next_outage = Instant::now() + rng.millis(20_000, 40_000);
            }
            if let Some(disk) = self.disk {
                match ballast.take() {
                    Some((file, until)) if now >= until => {
                        disk.empty(file);
                        next_fill = now + rng.millis(5_000, 12_000);
                    }
                    Some(held) => ballast = Some(held),
                    None if now >= next_fill => match disk.fill(64 * 1024) {
                        Ok(file) => {
                            self.injected.disk_full.fetch_add(1, Ordering::Relaxed);
                            ballast = Some((file, now + rng.millis(2_000, 5_000)));
                        }
                        Err(e) => {
                            self.world
                                .books
                                .note(format!("soak: cannot fill the tmpfs: {e}"));
                            next_fill = now + Duration::from_secs(3600);
                        }
                    },
                    None => {}
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        if let (Some(disk), Some((file, _))) = (self.disk, ballast) {
            disk.empty(file);
        }
        self.backends.set_all_up(true);
    }

    /// Is `w` decided by `now`? A backend listening again for RECOVERY
    /// since an outage must have had a connection by then: the proxy takes
    /// a backend out after --max-fails refused connects, and must let one
    /// connection try it again after --fail-timeout (doubling only while
    /// those trials fail), so a short outage keeps no backend out for long.
    fn recovered(&self, w: &Watch, now: Instant) -> bool {
        if now < w.since + RECOVERY {
            return false;
        }
        if w.backend.accepted.load(Ordering::Relaxed) > w.accepted {
            self.injected.recovered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.injected.not_recovered.fetch_add(1, Ordering::Relaxed);
            self.world.books.note(format!(
                "backend {} ({}) has listened again for {RECOVERY:?} since an outage and the proxy sent it no connection: it keeps it marked down (at --log-level debug: \"still down ... next try in\", doubled at each client that came during the outage)",
                w.backend.addr,
                w.backend.kind.name()
            ));
        }
        true
    }

    /// Scrape /metrics as Prometheus would, under load: it answers, no
    /// counter goes down, and the gauges keep to the limits.
    fn scrape(&self, addr: std::net::SocketAddr, last: &mut Option<crate::metrics::Scrape>) {
        let scrape = match crate::metrics::Scrape::get(addr) {
            Ok(s) => s,
            Err(e) => {
                self.world
                    .books
                    .note(format!("a scrape of /metrics under load failed: {e}"));
                return;
            }
        };
        self.injected.scrapes.fetch_add(1, Ordering::Relaxed);
        if let Some(before) = last.as_ref() {
            for what in scrape.decreased_since(before) {
                self.world
                    .books
                    .note(format!("metrics: a counter went down: {what}"));
            }
        }
        let limits = [
            (
                "spillway_connections_open",
                self.max_connections,
                "--max-connections",
            ),
            ("spillway_disk_bytes", self.max_disk, "--max-disk"),
        ];
        for (key, limit, flag) in limits {
            match scrape.value(key) {
                Ok(v) if v <= limit => {}
                Ok(v) => self
                    .world
                    .books
                    .note(format!("metrics: {key} is {v}, over {flag} {limit}")),
                Err(e) => self.world.books.note(format!("metrics: {e}")),
            }
        }
        *last = Some(scrape);
    }

    /// logrotate: rename the file, SIGHUP, and wait until the proxy says in
    /// the fresh file that it reopened.
    pub fn rotate(&self) {
        let n = self.injected.sighup.load(Ordering::Relaxed) + 1;
        let rotated = self.log_path.with_extension(format!("{n}"));
        if let Err(e) = fs::rename(&self.log_path, &rotated) {
            self.world
                .books
                .note(format!("soak: cannot rotate the log: {e}"));
            return;
        }
        self.injected.sighup.store(n, Ordering::Relaxed);
        // SAFETY: kill only takes integers; the proxy is our child and not
        // reaped while the faults run, so the pid is still its.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.world.sighups_seen.load(Ordering::Relaxed) < n {
            if Instant::now() >= deadline || self.world.abort.load(Ordering::Relaxed) {
                self.world.books.note(format!(
                    "SIGHUP {n}: no \"log file reopened\" in a fresh log file within 10s"
                ));
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}
