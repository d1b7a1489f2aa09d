//! End-to-end relay behaviour of the `spillway` binary over loopback:
//! spilling to disk, the --max-spill limit, half-close, resets, refused
//! backends, round-robin and many concurrent connections.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// More than any loopback socket buffers can absorb, so a backend can only
/// finish writing it to a client that reads nothing if the proxy spills.
const BIG: usize = 64 * MIB;

const REQUEST: &[u8] = b"GET /big HTTP/1.0\r\n\r\n";

const SECS_10: Duration = Duration::from_secs(10);
const SECS_60: Duration = Duration::from_secs(60);

/// Wait for a message from a helper thread; if the thread died instead,
/// re-raise its panic.
fn recv_from<T, U>(
    rx: &mpsc::Receiver<T>,
    timeout: Duration,
    thread: Bg<U>,
    what: &str,
) -> (T, Bg<U>) {
    match rx.recv_timeout(timeout) {
        Ok(value) => (value, thread),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            thread.join(SECS_10);
            panic!("{what}: the thread ended without reporting");
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: nothing within {timeout:?}"),
    }
}

/// Test 1: A client that reads nothing while the backend writes 64MiB: the
/// proxy takes it all (memory, then an unnamed file), so the backend is
/// released; then the client gets every byte, in order.
#[test]
fn slow_client_download_spills_to_disk_and_arrives_intact() {
    let data = Arc::new(random_bytes(1, BIG));
    let (backend_addr, done_rx, backend) = bulk_backend(data.clone());
    let mut proxy = Proxy::start(&["--backend", &backend_addr.to_string()]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    send_and_shut(&mut client, REQUEST);

    // The client has read nothing yet: only spilling lets the backend finish.
    let (backend_done_at, backend) = recv_from(
        &done_rx,
        SECS_60,
        backend,
        "backend writing 64MiB to a client that reads nothing (is the proxy spilling?)",
    );
    backend.join(SECS_10);

    proxy.assert_spilling_unnamed("backend->client", client_addr, backend_addr);
    assert!(
        proxy
            .lines_containing("client->backend spilling")
            .is_empty(),
        "a 21-byte request must not spill"
    );

    let read_from = Instant::now();
    assert!(backend_done_at <= read_from);
    let got = read_to_eof_varied(&mut client, BIG, SECS_60);
    assert_bytes_eq("download through the proxy", &got, &data);

    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert_eq!(closed.down_bytes, BIG as u64, "{}", closed.line);
    assert_eq!(closed.up_bytes, REQUEST.len() as u64, "{}", closed.line);
    assert!(closed.down_spilled > 0, "{}", closed.line);
    assert_eq!(closed.up_spilled, 0, "{}", closed.line);
    assert_eq!(closed.dropped, 0, "{}", closed.line);
    assert_eq!(closed.reason, "done", "{}", closed.line);
    // What spillway is for: the backend was let go before the client was
    // done (it was, before the client read its first byte).
    assert!(
        closed.backend_held < closed.duration,
        "backend held for the whole connection: {}",
        closed.line
    );
    eprintln!(
        "backend released {:?} after connecting; the client finished {:?} later",
        Duration::from_secs_f64(closed.backend_held),
        read_from.elapsed()
    );
    proxy.wait_no_spill_files(SECS_10);
    assert_eq!(proxy.temp_dir_entries(), Vec::<String>::new());
}

/// Test 2: The same upstream: a client uploads 64MiB to a backend that reads
/// nothing until the client's write_all has returned.
#[test]
fn fast_upload_to_a_stalled_backend_spills_and_arrives_intact() {
    let data = Arc::new(random_bytes(2, BIG));
    let (listener, backend_addr) = listen();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let backend = {
        let data = data.clone();
        spawn("backend", move || {
            let mut s = accept_within(&listener, SECS_10);
            go_rx
                .recv_timeout(SECS_60)
                .expect("the client's write_all of 64MiB never finished");
            let got = read_to_eof_varied(&mut s, BIG, SECS_60);
            assert_bytes_eq("upload through the proxy", &got, &data);
            send_and_shut(&mut s, b"received\n");
        })
    };
    let mut proxy = Proxy::start(&["--backend", &backend_addr.to_string()]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    client
        .set_write_timeout(Some(SECS_60))
        .expect("write timeout");
    // The backend reads nothing until this returns.
    send_and_shut(&mut client, &data);

    proxy.assert_spilling_unnamed("client->backend", client_addr, backend_addr);

    go_tx.send(()).expect("backend alive");
    assert_eq!(read_to_eof(&mut client, 64), b"received\n");
    backend.join(SECS_60);

    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert_eq!(closed.up_bytes, BIG as u64, "{}", closed.line);
    assert_eq!(closed.down_bytes, 9, "{}", closed.line);
    assert!(closed.up_spilled > 0, "{}", closed.line);
    assert_eq!(closed.reason, "done", "{}", closed.line);
    proxy.wait_no_spill_files(SECS_10);
}

/// Test 3: With --max-spill 1MiB the proxy stops taking the backend's bytes
/// once 1MiB waits on disk: the file stops growing, the backend is held back,
/// and everything still arrives once the client reads.
#[test]
fn max_spill_bounds_disk_use_and_applies_backpressure() {
    const MAX_SPILL: u64 = MIB as u64;
    const SLACK: u64 = 64 * KIB as u64;
    let data = Arc::new(random_bytes(3, BIG));
    let (listener, backend_addr) = listen();
    let backend_done = Arc::new(AtomicBool::new(false));
    let backend = {
        let data = data.clone();
        let done = backend_done.clone();
        spawn("backend", move || {
            let mut s = accept_within(&listener, SECS_10);
            assert_eq!(read_to_eof(&mut s, 4096), REQUEST);
            s.set_write_timeout(Some(SECS_60)).expect("write timeout");
            s.write_all(&data).expect("backend write_all");
            shutdown_write(&s);
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--memory-buffer",
        "64KiB",
        "--max-spill",
        "1MiB",
    ]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    send_and_shut(&mut client, REQUEST);

    // Wait for the file to fill up to the limit.
    let deadline = Instant::now() + Duration::from_secs(20);
    let full = loop {
        let files = proxy.spill_files();
        if let Some(f) = files.iter().find(|f| f.disk >= MAX_SPILL - SLACK) {
            break f.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the spill file never approached --max-spill 1MiB: {files:?}"
        );
        proxy.assert_running();
        thread::sleep(Duration::from_millis(5));
    };
    // Now it must stay there, and the backend must stay held back.
    let mut samples = 0;
    let mut largest = full.disk;
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        for f in proxy.spill_files() {
            largest = largest.max(f.disk);
            assert!(
                f.disk <= MAX_SPILL + SLACK,
                "disk use {} exceeds --max-spill 1MiB + 64KiB: {f:?}",
                f.disk
            );
        }
        assert!(
            !backend_done.load(Ordering::SeqCst),
            "the backend wrote all 64MiB to a stalled client despite --max-spill 1MiB"
        );
        samples += 1;
        thread::sleep(Duration::from_millis(10));
    }
    assert!(samples >= 5, "only {samples} samples in 300ms");
    eprintln!("spill file at the limit: {full:?}; largest disk use sampled {largest}");

    let got = read_to_eof_varied(&mut client, BIG, SECS_60);
    assert_bytes_eq("download under backpressure", &got, &data);
    backend.join(SECS_10);
    assert!(backend_done.load(Ordering::SeqCst));
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert_eq!(closed.down_bytes, BIG as u64, "{}", closed.line);
    assert!(closed.down_spilled >= MAX_SPILL, "{}", closed.line);
    assert_eq!(closed.reason, "done", "{}", closed.line);
    proxy.wait_no_spill_files(SECS_10);
}

/// Test 4a: The client half-closes after its request; the backend reads to EOF,
/// replies and closes; the client gets the whole reply and EOF.
#[test]
fn half_close_from_the_client() {
    let request = random_bytes(41, 10 * KIB);
    let reply = Arc::new(random_bytes(42, MIB));
    let (listener, backend_addr) = listen();
    let backend = {
        let request = request.clone();
        let reply = reply.clone();
        spawn("backend", move || {
            let mut s = accept_within(&listener, SECS_10);
            let got = read_to_eof(&mut s, request.len());
            assert_bytes_eq("request before the client's EOF", &got, &request);
            s.write_all(&reply).expect("reply");
            // Dropped: a plain close after reading everything (FIN).
        })
    };
    let mut proxy = Proxy::start(&["--backend", &backend_addr.to_string()]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    send_and_shut(&mut client, &request);
    let got = read_to_eof_varied(&mut client, MIB, SECS_10);
    assert_bytes_eq("reply after the client's EOF", &got, &reply);
    backend.join(SECS_10);
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert_eq!(
        (closed.up_bytes, closed.down_bytes),
        (10 * KIB as u64, MIB as u64),
        "{}",
        closed.line
    );
    assert_eq!(closed.reason, "done", "{}", closed.line);
}

/// Test 4b: The backend sends a greeting and half-closes; the client sees it
/// and EOF, and can still upload 1MiB, which the backend gets in full, then
/// EOF.
/// With `--keep-half-open`, a backend that has sent EOF stays connected
/// and still gets what the client sends after it (full half-duplex, as
/// before the default became releasing the backend).
#[test]
fn half_close_from_the_backend_with_keep_half_open() {
    const GREETING: &[u8] = b"220 hello, send me your file\r\n";
    let upload = Arc::new(random_bytes(43, MIB));
    let (listener, backend_addr) = listen();
    let (got_tx, got_rx) = mpsc::channel();
    let backend = {
        let upload = upload.clone();
        spawn("backend", move || {
            let mut s = accept_within(&listener, SECS_10);
            s.write_all(GREETING).expect("greeting");
            shutdown_write(&s);
            // Still reading.
            let got = read_to_eof_varied(&mut s, MIB, Duration::from_secs(30));
            assert_bytes_eq("upload after the backend's EOF", &got, &upload);
            got_tx.send(got.len()).expect("report");
        })
    };
    let mut proxy = Proxy::start(&["--backend", &backend_addr.to_string(), "--keep-half-open"]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    // Greeting then EOF, before the client has sent anything.
    assert_eq!(read_to_eof(&mut client, 1024), GREETING);
    send_and_shut(&mut client, &upload);
    let (n, backend) = recv_from(
        &got_rx,
        Duration::from_secs(30),
        backend,
        "backend reading the upload",
    );
    assert_eq!(n, MIB);
    backend.join(SECS_10);
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert_eq!(
        (closed.up_bytes, closed.down_bytes),
        (MIB as u64, GREETING.len() as u64),
        "{}",
        closed.line
    );
    assert_eq!(closed.reason, "done", "{}", closed.line);
}

/// A backend that answers and half-closes (a lingering close, as
/// gunicorn, Apache and nginx do: shut the write half, then wait for the
/// peer's FIN) is released as soon as its EOF is in and nothing is pending
/// for it, although the client has read nothing yet and never half-closes.
/// The client still gets the whole response, then EOF; what it sends after
/// the backend was released is dropped and counted.
#[test]
fn a_backend_that_half_closes_is_released_before_the_client_reads() {
    const SIZE: usize = 8 * MIB;
    const LATE: usize = 1000;
    let data = Arc::new(random_bytes(44, SIZE));
    let (listener, backend_addr) = listen();
    let (eof_tx, eof_rx) = mpsc::channel();
    let backend = {
        let data = data.clone();
        spawn("backend", move || {
            let mut s = accept_within(&listener, SECS_10);
            let mut request = vec![0u8; REQUEST.len()];
            s.read_exact(&mut request).expect("request");
            assert_eq!(request, REQUEST);
            s.set_write_timeout(Some(SECS_60)).expect("write timeout");
            s.write_all(&data).expect("backend write_all");
            shutdown_write(&s);
            // The lingering close: wait for the peer to close.
            let rest = read_to_eof(&mut s, 0);
            assert!(rest.is_empty(), "nothing after the request: {rest:?}");
            eof_tx.send(Instant::now()).expect("report");
        })
    };
    let mut proxy = Proxy::start(&["--backend", &backend_addr.to_string()]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    client.write_all(REQUEST).expect("request");
    let (released_at, backend) = recv_from(
        &eof_rx,
        SECS_10,
        backend,
        "backend waiting for the proxy to close while the client reads nothing",
    );
    backend.join(SECS_10);
    // The client speaks again after the backend has gone: dropped.
    client.write_all(&[5u8; LATE]).expect("late bytes");
    let got = read_to_eof_varied(&mut client, SIZE, SECS_60);
    assert_bytes_eq("the response of a released backend", &got, &data);
    let done_reading = Instant::now();
    drop(client);
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert!(released_at < done_reading);
    assert_eq!(
        (closed.up_bytes, closed.down_bytes, closed.dropped),
        (REQUEST.len() as u64, SIZE as u64, LATE as u64),
        "{}",
        closed.line
    );
    assert_eq!(closed.reason, "done", "{}", closed.line);
    assert!(closed.backend_held < closed.duration, "{}", closed.line);
}

/// Backend writes until a write fails (or 512MiB): what it saw and when.
struct WriteFailure {
    kind: io::ErrorKind,
    error: String,
    written: u64,
    at: Instant,
}

fn write_until_error(s: &mut TcpStream) -> WriteFailure {
    let chunk = random_bytes(50, MIB);
    let mut written = 0u64;
    while written < 512 * MIB as u64 {
        match s.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return WriteFailure {
                    kind: e.kind(),
                    error: e.to_string(),
                    written,
                    at: Instant::now(),
                };
            }
        }
    }
    panic!("wrote 512MiB and never saw an error: the client's reset was not passed on");
}

/// Test 5: A client that resets mid-download: the backend is told (its writes
/// fail) promptly, the close line blames the client, and the proxy goes on
/// serving.
#[test]
fn client_reset_mid_transfer_resets_the_backend_and_proxy_keeps_serving() {
    let second = Arc::new(random_bytes(51, 4 * MIB));
    let (listener, backend_addr) = listen();
    let (fail_tx, fail_rx) = mpsc::channel();
    let backend = {
        let second = second.clone();
        spawn("backend", move || {
            let mut s = accept_within(&listener, SECS_10);
            fail_tx.send(write_until_error(&mut s)).expect("report");
            drop(s);
            // The next client is served normally.
            let mut s = accept_within(&listener, Duration::from_secs(30));
            assert_eq!(read_to_eof(&mut s, 4096), REQUEST);
            s.write_all(&second).expect("second reply");
        })
    };
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--max-spill",
        "4MiB",
    ]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    let mut first = vec![0u8; MIB];
    client.read_exact(&mut first).expect("first 1MiB");
    let reset_at = Instant::now();
    reset(client);

    let (failure, backend) = recv_from(
        &fail_rx,
        SECS_10,
        backend,
        "backend writing after the client reset",
    );
    assert!(
        matches!(
            failure.kind,
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ),
        "backend write failed with {} ({:?}), not a reset or broken pipe",
        failure.error,
        failure.kind
    );
    eprintln!(
        "backend wrote {} bytes, then {:?} {:?} after the client's reset",
        failure.written,
        failure.error,
        failure.at.saturating_duration_since(reset_at)
    );
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert!(
        closed.reason.contains("client"),
        "reason names the client: {}",
        closed.line
    );
    assert!(closed.down_bytes >= MIB as u64, "{}", closed.line);
    proxy.wait_no_spill_files(SECS_10);

    // Another client, same proxy process: served byte-exact.
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    send_and_shut(&mut client, REQUEST);
    let got = read_to_eof_varied(&mut client, second.len(), Duration::from_secs(30));
    assert_bytes_eq("second transfer after a client reset", &got, &second);
    backend.join(SECS_10);
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert_eq!(closed.reason, "done", "{}", closed.line);
}

/// Test 6: A backend that resets mid-response: the client must see a reset,
/// never a clean EOF that would make a truncated response look complete.
#[test]
fn backend_reset_mid_stream_reaches_the_client_as_a_reset() {
    let data = Arc::new(random_bytes(6, MIB));
    let (listener, backend_addr) = listen();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let backend = {
        let data = data.clone();
        spawn("backend", move || {
            let mut s = accept_within(&listener, SECS_10);
            // Not before the client's connect() has returned: a reset
            // landing earlier would make connect() itself fail.
            go_rx.recv_timeout(SECS_10).expect("client connected");
            s.write_all(&data).expect("backend write");
            reset(s);
        })
    };
    let mut proxy = Proxy::start(&["--backend", &backend_addr.to_string()]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    go_tx.send(()).expect("backend alive");
    client.set_read_timeout(Some(SECS_10)).unwrap();
    let deadline = Instant::now() + SECS_10;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * KIB];
    loop {
        assert!(
            Instant::now() < deadline,
            "neither reset nor EOF within 10s"
        );
        match client.read(&mut buf) {
            Ok(0) => panic!(
                "clean EOF after {} bytes: a stream the backend cut short was passed on as complete",
                got.len()
            ),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "after {} bytes: {}; expected ECONNRESET",
                got.len(),
                explain(&e)
            ),
        }
    }
    assert!(got.len() <= data.len());
    assert_bytes_eq("what arrived before the reset", &got, &data[..got.len()]);
    backend.join(SECS_10);
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert!(
        closed.reason.starts_with("backend"),
        "reason blames the backend: {}",
        closed.line
    );
}

/// Test 6b (beyond the list): a backend sends a complete response,
/// EOF included, and resets only once the proxy has read all of it and the
/// EOF. That stream had ended, so the proxy must still deliver all of it,
/// and a clean EOF, to a client that only reads afterwards.
#[test]
fn backend_reset_after_a_complete_response_still_delivers_it() {
    let data = Arc::new(random_bytes(61, 16 * MIB));
    let (listener, backend_addr) = listen();
    let (done_tx, done_rx) = mpsc::channel();
    let backend = {
        let data = data.clone();
        spawn("backend", move || {
            let mut s = accept_within(&listener, SECS_10);
            s.write_all(&data).expect("backend write");
            shutdown_write(&s);
            // All of it, and the FIN, read by the proxy: now reset.
            wait_until_peer_read_all(&s, SECS_10);
            reset_seen_by_peer(s, SECS_10);
            done_tx.send(()).expect("report");
        })
    };
    // Kept half-open: by default the proxy closes the backend once its EOF
    // is in, before it could reset; this is about a reset that comes first.
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--log-level",
        "debug",
        "--keep-half-open",
    ]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    let ((), backend) = recv_from(
        &done_rx,
        Duration::from_secs(30),
        backend,
        "backend writing 16MiB",
    );
    backend.join(SECS_10);
    // Our EOF makes the proxy shut down its write half toward the reset
    // backend, which fails: wait until it has met the backend's failure.
    shutdown_write(&client);
    let met = proxy.wait_for_line("about the backend failing", SECS_10, |l| {
        l.contains(&format!(" backend {backend_addr} "))
            && (l.contains("closed abruptly") || l.contains(" failed: "))
    });
    eprintln!("{met}");
    let got = read_to_eof_varied(&mut client, data.len(), Duration::from_secs(30));
    assert_bytes_eq("a complete response whose sender then reset", &got, &data);
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert_eq!(closed.down_bytes, data.len() as u64, "{}", closed.line);
    assert!(closed.reason.starts_with("backend"), "{}", closed.line);
}

/// Test 6c (beyond the list): the mirror image. A client uploads a
/// complete request, EOF included, and resets once the proxy has read it
/// all; the backend must still get all of it and a clean EOF, even though
/// the proxy meets the client's reset (writing to it) first.
#[test]
fn client_reset_after_a_complete_upload_still_delivers_it() {
    let data = Arc::new(random_bytes(62, 16 * MIB));
    let (listener, backend_addr) = listen();
    let (reset_tx, reset_rx) = mpsc::channel::<()>();
    let (read_tx, read_rx) = mpsc::channel::<()>();
    let backend = {
        let data = data.clone();
        spawn("backend", move || {
            let mut s = accept_within(&listener, SECS_10);
            reset_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("client reset");
            // Something for the reset client: the proxy meets its failure.
            s.write_all(b"too late\n").expect("backend write");
            read_rx.recv_timeout(SECS_10).expect("go on reading");
            let got = read_to_eof_varied(&mut s, data.len(), Duration::from_secs(30));
            assert_bytes_eq("a complete upload whose sender then reset", &got, &data);
        })
    };
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--log-level",
        "debug",
    ]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    send_and_shut(&mut client, &data);
    wait_until_peer_read_all(&client, SECS_10);
    reset_seen_by_peer(client, SECS_10);
    reset_tx.send(()).expect("backend alive");
    let met = proxy.wait_for_line("about the client failing", SECS_10, |l| {
        l.contains(&format!(" client {client_addr} "))
            && (l.contains("closed abruptly") || l.contains(" failed: "))
    });
    eprintln!("{met}");
    read_tx.send(()).expect("backend alive");
    backend.join(Duration::from_secs(30));
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert_eq!(closed.up_bytes, data.len() as u64, "{}", closed.line);
    assert!(closed.reason.starts_with("client"), "{}", closed.line);
}

