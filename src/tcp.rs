//! A `--mode tcp` connection: one client, one backend, two directions,
//! read top to bottom.
//!
//! ```text
//!  accept ──► Connecting ──(connected)──► Relaying ──(backend closed)──► Finishing ──► Finished
//!              │    ▲                        │                              ▲
//!   refused /  │    │ next candidate         │ error, idle timeout,         │
//!   timed out  └────┘ (client bytes kept)    └── shutdown cut ──────────────┘
//!              │
//!              └──(no backend left: the client is reset)──────────────────► Finishing
//! ```
//!
//! Each socket is closed as soon as both of its directions are done: the
//! client when it has sent EOF (or failed) and everything bound for it
//! was delivered; the backend likewise, or as soon as it has sent EOF and
//! nothing is pending for it (unless `--keep-half-open`). A socket still
//! sending on a direction we gave up lingers up to 2s, so that its close
//! is not a reset. An error on one socket aborts the direction into it,
//! and the direction out of it too unless that stream was already
//! complete (EOF seen): a cut-short stream is never passed on as a
//! complete one, so its receiver is reset rather than shut down.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};

use crate::config::show_size;
use crate::connection::{
    Ctx, HeaderRead, Id, Label, Side, Status, close_stream, read_proxy_header,
};
use crate::io_error::{describe, is_normal_close};
use crate::metrics::{Backpressure, Outcome, WorkerMetrics};
use crate::proxy_header;
use crate::relay::{Culprit, Direction, Flow, News, Peer, Pumped, pump};
use crate::timers::Timer;
use crate::upstream::{BackendLeg, Dial, Dialled, Owner};

/// How long a client has to send its PROXY protocol header in tcp mode
/// (at most `--client-header-timeout`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a socket that is done may stay open to drain a sender we no
/// longer listen to (see `TcpConnection::lingering`).
const LINGER: Duration = Duration::from_secs(2);

/// Count what a direction (`d`: 0 up, 1 down) had to say.
pub fn count_news(m: &WorkerMetrics, news: &News, d: usize) {
    match news {
        News::FirstSpill => m.spill_events[d].add(1),
        News::SpillLimit => m.backpressure(Backpressure::MaxSpill),
        News::DiskBlocked { cause, .. } if cause.contains("--max-disk") => {
            m.backpressure(Backpressure::MaxDisk)
        }
        News::DiskBlocked { .. } => m.backpressure(Backpressure::DiskError),
        News::DiskBack { .. } => {}
    }
}

/// What an upgraded HTTP connection hands over to become a relay.
pub struct Tunnel {
    pub id: u64,
    pub slot: usize,
    pub client: Peer<TcpStream>,
    pub client_addr: SocketAddr,
    pub leg: BackendLeg,
    pub up: Direction,
    pub down: Direction,
    pub opened: Instant,
}

/// Where the connection is with its backend.
enum Phase {
    /// `--accept-proxy`: waiting for the client's PROXY protocol header,
    /// until `until`; nothing is read from the client nor dialled before.
    AwaitingHeader { until: Instant },
    /// Dialling backends in turn; the client's bytes are buffered meanwhile.
    Connecting(Dial),
    /// Connected: bytes flow both ways.
    Relaying(BackendLeg),
    /// The backend socket is closed (its directions done, or it failed, or
    /// none could be reached): what is held for the client is delivered,
    /// then the client is closed.
    Finishing,
}

pub struct TcpConnection {
    pub id: Id,
    /// Where the connection sits in the worker's slab (for timers).
    slot: usize,
    client: Peer<TcpStream>,
    client_addr: SocketAddr,
    phase: Phase,
    /// client->backend and backend->client.
    up: Direction,
    down: Direction,
    /// The backend tried or used last, for logs and the summary.
    backend_addr: Option<SocketAddr>,
    opened: Instant,
    /// How long the backend connection was held, once it is closed.
    backend_held: Option<Duration>,
    /// The first thing that went wrong, for the close summary.
    trouble: Option<String>,
    /// Until when a finished socket may stay open to drain its sender.
    linger_until: Option<Instant>,
    /// The earliest spill timer armed and not yet due: one at a time, so
    /// a connection that pauses thousands of times a second (a fast
    /// receiver, briefly blocked each time) does not fill the timer heap.
    spill_timer: Option<Instant>,
    /// The client moved bytes after the backend last did: it is waiting
    /// for an answer, so a graceful shutdown must not take it for idle.
    client_spoke_last: bool,
    /// When a byte last moved, either way (for --idle-timeout).
    last_active: Instant,
    /// Close without resetting peers even if streams were cut (idle
    /// timeout: nothing was in flight).
    gentle: bool,
    /// What the counters were told so far: bytes out and spilled, [up, down].
    reported: [u64; 4],
    /// A connection refused before it was anything (no valid PROXY header):
    /// its close line is DEBUG, so a flood of them does not flood the log.
    quiet_close: bool,
}

