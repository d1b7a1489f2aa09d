//! A `--mode http` connection: one client, a request at a time, each
//! buffered whole before a backend is chosen, each response read from the
//! backend as fast as it sends and fed to the client at the client's pace.
//!
//! ```text
//!        ┌──────────────────────────── keep-alive ─────────────────────────────┐
//!        ▼                                                                      │
//!  Head ──► Body ──► Connecting ──► Exchange ──► ResponseBody ──► Delivering ──┘
//!   │        │   (pick; an idle    (send the    (read the body;    (the backend is
//!   │        │    leg or a new      request,     the backend is     released; the
//!   │        │    connect)          read the     released at its    client is fed)
//!   │        │                      response     last byte)
//!   │        │                      head)
//!   └────────┴──── bad request, timeout, 502/504: an answer, then ──► Closing
//! ```
//!
//! The request's head and body stay buffered until the response head
//! arrives: a reused backend connection that fails before answering is
//! retried once on a new connection, with the same bytes.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};

use super::answer;
use super::chunked::ChunkedDecoder;
use super::head::{
    ClientFraming, Found, Framing, HeadScan, Reject, Request, Response, ResponseHead,
    parse_request, parse_response,
};
use crate::config::show_size;
use crate::connection::{Ctx, HeaderRead, Id, Label, Status, close_stream, read_proxy_header};
use crate::io_error::{describe, is_normal_close};
use crate::metrics::{Outcome, WorkerMetrics};
use crate::proxy_header;
use crate::relay::{Culprit, Direction, Flow, News, Peer, Pumped, pump};
use crate::spill::{Drain, Fill, SpillBuffer};
use crate::tcp::{Tunnel, count_news};
use crate::timers::Timer;
use crate::upstream::{BackendLeg, Dial, Dialled, Owner};

/// Steps one turn may take (a phase each), so that a client pipelining
/// requests cannot keep the worker.
const STEPS_PER_TURN: usize = 16;

/// Reads or writes one step may make.
const OPS_PER_STEP: usize = 32;

/// How long a connection that answered with an error and closes keeps
/// reading what the client still sends, so that the close is not a reset
/// that could destroy the answer in flight (nginx's lingering close).
const LINGER: Duration = Duration::from_secs(2);

/// Where the connection is with the current request.
enum Phase {
    /// Waiting for a request head, or for the rest of one.
    Head,
    /// Reading the request body into `up`.
    Body(BodyIn),
    /// The request is whole: getting a backend connection.
    Connecting(Dial),
    /// Writing the request, reading the response head.
    Exchange(BackendLeg),
    /// Reading the response body from the backend.
    ResponseBody(BackendLeg, BodyOut),
    /// The response is all in and the backend released: feeding the client.
    Delivering,
    /// The backend switched protocols (101): the connection is to become a
    /// relay of bytes (`take_tunnel`).
    Upgraded(BackendLeg),
    /// An answer or the last response goes out, then the connection closes.
    Closing,
}

/// How a request body arrives.
enum BodyIn {
    /// `Content-Length`: `up` takes exactly what is left (`expect`).
    Length,
    Chunked(ChunkedDecoder),
}

/// How a response body arrives.
enum BodyOut {
    /// `Content-Length`: `down` takes exactly what is left (`expect`).
    Length,
    /// Chunks, validated and passed on as they are, or de-chunked for an
    /// HTTP/1.0 client.
    Chunked {
        decoder: ChunkedDecoder,
        dechunk: bool,
    },
    /// Until the backend closes.
    UntilClose,
}

/// What runs out, and what happens then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    /// Idle between requests: close quietly.
    KeepAlive,
    /// The head did not arrive in time: 408.
    Header,
    /// A gap in the body: 408.
    Body,
    /// The backend is silent: 504, or a cut once the response has begun.
    Backend,
    /// Lingering after the last answer: close.
    Linger,
}

/// The request in flight and what is known of its exchange, for the
/// access line.
struct Exchange {
    request: Option<Request>,
    started: Instant,
    /// Our head for the backend, then the body in `up`: `sent` bytes of
    /// the two have gone to the backend.
    head: Vec<u8>,
    body_len: u64,
    sent: u64,
    /// A reused connection failed before answering, and this is the retry.
    retried: bool,
    /// The backend answered before it had the whole request: its
    /// connection is not reused.
    early: bool,
    /// The backend's connection may take another request afterwards.
    reusable: bool,
    status: Option<u16>,
    backend: Option<SocketAddr>,
    backend_held: Duration,
    /// Counters when the exchange began, for what this request moved.
    down_out: u64,
    up_spilled: u64,
    down_spilled: u64,
}

/// What a read into an inbox came to.
enum Read {
    Took,
    Nothing,
    Eof,
    Failed(io::Error),
}

pub struct HttpConnection {
    pub id: Id,
    slot: usize,
    client: Peer<TcpStream>,
    client_addr: SocketAddr,
    /// What the client sent that is not parsed yet: request heads, chunk
    /// framing, pipelined requests. Memory only, `--max-header-size`.
    inbox: SpillBuffer,
    scan: HeadScan,
    /// The same for the backend's response heads and chunks.
    backend_inbox: SpillBuffer,
    backend_scan: HeadScan,
    phase: Phase,
    /// The request body for the backend, exactly (de-chunked).
    up: Direction,
    /// The response for the client: our head, then its body.
    down: Direction,
    exchange: Option<Exchange>,
    requests: u64,
    opened: Instant,
    last_active: Instant,
    deadline: Option<(Instant, Expiry)>,
    /// The earliest deadline timer armed and not yet due.
    timer_at: Option<Instant>,
    /// Close the client after the current response.
    close_after: bool,
    /// The request body could not be stored for want of disk space.
    body_blocked: bool,
    /// The response in flight is passed on unbuffered.
    streaming: bool,
    /// Bytes the client sent that were read and dropped (while closing).
    dropped: u64,
    /// Bytes taken from each peer, for idleness.
    taken: u64,
    /// What the counters were told so far: bytes out and spilled, [up, down].
    reported: [u64; 4],
    /// Bytes sent to backends, all requests together.
    sent_total: u64,
    /// `--accept-proxy`: the client's PROXY header is still to come.
    awaiting_header: bool,
    /// Where the client connected to (for `--send-proxy`): the PROXY
    /// header's destination, or our own address.
    local: Option<SocketAddr>,
    /// A connection refused before it was anything: DEBUG close line.
    quiet_close: bool,
    trouble: Option<String>,
}