/// Connect through a proxy whose backend refuses: the proxy must accept,
/// then close us (EOF or reset) within `timeout`. Returns our address.
fn expect_closed_promptly(proxy_addr: SocketAddr, timeout: Duration) -> SocketAddr {
    let (local, connected) = connect_from_known_port(proxy_addr);
    let mut client = match connected {
        Ok(client) => client,
        // Accepted, then reset before connect() returned: closed promptly.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return local,
        Err(e) => panic!("connect to the proxy at {proxy_addr}: {e}"),
    };
    client.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 64];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("got {n} bytes from a proxy with no backend"),
        Err(e) => panic!("not closed within {timeout:?}: {}", explain(&e)),
    }
    local
}

/// Test 7: A backend that refuses: the client is closed promptly, the log says
/// which backend, and the proxy keeps accepting.
#[test]
fn refused_backend_closes_the_client_and_proxy_stays_up() {
    let (_refusing, dead) = refusing_addr();
    let mut proxy = Proxy::start(&["--backend", &dead.to_string()]);
    let client_addr = expect_closed_promptly(proxy.addr, Duration::from_secs(5));
    let warn = proxy.wait_for_line("WARN naming the refused backend", SECS_10, |l| {
        l.contains(" WARN ") && l.contains(&dead.to_string())
    });
    assert!(
        warn.contains(&client_addr.to_string()),
        "names the client too: {warn}"
    );
    let assert_refused = |closed: Closed| {
        assert!(
            closed.reason.starts_with("no backend reached")
                && closed
                    .reason
                    .contains(&format!("{dead} (connection refused)")),
            "{}",
            closed.line
        );
    };
    assert_refused(proxy.wait_for_close(client_addr, SECS_10));

    // Still accepting: a second client is taken, and closed the same way.
    proxy.assert_running();
    let again = expect_closed_promptly(proxy.addr, Duration::from_secs(5));
    assert_refused(proxy.wait_for_close(again, SECS_10));
    proxy.assert_running();
}

