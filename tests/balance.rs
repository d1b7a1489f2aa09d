//! Backend pools through the real binary: how connections are spread,
//! connect failover (refused and blackholed backends), down/up accounting,
//! all backends down, and active health checks.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const SECS_10: Duration = Duration::from_secs(10);
const SECS_30: Duration = Duration::from_secs(30);

/// A backend that greets every connection with its name, then waits for the
/// client's EOF before closing: it holds the connection as long as the
/// client does, which is what least-conn counts.
struct Named {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<Bg<()>>,
}

impl Named {
    fn start(name: &'static str) -> Named {
        let (listener, addr) = listen();
        Named::serve(name, listener, addr)
    }

    /// Start on `addr` (a port this test released earlier).
    fn start_on(name: &'static str, addr: SocketAddr) -> Named {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("rebind {addr}: {e}"));
        Named::serve(name, listener, addr)
    }

    fn serve(name: &'static str, listener: TcpListener, addr: SocketAddr) -> Named {
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (accepted.clone(), stop.clone());
        let thread = spawn(name, move || {
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !halt.load(Ordering::SeqCst) {
                assert!(
                    Instant::now() < deadline,
                    "backend {name} never told to stop"
                );
                match listener.accept() {
                    Ok((stream, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        thread::spawn(move || greet_and_hold(stream, name));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        });
        Named {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Stop accepting and release the port (connections already accepted
    /// go on until their clients leave).
    fn stop(mut self) -> SocketAddr {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join(SECS_10);
        }
        self.addr
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn greet_and_hold(mut stream: TcpStream, name: &str) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(SECS_30)).unwrap();
    // Peers that vanish are the clients' business here, not a failure.
    if stream.write_all(name.as_bytes()).is_ok() {
        let mut sink = [0u8; 1024];
        while let Ok(n) = stream.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    }
}

/// Connect, half-close, read the backend's name to EOF.
fn ask(proxy: SocketAddr) -> String {
    let mut client = connect(proxy);
    shutdown_write(&client);
    String::from_utf8(read_to_eof(&mut client, 64)).unwrap()
}

/// Every prefix of `seq` gives each backend its weighted share, within one.
fn assert_smooth(seq: &[String], names: &[&str], weights: &[u32]) {
    let total: u32 = weights.iter().sum();
    let mut counts = vec![0u32; names.len()];
    for (k, got) in seq.iter().enumerate() {
        let i = names
            .iter()
            .position(|n| n == got)
            .unwrap_or_else(|| panic!("unknown backend {got:?}"));
        counts[i] += 1;
        for (j, &w) in weights.iter().enumerate() {
            let ideal = (k + 1) as f64 * f64::from(w) / f64::from(total);
            assert!(
                (f64::from(counts[j]) - ideal).abs() <= 1.0,
                "after {} connections {} has {} (ideal {ideal:.2}); sequence so far: {:?}",
                k + 1,
                names[j],
                counts[j],
                &seq[..=k]
            );
        }
    }
}

fn distribution(weights: &[u32]) {
    let names = ["A", "B", "C"];
    let backends: Vec<Named> = names.iter().map(|n| Named::start(n)).collect();
    let args: Vec<String> = backends
        .iter()
        .zip(weights)
        .flat_map(|(b, w)| ["--backend".to_string(), format!("{},weight={w}", b.addr)])
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = Proxy::start(&args);
    let seq: Vec<String> = (0..300).map(|_| ask(proxy.addr)).collect();
    assert_smooth(&seq, &names, weights);
    let total: u32 = weights.iter().sum();
    for (b, &w) in backends.iter().zip(weights) {
        assert_eq!(b.accepted(), (300 * w / total) as usize);
    }
}

#[test]
fn round_robin_equal_weights_is_smooth_over_300_connections() {
    distribution(&[1, 1, 1]);
}

#[test]
fn round_robin_weights_1_2_3_are_smooth_over_300_connections() {
    distribution(&[1, 2, 3]);
}

/// Two backends; B's only connection ends while A's stays open: least-conn
/// sends the next two to B (round-robin would alternate).
#[test]
fn least_conn_sends_new_connections_to_the_less_busy_backend() {
    let a = Named::start("A");
    let b = Named::start("B");
    let mut proxy = Proxy::start(&[
        "--backend",
        &a.addr.to_string(),
        "--backend",
        &b.addr.to_string(),
        "--balance",
        "least-conn",
        // One worker: two workers picking at the same instant may both see
        // the same counts (least-conn across workers is as exact as its
        // reads; this test is about the strategy).
        "--workers",
        "1",
    ]);
    // Two clients that stay: one on each backend.
    let mut first = connect(proxy.addr);
    let mut second = connect(proxy.addr);
    let name = |s: &mut TcpStream| {
        let mut buf = [0u8; 1];
        s.read_exact(&mut buf).expect("greeting");
        String::from_utf8(buf.to_vec()).unwrap()
    };
    let mut held = [(name(&mut first), first), (name(&mut second), second)];
    held.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!([&held[0].0[..], &held[1].0[..]], ["A", "B"]);
    // B's client leaves; wait until the proxy has closed that connection.
    let [(_, on_a), (_, on_b)] = held;
    let b_client = on_b.local_addr().unwrap();
    shutdown_write(&on_b);
    let mut on_b = on_b;
    read_to_eof(&mut on_b, 64);
    proxy.wait_for_close(b_client, SECS_10);
    // A holds one, B none: both new connections go to B, one at a time.
    let mut third = connect(proxy.addr);
    assert_eq!(name(&mut third), "B");
    assert_eq!(
        ask(proxy.addr),
        "A",
        "B holds one now too: a tie, and the rotation moves on"
    );
    drop(on_a);
}

/// A listener whose accept queue is full: SYNs to it are dropped, so a
/// connect neither succeeds nor fails until it times out. Returns the
/// listener and the connection that fills its queue (keep both alive).
fn blackhole() -> (socket2::Socket, TcpStream, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let filler = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("fill the queue");
    // Make sure it really is a black hole on this kernel.
    let probe = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
    assert!(
        probe.as_ref().err().map(|e| e.kind()) == Some(io::ErrorKind::TimedOut),
        "a full accept queue did not swallow the SYN: {probe:?}"
    );
    (socket, filler, addr)
}

/// An echo backend: reads a whole request to EOF, writes it back, closes.
/// Counts connections.
fn echo_backend(stop: Arc<AtomicBool>) -> (SocketAddr, Bg<usize>) {
    let (listener, addr) = listen();
    let bg = spawn("echo", move || {
        listener.set_nonblocking(true).unwrap();
        let mut served = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "echo backend never told to stop");
            match listener.accept() {
                Ok((mut s, _)) => {
                    served += 1;
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(SECS_30)).unwrap();
                    let mut request = Vec::new();
                    s.read_to_end(&mut request).expect("read request");
                    s.write_all(&request).expect("echo");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        served
    });
    (addr, bg)
}

/// Send `payload` and read the echo back; byte-exact.
fn echo_through(proxy: SocketAddr, payload: &[u8]) {
    let mut client = connect(proxy);
    send_and_shut(&mut client, payload);
    let back = read_to_eof_varied(&mut client, payload.len(), SECS_30);
    assert_bytes_eq("echo", &back, payload);
}

/// One refused backend among three: every client is served, byte-exact,
/// and the refused one is named in the log.
#[test]
fn a_refused_backend_is_skipped_without_the_client_noticing() {
    let stop = Arc::new(AtomicBool::new(false));
    let (live1, e1) = echo_backend(stop.clone());
    let dead = dead_addr();
    let (live2, e2) = echo_backend(stop.clone());
    let mut proxy = Proxy::start(&[
        "--backend",
        &live1.to_string(),
        "--backend",
        &dead.to_string(),
        "--backend",
        &live2.to_string(),
        "--max-fails",
        "1000",
    ]);
    for i in 0..12 {
        echo_through(proxy.addr, &random_bytes(i, 64 * KIB + i as usize));
    }
    stop.store(true, Ordering::SeqCst);
    assert_eq!(e1.join(SECS_10) + e2.join(SECS_10), 12);
    proxy.wait_for_log(&format!("backend {dead}: connection refused"), SECS_10);
    assert!(
        proxy
            .lines_containing("no backend could be reached")
            .is_empty()
    );
}

/// The first backend swallows SYNs. A client sends 1MiB and half-closes at
/// once, while spillway is still waiting on that connect; after
/// --connect-timeout it moves to the next backend, which gets all of it.
#[test]
fn a_blackholed_backend_is_abandoned_after_connect_timeout_and_nothing_is_lost() {
    let (_hole, _filler, hole) = blackhole();
    let stop = Arc::new(AtomicBool::new(false));
    let (live, echo) = echo_backend(stop.clone());
    let mut proxy = Proxy::start(&[
        "--backend",
        &hole.to_string(),
        "--backend",
        &live.to_string(),
        "--connect-timeout",
        "400ms",
        "--memory-buffer",
        "64KiB",
    ]);
    let payload = random_bytes(7, MIB);
    let started = Instant::now();
    echo_through(proxy.addr, &payload);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "answered before the connect timeout: the black hole was not tried first"
    );
    stop.store(true, Ordering::SeqCst);
    assert_eq!(echo.join(SECS_10), 1);
    proxy.wait_for_log(
        &format!("backend {hole}: connect timed out after 400ms"),
        SECS_10,
    );
    let line = proxy.wait_for_log("client->backend spilling to disk", SECS_10);
    assert!(line.contains("[conn 1]"), "{line}");
}

/// A backend that dies is marked down after --max-fails, then skipped; when
/// it returns, one trial after --fail-timeout brings it back.
#[test]
fn a_dead_backend_goes_down_is_skipped_and_comes_back() {
    let a = Named::start("A");
    let b = Named::start("B");
    let mut proxy = Proxy::start(&[
        "--backend",
        &a.addr.to_string(),
        "--backend",
        &b.addr.to_string(),
        "--max-fails",
        "2",
        "--fail-timeout",
        "1s",
    ]);
    assert_eq!(ask(proxy.addr), "A");
    assert_eq!(ask(proxy.addr), "B");
    let b_addr = b.stop();
    // Each connection now goes to A, two of them after a refused try at B.
    for _ in 0..4 {
        assert_eq!(ask(proxy.addr), "A");
    }
    let refused = format!("backend {b_addr}: connection refused");
    proxy.wait_for_log(
        &format!("backend {b_addr} marked down after 2 failed connects"),
        SECS_10,
    );
    let tries_when_down = proxy.lines_containing(&refused).len();
    assert_eq!(
        tries_when_down, 2,
        "tried again before --max-fails was reached or after"
    );
    for _ in 0..6 {
        assert_eq!(ask(proxy.addr), "A");
    }
    assert_eq!(
        proxy.lines_containing(&refused).len(),
        tries_when_down,
        "a down backend was tried before its fail timeout"
    );
    // B comes back. Within a bounded number of connections spread over a
    // few seconds, the trial after --fail-timeout lands on it.
    let b = Named::start_on("B", b_addr);
    let deadline = Instant::now() + SECS_10;
    while b.accepted() == 0 {
        assert!(Instant::now() < deadline, "B was never tried again");
        assert_eq!(ask(proxy.addr).len(), 1);
        thread::sleep(Duration::from_millis(20));
    }
    proxy.wait_for_log(&format!("backend {b_addr} is back up"), SECS_10);
    let names: Vec<String> = (0..4).map(|_| ask(proxy.addr)).collect();
    assert_eq!(names.iter().filter(|n| *n == "B").count(), 2, "{names:?}");
    drop(a);
}

/// Every backend refuses: the client is closed promptly, the ERROR names
/// each address and cause, and the proxy serves again once one returns.
#[test]
fn with_every_backend_down_clients_are_closed_and_service_resumes() {
    let dead1 = dead_addr();
    let dead2 = dead_addr();
    let mut proxy = Proxy::start(&[
        "--backend",
        &dead1.to_string(),
        "--backend",
        &dead2.to_string(),
        "--max-fails",
        "1",
        "--fail-timeout",
        "30s",
    ]);
    for _ in 0..3 {
        let started = Instant::now();
        // The proxy may accept and reset before connect() returns.
        if let (_, Ok(mut client)) = connect_from_known_port(proxy.addr) {
            let mut buf = [0u8; 16];
            match client.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                other => panic!("expected the client closed, got {other:?}"),
            }
        }
        assert!(started.elapsed() < SECS_10);
    }
    let line = proxy.wait_for_log("no backend could be reached", SECS_10);
    for addr in [dead1, dead2] {
        assert!(
            line.contains(&format!("{addr} (connection refused)")),
            "{line}"
        );
    }
    proxy.assert_running();
    // Both are down for 30s, yet with all down they are tried anyway.
    let back = Named::start_on("Z", dead2);
    assert_eq!(ask(proxy.addr), "Z");
    assert!(back.accepted() >= 1);
}

/// With four workers, each accepting on its own socket, the rotation is
/// still one process-wide sequence: 12 connections in a row land
/// A,B,C,A,B,C,... and so 4/4/4, whichever worker takes each.
#[test]
fn round_robin_is_exact_across_workers() {
    let names = ["A", "B", "C"];
    let backends: Vec<Named> = names.iter().map(|n| Named::start(n)).collect();
    let mut args = vec!["--workers".to_string(), "4".to_string()];
    for b in &backends {
        args.extend(["--backend".to_string(), b.addr.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = Proxy::start(&args);
    let seq: Vec<String> = (0..12).map(|_| ask(proxy.addr)).collect();
    let first = names.iter().position(|n| *n == seq[0]).expect("a name");
    let expected: Vec<&str> = (0..12).map(|k| names[(first + k) % 3]).collect();
    assert_eq!(seq, expected, "the rotation broke across workers");
    for b in &backends {
        assert_eq!(b.accepted(), 4);
    }
}

/// Health checks take a dead backend out and bring it back with no client
/// involved.
#[test]
fn health_checks_mark_backends_down_and_up_without_clients() {
    let a = Named::start("A");
    let dead = dead_addr();
    let mut proxy = Proxy::start(&[
        "--backend",
        &a.addr.to_string(),
        "--backend",
        &dead.to_string(),
        "--health-check",
        "100ms",
        "--max-fails",
        "2",
        "--fail-timeout",
        "200ms",
    ]);
    proxy.wait_for_log(&format!("backend {dead} marked down"), SECS_10);
    // The probes connected before the log line; the backend's accept loop
    // counts them on its own time.
    wait_until("the live backend to be probed twice", SECS_10, || {
        a.accepted() >= 2
    });
    let b = Named::start_on("B", dead);
    proxy.wait_for_log(&format!("backend {dead} is back up"), SECS_10);
    wait_until("the probe to reach B", SECS_10, || b.accepted() >= 1);
    assert!(
        proxy.lines_containing(" closed client=").is_empty(),
        "no client was involved"
    );
}
