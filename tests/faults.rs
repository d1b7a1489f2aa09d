//! Faults, limits and shutdown through the real binary: graceful and cut
//! shutdowns, --max-connections, --idle-timeout, idle CPU, fd exhaustion,
//! a full disk, --max-disk, resets at random points, fds and memory
//! returning to their baseline, SIGHUP.
//!
//! Every wait is on a log line, a counter or a socket, against a deadline;
//! the only fixed sleeps are the observation windows the tests are about
//! (nothing may happen during them) and short pauses inside polling loops.

mod common;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const SECS_2: Duration = Duration::from_secs(2);
const SECS_5: Duration = Duration::from_secs(5);
const SECS_10: Duration = Duration::from_secs(10);
const SECS_30: Duration = Duration::from_secs(30);
const SECS_60: Duration = Duration::from_secs(60);

/// Pause inside polling loops.
const TICK: Duration = Duration::from_millis(5);

/// What a holding backend says first.
const GREETING: &[u8] = b"hi";

// ---------------------------------------------------------------------------
// Backends

/// A backend on 127.0.0.1: accepts until dropped, running `handler` on a
/// thread of its own for each connection (blocking, 60 s I/O timeouts).
/// Counts what it accepted.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<Bg<()>>,
}

impl Backend {
    fn start<F>(name: &str, handler: F) -> Backend
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let (listener, addr) = listen();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (accepted.clone(), stop.clone());
        let handler = Arc::new(handler);
        let label = name.to_string();
        let thread = spawn(name, move || {
            listener
                .set_nonblocking(true)
                .expect("nonblocking listener");
            let deadline = Instant::now() + Duration::from_secs(120);
            while !halt.load(Ordering::SeqCst) {
                assert!(
                    Instant::now() < deadline,
                    "backend {label} never told to stop"
                );
                match listener.accept() {
                    Ok((stream, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        stream.set_nonblocking(false).expect("blocking stream");
                        stream.set_read_timeout(Some(SECS_60)).expect("timeout");
                        stream.set_write_timeout(Some(SECS_60)).expect("timeout");
                        let handler = handler.clone();
                        thread::spawn(move || handler(stream));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("backend {label}: accept: {e}"),
                }
            }
        });
        Backend {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn arg(&self) -> String {
        self.addr.to_string()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn wait_accepted(&self, n: usize, timeout: Duration) {
        wait_until(&format!("the backend to accept {n}"), timeout, || {
            self.accepted() >= n
        });
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if !thread::panicking() {
                thread.join(SECS_10);
            }
        }
    }
}

/// Greet, then hold the connection until the client's EOF (or an error).
fn greet_and_hold(mut s: TcpStream) {
    if s.write_all(GREETING).is_ok() {
        let _ = read_until_end(&mut s, &mut Vec::new(), 1 << 20);
    }
}

/// A backend that writes `data` to each connection, then closes it.
/// Returns it and how many connections got all of `data` written.
fn sender(data: Arc<Vec<u8>>) -> (Backend, Arc<AtomicUsize>) {
    let written = Arc::new(AtomicUsize::new(0));
    let count = written.clone();
    let backend = Backend::start("sender", move |mut s| {
        if s.write_all(&data).is_ok() {
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    (backend, written)
}

/// How the connections of an echo backend ended.
#[derive(Default)]
struct EchoEnds {
    /// EOF before any byte arrived.
    silent_eofs: AtomicUsize,
    /// EOF after some bytes.
    eofs: AtomicUsize,
    /// A read or write failed.
    errors: AtomicUsize,
}

/// Echo everything back until EOF, noting how the connection ended.
fn echo(mut s: TcpStream, ends: &EchoEnds) {
    let mut buf = [0u8; 16 * 1024];
    let mut seen = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let counter = if seen == 0 {
                    &ends.silent_eofs
                } else {
                    &ends.eofs
                };
                counter.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(n) => {
                seen += n;
                if s.write_all(&buf[..n]).is_err() {
                    ends.errors.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                ends.errors.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Clients and waiting

/// Read the backend's greeting within `timeout`.
fn expect_greeting(client: &mut TcpStream, timeout: Duration) {
    client.set_read_timeout(Some(timeout)).expect("timeout");
    let mut hi = [0u8; GREETING.len()];
    if let Err(e) = client.read_exact(&mut hi) {
        panic!("no greeting within {timeout:?}: {}", explain(&e));
    }
    assert_eq!(hi, GREETING);
    client.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
}

/// Has the greeting arrived (without consuming it)?
fn has_greeting(client: &TcpStream) -> bool {
    client.set_nonblocking(true).expect("nonblocking");
    let mut hi = [0u8; GREETING.len()];
    let peeked = client.peek(&mut hi);
    client.set_nonblocking(false).expect("blocking");
    match peeked {
        Ok(0) => panic!("closed before the greeting"),
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("peek: {}", explain(&e)),
    }
}

/// Half-close and wait for the proxy to close us: a normal goodbye.
fn bye(client: &mut TcpStream) {
    shutdown_write(client);
    let rest = read_to_eof(client, 16);
    assert!(rest.is_empty(), "unexpected bytes before EOF: {rest:?}");
}

/// Read until EOF (`Ok`) or an error (`Err`), appending at most `limit`
/// bytes to `got` (more is an error too).
fn read_until_end(s: &mut TcpStream, got: &mut Vec<u8>, limit: usize) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * KIB];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > limit {
                    return Err(io::Error::other(format!("more than {limit} bytes")));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Connect attempts to `addr` until one is refused; returns how long that
/// took. A connect that still succeeds (the listener closing just after
/// the log line was written) is retried; after `timeout` the test fails.
fn expect_refused(addr: SocketAddr, timeout: Duration) -> Duration {
    let start = Instant::now();
    let mut accepted = 0;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            // With several workers, a connect caught by a listening socket
            // as it closes is reset rather than refused: refused all the same.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                ) =>
            {
                if accepted > 0 {
                    eprintln!("{accepted} connect(s) still completed right after the log line");
                }
                return start.elapsed();
            }
            Err(e) => panic!("connect during shutdown: expected ECONNREFUSED, got {e}"),
            Ok(_) => accepted += 1,
        }
        assert!(
            start.elapsed() < timeout,
            "connects to {addr} still succeed {timeout:?} after the shutdown began"
        );
        thread::sleep(TICK);
    }
}

/// CPU time of every thread of `pid` so far, in ns: the first field of
/// `/proc/PID/task/*/schedstat`.
fn cpu_ns(pid: u32) -> u64 {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/PID/task");
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("schedstat")).ok())
        .map(|text| {
            text.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .expect("schedstat")
        })
        .sum()
}

/// How many of `pid`'s open fds are numbered below `limit`.
fn fds_below(pid: u32, limit: usize) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<usize>().ok())
        .filter(|&fd| fd < limit)
        .count()
}

/// Wait until the proxy holds exactly `want` fds again; returns the count.
fn wait_fds(proxy: &Proxy, want: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let now = proxy.fd_count();
        if now == want {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy holds {now} fds {timeout:?} after the last close, {want} before"
        );
        thread::sleep(TICK);
    }
}

/// Exactly `n` close lines, waiting for them.
fn expect_closes(proxy: &mut Proxy, n: usize, timeout: Duration) {
    proxy.wait_for_closes(n, timeout);
    let closes = proxy.lines_containing(" closed client=").len();
    assert_eq!(closes, n, "close lines: {closes}, connections: {n}");
}

// ---------------------------------------------------------------------------
// Shutdown

/// Read to EOF, sleeping 5ms per 64KiB received, publishing progress.
fn paced_read(client: &mut TcpStream, expected: usize, progress: &AtomicUsize) -> Vec<u8> {
    const STEP: usize = 64 * KIB;
    let deadline = Instant::now() + SECS_60;
    let mut got = Vec::with_capacity(expected);
    let mut buf = vec![0u8; STEP];
    let mut paced = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "read {} of {expected} bytes in {SECS_60:?}",
            got.len()
        );
        match client.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("read failed after {} bytes: {}", got.len(), explain(&e)),
        }
        assert!(got.len() <= expected, "more than {expected} bytes");
        progress.store(got.len(), Ordering::SeqCst);
        while got.len() >= paced + STEP {
            paced += STEP;
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Test 1: SIGTERM while a 16MiB download is in flight to a client reading
/// at a moderate pace: the listener goes at once (new clients are
/// refused), the download still arrives whole and byte-exact with EOF,
/// and the proxy then exits 0, counting it as finished and nothing cut.
#[test]
fn graceful_shutdown_lets_a_transfer_finish() {
    let data = Arc::new(random_bytes(81, 16 * MIB));
    let (backend, _) = sender(data.clone());
    let mut proxy = Proxy::start(&["--backend", &backend.arg()]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    shutdown_write(&client);
    let progress = Arc::new(AtomicUsize::new(0));
    let reader = {
        let progress = progress.clone();
        spawn("client", move || {
            paced_read(&mut client, 16 * MIB, &progress)
        })
    };
    wait_until("the client to read 1MiB", SECS_10, || {
        progress.load(Ordering::SeqCst) >= MIB
    });

    proxy.signal(libc::SIGTERM);
    let at_signal = progress.load(Ordering::SeqCst);
    let line = proxy.wait_for_log("received SIGTERM: no longer accepting", SECS_10);
    assert!(line.contains(" INFO "), "{line}");
    assert!(
        line.contains("1 connection(s) may finish within 30s"),
        "{line}"
    );
    let refused_in = expect_refused(proxy.addr, SECS_2);

    let got = reader.join(SECS_60);
    assert!(at_signal < 16 * MIB, "the transfer was over before SIGTERM");
    assert_bytes_eq("the download in flight at SIGTERM", &got, &data);
    let status = proxy.wait_exit(SECS_10);
    assert!(status.success(), "exit status {status}");
    let summary = proxy.wait_for_log("shutdown complete:", SECS_5);
    assert!(summary.contains(" INFO "), "{summary}");
    assert!(
        summary.contains("shutdown complete: 1 connection(s) finished, 0 closed while quiet, 0 cut at the timeout"),
        "{summary}"
    );
    let closed = proxy.wait_for_close(client_addr, SECS_5);
    assert_eq!(closed.reason, "done", "{}", closed.line);
    assert_eq!(closed.down_bytes, data.len() as u64, "{}", closed.line);
    eprintln!(
        "SIGTERM after {at_signal} bytes read; new connects refused {refused_in:?} after the log line"
    );
}

/// Test 2: a second SIGTERM exits at once, whatever --shutdown-timeout says
/// and whatever is in flight (a client reading nothing of 64MiB).
#[test]
fn a_second_signal_exits_at_once() {
    let data = Arc::new(random_bytes(82, 64 * MIB));
    let (backend, written) = sender(data);
    let mut proxy = Proxy::start(&["--backend", &backend.arg(), "--shutdown-timeout", "60s"]);
    let client = connect(proxy.addr);
    shutdown_write(&client);
    wait_until(
        "the backend to write 64MiB to a client reading nothing",
        SECS_60,
        || written.load(Ordering::SeqCst) == 1,
    );
    proxy.signal(libc::SIGTERM);
    let line = proxy.wait_for_log("received SIGTERM: no longer accepting", SECS_10);
    assert!(
        line.contains("1 connection(s) may finish within 60s"),
        "{line}"
    );
    let second = Instant::now();
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(SECS_5);
    let took = second.elapsed();
    assert!(status.success(), "exit status {status}");
    let warn = proxy.wait_for_log("received SIGTERM again", SECS_5);
    assert!(
        warn.contains(" WARN received SIGTERM again: exiting now, cutting 1 connection(s)"),
        "{warn}"
    );
    eprintln!("exited {took:?} after the second SIGTERM");
    drop(client);
}

/// Test 3: past --shutdown-timeout what is left is cut, and the cut shows:
/// the stalled client's read ends in an error (a reset), never in a clean
/// EOF that would make 64MiB look delivered.
#[test]
fn shutdown_timeout_cuts_what_is_left() {
    let data = Arc::new(random_bytes(83, 64 * MIB));
    let (backend, written) = sender(data.clone());
    let mut proxy = Proxy::start(&["--backend", &backend.arg(), "--shutdown-timeout", "500ms"]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    shutdown_write(&client);
    wait_until(
        "the backend to write 64MiB to a client reading nothing",
        SECS_60,
        || written.load(Ordering::SeqCst) == 1,
    );
    let signalled = Instant::now();
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(SECS_10);
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    let summary = proxy.wait_for_log("shutdown complete:", SECS_5);
    assert!(
        summary
            .contains("0 connection(s) finished, 0 closed while quiet, 1 cut at the timeout with "),
        "{summary}"
    );
    let closed = proxy.wait_for_close(client_addr, SECS_5);
    assert_eq!(closed.reason, "shutdown timeout", "{}", closed.line);

    let mut got = Vec::new();
    let end = read_until_end(&mut client, &mut got, data.len());
    assert_bytes_eq(
        "what arrived before the cut",
        &got,
        &data[..got.len().min(data.len())],
    );
    match end {
        Ok(()) => panic!(
            "a cut transfer ended with a clean EOF after {} of {} bytes",
            got.len(),
            data.len()
        ),
        Err(e) => {
            assert!(
                !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "nothing, not even a reset, reached the client: {e}"
            );
            assert!(got.len() < data.len(), "all of it arrived, then {e}");
            eprintln!(
                "exited {took:?} after SIGTERM; the client got {} bytes, then {e} ({:?}); {summary}",
                got.len(),
                e.kind()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Limits

/// Test 4: with --max-connections 2 a third client waits in the kernel's
/// backlog (connected, never passed to the backend) until one of the two
/// leaves; then it is served.
#[test]
fn max_connections_keeps_clients_in_the_backlog() {
    let backend = Backend::start("holding", greet_and_hold);
    let mut proxy = Proxy::start(&["--backend", &backend.arg(), "--max-connections", "2"]);
    let mut first = connect(proxy.addr);
    let mut second = connect(proxy.addr);
    expect_greeting(&mut first, SECS_10);
    expect_greeting(&mut second, SECS_10);
    let third = connect(proxy.addr);
    let warn = proxy.wait_for_log("--max-connections 2 reached", SECS_10);
    assert!(
        warn.contains(" WARN --max-connections 2 reached: new clients wait in the listen backlog"),
        "{warn}"
    );
    holds_for(Duration::from_millis(300), || {
        assert_eq!(
            backend.accepted(),
            2,
            "a third connection reached the backend"
        );
        assert!(!has_greeting(&third), "the third client was served");
    });

    bye(&mut second);
    let mut third = third;
    expect_greeting(&mut third, SECS_10);
    let info = proxy.wait_for_log("below --max-connections 2 again: accepting", SECS_10);
    assert!(info.contains(" INFO "), "{info}");
    assert_eq!(backend.accepted(), 3);
    bye(&mut first);
    bye(&mut third);
    expect_closes(&mut proxy, 3, SECS_10);
}

/// --max-connections counts the connections of every worker: with four
/// workers (each client hashed to one of four listening sockets) and a
/// limit of 3, eight clients get exactly three served until one leaves.
#[test]
fn max_connections_counts_every_worker() {
    let backend = Backend::start("holding", greet_and_hold);
    let proxy = Proxy::start(&[
        "--backend",
        &backend.arg(),
        "--max-connections",
        "3",
        "--workers",
        "4",
    ]);
    let mut clients: Vec<TcpStream> = (0..8).map(|_| connect(proxy.addr)).collect();
    backend.wait_accepted(3, SECS_10);
    wait_until("three clients greeted", SECS_10, || {
        clients.iter().filter(|c| has_greeting(c)).count() == 3
    });
    holds_for(Duration::from_millis(300), || {
        assert_eq!(backend.accepted(), 3, "more than 3 connections at once");
    });
    let at = clients
        .iter()
        .position(has_greeting)
        .expect("a served client");
    let mut leaving = clients.swap_remove(at);
    expect_greeting(&mut leaving, SECS_10);
    bye(&mut leaving);
    backend.wait_accepted(4, SECS_10);
    wait_until("a fourth client greeted", SECS_10, || {
        clients.iter().filter(|c| has_greeting(c)).count() == 3
    });
    holds_for(Duration::from_millis(300), || {
        assert_eq!(backend.accepted(), 4, "one left, one more came in");
    });
}

/// Test 5: --idle-timeout 300ms closes a connection where nothing moves,
/// gently (EOF to both peers: nothing was held), while one exchanging a
/// few bytes every 100ms for 1.2 s stays open.
#[test]
fn idle_connections_are_closed_and_busy_ones_kept() {
    let ends = Arc::new(EchoEnds::default());
    let backend = Backend::start("echo", {
        let ends = ends.clone();
        move |s| echo(s, &ends)
    });
    let mut proxy = Proxy::start(&["--backend", &backend.arg(), "--idle-timeout", "300ms"]);
    let mut idle = connect(proxy.addr);
    let idle_addr = idle.local_addr().unwrap();
    let mut busy = connect(proxy.addr);
    let busy_addr = busy.local_addr().unwrap();
    backend.wait_accepted(2, SECS_10);

    let started = Instant::now();
    let mut exchanges = 0;
    let mut buf = [0u8; 8];
    while started.elapsed() < Duration::from_millis(1200) {
        let ping = format!("ping{exchanges:04}");
        busy.write_all(ping.as_bytes()).expect("write while busy");
        if let Err(e) = busy.read_exact(&mut buf) {
            panic!(
                "the busy connection failed after {exchanges} exchanges, {:?} in: {}",
                started.elapsed(),
                explain(&e)
            );
        }
        assert_eq!(&buf, ping.as_bytes());
        exchanges += 1;
        thread::sleep(Duration::from_millis(100));
    }

    let closed = proxy.wait_for_close(idle_addr, SECS_10);
    assert_eq!(closed.reason, "idle timeout", "{}", closed.line);
    let line = proxy.wait_for_log(" idle for ", SECS_5);
    assert!(line.contains(": closing"), "{line}");
    idle.set_read_timeout(Some(SECS_10)).unwrap();
    match idle.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{n} unexpected bytes on the idle connection"),
        Err(e) => panic!("the idle client got {}, not EOF", explain(&e)),
    }
    wait_until(
        "the backend to see EOF on the idle connection",
        SECS_10,
        || ends.silent_eofs.load(Ordering::SeqCst) == 1,
    );
    assert_eq!(
        ends.errors.load(Ordering::SeqCst),
        0,
        "a backend saw a reset"
    );
    assert!(
        proxy
            .lines_containing(&format!(" closed client={busy_addr} "))
            .is_empty(),
        "the busy connection was closed"
    );
    busy.write_all(b"last one")
        .expect("write after the idle one was closed");
    busy.read_exact(&mut buf).expect("echo after 1.2 s");
    bye(&mut busy);
    eprintln!(
        "idle connection closed after {:.3}s; the busy one made {exchanges} exchanges",
        closed.duration
    );
}

/// Test 6: 100 open, silent connections cost (next to) no CPU: the loop
/// sleeps in epoll. Under 10ms of proxy CPU in 2 s.
#[test]
fn idle_connections_cost_no_cpu() {
    let backend = Backend::start("holding", greet_and_hold);
    let proxy = Proxy::start(&["--backend", &backend.arg()]);
    let mut clients: Vec<TcpStream> = (0..100).map(|_| connect(proxy.addr)).collect();
    backend.wait_accepted(100, SECS_10);
    for c in &mut clients {
        expect_greeting(c, SECS_10);
    }
    let before = cpu_ns(proxy.pid);
    thread::sleep(Duration::from_secs(2));
    let used = cpu_ns(proxy.pid) - before;
    eprintln!("idle CPU: {used} ns in 2 s with 100 connections open");
    assert!(used < 10_000_000, "{used} ns of CPU in 2 s while idle");
    assert_eq!(backend.accepted(), 100);
}

/// A proxy with RLIMIT_NOFILE `LIMIT`, all its fds in use by clients of a
/// holding backend, more clients waiting in the listen backlog.
struct OutOfFds {
    backend: Backend,
    proxy: Proxy,
    /// Fds under the limit the proxy held before any client.
    base: usize,
    /// Clients served (greeted), and clients left in the backlog.
    served: Vec<TcpStream>,
    waiting: Vec<TcpStream>,
}

impl OutOfFds {
    const LIMIT: usize = 64;

    fn start(clients: usize) -> OutOfFds {
        let backend = Backend::start("holding", greet_and_hold);
        let mut proxy = Proxy::start_with(
            // One worker: the count of clients that fit assumes one accept
            // loop taking fds in turn (two would each hold a half-open
            // client while out of fds, and still serve them later).
            &["--backend", &backend.arg(), "--workers", "1"],
            Launch {
                max_open_files: Some(Self::LIMIT as u64),
                ..Launch::default()
            },
        );
        // Only fd numbers under the limit compete for it (the proxy may
        // inherit some from the test process, e.g. cargo's jobserver pipe,
        // above it). Each connection costs a client and a backend socket;
        // with an odd number left, the last client accepted would have no
        // backend socket.
        let base = fds_below(proxy.pid, Self::LIMIT);
        let fit = (Self::LIMIT - base) / 2;
        assert!(
            fit < clients,
            "{base} fds at start: all {clients} would fit"
        );

        let all: Vec<TcpStream> = (0..clients).map(|_| connect(proxy.addr)).collect();
        let error = proxy.wait_for_log(" ERROR accept on ", SECS_10);
        assert!(
            error.contains("pausing accepts until a connection closes (at most 100ms)"),
            "{error}"
        );
        wait_until("the proxy to use all its fds", SECS_10, || {
            fds_below(proxy.pid, Self::LIMIT) == Self::LIMIT
        });
        backend.wait_accepted(fit, SECS_10);
        wait_until(&format!("{fit} clients greeted"), SECS_10, || {
            all.iter().filter(|c| has_greeting(c)).count() == fit
        });
        let (mut served, waiting): (Vec<TcpStream>, Vec<TcpStream>) =
            all.into_iter().partition(has_greeting);
        for c in &mut served {
            expect_greeting(c, SECS_10);
        }
        OutOfFds {
            backend,
            proxy,
            base,
            served,
            waiting,
        }
    }
}

/// Test 7: with RLIMIT_NOFILE 64 and 50 clients (2 fds each), accepting
/// runs out of fds: the proxy stays up, logs the accept error once and not
/// again while it retries, does not spin, and once the clients it served
/// leave, every client left in the backlog is served.
#[test]
fn fd_exhaustion_pauses_accepting_without_spinning() {
    const CLIENTS: usize = 50;
    let OutOfFds {
        backend,
        mut proxy,
        base,
        served,
        mut waiting,
    } = OutOfFds::start(CLIENTS);
    let fit = served.len();
    let errors_saturated = proxy.lines_containing(" ERROR accept on ").len();
    assert_eq!(errors_saturated, 1, "one burst so far, one ERROR");

    // Saturated: accepting is retried every 100ms and fails each time.
    let before = cpu_ns(proxy.pid);
    thread::sleep(Duration::from_secs(1));
    let used = cpu_ns(proxy.pid) - before;
    proxy.assert_running();
    assert_eq!(backend.accepted(), fit, "served more than fit");
    assert_eq!(
        proxy.lines_containing(" ERROR accept on ").len(),
        errors_saturated,
        "the accept error logged again while retrying, still out of fds: once per burst, not per attempt"
    );
    assert!(
        used < 200_000_000,
        "{used} ns of CPU in 1 s out of fds: spinning"
    );

    // The served clients leave, all at once: the others are served.
    drop(served);
    let deadline = Instant::now() + SECS_10;
    for c in &mut waiting {
        let left = deadline.saturating_duration_since(Instant::now());
        expect_greeting(c, left.max(Duration::from_millis(1)));
    }
    assert_eq!(backend.accepted(), CLIENTS);
    proxy.assert_running();
    // A new burst can only begin after an accept succeeds, which takes a
    // connection closing first: never more lines than closes, however
    // many attempts failed. (How many there are depends on how the 27
    // closes fall into event-loop turns; see the next test.)
    let errors = proxy.lines_containing(" ERROR accept on ").len();
    eprintln!(
        "out of fds with {base} fds at start, {fit} of {CLIENTS} served: {used} ns of CPU in 1 s; \
         {errors} accept ERROR line(s) in all, for {fit} closes"
    );
    assert!(
        errors <= 1 + fit,
        "{errors} accept ERROR lines for {fit} closes: logged per attempt"
    );
    for c in &mut waiting {
        bye(c);
    }
    expect_closes(&mut proxy, CLIENTS, SECS_10);
}

/// Test 7b (beyond the list): the process stays out of fds while
/// connections come and go (clients keep waiting in the backlog); that is
/// one episode, and must not log an ERROR per connection that closes.
/// Five served clients leave one at a time; each time one waiting client
/// takes the freed fds and the next accept fails again.
#[test]
fn fd_exhaustion_through_churn_is_logged_once() {
    let OutOfFds {
        backend,
        proxy,
        mut served,
        mut waiting,
        ..
    } = OutOfFds::start(40);
    let fit = served.len();
    for round in 1..=5 {
        let mut leaving = served.pop().expect("a served client");
        bye(&mut leaving);
        backend.wait_accepted(fit + round, SECS_10);
        wait_until("a waiting client to be greeted", SECS_10, || {
            waiting.iter().any(has_greeting)
        });
        let at = waiting.iter().position(has_greeting).expect("greeted");
        let mut taken = waiting.swap_remove(at);
        expect_greeting(&mut taken, SECS_10);
        served.push(taken);
        wait_until("the proxy to be out of fds again", SECS_10, || {
            fds_below(proxy.pid, OutOfFds::LIMIT) == OutOfFds::LIMIT
        });
        assert_eq!(backend.accepted(), fit + round, "more fit than were freed");
    }
    let errors = proxy.lines_containing(" ERROR accept on ");
    assert_eq!(
        errors.len(),
        1,
        "out of fds all along, yet the accept error was logged {} times:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Disk

/// A tmpfs mounted for one test; unmounted (lazily if busy) on drop, even
/// when the test fails.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("spillway-tmpfs-{}-{nanos}", std::process::id()));
        fs::create_dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let dir = fs::canonicalize(&dir).map_err(|e| format!("canonicalize: {e}"))?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output();
        match mounted {
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

    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// A download size that cannot fit in `held` bytes at the proxy plus every
/// kernel buffer on its way while the client reads nothing: the backend's
/// send buffer, the proxy's receive buffer from it (autotuned up to
/// `tcp_rmem`'s maximum while the proxy reads fast, 32MiB on some machines),
/// the proxy's send buffer to the client and the client's receive buffer
/// (not grown: it never reads). So the backend can only finish if the proxy
/// read past its limit. At least 32MiB.
fn past_kernel_buffers(held: usize) -> usize {
    let max_of = |name: &str, index: usize, fallback: usize| {
        fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(index)?.parse().ok())
            .unwrap_or(fallback)
    };
    let rmem_max = max_of("tcp_rmem", 2, 32 * MIB);
    let rmem_default = max_of("tcp_rmem", 1, 128 * 1024);
    let wmem_max = max_of("tcp_wmem", 2, 4 * MIB);
    let kernel = rmem_max + rmem_default + 2 * wmem_max;
    (held + kernel + 8 * MIB)
        .next_multiple_of(MIB)
        .max(32 * MIB)
}

/// Test 8: the spill directory is a 4MiB tmpfs and the stalled client's
/// download is larger than it and every kernel buffer on the way: the disk fills (ENOSPC), the direction falls back to
/// holding what it has and not reading its backend (one WARN naming the
/// cause), spills again as the client reads, and loses nothing.
#[test]
fn a_full_disk_falls_back_to_backpressure_and_loses_nothing() {
    let disk = match Tmpfs::mount("4m") {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("SKIPPED: needs a 4MiB tmpfs to fill (root, mount rights): {why}");
            return;
        }
    };
    // The proxy holds the 4MiB tmpfs and at most 1MiB in memory (the
    // default --memory-buffer-max) plus as much again in a pipe.
    let data = Arc::new(random_bytes(84, past_kernel_buffers(6 * MIB)));
    let (backend, written) = sender(data.clone());
    let mut proxy = Proxy::start_with(
        &["--backend", &backend.arg(), "--memory-buffer", "64KiB"],
        Launch {
            temp_dir: Some(disk.path().to_path_buf()),
            ..Launch::default()
        },
    );
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    shutdown_write(&client);
    let warn = proxy.wait_for_log("cannot spill to", SECS_30);
    assert!(
        warn.contains(" WARN [conn ") && warn.contains(" backend->client cannot spill to "),
        "{warn}"
    );
    assert!(
        warn.contains("No space left on device") || warn.contains("os error 28"),
        "{warn}"
    );
    assert!(
        warn.contains("pausing reads from the backend until space frees"),
        "{warn}"
    );
    assert_eq!(
        written.load(Ordering::SeqCst),
        0,
        "{} bytes fit in 4MiB and the kernel's buffers?",
        data.len()
    );

    let got = read_to_eof_varied(&mut client, data.len(), SECS_60);
    assert_bytes_eq("a download through a full disk", &got, &data);
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert_eq!(closed.reason, "done", "{}", closed.line);
    assert_eq!(closed.down_bytes, data.len() as u64, "{}", closed.line);
    assert_eq!(closed.dropped, 0, "{}", closed.line);
    assert!(closed.down_spilled > 0, "{}", closed.line);
    let again = proxy.wait_for_log("backend->client spilling again", SECS_5);
    assert!(again.contains(" INFO [conn "), "{again}");
    assert_eq!(
        proxy.lines_containing("cannot spill to").len(),
        1,
        "one WARN per direction"
    );
    proxy.wait_no_spill_files(SECS_10);
    eprintln!("{warn}\n{} spilled in all", closed.down_spilled);
    drop(proxy);
    drop(disk);
}

/// Test 9: two stalled downloads of 16MiB share --max-disk 1MiB: sampled
/// for 300ms once the limit is reached, their spill files together never
/// hold more; then both arrive byte-exact, and no spill file is left.
#[test]
fn max_disk_bounds_all_spill_files_together() {
    let data = Arc::new(random_bytes(85, 16 * MIB));
    let (backend, _) = sender(data.clone());
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend.arg(),
        "--max-disk",
        "1MiB",
        "--max-spill",
        "16MiB",
        "--memory-buffer",
        "64KiB",
    ]);
    let mut a = connect(proxy.addr);
    let mut b = connect(proxy.addr);
    shutdown_write(&a);
    shutdown_write(&b);
    let warn = proxy.wait_for_log("(--max-disk reached)", SECS_10);
    assert!(warn.contains(" WARN [conn "), "{warn}");
    let until = Instant::now() + Duration::from_millis(300);
    let (mut peak, mut samples) = (0, 0);
    while Instant::now() < until {
        let files = proxy.spill_files();
        let disk: u64 = files.iter().map(|f| f.disk).sum();
        assert!(
            disk <= MIB as u64,
            "spill files hold {disk} bytes under --max-disk 1MiB: {files:?}"
        );
        peak = peak.max(disk);
        samples += 1;
        thread::sleep(Duration::from_millis(10));
    }
    assert!(peak > 0, "nothing on disk while stalled");

    let reader = spawn("client b", move || {
        read_to_eof_varied(&mut b, 16 * MIB, SECS_60)
    });
    let got_a = read_to_eof_varied(&mut a, data.len(), SECS_60);
    let got_b = reader.join(SECS_60);
    assert_bytes_eq("download a", &got_a, &data);
    assert_bytes_eq("download b", &got_b, &data);
    expect_closes(&mut proxy, 2, SECS_10);
    proxy.wait_no_spill_files(SECS_10);
    eprintln!("peak disk use under --max-disk 1MiB: {peak} bytes ({samples} samples)");
}

/// Test 9b: --max-memory bounds the buffers of every connection together.
/// 200 stalled downloads of 8MiB at --memory-buffer 1MiB would hold 200MiB
/// in memory; under --max-memory 16MiB what does not fit goes to disk.
/// Once spillway has taken every body (each backend sees its connection
/// released), the memory it reports (vectors and pipes: pipes are kernel
/// memory, which RSS does not show) is within the budget and its RSS has
/// grown by less than the budget plus allocator slack; then every body
/// arrives exact and no spill file is left.
#[test]
fn max_memory_bounds_all_buffers_together() {
    const CONNS: usize = 200;
    let data = Arc::new(random_bytes(86, 8 * MIB));
    let released = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start("sender until released", {
        let (data, released) = (data.clone(), released.clone());
        move |mut s| {
            if s.write_all(&data).is_ok() {
                let _ = s.shutdown(Shutdown::Write);
                // spillway closes a backend once it holds all it sent.
                if read_until_end(&mut s, &mut Vec::new(), 16).is_ok() {
                    released.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    });
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend.arg(),
        "--workers",
        "2",
        "--memory-buffer",
        "1MiB",
        "--max-memory",
        "16MiB",
        "--max-connections",
        "1000",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    proxy.wait_for_log("max_memory=16.0 MiB", SECS_10);
    let metrics = metrics_addr(&mut proxy);
    let rss_start = proxy.rss_kib();
    // Small windows: the kernel cannot quietly hold the bodies instead.
    let mut clients: Vec<TcpStream> = (0..CONNS)
        .map(|_| connect_small_window(proxy.addr, 16 * KIB))
        .collect();
    wait_until("spillway to take every body", SECS_60, || {
        released.load(Ordering::SeqCst) == CONNS
    });
    let rss_held = proxy.rss_kib();
    let on_disk: u64 = proxy.spill_files().iter().map(|f| f.disk).sum();
    let (_, scrape) = metrics_get(metrics, "/metrics");
    let memory = metric_sample(&scrape, "spillway_memory_bytes") as u64;
    let charged = metric_sample(&scrape, "spillway_memory_charged_bytes") as u64;
    eprintln!(
        "{CONNS} bodies of 8MiB held: {memory} bytes in buffers ({charged} charged); RSS {rss_start} KiB at start, {rss_held} KiB held; {on_disk} bytes on disk"
    );
    assert!(
        memory <= 16 * MIB as u64 && charged <= 16 * MIB as u64,
        "{memory} bytes in buffers, {charged} charged, under --max-memory 16MiB"
    );
    assert!(
        rss_held < rss_start + 24 * 1024,
        "RSS grew from {rss_start} KiB to {rss_held} KiB under --max-memory 16MiB"
    );
    assert!(
        on_disk > 400 * MIB as u64,
        "only {on_disk} bytes on disk: where are the bodies?"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        let got = read_to_eof(c, 9 * MIB);
        assert_bytes_eq(&format!("download {i}"), &got, &data);
    }
    expect_closes(&mut proxy, CONNS, SECS_30);
    proxy.wait_no_spill_files(SECS_10);
}

// ---------------------------------------------------------------------------
// Churn: resets, fds, memory

/// Test 10's transfers: what each client orders its backend connection
/// to do, in a 9-byte order (kind, cut point, transfer id) sent first.
const NORMAL: u8 = 0;
const CLIENT_RESET: u8 = 1;
const BACKEND_RESET: u8 = 2;

/// Bytes each way in a test 10 transfer.
const CHURN_SIZE: usize = 256 * KIB;

/// Test 10's payloads differ per transfer: slices of one random pool.
fn churn_payload(pool: &[u8], id: usize, upload: bool) -> &[u8] {
    let salt = if upload { 0 } else { 1_000_003 };
    let at = (id * 8191 + salt) % (pool.len() - CHURN_SIZE);
    &pool[at..at + CHURN_SIZE]
}

/// The backend side of a test 10 transfer. It writes its whole download
/// before reading the upload. Problems it sees go to `failures`.
fn churn_backend(mut s: TcpStream, pool: &[u8], failures: &Mutex<Vec<String>>) {
    let mut order = [0u8; 9];
    if s.read_exact(&mut order).is_err() {
        return; // the client reset before its order got through
    }
    let kind = order[0];
    let n = u32::from_le_bytes(order[1..5].try_into().unwrap()) as usize;
    let id = u32::from_le_bytes(order[5..9].try_into().unwrap()) as usize;
    let down = churn_payload(pool, id, false);
    let up = churn_payload(pool, id, true);
    if kind == BACKEND_RESET {
        // Reset after writing n bytes, or after the whole download (no
        // EOF) and n - SIZE bytes of the upload.
        if n < CHURN_SIZE {
            let _ = s.write_all(&down[..n]);
        } else if s.write_all(down).is_ok() {
            let _ = s.read_exact(&mut vec![0u8; n - CHURN_SIZE]);
        }
        reset(s);
        return;
    }
    let wrote = s.write_all(down).and_then(|()| s.shutdown(Shutdown::Write));
    let mut got = Vec::new();
    let end = read_until_end(&mut s, &mut got, CHURN_SIZE);
    let problem = if kind == NORMAL {
        match wrote.and(end) {
            Err(e) => Some(format!("transfer {id}: backend: {e}")),
            Ok(()) if got != up => Some(format!(
                "transfer {id}: upload of {} bytes differs at {}",
                got.len(),
                first_mismatch(&got, up)
            )),
            Ok(()) => None,
        }
    } else if n < CHURN_SIZE && wrote.is_ok() && end.is_ok() {
        // (After a failed write the reset is spent, and a read says 0.)
        Some(format!(
            "transfer {id}: the client reset after {n} upload bytes, \
             the backend saw a clean EOF after {}",
            got.len()
        ))
    } else {
        None
    };
    if let Some(problem) = problem {
        failures.lock().unwrap().push(problem);
    }
}

/// The client side of test 10's transfer `id`. Panics on what is wrong at
/// once; returns the client's address and a description if a backend
/// reset reached it as a clean EOF (judged later, with the close line).
fn churn_client(
    addr: SocketAddr,
    pool: &[u8],
    id: usize,
    kind: u8,
    n: usize,
) -> Option<(SocketAddr, String)> {
    let up = churn_payload(pool, id, true);
    let down = churn_payload(pool, id, false);
    let what = format!("transfer {id}");
    let mut c = connect(addr);
    let local = c.local_addr().expect("local_addr");
    let mut order = vec![kind];
    order.extend_from_slice(&(n as u32).to_le_bytes());
    order.extend_from_slice(&(id as u32).to_le_bytes());
    c.write_all(&order).expect("order");
    match kind {
        NORMAL => {
            c.write_all(up).expect("upload");
            shutdown_write(&c);
            let got = read_to_eof_varied(&mut c, CHURN_SIZE, SECS_30);
            assert_bytes_eq(&what, &got, down);
            None
        }
        CLIENT_RESET => {
            // Reset after sending n bytes, or after the whole upload (and
            // EOF) and n - SIZE bytes of the download.
            if n < CHURN_SIZE {
                c.write_all(&up[..n]).expect("upload");
            } else {
                c.write_all(up).expect("upload");
                shutdown_write(&c);
                let mut part = vec![0u8; n - CHURN_SIZE];
                c.read_exact(&mut part).expect("download");
                assert_bytes_eq(&what, &part, &down[..part.len()]);
            }
            reset(c);
            None
        }
        _ => {
            let mut got = Vec::new();
            let outcome = c
                .write_all(up)
                .and_then(|()| c.shutdown(Shutdown::Write))
                .and_then(|()| read_until_end(&mut c, &mut got, CHURN_SIZE));
            assert_bytes_eq(&what, &got, &down[..got.len()]);
            match outcome {
                Err(e) => {
                    let kind = e.kind();
                    assert!(
                        !matches!(kind, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
                        "{what}: nothing reached the client after the backend's reset: {e}"
                    );
                    None
                }
                Ok(()) => Some((
                    local,
                    format!(
                        "{what}: the backend reset after {n} of {CHURN_SIZE} bytes, \
                         the client got {} and a clean EOF",
                        got.len()
                    ),
                )),
            }
        }
    }
}

/// Test 10: 200 transfers (4 threads x 50) of 256KiB each way, each either
/// normal or cut by a client or backend reset after a random number of
/// bytes (seeded). Normal ones are byte-exact both ways; a cut never looks
/// complete to the other side; afterwards the proxy holds the fds it
/// started with and no spill file.
///
/// Both sides write before they read: the backend its whole download, the
/// client its whole upload, so both directions are in flight at once.
#[test]
fn resets_at_random_points_leave_no_fd_or_file_behind() {
    const WORKERS: usize = 4;
    const EACH: usize = 50;
    let pool = Arc::new(random_bytes(86, 4 * MIB));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let handled = Arc::new(AtomicUsize::new(0));
    let backend = Backend::start("backend", {
        let (pool, failures, handled) = (pool.clone(), failures.clone(), handled.clone());
        move |s| {
            churn_backend(s, &pool, &failures);
            handled.fetch_add(1, Ordering::SeqCst);
        }
    });
    // The backend half-closes after its download and then reads the
    // upload: full half-duplex, kept with --keep-half-open (by default the
    // proxy would release it at its EOF whenever the upload lagged).
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend.arg(),
        "--memory-buffer",
        "16KiB",
        "--keep-half-open",
    ]);
    let baseline = proxy.fd_count();
    let addr = proxy.addr;

    type Outcome = ([usize; 3], Vec<(SocketAddr, String)>);
    let workers: Vec<Bg<Outcome>> = (0..WORKERS)
        .map(|w| {
            let pool = pool.clone();
            spawn("client", move || {
                let mut rng = Rng::new(1000 + w as u64);
                let mut kinds = [0; 3];
                let mut cut_as_complete = Vec::new();
                for id in w * EACH..(w + 1) * EACH {
                    let kind = rng.below(3) as u8;
                    let n = rng.below(2 * CHURN_SIZE as u64) as usize;
                    kinds[kind as usize] += 1;
                    cut_as_complete.extend(churn_client(addr, &pool, id, kind, n));
                }
                (kinds, cut_as_complete)
            })
        })
        .collect();
    let mut kinds = [0; 3];
    let mut cut_as_complete = Vec::new();
    for w in workers {
        let (counts, cuts) = w.join(SECS_60);
        for (k, n) in counts.into_iter().enumerate() {
            kinds[k] += n;
        }
        cut_as_complete.extend(cuts);
    }
    let total = WORKERS * EACH;
    expect_closes(&mut proxy, total, SECS_30);
    wait_until("every backend connection to end", SECS_10, || {
        handled.load(Ordering::SeqCst) == backend.accepted()
    });
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "{failures:#?}");
    let fds = wait_fds(&proxy, baseline, SECS_10);
    assert_eq!(proxy.spill_files().len(), 0, "a spill file is left");
    assert!(proxy.temp_dir_entries().is_empty());
    let spilled = proxy
        .lines_containing(" closed client=")
        .iter()
        .map(|l| Closed::parse(l))
        .filter(|c| c.up_spilled + c.down_spilled > 0)
        .count();
    eprintln!(
        "{} normal (byte-exact), {} client resets, {} backend resets; \
         {spilled} spilled; fds {baseline} before, {fds} after",
        kinds[0], kinds[1], kinds[2]
    );
    assert!(kinds.iter().all(|&k| k >= 20), "a skewed mix: {kinds:?}");
    let cuts: Vec<String> = cut_as_complete
        .iter()
        .map(|(client, what)| {
            let closed = proxy.wait_for_close(*client, SECS_5);
            format!("{what}; the proxy: {}", closed.line)
        })
        .collect();
    assert!(
        cuts.is_empty(),
        "{} backend resets reached the client as a clean EOF, a cut stream looking complete:\n{}",
        cuts.len(),
        cuts.join("\n")
    );
}

/// Test 11: 2000 short request/response connections one after another,
/// then 500 open at once and all closed: after each phase the proxy holds
/// the fds it started with, and its RSS is back within 16MiB of where it
/// started.
#[test]
fn many_connections_return_fds_and_memory() {
    const SEQUENTIAL: usize = 2000;
    const CONCURRENT: usize = 500;
    let ends = Arc::new(EchoEnds::default());
    let backend = Backend::start("echo", {
        let ends = ends.clone();
        move |s| echo(s, &ends)
    });
    let mut proxy = Proxy::start(&["--backend", &backend.arg()]);
    let fds = proxy.fd_count();
    let rss = proxy.rss_kib();

    let mut answer = [0u8; 12];
    for i in 0..SEQUENTIAL {
        let mut c = connect(proxy.addr);
        let request = format!("request{i:05}");
        c.write_all(request.as_bytes()).expect("request");
        c.read_exact(&mut answer).expect("response");
        assert_eq!(&answer, request.as_bytes());
        bye(&mut c);
    }
    expect_closes(&mut proxy, SEQUENTIAL, SECS_30);
    let fds_sequential = wait_fds(&proxy, fds, SECS_10);
    let rss_sequential = proxy.rss_kib();

    let mut many: Vec<TcpStream> = (0..CONCURRENT).map(|_| connect(proxy.addr)).collect();
    for (i, c) in many.iter_mut().enumerate() {
        c.write_all(format!("request{i:05}").as_bytes())
            .expect("request");
    }
    for (i, c) in many.iter_mut().enumerate() {
        c.read_exact(&mut answer).expect("response");
        assert_eq!(answer, *format!("request{i:05}").as_bytes());
    }
    backend.wait_accepted(SEQUENTIAL + CONCURRENT, SECS_10);
    let fds_open = proxy.fd_count();
    let rss_open = proxy.rss_kib();
    for c in &many {
        shutdown_write(c);
    }
    for c in &mut many {
        assert!(read_to_eof(c, 16).is_empty());
    }
    expect_closes(&mut proxy, SEQUENTIAL + CONCURRENT, SECS_30);
    let fds_after = wait_fds(&proxy, fds, SECS_10);
    let rss_after = proxy.rss_kib();
    eprintln!(
        "fds: {fds} at start, {fds_sequential} after {SEQUENTIAL} sequential, {fds_open} with {CONCURRENT} open, {fds_after} after; \
         RSS: {rss} KiB at start, {rss_sequential} KiB after {SEQUENTIAL} sequential, {rss_open} KiB with {CONCURRENT} open, {rss_after} KiB after"
    );
    assert_eq!(
        ends.errors.load(Ordering::SeqCst),
        0,
        "a backend saw a reset"
    );
    assert!(
        rss_after <= rss + 16 * 1024,
        "RSS {rss_after} KiB after the connections closed, {rss} KiB at start"
    );
}

// ---------------------------------------------------------------------------
// Signals

/// Test 12: SIGHUP reopens the log file at its path, as logrotate expects:
/// after the old file is renamed away, a new one appears, and later lines
/// (the next connection's close) go there.
#[test]
fn sighup_reopens_the_log_file() {
    let backend = Backend::start("holding", greet_and_hold);
    let mut proxy = Proxy::start(&["--backend", &backend.arg()]);
    let rotated = proxy.log_path.with_extension("1");
    fs::rename(&proxy.log_path, &rotated).expect("rotate the log");
    assert!(!proxy.log_path.exists());
    proxy.signal(libc::SIGHUP);
    let line = proxy.wait_for_log("received SIGHUP: log file reopened", SECS_10);
    assert!(line.contains(" INFO "), "{line}");

    let mut c = connect(proxy.addr);
    let local = c.local_addr().unwrap();
    expect_greeting(&mut c, SECS_10);
    bye(&mut c);
    let closed = proxy.wait_for_close(local, SECS_10);
    assert_eq!(closed.reason, "done", "{}", closed.line);
    let old = fs::read_to_string(&rotated).expect("the rotated log");
    assert!(
        old.contains(" INFO listening on "),
        "the old file keeps the old lines"
    );
    assert!(!old.contains("log file reopened"), "{old}");
    assert!(
        !old.contains(&format!("client={local}")),
        "a line after the reopen went to the old file:\n{old}"
    );
}

/// Four workers logging at once, each writing its turn's lines in one go:
/// every line of the log is whole (a timestamp, a level, a message) and
/// none is lost: one close line per connection, and with a SIGHUP and a
/// rotation in the middle, the two files together still have them all.
#[test]
fn log_lines_are_whole_and_none_is_lost_with_four_workers() {
    const CLIENTS: usize = 8;
    const EACH: usize = 60;
    let backend = Backend::start("echo", |mut s| {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let proxy = Proxy::start(&["--backend", &backend.arg(), "--workers", "4"]);
    let addr = proxy.addr;
    let rotated = proxy.log_path.with_extension("1");
    let clients: Vec<Bg<Vec<SocketAddr>>> = (0..CLIENTS)
        .map(|_| {
            spawn("client", move || {
                (0..EACH)
                    .map(|_| {
                        let mut c = connect(addr);
                        c.write_all(b"ping").expect("write");
                        shutdown_write(&c);
                        assert_eq!(read_to_eof(&mut c, 64), b"ping");
                        c.local_addr().unwrap()
                    })
                    .collect()
            })
        })
        .collect();
    // Rotate while the clients run.
    thread::sleep(Duration::from_millis(50));
    fs::rename(&proxy.log_path, &rotated).expect("rotate");
    proxy.signal(libc::SIGHUP);
    let mut addrs = Vec::new();
    for c in clients {
        addrs.extend(c.join(SECS_60));
    }
    let total = CLIENTS * EACH;
    wait_until("every close line", SECS_30, || {
        let old = fs::read_to_string(&rotated).unwrap_or_default();
        let new = fs::read_to_string(&proxy.log_path).unwrap_or_default();
        old.matches(" closed client=").count() + new.matches(" closed client=").count() >= total
    });
    let old = fs::read_to_string(&rotated).expect("rotated log");
    let new = fs::read_to_string(&proxy.log_path).expect("new log");
    let mut closes = 0;
    for line in old.lines().chain(new.lines()) {
        let (stamp, rest) = line.split_at(line.find(' ').unwrap_or(0));
        let whole = stamp.len() == 24
            && stamp.ends_with('Z')
            && stamp.as_bytes()[10] == b'T'
            && [" INFO ", " WARN ", " ERROR ", " DEBUG "]
                .iter()
                .any(|l| rest.starts_with(l));
        assert!(whole, "a cut or mixed line: {line:?}");
        if line.contains(" closed client=") {
            closes += 1;
        }
    }
    assert_eq!(closes, total, "one close line per connection, none lost");
    for a in addrs {
        let needle = format!("client={a} ");
        assert!(
            old.contains(&needle) || new.contains(&needle),
            "no close line for {a}"
        );
    }
}

/// An idle connection whose client has already sent EOF, to a backend that
/// holds it and says nothing: at `--idle-timeout` both sockets close at
/// once (no lingering for a backend that is not sending), and the sweep
/// says so once. (It used to keep the backend socket up to 2s more and log
/// "idle for" again at every sweep meanwhile; the soak test found it.)
#[test]
fn an_idle_connection_closes_at_once_and_is_logged_once() {
    let (listener, backend_addr) = listen();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let backend = spawn("holding backend", move || {
        let mut s = accept_within(&listener, SECS_10);
        read_until_end(&mut s, &mut Vec::new(), 1024).expect("the client's EOF");
        // Hold the connection, silent, until the test is done.
        let _ = done_rx.recv_timeout(SECS_30);
    });
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--idle-timeout",
        "200ms",
    ]);
    let c = connect(proxy.addr);
    let local = c.local_addr().unwrap();
    shutdown_write(&c);
    let closed = proxy.wait_for_close(local, SECS_10);
    assert_eq!(closed.reason, "idle timeout", "{}", closed.line);
    assert!(
        closed.duration < 1.5,
        "closed {}s after it began: it lingered past the idle timeout",
        closed.duration
    );
    let idle_lines = proxy.lines_containing(" idle for ");
    assert_eq!(idle_lines.len(), 1, "{idle_lines:#?}");
    done_tx.send(()).expect("backend alive");
    backend.join(SECS_10);
}