/// A backend that answers each connection with its name and counts them,
/// until told to stop.
fn naming_backend(name: &'static str, stop: Arc<AtomicBool>) -> (SocketAddr, Bg<usize>) {
    let (listener, addr) = listen();
    let bg = spawn(name, move || {
        listener.set_nonblocking(true).unwrap();
        let mut accepted = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stop.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "backend {name} never told to stop"
            );
            match listener.accept() {
                Ok((mut s, _)) => {
                    accepted += 1;
                    s.set_nonblocking(false).unwrap();
                    s.write_all(name.as_bytes()).expect("write name");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        accepted
    });
    (addr, bg)
}

/// Test 8: Two backends, four sequential connections: A, B, A, B.
#[test]
fn backends_are_used_round_robin() {
    let stop = Arc::new(AtomicBool::new(false));
    let (a_addr, a) = naming_backend("A", stop.clone());
    let (b_addr, b) = naming_backend("B", stop.clone());
    let proxy = Proxy::start(&[
        "--backend",
        &a_addr.to_string(),
        "--backend",
        &b_addr.to_string(),
    ]);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut client = connect(proxy.addr);
        shutdown_write(&client);
        let name = read_to_eof(&mut client, 16);
        seen.push(String::from_utf8(name).unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    assert_eq!(seen, ["A", "B", "A", "B"]);
    assert_eq!(a.join(SECS_10), 2, "connections accepted by A");
    assert_eq!(b.join(SECS_10), 2, "connections accepted by B");
}

/// Test 9: Fifty clients at once, in five threads, each sending 100KiB in
/// randomly sized and paced writes to an echo backend, then reading it back.
#[test]
fn many_concurrent_connections_are_relayed_byte_exact() {
    const THREADS: usize = 5;
    const PER_THREAD: usize = 10;
    const SIZE: usize = 100 * KIB;
    let total = THREADS * PER_THREAD;
    let (listener, backend_addr) = listen();
    let echo = spawn("echo-acceptor", move || {
        let mut handlers = Vec::new();
        for i in 0..total {
            let mut s = accept_within(&listener, Duration::from_secs(30));
            handlers.push(spawn(&format!("echo-{i}"), move || {
                let mut buf = vec![0u8; 16 * KIB];
                let mut echoed = 0;
                loop {
                    let n = s.read(&mut buf).expect("echo read");
                    if n == 0 {
                        break;
                    }
                    s.write_all(&buf[..n]).expect("echo write");
                    echoed += n;
                }
                shutdown_write(&s);
                echoed
            }));
        }
        handlers
    });
    let proxy = Proxy::start(&["--backend", &backend_addr.to_string()]);
    let proxy_addr = proxy.addr;
    let clients: Vec<Bg<Vec<SocketAddr>>> = (0..THREADS)
        .map(|t| {
            spawn(&format!("clients-{t}"), move || {
                let mut rng = Rng::new(900 + t as u64);
                let mut conns: Vec<(TcpStream, Vec<u8>, usize)> = (0..PER_THREAD)
                    .map(|i| {
                        let data = random_bytes((t * PER_THREAD + i) as u64 + 1000, SIZE);
                        (connect(proxy_addr), data, 0)
                    })
                    .collect();
                // Interleave randomly sized writes across the connections.
                while conns.iter().any(|(_, data, sent)| *sent < data.len()) {
                    for (s, data, sent) in conns.iter_mut().filter(|(_, d, sent)| *sent < d.len()) {
                        let n = (1 + rng.below(16 * KIB as u64) as usize).min(data.len() - *sent);
                        s.write_all(&data[*sent..*sent + n]).expect("client write");
                        *sent += n;
                        if *sent == data.len() {
                            shutdown_write(s);
                        }
                        if rng.below(8) == 0 {
                            thread::sleep(Duration::from_micros(rng.below(2000)));
                        }
                    }
                }
                conns
                    .iter_mut()
                    .map(|(s, data, _)| {
                        let got = read_to_eof_varied(s, data.len(), Duration::from_secs(30));
                        assert_bytes_eq("echo", &got, data);
                        s.local_addr().unwrap()
                    })
                    .collect()
            })
        })
        .collect();
    let mut client_addrs = Vec::new();
    for c in clients {
        client_addrs.extend(c.join(SECS_60));
    }
    for handler in echo.join(SECS_10) {
        assert_eq!(handler.join(SECS_10), SIZE);
    }
    let mut proxy = proxy;
    for addr in client_addrs {
        let closed = proxy.wait_for_close(addr, SECS_10);
        assert_eq!(
            (closed.up_bytes, closed.down_bytes),
            (SIZE as u64, SIZE as u64),
            "{}",
            closed.line
        );
        assert_eq!(closed.reason, "done", "{}", closed.line);
    }
}

/// The backend sends a complete response (4MiB and EOF), then resets, while
/// the client is still uploading. The response must reach the client in
/// full with a clean EOF: closing the client's socket while it still has
/// unread upload bytes would make the kernel reset it and throw away the
/// end of the response still queued for it.
#[test]
fn a_complete_response_survives_a_backend_reset_while_the_client_still_sends() {
    let data = Arc::new(random_bytes(64, 4 * MIB));
    let (listener, backend_addr) = listen();
    let backend = {
        let data = data.clone();
        spawn("backend", move || {
            let mut s = accept_within(&listener, SECS_10);
            s.write_all(&data).expect("backend write");
            shutdown_write(&s);
            wait_until_peer_read_all(&s, SECS_10);
            reset(s);
        })
    };
    // Kept half-open: released at its EOF, the backend would be closed by
    // the proxy before its reset, and this is about the reset.
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--log-level",
        "debug",
        "--keep-half-open",
    ]);
    let mut client = connect(proxy.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let uploader = {
        let mut writer = client.try_clone().unwrap();
        let stop = stop.clone();
        spawn("uploader", move || {
            let chunk = vec![7u8; 16 * KIB];
            let deadline = Instant::now() + SECS_10;
            // Until told to stop, the connection fails, or 10s: bounded.
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                if writer.write_all(&chunk).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(1));
            }
        })
    };
    // Read nothing until the proxy has met the reset: by then it has
    // handed the whole response to the kernel, where it waits for us.
    proxy.wait_for_log(&format!("backend {backend_addr} closed abruptly"), SECS_10);
    let got = read_to_eof_varied(&mut client, data.len(), Duration::from_secs(30));
    stop.store(true, Ordering::SeqCst);
    assert_bytes_eq("a complete response", &got, &data);
    uploader.join(SECS_10);
    backend.join(SECS_10);
}

