//! Test harness for driving the `spillway` binary over loopback.
//!
//! - [`Proxy`]: the binary as a child process, on `127.0.0.1:0`, logging to a
//!   file the harness tails, spilling into a fresh directory; killed on drop.
//! - [`spawn`] / [`Bg`]: backend (or client) threads whose panics are re-raised
//!   by the test that joins them, with a deadline.
//! - [`random_bytes`], [`assert_bytes_eq`], [`read_to_eof_varied`]: seeded
//!   data, byte-exact comparison naming the first differing offset, reads
//!   in uneven chunk sizes.
//!
//! Everything that waits does so against a deadline; sockets get read and
//! write timeouts so a stuck proxy fails a test instead of hanging it.

#![allow(dead_code)]

pub mod http;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * 1024;

/// Read/write timeout on every test socket: long enough for a debug build
/// on a loaded machine, short enough that a stuck proxy fails the test.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the proxy gets to start and say where it listens.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Polling interval inside deadline-bounded waits.
const POLL: Duration = Duration::from_millis(5);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spillway")
}

// ---------------------------------------------------------------------------
// Temporary directories (no tempfile crate in dev-dependencies)

/// A fresh directory, removed with its contents on drop. Its path is
/// canonical, so it compares equal to what `/proc/PID/fd` links show.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "spillway-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        let path = fs::canonicalize(&path).expect("canonicalize temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// The proxy process

/// A spill file the proxy holds open, seen through `/proc/PID/fd`.
#[derive(Debug, Clone)]
pub struct SpillFile {
    pub fd_path: PathBuf,
    /// The link's text: `<temp dir>/<something> (deleted)`.
    pub target: String,
    /// `st_size`.
    pub size: u64,
    /// Bytes allocated on disk: `st_blocks * 512`.
    pub disk: u64,
}

/// The `INFO [conn N] closed ...` summary of one connection.
#[derive(Debug, Clone)]
pub struct Closed {
    pub line: String,
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub up_spilled: u64,
    pub down_spilled: u64,
    pub dropped: u64,
    /// Seconds the backend socket was held (`backend_held=1.234s`).
    pub backend_held: f64,
    /// Seconds the whole connection lasted.
    pub duration: f64,
    pub reason: String,
}

impl Closed {
    pub fn parse(line: &str) -> Closed {
        let raw = |key: &str| -> &str {
            let needle = format!(" {key}=");
            let start = line
                .find(&needle)
                .unwrap_or_else(|| panic!("no {key}= in close line: {line}"))
                + needle.len();
            line[start..].split(' ').next().unwrap_or("")
        };
        let field = |key: &str| -> u64 {
            let value = raw(key);
            value
                .parse()
                .unwrap_or_else(|e| panic!("{key}={value:?} is not a number ({e}) in: {line}"))
        };
        let seconds = |key: &str| -> f64 {
            let value = raw(key);
            value
                .strip_suffix('s')
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{key}={value:?} is not in seconds in: {line}"))
        };
        let reason = line
            .split_once(" reason=")
            .unwrap_or_else(|| panic!("no reason= in close line: {line}"))
            .1
            .to_string();
        Closed {
            line: line.to_string(),
            up_bytes: field("up_bytes"),
            down_bytes: field("down_bytes"),
            up_spilled: field("up_spilled"),
            down_spilled: field("down_spilled"),
            dropped: field("dropped"),
            backend_held: seconds("backend_held"),
            duration: seconds("duration"),
            reason,
        }
    }
}

/// The `spillway` binary, running.
pub struct Proxy {
    child: Option<Child>,
    pub pid: u32,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
    pub stderr_path: PathBuf,
    /// The `--temp-dir` it spills into.
    pub temp_dir: PathBuf,
    spill_dir: TempDir,
    work_dir: TempDir,
}

impl Proxy {
    /// Start the proxy with `args` (at least one `--backend`) plus
    /// `--listen 127.0.0.1:0 --log-file <tmp>/log --temp-dir <fresh dir>`,
    /// and wait until it logs the address it listens on.
    pub fn start(args: &[&str]) -> Proxy {
        Proxy::start_with(args, Launch::default())
    }

