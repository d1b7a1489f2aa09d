//! `spillway demo`: what the proxy is for, in one command and on loopback.
//!
//! A built-in backend writes a response and closes; two clients read it at
//! the same slow rate, one straight from the backend and one through an
//! in-process spillway. The backend records how long each connection held
//! it. Socket buffers are pinned small (64KiB) on the backend's sending side
//! and the clients' receiving side, as on a real network path, so the
//! kernel cannot quietly absorb the response and hide the difference.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::config::BackendSpec;
use crate::config::{Config, show_size};
use crate::proxy::Proxy;

pub const DEFAULT_SIZE: u64 = 32 << 20;
pub const DEFAULT_RATE: u64 = 4 << 20;
const SOCKET_BUFFER: usize = 64 * 1024;

pub struct DemoOptions {
    /// Bytes the backend writes.
    pub size: u64,
    /// Bytes per second each client reads.
    pub rate: u64,
    /// Passed to the proxy as its `--memory-buffer`.
    pub memory_buffer: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            size: DEFAULT_SIZE,
            rate: DEFAULT_RATE,
            memory_buffer: crate::config::DEFAULT_MEMORY_BUFFER,
        }
    }
}

/// One client's run.
pub struct Run {
    pub backend_held: Duration,
    pub client_took: Duration,
    pub bytes_ok: bool,
}

pub struct DemoReport {
    pub direct: Run,
    pub proxied: Run,
    pub bytes_spilled: u64,
}

/// Byte `i` of the backend's response: a pattern with a period (251) that
/// no buffer size divides, so a misplaced chunk shows.
fn pattern(offset: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = ((offset + i as u64) % 251) as u8;
    }
}

pub fn run(opts: &DemoOptions) -> Result<DemoReport, Box<dyn std::error::Error>> {
    let backend = TcpListener::bind("127.0.0.1:0")?;
    let backend_addr = backend.local_addr()?;
    let (held_tx, held_rx) = mpsc::channel();
    let size = opts.size;
    thread::spawn(move || serve_backend(backend, size, held_tx));

    let proxy = Proxy::bind(Config {
        backends: vec![BackendSpec::at(backend_addr, 1)],
        memory_buffer: opts.memory_buffer,
        ..Config::default()
    })?;
    let proxy_addr = proxy.local_addr();
    let stopper = proxy.stopper();
    let stats = proxy.stats();
    let proxy_thread = thread::spawn(move || proxy.run());

    println!(
        "spillway demo: a backend writes {} and closes; a client reads it at {}/s",
        show_size(opts.size),
        show_size(opts.rate)
    );
    println!("both ways run side by side: straight to the backend, and through spillway\n");

    // Both clients at once: the demo takes as long as one slow read.
    let (size, rate) = (opts.size, opts.rate);
    let direct = thread::spawn(move || slow_client(backend_addr, size, rate));
    let proxied = thread::spawn(move || slow_client(proxy_addr, size, rate));
    let (direct_local, direct_took, direct_ok) = direct.join().expect("client thread")?;
    let (_, proxied_took, proxied_ok) = proxied.join().expect("client thread")?;

    let mut direct_held = None;
    let mut proxied_held = None;
    for _ in 0..2 {
        let (peer, held) = held_rx.recv_timeout(Duration::from_secs(60))?;
        if peer == direct_local {
            direct_held = Some(held);
        } else {
            proxied_held = Some(held);
        }
    }
    // The proxy logs and counts a connection as it closes, just after the
    // client saw EOF: give it a moment, bounded.
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.connections_closed() < 1 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    stopper.stop();
    proxy_thread.join().expect("proxy thread")?;

    let report = DemoReport {
        direct: Run {
            backend_held: direct_held.ok_or("backend saw no direct connection")?,
            client_took: direct_took,
            bytes_ok: direct_ok,
        },
        proxied: Run {
            backend_held: proxied_held.ok_or("backend saw no proxied connection")?,
            client_took: proxied_took,
            bytes_ok: proxied_ok,
        },
        bytes_spilled: stats.bytes_spilled(),
    };
    print_table(&report);
    Ok(report)
}

fn print_table(r: &DemoReport) {
    let check = |ok| if ok { "exact" } else { "MISMATCH" };
    println!(
        "\n  {:<18} {:>13} {:>12} {:>16} {:>8}",
        "", "backend held", "client took", "spilled to disk", "bytes"
    );
    println!(
        "  {:<18} {:>11.2} s {:>10.2} s {:>16} {:>8}",
        "direct",
        r.direct.backend_held.as_secs_f64(),
        r.direct.client_took.as_secs_f64(),
        "-",
        check(r.direct.bytes_ok)
    );
    println!(
        "  {:<18} {:>11.2} s {:>10.2} s {:>16} {:>8}",
        "through spillway",
        r.proxied.backend_held.as_secs_f64(),
        r.proxied.client_took.as_secs_f64(),
        show_size(r.bytes_spilled),
        check(r.proxied.bytes_ok)
    );
    let ratio =
        r.direct.backend_held.as_secs_f64() / r.proxied.backend_held.as_secs_f64().max(1e-6);
    println!(
        "\nWith spillway in front, the backend was free {ratio:.0}x sooner; the client read at the same pace."
    );
}

/// Accept two connections; on each, write `size` bytes, close, and report
/// (peer, accept-to-close).
fn serve_backend(listener: TcpListener, size: u64, held: mpsc::Sender<(SocketAddr, Duration)>) {
    for _ in 0..2 {
        let Ok((stream, peer)) = listener.accept() else {
            return;
        };
        let held = held.clone();
        thread::spawn(move || {
            let accepted = Instant::now();
            if let Err(e) = write_response(stream, size) {
                log::warn!("demo backend: {peer}: {e}");
            }
            let _ = held.send((peer, accepted.elapsed()));
        });
    }
}

fn write_response(stream: TcpStream, size: u64) -> io::Result<()> {
    socket2::SockRef::from(&stream).set_send_buffer_size(SOCKET_BUFFER)?;
    let mut stream = stream;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < size {
        let n = chunk.len().min((size - sent) as usize);
        pattern(sent, &mut chunk[..n]);
        stream.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write)
}

/// Connect with a small receive window, say we have nothing to send, read
/// `size` bytes at `rate` bytes/s and check them. Returns (local address,
/// time taken, bytes exact).
fn slow_client(addr: SocketAddr, size: u64, rate: u64) -> io::Result<(SocketAddr, Duration, bool)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // Set before connect, so the window the client advertises is small too.
    socket.set_recv_buffer_size(SOCKET_BUFFER)?;
    socket.connect(&addr.into())?;
    let mut stream: TcpStream = socket.into();
    let local = stream.local_addr()?;
    stream.shutdown(Shutdown::Write)?;
    let started = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    let mut expect = vec![0u8; buf.len()];
    let mut got = 0u64;
    let mut exact = true;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        pattern(got, &mut expect[..n]);
        exact &= buf[..n] == expect[..n];
        got += n as u64;
        // Keep to the rate: sleep until the bytes read so far are due.
        let due = Duration::from_secs_f64(got as f64 / rate as f64);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            thread::sleep(ahead);
        }
    }
    Ok((local, started.elapsed(), exact && got == size))
}