/// `--workers 3`: three event-loop threads, each with its own listening
/// socket on the one port, and 30 clients at once, each echoed 256KiB
/// through whichever worker the kernel hands it to, byte-exact.
#[test]
fn workers_share_the_port_and_relay_exactly() {
    const CLIENTS: usize = 30;
    const SIZE: usize = 256 * 1024;
    let (listener, backend_addr) = listen();
    let backend = spawn("echo backend", move || {
        let echoes: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let mut s = accept_within(&listener, SECS_10);
                thread::spawn(move || {
                    let mut r = s.try_clone().expect("clone");
                    io::copy(&mut r, &mut s).expect("echo");
                    shutdown_write(&s);
                })
            })
            .collect();
        for e in echoes {
            e.join().expect("echo thread");
        }
    });
    let proxy = Proxy::start(&["--backend", &backend_addr.to_string(), "--workers", "3"]);

    let workers = || {
        std::fs::read_dir(format!("/proc/{}/task", proxy.pid))
            .expect("/proc tasks")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("spillway-w"))
            .count()
    };
    wait_until("three worker threads", SECS_10, || workers() == 3);
    let port = format!(":{:04X}", proxy.addr.port());
    let listening = std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&port) && f[3] == "0A" // LISTEN
        })
        .count();
    assert_eq!(
        listening,
        3,
        "listening sockets on port {}",
        proxy.addr.port()
    );

    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let addr = proxy.addr;
            spawn("client", move || {
                let data = random_bytes(100 + i as u64, SIZE);
                let mut c = connect(addr);
                let mut w = c.try_clone().expect("clone");
                let sent = data.clone();
                let writer = thread::spawn(move || send_and_shut(&mut w, &sent));
                let got = read_to_eof(&mut c, SIZE + 1);
                writer.join().expect("writer");
                assert_bytes_eq("echo through a worker", &got, &data);
            })
        })
        .collect();
    for c in clients {
        c.join(SECS_60);
    }
    backend.join(SECS_10);
}