    /// `start`, with the knobs of `launch`.
    pub fn start_with(args: &[&str], launch: Launch) -> Proxy {
        let work_dir = TempDir::new("work");
        let spill_dir = TempDir::new("spill");
        let log_path = work_dir.path().join("log");
        let stderr_path = work_dir.path().join("stderr");
        let stderr = fs::File::create(&stderr_path).expect("create stderr file");
        let temp_dir = launch
            .temp_dir
            .clone()
            .unwrap_or_else(|| spill_dir.path().to_path_buf());
        let mut command = Command::new(bin());
        command
            .args(["--listen", "127.0.0.1:0"])
            .arg("--log-file")
            .arg(&log_path)
            .arg("--temp-dir")
            .arg(&temp_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(limit) = launch.max_open_files {
            limit_open_files(&mut command, limit);
        }
        command.envs(launch.env.iter().map(|(k, v)| (k, v)));
        let child = command.spawn().expect("spawn spillway");
        let pid = child.id();
        let mut proxy = Proxy {
            child: Some(child),
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_path,
            stderr_path,
            temp_dir,
            spill_dir,
            work_dir,
        };
        let line = proxy.wait_for_log(" INFO listening on 127.0.0.1:", START_TIMEOUT);
        let rest = line.split_once("listening on ").expect("checked above").1;
        let addr = rest.split(' ').next().unwrap_or("");
        proxy.addr = addr
            .parse()
            .unwrap_or_else(|e| panic!("bad address {addr:?} in {line:?}: {e}"));
        proxy
    }

    /// The whole log so far, complete lines only.
    pub fn log_lines(&self) -> Vec<String> {
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        complete.lines().map(str::to_string).collect()
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Panics if the proxy has exited: then nothing it was meant to do will
    /// happen, and the test should say so at once.
    /// (Once the test has reaped it, there is nothing to check.)
    pub fn assert_running(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!(
                "spillway exited unexpectedly ({status}); stderr: {}",
                self.stderr_text()
            );
        }
    }

    /// The first log line matching `pred`, waiting up to `timeout` for it.
    pub fn wait_for_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log_lines().into_iter().find(|l| pred(l)) {
                return line;
            }
            self.assert_running();
            if Instant::now() >= deadline {
                panic!(
                    "no log line {what} within {timeout:?}; log so far:\n{}",
                    self.log_lines().join("\n")
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The first log line containing `needle`, waiting up to `timeout`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for_line(&format!("containing {needle:?}"), timeout, |l| {
            l.contains(needle)
        })
    }

    /// All log lines containing `needle` now (no waiting).
    pub fn lines_containing(&self, needle: &str) -> Vec<String> {
        self.log_lines()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }

    /// The close summary of the connection whose client end is `client`.
    pub fn wait_for_close(&mut self, client: SocketAddr, timeout: Duration) -> Closed {
        let needle = format!(" closed client={client} ");
        let line = self.wait_for_line(&format!("closing client {client}"), timeout, |l| {
            l.contains(" INFO [conn ") && l.contains(&needle)
        });
        Closed::parse(&line)
    }

    /// Spill files the proxy holds open now: fds whose link points into
    /// the temp dir and ends with ` (deleted)`.
    pub fn spill_files(&self) -> Vec<SpillFile> {
        let fd_dir = PathBuf::from(format!("/proc/{}/fd", self.pid));
        let prefix = format!("{}/", self.temp_dir.display());
        let mut files = Vec::new();
        let entries = fs::read_dir(&fd_dir).unwrap_or_else(|e| panic!("{}: {e}", fd_dir.display()));
        for entry in entries.flatten() {
            let fd_path = entry.path();
            // An fd may close between listing and looking: skip it.
            let Ok(target) = fs::read_link(&fd_path) else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            if !target.starts_with(&prefix) {
                continue;
            }
            assert!(
                target.ends_with(" (deleted)"),
                "the proxy holds a file in the temp dir that is not unlinked: {target}"
            );
            let Ok(meta) = fs::metadata(&fd_path) else {
                continue;
            };
            files.push(SpillFile {
                fd_path,
                target,
                size: meta.len(),
                disk: meta.blocks() * 512,
            });
        }
        files
    }

    /// Wait until the proxy holds no spill file any more.
    pub fn wait_no_spill_files(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let files = self.spill_files();
            if files.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!("spill files still open after {timeout:?}: {files:?}");
            }
            thread::sleep(POLL);
        }
    }

