//! The backend side of a connection: a leg (one backend socket and what
//! it holds of the backend pool), and dialling one (candidates in the
//! balancer's order, a non-blocking connect each, until one answers).
//!
//! A leg is a value a connection owns, not a part of it: it has its own
//! place in the worker's table of backend sockets (`LegTable`), so its
//! token stays put while it is handed from one owner to another (an HTTP
//! connection returns a finished one to an idle pool and takes another
//! for its next request).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;

use crate::balancer::Picked;
use crate::connection::{Ctx, Id, close_stream};
use crate::io_error::{describe_connect_error, is_out_of_resources};
use crate::metrics::ConnectFailure;
use crate::relay::Peer;
use crate::slab::Slab;
use crate::timers::Timer;

/// How long a connection waits to try again when the process is out of
/// file descriptors or kernel memory for its backend socket.
const CONNECT_RETRY: Duration = Duration::from_millis(100);

/// A connection as others refer to it: its place in the worker's slab
/// (places are reused, so with its number), and its client for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub slot: usize,
    pub id: u64,
    pub client: SocketAddr,
}

/// Whose a backend socket is now: where its events go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegOwner {
    /// Connection `id` in place `slot`.
    Conn { slot: usize, id: u64 },
    /// Idle, kept for reuse, in the pool of backend `backend`.
    Idle { backend: usize },
}

/// Every backend socket of a worker, by the key its token is made from.
pub type LegTable = Slab<LegOwner>;

/// One backend socket, and what it holds of the backend pool: one active
/// connection counted against its backend (least-conn, random2), and that
/// backend's trial if it was down, until it is connected.
pub struct BackendLeg {
    pub peer: Peer<TcpStream>,
    key: usize,
    backend: usize,
    addr: SocketAddr,
    /// The backend was down and this leg is its one trial.
    trial: bool,
    connected_at: Option<Instant>,
    /// Taken from the idle pool rather than connected for this request.
    reused: bool,
    /// A PROXY header named this client on it: it may only serve this
    /// client again.
    private_to: Option<SocketAddr>,
}

impl BackendLeg {
    /// Start a non-blocking connect to `picked` for `owner`, registered for
    /// both interests under a token of its own.
    fn dial(picked: Picked, owner: Owner, ctx: &mut Ctx) -> io::Result<BackendLeg> {
        let addr = ctx.backends.addr(picked.idx);
        let mut stream = TcpStream::connect(addr)?;
        let key = ctx.legs.insert(LegOwner::Conn {
            slot: owner.slot,
            id: owner.id,
        });
        let both = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = ctx
            .registry
            .register(&mut stream, ctx.tokens.leg(key), both)
        {
            ctx.legs.remove(key);
            return Err(e);
        }
        Ok(BackendLeg {
            peer: Peer::new(stream),
            key,
            backend: picked.idx,
            addr,
            trial: picked.trial,
            connected_at: None,
            reused: false,
            private_to: None,
        })
    }

    /// A PROXY header naming `client` was sent on it: from now on it may
    /// only carry that client's requests.
    pub fn make_private(&mut self, client: SocketAddr) {
        self.private_to = Some(client);
    }

    /// Was this connection taken from the idle pool (it may have been
    /// closed by the backend meanwhile)?
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Done with it, and it may serve another request: keep it idle in the
    /// pool (`--upstream-keepalive` per backend per worker; the least
    /// recently used goes when that is full), or close it if none are
    /// kept. It no longer counts as an active connection of its backend.
    pub fn park(mut self, ctx: &mut Ctx) -> Option<Duration> {
        let held = self.connected_at.map(|t| t.elapsed());
        if ctx.idle.max_per_backend == 0 {
            self.close(false, ctx);
            return held;
        }
        ctx.backends.release(self.backend);
        // The last read found the socket drained (a short read) and no
        // event has come since: nothing can be waiting in it, and a peek
        // would only say so, one system call in six of a small request.
        // Otherwise look.
        let drained = !self.peer.is_readable() && !self.peer.take_errored();
        let Some(peer) = self.peer.io.take() else {
            ctx.legs.remove(self.key);
            return held;
        };
        if !drained && !is_clean(&peer) {
            // Bytes past the response (or its close) are already here, and
            // their readiness edge was spent reading the response: kept, they
            // would be read as the next client's response.
            log::debug!(
                "backend {} sent more than its response: not reused",
                self.addr
            );
            ctx.legs.remove(self.key);
            close_stream(peer, true);
            return held;
        }
        if let Some(owner) = ctx.legs.get_mut(self.key) {
            *owner = LegOwner::Idle {
                backend: self.backend,
            };
        }
        let idle = IdleLeg {
            stream: peer,
            key: self.key,
            addr: self.addr,
            since: Instant::now(),
            private_to: self.private_to,
        };
        if let Some(oldest) = ctx.idle.put(self.backend, idle) {
            oldest.close(ctx.legs);
        }
        held
    }