/// A backend that waits for the client's request (to EOF), then writes
/// `data` and closes, and reports when it was done writing.
fn bulk_backend(data: Arc<Vec<u8>>) -> (SocketAddr, mpsc::Receiver<Instant>, Bg<()>) {
    let (listener, addr) = listen();
    let (done_tx, done_rx) = mpsc::channel();
    let backend = spawn("backend", move || {
        let mut s = accept_within(&listener, SECS_10);
        assert_eq!(read_to_eof(&mut s, 4096), REQUEST, "request as sent");
        s.set_write_timeout(Some(SECS_60)).expect("write timeout");
        s.write_all(&data).expect("backend write_all");
        shutdown_write(&s);
        done_tx.send(Instant::now()).expect("report done");
    });
    (addr, done_rx, backend)
}

/// A client that reads as fast as it can, but for a pause of 1ms every
/// 4MiB, gets a bulk download through memory alone: when memory fills, the
/// proxy pauses the backend for `--spill-after` instead of spilling, and
/// the client catches up well before that. A proxy that spills as soon as
/// memory is full sends most of the 64MiB through the disk here: after the
/// first pause, order keeps everything behind the file. The test runs with
/// `--spill-after 100ms`, not the 5ms default: on a loaded 2-core machine
/// the reading thread can be off the CPU for longer than 5ms, and then even
/// a client that keeps up spills (a CI run saw 40 of 64MiB spilled).
#[test]
fn a_client_that_keeps_up_gets_a_bulk_download_without_spilling() {
    let data = Arc::new(random_bytes(11, BIG));
    let (backend_addr, _done, backend) = bulk_backend(data.clone());
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--spill-after",
        "100ms",
    ]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    send_and_shut(&mut client, REQUEST);
    let mut got = Vec::with_capacity(BIG);
    let mut buf = vec![0u8; MIB];
    let mut next_pause = 4 * MIB;
    loop {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() >= next_pause {
                    next_pause += 4 * MIB;
                    thread::sleep(Duration::from_millis(1));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read after {} bytes: {}", got.len(), explain(&e)),
        }
    }
    assert_bytes_eq("a fast download", &got, &data);
    backend.join(SECS_10);
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert_eq!(closed.down_bytes, BIG as u64, "{}", closed.line);
    assert!(
        closed.down_spilled < BIG as u64 / 4,
        "a client that keeps up had {} of {BIG} bytes spilled: {}",
        closed.down_spilled,
        closed.line
    );
    eprintln!("spilled {} of {BIG} bytes", closed.down_spilled);
}

