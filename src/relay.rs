//! One direction of a relay, and the one pump that moves its bytes.
//!
//! The same `pump` serves client->backend and backend->client: it takes a
//! `Direction` (the buffer, the remembered readiness of both ends, where
//! the stream is in its life) and the two ends as plain `Read`/`Write`.
//! It knows nothing of mio or of which peer is which; the connection
//! decides what a failure means.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::disk::DiskBudget;
use crate::spill::{Drain, Fill, SpillBuffer};

/// Rounds (a write and a read each) one `pump` call may make before it
/// yields, so that one busy connection cannot starve the others and a bug
/// cannot become a spin. With 64KiB buffers that is up to 2MiB each way.
pub const OPS_PER_PUMP: usize = 32;

/// Where the stream of one direction is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Reading from the sender, writing to the receiver.
    Open,
    /// The sender sent EOF; what is held is still being delivered.
    Draining,
    /// Everything was delivered and the receiver's write half shut.
    Closed,
    /// Given up: the receiver is gone or the stream was cut short.
    Aborted,
    /// The receiver has finished with this stream (it ended its own and
    /// took everything held for it) and its socket is closed: what the
    /// sender still sends is read and dropped. Nothing was cut, so unlike
    /// `Aborted` the receiver is closed normally.
    Released,
}

/// The end of a direction that sends the bytes.
pub trait Sender: Read {
    /// Its file descriptor, if the kernel can splice from it.
    fn fd(&self) -> Option<RawFd> {
        None
    }

    /// Does a read that returns less than asked leave it with nothing to
    /// read, so that the next read may wait for the next readiness event?
    fn short_read_drains(&self) -> bool {
        false
    }
}

/// The end of a direction that gets the bytes: it can also be told that
/// no more will come.
pub trait Receiver: Write {
    fn close_write(&mut self) -> io::Result<()>;

    /// Its file descriptor, if the kernel can splice and send files to it.
    fn fd(&self) -> Option<RawFd> {
        None
    }

    /// The payload of one full packet to this receiver (TCP's MSS), if it
    /// has such a thing.
    fn segment_size(&self) -> Option<usize> {
        None
    }
}

impl Sender for &mio::net::TcpStream {
    fn fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }

    /// A TCP read returns less than asked only when it has emptied the
    /// receive queue. Whatever arrives after it (data, FIN, reset) queues
    /// a new edge-triggered event, so not reading again until then loses
    /// nothing, and saves the read that would only say `WouldBlock`: a
    /// third of the syscalls of a small request or response. (A FIN that
    /// had arrived *before* the read raised no new event: `Direction::
    /// src_closing` keeps such a sender readable until its EOF is read.)
    fn short_read_drains(&self) -> bool {
        true
    }
}

impl Receiver for &mio::net::TcpStream {
    fn close_write(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }

    fn segment_size(&self) -> Option<usize> {
        let mss = socket2::SockRef::from(*self).tcp_mss().ok()?;
        (mss > 0).then_some(mss as usize)
    }
}

impl<T: Sender + ?Sized> Sender for &mut T {
    fn fd(&self) -> Option<RawFd> {
        (**self).fd()
    }

    fn short_read_drains(&self) -> bool {
        (**self).short_read_drains()
    }
}

impl<T: Receiver + ?Sized> Receiver for &mut T {
    fn close_write(&mut self) -> io::Result<()> {
        (**self).close_write()
    }

    fn fd(&self) -> Option<RawFd> {
        (**self).fd()
    }

    fn segment_size(&self) -> Option<usize> {
        (**self).segment_size()
    }
}

/// Plain byte slices send, for tests and for anything else in memory.
impl Sender for &[u8] {}

/// How a connection's buffers are sized and where they spill.
pub struct BufferPlan {
    pub memory: usize,
    pub max_spill: u64,
    pub temp_dir: Arc<Path>,
    pub disk: Arc<DiskBudget>,
    /// `--spill-after`: how long a blocked receiver may take to catch up
    /// before its backlog goes to disk.
    pub spill_after: Duration,
}

impl BufferPlan {
    /// A new direction, `label` naming it in logs.
    pub fn direction(&self, label: &'static str) -> Direction {
        let buf = SpillBuffer::new(
            self.memory,
            self.max_spill,
            self.temp_dir.clone(),
            self.disk.clone(),
        );
        Direction::new(label, buf).with_spill_after(self.spill_after)
    }
}