impl HttpConnection {
    /// Take an accepted client; its first request head must come within
    /// `--client-header-timeout`.
    pub fn open(
        id: u64,
        slot: usize,
        mut client: TcpStream,
        client_addr: SocketAddr,
        token: Token,
        ctx: &mut Ctx,
    ) -> io::Result<HttpConnection> {
        client.set_nodelay(true)?;
        ctx.registry
            .register(&mut client, token, Interest::READABLE | Interest::WRITABLE)?;
        let head_max = ctx.config.max_header_size as usize;
        let inbox = |ctx: &Ctx| {
            let mut buf = SpillBuffer::new(
                head_max,
                0,
                ctx.plan.temp_dir.clone(),
                ctx.plan.disk.clone(),
            );
            buf.no_splice();
            buf
        };
        let now = Instant::now();
        let local = ctx.config.send_proxy.and_then(|_| client.local_addr().ok());
        Ok(HttpConnection {
            id: Id(id),
            slot,
            client: Peer::new(client),
            client_addr,
            inbox: inbox(ctx),
            scan: HeadScan::default(),
            backend_inbox: inbox(ctx),
            backend_scan: HeadScan::default(),
            phase: Phase::Head,
            // A request body is buffered whole before any backend sees it:
            // nothing can take it sooner, so nothing to wait for before
            // spilling.
            up: ctx
                .plan
                .direction("client->backend")
                .without_splice()
                .with_spill_after(Duration::ZERO),
            down: ctx.plan.direction("backend->client"),
            exchange: None,
            requests: 0,
            opened: now,
            last_active: now,
            deadline: Some((now + ctx.config.client_header_timeout, Expiry::Header)),
            timer_at: None,
            close_after: false,
            body_blocked: false,
            streaming: false,
            dropped: 0,
            taken: 0,
            reported: [0; 4],
            sent_total: 0,
            awaiting_header: ctx.config.accept_proxy,
            local,
            quiet_close: false,
            trouble: None,
        })
    }

    fn owner(&self) -> Owner {
        Owner {
            slot: self.slot,
            id: self.id.0,
            client: self.client_addr,
        }
    }

    pub fn on_client_event(&mut self, event: &mio::event::Event) {
        self.client.on_event(event);
    }

    pub fn on_leg_event(&mut self, key: usize, event: &mio::event::Event) {
        match &mut self.phase {
            Phase::Connecting(dial) => dial.on_event(key, event),
            Phase::Exchange(leg) | Phase::ResponseBody(leg, _) if leg.key() == key => {
                leg.peer.on_event(event)
            }
            _ => {}
        }
    }

    pub fn on_connect_timeout(&mut self, attempt: u32, ctx: &mut Ctx) {
        self.dial(|dial, owner, ctx| dial.on_timeout(attempt, owner, ctx), ctx);
    }

    pub fn on_connect_retry(&mut self, ctx: &mut Ctx) {
        self.dial(|dial, owner, ctx| dial.on_retry(owner, ctx), ctx);
    }

    /// Run the phases as far as readiness allows, then close what is done.
    pub fn drive(&mut self, ctx: &mut Ctx) -> Status {
        self.dial(|dial, owner, ctx| dial.check(owner, ctx), ctx);
        self.check_client_error(ctx);
        // What ran out is acted on first: an answer it queues goes out in
        // the steps below.
        self.expire(ctx);
        let taken = self.moved();
        let mut busy = true;
        for _ in 0..STEPS_PER_TURN {
            if self.client.io.is_none() {
                busy = false;
                break;
            }
            let (stepped, more) = self.step(ctx);
            if !stepped {
                busy = more;
                break;
            }
        }
        if self.moved() != taken {
            self.last_active = Instant::now();
        }
        self.tell_news(ctx);
        self.report(ctx);
        self.arm_timer(ctx);
        self.finish_turn(busy, ctx)
    }

    /// One step of the current phase, then the client's share of `down`.
    /// (Did anything happen, and is work left that no event will announce.)
    fn step(&mut self, ctx: &mut Ctx) -> (bool, bool) {
        let before = self.moved();
        let phase_before = std::mem::discriminant(&self.phase);
        let acted = match self.phase {
            Phase::Head if self.awaiting_header => self.read_header(ctx),
            Phase::Head => self.read_head(ctx),
            Phase::Body(_) => self.read_body(ctx),
            Phase::Connecting(_) => false,
            Phase::Exchange(_) => self.exchange_step(ctx),
            Phase::ResponseBody(_, BodyOut::Chunked { .. }) => self.read_chunked_response(ctx),
            Phase::ResponseBody(..) | Phase::Delivering | Phase::Closing | Phase::Upgraded(_) => {
                false
            }
        };
        let more = self.deliver(ctx);
        self.after_delivery(ctx);
        let changed = std::mem::discriminant(&self.phase) != phase_before;
        (acted || changed || self.moved() != before, more)
    }

    /// Bytes moved so far, any way.
    fn moved(&self) -> u64 {
        self.taken
            + self.up.bytes_in()
            + self.down.bytes_in()
            + self.down.bytes_out()
            + self.exchange.as_ref().map_or(0, |e| e.sent)
    }

    // ---------------------------------------------------------------
    // The request

    /// `--accept-proxy`: read the client's PROXY header first; a valid one
    /// names the client from now on (logs, X-Forwarded-For, --send-proxy),
    /// anything else closes the connection, unanswered (it is not HTTP).
    fn read_header(&mut self, ctx: &mut Ctx) -> bool {
        let refused = match read_proxy_header(&mut self.client, ctx.scratch) {
            HeaderRead::Done { client, local } => {
                if let Some(client) = client {
                    log::debug!("{} client {} is {client}", self.id, self.client_addr);
                    self.client_addr = client;
                }
                self.local = local.or(self.local);
                self.awaiting_header = false;
                return true;
            }
            HeaderRead::Waiting => return false,
            HeaderRead::Refused(why) => why,
            HeaderRead::Failed(_) => "the socket failed",
        };
        proxy_header::log_refusal(&self.id, self.client_addr, refused);
        self.trouble = Some(format!("bad PROXY header: {refused}"));
        self.quiet_close = true;
        self.close_client(true);
        true
    }

    /// Read until a whole request head is in, then judge it.
    fn read_head(&mut self, ctx: &mut Ctx) -> bool {
        let max = ctx.config.max_header_size as usize;
        for _ in 0..OPS_PER_STEP {
            let buf = match self.inbox.peek() {
                Ok(buf) => buf,
                Err(e) => return self.spill_failed(e, ctx),
            };
            match self.scan.find(buf, max) {
                Err(reject) => {
                    self.refuse(reject, None, ctx);
                    return true;
                }
                Ok(Found::Complete(n)) => {
                    let parsed = parse_request(&buf[..n], self.client_addr);
                    self.inbox.consume(n);
                    self.scan.reset();
                    match parsed {
                        Ok(request) => self.begin_request(request, ctx),
                        Err(reject) => self.refuse(reject, None, ctx),
                    }
                    return true;
                }
                Ok(Found::Partial) => {}
            }
            let was_empty = self.inbox.is_empty();
            match read_into(&mut self.inbox, &mut self.client, ctx.scratch) {
                Read::Took => {
                    self.taken += 1;
                    if was_empty && self.deadline.is_some_and(|(_, e)| e == Expiry::KeepAlive) {
                        self.set_deadline(ctx.config.client_header_timeout, Expiry::Header);
                    }
                }
                Read::Nothing => return false,
                Read::Eof => {
                    if !self.inbox.is_empty() {
                        log::info!(
                            "{} client {} closed in the middle of a request head",
                            self.id,
                            self.client_addr
                        );
                        self.trouble
                            .get_or_insert_with(|| "client closed mid-head".into());
                    }
                    self.close_client(false);
                    return true;
                }
                Read::Failed(e) => {
                    self.client_failed(e, ctx);
                    return true;
                }
            }
        }
        false
    }

