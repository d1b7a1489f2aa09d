//! The two ends the bench plays itself: an HTTP/1.1 backend that answers
//! every `GET /<anything>/<id>` with a checkable body of a fixed size, and
//! the clients that fetch and check it, fast or paced.
//!
//! The backend comes in two kinds. [`HttpBackend::start`] answers one
//! request per connection and closes, and records each connection's hold
//! time, accept to close (the TCP workloads). [`HttpBackend::keep_alive`]
//! serves any number of requests per connection, checks the body of every
//! `POST /<anything>/<id>` against what a client sends for that id, and
//! records each request's busy time, from the first byte of its head to
//! the last byte of its response (the HTTP workload).
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

/// The in-process backend: a thread per connection. Connections that never
/// send a request (the probes that check a proxy is up, idle pooled ones a
/// proxy closes) are not counted.
pub struct HttpBackend {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// One-request connections: accept to close, per connection.
    holds: Arc<Mutex<Vec<Duration>>>,
    /// Keep-alive connections: one record per request.
    served: Arc<Mutex<Vec<Served>>>,
    acceptor: Option<JoinHandle<()>>,
}

/// One request the keep-alive backend answered.
#[derive(Clone, Debug)]
pub struct Served {
    /// From the first byte of the request head to the last byte of the
    /// response written.
    pub busy: Duration,
    /// Why an upload's body was not what the client sent; None for an
    /// exact upload and for every download.
    pub wrong: Option<String>,
}

/// What a connection of the backend does, and with what sizes.
#[derive(Clone, Copy)]
enum Serving {
    /// One GET answered with `body` bytes, then close.
    Once { body: u64, sndbuf: Option<usize> },
    /// Any number of requests: a GET gets `download` bytes, a POST's body
    /// must be `upload` bytes as the client sends them for its id. Both
    /// socket buffers are `buffers`.
    KeepAlive {
        download: u64,
        upload: u64,
        buffers: usize,
    },
}

impl HttpBackend {
    /// One request per connection. `sndbuf`: SO_SNDBUF of every accepted
    /// socket, so the kernel cannot hide a slow reader behind megabytes of
    /// autotuned buffer.
    pub fn start(body: u64, sndbuf: Option<usize>) -> HttpBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
        HttpBackend::serve(listener, Serving::Once { body, sndbuf })
    }

    /// HTTP/1.1 keep-alive, downloads of `download` bytes and uploads of
    /// `upload`, with SO_SNDBUF and SO_RCVBUF of every connection fixed at
    /// `buffers`, so that neither kernel soaks up the difference in speed
    /// between a proxy and a slow client.
    pub fn keep_alive(download: u64, upload: u64, buffers: usize) -> HttpBackend {
        // SO_RCVBUF before listen: accepted sockets inherit it, and the
        // window scale offered in the SYN-ACK is sized from it.
        let socket =
            Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("backend socket");
        socket
            .set_recv_buffer_size(buffers)
            .expect("backend SO_RCVBUF");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind the backend");
        socket.listen(1024).expect("listen");
        HttpBackend::serve(
            socket.into(),
            Serving::KeepAlive {
                download,
                upload,
                buffers,
            },
        )
    }

    fn serve(listener: TcpListener, serving: Serving) -> HttpBackend {
        let addr = listener.local_addr().expect("backend address");
        let stop = Arc::new(AtomicBool::new(false));
        let holds = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, holds, served) = (stop.clone(), holds.clone(), served.clone());
            thread::spawn(move || {
                // Bounded by `stop`: Drop sets it, then connects to wake us.
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let accepted = Instant::now();
                    let (holds, served) = (holds.clone(), served.clone());
                    thread::spawn(move || match serving {
                        Serving::Once { body, sndbuf } => {
                            if serve(stream, body, sndbuf).unwrap_or(false) {
                                holds.lock().unwrap().push(accepted.elapsed());
                            }
                        }
                        Serving::KeepAlive {
                            download,
                            upload,
                            buffers,
                        } => {
                            // An error ends the connection; what it served
                            // is recorded already, what it did not is
                            // missing from the count.
                            let _ = serve_keep_alive(stream, download, upload, buffers, &served);
                        }
                    });
                }
            })
        };
        HttpBackend {
            addr,
            stop,
            holds,
            served,
            acceptor: Some(acceptor),
        }
    }

    /// Wait (bounded) until `n` requests have been served since the last
    /// call, and take their records.
    pub fn take_served(&self, n: usize, timeout: Duration) -> Vec<Served> {
        let deadline = Instant::now() + timeout;
        while self.served.lock().unwrap().len() < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        std::mem::take(&mut *self.served.lock().unwrap())
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
    write_body(&mut stream, id, body)?;
    drop(stream);
    Ok(true)
}

