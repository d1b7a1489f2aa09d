//! The backends, each a listener on 127.0.0.1 with a personality, and one
//! thread per connection that keeps the books of what it received and
//! sent and how its streams ended.
//!
//! Every listener can be taken down and brought back on the same port
//! (`shutdown` on a listening socket stops it listening; since the port was
//! bound explicitly the socket keeps it, and `listen` again resumes), so
//! the flapper flaps and an outage can take them all down at once. Two
//! refusers are ports bound but never listening: connects to them are
//! refused for the whole run.

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::World;
use crate::client::ReadEnd;
use crate::data::{self, HEAD, UpCheck, Writer};
use crate::net::{self, Pace, Step, TICK};
use crate::plan::{BackendReset, Plan};

/// Stack of every connection thread: they hold a 64KiB buffer on the heap
/// and little else, and there are hundreds of them.
pub const STACK: usize = 256 * 1024;

/// How long a backend waits for the hello before it knows its plan.
const HELLO_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Sends back what it reads, after its header.
    Echo,
    /// Reads the whole upload, then sends `response` bytes and a FIN.
    Responder,
    /// Reads the upload at 16-256KiB/s, then responds.
    SlowReader,
    /// Sends its response and a FIN at once, then reads the upload.
    HalfCloser,
    /// Resets mid-response, mid-upload, or just after a complete response.
    Resetter,
    /// Accepts and never reads or writes, until the connection ends.
    Blackhole,
    /// A responder whose listener goes down and comes back.
    Flapper,
    /// Refuses every connect.
    Refuser,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Echo => "echo",
            Kind::Responder => "responder",
            Kind::SlowReader => "slow-reader",
            Kind::HalfCloser => "half-closer",
            Kind::Resetter => "resetter",
            Kind::Blackhole => "blackhole",
            Kind::Flapper => "flapper",
            Kind::Refuser => "refuser",
        }
    }
}

/// The backends, in the order given to the proxy, with their weights in
/// its round-robin. The blackhole's weight is small: each of its
/// connections lasts until the proxy's idle timeout.
pub const LINEUP: [(Kind, u32); 10] = [
    (Kind::Echo, 3),
    (Kind::Responder, 4),
    (Kind::SlowReader, 2),
    (Kind::HalfCloser, 3),
    (Kind::Resetter, 2),
    (Kind::Blackhole, 1),
    (Kind::Flapper, 2),
    (Kind::Refuser, 1),
    (Kind::Responder, 2),
    (Kind::Refuser, 1),
];

pub struct Backend {
    pub index: usize,
    pub kind: Kind,
    pub addr: SocketAddr,
    pub weight: u32,
    /// Whether it should be listening now: the fault thread sets it, the
    /// acceptor follows.
    pub up: AtomicBool,
    /// Times its listener went down.
    pub downs: AtomicU64,
    pub accepted: AtomicU64,
}

/// What one backend connection did and saw.
#[derive(Clone, Debug)]
pub struct BackendRecord {
    pub backend: usize,
    pub kind: Kind,
    /// From the hello; `None` if less than a whole hello arrived.
    pub id: Option<u64>,
    /// Upstream bytes read, hello included.
    pub received: u64,
    pub read_end: ReadEnd,
    /// Downstream bytes its kernel took, header included.
    pub sent: u64,
    pub fin: Option<Result<(), String>>,
    /// It sent its FIN before it read the proxy's EOF (so the proxy may
    /// close the socket early: the upload's tail is then dropped).
    pub fin_before_eof: bool,
    pub fin_acked: Option<Result<(), String>>,
    pub write_error: Option<String>,
    /// It reset the connection itself (the resetter's plan).
    pub reset_by_us: bool,
    pub gave_up: bool,
    pub aborted: bool,
    pub wrong: Option<String>,
}

pub struct Backends {
    pub list: Vec<Arc<Backend>>,
    acceptors: Vec<JoinHandle<()>>,
    /// Bound and never listening: connects are refused while these live.
    _refusers: Vec<Socket>,
}

