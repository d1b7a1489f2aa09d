//! Faults, limits and shutdown through the real binary: graceful and cut
//! shutdowns, --max-connections, --idle-timeout, idle CPU, fd exhaustion,
//! a full disk, --max-disk, resets at random points, fd and memory
//! returning to their baseline, SIGHUP.

mod common;

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const SECS_10: Duration = Duration::from_secs(10);
const SECS_30: Duration = Duration::from_secs(30);

/// A backend that greets each connection with "hi", then holds it until
/// the client's EOF. Counts accepted connections; stops when dropped.
struct Holding {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Holding {
    fn start() -> Holding {
        let (listener, addr) = listen();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (accepted.clone(), stop.clone());
        thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !halt.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        thread::spawn(move || {
                            s.set_nonblocking(false).unwrap();
                            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                            if s.write_all(b"hi").is_ok() {
                                let mut sink = [0u8; 4096];
                                while let Ok(n) = s.read(&mut sink) {
                                    if n == 0 {
                                        break;
                                    }
                                }
                            }
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Holding {
            addr,
            accepted,
            stop,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn wait_accepted(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.accepted() < n {
            assert!(
                Instant::now() < deadline,
                "backend accepted {} of {n} within {timeout:?}",
                self.accepted()
            );
            thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Read the backend's 2-byte greeting.
fn greeted(client: &mut TcpStream) {
    let mut hi = [0u8; 2];
    client.read_exact(&mut hi).expect("greeting");
    assert_eq!(&hi, b"hi");
}

/// A backend that writes `data` to each of `count` connections, then
/// closes its write half and waits for the client's EOF.
fn sending_backend(data: Arc<Vec<u8>>, count: usize) -> (SocketAddr, Bg<()>) {
    let (listener, addr) = listen();
    let bg = spawn("sender", move || {
        let mut done = Vec::new();
        for _ in 0..count {
            let s = accept_within(&listener, SECS_30);
            let data = data.clone();
            done.push(thread::spawn(move || {
                let mut s = s;
                if s.write_all(&data).is_ok() {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    let mut sink = [0u8; 64];
                    while let Ok(n) = s.read(&mut sink) {
                        if n == 0 {
                            break;
                        }
                    }
                }
            }));
        }
        for t in done {
            t.join().expect("sender thread");
        }
    });
    (addr, bg)
}

fn expect_reset_or_short(client: &mut TcpStream, full: usize) {
    let mut got = 0;
    let mut buf = vec![0u8; 256 * KIB];
    loop {
        match client.read(&mut buf) {
            Ok(0) => {
                assert!(got < full, "a cut transfer arrived whole");
                panic!("a cut transfer ended with a clean EOF after {got} bytes");
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("after {got} bytes: {}", explain(&e)),
        }
    }
}

/// SIGTERM while a slow client is being fed from disk: the listener closes
/// at once, the transfer finishes byte-exact, the proxy exits 0.
#[test]
fn graceful_shutdown_lets_a_transfer_finish() {
    let data = Arc::new(random_bytes(81, 16 * MIB));
    let (backend_addr, backend) = sending_backend(data.clone(), 1);
    let mut proxy = Proxy::start(&["--backend", &backend_addr.to_string()]);
    let mut client = connect(proxy.addr);
    shutdown_write(&client);
    let mut got = vec![0u8; MIB];
    client.read_exact(&mut got).expect("first MiB");
    proxy.wait_for_log("backend->client spilling to disk", SECS_10);
    proxy.signal(libc::SIGTERM);
    proxy.wait_for_log("received SIGTERM: no longer accepting", SECS_10);
    match TcpStream::connect_timeout(&proxy.addr, Duration::from_secs(2)) {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("a new client was accepted during shutdown"),
    }
    // Read the rest at a modest pace: the shutdown must wait for it.
    let mut buf = vec![0u8; 64 * KIB];
    loop {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("after {} bytes: {}", got.len(), explain(&e)),
        }
        if got.len() % (4 * MIB) < 64 * KIB {
            thread::sleep(Duration::from_millis(20));
        }
    }
    assert_bytes_eq("a transfer in flight at SIGTERM", &got, &data);
    let status = proxy.wait_exit(SECS_10);
    assert!(status.success(), "{status}");
    proxy.wait_for_log(
        "shutdown complete: 1 connection(s) finished, 0 closed while quiet, 0 cut",
        SECS_10,
    );
    backend.join(SECS_10);
}

/// A second signal does not wait for anything.
#[test]
fn a_second_signal_exits_at_once() {
    let data = Arc::new(random_bytes(82, 64 * MIB));
    let (backend_addr, _backend) = sending_backend(data, 1);
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--shutdown-timeout",
        "60s",
    ]);
    let client = connect(proxy.addr);
    shutdown_write(&client);
    proxy.wait_for_log("backend->client spilling to disk", SECS_10);
    proxy.signal(libc::SIGTERM);
    proxy.wait_for_log("received SIGTERM: no longer accepting", SECS_10);
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    proxy.wait_for_log(
        "received SIGTERM again: exiting now, cutting 1 connection(s)",
        SECS_10,
    );
    drop(client);
}

/// Past --shutdown-timeout what is left is cut, and the cut shows.
#[test]
fn shutdown_timeout_cuts_what_is_left() {
    let data = Arc::new(random_bytes(83, 64 * MIB));
    let (backend_addr, _backend) = sending_backend(data.clone(), 1);
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--shutdown-timeout",
        "500ms",
    ]);
    let mut client = connect(proxy.addr);
    shutdown_write(&client);
    proxy.wait_for_log("backend->client spilling to disk", SECS_10);
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(SECS_10);
    assert!(status.success(), "{status}");
    let line = proxy.wait_for_log("shutdown complete:", SECS_10);
    assert!(line.contains("1 cut at the timeout"), "{line}");
    expect_reset_or_short(&mut client, data.len());
}

/// Beyond --max-connections clients wait in the backlog, and are taken
/// when a connection closes.
#[test]
fn max_connections_keeps_clients_in_the_backlog() {
    let backend = Holding::start();
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend.addr.to_string(),
        "--max-connections",
        "2",
    ]);
    let mut first = connect(proxy.addr);
    let mut second = connect(proxy.addr);
    greeted(&mut first);
    greeted(&mut second);
    // The kernel completes the third handshake; the proxy does not accept.
    let mut third = connect(proxy.addr);
    proxy.wait_for_log("--max-connections 2 reached", SECS_10);
    let watch = Instant::now() + Duration::from_millis(300);
    while Instant::now() < watch {
        assert_eq!(
            backend.accepted(),
            2,
            "a third connection reached the backend"
        );
        thread::sleep(Duration::from_millis(10));
    }
    // One leaves: the third is served.
    shutdown_write(&second);
    read_to_eof(&mut second, 16);
    greeted(&mut third);
    proxy.wait_for_log("below --max-connections 2 again: accepting", SECS_10);
    assert_eq!(backend.accepted(), 3);
    drop(first);
}

/// Nothing moving for --idle-timeout: closed, with a clean EOF since
/// nothing was held. A connection that keeps talking stays.
#[test]
fn idle_connections_are_closed_and_busy_ones_kept() {
    let stop = Arc::new(AtomicBool::new(false));
    let (listener, echo_addr) = listen();
    let echo = {
        let stop = stop.clone();
        spawn("echo", move || {
            listener.set_nonblocking(true).unwrap();
            let mut threads = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => threads.push(thread::spawn(move || {
                        s.set_nonblocking(false).unwrap();
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    })),
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        })
    };
    let mut proxy = Proxy::start(&[
        "--backend",
        &echo_addr.to_string(),
        "--idle-timeout",
        "300ms",
    ]);
    let mut idle = connect(proxy.addr);
    let idle_addr = idle.local_addr().unwrap();
    let mut busy = connect(proxy.addr);
    let busy_addr = busy.local_addr().unwrap();
    let until = Instant::now() + Duration::from_millis(1200);
    let mut buf = [0u8; 4];
    while Instant::now() < until {
        busy.write_all(b"ping").unwrap();
        busy.read_exact(&mut buf).expect("echo while busy");
        thread::sleep(Duration::from_millis(100));
    }
    let closed = proxy.wait_for_close(idle_addr, SECS_10);
    assert_eq!(closed.reason, "idle timeout", "{}", closed.line);
    idle.set_read_timeout(Some(SECS_10)).unwrap();
    assert_eq!(
        idle.read(&mut buf).expect("clean close"),
        0,
        "EOF, not a reset"
    );
    assert!(
        proxy
            .lines_containing(&format!(" closed client={busy_addr} "))
            .is_empty(),
        "the busy connection was closed"
    );
    stop.store(true, Ordering::SeqCst);
    drop(busy);
    echo.join(SECS_10);
}

/// 100 open, silent connections cost no CPU: the loop sleeps in epoll.
#[test]
fn idle_connections_cost_no_cpu() {
    let backend = Holding::start();
    let proxy = Proxy::start(&["--backend", &backend.addr.to_string()]);
    let clients: Vec<TcpStream> = (0..100).map(|_| connect(proxy.addr)).collect();
    backend.wait_accepted(100, SECS_10);
    thread::sleep(Duration::from_millis(200)); // let the greetings settle
    let before = proxy.cpu_ns();
    thread::sleep(Duration::from_secs(2));
    let used = proxy.cpu_ns() - before;
    eprintln!("idle CPU: {used} ns over 2 s with 100 connections");
    assert!(used < 10_000_000, "{used} ns of CPU while idle");
    drop(clients);
}

/// Out of file descriptors: accepting pauses (one ERROR per burst, no
/// spin), and every client waiting in the backlog is served once fds
/// return.
#[test]
fn fd_exhaustion_pauses_accepting_without_spinning() {
    let backend = Holding::start();
    let mut proxy = Proxy::start_with(
        &["--backend", &backend.addr.to_string()],
        Launch {
            max_open_files: Some(48),
            ..Launch::default()
        },
    );
    let mut clients: Vec<TcpStream> = (0..40).map(|_| connect(proxy.addr)).collect();
    proxy.wait_for_log("pausing accepts until a connection closes", SECS_10);
    let errors_before = proxy.lines_containing("accept on").len();
    let before = proxy.cpu_ns();
    thread::sleep(Duration::from_secs(1));
    let used = proxy.cpu_ns() - before;
    let served = backend.accepted();
    assert!(served < 40, "all 40 fitted: the limit did not bite");
    assert_eq!(
        proxy.lines_containing("accept on").len(),
        errors_before,
        "accept errors logged again while still out of fds: once per burst"
    );
    eprintln!("CPU while out of fds: {used} ns over 1 s; {served} of 40 served");
    assert!(used < 200_000_000, "{used} ns of CPU in 1 s: spinning");
    proxy.assert_running();
    // Clients leave one by one, in the order they came; each that leaves
    // frees fds for those still waiting in the backlog: every one of the
    // 40 must get its greeting.
    for c in clients.iter_mut() {
        greeted(c);
        shutdown_write(c);
        read_to_eof(c, 16);
    }
    assert_eq!(backend.accepted(), 40);
    // At most one line per burst: a burst ends when a connection closes.
    let errors = proxy.lines_containing("accept on").len();
    assert!(errors <= 41, "{errors} accept errors logged for 40 clients");
    drop(clients);
}

/// Unmounts a tmpfs on drop, even when the test fails.
struct Mounted(PathBuf);

impl Mounted {
    fn tmpfs(size: &str) -> Option<Mounted> {
        let dir =
            std::env::temp_dir().join(format!("spillway-tmpfs-{}-{}", std::process::id(), size));
        fs::create_dir_all(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            Some(Mounted(dir))
        } else {
            let _ = fs::remove_dir(&dir);
            None
        }
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = fs::remove_dir(&self.0);
    }
}

/// The spill directory fills up: the direction holds what it has and
/// stops reading its backend; nothing is lost.
#[test]
fn a_full_disk_falls_back_to_backpressure_and_loses_nothing() {
    let Some(disk) = Mounted::tmpfs("4m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root and mount rights)");
        return;
    };
    let data = Arc::new(random_bytes(84, 32 * MIB));
    let (backend_addr, backend) = sending_backend(data.clone(), 1);
    let mut proxy = Proxy::start_with(
        &["--backend", &backend_addr.to_string()],
        Launch {
            temp_dir: Some(disk.path().to_path_buf()),
            ..Launch::default()
        },
    );
    let mut client = connect(proxy.addr);
    shutdown_write(&client);
    let warn = proxy.wait_for_log("cannot spill to", SECS_10);
    assert!(warn.contains("os error 28"), "{warn}");
    let got = read_to_eof_varied(&mut client, data.len(), SECS_30);
    assert_bytes_eq("through a full disk", &got, &data);
    backend.join(SECS_10);
    let closed = proxy.wait_for_close(client.local_addr().unwrap(), SECS_10);
    assert_eq!(closed.reason, "done", "{}", closed.line);
    proxy.wait_no_spill_files(SECS_10);
}

/// Two stalled downloads share --max-disk 1MiB: together their spill files
/// never hold more; both arrive whole.
#[test]
fn max_disk_bounds_all_spill_files_together() {
    let data = Arc::new(random_bytes(85, 16 * MIB));
    let (backend_addr, backend) = sending_backend(data.clone(), 2);
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--max-disk",
        "1MiB",
        "--max-spill",
        "16MiB",
    ]);
    let mut a = connect(proxy.addr);
    let mut b = connect(proxy.addr);
    shutdown_write(&a);
    shutdown_write(&b);
    proxy.wait_for_log("(--max-disk reached)", SECS_10);
    let until = Instant::now() + Duration::from_millis(300);
    let mut peak = 0;
    while Instant::now() < until {
        let disk: u64 = proxy.spill_files().iter().map(|f| f.disk).sum();
        peak = peak.max(disk);
        assert!(disk <= MIB as u64, "spill files hold {disk} bytes");
        thread::sleep(Duration::from_millis(10));
    }
    eprintln!("peak disk use under --max-disk 1MiB: {peak} bytes");
    assert!(peak > 0, "nothing spilled");
    let reader = thread::spawn(move || read_to_eof_varied(&mut b, 16 * MIB, SECS_30));
    let got_a = read_to_eof_varied(&mut a, data.len(), SECS_30);
    let got_b = reader.join().expect("reader");
    assert_bytes_eq("download a", &got_a, &data);
    assert_bytes_eq("download b", &got_b, &data);
    backend.join(SECS_10);
    proxy.wait_for_closes(2, SECS_10);
    proxy.wait_no_spill_files(SECS_10);
}