    pub fn key(&self) -> usize {
        self.key
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Close the socket (reset, linger 0, if the stream into it was cut)
    /// and give back what it held of the pool. How long it was held, if it
    /// ever connected.
    pub fn close(mut self, reset: bool, ctx: &mut Ctx) -> Option<Duration> {
        if self.connected_at.is_none() && self.trial {
            // Left before its connect was decided (the client went): let
            // the next connection or health check decide.
            ctx.backends.abandoned(self.backend, Instant::now());
        }
        self.give_back(ctx);
        if let Some(stream) = self.peer.io.take() {
            close_stream(stream, reset);
        }
        self.connected_at.map(|t| t.elapsed())
    }

    /// Its connect failed for `cause`: counted against the backend.
    fn connect_failed(mut self, cause: &str, ctx: &mut Ctx) {
        ctx.backends.failed(self.backend, Instant::now(), cause);
        self.give_back(ctx);
    }

    fn give_back(&mut self, ctx: &mut Ctx) {
        ctx.backends.release(self.backend);
        ctx.legs.remove(self.key);
    }

    /// A non-blocking connect is done when the socket turns writable; then
    /// `take_error` tells whether it failed. Linux reports a connecting
    /// socket writable only once the handshake is over, so after a writable
    /// event no error means connected (what nginx and HAProxy rely on too);
    /// after any other wake-up `peer_addr` decides. `None`: not yet.
    fn connect_outcome(&mut self) -> Option<io::Result<()>> {
        let stream = self.peer.io.as_ref()?;
        let outcome = match stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) if self.peer.is_writable() => Ok(()),
            Ok(None) => match stream.peer_addr() {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return None,
                Err(e) => Err(e),
            },
        };
        // Relayed bytes are already batched by the peers; Nagle would only
        // add latency to the last segment of each burst.
        Some(outcome.and_then(|()| stream.set_nodelay(true)))
    }
}

/// A backend connection kept open between requests, holding no claim on
/// its backend.
pub struct IdleLeg {
    stream: TcpStream,
    key: usize,
    addr: SocketAddr,
    since: Instant,
    private_to: Option<SocketAddr>,
}

impl IdleLeg {
    fn close(self, legs: &mut LegTable) {
        legs.remove(self.key);
        close_stream(self.stream, false);
    }
}

/// How long an idle backend connection is kept (nginx's upstream
/// `keepalive_timeout` default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle backend connections of one worker, per backend, most recently used
/// last.
pub struct IdlePool {
    per_backend: Vec<std::collections::VecDeque<IdleLeg>>,
    /// `--upstream-keepalive`.
    pub max_per_backend: usize,
}

impl IdlePool {
    pub fn new(backends: usize, max_per_backend: usize) -> IdlePool {
        IdlePool {
            per_backend: (0..backends).map(|_| Default::default()).collect(),
            max_per_backend,
        }
    }

    /// Keep `leg`; if that makes too many, the least recently used is
    /// returned to be closed.
    fn put(&mut self, backend: usize, leg: IdleLeg) -> Option<IdleLeg> {
        let list = &mut self.per_backend[backend];
        list.push_back(leg);
        (list.len() > self.max_per_backend)
            .then(|| list.pop_front())
            .flatten()
    }

    /// The most recently used idle connection to `backend` that may serve
    /// `client` (any, or only one private to it), if any.
    fn take(&mut self, backend: usize, client: Option<SocketAddr>) -> Option<IdleLeg> {
        let list = &mut self.per_backend[backend];
        let at = list.iter().rposition(|l| l.private_to == client)?;
        list.remove(at)
    }

    /// An event for idle connection `key` of `backend`: readable or in
    /// error, it was closed by the backend (or sent something unasked):
    /// close it. Writable alone says nothing new.
    pub fn on_event(
        &mut self,
        backend: usize,
        key: usize,
        event: &mio::event::Event,
        legs: &mut LegTable,
    ) {
        let gone = event.is_readable() || event.is_read_closed() || event.is_error();
        let list = &mut self.per_backend[backend];
        if let Some(at) = list.iter().position(|l| l.key == key).filter(|_| gone) {
            let leg = list.remove(at).expect("found");
            log::debug!("idle connection to backend {} closed by it", leg.addr);
            leg.close(legs);
        }
    }