impl Backends {
    pub fn start(world: &Arc<World>) -> Result<Backends, String> {
        let mut list = Vec::new();
        let mut acceptors = Vec::new();
        let mut refusers = Vec::new();
        for (index, (kind, weight)) in LINEUP.iter().copied().enumerate() {
            let socket =
                bind_explicit().map_err(|e| format!("bind a {} backend: {e}", kind.name()))?;
            let addr = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or("backend address")?;
            let backend = Arc::new(Backend {
                index,
                kind,
                addr,
                weight,
                up: AtomicBool::new(kind != Kind::Refuser),
                downs: AtomicU64::new(0),
                accepted: AtomicU64::new(0),
            });
            if kind == Kind::Refuser {
                refusers.push(socket);
            } else {
                socket
                    .listen(1024)
                    .map_err(|e| format!("listen on {addr}: {e}"))?;
                let (world, b) = (world.clone(), backend.clone());
                let acceptor = thread::Builder::new()
                    .name(format!("soak-{}", kind.name()))
                    .spawn(move || accept_loop(&world, &b, socket))
                    .map_err(|e| format!("spawn an acceptor: {e}"))?;
                acceptors.push(acceptor);
            }
            list.push(backend);
        }
        Ok(Backends {
            list,
            acceptors,
            _refusers: refusers,
        })
    }

    /// `--backend` arguments for the proxy.
    pub fn args(&self) -> Vec<String> {
        self.list
            .iter()
            .flat_map(|b| {
                [
                    "--backend".to_string(),
                    format!("{},weight={}", b.addr, b.weight),
                ]
            })
            .collect()
    }

    pub fn flapper(&self) -> &Arc<Backend> {
        self.list
            .iter()
            .find(|b| b.kind == Kind::Flapper)
            .expect("the lineup has a flapper")
    }

    /// Take every listener down (an outage) or bring them all back.
    pub fn set_all_up(&self, up: bool) {
        for b in self.list.iter().filter(|b| b.kind != Kind::Refuser) {
            b.up.store(up, Ordering::Relaxed);
        }
    }

    /// Stop the acceptors (the world's `stop_backends` is set).
    pub fn join(self) {
        for a in self.acceptors {
            let _ = a.join();
        }
    }
}

