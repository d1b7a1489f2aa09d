//! One client, one backend, two directions: the lifecycle of a proxied
//! connection, read top to bottom.
//!
//! ```text
//!  accept ──► Connecting ──(writable, no error)──► Relaying ──► Finished
//!              │    ▲                                 │
//!   refused /  │    │ next untried backend            │ error, idle timeout,
//!   timed out  └────┘ (client bytes kept)             │ shutdown cut
//!              │                                      ▼
//!              └──(no backend left)─────────────────► Finished
//! ```
//!
//! Each socket is closed as soon as both of its directions are done:
//! the client when it has sent EOF (or failed) and everything bound for it
//! was delivered; the backend likewise (lingering up to 2s if it is still
//! sending on a direction we gave up, so the close is not a reset). An
//! error on one socket aborts the direction into it, and the direction out
//! of it too unless that stream was already complete (EOF seen): a
//! cut-short stream is never passed on as a complete one, so its receiver
//! is reset rather than shut down.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::balancer::{Backends, Picked};
use crate::config::show_size;
use crate::io_error::{describe, describe_connect_error, is_normal_close, is_out_of_resources};
use crate::relay::{BufferPlan, Culprit, Direction, Flow, Pumped, pump};
use crate::stats::Stats;
use crate::timers::{Timer, Timers};

/// Which socket of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
        })
    }
}

/// What the event loop should do with the connection after a turn.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    /// Waiting for readiness.
    Waiting,
    /// Work is left: run another turn soon, without waiting for an event.
    Busy,
    /// Both sockets are closed; drop it.
    Finished,
}

/// An address for a log line, or "-": formatted only if the line is
/// written, so the checks that run on every turn allocate nothing.
#[derive(Clone, Copy)]
struct Label(Option<SocketAddr>);

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The log prefix every line about one connection carries.
pub struct Id(pub u64);

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[conn {}]", self.0)
    }
}

pub struct Connection {
    pub id: Id,
    /// Where the connection sits in the event loop's slab (for timers).
    slot: usize,
    client: Option<TcpStream>,
    client_addr: SocketAddr,
    backend: Option<TcpStream>,
    backend_token: Token,
    /// The backend being tried or used, as an index into the pool, and its
    /// address (kept after close, for the summary).
    backend_idx: Option<usize>,
    /// That backend was down and this connection is its one trial: only
    /// then may leaving early hand the trial back (`Backends::abandoned`).
    backend_trial: bool,
    backend_addr: Option<SocketAddr>,
    /// The backend's non-blocking connect has completed.
    connected: bool,
    /// An event came for the backend socket while connecting: look at it.
    connect_ready: bool,
    /// One of those events said writable (see `finish_connect`).
    connect_writable: bool,
    /// Connect attempts made, counting from 1; timers name their attempt.
    attempt: u32,
    /// Backends tried, and why each failed, for failover and the final error.
    tried: Vec<usize>,
    failures: Vec<String>,
    up: Direction,
    down: Direction,
    opened: Instant,
    backend_connected_at: Option<Instant>,
    backend_held: Option<Duration>,
    /// The first thing that went wrong, for the close summary.
    trouble: Option<String>,
    /// The spill warning was logged for (up, down).
    spill_warned: (bool, bool),
    /// Until when a finished socket may stay open to drain its sender.
    linger_until: std::cell::Cell<Option<Instant>>,
    /// The earliest spill timer armed and not yet due: one at a time, so
    /// a connection that pauses thousands of times a second (a fast
    /// receiver, briefly blocked each time) does not fill the timer heap.
    spill_timer: Option<Instant>,
    /// The client moved bytes after the backend last did: it is waiting
    /// for an answer, so a graceful shutdown must not take it for idle.
    client_spoke_last: bool,
    /// epoll reported an error on (client, backend): look at it even if
    /// no read or write would (a reset after the peer's EOF, while nothing
    /// is waiting to be written to it, shows up nowhere else).
    errored: (bool, bool),
    /// Disk trouble of (up, down): how many times it began, and whether it
    /// stands now.
    disk_trouble: [(u32, bool); 2],
    /// When a byte last moved, either way (for --idle-timeout).
    last_active: Instant,
    /// Close without resetting peers even if streams were cut (idle
    /// timeout: nothing was in flight).
    gentle: bool,
}

