//! One direction of a relay, and the one pump that moves its bytes.
//!
//! The same `pump` serves client->backend and backend->client: it takes a
//! `Direction` (the buffer, where the stream is in its life, how much of
//! the current message is left) and the two ends as `Peer`s (a socket and
//! the readiness we remember for it). It knows nothing of mio's tokens or
//! of which peer is which; the connection decides what a failure means.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::budget::Budget;
use crate::config::show_size;
use crate::spill::{Drain, Fill, SpillBuffer};

/// Rounds (a write and a read each) one `pump` call may make before it
/// yields, so that one busy connection cannot starve the others and a bug
/// cannot become a spin. With 64KiB buffers that is up to 2MiB each way.
pub const OPS_PER_PUMP: usize = 32;

/// Writes between two looks at the receiver's segment size.
const SEGMENT_TTL: u32 = 64;

/// Where the stream of one direction is in its life.
///
/// ```text
///          EOF read                 all delivered,
///  Open ─────────────► Flushing ─────────────────► Closed
///   │  │                  │        write half shut
///   │  │ abort()          │ abort()
///   │  └─────────────► Aborted ◄───┘      (bytes held are dropped, counted)
///   │ release()  (receiver finished, nothing held)
///   └─────────────► Released                (the sender's bytes are dropped)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Reading from the sender, writing to the receiver.
    Open,
    /// The sender sent EOF (or we answered in its place); what is held is
    /// still being delivered.
    Flushing,
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

impl Sender for mio::net::TcpStream {
    fn fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }

    /// A TCP read returns less than asked only when it has emptied the
    /// receive queue. Whatever arrives after it (data, FIN, reset) queues
    /// a new edge-triggered event, so not reading again until then loses
    /// nothing, and saves the read that would only say `WouldBlock`: a
    /// third of the syscalls of a small request or response. (A FIN that
    /// had arrived *before* the read raised no new event: `Peer::
    /// read_closing` keeps such a sender readable until its EOF is read.)
    fn short_read_drains(&self) -> bool {
        true
    }
}

impl Receiver for mio::net::TcpStream {
    fn close_write(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }

    fn segment_size(&self) -> Option<usize> {
        let mss = socket2::SockRef::from(self).tcp_mss().ok()?;
        (mss > 0).then_some(mss as usize)
    }
}

/// Plain byte slices send, for tests and for anything else in memory.
impl Sender for &[u8] {}

/// One socket as the relay sees it: the stream (absent while not connected,
/// or once closed) and the readiness we remember for it. mio is
/// edge-triggered: an edge that is not drained is not reported again, so
/// a socket we stopped reading for backpressure stays `readable` here, and
/// the turn that frees room reads on without any new event. Readiness is
/// the socket's, not a direction's: the client's socket carries request
/// after request, and a backend's is handed from one request to the next.
pub struct Peer<S> {
    pub io: Option<S>,
    /// May have bytes or an EOF we have not read. Set by a readable event;
    /// cleared only when a read says it has nothing (`WouldBlock`, or a
    /// short read from a socket).
    readable: bool,
    /// The last event also said the other end shut its write half or
    /// failed: an EOF or error waits behind the bytes, and no later event
    /// will announce it, so a short read must not clear `readable`.
    read_closing: bool,
    /// May take bytes; set by a writable event, cleared by `WouldBlock`.
    writable: bool,
    /// epoll flagged an error: look at `SO_ERROR` even if no read or write
    /// would (a reset after the peer's EOF, with nothing to write to it,
    /// shows up nowhere else).
    errored: bool,
}

impl<S> Peer<S> {
    pub fn new(io: S) -> Peer<S> {
        Peer {
            io: Some(io),
            readable: false,
            read_closing: false,
            writable: false,
            errored: false,
        }
    }

    /// No socket (yet): a direction without a receiver only buffers.
    pub fn absent() -> Peer<S> {
        Peer {
            io: None,
            readable: false,
            read_closing: false,
            writable: false,
            errored: false,
        }
    }

    /// Note what an event says. Errors and hang-ups count as readiness
    /// too: the next read or write reports them.
    pub fn on_event(&mut self, event: &mio::event::Event) {
        let closed = event.is_read_closed() || event.is_error();
        self.on_readiness(
            event.is_readable() || closed,
            event.is_writable() || event.is_write_closed() || event.is_error(),
            closed,
            event.is_error(),
        );
    }

    /// `on_event` in plain flags (tests, and a connect just completed).
    pub fn on_readiness(&mut self, readable: bool, writable: bool, closing: bool, error: bool) {
        self.readable |= readable;
        self.writable |= writable;
        self.read_closing |= closing;
        self.errored |= error;
    }

