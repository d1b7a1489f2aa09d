//! The two ends the bench plays itself: an HTTP/1.1 backend that answers
//! every `GET /<anything>/<id>` with a checkable body of a fixed size and
//! then closes, and the client that fetches and checks it, fast or paced.
//!
//! Every workload here speaks HTTP, even bulk, so that nginx's `http`
//! proxy can sit in every table; the TCP proxies relay it unchanged.
//!
//! The body is pseudo-random with a period that is no multiple of any
//! buffer size, and each connection starts at an offset derived from the
//! id in its path, so a byte out of place, lost or doubled, or a response
//! sent to the wrong client, does not compare equal.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// The largest slice the backend writes, and the client compares, at once.
pub const CHUNK: usize = 1 << 20;

/// The body's period: a prime, so it lines up with no buffer size.
const PERIOD: usize = 1_048_583;

/// A request head, or a response head, longer than this is refused.
const MAX_HEAD: usize = 16 * 1024;

/// Read and write timeout of the backend's sockets: a stuck proxy fails a
/// run instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// PERIOD + CHUNK bytes of the body's cycle, so that any CHUNK-long window
/// starting inside the period is one slice.
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        // splitmix64: cheap, deterministic, and no two windows alike.
        let mut state = 0x5350_494c_4c57_4159u64;
        let mut bytes = Vec::with_capacity(PERIOD + CHUNK + 8);
        while bytes.len() < PERIOD {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            bytes.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        bytes.truncate(PERIOD);
        let head = bytes[..CHUNK].to_vec();
        bytes.extend_from_slice(&head);
        bytes
    })
}

/// Where in the cycle the body for `id` starts.
fn start_of(id: u64) -> usize {
    (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) as usize % PERIOD
}

/// Compares a body, as it arrives in pieces, with what the backend sent.
struct Checker {
    at: usize,
    seen: u64,
    first_wrong: Option<u64>,
}

impl Checker {
    fn new(id: u64) -> Checker {
        Checker {
            at: start_of(id),
            seen: 0,
            first_wrong: None,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        let pattern = pattern();
        while !bytes.is_empty() {
            let n = bytes.len().min(CHUNK);
            if self.first_wrong.is_none() {
                let want = &pattern[self.at..self.at + n];
                // Slices compare with memcmp; the byte-by-byte search for
                // where they differ only runs once they do. Done per byte
                // always, it cost the client as much CPU as a proxy and
                // pulled every bulk figure towards the client's speed.
                if want != &bytes[..n] {
                    let i = want.iter().zip(&bytes[..n]).position(|(a, b)| a != b);
                    self.first_wrong = Some(self.seen + i.unwrap_or(0) as u64);
                }
            }
            self.at = (self.at + n) % PERIOD;
            self.seen += n as u64;
            bytes = &bytes[n..];
        }
    }
}

/// The in-process backend. Each connection gets a thread: read the request
/// head, write the head and `body` bytes, close; the time from accept to
/// close is its hold time. Connections that never send a request (the
/// probes that check a proxy is up) are not counted.
pub struct HttpBackend {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    holds: Arc<Mutex<Vec<Duration>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl HttpBackend {
    /// `sndbuf`: SO_SNDBUF of every accepted socket, so the kernel cannot
    /// hide a slow reader behind megabytes of autotuned buffer.
    pub fn start(body: u64, sndbuf: Option<usize>) -> HttpBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
        let addr = listener.local_addr().expect("backend address");
        let stop = Arc::new(AtomicBool::new(false));
        let holds = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, holds) = (stop.clone(), holds.clone());
            thread::spawn(move || {
                // Bounded by `stop`: Drop sets it, then connects to wake us.
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let accepted = Instant::now();
                    let holds = holds.clone();
                    thread::spawn(move || {
                        if serve(stream, body, sndbuf).unwrap_or(false) {
                            holds.lock().unwrap().push(accepted.elapsed());
                        }
                    });
                }
            })
        };
        HttpBackend {
            addr,
            stop,
            holds,
            acceptor: Some(acceptor),
        }
    }

    /// Wait (bounded) until `n` responses have been recorded since the
    /// last call, and take their hold times.
    pub fn take_holds(&self, n: usize, timeout: Duration) -> Vec<Duration> {
        let deadline = Instant::now() + timeout;
        while self.holds.lock().unwrap().len() < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        std::mem::take(&mut *self.holds.lock().unwrap())
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The acceptor sees the flag on its next connection: make one. If
        // that fails, leave the thread blocked rather than hang here.
        let woken = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(acceptor) = self.acceptor.take().filter(|_| woken) {
            let _ = acceptor.join();
        }
    }
}