impl TcpConnection {
    /// Take an accepted client and start dialling a backend. The client's
    /// socket is registered once, for reading and writing, and stays so:
    /// readiness is remembered in its `Peer`, not re-armed.
    pub fn open(
        id: u64,
        slot: usize,
        mut client: TcpStream,
        client_addr: SocketAddr,
        token: Token,
        ctx: &mut Ctx,
    ) -> io::Result<TcpConnection> {
        // Relayed bytes are already batched by the peers; Nagle would only
        // add latency to the last segment of each burst.
        client.set_nodelay(true)?;
        ctx.registry
            .register(&mut client, token, Interest::READABLE | Interest::WRITABLE)?;
        let mut conn = TcpConnection {
            id: Id(id),
            slot,
            client: Peer::new(client),
            client_addr,
            phase: Phase::Connecting(Dial::default()),
            up: ctx.plan.direction("client->backend"),
            down: ctx.plan.direction("backend->client"),
            backend_addr: None,
            opened: Instant::now(),
            backend_held: None,
            trouble: None,
            linger_until: None,
            spill_timer: None,
            client_spoke_last: false,
            last_active: Instant::now(),
            gentle: false,
            reported: [0; 4],
            quiet_close: false,
        };
        if ctx.config.accept_proxy {
            let wait = HEADER_TIMEOUT.min(ctx.config.client_header_timeout);
            let until = Instant::now() + wait;
            conn.phase = Phase::AwaitingHeader { until };
            let timer = Timer::Deadline { slot, conn: id };
            ctx.timers.arm(until, timer);
            return Ok(conn);
        }
        conn.begin_dialling(None, ctx);
        Ok(conn)
    }

    /// The client is known: say who it is to the backend if asked to
    /// (`--send-proxy`: the header goes first into the buffer bound for
    /// it, before any of the client's bytes), and dial.
    fn begin_dialling(&mut self, local: Option<SocketAddr>, ctx: &mut Ctx) {
        if let Some(version) = ctx.config.send_proxy {
            let local = local
                .or_else(|| self.client.io.as_ref().and_then(|c| c.local_addr().ok()))
                .unwrap_or(self.client_addr);
            let header = proxy_header::encode(version, self.client_addr, local);
            self.up.push(&header);
        }
        self.phase = Phase::Connecting(Dial::default());
        self.dial(|dial, owner, ctx| dial.next(owner, ctx), ctx);
    }

    /// `--accept-proxy`: read the client's header; a valid one names the
    /// client from now on, anything else closes the connection before a
    /// byte reaches any backend.
    fn read_header(&mut self, ctx: &mut Ctx) {
        let Phase::AwaitingHeader { until } = self.phase else {
            return;
        };
        let refused = match read_proxy_header(&mut self.client, ctx.scratch) {
            HeaderRead::Done { client, local } => {
                if let Some(client) = client {
                    log::debug!("{} client {} is {client}", self.id, self.client_addr);
                    self.client_addr = client;
                }
                self.last_active = Instant::now();
                return self.begin_dialling(local, ctx);
            }
            HeaderRead::Waiting if Instant::now() < until => return,
            HeaderRead::Waiting => "no whole header in time",
            HeaderRead::Refused(why) => why,
            HeaderRead::Failed(_) => "the socket failed",
        };
        proxy_header::log_refusal(&self.id, self.client_addr, refused);
        self.trouble = Some(format!("bad PROXY header: {refused}"));
        self.quiet_close = true;
        self.phase = Phase::Finishing;
        self.up.abort();
        self.down.abort();
    }