    /// `direction` ("backend->client" or "client->backend") has spilled:
    /// its one WARN names both ends, nothing is visible in the temp dir,
    /// and an unlinked, non-empty spill file is open under it.
    pub fn assert_spilling_unnamed(
        &mut self,
        direction: &str,
        client: SocketAddr,
        backend: SocketAddr,
    ) {
        let warn = self.wait_for_log(
            &format!("{direction} spilling to disk"),
            Duration::from_secs(10),
        );
        assert!(warn.contains(" WARN [conn "), "a WARN line: {warn}");
        assert!(
            warn.contains(&format!("client={client} backend={backend}")),
            "names both ends: {warn}"
        );
        assert_eq!(
            self.temp_dir_entries(),
            Vec::<String>::new(),
            "spill files must be unnamed"
        );
        let files = self.spill_files();
        assert!(
            files.iter().any(|f| f.size > 0),
            "a deleted, non-empty spill file under the temp dir in /proc/{}/fd: {files:?}",
            self.pid
        );
    }

    /// Names visible in the temp dir (spill files never should be).
    pub fn temp_dir_entries(&self) -> Vec<String> {
        fs::read_dir(&self.temp_dir)
            .expect("read temp dir")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// Send `signal` and wait for the process to exit.
    pub fn signal_and_wait(&mut self, signal: libc::c_int, timeout: Duration) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.pid).expect("pid fits pid_t");
        // SAFETY: kill only takes integers; the child is ours and not yet
        // reaped, so the pid cannot have been reused.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill: {}", io::Error::last_os_error());
        let mut child = self.child.take().expect("proxy already reaped");
        match wait_with_deadline(&mut child, timeout) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("spillway still running {timeout:?} after signal {signal}");
            }
        }
    }
}

/// How to start the proxy beyond its flags.
#[derive(Default, Clone)]
pub struct Launch {
    /// Spill here instead of a fresh directory.
    pub temp_dir: Option<PathBuf>,
    /// `RLIMIT_NOFILE` for the proxy process.
    pub max_open_files: Option<u64>,
    /// Environment variables for the proxy process.
    pub env: Vec<(String, String)>,
}

impl Proxy {
    /// Send `signal` and return at once.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid).expect("pid fits pid_t");
        // SAFETY: kill only takes integers; the child is ours and not yet
        // reaped (we hold it), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill: {}", io::Error::last_os_error());
    }

    /// Wait for the proxy to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("proxy already reaped");
        match wait_with_deadline(&mut child, timeout) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("spillway still running after {timeout:?}");
            }
        }
    }

    /// Open file descriptors of the proxy process.
    pub fn fd_count(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// CPU time the proxy has used, from `/proc/PID/schedstat` (ns).
    pub fn cpu_ns(&self) -> u64 {
        let text = fs::read_to_string(format!("/proc/{}/schedstat", self.pid)).unwrap_or_default();
        text.split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .expect("schedstat")
    }

    /// Resident memory of the proxy, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Wait until the log holds `n` close lines.
    pub fn wait_for_closes(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let closed = self.lines_containing(" closed client=").len();
            if closed >= n {
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{closed} of {n} connections closed within {timeout:?}"
            );
            thread::sleep(POLL);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            let lines = self.log_lines();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("---- spillway log (last {} lines) ----", tail.len());
            for line in tail {
                eprintln!("{line}");
            }
            let stderr = self.stderr_text();
            if !stderr.is_empty() {
                eprintln!("---- spillway stderr ----\n{stderr}");
            }
        }
    }
}