/// What the keep-alive backend reads from a request head.
struct Request {
    post: bool,
    id: u64,
    length: Option<u64>,
    chunked: bool,
    /// `Connection: close`, or HTTP/1.0 without `keep-alive`.
    close: bool,
}

impl Request {
    fn parse(head: &[u8]) -> Request {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n");
        let line = lines.next().unwrap_or("");
        let mut words = line.split(' ');
        let post = words.next() == Some("POST");
        let http10 = line.ends_with("HTTP/1.0");
        let (mut length, mut chunked, mut connection) = (None, false, String::new());
        for (name, value) in lines.filter_map(|l| l.split_once(':')) {
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            } else if name.eq_ignore_ascii_case("connection") {
                connection = value.to_ascii_lowercase();
            }
        }
        Request {
            post,
            id: request_id(head).unwrap_or(0),
            length,
            chunked,
            close: connection.contains("close") || (http10 && !connection.contains("keep-alive")),
        }
    }
}

/// Serve one keep-alive connection until the other end closes it (or asks
/// to), recording every request in `served`.
fn serve_keep_alive(
    mut stream: TcpStream,
    download: u64,
    upload: u64,
    buffers: usize,
    served: &Mutex<Vec<Served>>,
) -> io::Result<()> {
    SockRef::from(&stream).set_send_buffer_size(buffers)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // Bytes read and not yet used: a head can arrive with the first bytes
    // of its body.
    let mut inbox: Vec<u8> = Vec::with_capacity(4096);
    let mut block = vec![0u8; 64 * 1024];
    loop {
        // The clock starts at the head's first byte: when a read returns
        // it, or now if it came with the previous request's last bytes.
        let mut first = (!inbox.is_empty()).then(Instant::now);
        let end = loop {
            if let Some(end) = inbox.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            if inbox.len() > MAX_HEAD {
                return Ok(());
            }
            let n = read_some(&mut stream, &mut block)?;
            if n == 0 {
                return Ok(()); // a probe, or an idle connection closed
            }
            first.get_or_insert_with(Instant::now);
            inbox.extend_from_slice(&block[..n]);
        };
        let first = first.unwrap_or_else(Instant::now);
        let request = Request::parse(&inbox[..end]);
        inbox.drain(..end + 4);
        let close = if request.close {
            "Connection: close\r\n"
        } else {
            ""
        };
        let wrong = if request.post {
            let wrong = read_upload(&mut stream, &mut inbox, &mut block, &request, upload)?;
            let (status, verdict) = match &wrong {
                None => ("200 OK", "exact".to_string()),
                Some(why) => ("422 Unprocessable Content", why.clone()),
            };
            write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{close}\r\n{verdict}",
                verdict.len()
            )?;
            wrong
        } else {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {download}\r\n{close}\r\n"
            )?;
            write_body(&mut stream, request.id, download)?;
            None
        };
        served.lock().unwrap().push(Served {
            busy: first.elapsed(),
            wrong,
        });
        // A chunked body is not read: nothing after it could be parsed.
        if request.close || (request.post && request.chunked) {
            return Ok(());
        }
    }
}

/// Read an upload's body (what `inbox` holds of it first), comparing it
/// with what a client sends for its id; why it is wrong, if it is.
fn read_upload(
    stream: &mut TcpStream,
    inbox: &mut Vec<u8>,
    block: &mut [u8],
    request: &Request,
    upload: u64,
) -> io::Result<Option<String>> {
    let Some(length) = request.length.filter(|_| !request.chunked) else {
        return Ok(Some(
            "no Content-Length (the bench's backend reads no chunked body)".into(),
        ));
    };
    let mut checker = Checker::new(request.id);
    let from_inbox = (length as usize).min(inbox.len());
    checker.feed(&inbox[..from_inbox]);
    inbox.drain(..from_inbox);
    let mut left = length - from_inbox as u64;
    while left > 0 {
        let want = (left as usize).min(block.len());
        let n = read_some(stream, &mut block[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        checker.feed(&block[..n]);
        left -= n as u64;
    }
    Ok(if length != upload {
        Some(format!("body of {length} bytes, expected {upload}"))
    } else {
        checker
            .first_wrong
            .map(|at| format!("body differs from what was sent at byte {at}"))
    })
}

/// `len` bytes of the body for `id`, in slices of at most CHUNK.
fn write_body(stream: &mut TcpStream, id: u64, len: u64) -> io::Result<()> {
    let pattern = pattern();
    let mut at = start_of(id);
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        stream.write_all(&pattern[at..at + n])?;
        at = (at + n) % PERIOD;
        left -= n as u64;
    }
    Ok(())
}

/// A read that retries when interrupted by a signal.
fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
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
    let started = Instant::now();
    let mut stream = connect(addr, rcvbuf, None)?;
    write!(
        stream,
        "GET /{kind}/{id} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send the request: {e}"))?;
    let body_bytes = read_response(&mut stream, id, expect, pace, started, deadline, true)?;
    Ok(Fetched {
        took: started.elapsed(),
        body_bytes,
    })
}