    /// A head is in and acceptable: make ready for its body.
    fn begin_request(&mut self, request: Request, ctx: &mut Ctx) {
        let limit = body_limit(ctx);
        self.exchange = Some(Exchange {
            request: None,
            started: Instant::now(),
            head: Vec::new(),
            body_len: 0,
            sent: 0,
            retried: false,
            early: false,
            reusable: false,
            status: None,
            backend: None,
            backend_held: Duration::ZERO,
            down_out: self.down.bytes_out(),
            up_spilled: self.up.buf().spilled_total(),
            down_spilled: self.down.buf().spilled_total(),
        });
        let framing = request.framing;
        let expect_continue = request.expect_continue;
        if let Some(ex) = &mut self.exchange {
            ex.request = Some(request);
        }
        self.deadline = None;
        match framing {
            Framing::Length(n) if n > limit => {
                let why = "request body over --max-request-body";
                self.refuse(Reject { status: 413, why }, None, ctx);
            }
            Framing::None | Framing::Length(0) => self.request_complete(ctx),
            Framing::Length(n) => {
                let preread = self.move_preread(n);
                if preread == n {
                    return self.request_complete(ctx);
                }
                self.up.expect(n - preread);
                if expect_continue && preread == 0 {
                    self.down.push(answer::CONTINUE);
                }
                self.phase = Phase::Body(BodyIn::Length);
                self.set_deadline(ctx.config.client_body_timeout, Expiry::Body);
            }
            Framing::Chunked => {
                if expect_continue && self.inbox.is_empty() {
                    self.down.push(answer::CONTINUE);
                }
                let decoder = ChunkedDecoder::new(ctx.config.max_header_size as usize);
                self.phase = Phase::Body(BodyIn::Chunked(decoder));
                self.set_deadline(ctx.config.client_body_timeout, Expiry::Body);
            }
            Framing::UntilClose => unreachable!("requests are never framed by close"),
        }
    }

    /// Body bytes that came in with the head: into `up`, at most `len`.
    fn move_preread(&mut self, len: u64) -> u64 {
        let Ok(buf) = self.inbox.peek() else {
            return 0;
        };
        let n = (buf.len() as u64).min(len) as usize;
        let mut moved = 0;
        while moved < n {
            match self.up.push(&buf[moved..n]) {
                Fill::Took(k) if k > 0 => moved += k,
                _ => break,
            }
        }
        self.inbox.consume(moved);
        moved as u64
    }

    /// Read the rest of the request body.
    fn read_body(&mut self, ctx: &mut Ctx) -> bool {
        let before = self.up.bytes_in();
        let acted = match &mut self.phase {
            Phase::Body(BodyIn::Length) => {
                let mut nobody: Peer<TcpStream> = Peer::absent();
                match pump(&mut self.up, &mut self.client, &mut nobody, ctx.scratch) {
                    Pumped::Failed(Culprit::SpillFile, e) => return self.spill_failed(e, ctx),
                    Pumped::Failed(_, e) => {
                        self.client_failed(e, ctx);
                        return true;
                    }
                    _ => {}
                }
                if self.up.message_taken() {
                    self.request_complete(ctx);
                    return true;
                }
                if self.up.flow() == Flow::Flushing {
                    return self.client_left_mid_body();
                }
                false
            }
            Phase::Body(BodyIn::Chunked(_)) => return self.read_chunked_body(ctx),
            _ => false,
        };
        if self.up.bytes_in() != before {
            self.set_deadline(ctx.config.client_body_timeout, Expiry::Body);
            return true;
        }
        acted
    }

    /// Decode chunks from the inbox into `up`, reading more as needed.
    fn read_chunked_body(&mut self, ctx: &mut Ctx) -> bool {
        let limit = body_limit(ctx);
        let mut acted = false;
        for _ in 0..OPS_PER_STEP {
            let Phase::Body(BodyIn::Chunked(decoder)) = &mut self.phase else {
                return acted;
            };
            let buf = match self.inbox.peek() {
                Ok(buf) => buf,
                Err(e) => return self.spill_failed(e, ctx),
            };
            if !buf.is_empty() {
                let mut allowed = limit.saturating_sub(decoder.data_len());
                let (mut over, mut blocked) = (false, false);
                let up = &mut self.up;
                let decoded = decoder.decode(buf, |data| {
                    if data.len() as u64 > allowed {
                        over = true;
                        return 0;
                    }
                    match up.push(data) {
                        Fill::Took(n) => {
                            allowed -= n as u64;
                            n
                        }
                        _ => {
                            blocked = true;
                            0
                        }
                    }
                });
                let done = match decoded {
                    Err(e) => {
                        self.refuse(
                            Reject {
                                status: 400,
                                why: chunk_why(e),
                            },
                            None,
                            ctx,
                        );
                        return true;
                    }
                    Ok(d) => {
                        self.inbox.consume(d.consumed);
                        acted |= d.consumed > 0;
                        if d.consumed > 0 {
                            self.set_deadline(ctx.config.client_body_timeout, Expiry::Body);
                        }
                        d
                    }
                };
                let announced = match &self.phase {
                    Phase::Body(BodyIn::Chunked(d)) => d.announced(),
                    _ => 0,
                };
                if over || announced > limit {
                    let why = "request body over --max-request-body";
                    self.refuse(Reject { status: 413, why }, None, ctx);
                    return true;
                }
                self.body_blocked = blocked;
                if done.done {
                    self.request_complete(ctx);
                    return true;
                }
                if blocked
                    || done.consumed == 0
                        && !self.inbox.is_empty()
                        && self.inbox.len() >= self.inbox.memory_limit() as u64
                {
                    return acted;
                }
            }
            match read_into(&mut self.inbox, &mut self.client, ctx.scratch) {
                Read::Took => {
                    self.taken += 1;
                    acted = true;
                }
                Read::Nothing => return acted,
                Read::Eof => return self.client_left_mid_body(),
                Read::Failed(e) => {
                    self.client_failed(e, ctx);
                    return true;
                }
            }
        }
        acted
    }

    /// The client closed before its body was complete: nothing goes to a
    /// backend, and nobody is left to answer.
    fn client_left_mid_body(&mut self) -> bool {
        log::info!(
            "{} client {} closed before its request body was complete",
            self.id,
            self.client_addr
        );
        self.trouble
            .get_or_insert_with(|| "client closed mid-body".into());
        self.up.abort();
        self.close_client(true);
        true
    }

    /// The whole request is buffered: find it a backend.
    fn request_complete(&mut self, ctx: &mut Ctx) {
        let body_len = self.up.held();
        if let Some(ex) = &mut self.exchange {
            ex.body_len = body_len;
            ex.sent = 0;
        }
        self.deadline = None;
        let private_to = ctx.config.send_proxy.map(|_| self.client_addr);
        self.phase = Phase::Connecting(Dial::reusing(private_to));
        self.dial(|dial, owner, ctx| dial.next(owner, ctx), ctx);
    }