/// A client that reads slowly but steadily (4KiB every millisecond, small
/// receive window) never lets memory fill for long, yet never takes all of
/// it within `--spill-after` either: it is behind, so its backlog goes to
/// disk and the backend is released at once, not after the 2s the client
/// takes. Catches a pause that any progress would restart.
#[test]
fn a_client_that_reads_a_little_at_a_time_still_releases_the_backend() {
    const SIZE: usize = 8 * MIB;
    let data = Arc::new(random_bytes(12, SIZE));
    let (backend_addr, done_rx, backend) = bulk_backend(data.clone());
    let mut proxy = Proxy::start(&["--backend", &backend_addr.to_string()]);
    let mut client = connect_small_window(proxy.addr, 64 * KIB);
    let client_addr = client.local_addr().unwrap();
    send_and_shut(&mut client, REQUEST);
    let started = Instant::now();
    let reader = spawn("client", move || {
        read_to_eof_paced(
            &mut client,
            SIZE,
            4 * KIB,
            Duration::from_millis(1),
            SECS_60,
        )
    });
    let (done_at, backend) = recv_from(&done_rx, SECS_60, backend, "backend writing 8MiB");
    backend.join(SECS_10);
    let got = reader.join(SECS_60);
    let client_took = started.elapsed();
    assert_bytes_eq("a slowly read download", &got, &data);
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert!(closed.down_spilled > 0, "{}", closed.line);
    let backend_took = done_at.duration_since(started);
    assert!(
        backend_took * 4 < client_took,
        "the backend wrote for {backend_took:?} of the client's {client_took:?}: {}",
        closed.line
    );
    eprintln!(
        "backend done after {backend_took:?}, held {:.3}s; client took {client_took:?}",
        closed.backend_held
    );
}