/// A client socket connected to `addr`, with SO_RCVBUF and SO_SNDBUF set
/// before connect (so the window is fixed too) when given.
pub fn connect(
    addr: SocketAddr,
    rcvbuf: Option<usize>,
    sndbuf: Option<usize>,
) -> Result<TcpStream, String> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| format!("socket: {e}"))?;
    if let Some(size) = rcvbuf {
        socket
            .set_recv_buffer_size(size)
            .map_err(|e| format!("SO_RCVBUF: {e}"))?;
    }
    if let Some(size) = sndbuf {
        socket
            .set_send_buffer_size(size)
            .map_err(|e| format!("SO_SNDBUF: {e}"))?;
    }
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(10))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// GET `/<kind>/<id>` on `stream`, which stays open for the next request,
/// and read the response: 200, `Content-Length: expect`, the body the
/// backend sends for `id`, and nothing after it. Paced from the moment the
/// request is sent.
pub fn get(
    stream: &mut TcpStream,
    kind: &str,
    id: u64,
    expect: u64,
    pace: Pace,
    deadline: Instant,
) -> Result<(), String> {
    let started = Instant::now();
    write!(stream, "GET /{kind}/{id} HTTP/1.1\r\nHost: bench\r\n\r\n")
        .map_err(|e| format!("send the request: {e}"))?;
    read_response(stream, id, expect, pace, started, deadline, false).map(|_| ())
}

/// POST `size` bytes to `/<kind>/<id>` on a new connection to `addr`
/// (SO_SNDBUF and SO_RCVBUF fixed at `buffers`), the body written at
/// `pace` in steps of 64KiB, or as fast as it goes; then read the
/// backend's verdict, which must be a 200 (the body arrived exact). How
/// long it took, connect to verdict.
pub fn post(
    addr: SocketAddr,
    kind: &str,
    id: u64,
    size: u64,
    pace: Pace,
    buffers: Option<usize>,
    deadline: Instant,
) -> Result<Duration, String> {
    let started = Instant::now();
    let mut stream = connect(addr, buffers, buffers)?;
    write!(
        stream,
        "POST /{kind}/{id} HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send the request head: {e}"))?;
    let step = match pace {
        Pace::Fast => CHUNK,
        Pace::Paced { .. } => 64 * 1024,
    };
    let pattern = pattern();
    let mut at = start_of(id);
    let mut sent = 0u64;
    while sent < size {
        if Instant::now() > deadline {
            return Err(format!("deadline passed after {sent} of {size} body bytes"));
        }
        if let Pace::Paced { bytes_per_s } = pace {
            // May write the next step once `sent` bytes are due.
            let due = started + Duration::from_secs_f64(sent as f64 / bytes_per_s as f64);
            let now = Instant::now();
            if due > now {
                thread::sleep((due - now).min(deadline.saturating_duration_since(now)));
            }
        }
        let n = (size - sent).min(step as u64) as usize;
        stream
            .write_all(&pattern[at..at + n])
            .map_err(|e| format!("write after {sent} of {size} body bytes: {e}"))?;
        at = (at + n) % PERIOD;
        sent += n as u64;
    }
    let mut verdict = Vec::new();
    (&mut stream)
        .take(64 * 1024)
        .read_to_end(&mut verdict)
        .map_err(|e| format!("read the verdict: {e}"))?;
    let text = String::from_utf8_lossy(&verdict);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("upload answered {status:?}: {}", body.trim()));
    }
    Ok(started.elapsed())
}

/// Read a response on `stream` and check it; its body's length. With
/// `to_eof` the body is what comes until the other end closes; without, it
/// is exactly the `Content-Length` the head must give, and the stream is
/// left at the end of it. `pace` counts from `started`.
fn read_response(
    stream: &mut TcpStream,
    id: u64,
    expect: u64,
    pace: Pace,
    started: Instant,
    deadline: Instant,
    to_eof: bool,
) -> Result<u64, String> {
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
        if !to_eof && head.is_none() && checker.seen >= expect {
            break;
        }
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
        // Once the head is in, a keep-alive read takes no byte past the
        // body: there should be none, and any would belong to no request.
        let want = match (&head, to_eof) {
            (None, false) => ((expect - checker.seen) as usize).min(step),
            _ => step,
        };
        let n = match stream.read(&mut buf[..want]) {
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
            check_head(&h[..end], expect, !to_eof)?;
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
    Ok(checker.seen)
}

/// A 200 response with the expected Content-Length, if it gives one (it
/// must, with `need_length`: a keep-alive response ends there).
fn check_head(head: &[u8], expect: u64, need_length: bool) -> Result<(), String> {
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
        None if need_length => Err("a keep-alive response without Content-Length".into()),
        _ => Ok(()),
    }
}
