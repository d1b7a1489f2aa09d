//! `spillway demo --mode http`: what the HTTP mode is for, in one command
//! and on loopback.
//!
//! A built-in HTTP/1.1 backend with keep-alive records, for every request,
//! how long it was busy with it: from the first byte of the request head to
//! the last byte of its response written. Two clients do the same slow
//! work, one straight to the backend and one through an in-process
//! spillway in `--mode http`: a slow upload (a POST read at the client's
//! pace), then a slow keep-alive download (two GETs on one connection, read
//! at the client's pace). Socket buffers are pinned small on the paths, as
//! on a real network, so the kernel cannot hide the difference.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::config::{BackendSpec, Config, Mode, show_size};
use crate::proxy::Proxy;

const SOCKET_BUFFER: usize = 64 * 1024;

/// One request's figures, as the backend and the client saw them.
#[derive(Clone, Copy, Debug)]
pub struct Held {
    pub backend_busy: Duration,
    pub client_took: Duration,
    pub exact: bool,
}

/// The demo's figures: upload, then the two downloads, direct and proxied.
pub struct HttpReport {
    pub direct: Vec<Held>,
    pub proxied: Vec<Held>,
}

impl HttpReport {
    pub fn all_exact(&self) -> bool {
        self.direct.iter().chain(&self.proxied).all(|h| h.exact)
    }
}

/// Byte `i` of a body: a pattern with a period (251) that no buffer size
/// divides, so a misplaced chunk shows.
fn pattern(offset: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = ((offset + i as u64) % 251) as u8;
    }
}

pub fn run(
    size: u64,
    rate: u64,
    memory_buffer: u64,
) -> Result<HttpReport, Box<dyn std::error::Error>> {
    let backend = TcpListener::bind("127.0.0.1:0")?;
    let backend_addr = backend.local_addr()?;
    let (busy_tx, busy_rx) = mpsc::channel();
    thread::spawn(move || serve(backend, size, busy_tx));
    let proxy = Proxy::bind(Config {
        backends: vec![BackendSpec::at(backend_addr, 1)],
        memory_buffer,
        mode: Mode::Http,
        ..Config::default()
    })?;
    let proxy_addr = proxy.local_addr();
    let stopper = proxy.stopper();
    let proxy_thread = thread::spawn(move || proxy.run());
    println!(
        "spillway demo --mode http: a client uploads {size} at {rate}/s, then downloads {size} twice on one keep-alive connection at {rate}/s",
        size = show_size(size),
        rate = show_size(rate)
    );
    println!("both ways run side by side: straight to the backend, and through spillway\n");
    let direct = thread::spawn(move || session(backend_addr, size, rate));
    let proxied = thread::spawn(move || session(proxy_addr, size, rate));
    let direct = direct.join().expect("client thread")?;
    let proxied = proxied.join().expect("client thread")?;
    // The backend reports each request's busy time by the client's path
    // (it sees the proxy's address for proxied ones).
    let mut by_peer: Vec<(SocketAddr, usize, Duration)> = Vec::with_capacity(6);
    for _ in 0..6 {
        by_peer.push(busy_rx.recv_timeout(Duration::from_secs(60))?);
    }
    stopper.stop();
    proxy_thread.join().expect("proxy thread")?;
    let direct_peers: Vec<SocketAddr> = direct.iter().map(|(peer, _)| *peer).collect();
    let pick = |runs: &[(SocketAddr, Held)], direct: bool| -> Vec<Held> {
        let mut out: Vec<Held> = runs.iter().map(|(_, h)| *h).collect();
        // Each client's requests run one after the other, so the backend
        // reports them in that order.
        let mine = by_peer
            .iter()
            .filter(|(peer, _, _)| direct_peers.contains(peer) == direct);
        for (held, (_, _, busy)) in out.iter_mut().zip(mine) {
            held.backend_busy = *busy;
        }
        out
    };
    let report = HttpReport {
        direct: pick(&direct, true),
        proxied: pick(&proxied, false),
    };
    print_table(&report);
    Ok(report)
}

fn print_table(r: &HttpReport) {
    let check = |ok| if ok { "exact" } else { "MISMATCH" };
    let names = [
        "slow upload (POST)",
        "slow download 1 (GET)",
        "slow download 2 (GET)",
    ];
    println!(
        "  {:<24} {:>22} {:>22} {:>8}",
        "", "backend busy: direct", "through spillway", "bytes"
    );
    for (i, name) in names.iter().enumerate() {
        let (d, p) = (r.direct[i], r.proxied[i]);
        println!(
            "  {:<24} {:>20.3} s {:>20.3} s {:>8}",
            name,
            d.backend_busy.as_secs_f64(),
            p.backend_busy.as_secs_f64(),
            check(d.exact && p.exact)
        );
    }
    let total = |v: &[Held]| v.iter().map(|h| h.backend_busy.as_secs_f64()).sum::<f64>();
    println!(
        "\nThe backend was busy {:.2} s for the direct client and {:.2} s for the same work through spillway; the clients took {:.2} s and {:.2} s.",
        total(&r.direct),
        total(&r.proxied),
        r.direct
            .iter()
            .map(|h| h.client_took.as_secs_f64())
            .sum::<f64>(),
        r.proxied
            .iter()
            .map(|h| h.client_took.as_secs_f64())
            .sum::<f64>(),
    );
}