/// Which end a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Culprit {
    Sender,
    Receiver,
    SpillFile,
}

/// What one turn of the pump came to.
#[derive(Debug)]
pub enum Pumped {
    /// Nothing more can happen until an end becomes ready again.
    Idle,
    /// The turn's budget ran out with work left: come back without an event.
    MoreWork,
    /// An end failed; the direction is left as it was for the caller to judge.
    Failed(Culprit, io::Error),
}

pub struct Direction {
    /// "client->backend" or "backend->client": also a log prefix.
    pub label: &'static str,
    pub buf: SpillBuffer,
    pub flow: Flow,
    /// The sender may have bytes or an EOF we have not read. Set by a
    /// readable event, cleared only by `WouldBlock`: while it is set and we
    /// stop for backpressure, we come back to it ourselves when room frees.
    pub src_ready: bool,
    /// The sender's last readiness event also said it had shut its write
    /// half or failed: an EOF or error is waiting behind the bytes, and no
    /// later event will announce it, so a short read must not clear
    /// `src_ready`.
    pub src_closing: bool,
    /// The receiver may take bytes; set by a writable event, cleared by
    /// `WouldBlock`.
    pub dst_ready: bool,
    /// The receiver's socket will be closed as soon as this direction is
    /// done (it has sent its own EOF already): passing our EOF on needs no
    /// `shutdown`. Set by the connection before each pump.
    pub receiver_closing: bool,
    /// Bytes taken from the sender.
    pub bytes_in: u64,
    /// Bytes handed to the receiver.
    pub bytes_out: u64,
    /// Bytes thrown away when the direction was aborted.
    pub bytes_dropped: u64,
    /// Aborted, and the sender has also stopped sending (EOF or error).
    sender_gone: bool,
    /// How long the receiver may take to catch up before bytes go to
    /// disk (`--spill-after`).
    spill_after: Duration,
    /// Reading stopped with memory full rather than spilling at once.
    pause: Option<Pause>,
    /// The receiver's segment size, and how many more writes before it
    /// is asked again. It changes: early in a connection the kernel keeps
    /// segments to half the peer's largest window (32KiB on loopback, 64KiB
    /// later), and a path's MTU can change. A stale one costs a packet now
    /// and then, never a byte.
    segment: Option<usize>,
    segment_ttl: u32,
}

/// Writes between two looks at the receiver's segment size.
const SEGMENT_TTL: u32 = 64;

/// Memory is full and the receiver is not taking: rather than spill, stop
/// reading for up to `--spill-after` and see whether it catches up.
///
/// A receiver that keeps up empties memory within microseconds, so the
/// test is "has it taken everything that was held when the pause began",
/// not "has it taken anything": a slow reader that takes a little every
/// millisecond would otherwise hold the sender for the whole transfer,
/// which is what spilling is there to prevent. Put another way: a receiver
/// slower than `--memory-buffer` per `--spill-after` gets its backlog on
/// disk, a faster one gets backpressure and never costs a disk write.
#[derive(Clone, Copy, Debug)]
struct Pause {
    /// `bytes_in` when it began: the receiver has caught up once
    /// `bytes_out` gets there.
    caught_up_at: u64,
    began: Instant,
}

impl Direction {
    pub fn new(label: &'static str, buf: SpillBuffer) -> Self {
        Direction {
            label,
            buf,
            flow: Flow::Open,
            src_ready: false,
            src_closing: false,
            receiver_closing: false,
            dst_ready: false,
            bytes_in: 0,
            bytes_out: 0,
            bytes_dropped: 0,
            sender_gone: false,
            spill_after: Duration::ZERO,
            pause: None,
            segment: None,
            segment_ttl: 0,
        }
    }

    /// Wait up to `spill_after` for a blocked receiver before spilling
    /// (zero: spill at once).
    pub fn with_spill_after(mut self, spill_after: Duration) -> Self {
        self.spill_after = spill_after;
        self
    }

    /// Memory is full and the next bytes would go to disk: may they? Only
    /// if the receiver has been given `spill_after` to take what was held
    /// when memory filled, and has not. Else a pause begins (or goes on):
    /// the sender's readiness stays remembered, and the turn that sees the
    /// receiver catch up, or the timer at `resume_at`, reads on.
    fn may_spill(&mut self, now: Instant) -> bool {
        if self.spill_after.is_zero() {
            return true;
        }
        match self.pause {
            Some(p) if self.bytes_out < p.caught_up_at => now >= p.began + self.spill_after,
            _ => {
                // None yet, or the receiver caught up with the last one:
                // it keeps up, so give it the same chance again.
                self.pause = Some(Pause {
                    caught_up_at: self.bytes_in,
                    began: now,
                });
                false
            }
        }
    }