    // ---------------------------------------------------------------
    // The backend

    /// Take one step of dialling, if connecting, and act on what it came to.
    fn dial(&mut self, step: impl FnOnce(&mut Dial, Owner, &mut Ctx) -> Dialled, ctx: &mut Ctx) {
        let owner = self.owner();
        let Phase::Connecting(dial) = &mut self.phase else {
            return;
        };
        let dialled = step(dial, owner, ctx);
        let last = dial.last_addr();
        if let Some(ex) = &mut self.exchange {
            ex.backend = last.or(ex.backend);
        }
        match dialled {
            Dialled::Pending => {}
            Dialled::Connected(mut leg) => {
                let close_upstream = ctx.config.upstream_keepalive == 0;
                if let Some(ex) = &mut self.exchange {
                    let request = ex.request.as_ref().expect("a request is in flight");
                    ex.head = request.upstream_head(ex.body_len, close_upstream, leg.addr());
                    if let Some(version) = ctx.config.send_proxy.filter(|_| !leg.reused()) {
                        // A new backend connection starts with who the
                        // client is; a reused one was opened for this
                        // same client (see `Dial::reusing`).
                        let local = self.local.unwrap_or(self.client_addr);
                        let mut head = proxy_header::encode(version, self.client_addr, local);
                        head.extend_from_slice(&ex.head);
                        ex.head = head;
                        leg.make_private(self.client_addr);
                    }
                    ex.backend = Some(leg.addr());
                    ex.sent = 0;
                }
                self.backend_scan.reset();
                self.phase = Phase::Exchange(leg);
                self.set_deadline(ctx.config.backend_timeout, Expiry::Backend);
            }
            Dialled::GaveUp(tried) => {
                log::error!(
                    "{} client {}: no backend could be reached: {tried}",
                    self.id,
                    self.client_addr
                );
                self.trouble = Some(format!("no backend reached: {tried}"));
                let why = "no backend could be reached";
                self.refuse(Reject { status: 502, why }, None, ctx);
            }
        }
    }