    pub fn is_readable(&self) -> bool {
        self.readable
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Any readiness noted since `forget_readiness`.
    pub fn was_woken(&self) -> bool {
        self.readable || self.writable
    }

    /// Events noted so far say nothing about what comes next (a connect
    /// still in progress: look again at its next event).
    pub fn forget_readiness(&mut self) {
        self.readable = false;
        self.writable = false;
    }

    /// Was an error flagged since the last call?
    pub fn take_errored(&mut self) -> bool {
        std::mem::take(&mut self.errored)
    }

    /// A read got `WouldBlock`: nothing until the next readable event.
    pub fn read_dry(&mut self) {
        self.readable = false;
    }

    /// A read from a socket got less than it asked: the queue is empty,
    /// unless an EOF or error waits behind it (which no event will say).
    pub fn read_short(&mut self) {
        if !self.read_closing {
            self.readable = false;
        }
    }

    /// A write got `WouldBlock`: nothing until the next writable event.
    pub fn write_blocked(&mut self) {
        self.writable = false;
    }
}

/// How a connection's buffers are sized and where they spill.
pub struct BufferPlan {
    pub memory: usize,
    /// `--memory-buffer-max`.
    pub memory_max: usize,
    pub max_spill: u64,
    pub temp_dir: Arc<Path>,
    pub disk: Arc<Budget>,
    /// `--max-memory`: what all directions' memory may come to.
    pub memory_budget: Arc<Budget>,
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
        )
        .with_memory_budget(&self.memory_budget)
        .with_growth(self.memory_max);
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
    /// The message set by `expect` is all taken and all delivered.
    Complete,
    /// An end failed; the direction is left as it was for the caller to judge.
    Failed(Culprit, io::Error),
}

/// What a direction has to tell the operator, once (see `Direction::news`).
#[derive(Debug, PartialEq, Eq)]
pub enum News {
    /// Its first byte went to disk.
    FirstSpill,
    /// It cannot spill (disk full, over quota, `--max-disk`): reading from
    /// its sender pauses. `first`: the first episode on this connection.
    DiskBlocked { cause: String, first: bool },
    /// It can spill again after an episode.
    DiskBack { first: bool },
    /// `--max-spill` is reached (or, for a direction that may not spill,
    /// its memory is full): reading its sender stops until the receiver
    /// takes some. Once per episode.
    SpillLimit,
    /// `--max-memory` is reached and this direction, holding no memory,
    /// may not spill: reading its sender stops until others give some
    /// back. Once per episode.
    MemoryLimit,
}