/// The backend: HTTP/1.1 with keep-alive, `Content-Length` framing. A POST
/// is read whole and answered with its length; a GET is answered with
/// `size` bytes. Each request reports (peer, its number on the
/// connection, busy time).
fn serve(listener: TcpListener, size: u64, busy: mpsc::Sender<(SocketAddr, usize, Duration)>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { return };
        let busy = busy.clone();
        thread::spawn(move || {
            let peer = stream.peer_addr().expect("peer");
            if let Err(e) = serve_connection(stream, size, peer, &busy) {
                log::debug!("demo backend: {peer}: {e}");
            }
        });
    }
}

fn serve_connection(
    mut s: TcpStream,
    size: u64,
    peer: SocketAddr,
    busy: &mpsc::Sender<(SocketAddr, usize, Duration)>,
) -> io::Result<()> {
    socket2::SockRef::from(&s).set_send_buffer_size(SOCKET_BUFFER)?;
    socket2::SockRef::from(&s).set_recv_buffer_size(SOCKET_BUFFER)?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    for seq in 0.. {
        // The head: busy from its first byte.
        let mut started = None;
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            started.get_or_insert_with(Instant::now);
            buf.extend_from_slice(&chunk[..n]);
        };
        let started = started.unwrap_or_else(Instant::now);
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        buf.drain(..end);
        let length: u64 = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap_or(0));
        let mut body_got = buf.len() as u64;
        buf.clear();
        while body_got < length {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            body_got += n as u64;
        }
        if head.starts_with("post") {
            let text = body_got.to_string();
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )?;
        } else {
            write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n")?;
            let mut sent = 0u64;
            while sent < size {
                let n = chunk.len().min((size - sent) as usize);
                pattern(sent, &mut chunk[..n]);
                s.write_all(&chunk[..n])?;
                sent += n as u64;
            }
        }
        let _ = busy.send((peer, seq, started.elapsed()));
    }
    Ok(())
}

/// One client: a slow upload on its own connection, then two slow
/// downloads on one keep-alive connection. (The local address of the
/// connection each ran on, and its figures.)
fn session(addr: SocketAddr, size: u64, rate: u64) -> io::Result<Vec<(SocketAddr, Held)>> {
    let mut out = Vec::new();
    let mut up = connect(addr)?;
    out.push((up.local_addr()?, upload(&mut up, size, rate)?));
    let mut down = connect(addr)?;
    let local = down.local_addr()?;
    for _ in 0..2 {
        out.push((local, download(&mut down, size, rate)?));
    }
    Ok(out)
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_recv_buffer_size(SOCKET_BUFFER)?;
    socket.set_send_buffer_size(SOCKET_BUFFER)?;
    socket.connect(&addr.into())?;
    Ok(socket.into())
}

/// Sleep until `done` bytes are due at `rate` bytes/s since `started`.
fn pace(started: Instant, done: u64, rate: u64) {
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    if let Some(ahead) = due.checked_sub(started.elapsed()) {
        thread::sleep(ahead);
    }
}

fn upload(s: &mut TcpStream, size: u64, rate: u64) -> io::Result<Held> {
    let started = Instant::now();
    write!(
        s,
        "POST /upload HTTP/1.1\r\nHost: demo\r\nContent-Length: {size}\r\n\r\n"
    )?;
    let mut chunk = vec![0u8; 16 * 1024];
    let mut sent = 0u64;
    while sent < size {
        let n = chunk.len().min((size - sent) as usize);
        pattern(sent, &mut chunk[..n]);
        s.write_all(&chunk[..n])?;
        sent += n as u64;
        pace(started, sent, rate);
    }
    let (_, body) = read_response(s, u64::MAX, |_, _| {})?;
    Ok(Held {
        backend_busy: Duration::ZERO,
        client_took: started.elapsed(),
        exact: body == size.to_string().as_bytes(),
    })
}

fn download(s: &mut TcpStream, size: u64, rate: u64) -> io::Result<Held> {
    let started = Instant::now();
    write!(s, "GET /download HTTP/1.1\r\nHost: demo\r\n\r\n")?;
    let mut exact = true;
    let mut expect = vec![0u8; 64 * 1024];
    let (length, _) = read_response(s, rate, |offset, bytes| {
        pattern(offset, &mut expect[..bytes.len()]);
        exact &= bytes == &expect[..bytes.len()];
    })?;
    Ok(Held {
        backend_busy: Duration::ZERO,
        client_took: started.elapsed(),
        exact: exact && length == size,
    })
}

/// Read one response framed by `Content-Length` at `rate` bytes/s, handing
/// each piece of body to `check`: its length, and the body itself if it is
/// small (a large one is only checked, not kept).
fn read_response(
    s: &mut TcpStream,
    rate: u64,
    mut check: impl FnMut(u64, &[u8]),
) -> io::Result<(u64, Vec<u8>)> {
    let started = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let length: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Content-Length"))?;
    let mut body = buf.split_off(end);
    let keep = length <= 1024;
    let mut got = body.len() as u64;
    check(0, &body);
    if !keep {
        body.clear();
    }
    while got < length {
        let want = chunk.len().min((length - got) as usize);
        let n = s.read(&mut chunk[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        check(got, &chunk[..n]);
        if keep {
            body.extend_from_slice(&chunk[..n]);
        }
        got += n as u64;
        if rate != u64::MAX {
            pace(started, got, rate);
        }
    }
    Ok((length, body))
}