    /// Send the request, read the response head.
    fn exchange_step(&mut self, ctx: &mut Ctx) -> bool {
        let sent_before = self.exchange.as_ref().map_or(0, |e| e.sent);
        if let Some(outcome) = self.send_request() {
            return self.backend_failed(outcome, ctx);
        }
        let sent = self.exchange.as_ref().map_or(0, |e| e.sent);
        let mut acted = sent != sent_before;
        let request = self.exchange.as_ref().and_then(|e| e.request.as_ref());
        let head_request = request.is_some_and(Request::is_head);
        let upgrade_asked = request.is_some_and(|r| r.upgrade.is_some());
        let max = ctx.config.max_header_size as usize;
        for _ in 0..OPS_PER_STEP {
            let buf = match self.backend_inbox.peek() {
                Ok(buf) => buf,
                Err(e) => return self.spill_failed(e, ctx),
            };
            if !buf.is_empty() {
                match self.backend_scan.find(buf, max) {
                    Err(_) => {
                        return self.bad_response("malformed or oversized response head", ctx);
                    }
                    Ok(Found::Complete(n)) => {
                        match parse_response(&buf[..n], head_request, upgrade_asked) {
                            Ok(ResponseHead::Interim(n)) => {
                                self.backend_inbox.consume(n);
                                self.backend_scan.reset();
                                continue;
                            }
                            Ok(ResponseHead::Final(response)) => {
                                self.backend_inbox.consume(n);
                                self.backend_scan.reset();
                                self.begin_response(response, ctx);
                                return true;
                            }
                            Err(reject) => return self.bad_response(reject.why, ctx),
                        }
                    }
                    Ok(Found::Partial) => {}
                }
            }
            let Phase::Exchange(leg) = &mut self.phase else {
                return acted;
            };
            match read_into(&mut self.backend_inbox, &mut leg.peer, ctx.scratch) {
                Read::Took => {
                    self.taken += 1;
                    acted = true;
                    self.set_deadline(ctx.config.backend_timeout, Expiry::Backend);
                }
                Read::Nothing => break,
                Read::Eof => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "closed before answering");
                    return self.backend_failed(e, ctx);
                }
                Read::Failed(e) => return self.backend_failed(e, ctx),
            }
        }
        if acted {
            self.set_deadline(ctx.config.backend_timeout, Expiry::Backend);
        }
        acted
    }

    /// Write as much of the request as the backend takes. `Some(error)` if
    /// it failed.
    fn send_request(&mut self) -> Option<io::Error> {
        let Phase::Exchange(leg) = &mut self.phase else {
            return None;
        };
        let ex = self.exchange.as_mut()?;
        let head_len = ex.head.len() as u64;
        for _ in 0..OPS_PER_STEP {
            if ex.sent >= head_len + ex.body_len || !leg.peer.is_writable() {
                return None;
            }
            let outcome = if ex.sent < head_len {
                let io = leg.peer.io.as_mut()?;
                match io.write(&ex.head[ex.sent as usize..]) {
                    Ok(n) => Drain::Gave(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Drain::WouldBlock,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => Drain::SinkFailed(e),
                }
            } else {
                self.up.send_copy(&mut leg.peer, ex.sent - head_len)
            };
            match outcome {
                Drain::Gave(n) => ex.sent += n as u64,
                Drain::WouldBlock => {
                    leg.peer.write_blocked();
                    return None;
                }
                Drain::Empty => return None,
                Drain::SinkFailed(e) | Drain::SpillFailed(e) => return Some(e),
            }
        }
        None
    }

    /// The backend failed before a response head came. A reused connection
    /// may have been closed by the backend while it idled: the request is
    /// sent again, once, on a new one. Anything else is a 502.
    fn backend_failed(&mut self, error: io::Error, ctx: &mut Ctx) -> bool {
        let Phase::Exchange(leg) = std::mem::replace(&mut self.phase, Phase::Closing) else {
            return false;
        };
        let addr = leg.addr();
        let reused = leg.reused();
        let retry = reused && self.exchange.as_ref().is_some_and(|e| !e.retried);
        leg.close(!retry, ctx);
        if retry {
            log::debug!(
                "{} reused connection to backend {addr} failed before answering ({error}); sending the request again on a new one",
                self.id
            );
            if let Some(ex) = &mut self.exchange {
                ex.retried = true;
                ex.sent = 0;
            }
            self.phase = Phase::Connecting(Dial::default());
            self.dial(|dial, owner, ctx| dial.next(owner, ctx), ctx);
            return true;
        }
        let level = if is_normal_close(&error) || error.kind() == io::ErrorKind::UnexpectedEof {
            log::Level::Warn
        } else {
            log::Level::Error
        };
        log::log!(
            level,
            "{} client {}: backend {addr} failed before answering: {error}",
            self.id,
            self.client_addr
        );
        self.trouble = Some(format!("backend {}", describe(&error)));
        let why = "the backend failed before answering";
        self.refuse(Reject { status: 502, why }, None, ctx);
        true
    }

    /// The backend's response head is wrong: 502, and its connection is
    /// closed, never reused.
    fn bad_response(&mut self, why: &'static str, ctx: &mut Ctx) -> bool {
        let addr = self.exchange.as_ref().and_then(|e| e.backend);
        log::error!(
            "{} client {}: backend {}: {why}",
            self.id,
            self.client_addr,
            Label(addr)
        );
        self.trouble = Some(format!("bad response: {why}"));
        self.refuse(Reject { status: 502, why }, None, ctx);
        true
    }

    /// A response head is in and acceptable: our head for it goes to the
    /// client, and its body is read.
    fn begin_response(&mut self, response: Response, ctx: &mut Ctx) {
        let stopping = ctx.stopping;
        let Some(ex) = self.exchange.as_mut() else {
            return;
        };
        let request = ex.request.as_ref().expect("a request is in flight");
        ex.status = Some(response.status);
        ex.early = ex.sent < ex.head.len() as u64 + ex.body_len;
        ex.reusable = response.reusable && !ex.early && ctx.config.upstream_keepalive > 0;
        let keep = request.keep_alive
            && response.keeps_client(request.minor)
            && !self.close_after
            && !stopping;
        self.close_after |= !keep;
        let (head, how) = response.client_head(request.minor, keep);
        // The request is done with: its bytes went to the backend.
        self.up.delivered_by_copy();
        push_all(&mut self.down, &head);
        let Phase::Exchange(leg) = std::mem::replace(&mut self.phase, Phase::Delivering) else {
            return;
        };
        if let Some(protocol) = &response.switched_to {
            log::debug!(
                "{} switched to {protocol}: relaying bytes from now on",
                self.id
            );
            let buf = self.backend_inbox.peek().unwrap_or(&[]);
            let taken = push_all(&mut self.down, buf);
            self.backend_inbox.consume(taken);
            self.log_access(ctx.metrics);
            self.exchange = None;
            self.deadline = None;
            self.phase = Phase::Upgraded(leg);
            return;
        }
        if response.streaming {
            // Passed on as it comes: memory only, the backend held back to
            // the client's pace (Server-Sent Events, long polls).
            self.down.set_spill_limit(0);
            self.streaming = true;
        }
        self.set_deadline(ctx.config.backend_timeout, Expiry::Backend);
        match response.framing {
            Framing::None => {
                self.discard_backend_extra();
                self.response_in(leg, ctx);
            }
            Framing::Length(n) => {
                let buf = self.backend_inbox.peek().unwrap_or(&[]);
                let k = (buf.len() as u64).min(n) as usize;
                let taken = push_all(&mut self.down, &buf[..k]);
                self.backend_inbox.consume(taken);
                self.discard_backend_extra();
                if taken as u64 == n {
                    self.response_in(leg, ctx);
                } else {
                    self.down.expect(n - taken as u64);
                    self.phase = Phase::ResponseBody(leg, BodyOut::Length);
                }
            }
            Framing::Chunked => {
                let decoder = ChunkedDecoder::new(ctx.config.max_header_size as usize);
                let dechunk = how == ClientFraming::Dechunked;
                self.phase = Phase::ResponseBody(leg, BodyOut::Chunked { decoder, dechunk });
            }
            Framing::UntilClose => {
                let buf = self.backend_inbox.peek().unwrap_or(&[]);
                let taken = push_all(&mut self.down, buf);
                self.backend_inbox.consume(taken);
                self.down.unlimited();
                self.phase = Phase::ResponseBody(leg, BodyOut::UntilClose);
            }
        }
    }

    /// Bytes the backend sent past the end of its response: not part of
    /// it, and its connection cannot be trusted with another request.
    fn discard_backend_extra(&mut self) {
        let extra = self.backend_inbox.len() as usize;
        if extra > 0 {
            if let Some(ex) = &mut self.exchange {
                ex.reusable = false;
            }
            let _ = self.backend_inbox.peek();
            self.backend_inbox
                .consume(extra.min(self.backend_inbox.len() as usize));
            self.backend_inbox.discard();
        }
    }

    /// Read chunks from the backend: validated and passed on, or decoded
    /// for an HTTP/1.0 client; never past the end of the body.
    fn read_chunked_response(&mut self, ctx: &mut Ctx) -> bool {
        let mut acted = false;
        for _ in 0..OPS_PER_STEP {
            let Phase::ResponseBody(leg, BodyOut::Chunked { decoder, dechunk }) = &mut self.phase
            else {
                return acted;
            };
            let buf = match self.backend_inbox.peek() {
                Ok(buf) => buf,
                Err(e) => return self.spill_failed(e, ctx),
            };
            if !buf.is_empty() {
                let down = &mut self.down;
                let decoded = if *dechunk {
                    decoder.decode(buf, |data| match down.push(data) {
                        Fill::Took(n) => n,
                        _ => 0,
                    })
                } else {
                    // Pass the framing on as it came, but only as far as
                    // the body goes, and only once it has been checked.
                    let mut probe = decoder.clone();
                    probe.decode(buf, |d| d.len()).and_then(|ahead| {
                        let took = push_all(down, &buf[..ahead.consumed]);
                        decoder.decode(&buf[..took], |d| d.len())
                    })
                };
                match decoded {
                    Err(e) => {
                        let why = chunk_why(e);
                        return self.cut_client(
                            format!("backend sent a malformed chunked body: {why}"),
                            ctx,
                        );
                    }
                    Ok(d) => {
                        self.backend_inbox.consume(d.consumed);
                        acted |= d.consumed > 0;
                        if d.done {
                            let leg = take_leg(&mut self.phase);
                            self.discard_backend_extra();
                            if let Some(leg) = leg {
                                self.response_in(leg, ctx);
                            }
                            return true;
                        }
                        if d.consumed == 0 {
                            return acted;
                        }
                    }
                }
                if acted {
                    self.set_deadline(ctx.config.backend_timeout, Expiry::Backend);
                }
                continue;
            }
            if !self.down.buf().has_room() {
                return acted;
            }
            match read_into(&mut self.backend_inbox, &mut leg.peer, ctx.scratch) {
                Read::Took => {
                    self.taken += 1;
                    acted = true;
                    self.set_deadline(ctx.config.backend_timeout, Expiry::Backend);
                }
                Read::Nothing => return acted,
                Read::Eof => {
                    return self
                        .cut_client("backend closed in the middle of a chunked body".into(), ctx);
                }
                Read::Failed(e) => {
                    return self.cut_client(format!("backend failed mid-body: {e}"), ctx);
                }
            }
        }
        acted
    }

    /// The response is all in: release the backend (to the idle pool if it
    /// may serve another request) and feed the client the rest.
    fn response_in(&mut self, leg: BackendLeg, ctx: &mut Ctx) {
        let reusable = self.exchange.as_ref().is_some_and(|e| e.reusable);
        let held = if reusable {
            leg.park(ctx)
        } else {
            leg.close(false, ctx)
        };
        if let Some(ex) = &mut self.exchange {
            ex.backend_held = held.unwrap_or_default();
        }
        if std::mem::take(&mut self.streaming) {
            self.down.set_spill_limit(ctx.plan.max_spill);
        }
        self.deadline = None;
        self.phase = Phase::Delivering;
    }

    // ---------------------------------------------------------------
    // The client's side of the response

    /// Hand the client what `down` holds (reading the backend's body too
    /// when it is framed by length or by close). True if work is left.
    fn deliver(&mut self, ctx: &mut Ctx) -> bool {
        let mut nobody = Peer::absent();
        let src = match &mut self.phase {
            Phase::ResponseBody(leg, BodyOut::Length | BodyOut::UntilClose) => &mut leg.peer,
            _ => &mut nobody,
        };
        let in_before = self.down.bytes_in();
        let outcome = pump(&mut self.down, src, &mut self.client, ctx.scratch);
        if self.down.bytes_in() != in_before {
            self.set_deadline(ctx.config.backend_timeout, Expiry::Backend);
        }
        match outcome {
            Pumped::MoreWork => true,
            Pumped::Failed(Culprit::Receiver, e) => {
                self.client_failed(e, ctx);
                false
            }
            Pumped::Failed(Culprit::Sender, e) => {
                self.cut_client(format!("backend failed mid-body: {e}"), ctx);
                false
            }
            Pumped::Failed(Culprit::SpillFile, e) => {
                self.spill_failed(e, ctx);
                false
            }
            Pumped::Idle | Pumped::Complete => false,
        }
    }

    /// What delivering changed: a body framed by length or close that is
    /// all in, or cut short; a response all delivered.
    fn after_delivery(&mut self, ctx: &mut Ctx) {
        match &self.phase {
            Phase::ResponseBody(_, BodyOut::Length) => {
                if self.down.message_taken() {
                    if let Some(leg) = take_leg(&mut self.phase) {
                        self.response_in(leg, ctx);
                    }
                } else if self.down.flow() == Flow::Flushing {
                    self.cut_client(
                        "backend closed before the end of its Content-Length".into(),
                        ctx,
                    );
                }
            }
            Phase::ResponseBody(_, BodyOut::UntilClose) if self.down.sender_finished() => {
                if let Some(leg) = take_leg(&mut self.phase) {
                    self.response_in(leg, ctx);
                }
            }
            Phase::Delivering if self.down.held() == 0 => self.finish_request(ctx),
            Phase::Closing => self.linger(ctx),
            _ => {}
        }
    }

    /// The response is delivered: log it, and wait for the next request
    /// or close.
    fn finish_request(&mut self, ctx: &mut Ctx) {
        self.log_access(ctx.metrics);
        self.exchange = None;
        self.requests += 1;
        if self.close_after || ctx.stopping {
            self.begin_closing();
            return;
        }
        self.phase = Phase::Head;
        if self.inbox.is_empty() {
            self.set_deadline(ctx.config.keepalive_timeout, Expiry::KeepAlive);
        } else {
            self.set_deadline(ctx.config.client_header_timeout, Expiry::Header);
        }
    }

    /// The last answer goes out, then EOF, then the connection closes.
    fn begin_closing(&mut self) {
        self.close_after = true;
        self.down.finish();
        self.phase = Phase::Closing;
    }

    /// Closing: once the answer and EOF are out, read and drop what the
    /// client still sends until it closes, for at most `LINGER`.
    fn linger(&mut self, ctx: &mut Ctx) {
        match self.down.flow() {
            Flow::Aborted => return self.close_client(true),
            Flow::Closed => {}
            _ => return,
        }
        if !self.deadline.is_some_and(|(_, e)| e == Expiry::Linger) {
            self.set_deadline(LINGER, Expiry::Linger);
        }
        for _ in 0..OPS_PER_STEP {
            if !self.client.is_readable() {
                return;
            }
            let Some(io) = self.client.io.as_mut() else {
                return;
            };
            match io::Read::read(io, ctx.scratch) {
                Ok(0) => return self.close_client(false),
                Ok(n) => self.dropped += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.client.read_dry(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close_client(false),
            }
        }
    }

    // ---------------------------------------------------------------
    // Failures and ends

    /// Answer `reject.status` and close: nothing of this request reaches a
    /// backend (or more of it, if one had it), and nothing after it is
    /// read as a request.
    fn refuse(&mut self, reject: Reject, request: Option<Request>, ctx: &mut Ctx) {
        let line = self
            .exchange
            .as_ref()
            .and_then(|e| e.request.as_ref())
            .or(request.as_ref())
            .map_or_else(|| "-".to_string(), Request::line);
        let level = if reject.status >= 500 {
            log::Level::Warn
        } else {
            log::Level::Info
        };
        log::log!(
            level,
            "{} client {}: {} {} for \"{line}\": {}",
            self.id,
            self.client_addr,
            reject.status,
            answer::reason(reject.status),
            reject.why
        );
        match std::mem::replace(&mut self.phase, Phase::Closing) {
            Phase::Connecting(dial) => dial.abandon(true, ctx),
            Phase::Exchange(leg) | Phase::ResponseBody(leg, _) => {
                leg.close(true, ctx);
            }
            _ => {}
        }
        self.trouble
            .get_or_insert_with(|| format!("{} {}", reject.status, reject.why));
        let ex = self.exchange.get_or_insert_with(|| Exchange {
            request,
            started: Instant::now(),
            head: Vec::new(),
            body_len: 0,
            sent: 0,
            retried: false,
            early: false,
            reusable: false,
            status: None,
            backend: None,
            backend_held: Duration::ZERO,
            down_out: self.down.bytes_out(),
            up_spilled: self.up.buf().spilled_total(),
            down_spilled: self.down.buf().spilled_total(),
        });
        ex.status = Some(reject.status);
        self.up.abort();
        // What the client sent that was not parsed yet is dropped with it.
        self.dropped += self.inbox.discard();
        self.down.answer(&answer::error(reject.status));
        self.close_after = true;
        self.deadline = None;
        self.log_access(ctx.metrics);
        self.exchange = None;
    }

    /// The response has begun and cannot be finished: the client is reset,
    /// so a truncated response never looks complete.
    fn cut_client(&mut self, why: String, ctx: &mut Ctx) -> bool {
        log::warn!(
            "{} client {}: {why}; cutting the client",
            self.id,
            self.client_addr
        );
        self.trouble.get_or_insert(why);
        if let Some(leg) = take_leg(&mut self.phase) {
            leg.close(true, ctx);
        }
        self.log_access(ctx.metrics);
        self.exchange = None;
        self.down.abort();
        self.up.abort();
        self.close_client(true);
        true
    }

    /// The client's socket failed: drop everything.
    fn client_failed(&mut self, e: io::Error, ctx: &mut Ctx) {
        if is_normal_close(&e) {
            log::debug!(
                "{} client {} closed abruptly: {e}",
                self.id,
                self.client_addr
            );
        } else {
            log::error!("{} client {} failed: {e}", self.id, self.client_addr);
        }
        self.trouble
            .get_or_insert_with(|| format!("client {}", describe(&e)));
        match std::mem::replace(&mut self.phase, Phase::Closing) {
            Phase::Connecting(dial) => dial.abandon(true, ctx),
            Phase::Exchange(leg) | Phase::ResponseBody(leg, _) => {
                leg.close(true, ctx);
            }
            _ => {}
        }
        if self.exchange.as_ref().is_some_and(|e| e.status.is_some()) {
            self.log_access(ctx.metrics);
        }
        self.exchange = None;
        self.up.abort();
        self.down.abort();
        self.close_client(true);
    }

    /// A spill file failed: bytes that were read cannot be kept.
    fn spill_failed(&mut self, e: io::Error, ctx: &mut Ctx) -> bool {
        log::error!(
            "{} spill file in {} failed: {e}; closing the connection",
            self.id,
            self.up.buf().temp_dir().display()
        );
        self.trouble = Some(format!("spill file failed: {e}"));
        self.cut_client("spill file failed".into(), ctx)
    }

    /// epoll flagged the client's socket: fail it if `SO_ERROR` says so.
    fn check_client_error(&mut self, ctx: &mut Ctx) {
        if !self.client.take_errored() {
            return;
        }
        let error = match self.client.io.as_ref().map(TcpStream::take_error) {
            Some(Ok(Some(e)) | Err(e)) => e,
            _ => return,
        };
        self.client_failed(error, ctx);
    }

    /// Close the client's socket (`reset`: linger 0, for a cut stream).
    fn close_client(&mut self, reset: bool) {
        if let Some(client) = self.client.io.take() {
            close_stream(client, reset);
        }
    }

    /// Deadlines: what has run out is acted on.
    fn expire(&mut self, ctx: &mut Ctx) {
        let Some((at, expiry)) = self.deadline else {
            return;
        };
        if Instant::now() < at || self.client.io.is_none() {
            return;
        }
        self.deadline = None;
        match expiry {
            Expiry::KeepAlive => {
                log::debug!("{} idle between requests: closing", self.id);
                self.close_client(false);
            }
            Expiry::Header if self.awaiting_header => {
                proxy_header::log_refusal(&self.id, self.client_addr, "no whole header in time");
                self.trouble = Some("bad PROXY header: no whole header in time".into());
                self.quiet_close = true;
                self.close_client(true);
            }
            Expiry::Header => {
                if self.inbox.is_empty() && self.requests == 0 {
                    // Nothing ever came: a probe or a stray connect.
                    log::debug!("{} no request within --client-header-timeout", self.id);
                    self.close_client(false);
                } else {
                    let why = "request head not complete within --client-header-timeout";
                    self.refuse(Reject { status: 408, why }, None, ctx);
                }
            }
            Expiry::Body => {
                let why = "no request body bytes within --client-body-timeout";
                self.refuse(Reject { status: 408, why }, None, ctx);
            }
            Expiry::Backend => match self.phase {
                Phase::Connecting(_) | Phase::Exchange(_) => {
                    let why = "no response head within --backend-timeout";
                    self.refuse(Reject { status: 504, why }, None, ctx);
                }
                Phase::ResponseBody(..) => {
                    self.cut_client("backend silent mid-body for --backend-timeout".into(), ctx);
                }
                _ => {}
            },
            Expiry::Linger => self.close_client(false),
        }
    }

    fn set_deadline(&mut self, after: Duration, expiry: Expiry) {
        self.deadline = Some((Instant::now() + after, expiry));
    }

    /// A deadline needs a timer, since no socket event may come before it.
    /// One armed at a time: a later deadline is looked at again when the
    /// earlier timer fires.
    fn arm_timer(&mut self, ctx: &mut Ctx) {
        let now = Instant::now();
        if self.timer_at.is_some_and(|t| t <= now) {
            self.timer_at = None;
        }
        // A response pausing before it spills must come back when its
        // time is up (a client that reads nothing sends no event).
        let backend_readable = match &self.phase {
            Phase::ResponseBody(leg, _) => leg.peer.is_readable(),
            _ => false,
        };
        let spill = self.down.spill_due(now, backend_readable);
        let Some(at) = [self.deadline.map(|(at, _)| at), spill]
            .into_iter()
            .flatten()
            .min()
        else {
            return;
        };
        if self.timer_at.is_none_or(|t| at < t) {
            self.timer_at = Some(at);
            let timer = Timer::Deadline {
                slot: self.slot,
                conn: self.id.0,
            };
            ctx.timers.arm(at, timer);
        }
    }

    fn finish_turn(&mut self, busy: bool, ctx: &Ctx) -> Status {
        if self.client.io.is_none() {
            self.report(ctx);
            let m = ctx.metrics;
            m.closed(Outcome::of_reason(
                self.trouble.as_deref().unwrap_or("done"),
            ));
            m.client_time.observe(self.opened.elapsed());
            debug_assert!(
                !matches!(
                    self.phase,
                    Phase::Connecting(_) | Phase::Exchange(_) | Phase::ResponseBody(..)
                ),
                "a backend left behind"
            );
            self.log_close();
            Status::Finished
        } else if busy {
            Status::Busy
        } else {
            Status::Waiting
        }
    }

    /// What the directions have to tell the operator, once each.
    fn tell_news(&mut self, ctx: &Ctx) {
        let what = [
            (
                &mut self.up,
                "a client request body is buffered to a temporary file",
                0,
            ),
            (
                &mut self.down,
                "an upstream response is buffered to a temporary file",
                1,
            ),
        ];
        for (dir, text, d) in what {
            while let Some(news) = dir.news() {
                count_news(ctx.metrics, &news, d);
                match news {
                    News::SpillLimit => {}
                    News::FirstSpill => log::warn!(
                        "{} {}: {text}: client={} more than memory_buffer={} held; spill file in {} (raise --memory-buffer to keep more in memory)",
                        self.id,
                        dir.label(),
                        self.client_addr,
                        show_size(dir.buf().memory_limit() as u64),
                        dir.buf().temp_dir().display()
                    ),
                    News::DiskBlocked { cause, first } => log::log!(
                        if first {
                            log::Level::Warn
                        } else {
                            log::Level::Debug
                        },
                        "{} {} cannot spill to {} ({cause}); pausing reads until space frees: client={}",
                        self.id,
                        dir.label(),
                        dir.buf().temp_dir().display(),
                        self.client_addr
                    ),
                    News::DiskBack { .. } => {
                        log::debug!("{} {} spilling again", self.id, dir.label())
                    }
                }
            }
        }
    }

    /// Add what moved since the last turn to the worker's counters.
    fn report(&mut self, ctx: &Ctx) {
        let in_flight = self.exchange.as_ref().map_or(0, |e| e.sent);
        let now = [
            self.sent_total + in_flight,
            self.down.bytes_out(),
            self.up.buf().spilled_total(),
            self.down.buf().spilled_total(),
        ];
        let m = ctx.metrics;
        let cells = [&m.bytes[0], &m.bytes[1], &m.spilled[0], &m.spilled[1]];
        for ((cell, now), before) in cells.into_iter().zip(now).zip(&mut self.reported) {
            if now > *before {
                cell.add(now - *before);
                *before = now;
            }
        }
    }

    /// One INFO line per request: what was asked, how it was answered,
    /// bytes each way and spilled, the backend and how long it was held.
    fn log_access(&mut self, m: &WorkerMetrics) {
        let Some(ex) = &self.exchange else {
            return;
        };
        self.sent_total += ex.sent;
        if let Some(status) = ex.status {
            m.http_request(status, ex.started.elapsed());
        }
        if ex.backend.is_some() && ex.status.is_some() {
            m.backend_hold.observe(ex.backend_held);
        }
        if self.up.buf().spilled_total() > ex.up_spilled {
            m.http_bodies_spilled.add(1);
        }
        let line = ex
            .request
            .as_ref()
            .map_or_else(|| "-".into(), Request::line);
        let status = ex.status.map_or_else(|| "-".into(), |s| s.to_string());
        log::info!(
            "{} \"{line}\" {status} client={} backend={} up_bytes={} down_bytes={} up_spilled={} down_spilled={} backend_held={:.3}s duration={:.3}s",
            self.id,
            self.client_addr,
            Label(ex.backend),
            ex.sent,
            // An answer being closed with is counted whole: it is logged
            // before it is delivered.
            self.down.bytes_out() - ex.down_out
                + if matches!(self.phase, Phase::Closing) {
                    self.down.held()
                } else {
                    0
                },
            self.up.buf().spilled_total() - ex.up_spilled,
            self.down.buf().spilled_total() - ex.down_spilled,
            ex.backend_held.as_secs_f64(),
            ex.started.elapsed().as_secs_f64(),
        );
    }

    fn log_close(&self) {
        let level = if self.quiet_close {
            log::Level::Debug
        } else {
            log::Level::Info
        };
        log::log!(
            level,
            "{} closed client={} requests={} up_bytes={} down_bytes={} dropped={} duration={:.3}s reason={}",
            self.id,
            self.client_addr,
            self.requests,
            self.sent_total,
            self.down.bytes_out(),
            self.dropped + self.up.bytes_dropped() + self.down.bytes_dropped(),
            self.opened.elapsed().as_secs_f64(),
            self.trouble.as_deref().unwrap_or("done")
        );
    }

    /// Once the backend has switched protocols: what the relay that takes
    /// over needs. Whatever the client sent after its request goes to the
    /// backend first.
    pub fn take_tunnel(&mut self, ctx: &mut Ctx) -> Option<Tunnel> {
        if !matches!(self.phase, Phase::Upgraded(_)) || self.client.io.is_none() {
            return None;
        }
        let Phase::Upgraded(leg) = std::mem::replace(&mut self.phase, Phase::Closing) else {
            return None;
        };
        let mut up = ctx.plan.direction("client->backend");
        if let Ok(buf) = self.inbox.peek() {
            let taken = push_all(&mut up, buf);
            self.inbox.consume(taken);
        }
        let mut down = std::mem::replace(&mut self.down, ctx.plan.direction("backend->client"));
        down.unlimited();
        Some(Tunnel {
            id: self.id.0,
            slot: self.slot,
            client: std::mem::replace(&mut self.client, Peer::absent()),
            client_addr: self.client_addr,
            leg,
            up,
            down,
            opened: self.opened,
        })
    }

    // ---------------------------------------------------------------
    // What the worker asks

    /// End now: for `--idle-timeout` and the end of a graceful shutdown.
    pub fn close_now(&mut self, reason: &str, gentle: bool, ctx: &mut Ctx) -> Status {
        self.trouble.get_or_insert_with(|| reason.to_string());
        if let Phase::Connecting(dial) = std::mem::replace(&mut self.phase, Phase::Closing) {
            dial.abandon(!gentle, ctx);
        }
        if let Some(leg) = take_leg(&mut self.phase) {
            leg.close(!gentle, ctx);
        }
        self.up.abort();
        self.down.abort();
        self.close_client(!gentle);
        self.finish_turn(false, ctx)
    }

    pub fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_active)
    }

    pub fn held(&self) -> u64 {
        self.up.held() + self.down.held() + self.inbox.len()
    }

    /// Between requests with nothing held: closing loses nothing.
    pub fn is_quiet(&self) -> bool {
        matches!(self.phase, Phase::Head) && self.held() == 0
    }

    pub fn waiting_for_disk(&self) -> bool {
        let backend_readable = match &self.phase {
            Phase::ResponseBody(leg, _) => leg.peer.is_readable(),
            _ => false,
        };
        self.body_blocked
            || self.up.waiting_for_disk(self.client.is_readable())
            || self.down.waiting_for_disk(backend_readable)
    }
}