/// Serve one connection; Ok(true) if a whole response was written.
fn serve(mut stream: TcpStream, body: u64, sndbuf: Option<usize>) -> io::Result<bool> {
    if let Some(size) = sndbuf {
        SockRef::from(&stream).set_send_buffer_size(size)?;
    }
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // Read the whole head: a byte of request left unread at close would
    // make the kernel answer with a reset instead of a FIN. Nothing comes
    // after it (no body, no second request), so reading in blocks is safe.
    let mut head = Vec::with_capacity(512);
    let mut block = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Ok(false);
        }
        let n = stream.read(&mut block)?;
        if n == 0 {
            return Ok(false); // a probe, or a client that gave up
        }
        head.extend_from_slice(&block[..n]);
    }
    let id = request_id(&head).unwrap_or(0);
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {body}\r\nConnection: close\r\n\r\n"
    )?;
    let pattern = pattern();
    let mut at = start_of(id);
    let mut left = body;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        stream.write_all(&pattern[at..at + n])?;
        at = (at + n) % PERIOD;
        left -= n as u64;
    }
    drop(stream);
    Ok(true)
}

/// The number after the last `/` of the request path.
fn request_id(head: &[u8]) -> Option<u64> {
    let line = head.split(|b| *b == b'\r').next()?;
    let path = std::str::from_utf8(line).ok()?.split(' ').nth(1)?;
    path.rsplit('/').next()?.parse().ok()
}

/// How a client reads: as fast as it can, or at most `bytes_per_s`.
#[derive(Clone, Copy)]
pub enum Pace {
    Fast,
    Paced { bytes_per_s: u64 },
}

/// What one client did.
pub struct Fetched {
    /// Time from connect to the end of the body.
    pub took: Duration,
    pub body_bytes: u64,
}

/// GET `/<kind>/<id>` from `addr`, read the response to EOF and check its
/// body: `expect` bytes, equal to what the backend sends for `id`.
///
/// `rcvbuf` fixes SO_RCVBUF before connect (so the window is fixed too);
/// `deadline` bounds the whole exchange.
pub fn fetch(
    addr: SocketAddr,
    kind: &str,
    id: u64,
    expect: u64,
    pace: Pace,
    rcvbuf: Option<usize>,
    deadline: Instant,
) -> Result<Fetched, String> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("socket: {e}"))?;
    if let Some(size) = rcvbuf {
        socket
            .set_recv_buffer_size(size)
            .map_err(|e| format!("SO_RCVBUF: {e}"))?;
    }
    let started = Instant::now();
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(10))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET /{kind}/{id} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send the request: {e}"))?;

    // Paced clients take at most one step per read, as an application that
    // processes what it read before reading more would.
    let step = match pace {
        Pace::Fast => CHUNK,
        Pace::Paced { .. } => 64 * 1024,
    };
    let mut buf = vec![0u8; step];
    let mut head: Option<Vec<u8>> = Some(Vec::new());
    let mut checker = Checker::new(id);
    let mut total = 0u64; // head and body: what the pace applies to
    loop {
        if Instant::now() > deadline {
            return Err(format!(
                "deadline passed after {} of {expect} body bytes",
                checker.seen
            ));
        }
        if let Pace::Paced { bytes_per_s } = pace {
            // May read the next step once `total` bytes are due.
            let due = started + Duration::from_secs_f64(total as f64 / bytes_per_s as f64);
            let now = Instant::now();
            if due > now {
                thread::sleep((due - now).min(deadline.saturating_duration_since(now)));
            }
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(format!("read after {} body bytes: {e}", checker.seen));
            }
        };
        total += n as u64;
        let mut got = &buf[..n];
        if let Some(h) = head.as_mut() {
            h.extend_from_slice(got);
            let Some(end) = h.windows(4).position(|w| w == b"\r\n\r\n") else {
                if h.len() > MAX_HEAD {
                    return Err("no end of the response head".into());
                }
                continue;
            };
            check_head(&h[..end], expect)?;
            // What came after the head in this read is body.
            let body_in_buf = h.len() - (end + 4);
            got = &buf[n - body_in_buf..n];
            head = None;
        }
        checker.feed(got);
    }
    if head.is_some() {
        return Err("closed before the response head ended".into());
    }
    if checker.seen != expect {
        return Err(format!("body is {} bytes, expected {expect}", checker.seen));
    }
    if let Some(at) = checker.first_wrong {
        return Err(format!("body differs from what was sent at byte {at}"));
    }
    Ok(Fetched {
        took: started.elapsed(),
        body_bytes: checker.seen,
    })
}

/// A 200 response with the expected Content-Length, if it gives one.
fn check_head(head: &[u8], expect: u64) -> Result<(), String> {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    if !(status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200")) {
        return Err(format!("response status {status:?}"));
    }
    let length = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, value)| value.trim());
    match length {
        Some(v) if v.parse::<u64>().ok() != Some(expect) => {
            Err(format!("Content-Length {v} for a body of {expect}"))
        }
        _ => Ok(()),
    }
}
