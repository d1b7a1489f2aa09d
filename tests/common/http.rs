//! HTTP pieces for tests through the real binary in `--mode http`: a
//! backend that records every request it gets (which connection, when, the
//! head and body, byte for byte) and answers by a script, and a client-side
//! response reader that understands `Content-Length`, chunks and close.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{Bg, listen, spawn};

/// One request as a backend received it.
#[derive(Clone, Debug)]
pub struct Got {
    /// Which of the backend's connections (0, 1, ...) it came on.
    pub conn: usize,
    /// The head as received, through the blank line (lossy UTF-8).
    pub head: String,
    /// The same head byte for byte, for bytes that are not UTF-8.
    pub head_bytes: Vec<u8>,
    pub body: Vec<u8>,
    /// When the backend accepted the connection it came on, and when the
    /// request's last byte was in.
    pub accepted_at: Instant,
    pub complete_at: Instant,
}

impl Got {
    /// The request line.
    pub fn line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    /// Every value of field `name` (case-insensitive), in order.
    pub fn fields(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    pub fn field(&self, name: &str) -> Option<String> {
        self.fields(name).into_iter().next()
    }
}

/// What a scripted backend does with a request.
pub enum Reply {
    /// Write these bytes, and keep the connection for the next request.
    Bytes(Vec<u8>),
    /// Write these bytes, then close.
    BytesThenClose(Vec<u8>),
    /// Write these bytes, then reset.
    BytesThenReset(Vec<u8>),
    /// Close without answering.
    Close,
    /// Say nothing; keep the connection open until the test ends.
    Silence,
}

/// A 200 with `body`, framed by `Content-Length`.
pub fn ok(body: &[u8]) -> Vec<u8> {
    let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    r.extend_from_slice(body);
    r
}

type Script = dyn Fn(&Got) -> Reply + Send + Sync;

/// A backend on 127.0.0.1 that reads requests framed by `Content-Length`
/// (all a proxy may send it), records them, and answers by `script`.
pub struct HttpBackend {
    pub addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<Bg<()>>,
}

impl HttpBackend {
    pub fn start(script: impl Fn(&Got) -> Reply + Send + Sync + 'static) -> HttpBackend {
        let (listener, addr) = listen();
        Self::serve(listener, addr, Arc::new(script))
    }

    /// Answers every request with 200 and a body naming `name`.
    pub fn named(name: &'static str) -> HttpBackend {
        Self::start(move |_| Reply::Bytes(ok(name.as_bytes())))
    }

    fn serve(listener: TcpListener, addr: SocketAddr, script: Arc<Script>) -> HttpBackend {
        let got = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, a, s) = (got.clone(), accepted.clone(), stop.clone());
        listener.set_nonblocking(true).expect("nonblocking");
        let thread = spawn("http backend", move || {
            let mut handlers = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let conn = a.fetch_add(1, Ordering::SeqCst);
                        let (g, script, s) = (g.clone(), script.clone(), s.clone());
                        handlers.push(thread::spawn(move || {
                            handle(stream, conn, &g, &*script, &s);
                        }));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("backend accept: {e}"),
                }
            }
            for h in handlers {
                let _ = h.join();
            }
        });
        HttpBackend {
            addr,
            got,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn arg(&self) -> String {
        self.addr.to_string()
    }

    /// Requests received so far.
    pub fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Wait until `n` requests have come in (or panic after `timeout`).
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<Got> {
        super::wait_until(&format!("{n} request(s) at the backend"), timeout, || {
            self.got.lock().unwrap().len() >= n
        });
        self.got()
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if !thread::panicking() {
                t.join(Duration::from_secs(30));
            }
        }
    }
}

/// Serve one backend connection until it closes or the test ends.
fn handle(
    mut s: TcpStream,
    conn: usize,
    got: &Mutex<Vec<Got>>,
    script: &Script,
    stop: &AtomicBool,
) {
    let accepted_at = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).ok();
    let mut buf = Vec::new();
    loop {
        let Some((head_bytes, body)) = read_request(&mut s, &mut buf, stop) else {
            return;
        };
        let request = Got {
            conn,
            head: String::from_utf8_lossy(&head_bytes).into_owned(),
            head_bytes,
            body,
            accepted_at,
            complete_at: Instant::now(),
        };
        got.lock().unwrap().push(request.clone());
        match script(&request) {
            Reply::Bytes(b) => {
                if s.write_all(&b).is_err() {
                    return;
                }
            }
            Reply::BytesThenClose(b) => {
                let _ = s.write_all(&b);
                return;
            }
            Reply::BytesThenReset(b) => {
                let _ = s.write_all(&b);
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                return;
            }
            Reply::Close => return,
            Reply::Silence => {
                while !stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(5));
                }
                return;
            }
        }
    }
}