    /// If the direction is pausing now (not reading, memory full, the
    /// receiver not caught up), when its time is up and it must spill: the
    /// caller sets a timer, since no socket event may come before then.
    pub fn spill_due(&self, now: Instant) -> Option<Instant> {
        let p = self.pause?;
        let due = p.began + self.spill_after;
        let pausing = self.flow == Flow::Open
            && self.src_ready
            && self.buf.needs_disk()
            && self.bytes_out < p.caught_up_at;
        (pausing && due > now).then_some(due)
    }

    /// No more will be read from the sender.
    pub fn src_done(&self) -> bool {
        self.flow != Flow::Open
    }

    /// No more will be written to the receiver.
    pub fn dst_done(&self) -> bool {
        matches!(self.flow, Flow::Closed | Flow::Aborted | Flow::Released)
    }

    /// Given up or released, but its sender has not stopped sending yet.
    pub fn still_sending(&self) -> bool {
        matches!(self.flow, Flow::Aborted | Flow::Released) && !self.sender_gone
    }

    /// The receiver is done with this stream and nothing is held for it:
    /// from now on what the sender sends is dropped (and counted).
    pub fn release(&mut self) {
        debug_assert!(self.buf.is_empty(), "released with bytes held");
        if self.flow == Flow::Open {
            self.flow = Flow::Released;
        }
    }

    /// Give up on this stream: drop what is held and free its disk space.
    pub fn abort(&mut self) {
        if !self.dst_done() {
            self.bytes_dropped += self.buf.discard();
            // A sender whose EOF was read has nothing more to send: no
            // lingering for it.
            self.sender_gone |= self.flow == Flow::Draining;
            self.flow = Flow::Aborted;
        }
    }
}

/// Move bytes from `src` to `dst` until neither end can go on or the turn's
/// budget is spent. `dst` is `None` while the receiver is not connected yet:
/// bytes are then only taken in (memory, then disk).
///
/// The order inside a turn is the spill ladder: first hand over what is
/// held (that frees memory), then pass on an EOF once everything is
/// delivered, then take more: into memory while it has room, else (once
/// the receiver has had `--spill-after` to catch up) onto disk while under
/// `--max-spill`, else not at all (backpressure).
pub fn pump<R: Sender, W: Receiver>(
    dir: &mut Direction,
    mut src: Option<R>,
    mut dst: Option<W>,
    scratch: &mut [u8],
) -> Pumped {
    if matches!(dir.flow, Flow::Aborted | Flow::Released) {
        return discard(dir, src, scratch);
    }
    for _ in 0..OPS_PER_PUMP {
        if dir.dst_done() {
            return Pumped::Idle;
        }
        let mut progressed = false;
        if let Some(dst) = dst.as_mut().filter(|_| dir.dst_ready) {
            // While the sender has more coming this very turn, write whole
            // segments and let the remainder go with the next read's
            // bytes; once it has not (or has ended), write everything.
            let more_coming = dir.flow == Flow::Open && dir.src_ready;
            // Asked only when it matters: a small exchange never needs it.
            if more_coming && !dir.buf.is_empty() {
                if dir.segment_ttl == 0 {
                    dir.segment = dst.segment_size();
                    dir.segment_ttl = SEGMENT_TTL;
                }
                dir.segment_ttl -= 1;
            }
            let unit = dir.segment.filter(|_| more_coming);
            match dir.buf.drain(dst, dst.fd(), unit) {
                Drain::Gave(n) => {
                    dir.bytes_out += n as u64;
                    progressed = true;
                }
                Drain::WouldBlock => dir.dst_ready = false,
                Drain::Empty => {}
                Drain::SinkFailed(e) => return Pumped::Failed(Culprit::Receiver, e),
                Drain::SpillFailed(e) => return Pumped::Failed(Culprit::SpillFile, e),
            }
        }
        if dir.flow == Flow::Draining && dir.buf.is_empty() {
            if let Some(dst) = dst.as_mut() {
                if dir.receiver_closing {
                    // Its socket is closed right after this turn, and the
                    // close sends the FIN: a shutdown first is a wasted call.
                    dir.flow = Flow::Closed;
                    return Pumped::Idle;
                }
                return match dst.close_write() {
                    Ok(()) => {
                        dir.flow = Flow::Closed;
                        Pumped::Idle
                    }
                    Err(e) => Pumped::Failed(Culprit::Receiver, e),
                };
            }
        }
        // One read for every write: a receiver that keeps up must not
        // starve the sender, or a backend is held while a fast client
        // drains the backlog, which is what spilling is there to avoid.
        if dir.flow == Flow::Open
            && dir.src_ready
            && dir.buf.has_room()
            && (!dir.buf.needs_disk() || dir.may_spill(Instant::now()))
        {
            let src = src.as_mut().expect("an open direction has a sender");
            let fd = src.fd();
            match dir.buf.fill(src, fd, scratch, usize::MAX) {
                Fill::Took(n) => {
                    dir.bytes_in += n as u64;
                    progressed = true;
                    if dir.buf.last_read_was_short() && !dir.src_closing && src.short_read_drains()
                    {
                        dir.src_ready = false;
                    }
                }
                Fill::Eof => {
                    dir.flow = Flow::Draining;
                    progressed = true;
                }
                Fill::WouldBlock => dir.src_ready = false,
                // The sender may still have bytes: keep its readiness;
                // memory counts as full until the receiver takes some.
                Fill::Full => {}
                // Memory is full and disk is not to be had: stop reading.
                // `src_ready` stays set; the event loop retries when space
                // may have freed. Writing goes on.
                Fill::NoDisk(_) => {}
                Fill::SourceFailed(e) => return Pumped::Failed(Culprit::Sender, e),
                Fill::SpillFailed(e) => return Pumped::Failed(Culprit::SpillFile, e),
            }
        }
        if !progressed {
            return Pumped::Idle;
        }
    }
    Pumped::MoreWork
}