/// Run `command` with at most `limit` open files (`RLIMIT_NOFILE`).
pub fn limit_open_files(command: &mut Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only setrlimit runs between fork and exec: it is
    // async-signal-safe and touches no memory of the parent's.
    unsafe {
        command.pre_exec(move || {
            let rl = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

/// Poll `done` every few milliseconds until it holds, or panic after
/// `timeout`. For state another thread or process reaches on its own time
/// (a backend's accept count, a file's size), where no log line marks it.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "waited {timeout:?} for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `check` (which asserts) keeps holding for all of `window`: for a thing
/// that must *not* happen, watched for a while rather than looked at once.
pub fn holds_for(window: Duration, mut check: impl FnMut()) {
    let end = Instant::now() + window;
    loop {
        check();
        if Instant::now() >= end {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait for `child` to exit, up to `timeout`.
pub fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------
// Threads

/// A thread whose result (or panic) the test collects with a deadline.
pub struct Bg<T> {
    name: String,
    handle: Option<JoinHandle<T>>,
}

pub fn spawn<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Bg<T> {
    let handle = thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .expect("spawn thread");
    Bg {
        name: name.to_string(),
        handle: Some(handle),
    }
}

impl<T> Bg<T> {
    /// The thread's result; its panic is re-raised here. Panics if it has
    /// not finished within `timeout`.
    pub fn join(mut self, timeout: Duration) -> T {
        let handle = self.handle.take().expect("joined once");
        let deadline = Instant::now() + timeout;
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                panic!("thread {} still running after {timeout:?}", self.name);
            }
            thread::sleep(POLL);
        }
        match handle.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| h.is_finished())
    }
}

// ---------------------------------------------------------------------------
// Sockets

/// A listener on `127.0.0.1:0` for a backend.
/// Its accept queue is deep (1024, not std's 128): a burst of hundreds of
/// connections from the proxy must not overflow it, or the kernel drops
/// handshakes and the test measures SYN retransmission timers instead.
pub fn listen() -> (TcpListener, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind backend");
    socket.listen(1024).expect("listen");
    let listener: TcpListener = socket.into();
    let addr = listener.local_addr().expect("local_addr");
    (listener, addr)
}

/// An address nothing listens on: bound, then released (fine where nothing
/// will connect to it).
pub fn dead_addr() -> SocketAddr {
    let (listener, addr) = listen();
    drop(listener);
    addr
}

/// An address that refuses connections for as long as the returned socket
/// lives: bound (without SO_REUSEADDR) but not listening, so no other
/// socket can start listening there meanwhile.
pub fn refusing_addr() -> (socket2::Socket, SocketAddr) {
    bound_socket()
}

/// A TCP socket bound to an ephemeral port on 127.0.0.1, and that address.
fn bound_socket() -> (socket2::Socket, SocketAddr) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let addr = socket
        .local_addr()
        .expect("local_addr")
        .as_socket()
        .expect("an inet address");
    (socket, addr)
}

fn with_timeouts(stream: TcpStream) -> TcpStream {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    stream
}

/// Accept one connection within `timeout`; the stream is blocking, with
/// the harness's I/O timeouts.
pub fn accept_within(listener: &TcpListener, timeout: Duration) -> TcpStream {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking stream");
                return with_timeouts(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    panic!("no connection accepted within {timeout:?}");
                }
                thread::sleep(POLL);
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Connect to `addr` (the proxy) with the harness's I/O timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    with_timeouts(stream)
}

/// Connect from a socket bound first, so its address is known even when
/// the connect itself fails: a proxy that accepts and at once resets can
/// make `connect` report `ECONNRESET` if the reset lands before this
/// thread looks at the socket again.
pub fn connect_from_known_port(addr: SocketAddr) -> (SocketAddr, io::Result<TcpStream>) {
    let (socket, local) = bound_socket();
    let result = socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .map(|()| with_timeouts(socket.into()));
    (local, result)
}

/// Wait until the peer has taken everything written to `stream`, the FIN
/// included: first its kernel acknowledges it all (our `SIOCOUTQ` is
/// zero), then the peer process reads it all, EOF too (its socket's
/// `rx_queue` in `/proc/net/tcp` is zero: the FIN counts until read).
/// After that, a reset of `stream` cannot take anything back: for the
/// proxy, the stream has ended with EOF. `stream` must be shut for writing.
pub fn wait_until_peer_read_all(stream: &TcpStream, timeout: Duration) {
    use std::os::unix::io::AsRawFd;
    let deadline = Instant::now() + timeout;
    loop {
        let mut unacked: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int through the pointer,
        // which points at a live local; the fd is owned by `stream`.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut unacked) };
        assert_eq!(rc, 0, "ioctl(SIOCOUTQ): {}", io::Error::last_os_error());
        if unacked == 0 {
            break;
        }
        if Instant::now() >= deadline {
            panic!("{unacked} bytes still unacknowledged after {timeout:?}");
        }
        thread::sleep(POLL);
    }
    // The peer's socket: local and remote swapped.
    let peer = stream.peer_addr().expect("peer_addr");
    let local = stream.local_addr().expect("local_addr");
    loop {
        let unread = tcp_rx_queue(peer, local);
        if unread == Some(0) {
            return;
        }
        if Instant::now() >= deadline {
            panic!("the peer {peer} left {unread:?} bytes unread for {timeout:?}");
        }
        thread::sleep(POLL);
    }
}

/// Reset `stream`, then wait until the peer's kernel has processed the
/// reset: its socket is closed and gone from `/proc/net/tcp`. From then on
/// the peer's next read, write or shutdown on it fails for sure (under
/// load, softirq processing may otherwise lag behind the test's next step).
pub fn reset_seen_by_peer(stream: TcpStream, timeout: Duration) {
    let peer = stream.peer_addr().expect("peer_addr");
    let local = stream.local_addr().expect("local_addr");
    assert!(
        tcp_rx_queue(peer, local).is_some(),
        "the peer's socket {peer} -> {local} is not in /proc/net/tcp before the reset"
    );
    reset(stream);
    let deadline = Instant::now() + timeout;
    while tcp_rx_queue(peer, local).is_some() {
        if Instant::now() >= deadline {
            panic!("the peer {peer} has not processed our reset after {timeout:?}");
        }
        thread::sleep(POLL);
    }
}

/// `rx_queue` of the IPv4 TCP socket `local` -> `remote` from
/// `/proc/net/tcp`: received bytes (and FIN) its process has not read yet.
fn tcp_rx_queue(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    // Addresses are printed as the in-memory (network order) u32 in hex,
    // ports in host order: 127.0.0.1:8080 is 0100007F:1F90 here.
    fn hex(addr: SocketAddr) -> String {
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 only: {addr}")
        };
        let ip = u32::from_ne_bytes(v4.ip().octets());
        format!("{ip:08X}:{:04X}", v4.port())
    }
    let (local, remote) = (hex(local), hex(remote));
    let table = fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&local.as_str()) || fields.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let queues = fields.get(4)?;
        let (_, rx) = queues.split_once(':')?;
        u64::from_str_radix(rx, 16).ok()
    })
}