/// 200 transfers, some cut by a client or backend reset at a random
/// point: every other one is byte-exact, and the proxy ends with the fds
/// it started with and no spill file.
#[test]
fn resets_at_random_points_leave_no_fd_or_file_behind() {
    const TRANSFERS: usize = 200;
    const SIZE: usize = 256 * KIB;
    let data = Arc::new(random_bytes(86, SIZE));
    let (listener, backend_addr) = listen();
    // The backend reads a one-byte order, then sends SIZE bytes, resetting
    // after `n` KiB when the order says so.
    let backend = spawn("backend", move || {
        let mut handlers = Vec::new();
        for _ in 0..TRANSFERS {
            let mut s = accept_within(&listener, SECS_30);
            let data = data.clone();
            handlers.push(thread::spawn(move || {
                let mut order = [0u8; 1];
                if s.read_exact(&mut order).is_err() {
                    return;
                }
                let cut = order[0] as usize * KIB;
                if cut > 0 {
                    let _ = s.write_all(&data[..cut]);
                    reset(s);
                } else {
                    let _ = s.write_all(&data);
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    let mut sink = [0u8; 64];
                    while let Ok(n) = s.read(&mut sink) {
                        if n == 0 {
                            break;
                        }
                    }
                }
            }));
        }
        for h in handlers {
            let _ = h.join();
        }
    });
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--memory-buffer",
        "16KiB",
    ]);
    let baseline = proxy.fd_count();
    let expected = random_bytes(86, SIZE);
    let expected = Arc::new(expected);
    let addr = proxy.addr;
    let workers: Vec<Bg<usize>> = (0..4u64)
        .map(|w| {
            let expected = expected.clone();
            spawn("client", move || {
                let mut rng = Rng::new(1000 + w);
                let mut exact = 0;
                for _ in 0..TRANSFERS / 4 {
                    let mut c = connect(addr);
                    let kind = rng.below(3);
                    let cut = 1 + rng.below(200) as u8;
                    match kind {
                        // A normal transfer.
                        0 => {
                            c.write_all(&[0]).unwrap();
                            shutdown_write(&c);
                            let got = read_to_eof_varied(&mut c, SIZE, SECS_30);
                            assert_bytes_eq("an uncut transfer", &got, &expected);
                            exact += 1;
                        }
                        // The backend resets after `cut` KiB.
                        1 => {
                            c.write_all(&[cut]).unwrap();
                            let mut buf = vec![0u8; 64 * KIB];
                            while let Ok(n) = c.read(&mut buf) {
                                if n == 0 {
                                    panic!("a backend reset reached the client as EOF");
                                }
                            }
                        }
                        // The client resets after reading `cut` KiB.
                        _ => {
                            c.write_all(&[0]).unwrap();
                            let mut left = cut as usize * KIB;
                            let mut buf = vec![0u8; 16 * KIB];
                            while left > 0 {
                                match c.read(&mut buf[..left.min(16 * KIB)]) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => left -= n,
                                }
                            }
                            reset(c);
                        }
                    }
                }
                exact
            })
        })
        .collect();
    let exact: usize = workers
        .into_iter()
        .map(|w| w.join(Duration::from_secs(60)))
        .sum();
    backend.join(Duration::from_secs(60));
    proxy.wait_for_closes(TRANSFERS, SECS_30);
    assert!(exact > 20, "only {exact} normal transfers");
    let deadline = Instant::now() + SECS_10;
    while proxy.fd_count() != baseline {
        assert!(
            Instant::now() < deadline,
            "fds: {} now, {baseline} before",
            proxy.fd_count()
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert!(proxy.spill_files().is_empty());
    eprintln!("{exact} exact transfers of {TRANSFERS}; fds back to {baseline}");
}

/// 2000 short connections one after another, then 500 at once: the fd
/// count returns to its baseline after each, and RSS stays near it.
#[test]
fn many_connections_return_fds_and_memory() {
    let backend = Holding::start();
    let mut proxy = Proxy::start(&["--backend", &backend.addr.to_string()]);
    let fds = proxy.fd_count();
    let rss = proxy.rss_kib();
    for _ in 0..2000 {
        let mut c = connect(proxy.addr);
        greeted(&mut c);
        shutdown_write(&c);
        read_to_eof(&mut c, 16);
    }
    proxy.wait_for_closes(2000, SECS_30);
    assert_eq!(
        proxy.fd_count(),
        fds,
        "fds after 2000 sequential connections"
    );
    let mut many: Vec<TcpStream> = (0..500).map(|_| connect(proxy.addr)).collect();
    for c in &mut many {
        greeted(c);
    }
    let rss_peak = proxy.rss_kib();
    for c in &many {
        shutdown_write(c);
    }
    for c in &mut many {
        read_to_eof(c, 16);
    }
    proxy.wait_for_closes(2500, SECS_30);
    let deadline = Instant::now() + SECS_10;
    while proxy.fd_count() != fds {
        assert!(
            Instant::now() < deadline,
            "fds: {} now, {fds} before",
            proxy.fd_count()
        );
        thread::sleep(Duration::from_millis(10));
    }
    let rss_after = proxy.rss_kib();
    eprintln!("RSS: {rss} KiB at start, {rss_peak} KiB with 500 open, {rss_after} KiB after");
    assert!(
        rss_after <= rss + 16 * 1024,
        "RSS {rss_after} KiB after, {rss} KiB before"
    );
}

/// SIGHUP reopens the log file at its path (logrotate renames the old one).
#[test]
fn sighup_reopens_the_log_file() {
    let backend = Holding::start();
    let mut proxy = Proxy::start(&["--backend", &backend.addr.to_string()]);
    let rotated = proxy.log_path.with_extension("1");
    fs::rename(&proxy.log_path, &rotated).expect("rotate");
    proxy.signal(libc::SIGHUP);
    proxy.wait_for_log("received SIGHUP: log file reopened", SECS_10);
    let mut c = connect(proxy.addr);
    let local = c.local_addr().unwrap();
    greeted(&mut c);
    shutdown_write(&c);
    read_to_eof(&mut c, 16);
    proxy.wait_for_close(local, SECS_10);
    let old = fs::read_to_string(&rotated).unwrap();
    assert!(
        old.contains("listening on"),
        "the old file keeps the old lines"
    );
    assert!(
        !old.contains(&format!("client={local}")),
        "new lines went to the old file"
    );
}