pub struct Direction {
    /// "client->backend" or "backend->client": also a log prefix.
    label: &'static str,
    buf: SpillBuffer,
    flow: Flow,
    /// The receiver's socket will be closed as soon as this direction is
    /// done (it has sent its own EOF already): passing our EOF on needs no
    /// `shutdown`. Set by the connection before each pump.
    receiver_closing: bool,
    /// Bytes taken from the sender.
    bytes_in: u64,
    /// Bytes handed to the receiver.
    bytes_out: u64,
    /// Bytes thrown away when the direction was aborted or released.
    bytes_dropped: u64,
    /// Aborted or released, and the sender has also stopped sending (EOF
    /// or error).
    sender_gone: bool,
    /// Bytes still to take for the current message (`expect`); `None`:
    /// everything until EOF.
    to_take: Option<u64>,
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
    /// What the operator has been told: the first spill, and disk trouble
    /// (episodes so far, and whether one stands now).
    told_spill: bool,
    disk_episodes: u32,
    disk_blocked: bool,
    at_spill_limit: bool,
}

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
            receiver_closing: false,
            bytes_in: 0,
            bytes_out: 0,
            bytes_dropped: 0,
            sender_gone: false,
            to_take: None,
            spill_after: Duration::ZERO,
            pause: None,
            segment: None,
            segment_ttl: 0,
            told_spill: false,
            disk_episodes: 0,
            disk_blocked: false,
            at_spill_limit: false,
        }
    }

    /// Wait up to `spill_after` for a blocked receiver before spilling
    /// (zero: spill at once).
    pub fn with_spill_after(mut self, spill_after: Duration) -> Self {
        self.spill_after = spill_after;
        self
    }

    pub fn label(&self) -> &'static str {
        self.label
    }

    pub fn buf(&self) -> &SpillBuffer {
        &self.buf
    }

    pub fn flow(&self) -> Flow {
        self.flow
    }

    pub fn bytes_in(&self) -> u64 {
        self.bytes_in
    }

    pub fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    pub fn bytes_dropped(&self) -> u64 {
        self.bytes_dropped
    }

    /// Bytes held for the receiver now.
    pub fn held(&self) -> u64 {
        self.buf.len()
    }

    /// The receiver's socket closes once this direction is done, so our
    /// EOF needs no `shutdown` of its own.
    pub fn set_receiver_closing(&mut self, closing: bool) {
        self.receiver_closing = closing;
    }

    /// The sender's EOF has been read: its stream is complete.
    pub fn sender_finished(&self) -> bool {
        matches!(self.flow, Flow::Flushing | Flow::Closed)
    }

    /// No more will be read from the sender (except to drop it).
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

    /// Take at most `len` more bytes from the sender: the rest of the
    /// current message. The pump stops reading there, and says `Complete`
    /// once they are all delivered.
    pub fn expect(&mut self, len: u64) {
        self.to_take = Some(len);
    }

    /// The current message is all taken (though maybe not yet delivered).
    pub fn message_taken(&self) -> bool {
        self.to_take == Some(0)
    }

    /// How much may wait on disk from now on: 0 passes bytes on as they
    /// come, holding the sender back to the receiver's pace.
    pub fn set_spill_limit(&mut self, limit: u64) {
        self.buf.set_spill_limit(limit);
    }

    /// Take everything until the sender's EOF again (after `expect`).
    pub fn unlimited(&mut self) {
        self.to_take = None;
    }

    /// Never use a pipe for this direction's memory: its bytes will be
    /// sent more than once (`send_copy`).
    pub fn without_splice(mut self) -> Self {
        self.buf.no_splice();
        self
    }

    /// Put bytes of our own at the tail (a head we wrote, a body we
    /// decoded), memory then disk; what fits now is taken (`Fill::Took`).
    /// (Not gated on `has_room`: our bytes may take memory `--max-memory`
    /// would refuse a sender; see `SpillBuffer::push`.)
    pub fn push(&mut self, bytes: &[u8]) -> Fill {
        let filled = self.buf.push(bytes);
        if let Fill::Took(n) = filled {
            self.bytes_in += n as u64;
        }
        filled
    }

    /// Write to `dst` what is held from `offset` on, without taking it
    /// (see `SpillBuffer::write_from`): how many bytes went, or why none.
    pub fn send_copy<W: Receiver>(&mut self, dst: &mut Peer<W>, offset: u64) -> Drain {
        let Some(io) = dst.io.as_mut().filter(|_| dst.writable) else {
            return Drain::WouldBlock;
        };
        let fd = Receiver::fd(io);
        let sent = self.buf.write_from(io, fd, offset);
        if matches!(sent, Drain::WouldBlock) {
            dst.writable = false;
        }
        sent
    }

    /// What is held was delivered by `send_copy`: let it go, counted as
    /// handed to the receiver.
    pub fn delivered_by_copy(&mut self) {
        self.bytes_out += self.buf.discard();
    }

    /// The sender has nothing more for this receiver: deliver what is held,
    /// then pass EOF on (`Flushing`).
    pub fn finish(&mut self) {
        if self.flow == Flow::Open {
            self.flow = Flow::Flushing;
        }
    }

    /// Give up on this stream: drop what is held and free its disk space.
    pub fn abort(&mut self) {
        if !self.dst_done() {
            self.bytes_dropped += self.buf.discard();
            // A sender whose EOF was read has nothing more to send: no
            // lingering for it.
            self.sender_gone |= self.flow == Flow::Flushing;
            self.flow = Flow::Aborted;
        }
    }

    /// The receiver is done with this stream and nothing is held for it:
    /// from now on what the sender sends is dropped (and counted).
    pub fn release(&mut self) {
        debug_assert!(self.buf.is_empty(), "released with bytes held");
        if self.flow == Flow::Open {
            // Never lose a byte silently, whatever a caller did.
            self.bytes_dropped += self.buf.discard();
            self.flow = Flow::Released;
        }
    }

    /// Answer the receiver ourselves, in place of the sender (an error
    /// response, say): what is held is dropped, `answer` is delivered,
    /// then the receiver's write half is shut. Nothing more is read.
    pub fn answer(&mut self, answer: &[u8]) {
        if self.dst_done() {
            return;
        }
        self.bytes_dropped += self.buf.discard();
        self.pause = None;
        self.to_take = None;
        // A fresh buffer always has room in memory for a small answer;
        // one that does not fit is cut, never a panic (answers are ours).
        let mut rest = answer;
        while !rest.is_empty() {
            match self.buf.push(rest) {
                Fill::Took(n) if n > 0 => rest = &rest[n..],
                _ => break,
            }
        }
        debug_assert!(rest.is_empty(), "a canned answer did not fit");
        self.flow = Flow::Flushing;
    }

    /// Stopped reading because no disk space, or under `--max-memory` no
    /// memory, could be had: needs another turn when some may have freed,
    /// since no socket event will say so.
    /// `sender_readable`: the sender's remembered readiness.
    pub fn waiting_for_space(&self, sender_readable: bool) -> bool {
        self.flow == Flow::Open
            && sender_readable
            && (self.buf.needs_disk() && self.buf.disk_blocked().is_some()
                || self.buf.memory_blocked())
    }

    /// Why this direction went to disk, and the flag that would keep more
    /// in memory: the end of its first-spill warning.
    pub fn spill_cause(&self) -> String {
        if self.buf.first_spill_for_budget() {
            let limit = self.buf.memory_budget_limit().unwrap_or(0);
            format!(
                "--max-memory={} reached (all buffers together); spill file in {} (raise --max-memory to keep more in memory)",
                show_size(limit),
                self.buf.temp_dir().display()
            )
        } else {
            format!(
                "more than memory_buffer={} held; spill file in {} (raise --memory-buffer to keep more in memory)",
                show_size(self.buf.memory_limit() as u64),
                self.buf.temp_dir().display()
            )
        }
    }

    /// What the operator should hear about this direction now, each
    /// thing once: its first spill; disk trouble beginning or ending.
    pub fn news(&mut self) -> Option<News> {
        if self.buf.has_spilled() && !self.told_spill {
            self.told_spill = true;
            return Some(News::FirstSpill);
        }
        let at_limit = self.flow == Flow::Open && !self.buf.has_room();
        if at_limit != self.at_spill_limit {
            self.at_spill_limit = at_limit;
            if at_limit {
                return Some(if self.buf.memory_blocked() {
                    News::MemoryLimit
                } else {
                    News::SpillLimit
                });
            }
        }
        match (self.buf.disk_blocked(), self.disk_blocked) {
            (Some(cause), false) => {
                self.disk_blocked = true;
                self.disk_episodes += 1;
                Some(News::DiskBlocked {
                    cause: cause.to_string(),
                    first: self.disk_episodes == 1,
                })
            }
            (None, true) => {
                self.disk_blocked = false;
                Some(News::DiskBack {
                    first: self.disk_episodes == 1,
                })
            }
            _ => None,
        }
    }

    /// Memory is full and the next bytes would go to disk: may they? Only
    /// if the receiver has been given `spill_after` to take what was held
    /// when memory filled, and has not. Else a pause begins (or goes on):
    /// the sender's readiness stays remembered, and the turn that sees the
    /// receiver catch up, or the timer at `spill_due`, reads on.
    fn may_spill(&mut self, now: Instant) -> bool {
        // An empty buffer that needs disk got no memory (`--max-memory`):
        // there is nothing for the receiver to catch up with.
        if self.spill_after.is_zero() || self.buf.is_empty() {
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
    /// `sender_readable`: the sender's remembered readiness.
    pub fn spill_due(&self, now: Instant, sender_readable: bool) -> Option<Instant> {
        let p = self.pause?;
        let due = p.began + self.spill_after;
        let pausing = self.flow == Flow::Open
            && sender_readable
            && self.buf.needs_disk()
            && self.bytes_out < p.caught_up_at;
        (pausing && due > now).then_some(due)
    }
}

/// What one step of a pump's round did.
enum Step {
    Moved,
    Still,
    Done(Pumped),
}

/// Move bytes from `src` to `dst` until neither end can go on or the turn's
/// budget is spent. `dst` has no socket while the receiver is not
/// connected yet: bytes are then only taken in (memory, then disk).
///
/// The order inside a round is the spill ladder: first hand over what is
/// held (that frees memory), then pass on an EOF once everything is
/// delivered, then take more: into memory while it has room, else (once
/// the receiver has had `--spill-after` to catch up) onto disk while under
/// `--max-spill`, else not at all (backpressure). A round reads as well as
/// writes: a receiver that keeps up must not starve the sender, or a
/// backend is held while a fast client drains a backlog from disk, which
/// is what spilling is there to avoid.
pub fn pump<R: Sender, W: Receiver>(
    dir: &mut Direction,
    src: &mut Peer<R>,
    dst: &mut Peer<W>,
    scratch: &mut [u8],
) -> Pumped {
    if matches!(dir.flow, Flow::Aborted | Flow::Released) {
        return discard(dir, src, scratch);
    }
    for _ in 0..OPS_PER_PUMP {
        if dir.dst_done() {
            return Pumped::Idle;
        }
        let gave = match give(dir, dst, src.readable) {
            Step::Done(outcome) => return outcome,
            step => step,
        };
        if let Some(outcome) = pass_eof(dir, dst) {
            return outcome;
        }
        let took = match take(dir, src, scratch) {
            Step::Done(outcome) => return outcome,
            step => step,
        };
        if dir.message_taken() && dir.buf.is_empty() {
            return Pumped::Complete;
        }
        if matches!((gave, took), (Step::Still, Step::Still)) {
            return Pumped::Idle;
        }
    }
    Pumped::MoreWork
}

/// Hand one write's worth of what is held to the receiver. While the
/// sender has more coming this very turn, whole segments only, the sliver
/// going with the next read's bytes; once it has not (or has ended),
/// everything.
fn give<W: Receiver>(dir: &mut Direction, dst: &mut Peer<W>, more_may_come: bool) -> Step {
    let Some(io) = dst.io.as_mut().filter(|_| dst.writable) else {
        return Step::Still;
    };
    let more_coming = dir.flow == Flow::Open && more_may_come && !dir.message_taken();
    // Asked only when it matters: a small exchange never needs it.
    if more_coming && !dir.buf.is_empty() {
        if dir.segment_ttl == 0 {
            dir.segment = io.segment_size();
            dir.segment_ttl = SEGMENT_TTL;
        }
        dir.segment_ttl -= 1;
    }
    let unit = dir.segment.filter(|_| more_coming);
    let fd = Receiver::fd(io);
    match dir.buf.drain(io, fd, unit) {
        Drain::Gave(n) => {
            dir.bytes_out += n as u64;
            Step::Moved
        }
        Drain::WouldBlock => {
            dst.writable = false;
            Step::Still
        }
        Drain::Empty => Step::Still,
        Drain::SinkFailed(e) => Step::Done(Pumped::Failed(Culprit::Receiver, e)),
        Drain::SpillFailed(e) => Step::Done(Pumped::Failed(Culprit::SpillFile, e)),
    }
}

/// The sender has ended and everything is delivered: shut the receiver's
/// write half (`Flushing` -> `Closed`).
fn pass_eof<W: Receiver>(dir: &mut Direction, dst: &mut Peer<W>) -> Option<Pumped> {
    if dir.flow != Flow::Flushing || !dir.buf.is_empty() {
        return None;
    }
    let io = dst.io.as_mut()?;
    if dir.receiver_closing {
        // Its socket is closed right after this turn, and the close sends
        // the FIN: a shutdown first is a wasted call.
        dir.flow = Flow::Closed;
        return Some(Pumped::Idle);
    }
    Some(match io.close_write() {
        Ok(()) => {
            dir.flow = Flow::Closed;
            Pumped::Idle
        }
        Err(e) => Pumped::Failed(Culprit::Receiver, e),
    })
}

/// Take one read's worth from the sender: into memory while it has room;
/// else onto disk, once the receiver has had `--spill-after` to catch up;
/// else nothing (backpressure). Never past the end of the current message.
fn take<R: Sender>(dir: &mut Direction, src: &mut Peer<R>, scratch: &mut [u8]) -> Step {
    let max = dir
        .to_take
        .map_or(usize::MAX, |n| n.min(usize::MAX as u64) as usize);
    let may = dir.flow == Flow::Open
        && src.readable
        && max > 0
        && dir.buf.has_room()
        && (!dir.buf.needs_disk() || dir.may_spill(Instant::now()));
    if !may {
        return Step::Still;
    }
    let io = src.io.as_mut().expect("an open direction has a sender");
    let fd = Sender::fd(io);
    match dir.buf.fill(io, fd, scratch, max) {
        Fill::Took(n) => {
            dir.bytes_in += n as u64;
            if let Some(left) = &mut dir.to_take {
                *left -= n as u64;
            }
            if dir.buf.last_read_was_short() && !src.read_closing && io.short_read_drains() {
                src.readable = false;
            }
            Step::Moved
        }
        Fill::Eof => {
            dir.flow = Flow::Flushing;
            Step::Moved
        }
        Fill::WouldBlock => {
            src.readable = false;
            Step::Still
        }
        // The sender may still have bytes: keep its readiness; memory
        // counts as full until the receiver takes some.
        // From an empty buffer, Full is a claim on --max-memory lost to
        // another worker between `has_room` and the charge: look again
        // (the next round sees the budget as it is now, and an empty
        // budget makes the direction `memory_blocked`, a space waiter).
        Fill::Full if dir.buf.is_empty() => Step::Moved,
        Fill::Full => Step::Still,
        // Memory is full and disk is not to be had: stop reading.
        // `readable` stays set; the event loop retries when space may
        // have freed. Writing goes on.
        Fill::NoDisk(_) => Step::Still,
        Fill::SourceFailed(e) => Step::Done(Pumped::Failed(Culprit::Sender, e)),
        Fill::SpillFailed(e) => Step::Done(Pumped::Failed(Culprit::SpillFile, e)),
    }
}

/// An aborted or released direction whose sender is still open: read what
/// it sends and drop it. Left unread, those bytes would make the kernel
/// answer our later close of that socket with a reset, which throws away
/// whatever we still had queued for it in the other direction.
fn discard<R: Read>(dir: &mut Direction, src: &mut Peer<R>, scratch: &mut [u8]) -> Pumped {
    let Some(io) = src
        .io
        .as_mut()
        .filter(|_| !dir.sender_gone && !scratch.is_empty())
    else {
        return Pumped::Idle;
    };
    for _ in 0..OPS_PER_PUMP {
        if !src.readable {
            return Pumped::Idle;
        }
        match io.read(scratch) {
            Ok(0) => dir.sender_gone = true,
            Ok(n) => {
                dir.bytes_dropped += n as u64;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => src.readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => dir.sender_gone = true,
        }
        return Pumped::Idle;
    }
    Pumped::MoreWork
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Budget;

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

    /// The readiness a test keeps for the two ends between pumps (a
    /// connection keeps it in its `Peer`s).
    #[derive(Default)]
    struct Ready {
        src: bool,
        closing: bool,
        dst: bool,
    }

    /// `pump` over plain ends, `None` for an end with no socket yet, with
    /// their readiness taken from and put back into `ready`.
    fn pump_with<R: Sender, W: Receiver>(
        dir: &mut Direction,
        src: Option<R>,
        dst: Option<W>,
        ready: &mut Ready,
        scratch: &mut [u8],
    ) -> Pumped {
        let mut s = src.map_or_else(Peer::absent, Peer::new);
        s.on_readiness(ready.src, false, ready.closing, false);
        let mut d = dst.map_or_else(Peer::absent, Peer::new);
        d.on_readiness(false, ready.dst, false, false);
        let outcome = pump(dir, &mut s, &mut d, scratch);
        ready.src = s.readable;
        ready.dst = d.writable;
        outcome
    }

    /// `pump_with` until the turn's budget is not what stopped it.
    fn pump_out<R: Sender, W: Receiver>(
        dir: &mut Direction,
        mut src: Option<R>,
        mut dst: Option<W>,
        ready: &mut Ready,
        scratch: &mut [u8],
    ) -> Pumped {
        loop {
            match pump_with(dir, src.as_mut(), dst.as_mut(), ready, scratch) {
                Pumped::MoreWork => {}
                other => return other,
            }
        }
    }

    fn direction(mem: usize, spill: u64) -> (tempfile::TempDir, Direction) {
        let dir = tempfile::tempdir().unwrap();
        let path: Arc<Path> = dir.path().into();
        (
            dir,
            Direction::new(
                "test",
                SpillBuffer::new(mem, spill, path, Arc::new(Budget::new(None))),
            ),
        )
    }

    #[test]
    fn stops_reading_at_the_limit_and_resumes_without_a_new_event() {
        let (_tmp, mut dir) = direction(100, 300);
        let mut ready = Ready::default();
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut src = &data[..];
        let mut rx = Window::new(0);
        let mut scratch = vec![0u8; 64];
        ready.src = true;
        ready.dst = true;
        pump_out(
            &mut dir,
            Some(&mut src),
            Some(&mut rx),
            &mut ready,
            &mut scratch,
        );
        assert_eq!(dir.buf.len(), 400, "memory plus max-spill, no more");
        assert!(ready.src, "the sender is still readable: remembered");
        assert!(!ready.dst);
        // The receiver opens up: a writable event, and nothing from the sender.
        rx.window = usize::MAX;
        ready.dst = true;
        pump_out(
            &mut dir,
            Some(&mut src),
            Some(&mut rx),
            &mut ready,
            &mut scratch,
        );
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
            let mut ready = Ready::default();
            let mut src = Socketish {
                data: b"GET / HTTP/1.1\r\n\r\n",
                then_eof: closing,
                reads: 0,
            };
            let mut rx = Window::new(usize::MAX);
            let mut scratch = vec![0u8; 1024];
            ready.src = true;
            ready.closing = closing;
            ready.dst = true;
            pump_out(
                &mut dir,
                Some(&mut src),
                Some(&mut rx),
                &mut ready,
                &mut scratch,
            );
            assert_eq!(rx.got, b"GET / HTTP/1.1\r\n\r\n");
            if closing {
                assert_eq!(dir.flow, Flow::Closed, "the waiting EOF was read");
                assert!(rx.shut);
            } else {
                assert_eq!(src.reads, 1, "no second read to hear WouldBlock");
                assert!(!ready.src, "the next event will say when");
                assert_eq!(dir.flow, Flow::Open);
            }
        }
    }

    /// A receiver that takes everything as fast as it comes must not
    /// starve the sender while a backlog drains: each round reads too.
    #[test]
    fn a_fast_receiver_does_not_starve_the_sender() {
        let (_tmp, mut dir) = direction(64 * 1024, 1 << 30);
        let mut ready = Ready::default();
        let mut src = Chunks::whole(8 << 20);
        let mut rx = Window::new(0);
        let mut scratch = vec![0u8; 64 * 1024];
        ready.src = true;
        // A stalled receiver: 8MiB pile up, memory then disk.
        pump_out(
            &mut dir,
            Some(&mut src),
            Some(&mut rx),
            &mut ready,
            &mut scratch,
        );
        assert_eq!(dir.buf.len(), 8 << 20);
        // The receiver now takes anything, and the sender has 8MiB more.
        src.left = 8 << 20;
        rx.window = usize::MAX;
        ready.dst = true;
        ready.src = true;
        let _ = pump_with(
            &mut dir,
            Some(&mut src),
            Some(&mut rx),
            &mut ready,
            &mut scratch,
        );
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

    fn pump_all<R: Sender, W: Receiver>(
        dir: &mut Direction,
        ready: &mut Ready,
        src: &mut R,
        dst: &mut W,
    ) {
        let mut scratch = vec![0u8; 64];
        pump_out(dir, Some(&mut *src), Some(&mut *dst), ready, &mut scratch);
    }

    /// Memory full, the receiver blocked: the sender is not read (no
    /// spill) until `--spill-after` has passed without the receiver taking
    /// what was held; a timer is asked for meanwhile, and then it spills.
    #[test]
    fn a_blocked_receiver_gets_spill_after_before_anything_spills() {
        let (_tmp, dir) = direction(100, 1 << 20);
        let mut ready = Ready::default();
        let after = Duration::from_secs(60);
        let mut dir = dir.with_spill_after(after);
        let data = vec![4u8; 1000];
        let mut src = &data[..];
        let mut rx = Window::new(0);
        ready.src = true;
        ready.dst = true;
        pump_all(&mut dir, &mut ready, &mut src, &mut rx);
        assert_eq!(dir.buf.len(), 100, "memory only");
        assert!(!dir.buf.has_spilled());
        assert!(ready.src, "the sender's readiness is remembered");
        let now = Instant::now();
        let due = dir.spill_due(now, ready.src).expect("a timer is wanted");
        assert!(due > now && due <= now + after);
        // The receiver takes a little, but not all that was held: that is
        // no catching up, and the clock runs on.
        rx.window = 40;
        ready.dst = true;
        pump_all(&mut dir, &mut ready, &mut src, &mut rx);
        assert_eq!((dir.buf.len(), dir.buf.has_spilled()), (100, false));
        assert_eq!(
            dir.spill_due(Instant::now(), ready.src),
            Some(due),
            "same deadline"
        );
        // Time is up: the timer's turn spills, and asks for no timer.
        dir.age_pause(after);
        pump_all(&mut dir, &mut ready, &mut src, &mut rx);
        assert!(dir.buf.has_spilled());
        assert_eq!(dir.bytes_in, 1000, "read on to the sender's end");
        assert_eq!(dir.spill_due(Instant::now(), ready.src), None);
        rx.window = usize::MAX;
        ready.dst = true;
        pump_all(&mut dir, &mut ready, &mut src, &mut rx);
        assert_eq!(rx.got, data);
    }

    /// A receiver that takes everything that was held within
    /// `--spill-after` each time keeps up: every pause starts the clock
    /// anew, and nothing ever goes to disk however long it runs.
    #[test]
    fn a_receiver_that_catches_up_in_time_never_spills() {
        let (_tmp, dir) = direction(100, 1 << 20);
        let mut ready = Ready::default();
        let after = Duration::from_secs(60);
        let mut dir = dir.with_spill_after(after);
        let mut src = Chunks::whole(100_000);
        let mut rx = Window::new(0);
        ready.src = true;
        ready.dst = true;
        for _ in 0..500 {
            pump_all(&mut dir, &mut ready, &mut src, &mut rx);
            assert!(!dir.buf.has_spilled(), "spilled after {}", dir.bytes_out);
            // Most of the allowance passes, then the receiver takes all.
            dir.age_pause(after - Duration::from_millis(1));
            rx.window = 100;
            ready.dst = true;
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
        let mut ready = Ready::default();
        let mut src = Chunks {
            next: 0,
            left: 2050,
            chunk: 130,
        };
        let mut rx = Segmented {
            got: Vec::new(),
            writes: Vec::new(),
        };
        ready.src = true;
        ready.dst = true;
        pump_all(&mut dir, &mut ready, &mut src, &mut rx);
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
            let (mut peer, mut from) = socket_pair();
            let (mut sink, mut to) = socket_pair();
            let (_tmp, mut dir) = direction(16 * 1024, 1 << 30);
            let mut ready = Ready::default();
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
                ready.src = true;
                ready.dst = true;
                match pump_with(
                    &mut dir,
                    Some(&mut from),
                    Some(&mut to),
                    &mut ready,
                    &mut scratch,
                ) {
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
        let mut ready = Ready::default();
        let data = vec![4u8; 1000];
        let mut rx = Window::new(0);
        ready.src = true;
        pump_all(&mut dir, &mut ready, &mut &data[..], &mut rx);
        assert_eq!(dir.buf.file_backlog(), 900);
        assert_eq!(dir.spill_due(Instant::now(), ready.src), None);
    }

    #[test]
    fn without_a_receiver_bytes_are_held_and_eof_waits() {
        let (_tmp, mut dir) = direction(64, 1 << 20);
        let mut ready = Ready::default();
        let data = vec![9u8; 5000];
        let mut src = &data[..];
        let mut scratch = vec![0u8; 512];
        ready.src = true;
        pump_out(
            &mut dir,
            Some(&mut src),
            None::<&mut Window>,
            &mut ready,
            &mut scratch,
        );
        assert_eq!(dir.flow, Flow::Flushing);
        assert_eq!(dir.buf.len(), 5000);
        assert!(dir.buf.has_spilled());
    }

    /// `expect(n)`: the pump takes no more than the message's bytes, even
    /// from a sender with more (its readiness stays remembered), says
    /// `Complete` once they are all delivered, and goes on with the next
    /// message when told its length.
    #[test]
    fn a_message_limit_stops_reading_at_its_end_and_completes() {
        let (_tmp, mut dir) = direction(64, 1 << 20);
        let mut ready = Ready::default();
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 253) as u8).collect();
        let mut src = &data[..];
        let mut rx = Window::new(usize::MAX);
        let mut scratch = vec![0u8; 128];
        ready.src = true;
        ready.dst = true;
        dir.expect(300);
        let outcome = pump_out(
            &mut dir,
            Some(&mut src),
            Some(&mut rx),
            &mut ready,
            &mut scratch,
        );
        assert!(matches!(outcome, Pumped::Complete), "{outcome:?}");
        assert_eq!(rx.got, data[..300], "exactly the message");
        assert_eq!(src.len(), 700, "nothing read past its end");
        assert!(ready.src, "the sender's readiness is kept for the next one");
        assert!(dir.message_taken());
        dir.expect(700);
        let outcome = pump_out(
            &mut dir,
            Some(&mut src),
            Some(&mut rx),
            &mut ready,
            &mut scratch,
        );
        assert!(matches!(outcome, Pumped::Complete), "{outcome:?}");
        assert_eq!(rx.got, data);
        assert_eq!(dir.flow, Flow::Open, "a message's end is not the stream's");
    }

    /// `answer`: what was held for the receiver is dropped (and counted),
    /// the answer is delivered in its place, then the receiver's write half
    /// is shut; the sender is not read again.
    #[test]
    fn an_answer_replaces_what_is_held_and_ends_the_stream() {
        let (_tmp, mut dir) = direction(64, 1 << 20);
        let mut ready = Ready::default();
        let data = vec![3u8; 500];
        let mut src = &data[..];
        let mut rx = Window::new(0);
        let mut scratch = vec![0u8; 128];
        ready.src = true;
        ready.dst = true;
        pump_out(
            &mut dir,
            Some(&mut src),
            Some(&mut rx),
            &mut ready,
            &mut scratch,
        );
        let held = dir.held();
        assert!(held > 0);
        let unread = src.len();
        dir.answer(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(dir.bytes_dropped, held);
        rx.window = usize::MAX;
        ready.dst = true;
        ready.src = true;
        pump_out(
            &mut dir,
            Some(&mut src),
            Some(&mut rx),
            &mut ready,
            &mut scratch,
        );
        assert_eq!(
            rx.got,
            b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n"
        );
        assert!(rx.shut, "then EOF");
        assert_eq!(dir.flow, Flow::Closed);
        assert_eq!(src.len(), unread, "the sender is not read after an answer");
    }

    /// A released direction reads what its sender still sends and drops
    /// it, counted, until the sender's EOF; then it is no longer sending
    /// (no lingering), and nothing was ever written to the receiver.
    #[test]
    fn a_released_direction_drops_and_counts_until_the_senders_eof() {
        let (_tmp, mut dir) = direction(64, 1 << 20);
        let mut ready = Ready::default();
        let data = vec![8u8; 700];
        let mut src = Socketish {
            data: &data,
            then_eof: true,
            reads: 0,
        };
        let mut rx = Window::new(usize::MAX);
        let mut scratch = vec![0u8; 100];
        dir.release();
        assert!(dir.dst_done() && dir.still_sending());
        ready.src = true;
        ready.dst = true;
        pump_out(
            &mut dir,
            Some(&mut src),
            Some(&mut rx),
            &mut ready,
            &mut scratch,
        );
        assert_eq!(dir.bytes_dropped, 700);
        assert!(rx.got.is_empty() && !rx.shut);
        assert!(!dir.still_sending(), "the sender's EOF was read");
        assert_eq!(dir.flow, Flow::Released);
    }

    #[test]
    fn abort_drops_what_is_held() {
        let (_tmp, mut dir) = direction(64, 1 << 20);
        let mut ready = Ready::default();
        let data = vec![1u8; 1000];
        let mut src = &data[..];
        let mut scratch = vec![0u8; 512];
        ready.src = true;
        pump_out(
            &mut dir,
            Some(&mut src),
            None::<&mut Window>,
            &mut ready,
            &mut scratch,
        );
        dir.abort();
        assert_eq!(dir.bytes_dropped, 1000);
        assert!(dir.buf.is_empty());
        assert!(dir.src_done() && dir.dst_done());
    }
}