/// What a connection needs from the event loop while it runs.
pub struct Ctx<'a> {
    pub registry: &'a Registry,
    pub pool: &'a Backends,
    pub timers: &'a mut Timers,
    pub scratch: &'a mut [u8],
    pub stats: &'a Stats,
    pub connect_timeout: Duration,
    /// Backends one connection may try: 1 + `--connect-retries`.
    pub max_attempts: usize,
    /// `--keep-half-open`: a backend that has sent EOF stays connected
    /// until the client half-closes too.
    pub keep_half_open: bool,
}

impl Connection {
    /// Take an accepted client and start connecting to a backend. Both
    /// sockets are registered once, for reading and writing, and stay so:
    /// readiness is remembered in the directions, not re-armed. Only a
    /// replacement backend socket (failover) is registered anew.
    pub fn open(
        id: u64,
        slot: usize,
        client: TcpStream,
        client_addr: SocketAddr,
        plan: &BufferPlan,
        tokens: (Token, Token),
        ctx: &mut Ctx,
    ) -> io::Result<Connection> {
        let mut client = client;
        // Relayed bytes are already batched by the peers; Nagle would only
        // add latency to the last segment of each burst.
        client.set_nodelay(true)?;
        ctx.registry.register(
            &mut client,
            tokens.0,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let mut conn = Connection {
            id: Id(id),
            slot,
            client: Some(client),
            client_addr,
            backend: None,
            backend_token: tokens.1,
            backend_idx: None,
            backend_trial: false,
            backend_addr: None,
            connected: false,
            connect_ready: false,
            connect_writable: false,
            attempt: 0,
            tried: Vec::new(),
            failures: Vec::new(),
            up: plan.direction("client->backend"),
            down: plan.direction("backend->client"),
            opened: Instant::now(),
            backend_connected_at: None,
            backend_held: None,
            trouble: None,
            spill_warned: (false, false),
            errored: (false, false),
            disk_trouble: [(0, false); 2],
            last_active: Instant::now(),
            gentle: false,
            linger_until: std::cell::Cell::new(None),
            spill_timer: None,
            client_spoke_last: false,
        };
        conn.connect_next(ctx);
        Ok(conn)
    }

    /// Note what an event says about a socket. Errors and hang-ups count as
    /// readiness too: the next read or write reports them.
    pub fn on_event(&mut self, side: Side, event: &mio::event::Event) {
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        let writable = event.is_writable() || event.is_write_closed() || event.is_error();
        if event.is_error() {
            match side {
                Side::Client => self.errored.0 = true,
                Side::Backend => self.errored.1 = true,
            }
        }
        match side {
            Side::Client => {
                self.up.src_ready |= readable;
                self.up.src_closing |= event.is_read_closed() || event.is_error();
                self.down.dst_ready |= writable;
            }
            Side::Backend if !self.connected => {
                self.connect_ready |= readable || writable;
                // A backend that answers and closes at once: its FIN may
                // come with the connect's event, and no later one.
                self.down.src_closing |= event.is_read_closed() || event.is_error();
                self.connect_writable |= event.is_writable();
            }
            Side::Backend => {
                self.down.src_ready |= readable;
                self.down.src_closing |= event.is_read_closed() || event.is_error();
                self.up.dst_ready |= writable;
            }
        }
    }

    /// The connect timer for `attempt` ran out.
    pub fn on_connect_timeout(&mut self, attempt: u32, ctx: &mut Ctx) {
        if !self.connected && self.attempt == attempt && self.backend.is_some() {
            let cause = format!("connect timed out after {:?}", ctx.connect_timeout);
            self.connect_failed(cause, ctx);
        }
    }

    /// Start a connect to the next backend the pool offers; when none is
    /// left (or the retries are spent), give up on the client.
    fn connect_next(&mut self, ctx: &mut Ctx) {
        loop {
            let next = if self.tried.len() < ctx.max_attempts {
                ctx.pool.pick_claiming(Instant::now(), &self.tried)
            } else {
                None
            };
            let Some(Picked { idx, trial }) = next else {
                self.give_up();
                return;
            };
            self.tried.push(idx);
            let addr = ctx.pool.addr(idx);
            self.backend_idx = Some(idx);
            self.backend_trial = trial;
            self.backend_addr = Some(addr);
            self.attempt += 1;
            // Events noted for an earlier attempt's socket (same token) say
            // nothing about this one.
            self.connect_ready = false;
            self.connect_writable = false;
            let started = TcpStream::connect(addr).and_then(|mut stream| {
                let both = Interest::READABLE | Interest::WRITABLE;
                ctx.registry
                    .register(&mut stream, self.backend_token, both)?;
                Ok(stream)
            });
            match started {
                Ok(stream) => {
                    self.backend = Some(stream);
                    let timer = Timer::ConnectTimeout {
                        slot: self.slot,
                        conn: self.id.0,
                        attempt: self.attempt,
                    };
                    ctx.timers.arm(Instant::now() + ctx.connect_timeout, timer);
                    log::debug!("{} connecting to backend {addr}", self.id);
                    return;
                }
                Err(e) if is_out_of_resources(&e) => {
                    // Our fault, not the backend's: no failure is counted.
                    // The client waits (its bytes buffered) and we try again
                    // shortly, when connections may have freed fds.
                    self.tried.pop();
                    if self.backend_trial {
                        ctx.pool.abandoned(idx, Instant::now());
                    }
                    ctx.pool.release(idx);
                    self.backend_idx = None;
                    log::warn!(
                        "{} client {}: cannot open a socket to backend {addr} ({e}); retrying in {:?}",
                        self.id,
                        self.client_addr,
                        CONNECT_RETRY
                    );
                    let timer = Timer::ConnectRetry {
                        slot: self.slot,
                        conn: self.id.0,
                    };
                    ctx.timers.arm(Instant::now() + CONNECT_RETRY, timer);
                    return;
                }
                Err(e) => self.note_connect_failure(idx, e.to_string(), ctx),
            }
        }
    }

    /// The retry timer armed when no socket could be opened has fired.
    pub fn on_connect_retry(&mut self, ctx: &mut Ctx) {
        let still_wanted = !self.connected && self.backend.is_none() && !self.up.dst_done();
        if still_wanted {
            self.connect_next(ctx);
        }
    }

    /// A non-blocking connect is done when the socket turns writable; then
    /// `take_error` tells whether it failed. Linux reports a connecting
    /// socket writable only once the handshake is over, so after a writable
    /// event no error means connected (what nginx and HAProxy rely on too);
    /// after any other wake-up `peer_addr` decides (`NotConnected`: not yet).
    fn finish_connect(&mut self, ctx: &mut Ctx) {
        self.connect_ready = false;
        let writable = std::mem::take(&mut self.connect_writable);
        let (Some(backend), Some(idx)) = (&self.backend, self.backend_idx) else {
            return;
        };
        let outcome = match backend.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) if writable => Ok(()),
            Ok(None) => match backend.peer_addr() {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => Err(e),
            },
        };
        match outcome.and_then(|()| backend.set_nodelay(true)) {
            Ok(()) => {
                ctx.pool.succeeded(idx);
                self.connected = true;
                self.backend_connected_at = Some(Instant::now());
                self.up.dst_ready = true;
                self.down.src_ready = true;
                log::debug!("{} connected to backend {}", self.id, ctx.pool.addr(idx));
            }
            Err(e) => self.connect_failed(describe_connect_error(&e), ctx),
        }
    }

    /// The current connect attempt failed: count it against the backend
    /// and move on to the next one. What the client sent meanwhile stays
    /// buffered, so the backend that finally answers gets all of it.
    fn connect_failed(&mut self, cause: String, ctx: &mut Ctx) {
        let Some(idx) = self.backend_idx else { return };
        if let Some(mut stream) = self.backend.take() {
            let _ = ctx.registry.deregister(&mut stream);
        }
        self.note_connect_failure(idx, cause, ctx);
        self.connect_next(ctx);
    }

    fn note_connect_failure(&mut self, idx: usize, cause: String, ctx: &mut Ctx) {
        let addr = ctx.pool.addr(idx);
        log::warn!(
            "{} client {}: backend {addr}: {cause}",
            self.id,
            self.client_addr
        );
        ctx.pool.failed(idx, Instant::now(), &cause);
        ctx.pool.release(idx);
        self.backend_idx = None;
        self.failures.push(format!("{addr} ({cause})"));
    }

    /// No backend could be reached: close the client, naming each one tried.
    fn give_up(&mut self) {
        let tried = if self.failures.is_empty() {
            "no backend left to try".to_string()
        } else {
            self.failures.join(", ")
        };
        log::error!(
            "{} client {}: no backend could be reached: {tried}; closing the client",
            self.id,
            self.client_addr
        );
        self.fail(Side::Backend, format!("no backend reached: {tried}"));
    }

    /// Run both directions as far as readiness allows, then close what is
    /// finished.
    pub fn drive(&mut self, ctx: &mut Ctx) -> Status {
        if self.connect_ready {
            self.finish_connect(ctx);
        }
        self.check_socket_errors();
        let moved_before = self.bytes_moved();
        let delivered_before = self.down.bytes_out;
        let backend = self.backend.as_ref().filter(|_| self.connected);
        // A socket whose peer has ended its stream cleanly is closed as
        // soon as our stream into it ends (`close_finished_sockets`).
        self.up.receiver_closing = matches!(self.down.flow, Flow::Draining | Flow::Closed);
        let up = pump(&mut self.up, self.client.as_ref(), backend, ctx.scratch);
        let up_busy = matches!(up, Pumped::MoreWork);
        // A failure is judged before the other direction touches the same
        // socket: the failing call consumed the socket's error, and a read
        // after a reset returns 0, which the other pump would take for a
        // clean EOF and pass on as one.
        self.handle_failure(up, (Side::Client, Side::Backend));
        let backend = self.backend.as_ref().filter(|_| self.connected);
        self.down.receiver_closing = matches!(self.up.flow, Flow::Draining | Flow::Closed);
        let down = pump(&mut self.down, backend, self.client.as_ref(), ctx.scratch);
        let busy = up_busy || matches!(down, Pumped::MoreWork);
        self.handle_failure(down, (Side::Backend, Side::Client));
        if !ctx.keep_half_open {
            self.release_finished_backend();
        }
        if self.bytes_moved() != moved_before {
            self.last_active = Instant::now();
            self.client_spoke_last = self.down.bytes_out == delivered_before;
        }
        self.warn_on_first_spill();
        self.warn_on_disk_trouble();
        self.arm_spill_timer(ctx);
        self.finish_turn(ctx, busy)
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
        let backend_ended = matches!(self.down.flow, Flow::Draining | Flow::Closed);
        if self.connected && backend_ended && self.up.flow == Flow::Open && self.up.buf.is_empty() {
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
        let due = [self.up.spill_due(now), self.down.spill_due(now)]
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

    /// Close what is finished; report what the event loop should do next.
    fn finish_turn(&mut self, ctx: &mut Ctx, busy: bool) -> Status {
        self.close_finished_sockets(ctx);
        if self.client.is_none() && self.backend.is_none() {
            self.log_summary();
            ctx.stats
                .record_close(self.up.buf.spilled_total() + self.down.buf.spilled_total());
            Status::Finished
        } else if busy {
            Status::Busy
        } else {
            Status::Waiting
        }
    }

    /// Fail a socket that epoll flagged with an error, if `SO_ERROR` says
    /// so (a connecting backend's errors are `finish_connect`'s).
    fn check_socket_errors(&mut self) {
        let flagged = std::mem::take(&mut self.errored);
        let backend = self.backend.as_ref().filter(|_| self.connected);
        let client_err = flagged
            .0
            .then(|| self.client.as_ref().map(TcpStream::take_error));
        let backend_err = flagged.1.then(|| backend.map(TcpStream::take_error));
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
        self.connected && self.held() == 0 && !self.client_spoke_last
    }

    /// Bytes held for the peers right now.
    pub fn held(&self) -> u64 {
        self.up.buf.len() + self.down.buf.len()
    }

    /// Stopped reading because no disk space could be had: needs another
    /// turn when space may have freed, since no socket event will say so.
    pub fn waiting_for_disk(&self) -> bool {
        [&self.up, &self.down].iter().any(|d| {
            d.flow == Flow::Open
                && d.src_ready
                && d.buf.needs_disk()
                && d.buf.disk_blocked().is_some()
        })
    }

    fn bytes_moved(&self) -> u64 {
        self.up.bytes_in + self.up.bytes_out + self.down.bytes_in + self.down.bytes_out
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
                    dir.label,
                    dir.buf.temp_dir().display()
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
        if out_of.flow == Flow::Open {
            out_of.abort();
        }
    }

    /// A socket is closed once nothing more will be read from it or written
    /// to it. If the stream into it was aborted, it is reset (linger 0) so
    /// the peer cannot take a truncated stream for a complete one.
    fn close_finished_sockets(&mut self, ctx: &mut Ctx) {
        let client_done = self.up.src_done() && self.down.dst_done();
        if client_done && !self.lingering(&self.up, &self.down, ctx) {
            if let Some(client) = self.client.take() {
                let reset = self.down.flow == Flow::Aborted && !self.gentle;
                close(client, reset);
            }
        }
        let backend_done = self.down.src_done() && self.up.dst_done();
        if backend_done && !self.lingering(&self.down, &self.up, ctx) {
            if let Some(backend) = self.backend.take() {
                let reset = self.up.flow == Flow::Aborted && !self.gentle;
                close(backend, reset);
                self.backend_held = self.backend_connected_at.map(|t| t.elapsed());
                if let Some(idx) = self.backend_idx.take() {
                    if !self.connected && self.backend_trial {
                        ctx.pool.abandoned(idx, Instant::now());
                    }
                    ctx.pool.release(idx);
                }
            }
        }
    }

    /// Should a socket whose directions are both done stay open a little
    /// longer? Yes if everything bound for it was delivered (`into` is
    /// `Closed`) but it is still sending on a direction we aborted (`out_of`):
    /// closing a socket with unread bytes makes the kernel reset it, which
    /// throws away what is still queued for the peer. So we keep reading and
    /// dropping until it stops, for at most `LINGER` (as nginx's lingering
    /// close does); the connection's timer brings us back then.
    fn lingering(&self, out_of: &Direction, into: &Direction, ctx: &mut Ctx) -> bool {
        if into.flow != Flow::Closed || !out_of.still_sending() {
            return false;
        }
        match self.linger_until.get() {
            Some(until) => Instant::now() < until,
            None => {
                let until = Instant::now() + LINGER;
                self.linger_until.set(Some(until));
                let timer = Timer::LingerEnd {
                    slot: self.slot,
                    conn: self.id.0,
                };
                ctx.timers.arm(until, timer);
                true
            }
        }
    }

    /// The operator's cue to tune `--memory-buffer`: once per direction.
    fn warn_on_first_spill(&mut self) {
        let backend = self.backend_label();
        let directions = [
            (&self.up, &mut self.spill_warned.0),
            (&self.down, &mut self.spill_warned.1),
        ];
        for (dir, warned) in directions {
            if dir.buf.has_spilled() && !*warned {
                *warned = true;
                log::warn!(
                    "{} {} spilling to disk: client={} backend={} more than memory_buffer={} waiting; spill file in {} (raise --memory-buffer to keep more in memory)",
                    self.id,
                    dir.label,
                    self.client_addr,
                    backend,
                    show_size(dir.buf.memory_limit() as u64),
                    dir.buf.temp_dir().display()
                );
            }
        }
    }

    /// WARN once when a direction cannot spill (disk full, over quota,
    /// --max-disk) and falls back to backpressure, the first time; INFO when
    /// it can again. Later episodes are DEBUG.
    fn warn_on_disk_trouble(&mut self) {
        let backend = self.backend_label();
        let [up, down] = &mut self.disk_trouble;
        let directions = [(&self.up, up, "client"), (&self.down, down, "backend")];
        for (dir, (episodes, standing), sender) in directions {
            match (dir.buf.disk_blocked(), *standing) {
                (Some(cause), false) => {
                    *standing = true;
                    *episodes += 1;
                    // While a full disk drains, space comes and goes:
                    // the first time is the operator's cue, the rest noise.
                    let level = if *episodes == 1 {
                        log::Level::Warn
                    } else {
                        log::Level::Debug
                    };
                    log::log!(
                        level,
                        "{} {} cannot spill to {} ({cause}); holding {} and pausing reads from the {sender} until space frees: client={} backend={backend}",
                        self.id,
                        dir.label,
                        dir.buf.temp_dir().display(),
                        show_size(dir.buf.len()),
                        self.client_addr,
                    );
                }
                (None, true) => {
                    *standing = false;
                    let level = if *episodes == 1 {
                        log::Level::Info
                    } else {
                        log::Level::Debug
                    };
                    log::log!(level, "{} {} spilling again", self.id, dir.label);
                }
                _ => {}
            }
        }
    }

    /// The backend's address for logs: "-" if none was ever tried.
    fn backend_label(&self) -> Label {
        Label(self.backend_addr)
    }

    fn log_summary(&self) {
        let reason = self.trouble.as_deref().unwrap_or("done");
        log::info!(
            "{} closed client={} backend={} up_bytes={} down_bytes={} up_spilled={} down_spilled={} dropped={} backend_held={:.3}s duration={:.3}s reason={}",
            self.id,
            self.client_addr,
            self.backend_label(),
            self.up.bytes_out,
            self.down.bytes_out,
            self.up.buf.spilled_total(),
            self.down.buf.spilled_total(),
            self.up.bytes_dropped + self.down.bytes_dropped,
            self.backend_held.unwrap_or_default().as_secs_f64(),
            self.opened.elapsed().as_secs_f64(),
            reason
        );
    }
}

/// Close `stream` (by dropping it). No `EPOLL_CTL_DEL` first: closing the
/// last descriptor of a socket takes it out of every epoll set, and these
/// sockets are never duplicated; that is two syscalls fewer per
/// connection.
fn close(stream: TcpStream, reset: bool) {
    if reset {
        // Best effort: the socket may already be dead, and then the peer
        // knows anyway.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    drop(stream);
}

/// How long a socket that is done may stay open to drain a sender we no
/// longer listen to (see `Connection::lingering`).
const LINGER: Duration = Duration::from_secs(2);

/// How long a connection waits to try again when the process is out of
/// file descriptors or kernel memory for its backend socket.
const CONNECT_RETRY: Duration = Duration::from_millis(100);