/// Close `stream` with RST instead of FIN.
pub fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("set_linger(0)");
    drop(stream);
}

pub fn shutdown_write(stream: &TcpStream) {
    stream.shutdown(Shutdown::Write).expect("shutdown(Write)");
}

/// Chunk sizes for reads: mostly large, with some tiny ones in between, so
/// boundaries fall everywhere without making 64MiB take forever.
const READ_CHUNKS: [usize; 10] = [1, 3, 4096, 65536, 1 << 20, 17, 1000, 1 << 20, 256 << 10, 7];

/// An I/O error for a failure message; a socket timeout says so.
pub fn explain(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("nothing arrived, not even EOF, within the socket timeout ({e})")
        }
        kind => format!("{e} ({kind:?})"),
    }
}

/// Read until EOF, expecting exactly `expected_len` bytes, in varied chunk
/// sizes; fails on more bytes, an error, or `timeout`.
pub fn read_to_eof_varied(
    stream: &mut TcpStream,
    expected_len: usize,
    timeout: Duration,
) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; expected_len + 1];
    let mut pos = 0;
    for i in 0.. {
        if Instant::now() >= deadline {
            panic!("read only {pos} of {expected_len} bytes within {timeout:?}");
        }
        let want = READ_CHUNKS[i % READ_CHUNKS.len()].min(buf.len() - pos);
        match stream.read(&mut buf[pos..pos + want]) {
            Ok(0) => break,
            Ok(n) => pos += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "read failed after {pos} of {expected_len} bytes: {}",
                explain(&e)
            ),
        }
        assert!(
            pos <= expected_len,
            "more than the {expected_len} bytes expected"
        );
    }
    buf.truncate(pos);
    buf
}