/// Read one request framed by `Content-Length` (or none): its head and
/// body; `None` when the connection ends or the test stops first.
fn read_request(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    stop: &AtomicBool,
) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = buf[..end + 4].to_vec();
            let len = String::from_utf8_lossy(&head)
                .split("\r\n")
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| {
                    v.trim().parse::<usize>().expect("a Content-Length")
                });
            while buf.len() < end + 4 + len {
                if !fill(s, buf, &mut chunk, stop)? {
                    return None;
                }
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some((head, body));
        }
        if !fill(s, buf, &mut chunk, stop)? {
            return None;
        }
    }
}

/// One read into `buf`: Some(true) bytes came, Some(false) EOF, None
/// error or stop.
fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, chunk: &mut [u8], stop: &AtomicBool) -> Option<bool> {
    loop {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        match s.read(chunk) {
            Ok(0) => return Some(false),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Some(true);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A response as a client read it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn field(&self, name: &str) -> Option<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    }

    /// The response says the connection closes after it.
    pub fn closes(&self) -> bool {
        self.field("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A client connection that keeps what it read past one response.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::on(super::connect(addr))
    }

    /// A client on a stream connected already (a small window, say).
    pub fn on(stream: TcpStream) -> Client {
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("client write");
    }

    /// Read one response to a request (`head_request`: a HEAD, no body).
    pub fn response(&mut self, head_request: bool) -> Resp {
        self.try_response(head_request)
            .unwrap_or_else(|e| panic!("reading a response: {e}"))
    }

    pub fn try_response(&mut self, head_request: bool) -> io::Result<Resp> {
        let end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end + 4;
            }
            self.more()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end);
        let status: u16 = head[9..12].parse().expect("a status");
        let resp_field = |name: &str| {
            head.split("\r\n")
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        };
        if (100..200).contains(&status) {
            return Ok(Resp {
                status,
                head,
                body: Vec::new(),
            });
        }
        let no_body = head_request || status == 204 || status == 304;
        let body = if no_body {
            Vec::new()
        } else if let Some(len) = resp_field("content-length") {
            let len: usize = len.parse().expect("length");
            while self.buf.len() < len {
                self.more()?;
            }
            self.buf.drain(..len).collect()
        } else if resp_field("transfer-encoding").is_some() {
            self.dechunk()?
        } else {
            loop {
                match self.more() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            std::mem::take(&mut self.buf)
        };
        Ok(Resp { status, head, body })
    }

    fn dechunk(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(at) = find(&self.buf, b"\r\n") {
                    break at;
                }
                self.more()?;
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .expect("a chunk size");
            self.buf.drain(..line_end + 2);
            if size == 0 {
                loop {
                    if let Some(at) = find(&self.buf, b"\r\n") {
                        let empty = at == 0;
                        self.buf.drain(..at + 2);
                        if empty {
                            return Ok(body);
                        }
                    } else {
                        self.more()?;
                    }
                }
            }
            while self.buf.len() < size + 2 {
                self.more()?;
            }
            body.extend_from_slice(&self.buf[..size]);
            assert_eq!(
                &self.buf[size..size + 2],
                b"\r\n",
                "chunk data ends in CRLF"
            );
            self.buf.drain(..size + 2);
        }
    }

    /// Read more; `UnexpectedEof` at EOF.
    fn more(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            return match self.stream.read(&mut chunk) {
                Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
        }
    }

    /// After a response that closes: the next read is EOF (nothing else
    /// was sent), within the harness's timeouts.
    pub fn expect_eof(&mut self) {
        assert!(
            self.buf.is_empty(),
            "bytes after the response: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        match self.more() {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                panic!("a reset where an orderly close was due")
            }
            other => panic!(
                "expected EOF, got {other:?}: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Bytes read but not yet part of a response.
    pub fn leftover(&self) -> &[u8] {
        &self.buf
    }
}

/// `GET path` on HTTP/1.1 with Host.
pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
}

/// `POST path` with a `Content-Length` body.
pub fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Wait until the process at the other end of `stream` has read every byte
/// written to it so far, the stream staying open (`wait_until_peer_read_all`
/// is the same for a stream shut with its FIN): the peer's kernel has
/// acknowledged them all (our `SIOCOUTQ` is zero), then its socket's receive
/// queue is empty. What is written next reaches the peer in a read of its
/// own: how a test cuts a request at an exact byte. The queue is asked of
/// the kernel by `sock_diag` for that one socket, since reading all of
/// `/proc/net/tcp` costs milliseconds once thousands of sockets linger in
/// TIME_WAIT, and a test may do this hundreds of times.
pub fn wait_until_peer_has_read(stream: &TcpStream, timeout: Duration) {
    use std::os::unix::io::AsRawFd;
    const STEP: Duration = Duration::from_micros(100);
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
        assert!(
            Instant::now() < deadline,
            "{unacked} bytes still unacknowledged after {timeout:?}"
        );
        thread::sleep(STEP);
    }
    // The peer's socket: local and remote swapped.
    let peer = stream.peer_addr().expect("peer_addr");
    let local = stream.local_addr().expect("local_addr");
    loop {
        let unread = tcp_receive_queue(peer, local);
        if unread == Some(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the peer {peer} left {unread:?} bytes unread for {timeout:?}"
        );
        thread::sleep(STEP);
    }
}

