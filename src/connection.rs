//! What every client connection is, whatever its protocol: a number for
//! the logs, what it needs from its worker (`Ctx`), what it tells the
//! worker after a turn (`Status`), and the one enum the worker's slab
//! holds (`Session`), which hands each call to the protocol's own state
//! machine (`tcp` today).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Registry, Token};

use crate::balancer::Backends;
use crate::config::Config;
use crate::http::HttpConnection;
use crate::metrics::WorkerMetrics;
use crate::relay::{BufferPlan, Peer};
use crate::stats::Stats;
use crate::tcp::TcpConnection;
use crate::timers::Timers;
use crate::upstream::{IdlePool, LegTable};

/// Which socket of a connection.
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

/// What the event loop should do with a connection after a turn.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    /// Waiting for readiness.
    Waiting,
    /// Work is left: run another turn soon, without waiting for an event.
    Busy,
    /// Its sockets are closed and its summary written; drop it.
    Finished,
}

/// The log prefix every line about one connection carries.
pub struct Id(pub u64);

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[conn {}]", self.0)
    }
}

/// An address for a log line, or "-": formatted only if the line is
/// written, so the checks that run on every turn allocate nothing.
#[derive(Clone, Copy)]
pub struct Label(pub Option<SocketAddr>);

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// How a worker's tokens are laid out: 0 the listener, 1 the waker, one
/// per backend for its health probe, then client sockets and backend
/// sockets alternating, each numbered by its own slab (`conn_base + 2k`
/// the client of connection slot k, `conn_base + 2k + 1` backend socket k).
#[derive(Clone, Copy, Debug)]
pub struct Tokens {
    pub conn_base: usize,
}

/// What a token stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Client(usize),
    Leg(usize),
    /// Below `conn_base`: the listener, the waker, the probes.
    Fixed(usize),
}

impl Tokens {
    pub fn client(&self, slot: usize) -> Token {
        Token(self.conn_base + 2 * slot)
    }

    pub fn leg(&self, key: usize) -> Token {
        Token(self.conn_base + 2 * key + 1)
    }

    pub fn key(&self, token: Token) -> Key {
        match token.0.checked_sub(self.conn_base) {
            None => Key::Fixed(token.0),
            Some(t) if t % 2 == 0 => Key::Client(t / 2),
            Some(t) => Key::Leg(t / 2),
        }
    }
}

/// What a connection needs from its worker while it runs.
pub struct Ctx<'a> {
    pub registry: &'a Registry,
    pub tokens: Tokens,
    pub backends: &'a Backends,
    /// The worker's backend sockets, and the idle ones kept for reuse.
    pub legs: &'a mut LegTable,
    pub idle: &'a mut IdlePool,
    pub timers: &'a mut Timers,
    /// Carries bytes bound for a spill file.
    pub scratch: &'a mut [u8],
    pub stats: &'a Stats,
    /// How directions are made.
    pub plan: &'a BufferPlan,
    /// This worker's counters.
    pub metrics: &'a WorkerMetrics,
    /// `--connect-timeout`.
    pub connect_timeout: Duration,
    /// Backends one connection may try: 1 + `--connect-retries`.
    pub max_attempts: usize,
    /// `--keep-half-open`: a backend that has sent EOF stays connected
    /// until the client half-closes too.
    pub keep_half_open: bool,
    pub config: &'a Config,
    /// A graceful shutdown has begun: finish what is in flight, take no
    /// new request.
    pub stopping: bool,
}

/// A client connection in a worker's slab, of whichever protocol. A slab
/// place is as large as the largest variant: HTTP's, larger, is boxed;
/// TCP's stays inline, since a connection per request must not cost an
/// allocation more.
#[allow(clippy::large_enum_variant)]
pub enum Session {
    Tcp(TcpConnection),
    Http(Box<HttpConnection>),
}

impl Session {
    pub fn id(&self) -> u64 {
        match self {
            Session::Tcp(c) => c.id.0,
            Session::Http(c) => c.id.0,
        }
    }

    /// An event for the client's socket.
    pub fn on_client_event(&mut self, event: &mio::event::Event) {
        match self {
            Session::Tcp(c) => c.on_client_event(event),
            Session::Http(c) => c.on_client_event(event),
        }
    }

    /// An event for backend socket `key`, which this connection owns.
    pub fn on_leg_event(&mut self, key: usize, event: &mio::event::Event) {
        match self {
            Session::Tcp(c) => c.on_leg_event(key, event),
            Session::Http(c) => c.on_leg_event(key, event),
        }
    }

    /// Move what readiness allows, close what is finished. An HTTP
    /// connection whose backend switched protocols becomes a relay here.
    pub fn drive(&mut self, ctx: &mut Ctx) -> Status {
        let tunnel = match self {
            Session::Tcp(c) => return c.drive(ctx),
            Session::Http(c) => {
                let status = c.drive(ctx);
                match c.take_tunnel(ctx) {
                    Some(tunnel) => tunnel,
                    None => return status,
                }
            }
        };
        *self = Session::Tcp(TcpConnection::tunnel(tunnel));
        self.drive(ctx)
    }