/// Read until EOF (small payloads), at most `limit` bytes.
pub fn read_to_eof(stream: &mut TcpStream, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                assert!(out.len() <= limit, "more than {limit} bytes before EOF");
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read failed after {} bytes: {}", out.len(), explain(&e)),
        }
    }
}

// ---------------------------------------------------------------------------
// Data

/// xorshift64 state.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-enough in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `len` seeded pseudo-random bytes, 8 at a time.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = vec![0u8; len];
    let mut chunks = out.chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let last = rng.next_u64().to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&last[..n]);
    out
}

/// Index of the first byte where `a` and `b` differ (or the shorter length).
pub fn first_mismatch(a: &[u8], b: &[u8]) -> usize {
    const STEP: usize = 4096;
    let common = a.len().min(b.len());
    let mut at = 0;
    while at < common {
        let end = (at + STEP).min(common);
        if a[at..end] != b[at..end] {
            return at
                + a[at..end]
                    .iter()
                    .zip(&b[at..end])
                    .take_while(|(x, y)| x == y)
                    .count();
        }
        at = end;
    }
    common
}

/// Byte-exact equality, reporting lengths and the first differing offset.
pub fn assert_bytes_eq(what: &str, got: &[u8], expected: &[u8]) {
    if got == expected {
        return;
    }
    let at = first_mismatch(got, expected);
    panic!(
        "{what}: got {} bytes, expected {}; first difference at offset {at} (got {:?}, expected {:?})",
        got.len(),
        expected.len(),
        got.get(at),
        expected.get(at)
    );
}

/// `write_all`, then `shutdown(Write)`.
pub fn send_and_shut(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).expect("write_all");
    shutdown_write(stream);
}

/// Connect to `addr` with the receive buffer pinned to `rcvbuf` bytes
/// (set before connecting, so the window is small from the first byte), as
/// on a real network path: the kernel cannot then quietly absorb megabytes
/// of a response and hide how slowly the client reads.
pub fn connect_small_window(addr: SocketAddr, rcvbuf: usize) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    with_timeouts(socket.into())
}

/// Read to EOF `chunk` bytes at a time, sleeping `every` between reads,
/// expecting exactly `expected_len` bytes within `timeout`.
pub fn read_to_eof_paced(
    stream: &mut TcpStream,
    expected_len: usize,
    chunk: usize,
    every: Duration,
    timeout: Duration,
) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(expected_len);
    let mut buf = vec![0u8; chunk];
    loop {
        assert!(
            Instant::now() < deadline,
            "read only {} of {expected_len} bytes within {timeout:?}",
            out.len()
        );
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => panic!(
                "read failed after {} of {expected_len} bytes: {}",
                out.len(),
                explain(&e)
            ),
        }
        assert!(out.len() <= expected_len, "more than {expected_len} bytes");
        thread::sleep(every);
    }
}