    /// Close connections idle for longer than `IDLE_TIMEOUT`.
    pub fn close_stale(&mut self, now: Instant, legs: &mut LegTable) {
        for list in &mut self.per_backend {
            while list
                .front()
                .is_some_and(|l| now.duration_since(l.since) >= IDLE_TIMEOUT)
            {
                list.pop_front().expect("checked").close(legs);
            }
        }
    }

    /// Connections kept now, all backends together.
    pub fn len(&self) -> usize {
        self.per_backend.iter().map(|l| l.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Nothing is waiting in `stream`: no byte, no EOF, no error. A backend
/// connection with anything there cannot take another request.
fn is_clean(stream: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::uninit(); 1];
    match socket2::SockRef::from(stream).peek(&mut byte) {
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        Ok(_) => false,
    }
}

/// For `spillway_backend_connect_failures_total{cause}`.
fn failure_kind(e: &io::Error) -> ConnectFailure {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
        io::ErrorKind::TimedOut => ConnectFailure::Timeout,
        _ => ConnectFailure::Error,
    }
}

/// An idle connection to `picked` serves `owner` now.
fn reuse(idle: IdleLeg, picked: Picked, owner: Owner, ctx: &mut Ctx) -> BackendLeg {
    if let Some(entry) = ctx.legs.get_mut(idle.key) {
        *entry = LegOwner::Conn {
            slot: owner.slot,
            id: owner.id,
        };
    }
    let mut peer = Peer::new(idle.stream);
    // Whatever it can do now, the next read or write will say.
    peer.on_readiness(true, true, false, false);
    log::debug!(
        "{} reusing a connection to backend {}",
        Id(owner.id),
        idle.addr
    );
    BackendLeg {
        peer,
        key: idle.key,
        backend: picked.idx,
        addr: idle.addr,
        trial: false,
        connected_at: Some(Instant::now()),
        reused: true,
        private_to: idle.private_to,
    }
}

/// What dialling came to so far.
pub enum Dialled {
    /// A connect is in flight, or waits for fds: an event or a timer will say.
    Pending,
    Connected(BackendLeg),
    /// Every backend the connection may try has failed: why, naming each.
    GaveUp(String),
}

/// Dialling backends in turn for one connection: the connect in flight,
/// what was tried, and why each failed.
#[derive(Default)]
pub struct Dial {
    /// Take an idle connection to the chosen backend when there is one.
    reuse: bool,
    /// Only one private to this client (`--send-proxy`).
    private_to: Option<SocketAddr>,
    tried: Vec<usize>,
    /// The connect in flight; none while waiting to retry for fds.
    attempt: Option<BackendLeg>,
    /// Attempts made, counting from 1: timers name their attempt.
    number: u32,
    failures: Vec<String>,
    /// The backend tried last, for logs.
    last_addr: Option<SocketAddr>,
}

impl Dial {
    /// A dial that takes an idle connection to the backend the strategy
    /// chooses, if the pool has one, before connecting anew.
    /// With `private_to`, only a connection that was opened for that
    /// client (its PROXY header named it) is taken.
    pub fn reusing(private_to: Option<SocketAddr>) -> Dial {
        Dial {
            reuse: true,
            private_to,
            ..Dial::default()
        }
    }

    /// The backend tried last, if any.
    pub fn last_addr(&self) -> Option<SocketAddr> {
        self.last_addr
    }

    /// An event for the socket being connected.
    pub fn on_event(&mut self, key: usize, event: &mio::event::Event) {
        if let Some(leg) = self.attempt.as_mut().filter(|leg| leg.key == key) {
            leg.peer.on_event(event);
        }
    }