    /// The connect timer of attempt `attempt` ran out.
    pub fn on_connect_timeout(&mut self, attempt: u32, ctx: &mut Ctx) {
        match self {
            Session::Tcp(c) => c.on_connect_timeout(attempt, ctx),
            Session::Http(c) => c.on_connect_timeout(attempt, ctx),
        }
    }

    /// Time to try again for a backend socket (fds were short).
    pub fn on_connect_retry(&mut self, ctx: &mut Ctx) {
        match self {
            Session::Tcp(c) => c.on_connect_retry(ctx),
            Session::Http(c) => c.on_connect_retry(ctx),
        }
    }

    /// End now, whatever is in flight (`gentle`: nothing was moving, so
    /// peers get a normal close rather than a reset).
    pub fn close_now(&mut self, reason: &str, gentle: bool, ctx: &mut Ctx) -> Status {
        match self {
            Session::Tcp(c) => c.close_now(reason, gentle, ctx),
            Session::Http(c) => c.close_now(reason, gentle, ctx),
        }
    }

    /// How long since a byte moved either way.
    pub fn idle_for(&self, now: Instant) -> Duration {
        match self {
            Session::Tcp(c) => c.idle_for(now),
            Session::Http(c) => c.idle_for(now),
        }
    }

    /// Bytes held for the peers right now.
    pub fn held(&self) -> u64 {
        match self {
            Session::Tcp(c) => c.held(),
            Session::Http(c) => c.held(),
        }
    }

    /// Closing now would lose nothing and leave nobody waiting.
    pub fn is_quiet(&self) -> bool {
        match self {
            Session::Tcp(c) => c.is_quiet(),
            Session::Http(c) => c.is_quiet(),
        }
    }

    /// Stopped reading for want of disk space: needs a turn when space may
    /// have freed, since no socket event will say so.
    pub fn waiting_for_disk(&self) -> bool {
        match self {
            Session::Tcp(c) => c.waiting_for_disk(),
            Session::Http(c) => c.waiting_for_disk(),
        }
    }
}

/// What reading a client's PROXY protocol header came to.
pub enum HeaderRead {
    /// Not all there yet: wait for more.
    Waiting,
    /// Read and taken off the socket: who the client is, and where it
    /// connected to (each `None` if the header did not say).
    Done {
        client: Option<SocketAddr>,
        local: Option<SocketAddr>,
    },
    /// Not a valid header (or the client closed first): close.
    Refused(&'static str),
    Failed(io::Error),
}

/// Read a PROXY protocol header from the start of `peer`: look at what has
/// come without taking it (`MSG_PEEK`), and take exactly the header once it
/// is whole, so that nothing after it is touched.
pub fn read_proxy_header(peer: &mut Peer<TcpStream>, scratch: &mut [u8]) -> HeaderRead {
    use crate::proxy_header::{Parsed, V2_MAX, parse};
    if !peer.is_readable() {
        return HeaderRead::Waiting;
    }
    let Some(stream) = peer.io.as_mut() else {
        return HeaderRead::Refused("no socket");
    };
    let room = V2_MAX.min(scratch.len());
    let window = &mut scratch[..room];
    let peeked = match stream.peek(window) {
        Ok(0) => return HeaderRead::Refused("closed before its header was whole"),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            peer.read_dry();
            return HeaderRead::Waiting;
        }
        Err(e) => return HeaderRead::Failed(e),
    };
    match parse(&window[..peeked]) {
        Err(why) => HeaderRead::Refused(why),
        Ok(Parsed::Partial) => {
            // What is there was seen; the next bytes bring a new event.
            peer.read_dry();
            HeaderRead::Waiting
        }
        Ok(Parsed::Complete { len, client, local }) => {
            // Exactly the header: it is all in the queue already.
            match io::Read::read(stream, &mut window[..len]) {
                Ok(n) if n == len => HeaderRead::Done { client, local },
                Ok(_) => {
                    HeaderRead::Failed(io::Error::other("the header shrank between peek and read"))
                }
                Err(e) => HeaderRead::Failed(e),
            }
        }
    }
}

/// Close `stream` (by dropping it); with `reset`, with linger 0, so the
/// peer sees a reset rather than a clean EOF. No `EPOLL_CTL_DEL` first:
/// closing the last descriptor of a socket takes it out of every epoll
/// set, and these sockets are never duplicated; that is two syscalls fewer
/// per connection.
pub fn close_stream(stream: TcpStream, reset: bool) {
    if reset {
        // Best effort: the socket may already be dead, and then the peer
        // knows anyway.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_socket_back() {
        let t = Tokens { conn_base: 5 };
        for k in [0, 1, 7, 1000] {
            assert_eq!(t.key(t.client(k)), Key::Client(k));
            assert_eq!(t.key(t.leg(k)), Key::Leg(k));
        }
        assert_eq!(t.key(Token(4)), Key::Fixed(4));
        assert_ne!(t.client(3), t.leg(3));
    }
}