/// A socket bound to a port named explicitly, so that it keeps the port
/// when it stops listening (a port chosen by bind(0) is released then).
fn bind_explicit() -> std::io::Result<Socket> {
    let mut last = None;
    for _ in 0..20 {
        let probe = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        probe.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        let port = probe
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .unwrap_or(0);
        drop(probe);
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        match socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into()) {
            Ok(()) => return Ok(socket),
            // Someone took the port meanwhile: another one.
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried"))
}

fn accept_loop(world: &Arc<World>, backend: &Arc<Backend>, listener: Socket) {
    let _ = listener.set_nonblocking(true);
    let mut listening = true;
    while !world.stop_backends.load(Ordering::Relaxed) {
        let want = backend.up.load(Ordering::Relaxed);
        if want != listening {
            if want {
                if let Err(e) = listener.listen(1024) {
                    world.books.note(format!(
                        "soak: cannot listen again on {}: {e}",
                        backend.addr
                    ));
                    thread::sleep(TICK);
                    continue;
                }
            } else {
                // Take what is queued first: those connects have succeeded
                // as far as the proxy knows. (One that lands between this
                // and the shutdown is reset: a backend dying under it.)
                accept_all(world, backend, &listener);
                let _ = listener.shutdown(Shutdown::Both);
                backend.downs.fetch_add(1, Ordering::Relaxed);
            }
            listening = want;
        }
        if !listening {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        let mut fd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack, for the duration of the call.
        unsafe { libc::poll(&mut fd, 1, 20) };
        accept_all(world, backend, &listener);
    }
}

fn accept_all(world: &Arc<World>, backend: &Arc<Backend>, listener: &Socket) {
    loop {
        match listener.accept() {
            Ok((socket, _)) => {
                backend.accepted.fetch_add(1, Ordering::Relaxed);
                let stream: TcpStream = socket.into();
                spawn_session(world, backend, stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
            Err(e) => {
                world
                    .books
                    .note(format!("soak: accept on {} failed: {e}", backend.addr));
                thread::sleep(TICK);
                return;
            }
        }
    }
}

fn spawn_session(world: &Arc<World>, backend: &Arc<Backend>, stream: TcpStream) {
    world.live_backend_conns.fetch_add(1, Ordering::SeqCst);
    let (w, b) = (world.clone(), backend.clone());
    let spawned = thread::Builder::new()
        .name("soak-backend-conn".into())
        .stack_size(STACK)
        .spawn(move || {
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(&w, &b, stream)));
            match outcome {
                Ok(record) => w.books.backend_done(record),
                Err(panic) => w.books.note(format!(
                    "soak: a {} backend thread panicked: {}",
                    b.kind.name(),
                    crate::panic_text(&panic)
                )),
            }
            w.live_backend_conns.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        world.live_backend_conns.fetch_sub(1, Ordering::SeqCst);
        world
            .books
            .note(format!("soak: cannot spawn a backend thread: {e}"));
    }
}

/// One backend connection, from accept to close.
struct Session<'a> {
    world: &'a World,
    stream: TcpStream,
    check: UpCheck,
    rec: BackendRecord,
    deadline: Instant,
    buf: Vec<u8>,
}

fn serve(world: &World, backend: &Backend, stream: TcpStream) -> BackendRecord {
    let _ = stream.set_nonblocking(true);
    let _ = stream.set_nodelay(true);
    let mut s = Session {
        world,
        stream,
        check: UpCheck::new(),
        rec: BackendRecord {
            backend: backend.index,
            kind: backend.kind,
            id: None,
            received: 0,
            read_end: ReadEnd::Stopped,
            sent: 0,
            fin: None,
            fin_before_eof: false,
            fin_acked: None,
            write_error: None,
            reset_by_us: false,
            gave_up: false,
            aborted: false,
            wrong: None,
        },
        deadline: Instant::now() + HELLO_PATIENCE,
        buf: vec![0u8; data::WINDOW],
    };
    if backend.kind == Kind::Blackhole {
        return blackhole(s);
    }
    if !s.read_to(HEAD as u64, Pace::new(None)) {
        return s.close();
    }
    let id = s.rec.id.expect("a whole hello names the connection");
    let plan = Plan::new(world.seed, id);
    s.deadline = Instant::now() + plan.patience();
    let body = data::body_key(id);
    match backend.kind {
        Kind::Echo => s.echo(&plan),
        Kind::Responder | Kind::Flapper | Kind::SlowReader => {
            let (writer, pace, len) = match backend.kind {
                Kind::SlowReader => (
                    Writer::SlowReader,
                    Some(plan.backend_read_rate),
                    plan.slow_response,
                ),
                Kind::Flapper => (Writer::Flapper, None, plan.response),
                _ => (Writer::Responder, None, plan.response),
            };
            if s.read_to(plan.upstream_len(), Pace::new(pace))
                && s.write(&data::header(writer, id), body, HEAD as u64 + len)
            {
                s.shut();
            }
            s.drain();
            s.close()
        }
        Kind::HalfCloser => {
            if s.write(
                &data::header(Writer::HalfCloser, id),
                body,
                HEAD as u64 + plan.response,
            ) {
                s.shut();
            }
            s.drain();
            s.close()
        }
        Kind::Resetter => {
            let header = data::header(Writer::Resetter, id);
            match plan.backend_reset {
                BackendReset::MidResponse(k) => {
                    s.write(&header, body, k.min(HEAD as u64 + plan.response));
                }
                BackendReset::MidUpload(k) => {
                    s.read_to(k, Pace::new(None));
                }
                BackendReset::AfterFin(wait) => {
                    if s.write(&header, body, HEAD as u64 + plan.response) {
                        s.shut();
                        thread::sleep(wait);
                    }
                }
            }
            s.rec.reset_by_us = true;
            s.reset()
        }
        Kind::Blackhole | Kind::Refuser => unreachable!("handled above / never accepts"),
    }
}

/// Accept, learn the id by peeking (reading nothing), then hold still
/// until the proxy ends the connection; only then read what the kernel
/// queued, to book it.
///
/// The end is a reset, or the proxy's close line for the connection: a
/// proxy that passes on the client's EOF shuts its write half (a FIN we
/// must not take for the end), and its later close sends nothing more if
/// nothing of ours is unread in its socket, which there never is.
fn blackhole(mut s: Session) -> BackendRecord {
    let mut hello = [0u8; HEAD];
    loop {
        if s.expired() {
            return s.reset();
        }
        // Looked at before the peek: bytes sent before a FIN are queued
        // before it, so a hang-up seen here with a short peek after it
        // means the hello never came whole. Looked at after the peek, a
        // hello and FIN arriving in between were taken for that, and the
        // blackhole closed on a proxy that had only passed the client's EOF
        // on (one in ~85,000 connections of an hour's run).
        let ended = net::wait_hangup(&s.stream, true, Duration::ZERO);
        let got = match peek(&s.stream, &mut hello) {
            Ok(n) => n,
            // The peek took the socket's error: it must be booked here, as
            // a read after it would report a plain EOF.
            Err(e) => {
                s.rec.read_end = ReadEnd::Failed(e.to_string());
                return s.close();
            }
        };
        if got == HEAD {
            let mut check = UpCheck::new();
            check.feed(&hello);
            if let Some(id) = check.id {
                s.world.books.backend_open(id);
                s.rec.id = Some(id);
                s.deadline = Instant::now() + Plan::new(s.world.seed, id).patience();
            }
            break;
        }
        // Ended before a whole hello: stop peeking and book what came.
        if ended {
            break;
        }
        if got > 0 {
            thread::sleep(Duration::from_millis(5));
        } else {
            net::wait(&s.stream, true, false, TICK);
        }
    }
    loop {
        let closed = match s.rec.id {
            Some(id) => s.world.books.is_closed(id),
            None => false,
        };
        if closed || net::wait_hangup(&s.stream, s.rec.id.is_none(), TICK) {
            break;
        }
        if s.expired() {
            return s.reset();
        }
    }
    s.drain();
    s.close()
}

/// Copy up to `buf.len()` queued bytes without taking them. An error
/// (a reset) is returned, and with it taken from the socket.
fn peek(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: recv into a live buffer of the given length.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = std::io::Error::last_os_error();
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(0),
        _ => Err(e),
    }
}

impl Session<'_> {
    /// The run's abort or this connection's deadline: stop, and say which.
    fn expired(&mut self) -> bool {
        if self.world.abort.load(Ordering::Relaxed) {
            self.rec.aborted = true;
            return true;
        }
        if Instant::now() >= self.deadline {
            self.rec.gave_up = true;
            return true;
        }
        false
    }

    fn reading(&self) -> bool {
        self.rec.read_end == ReadEnd::Stopped
    }

    /// One read of at most `max` bytes, checked and booked.
    fn read_some(&mut self, max: usize) -> Step {
        let max = max.min(self.buf.len());
        let step = net::read_step(&mut self.stream, &mut self.buf[..max]);
        match &step {
            Step::Moved(n) => {
                self.check.feed(&self.buf[..*n]);
                self.rec.received += *n as u64;
                if self.rec.id.is_none() {
                    if let Some(id) = self.check.id {
                        self.rec.id = Some(id);
                        self.world.books.backend_open(id);
                    }
                }
            }
            // A write that failed took the socket's error: after a reset
            // the kernel reports the end of the stream as a plain EOF.
            Step::Eof => {
                self.rec.read_end = match &self.rec.write_error {
                    Some(e) => ReadEnd::Failed(format!("EOF after a write failed: {e}")),
                    None => ReadEnd::Eof,
                }
            }
            Step::Failed(e) => self.rec.read_end = ReadEnd::Failed(e.to_string()),
            Step::WouldBlock => {}
        }
        step
    }

    /// Read until `target` bytes in all have arrived, at `pace`. False if
    /// the stream ended or time ran out first.
    fn read_to(&mut self, target: u64, pace: Pace) -> bool {
        let from = self.rec.received;
        while self.rec.received < target {
            if !self.reading() || self.expired() {
                return false;
            }
            let done = self.rec.received - from;
            let piece = (pace.piece(data::WINDOW) as u64).min(target - self.rec.received);
            if pace.allowance(done) < piece {
                thread::sleep(pace.wait_for(done, piece).min(TICK));
                continue;
            }
            if let Step::WouldBlock = self.read_some(piece as usize) {
                net::wait(&self.stream, true, false, TICK);
            }
        }
        true
    }

    /// Write the downstream (`header`, then `key`'s body) up to `total`
    /// bytes, reading (and checking) whatever the proxy sends meanwhile.
    /// False if a write failed or time ran out.
    fn write(&mut self, header: &[u8; HEAD], key: u64, total: u64) -> bool {
        while self.rec.sent < total {
            if self.expired() {
                return false;
            }
            let left = (total - self.rec.sent) as usize;
            let bytes = data::downstream(header, key, self.rec.sent, left);
            let mut blocked = false;
            match net::write_step(&mut self.stream, bytes) {
                Step::Moved(n) => self.rec.sent += n as u64,
                Step::WouldBlock => blocked = true,
                Step::Failed(e) => {
                    self.rec.write_error = Some(e.to_string());
                    return false;
                }
                Step::Eof => {}
            }
            let mut idle = blocked;
            if self.reading() {
                match self.read_some(data::WINDOW) {
                    Step::WouldBlock => {}
                    _ => idle = false,
                }
            }
            if idle {
                net::wait(&self.stream, self.reading(), true, TICK);
            }
        }
        true
    }

    /// Echo: the header, then every upload byte back, then a FIN once the
    /// whole planned upload has gone back (or the upload ended early).
    fn echo(mut self, plan: &Plan) -> BackendRecord {
        let id = plan.id;
        let mut pending: Vec<u8> = data::header(Writer::Echo, id).to_vec();
        let mut at = 0;
        let total = plan.upstream_len();
        loop {
            if self.expired() {
                return self.reset();
            }
            let mut progressed = false;
            if at < pending.len() {
                match net::write_step(&mut self.stream, &pending[at..]) {
                    Step::Moved(n) => {
                        at += n;
                        self.rec.sent += n as u64;
                        progressed = true;
                    }
                    Step::WouldBlock => {}
                    Step::Failed(e) => {
                        self.rec.write_error = Some(e.to_string());
                        break;
                    }
                    Step::Eof => {}
                }
            }
            if at == pending.len() {
                pending.clear();
                at = 0;
                let all_in = self.rec.received >= total || !self.reading();
                if all_in {
                    if self.rec.read_end != ReadEnd::Stopped
                        && !matches!(self.rec.read_end, ReadEnd::Eof)
                    {
                        break; // the upload failed: nothing to end cleanly
                    }
                    self.shut();
                    break;
                }
            }
            // Read while what waits to go back is small: the echo's own
            // backpressure, so it never holds more than a few windows. The
            // hello was read before: everything read now is body, sent back
            // as it was checked.
            let want = total.saturating_sub(self.rec.received) as usize;
            if self.reading() && want > 0 && pending.len() - at < 4 * data::WINDOW {
                match self.read_some(want.min(data::WINDOW)) {
                    Step::Moved(n) => {
                        pending.extend_from_slice(&self.buf[..n]);
                        progressed = true;
                    }
                    Step::WouldBlock => {}
                    _ => progressed = true,
                }
            }
            if !progressed {
                net::wait(&self.stream, self.reading(), at < pending.len(), TICK);
            }
        }
        self.drain();
        self.close()
    }

    /// Our FIN, once everything we meant to send is written.
    fn shut(&mut self) {
        self.rec.fin_before_eof = self.rec.read_end != ReadEnd::Eof;
        self.rec.fin = Some(net::shut_write(&self.stream).map_err(|e| e.to_string()));
    }

    /// Read (and check) until the proxy's EOF or a failure.
    fn drain(&mut self) {
        while self.reading() {
            if self.expired() {
                return;
            }
            if let Step::WouldBlock = self.read_some(data::WINDOW) {
                net::wait(&self.stream, true, false, TICK);
            }
        }
    }

    fn finish(&mut self) {
        self.rec.wrong = self.check.wrong.clone();
        if self.rec.id.is_none() {
            self.rec.id = self.check.id;
        }
    }

    /// Close normally (a FIN), after checking our FIN was taken.
    fn close(mut self) -> BackendRecord {
        if self.rec.gave_up || self.rec.aborted {
            return self.reset();
        }
        self.finish();
        if matches!(self.rec.fin, Some(Ok(()))) {
            self.rec.fin_acked = Some(net::fin_acknowledged(&self.stream, Duration::from_secs(3)));
        }
        self.rec
    }

    fn reset(mut self) -> BackendRecord {
        self.finish();
        let rec = self.rec.clone();
        net::reset(self.stream);
        rec
    }
}