    /// Connect to the next candidate; when none is left, give up.
    pub fn next(&mut self, owner: Owner, ctx: &mut Ctx) -> Dialled {
        let backends = ctx.backends;
        let mut out_of_fds = None;
        for picked in backends.candidates(&mut self.tried, ctx.max_attempts) {
            let addr = backends.addr(picked.idx);
            self.number += 1;
            self.last_addr = Some(addr);
            if self.reuse && !picked.trial {
                while let Some(idle) = ctx.idle.take(picked.idx, self.private_to) {
                    if is_clean(&idle.stream) {
                        return Dialled::Connected(reuse(idle, picked, owner, ctx));
                    }
                    // Closed, or it sent something unasked, since it idled.
                    idle.close(ctx.legs);
                }
            }
            match BackendLeg::dial(picked, owner, ctx) {
                Ok(leg) => {
                    log::debug!("{} connecting to backend {addr}", Id(owner.id));
                    let timer = Timer::ConnectTimeout {
                        slot: owner.slot,
                        conn: owner.id,
                        attempt: self.number,
                    };
                    ctx.timers.arm(Instant::now() + ctx.connect_timeout, timer);
                    self.attempt = Some(leg);
                    return Dialled::Pending;
                }
                Err(e) if is_out_of_resources(&e) => {
                    out_of_fds = Some((picked, e));
                    break;
                }
                Err(e) => {
                    let cause = describe_connect_error(&e);
                    log::warn!(
                        "{} client {}: backend {addr}: {cause}",
                        Id(owner.id),
                        owner.client
                    );
                    backends.failed(picked.idx, Instant::now(), &cause);
                    backends.release(picked.idx);
                    self.failures.push(format!("{addr} ({cause})"));
                }
            }
        }
        if let Some((picked, e)) = out_of_fds {
            // Our fault, not the backend's: no failure is counted, and the
            // backend may be tried again. The client waits (its bytes
            // buffered) and we try again shortly, when connections may
            // have freed fds.
            self.tried.pop();
            if picked.trial {
                backends.abandoned(picked.idx, Instant::now());
            }
            backends.release(picked.idx);
            log::warn!(
                "{} client {}: cannot open a socket to backend {} ({e}); retrying in {CONNECT_RETRY:?}",
                Id(owner.id),
                owner.client,
                backends.addr(picked.idx),
            );
            let timer = Timer::ConnectRetry {
                slot: owner.slot,
                conn: owner.id,
            };
            ctx.timers.arm(Instant::now() + CONNECT_RETRY, timer);
            return Dialled::Pending;
        }
        Dialled::GaveUp(if self.failures.is_empty() {
            "no backend left to try".to_string()
        } else {
            self.failures.join(", ")
        })
    }

    /// Look at the connect in flight if an event came for it.
    pub fn check(&mut self, owner: Owner, ctx: &mut Ctx) -> Dialled {
        let Some(leg) = self.attempt.as_mut().filter(|leg| leg.peer.was_woken()) else {
            return Dialled::Pending;
        };
        match leg.connect_outcome() {
            None => {
                // Still connecting: what was noted says nothing more.
                leg.peer.forget_readiness();
                Dialled::Pending
            }
            Some(Ok(())) => {
                let mut leg = self.attempt.take().expect("checked above");
                ctx.backends.succeeded(leg.backend);
                ctx.metrics.backends[leg.backend].connects.add(1);
                leg.connected_at = Some(Instant::now());
                // Both ways may go now; a FIN noted while connecting (a
                // backend that answers and closes at once) stays noted.
                leg.peer.on_readiness(true, true, false, false);
                log::debug!("{} connected to backend {}", Id(owner.id), leg.addr);
                Dialled::Connected(leg)
            }
            Some(Err(e)) => self.failed(&describe_connect_error(&e), failure_kind(&e), owner, ctx),
        }
    }

    /// The connect timer for attempt `number` ran out.
    pub fn on_timeout(&mut self, number: u32, owner: Owner, ctx: &mut Ctx) -> Dialled {
        if self.attempt.is_none() || self.number != number {
            return Dialled::Pending;
        }
        let cause = format!("connect timed out after {:?}", ctx.connect_timeout);
        self.failed(&cause, ConnectFailure::Timeout, owner, ctx)
    }

    /// The retry timer armed when no socket could be opened has fired.
    pub fn on_retry(&mut self, owner: Owner, ctx: &mut Ctx) -> Dialled {
        if self.attempt.is_some() {
            return Dialled::Pending;
        }
        self.next(owner, ctx)
    }

    /// The connection no longer wants a backend (its client went):
    /// a connect in flight is closed, with a reset if `reset` (the stream
    /// meant for it was cut).
    pub fn abandon(mut self, reset: bool, ctx: &mut Ctx) {
        if let Some(leg) = self.attempt.take() {
            leg.close(reset, ctx);
        }
    }

    /// The connect in flight failed: count it against the backend and move
    /// on to the next. What the client sent meanwhile stays buffered, so
    /// the backend that finally answers gets all of it.
    fn failed(
        &mut self,
        cause: &str,
        kind: ConnectFailure,
        owner: Owner,
        ctx: &mut Ctx,
    ) -> Dialled {
        let leg = self.attempt.take().expect("a connect in flight");
        ctx.metrics.connect_failed(leg.backend, kind);
        log::warn!(
            "{} client {}: backend {}: {cause}",
            Id(owner.id),
            owner.client,
            leg.addr
        );
        self.failures.push(format!("{} ({cause})", leg.addr));
        leg.connect_failed(cause, ctx);
        self.next(owner, ctx)
    }
}
