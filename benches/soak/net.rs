//! Sockets as both ends of the soak use them: non-blocking, one thread per
//! connection waiting in poll(2) with a timeout, so that pacing, cuts and
//! deadlines live in one loop and nothing blocks past a deadline.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

/// The longest a loop sleeps in poll before it looks at its deadlines and
/// the run's abort flag again.
pub const TICK: Duration = Duration::from_millis(100);

/// What a read or write came to.
#[derive(Debug)]
pub enum Step {
    Moved(usize),
    Eof,
    WouldBlock,
    Failed(io::Error),
}

pub fn read_step(stream: &mut TcpStream, buf: &mut [u8]) -> Step {
    loop {
        return match stream.read(buf) {
            Ok(0) => Step::Eof,
            Ok(n) => Step::Moved(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::WouldBlock,
            Err(e) => Step::Failed(e),
        };
    }
}

pub fn write_step(stream: &mut TcpStream, buf: &[u8]) -> Step {
    loop {
        return match stream.write(buf) {
            Ok(n) => Step::Moved(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::WouldBlock,
            Err(e) => Step::Failed(e),
        };
    }
}

/// Wait until `stream` is readable (`read`) or writable (`write`), or
/// `timeout` passes. Errors and hang-ups count as ready: the next call
/// reports them.
pub fn wait(stream: &TcpStream, read: bool, write: bool, timeout: Duration) {
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(0, TICK.as_millis()) as libc::c_int;
    // SAFETY: one pollfd on the stack, for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, ms) };
}

/// Wait until `stream` has been reset or closed both ways, without
/// reading: no POLLIN asked, so bytes arriving do not wake us (POLLHUP and
/// POLLERR come unasked). With `or_half`, a FIN alone counts too. True if
/// it has.
pub fn wait_hangup(stream: &TcpStream, or_half: bool, timeout: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: if or_half { libc::POLLRDHUP } else { 0 },
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(0, TICK.as_millis()) as libc::c_int;
    // SAFETY: one pollfd on the stack, for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, ms) };
    n > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Close with a reset (linger 0) instead of a FIN.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// `shutdown(Write)`: the FIN.
pub fn shut_write(stream: &TcpStream) -> io::Result<()> {
    stream.shutdown(Shutdown::Write)
}

/// Bytes written (and the FIN) not yet acknowledged by the peer's kernel.
fn unacked(stream: &TcpStream) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int through the pointer,
    // which points at a live local.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc == 0 {
        Ok(n)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// After our FIN: did the peer's kernel take everything, the FIN included,
/// without a reset? A peer that had closed its socket already answers what
/// we sent with a reset, which a client that has read its EOF and is done
/// writing would otherwise never see; the books need to know, since bytes
/// lost that way are the kernel's, not the proxy's. `Err` names what was
/// seen instead.
pub fn fin_acknowledged(stream: &TcpStream, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(e)) = stream.take_error() {
            return Err(format!("reset after our FIN ({e})"));
        }
        match unacked(stream) {
            Ok(0) => break,
            Ok(n) if Instant::now() >= deadline => {
                return Err(format!(
                    "{n} bytes or the FIN unacknowledged after {timeout:?}"
                ));
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(format!("SIOCOUTQ: {e}")),
        }
    }
    match stream.take_error() {
        Ok(Some(e)) => Err(format!("reset after our FIN ({e})")),
        _ => Ok(()),
    }
}

/// The address client `id` connects from: one of its own in 127.0.0.0/8,
/// so that the proxy's `client=` names the connection without ambiguity,
/// however ports are reused over an hour (and no port range runs dry).
/// 127.1.0.0 upwards: 127.0.0.x is left to the proxy and backends.
pub fn client_ip(id: u64) -> Ipv4Addr {
    let v = (id + 0x1_0000) as u32;
    assert!(
        v < 0xff_0000,
        "connection id {id} beyond the client addresses"
    );
    Ipv4Addr::from(0x7f00_0000 | v)
}

/// The id of the client at `addr`, if it is one of ours.
pub fn client_id(addr: SocketAddr) -> Option<u64> {
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    let bits = u32::from(*v4.ip());
    let v = bits & 0x00ff_ffff;
    (bits >> 24 == 127 && v >= 0x1_0000).then(|| u64::from(v - 0x1_0000))
}

/// Connect to `to` from client `id`'s address, with SO_RCVBUF fixed
/// before the handshake if asked (the window is then small from the first
/// byte, as on a real slow path). The error comes with the address bound:
/// a proxy that accepts and resets at once (no backend to be had) can make
/// `connect` itself report the reset, and the close line still names it.
pub fn connect_from(
    id: u64,
    to: SocketAddr,
    rcvbuf: Option<usize>,
) -> (SocketAddr, io::Result<TcpStream>) {
    use socket2::{Domain, Socket, Type};
    let local = SocketAddr::V4(SocketAddrV4::new(client_ip(id), 0));
    let socket = match Socket::new(Domain::IPV4, Type::STREAM, None) {
        Ok(s) => s,
        Err(e) => return (local, Err(e)),
    };
    let connected = (|| {
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size)?;
        }
        socket.bind(&local.into())?;
        Ok::<_, io::Error>(())
    })();
    let local = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(local);
    let connected = connected
        .and_then(|()| socket.connect_timeout(&to.into(), Duration::from_secs(10)))
        .and_then(|()| {
            let stream: TcpStream = socket.into();
            stream.set_nonblocking(true)?;
            Ok(stream)
        });
    (local, connected)
}

/// A byte rate as a budget: how many bytes may have moved by now. With
/// `until`, the rate holds for that long and then no more (a reader that
/// is slow for a while, then drains what the proxy kept for it).
#[derive(Clone, Copy)]
pub struct Pace {
    rate: Option<u64>,
    until: Option<Duration>,
    start: Instant,
}

impl Pace {
    pub fn new(rate: Option<u64>) -> Pace {
        Pace::for_a_while(rate, None)
    }

    pub fn for_a_while(rate: Option<u64>, until: Option<Duration>) -> Pace {
        Pace {
            rate,
            until,
            start: Instant::now(),
        }
    }

    /// The rate now, `None` once it no longer holds.
    fn rate(&self) -> Option<u64> {
        self.rate
            .filter(|_| self.until.is_none_or(|u| self.start.elapsed() < u))
    }

    /// How many more bytes may move now, `done` having moved.
    pub fn allowance(&self, done: u64) -> u64 {
        match self.rate() {
            None => u64::MAX,
            Some(rate) => {
                let due = self.start.elapsed().as_secs_f64() * rate as f64;
                (due as u64).saturating_sub(done)
            }
        }
    }

    /// How long until `want` more bytes may move.
    pub fn wait_for(&self, done: u64, want: u64) -> Duration {
        match self.rate() {
            None => Duration::ZERO,
            Some(rate) => {
                let at = Duration::from_secs_f64((done + want) as f64 / rate as f64);
                let at = self.until.map_or(at, |u| at.min(u));
                at.saturating_sub(self.start.elapsed())
            }
        }
    }

    /// The piece to move next: at most `chunk`, and at a slow pace small
    /// enough that the budget allows it every tenth of a second or so.
    pub fn piece(&self, chunk: usize) -> usize {
        match self.rate() {
            None => chunk,
            Some(rate) => chunk.min((rate / 10).max(1) as usize),
        }
    }
}