/// Spilled bytes reach the client straight from the spill file's page
/// cache (`sendfile`): the client's socket then holds references to those
/// pages until the client reads them. A backend sends 48MiB and a client
/// reads it, paced so that megabytes sit unread in the client's receive
/// queue while the file behind them is punched (a backlog that does not
/// empty for a while), and truncated and written again from its start
/// (bursts the proxy passes on whole, into a queue the client empties only
/// every 20ms). Every byte must arrive as sent: a page changed while in
/// flight shows as zeros or newer bytes.
#[test]
fn spilled_bytes_survive_a_bursty_backend_and_a_dawdling_client() {
    const SIZE: usize = 48 * MIB;
    const FIRST: usize = 32 * MIB;
    let data = Arc::new(random_bytes(13, SIZE));
    let (listener, backend_addr) = listen();
    let backend = {
        let data = data.clone();
        spawn("backend", move || {
            let mut s = accept_within(&listener, SECS_10);
            assert_eq!(read_to_eof(&mut s, 4096), REQUEST, "request as sent");
            s.set_write_timeout(Some(SECS_60)).expect("write timeout");
            let mut rng = Rng::new(14);
            let mut at = 0;
            while at < SIZE {
                // Up to 32MiB: bursts of up to 4MiB, now and then a pause long enough
                // for the proxy to catch up; then small bursts, often.
                let (burst, pause) = if at < FIRST {
                    let pause = if rng.below(4) == 0 { 60 } else { rng.below(10) };
                    (1 + rng.below(4 * MIB as u64) as usize, pause)
                } else {
                    (256 * KIB, 5)
                };
                let burst = burst.min(SIZE - at);
                s.write_all(&data[at..at + burst]).expect("backend write");
                at += burst;
                thread::sleep(Duration::from_millis(pause));
            }
            shutdown_write(&s);
        })
    };
    let mut proxy = Proxy::start(&[
        "--backend",
        &backend_addr.to_string(),
        "--memory-buffer",
        "16KiB",
        "--spill-after",
        "0ms",
    ]);
    let mut client = connect(proxy.addr);
    let client_addr = client.local_addr().unwrap();
    send_and_shut(&mut client, REQUEST);
    let mut rng = Rng::new(15);
    let mut got = Vec::with_capacity(SIZE);
    let mut buf = vec![0u8; MIB];
    let deadline = Instant::now() + SECS_60;
    loop {
        assert!(
            Instant::now() < deadline,
            "read {} of {SIZE} bytes",
            got.len()
        );
        // Uneven gulps with pauses; later, all there is every 20ms.
        let late = got.len() >= FIRST;
        client.set_nonblocking(late).expect("nonblocking");
        let want = if late {
            buf.len()
        } else {
            1 + rng.below(buf.len() as u64) as usize
        };
        match client.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if !late {
                    thread::sleep(Duration::from_millis(rng.below(25)));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if late && e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("read after {} bytes: {}", got.len(), explain(&e)),
        }
    }
    assert_bytes_eq("a bursty download read in gulps", &got, &data);
    backend.join(SECS_10);
    let closed = proxy.wait_for_close(client_addr, SECS_10);
    assert_eq!(closed.reason, "done", "{}", closed.line);
    assert!(closed.down_spilled > SIZE as u64 / 4, "{}", closed.line);
    eprintln!("{}", closed.line);
    proxy.wait_no_spill_files(SECS_10);
}