/// Bytes received and not yet read by its process on the IPv4 TCP socket
/// `local` -> `remote` (what `/proc/net/tcp` calls `rx_queue`), asked of
/// the kernel with one `SOCK_DIAG_BY_FAMILY` request over netlink; `None`
/// if there is no such connection.
pub fn tcp_receive_queue(local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h.
    const NETLINK_SOCK_DIAG: libc::c_int = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct NlMsgHdr {
        len: u32,
        kind: u16,
        flags: u16,
        seq: u32,
        pid: u32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct SockId {
        sport: u16,
        dport: u16,
        src: [u32; 4],
        dst: [u32; 4],
        interface: u32,
        cookie: [u32; 2],
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct ReqV2 {
        family: u8,
        protocol: u8,
        ext: u8,
        pad: u8,
        states: u32,
        id: SockId,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Request {
        header: NlMsgHdr,
        body: ReqV2,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct DiagMsg {
        family: u8,
        state: u8,
        timer: u8,
        retrans: u8,
        id: SockId,
        expires: u32,
        rqueue: u32,
        wqueue: u32,
        uid: u32,
        inode: u32,
    }
    let v4 = |addr: SocketAddr| match addr {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(_) => panic!("IPv4 only: {addr}"),
    };
    let (local, remote) = (v4(local), v4(remote));
    let request = Request {
        header: NlMsgHdr {
            len: std::mem::size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: NLM_F_REQUEST,
            ..NlMsgHdr::default()
        },
        body: ReqV2 {
            family: libc::AF_INET as u8,
            protocol: libc::IPPROTO_TCP as u8,
            states: !0,
            id: SockId {
                sport: local.port().to_be(),
                dport: remote.port().to_be(),
                src: [u32::from_ne_bytes(local.ip().octets()), 0, 0, 0],
                dst: [u32::from_ne_bytes(remote.ip().octets()), 0, 0, 0],
                interface: 0,
                // INET_DIAG_NOCOOKIE: look the socket up by its addresses.
                cookie: [!0, !0],
            },
            ..ReqV2::default()
        },
    };
    // SAFETY: socket() takes integers; a valid fd is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    assert!(fd >= 0, "netlink socket: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl is valid; it names the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: the pointers are to live locals of the sizes given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            (&raw const request).cast(),
            std::mem::size_of::<Request>(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    assert!(
        sent >= 0,
        "sock_diag request: {}",
        io::Error::last_os_error()
    );
    let mut reply = [0u64; 1024];
    // SAFETY: `reply` is a live buffer of the size given (u64s: aligned).
    let got = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            std::mem::size_of_val(&reply),
            0,
        )
    };
    assert!(got >= 0, "sock_diag reply: {}", io::Error::last_os_error());
    let got = got as usize;
    let header_len = std::mem::size_of::<NlMsgHdr>();
    assert!(got >= header_len, "a short sock_diag reply");
    // SAFETY: at least a header's worth of bytes came, the buffer is
    // aligned for it, and any bytes are a valid NlMsgHdr.
    let header: NlMsgHdr = unsafe { std::ptr::read(reply.as_ptr().cast()) };
    if header.kind == NLMSG_ERROR {
        // ENOENT: no such socket (it closed, or never was).
        return None;
    }
    assert_eq!(
        header.kind, SOCK_DIAG_BY_FAMILY,
        "an unexpected netlink reply"
    );
    assert!(got >= header_len + std::mem::size_of::<DiagMsg>());
    // SAFETY: the message follows the header (4-byte aligned, which the
    // u64 buffer gives), the length was checked, any bytes are valid.
    let msg: DiagMsg =
        unsafe { std::ptr::read(reply.as_ptr().cast::<u8>().add(header_len).cast()) };
    // The kernel falls back to a listener on `local` when no connection
    // matches: that is not the socket asked about.
    let asked = request.body.id;
    (msg.id.dport == asked.dport && msg.id.dst[0] == asked.dst[0]).then_some(msg.rqueue)
}