    /// An HTTP connection whose backend answered `101 Switching
    /// Protocols`: from now on a relay of bytes both ways, as in `tcp`
    /// mode. `down` holds the 101's head (and whatever the backend sent
    /// after it), `up` whatever the client sent after its request.
    pub fn tunnel(parts: Tunnel) -> TcpConnection {
        let backend_addr = Some(parts.leg.addr());
        let now = Instant::now();
        TcpConnection {
            id: Id(parts.id),
            slot: parts.slot,
            client: parts.client,
            client_addr: parts.client_addr,
            phase: Phase::Relaying(parts.leg),
            up: parts.up,
            down: parts.down,
            backend_addr,
            opened: parts.opened,
            backend_held: None,
            trouble: None,
            linger_until: None,
            spill_timer: None,
            client_spoke_last: false,
            last_active: now,
            gentle: false,
            reported: [0; 4],
            quiet_close: false,
        }
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
            Phase::Relaying(leg) if leg.key() == key => leg.peer.on_event(event),
            _ => {}
        }
    }

    pub fn on_connect_timeout(&mut self, attempt: u32, ctx: &mut Ctx) {
        self.dial(|dial, owner, ctx| dial.on_timeout(attempt, owner, ctx), ctx);
    }

    pub fn on_connect_retry(&mut self, ctx: &mut Ctx) {
        if !self.up.dst_done() {
            self.dial(|dial, owner, ctx| dial.on_retry(owner, ctx), ctx);
        }
    }

    /// Take one step of dialling, if still connecting, and act on what it
    /// came to.
    fn dial(&mut self, step: impl FnOnce(&mut Dial, Owner, &mut Ctx) -> Dialled, ctx: &mut Ctx) {
        let owner = self.owner();
        let Phase::Connecting(dial) = &mut self.phase else {
            return;
        };
        let dialled = step(dial, owner, ctx);
        self.backend_addr = dial.last_addr().or(self.backend_addr);
        match dialled {
            Dialled::Pending => {}
            Dialled::Connected(leg) => {
                self.backend_addr = Some(leg.addr());
                self.phase = Phase::Relaying(leg);
            }
            Dialled::GaveUp(tried) => {
                log::error!(
                    "{} client {}: no backend could be reached: {tried}; closing the client",
                    self.id,
                    self.client_addr
                );
                self.phase = Phase::Finishing;
                self.fail(Side::Backend, format!("no backend reached: {tried}"));
            }
        }
    }

    /// Run both directions as far as readiness allows, then close what is
    /// finished.
    pub fn drive(&mut self, ctx: &mut Ctx) -> Status {
        if matches!(self.phase, Phase::AwaitingHeader { .. }) {
            self.read_header(ctx);
            if matches!(self.phase, Phase::AwaitingHeader { .. }) {
                return Status::Waiting;
            }
        }
        self.dial(|dial, owner, ctx| dial.check(owner, ctx), ctx);
        self.check_socket_errors();
        let moved_before = self.bytes_moved();
        let delivered_before = self.down.bytes_out();
        let busy = self.pump_both(ctx);
        if !ctx.keep_half_open {
            self.release_finished_backend();
        }
        if self.bytes_moved() != moved_before {
            self.last_active = Instant::now();
            self.client_spoke_last = self.down.bytes_out() == delivered_before;
        }
        self.tell_news(ctx);
        self.report(ctx);
        self.arm_spill_timer(ctx);
        self.finish_turn(ctx, busy)
    }

    /// Add what moved since the last turn to the worker's counters.
    fn report(&mut self, ctx: &Ctx) {
        let now = [
            self.up.bytes_out(),
            self.down.bytes_out(),
            self.up.buf().spilled_total(),
            self.down.buf().spilled_total(),
        ];
        let m = ctx.metrics;
        let cells = [&m.bytes[0], &m.bytes[1], &m.spilled[0], &m.spilled[1]];
        for ((cell, now), before) in cells.into_iter().zip(now).zip(&mut self.reported) {
            if now != *before {
                cell.add(now - *before);
                *before = now;
            }
        }
    }

    /// One pump each way. A failure is judged before the other direction
    /// touches the same socket: the failing call consumed the socket's
    /// error, and a read after a reset returns 0, which the other pump
    /// would take for a clean EOF and pass on as one. True if work is left.
    fn pump_both(&mut self, ctx: &mut Ctx) -> bool {
        let mut no_backend = Peer::absent();
        let backend = match &mut self.phase {
            Phase::Relaying(leg) => &mut leg.peer,
            _ => &mut no_backend,
        };
        // A socket whose peer has ended its stream cleanly is closed as
        // soon as our stream into it ends (`close_finished_sockets`).
        self.up.set_receiver_closing(self.down.sender_finished());
        let up = pump(&mut self.up, &mut self.client, backend, ctx.scratch);
        let up_busy = matches!(up, Pumped::MoreWork);
        self.handle_failure(up, (Side::Client, Side::Backend));
        let backend = match &mut self.phase {
            Phase::Relaying(leg) => &mut leg.peer,
            _ => &mut no_backend,
        };
        self.down.set_receiver_closing(self.up.sender_finished());
        let down = pump(&mut self.down, backend, &mut self.client, ctx.scratch);
        let down_busy = matches!(down, Pumped::MoreWork);
        self.handle_failure(down, (Side::Backend, Side::Client));
        up_busy || down_busy
    }

    /// The backend has ended its stream (its EOF is read) and nothing is
    /// waiting to be sent to it: it is finished, so let it go now rather
    /// than when the client half-closes. A server doing a lingering close
    /// (half-close, then wait for the peer's FIN, as gunicorn, Apache and
    /// nginx do) would otherwise keep a worker busy until the slow client
    /// finished reading. What the client sends from now on is dropped, as
    /// if the backend had closed fully. `--keep-half-open` keeps the
    /// backend's read half open instead, for protocols that need it.
    fn release_finished_backend(&mut self) {
        let relaying = matches!(self.phase, Phase::Relaying(_));
        if relaying
            && self.down.sender_finished()
            && self.up.flow() == Flow::Open
            && self.up.held() == 0
        {
            log::debug!(
                "{} backend {} has ended its stream: releasing it",
                self.id,
                self.backend_label()
            );
            self.up.release();
        }
    }

    /// A direction that stopped reading to give its receiver time to catch
    /// up must come back when that time is up, even if no socket event
    /// comes (a receiver that reads nothing at all sends none).
    fn arm_spill_timer(&mut self, ctx: &mut Ctx) {
        let now = Instant::now();
        if self.spill_timer.is_some_and(|t| t <= now) {
            self.spill_timer = None;
        }
        let (up_ready, down_ready) = self.senders_readable();
        let due = [
            self.up.spill_due(now, up_ready),
            self.down.spill_due(now, down_ready),
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(due) = due.filter(|&d| self.spill_timer.is_none_or(|t| d < t)) {
            self.spill_timer = Some(due);
            let timer = Timer::SpillDue {
                slot: self.slot,
                conn: self.id.0,
            };
            ctx.timers.arm(due, timer);
        }
    }

    /// The remembered readiness of the senders of (up, down).
    fn senders_readable(&self) -> (bool, bool) {
        let backend = match &self.phase {
            Phase::Relaying(leg) => leg.peer.is_readable(),
            _ => false,
        };
        (self.client.is_readable(), backend)
    }

    /// Close what is finished; report what the event loop should do next.
    fn finish_turn(&mut self, ctx: &mut Ctx, busy: bool) -> Status {
        self.close_finished_sockets(ctx);
        if self.client.io.is_none() && matches!(self.phase, Phase::Finishing) {
            self.log_summary();
            self.report(ctx);
            let m = ctx.metrics;
            m.closed(Outcome::of_reason(
                self.trouble.as_deref().unwrap_or("done"),
            ));
            m.client_time.observe(self.opened.elapsed());
            if let Some(held) = self.backend_held {
                m.backend_hold.observe(held);
            }
            ctx.stats
                .record_close(self.up.buf().spilled_total() + self.down.buf().spilled_total());
            Status::Finished
        } else if busy {
            Status::Busy
        } else {
            Status::Waiting
        }
    }

    /// Fail a socket that epoll flagged with an error, if `SO_ERROR` says
    /// so (a connecting backend's errors are its dial's).
    fn check_socket_errors(&mut self) {
        let client_err = self
            .client
            .take_errored()
            .then(|| self.client.io.as_ref().map(TcpStream::take_error));
        let backend_err = match &mut self.phase {
            Phase::Relaying(leg) => leg
                .peer
                .take_errored()
                .then(|| leg.peer.io.as_ref().map(TcpStream::take_error)),
            _ => None,
        };
        let found = [
            (Side::Client, Side::Backend, client_err),
            (Side::Backend, Side::Client, backend_err),
        ];
        for (side, other, result) in found {
            if let Some(Some(Ok(Some(err)) | Err(err))) = result {
                self.handle_failure(Pumped::Failed(Culprit::Sender, err), (side, other));
            }
        }
    }

    /// End the connection now, whatever is in flight: for `--idle-timeout`
    /// (`gentle`: peers get a normal close, nothing was moving) and at the
    /// end of a graceful shutdown (peers are reset: their streams were cut).
    pub fn close_now(&mut self, reason: &str, gentle: bool, ctx: &mut Ctx) -> Status {
        self.trouble.get_or_insert_with(|| reason.to_string());
        self.gentle = gentle;
        // Now means now: no lingering for a peer that is still sending
        // (it would keep a socket, and the idle sweep would close it again
        // at every round for up to `LINGER`).
        self.linger_until = Some(Instant::now());
        self.up.abort();
        self.down.abort();
        self.finish_turn(ctx, false)
    }

    /// How long since a byte moved either way.
    pub fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_active)
    }

    /// Nothing is held for either peer: closing now would lose nothing.
    /// (For a graceful shutdown, with `idle_for`.) A client still waiting
    /// for an answer to what it sent last is not quiet, however long the
    /// backend takes.
    pub fn is_quiet(&self) -> bool {
        !matches!(self.phase, Phase::Connecting(_)) && self.held() == 0 && !self.client_spoke_last
    }

    /// Bytes held for the peers right now.
    pub fn held(&self) -> u64 {
        self.up.held() + self.down.held()
    }

    /// Stopped reading because no disk space could be had.
    pub fn waiting_for_disk(&self) -> bool {
        let (up_ready, down_ready) = self.senders_readable();
        self.up.waiting_for_disk(up_ready) || self.down.waiting_for_disk(down_ready)
    }

    fn bytes_moved(&self) -> u64 {
        self.up.bytes_in() + self.up.bytes_out() + self.down.bytes_in() + self.down.bytes_out()
    }

    fn handle_failure(&mut self, pumped: Pumped, (sender, receiver): (Side, Side)) {
        let Pumped::Failed(culprit, err) = pumped else {
            return;
        };
        let side = match culprit {
            Culprit::Sender => sender,
            Culprit::Receiver => receiver,
            Culprit::SpillFile => {
                let dir = if sender == Side::Client {
                    &self.up
                } else {
                    &self.down
                };
                log::error!(
                    "{} {}: spill file in {} failed: {err}; closing the connection",
                    self.id,
                    dir.label(),
                    dir.buf().temp_dir().display()
                );
                self.trouble
                    .get_or_insert(format!("spill file failed: {err}"));
                self.up.abort();
                self.down.abort();
                return;
            }
        };
        let peer = match side {
            Side::Client => Label(Some(self.client_addr)),
            Side::Backend => self.backend_label(),
        };
        if is_normal_close(&err) {
            log::debug!("{} {side} {peer} closed abruptly: {err}", self.id);
        } else {
            log::error!("{} {side} {peer} failed: {err}", self.id);
        }
        self.fail(side, format!("{side} {}", describe(&err)));
    }

    /// `side`'s socket is unusable. Abort what was going to it; abort what
    /// was coming from it unless that stream had already ended cleanly, in
    /// which case it is still delivered to the other side.
    fn fail(&mut self, side: Side, why: String) {
        self.trouble.get_or_insert(why);
        let (into, out_of) = match side {
            Side::Client => (&mut self.down, &mut self.up),
            Side::Backend => (&mut self.up, &mut self.down),
        };
        into.abort();
        // Bytes it sent that we had not read yet may have ended in an EOF,
        // but after a reset the kernel reports the end of a cut stream the
        // same way (read returns 0): only an EOF seen before the failure
        // proves the stream complete.
        if out_of.flow() == Flow::Open {
            out_of.abort();
        }
    }

    /// A socket is closed once nothing more will be read from it or written
    /// to it. If the stream into it was aborted, it is reset (linger 0) so
    /// the peer cannot take a truncated stream for a complete one.
    fn close_finished_sockets(&mut self, ctx: &mut Ctx) {
        let client_done = self.up.src_done() && self.down.dst_done();
        if client_done && !self.lingering(Side::Client, ctx) {
            if let Some(client) = self.client.io.take() {
                close_stream(client, self.down.flow() == Flow::Aborted && !self.gentle);
            }
        }
        let backend_done = self.down.src_done() && self.up.dst_done();
        if backend_done && !self.lingering(Side::Backend, ctx) {
            let reset = self.up.flow() == Flow::Aborted && !self.gentle;
            match std::mem::replace(&mut self.phase, Phase::Finishing) {
                Phase::Connecting(dial) => dial.abandon(reset, ctx),
                Phase::Relaying(leg) => self.backend_held = leg.close(reset, ctx),
                Phase::AwaitingHeader { .. } | Phase::Finishing => {}
            }
        }
    }

    /// Should `side`'s socket, whose directions are both done, stay open a
    /// little longer? Yes if everything bound for it was delivered (the
    /// direction into it is `Closed`) but it is still sending on the
    /// direction out of it, which we gave up: closing a socket with unread
    /// bytes makes the kernel reset it, which throws away what is still
    /// queued for the peer. So we keep reading and dropping until it stops,
    /// for at most `LINGER` (as nginx's lingering close does); the
    /// connection's timer brings us back then.
    fn lingering(&mut self, side: Side, ctx: &mut Ctx) -> bool {
        let (out_of, into) = match side {
            Side::Client => (&self.up, &self.down),
            Side::Backend => (&self.down, &self.up),
        };
        if into.flow() != Flow::Closed || !out_of.still_sending() {
            return false;
        }
        match self.linger_until {
            Some(until) => Instant::now() < until,
            None => {
                let until = Instant::now() + LINGER;
                self.linger_until = Some(until);
                let timer = Timer::LingerEnd {
                    slot: self.slot,
                    conn: self.id.0,
                };
                ctx.timers.arm(until, timer);
                true
            }
        }
    }

    /// What the directions have to tell the operator: the first spill of
    /// each (the cue to tune `--memory-buffer`), and disk trouble.
    fn tell_news(&mut self, ctx: &Ctx) {
        let backend = self.backend_label();
        let m = ctx.metrics;
        let directions = [(&mut self.up, "client", 0), (&mut self.down, "backend", 1)];
        for (dir, sender, d) in directions {
            while let Some(news) = dir.news() {
                count_news(m, &news, d);
                match news {
                    News::SpillLimit => {}
                    News::FirstSpill => log::warn!(
                        "{} {} spilling to disk: client={} backend={backend} more than memory_buffer={} waiting; spill file in {} (raise --memory-buffer to keep more in memory)",
                        self.id,
                        dir.label(),
                        self.client_addr,
                        show_size(dir.buf().memory_limit() as u64),
                        dir.buf().temp_dir().display()
                    ),
                    // While a full disk drains, space comes and goes: the
                    // first time is the operator's cue, the rest noise.
                    News::DiskBlocked { cause, first } => log::log!(
                        if first {
                            log::Level::Warn
                        } else {
                            log::Level::Debug
                        },
                        "{} {} cannot spill to {} ({cause}); holding {} and pausing reads from the {sender} until space frees: client={} backend={backend}",
                        self.id,
                        dir.label(),
                        dir.buf().temp_dir().display(),
                        show_size(dir.held()),
                        self.client_addr,
                    ),
                    News::DiskBack { first } => log::log!(
                        if first {
                            log::Level::Info
                        } else {
                            log::Level::Debug
                        },
                        "{} {} spilling again",
                        self.id,
                        dir.label()
                    ),
                }
            }
        }
    }

    /// The backend's address for logs: "-" if none was ever tried.
    fn backend_label(&self) -> Label {
        Label(self.backend_addr)
    }

    fn log_summary(&self) {
        let reason = self.trouble.as_deref().unwrap_or("done");
        let level = if self.quiet_close {
            log::Level::Debug
        } else {
            log::Level::Info
        };
        log::log!(
            level,
            "{} closed client={} backend={} up_bytes={} down_bytes={} up_spilled={} down_spilled={} dropped={} backend_held={:.3}s duration={:.3}s reason={}",
            self.id,
            self.client_addr,
            self.backend_label(),
            self.up.bytes_out(),
            self.down.bytes_out(),
            self.up.buf().spilled_total(),
            self.down.buf().spilled_total(),
            self.up.bytes_dropped() + self.down.bytes_dropped(),
            self.backend_held.unwrap_or_default().as_secs_f64(),
            self.opened.elapsed().as_secs_f64(),
            reason
        );
    }
}