/// The backend leg of the phase, if it has one; the phase is then
/// `Delivering` (the caller sets what comes next).
fn take_leg(phase: &mut Phase) -> Option<BackendLeg> {
    match std::mem::replace(phase, Phase::Delivering) {
        Phase::Exchange(leg) | Phase::ResponseBody(leg, _) | Phase::Upgraded(leg) => Some(leg),
        other => {
            *phase = other;
            None
        }
    }
}

/// One read from `peer` into `inbox` (memory only, never spliced).
fn read_into(inbox: &mut SpillBuffer, peer: &mut Peer<TcpStream>, scratch: &mut [u8]) -> Read {
    if !peer.is_readable() || !inbox.has_room() {
        return Read::Nothing;
    }
    let Some(io) = peer.io.as_mut() else {
        return Read::Nothing;
    };
    match inbox.fill(io, None, scratch, usize::MAX) {
        Fill::Took(_) => {
            if inbox.last_read_was_short() {
                peer.read_short();
            }
            Read::Took
        }
        Fill::WouldBlock => {
            peer.read_dry();
            Read::Nothing
        }
        Fill::Eof => Read::Eof,
        Fill::SourceFailed(e) => Read::Failed(e),
        Fill::Full | Fill::NoDisk(_) => Read::Nothing,
        Fill::SpillFailed(e) => Read::Failed(e),
    }
}

/// Push all of `bytes` into `dir` if it can take them now; how many it took.
fn push_all(dir: &mut Direction, bytes: &[u8]) -> usize {
    let mut taken = 0;
    while taken < bytes.len() {
        match dir.push(&bytes[taken..]) {
            Fill::Took(n) if n > 0 => taken += n,
            _ => break,
        }
    }
    taken
}

/// The largest body a request may have: `--max-request-body` (0: none),
/// and never more than a direction can hold.
fn body_limit(ctx: &Ctx) -> u64 {
    let capacity = ctx.plan.memory as u64 + ctx.plan.max_spill;
    match ctx.config.max_request_body {
        0 => capacity,
        n => n.min(capacity),
    }
}

fn chunk_why(e: super::chunked::ChunkError) -> &'static str {
    use super::chunked::ChunkError::*;
    match e {
        BadSize => "invalid chunk size",
        SizeTooLong => "chunk size over 16 hex digits",
        BadExtension => "invalid or oversized chunk extension",
        BadLineEnd => "bare LF or missing CRLF in chunked framing",
        BadTrailer => "invalid or oversized trailer",
    }
}