/// An aborted direction whose sender is still open: read what it sends and
/// drop it. Left unread, those bytes would make the kernel answer our later
/// close of that socket with a reset, which throws away whatever we still
/// had queued for it in the other direction.
fn discard<R: Read>(dir: &mut Direction, mut src: Option<R>, scratch: &mut [u8]) -> Pumped {
    let Some(src) = src
        .as_mut()
        .filter(|_| !dir.sender_gone && !scratch.is_empty())
    else {
        return Pumped::Idle;
    };
    for _ in 0..OPS_PER_PUMP {
        if !dir.src_ready {
            return Pumped::Idle;
        }
        match src.read(scratch) {
            Ok(0) => dir.sender_gone = true,
            Ok(n) => {
                dir.bytes_dropped += n as u64;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dir.src_ready = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => dir.sender_gone = true,
        }
        return Pumped::Idle;
    }
    Pumped::MoreWork
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver that takes at most `window` bytes until it is reopened.
    struct Window {
        got: Vec<u8>,
        window: usize,
        shut: bool,
    }
    impl Window {
        /// A receiver that takes `window` bytes, then blocks.
        fn new(window: usize) -> Window {
            Window {
                got: Vec::new(),
                window,
                shut: false,
            }
        }
    }
    impl Write for Window {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            assert!(!self.shut, "write after shutdown");
            if self.window == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.window);
            self.window -= n;
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Receiver for Window {
        fn close_write(&mut self) -> io::Result<()> {
            self.shut = true;
            Ok(())
        }
    }

    fn direction(mem: usize, spill: u64) -> (tempfile::TempDir, Direction) {
        let dir = tempfile::tempdir().unwrap();
        let path: Arc<Path> = dir.path().into();
        (
            dir,
            Direction::new(
                "test",
                SpillBuffer::new(mem, spill, path, Arc::new(DiskBudget::new(None))),
            ),
        )
    }

    #[test]
    fn stops_reading_at_the_limit_and_resumes_without_a_new_event() {
        let (_tmp, mut dir) = direction(100, 300);
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut src = &data[..];
        let mut rx = Window::new(0);
        let mut scratch = vec![0u8; 64];
        dir.src_ready = true;
        dir.dst_ready = true;
        while let Pumped::MoreWork = pump(&mut dir, Some(&mut src), Some(&mut rx), &mut scratch) {}
        assert_eq!(dir.buf.len(), 400, "memory plus max-spill, no more");
        assert!(dir.src_ready, "the sender is still readable: remembered");
        assert!(!dir.dst_ready);
        // The receiver opens up: a writable event, and nothing from the sender.
        rx.window = usize::MAX;
        dir.dst_ready = true;
        while let Pumped::MoreWork = pump(&mut dir, Some(&mut src), Some(&mut rx), &mut scratch) {}
        assert_eq!(rx.got, data, "all bytes, in order");
        assert_eq!(dir.flow, Flow::Closed, "EOF passed on");
        assert!(rx.shut);
        assert_eq!((dir.bytes_in, dir.bytes_out), (1000, 1000));
    }

    /// Like a TCP socket: a read that returns less than asked has emptied
    /// it. `then_eof`: after its bytes, the next read says EOF.
    struct Socketish<'a> {
        data: &'a [u8],
        then_eof: bool,
        reads: usize,
    }
    impl Sender for Socketish<'_> {
        fn short_read_drains(&self) -> bool {
            true
        }
    }
    impl Read for Socketish<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            if self.data.is_empty() && !self.then_eof {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.data.read(buf)
        }
    }

    /// A short read from a socket ends the reading (no read just to hear
    /// `WouldBlock`), unless the event said the sender had closed: then
    /// its EOF is read at once, since no later event would announce it.
    #[test]
    fn a_short_read_drains_a_socket_unless_its_eof_is_waiting() {
        for closing in [false, true] {
            let (_tmp, mut dir) = direction(64 * 1024, 1 << 30);
            let mut src = Socketish {
                data: b"GET / HTTP/1.1\r\n\r\n",
                then_eof: closing,
                reads: 0,
            };
            let mut rx = Window::new(usize::MAX);
            let mut scratch = vec![0u8; 1024];
            dir.src_ready = true;
            dir.src_closing = closing;
            dir.dst_ready = true;
            while let Pumped::MoreWork = pump(&mut dir, Some(&mut src), Some(&mut rx), &mut scratch)
            {
            }
            assert_eq!(rx.got, b"GET / HTTP/1.1\r\n\r\n");
            if closing {
                assert_eq!(dir.flow, Flow::Closed, "the waiting EOF was read");
                assert!(rx.shut);
            } else {
                assert_eq!(src.reads, 1, "no second read to hear WouldBlock");
                assert!(!dir.src_ready, "the next event will say when");
                assert_eq!(dir.flow, Flow::Open);
            }
        }
    }

    /// A receiver that takes everything as fast as it comes must not
    /// starve the sender while a backlog drains: each round reads too.
    #[test]
    fn a_fast_receiver_does_not_starve_the_sender() {
        let (_tmp, mut dir) = direction(64 * 1024, 1 << 30);
        let mut src = Chunks::whole(8 << 20);
        let mut rx = Window::new(0);
        let mut scratch = vec![0u8; 64 * 1024];
        dir.src_ready = true;
        // A stalled receiver: 8MiB pile up, memory then disk.
        while let Pumped::MoreWork = pump(&mut dir, Some(&mut src), Some(&mut rx), &mut scratch) {}
        assert_eq!(dir.buf.len(), 8 << 20);
        // The receiver now takes anything, and the sender has 8MiB more.
        src.left = 8 << 20;
        rx.window = usize::MAX;
        dir.dst_ready = true;
        dir.src_ready = true;
        let _ = pump(&mut dir, Some(&mut src), Some(&mut rx), &mut scratch);
        let read = dir.bytes_in - (8 << 20);
        assert!(dir.bytes_out > 0, "wrote");
        assert!(
            read >= dir.bytes_out / 2,
            "read {read} bytes from the sender in a turn that wrote {}",
            dir.bytes_out
        );
    }

    impl Direction {
        /// Pretend the current pause began `ago` earlier than it did.
        fn age_pause(&mut self, ago: Duration) {
            let p = self.pause.as_mut().expect("pausing");
            p.began -= ago;
        }
    }

    fn pump_all<R: Sender, W: Receiver>(dir: &mut Direction, src: &mut R, dst: &mut W) {
        let mut scratch = vec![0u8; 64];
        while let Pumped::MoreWork = pump(dir, Some(&mut *src), Some(&mut *dst), &mut scratch) {}
    }

    /// Memory full, the receiver blocked: the sender is not read (no
    /// spill) until `--spill-after` has passed without the receiver taking
    /// what was held; a timer is asked for meanwhile, and then it spills.
    #[test]
    fn a_blocked_receiver_gets_spill_after_before_anything_spills() {
        let (_tmp, dir) = direction(100, 1 << 20);
        let after = Duration::from_secs(60);
        let mut dir = dir.with_spill_after(after);
        let data = vec![4u8; 1000];
        let mut src = &data[..];
        let mut rx = Window::new(0);
        dir.src_ready = true;
        dir.dst_ready = true;
        pump_all(&mut dir, &mut src, &mut rx);
        assert_eq!(dir.buf.len(), 100, "memory only");
        assert!(!dir.buf.has_spilled());
        assert!(dir.src_ready, "the sender's readiness is remembered");
        let now = Instant::now();
        let due = dir.spill_due(now).expect("a timer is wanted");
        assert!(due > now && due <= now + after);
        // The receiver takes a little, but not all that was held: that is
        // no catching up, and the clock runs on.
        rx.window = 40;
        dir.dst_ready = true;
        pump_all(&mut dir, &mut src, &mut rx);
        assert_eq!((dir.buf.len(), dir.buf.has_spilled()), (100, false));
        assert_eq!(dir.spill_due(Instant::now()), Some(due), "same deadline");
        // Time is up: the timer's turn spills, and asks for no timer.
        dir.age_pause(after);
        pump_all(&mut dir, &mut src, &mut rx);
        assert!(dir.buf.has_spilled());
        assert_eq!(dir.bytes_in, 1000, "read on to the sender's end");
        assert_eq!(dir.spill_due(Instant::now()), None);
        rx.window = usize::MAX;
        dir.dst_ready = true;
        pump_all(&mut dir, &mut src, &mut rx);
        assert_eq!(rx.got, data);
    }

    /// A receiver that takes everything that was held within
    /// `--spill-after` each time keeps up: every pause starts the clock
    /// anew, and nothing ever goes to disk however long it runs.
    #[test]
    fn a_receiver_that_catches_up_in_time_never_spills() {
        let (_tmp, dir) = direction(100, 1 << 20);
        let after = Duration::from_secs(60);
        let mut dir = dir.with_spill_after(after);
        let mut src = Chunks::whole(100_000);
        let mut rx = Window::new(0);
        dir.src_ready = true;
        dir.dst_ready = true;
        for _ in 0..500 {
            pump_all(&mut dir, &mut src, &mut rx);
            assert!(!dir.buf.has_spilled(), "spilled after {}", dir.bytes_out);
            // Most of the allowance passes, then the receiver takes all.
            dir.age_pause(after - Duration::from_millis(1));
            rx.window = 100;
            dir.dst_ready = true;
        }
        assert_eq!(dir.bytes_out, 100 * 499);
    }

    /// A receiver with segments of 100 bytes, recording each write's size.
    struct Segmented {
        got: Vec<u8>,
        writes: Vec<usize>,
    }
    impl Write for Segmented {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes.push(buf.len());
            self.got.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Receiver for Segmented {
        fn close_write(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn segment_size(&self) -> Option<usize> {
            Some(100)
        }
    }

    /// A sender that gives `chunk` bytes per read of a numbered stream of
    /// `left` bytes, then has nothing for now (no EOF).
    struct Chunks {
        next: u8,
        left: usize,
        chunk: usize,
    }
    impl Chunks {
        /// `left` bytes, as much per read as asked for.
        fn whole(left: usize) -> Chunks {
            Chunks {
                next: 0,
                left,
                chunk: usize::MAX,
            }
        }
    }
    impl Sender for Chunks {}
    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.chunk).min(self.left);
            for b in &mut buf[..n] {
                *b = self.next;
                self.next = self.next.wrapping_add(1);
            }
            self.left -= n;
            Ok(n)
        }
    }

    /// While the sender has more, only whole segments are written and the
    /// sliver waits for the next read's bytes; when the sender runs dry,
    /// the sliver goes at once: nothing is held back for want of more.
    #[test]
    fn whole_segments_while_more_is_coming_then_the_rest_at_once() {
        let (_tmp, mut dir) = direction(1000, 1 << 20);
        let mut src = Chunks {
            next: 0,
            left: 2050,
            chunk: 130,
        };
        let mut rx = Segmented {
            got: Vec::new(),
            writes: Vec::new(),
        };
        dir.src_ready = true;
        dir.dst_ready = true;
        pump_all(&mut dir, &mut src, &mut rx);
        assert_eq!(
            dir.bytes_out, 2050,
            "nothing held back once the sender ran dry"
        );
        let expected: Vec<u8> = (0..2050u32).map(|i| i as u8).collect();
        assert_eq!(rx.got, expected);
        let (last, whole) = rx.writes.split_last().unwrap();
        assert!(
            whole.iter().all(|&n| n % 100 == 0),
            "writes while more was coming: {:?}",
            rx.writes
        );
        assert!(*last % 100 != 0, "the sliver went last: {:?}", rx.writes);
    }

    /// Two connected loopback sockets: a blocking std end for the test to
    /// drive, and a non-blocking mio end for the pump.
    fn socket_pair() -> (std::net::TcpStream, mio::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let outer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (inner, _) = listener.accept().unwrap();
        inner.set_nonblocking(true).unwrap();
        (outer, mio::net::TcpStream::from_std(inner))
    }

    /// A sender that resets in the middle of a bulk stream is a failure of
    /// the sender, never an EOF, however its bytes were being taken (a
    /// splice that fails consumes the socket's error: a read after it
    /// would say EOF, and a cut upload would look complete).
    #[test]
    fn a_sender_reset_while_splicing_is_a_failure_not_an_eof() {
        for round in 0..5 {
            let (mut peer, from) = socket_pair();
            let (mut sink, to) = socket_pair();
            let (_tmp, mut dir) = direction(16 * 1024, 1 << 30);
            let writer = std::thread::spawn(move || {
                let data = vec![round as u8; 300 * 1024];
                peer.write_all(&data).unwrap();
                socket2::SockRef::from(&peer)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            });
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                let _ = sink.read_to_end(&mut got);
                got.len()
            });
            let mut scratch = vec![0u8; 64 * 1024];
            let deadline = Instant::now() + Duration::from_secs(20);
            let outcome = loop {
                assert!(Instant::now() < deadline, "no outcome");
                dir.src_ready = true;
                dir.dst_ready = true;
                match pump(&mut dir, Some(&from), Some(&to), &mut scratch) {
                    Pumped::Failed(culprit, e) => break (culprit, e),
                    _ => assert_eq!(
                        dir.flow,
                        Flow::Open,
                        "round {round}: EOF from a reset sender"
                    ),
                }
                if writer.is_finished() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            };
            writer.join().unwrap();
            assert_eq!(outcome.0, Culprit::Sender, "round {round}: {outcome:?}");
            assert_eq!(
                outcome.1.kind(),
                io::ErrorKind::ConnectionReset,
                "round {round}"
            );
            assert!(dir.buf.spliced(), "round {round}: the pipe was never used");
            drop(to);
            assert!(reader.join().unwrap() <= 300 * 1024);
        }
    }

    /// `--spill-after 0` is the old ladder: memory full, straight to disk.
    #[test]
    fn zero_spill_after_spills_at_once() {
        let (_tmp, mut dir) = direction(100, 1 << 20);
        let data = vec![4u8; 1000];
        let mut rx = Window::new(0);
        dir.src_ready = true;
        pump_all(&mut dir, &mut &data[..], &mut rx);
        assert_eq!(dir.buf.file_backlog(), 900);
        assert_eq!(dir.spill_due(Instant::now()), None);
    }

    #[test]
    fn without_a_receiver_bytes_are_held_and_eof_waits() {
        let (_tmp, mut dir) = direction(64, 1 << 20);
        let data = vec![9u8; 5000];
        let mut src = &data[..];
        let mut scratch = vec![0u8; 512];
        dir.src_ready = true;
        while let Pumped::MoreWork =
            pump(&mut dir, Some(&mut src), None::<&mut Window>, &mut scratch)
        {}
        assert_eq!(dir.flow, Flow::Draining);
        assert_eq!(dir.buf.len(), 5000);
        assert!(dir.buf.has_spilled());
    }

    #[test]
    fn abort_drops_what_is_held() {
        let (_tmp, mut dir) = direction(64, 1 << 20);
        let data = vec![1u8; 1000];
        let mut src = &data[..];
        let mut scratch = vec![0u8; 512];
        dir.src_ready = true;
        while let Pumped::MoreWork =
            pump(&mut dir, Some(&mut src), None::<&mut Window>, &mut scratch)
        {}
        dir.abort();
        assert_eq!(dir.bytes_dropped, 1000);
        assert!(dir.buf.is_empty());
        assert!(dir.src_done() && dir.dst_done());
    }
}
