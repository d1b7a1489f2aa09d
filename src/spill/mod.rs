//! The per-direction buffer: memory first, then an unnamed temporary file.
//!
//! A `SpillBuffer` is a FIFO of bytes. It knows nothing of sockets or mio: it
//! fills from any `Read` and drains into any `Write`, and reports what one
//! step did as a small enum, `WouldBlock` included. Given the file
//! descriptors of the two ends as well, it moves bulk bytes without copying
//! them through user space (`zerocopy`): `splice` through a pipe for the
//! in-memory part, `sendfile` from the spill file (`file`).
//!
//! This module is the ordering layer; the invariant everything rests on:
//!
//! ```text
//!   oldest bytes                                                  newest bytes
//!   [ memory: mem[head .. head+len] or a pipe ] [ file: SpillFile's head .. tail ]
//! ```
//!
//! Every byte in memory is older than every byte in the file. New bytes go
//! to memory only while the file part is empty; once anything is on disk,
//! new bytes are appended to the file. Memory is a `Vec` or a pipe, never
//! both at once, and the two together never hold more than `mem_limit`.
//! When memory runs dry the file's head is sent to the receiver straight
//! from the page cache, or (without a socket to send to) taken back into
//! memory first. What the file does with its disk space is `file.rs`'s.
//!
//! A protocol layer can look at the oldest bytes without taking them
//! (`peek`), drop them once parsed (`consume`), and put bytes of its own in
//! (`push`: a head it wrote, a de-chunked body, a canned answer).

use std::io::{self, Read, Write};
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::budget::Budget;
use crate::buffer_pool;
use crate::io_error::is_unsupported;

mod file;
mod zerocopy;
use file::SpillFile;
use zerocopy::Pipe;

/// What one attempt to take bytes from the sender did.
#[derive(Debug)]
pub enum Fill {
    /// `n > 0` bytes were taken and are now held.
    Took(usize),
    /// The sender has no more bytes now.
    WouldBlock,
    /// The sender closed its write half.
    Eof,
    /// Reading from the sender failed.
    SourceFailed(io::Error),
    /// The pipe that holds memory found no room, although its byte count
    /// had some (it counts slots, one per piece of a socket buffer): none
    /// was taken, the sender may still have bytes, and memory counts as
    /// full until something leaves it.
    Full,
    /// Memory is full and no disk space could be had: `None` when
    /// `--max-disk` is reached, else why the file system refused (full,
    /// over quota, I/O error, temp dir gone). Nothing was read: stop
    /// reading and try again when space may have freed.
    NoDisk(Option<io::Error>),
    /// Bytes read could not be written to reserved space (a file system
    /// that reserves but then fails). They cannot be kept: the caller must
    /// fail the connection; it is never silent.
    SpillFailed(io::Error),
}

/// What one attempt to hand bytes to the receiver did.
#[derive(Debug)]
pub enum Drain {
    /// `n > 0` bytes were written and are no longer held.
    Gave(usize),
    /// The receiver cannot take more now.
    WouldBlock,
    /// Nothing is held.
    Empty,
    /// Writing to the receiver failed.
    SinkFailed(io::Error),
    /// Reading back from the spill file failed.
    SpillFailed(io::Error),
}

/// Bytes this thread's buffers hold in memory now: `Vec`s taken from the
/// pool (whole, as allocated) and bytes in pipes.
pub fn memory_in_use() -> u64 {
    (buffer_pool::in_use() + zerocopy::piped()) as u64
}

/// Whether a buffer's memory is a pipe the kernel splices through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Splice {
    /// Not yet: small exchanges (a request, a reply) gain nothing from a
    /// pipe and would pay two fds and its set-up.
    NotYet,
    /// Bulk has been seen (a read that filled memory, or a spill): bytes
    /// bound for memory are spliced into a pipe whenever the `Vec` is empty.
    Yes,
    /// The kernel refused (no pipe to be had, or splice unsupported), or a
    /// protocol layer looks at the bytes: the `Vec` it is, for good.
    Never,
}

pub struct SpillBuffer {
    /// Allocated on first use: an idle connection costs no buffer.
    mem: Vec<u8>,
    /// What memory may hold now: `mem_base`, or up to `mem_max` for a
    /// direction that has shown bulk (see `size_memory`).
    mem_limit: usize,
    /// `--memory-buffer`.
    mem_base: usize,
    /// `--memory-buffer-max`.
    mem_max: usize,
    mem_head: usize,
    mem_len: usize,
    /// Memory held in the kernel instead of `mem` (never both at once).
    pipe: Option<Pipe>,
    splice: Splice,
    /// What waits on disk, behind memory.
    file: SpillFile,
    /// The last `fill` was a `read` that got fewer bytes than there was
    /// room for: the sender had nothing more at that moment.
    short_read: bool,
    /// `--max-memory`, when there is one: while this buffer holds memory
    /// (a `Vec` allocated, or bytes in its pipe) it is charged `mem_limit`,
    /// all of it, since that is what it may come to hold without asking.
    mem_budget: Option<Arc<Budget>>,
    mem_charged: bool,
    /// The first bytes to go to disk went because `--max-memory` had no
    /// room, not because this buffer's memory was full (for the log).
    first_spill_for_budget: bool,
}

impl SpillBuffer {
    /// `mem_limit` bytes in memory, then up to `spill_limit` bytes waiting on
    /// disk in an unnamed file created in `temp_dir` when first needed.
    pub fn new(
        mem_limit: usize,
        spill_limit: u64,
        temp_dir: Arc<Path>,
        budget: Arc<Budget>,
    ) -> Self {
        assert!(mem_limit > 0, "the memory part is also the write window");
        SpillBuffer {
            mem: Vec::new(),
            mem_limit,
            mem_base: mem_limit,
            mem_max: mem_limit,
            mem_head: 0,
            mem_len: 0,
            pipe: None,
            splice: Splice::NotYet,
            file: SpillFile::new(spill_limit, temp_dir, budget),
            short_read: false,
            mem_budget: None,
            mem_charged: false,
            first_spill_for_budget: false,
        }
    }

    /// Let memory grow to `max` (`--memory-buffer-max`) once the direction
    /// shows bulk, while `--max-memory` has room (see `size_memory`).
    pub fn with_growth(mut self, max: usize) -> Self {
        self.mem_max = max.max(self.mem_base);
        self
    }

    /// Before memory is taken anew (none held): a direction that has shown
    /// bulk (`Splice::Yes`: a read that filled memory, or a spill) gets
    /// `mem_max` if the budget has room for it, any other (or bulk without
    /// room) `mem_base`. Larger steps halve the system calls per byte of a
    /// bulk transfer; an idle or small direction never holds more than
    /// `--memory-buffer`, since empty memory is given back. A buffer that
    /// is looked into (`Splice::Never`: HTTP heads and bodies it frames)
    /// does not grow: it is parsed, not moved, and bigger steps would buy
    /// it memory, not fewer system calls.
    fn size_memory(&mut self) {
        if self.mem_max == self.mem_base
            || self.memory_len() > 0
            || self.file_backlog() > 0
            || self.mem_charged
        {
            return;
        }
        let room = |b: &Arc<Budget>| b.has_room(self.mem_max as u64);
        let want = if self.splice == Splice::Yes && self.mem_budget.as_ref().is_none_or(room) {
            self.mem_max
        } else {
            self.mem_base
        };
        if want != self.mem_limit {
            // An empty vector of the old size (kept when there is no
            // budget) goes back to the pool.
            self.free_mem();
            self.mem_limit = want;
        }
    }

    /// No pipe as large as grown memory could be had: back to `mem_base`
    /// for good (with what was charged for the difference given back).
    fn stop_growing(&mut self) {
        if self.mem_charged {
            if let Some(budget) = &self.mem_budget {
                budget.release((self.mem_limit - self.mem_base) as u64);
            }
        }
        self.mem_limit = self.mem_base;
        self.mem_max = self.mem_base;
    }

    /// Charge this buffer's memory to `budget` (`--max-memory`): when it
    /// has no room, bytes go to disk as if memory were full, and where
    /// they may not, the sender waits (`memory_blocked`). An unlimited
    /// budget is not kept, so it costs nothing.
    pub fn with_memory_budget(mut self, budget: &Arc<Budget>) -> Self {
        if budget.is_limited() {
            self.mem_budget = Some(budget.clone());
        }
        self
    }

    /// Bytes held, in memory and on disk.
    pub fn len(&self) -> u64 {
        self.memory_len() as u64 + self.file_backlog()
    }

    /// Bytes held in memory: the `Vec`'s or the pipe's.
    fn memory_len(&self) -> usize {
        self.mem_len + self.pipe.as_ref().map_or(0, Pipe::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes waiting on disk.
    pub fn file_backlog(&self) -> u64 {
        self.file.backlog()
    }

    /// Bytes ever appended to the spill file.
    pub fn spilled_total(&self) -> u64 {
        self.file.spilled_total()
    }

    /// Has any byte gone to disk yet?
    pub fn has_spilled(&self) -> bool {
        self.spilled_total() > 0
    }

    pub fn memory_limit(&self) -> usize {
        self.mem_limit
    }

    /// `--max-memory`, if this buffer is charged to one.
    pub fn memory_budget_limit(&self) -> Option<u64> {
        self.mem_budget.as_ref().and_then(|b| b.limit())
    }

    pub fn temp_dir(&self) -> &Path {
        self.file.temp_dir()
    }

    /// Can another byte be taken without breaking a limit? When false the
    /// caller stops reading from the sender: that is the backpressure.
    pub fn has_room(&self) -> bool {
        self.memory_room() > 0 || self.file.room() > 0
    }

    /// Room for new bytes in memory. Zero while anything is on disk, since
    /// bytes in memory must stay older than bytes in the file, while the
    /// pipe has no free slot, and while this buffer holds no memory and
    /// `--max-memory` has none to give.
    fn memory_room(&self) -> usize {
        let budget_full = !self.mem_charged
            && self
                .mem_budget
                .as_ref()
                .is_some_and(|b| !b.has_room(self.mem_limit as u64));
        if budget_full {
            0
        } else {
            self.memory_room_unbudgeted()
        }
    }

    /// `memory_room`, `--max-memory` aside.
    fn memory_room_unbudgeted(&self) -> usize {
        if self.file_backlog() > 0 || self.pipe.as_ref().is_some_and(Pipe::is_full) {
            0
        } else {
            self.mem_limit - self.memory_len()
        }
    }

    /// Did this buffer first spill because `--max-memory` had no room
    /// (rather than because its own memory was full)?
    pub fn first_spill_for_budget(&self) -> bool {
        self.first_spill_for_budget
    }

    /// About to put bytes on disk: note why, if they are the first.
    fn note_spill(&mut self) {
        if self.spilled_total() == 0 {
            self.first_spill_for_budget = self.memory_room_unbudgeted() > 0;
        }
    }

    /// Is the sender held back by `--max-memory` alone? Then room comes
    /// from other connections giving memory back, which no event on this
    /// one's sockets will tell: the owner must look again later.
    pub fn memory_blocked(&self) -> bool {
        self.mem_budget.is_some()
            && !self.mem_charged
            && self.file_backlog() == 0
            && !self.has_room()
    }

    /// Make sure this buffer's memory is charged before bytes go into it:
    /// false if `--max-memory` has no room for it.
    fn claim_memory(&mut self) -> bool {
        match &self.mem_budget {
            Some(budget) if !self.mem_charged => {
                self.mem_charged = budget.charge_all(self.mem_limit as u64);
                self.mem_charged
            }
            _ => true,
        }
    }

    /// Charge this buffer's memory whatever the budget says: for bytes
    /// that must be in memory to make progress at all (read back from
    /// disk to be looked at; our own bytes when disk may not take them).
    fn force_memory(&mut self) {
        if let Some(budget) = self.mem_budget.as_ref().filter(|_| !self.mem_charged) {
            budget.charge_forced(self.mem_limit as u64);
            self.mem_charged = true;
        }
    }

    /// Give the charge back once the buffer holds no memory.
    fn settle_memory(&mut self) {
        let holds = !self.mem.is_empty() || self.pipe.as_ref().is_some_and(|p| p.len() > 0);
        if self.mem_charged && !holds {
            if let Some(budget) = &self.mem_budget {
                budget.release(self.mem_limit as u64);
            }
            self.mem_charged = false;
            // size_memory grows it again when it is taken anew with room.
            self.mem_limit = self.mem_base;
        }
    }

    /// Memory is full and the file has room: the next byte needs disk.
    pub fn needs_disk(&self) -> bool {
        self.memory_room() == 0 && self.file.room() > 0
    }

    /// Why the buffer could not get disk space last time it tried, if it
    /// has not succeeded since.
    pub fn disk_blocked(&self) -> Option<&str> {
        self.file.blocked()
    }

    /// Disk this buffer holds now: reserved or written, not yet released.
    pub fn disk_charge(&self) -> u64 {
        self.file.disk_charge()
    }

    /// Did the last `fill` read fewer bytes than it had room for? From a
    /// stream socket, that means its receive queue was empty after the
    /// read (see `relay::Sender::short_read_drains`).
    pub fn last_read_was_short(&self) -> bool {
        self.short_read
    }

    /// Take at most one read's worth of bytes from `src`. `scratch` carries
    /// bytes bound for the file; its length caps what one read may take.
    pub fn fill_from<R: Read>(&mut self, src: &mut R, scratch: &mut [u8]) -> Fill {
        self.fill(src, None, scratch, usize::MAX)
    }

    /// `fill_from`, taking at most `max` bytes, where `fd` is `src`'s file
    /// descriptor if it has one: once the stream is bulk, bytes bound for
    /// memory are then spliced into a pipe rather than read.
    pub fn fill<R: Read>(
        &mut self,
        src: &mut R,
        fd: Option<RawFd>,
        scratch: &mut [u8],
        max: usize,
    ) -> Fill {
        debug_assert!(self.has_room(), "fill called with no room");
        debug_assert!(max > 0, "fill of nothing");
        self.short_read = false;
        self.size_memory();
        let room = self.memory_room();
        if room > 0 && self.claim_memory() {
            let want = room.min(max);
            if let Some(fd) = fd.filter(|_| self.splice == Splice::Yes && self.mem_len == 0) {
                if let Some(done) = self.splice_in(fd, want) {
                    self.settle_memory();
                    self.check_invariants();
                    return done;
                }
            }
            if let Err(e) = self.pipe_to_memory() {
                return Fill::SpillFailed(e);
            }
            self.make_tail_room();
            let start = self.mem_head + self.mem_len;
            let end = start + (self.mem_limit - start).min(max);
            return match read_step(src, &mut self.mem[start..end]) {
                Fill::Took(n) => {
                    self.short_read = start + n < end;
                    self.mem_len += n;
                    if self.mem_len == self.mem_limit && self.splice == Splice::NotYet {
                        // The sender had a whole memory's worth waiting.
                        self.splice = Splice::Yes;
                    }
                    self.check_invariants();
                    Fill::Took(n)
                }
                other => {
                    // Nothing came: an empty buffer keeps no memory
                    // charged while its sender is quiet.
                    if self.mem_budget.is_some() && self.mem_len == 0 && self.file_backlog() == 0 {
                        self.free_mem();
                    }
                    other
                }
            };
        }
        if self.file.room() == 0 {
            // `--max-memory` had no room, and disk may not take it.
            return Fill::Full;
        }
        self.note_spill();
        let want = self.file.room().min(scratch.len() as u64).min(max as u64) as usize;
        let want = match self.file.make_room(want) {
            Ok(n) => n,
            Err(cause) => return Fill::NoDisk(cause),
        };
        match read_step(src, &mut scratch[..want]) {
            Fill::Took(n) => match self.file.append(&scratch[..n]) {
                Ok(()) => {
                    self.short_read = n < want;
                    if self.splice == Splice::NotYet {
                        self.splice = Splice::Yes;
                    }
                    self.check_invariants();
                    Fill::Took(n)
                }
                Err(e) => Fill::SpillFailed(e),
            },
            other => other,
        }
    }

    /// Put `bytes` of our own at the tail (a head we wrote, a decoded body,
    /// a canned answer), by the same ladder as `fill`: memory while it has
    /// room, then disk. Takes what fits now: `Took(n)` with `n` possibly
    /// short of `bytes.len()`, or why nothing could be taken.
    pub fn push(&mut self, bytes: &[u8]) -> Fill {
        if bytes.is_empty() {
            return Fill::Took(0);
        }
        // Memory while it has room; disk when the budget has none; memory
        // all the same when disk may not take them: our bytes are a head
        // or an answer the exchange cannot go on without, and one buffer
        // can overdraw `--max-memory` by one `--memory-buffer` at most.
        let to_memory = self.memory_room_unbudgeted() > 0
            && (self.claim_memory()
                || self.file.room() == 0 && {
                    self.force_memory();
                    true
                });
        if to_memory {
            return self.push_to_memory(bytes);
        }
        if self.file.room() == 0 {
            return Fill::Full;
        }
        let want = self.file.room().min(bytes.len() as u64) as usize;
        match self.file.make_room(want) {
            Ok(n) => {
                self.note_spill();
                match self.file.append(&bytes[..n]) {
                    Ok(()) => Fill::Took(n),
                    Err(e) => Fill::SpillFailed(e),
                }
            }
            // Our bytes cannot wait for disk: memory all the same while
            // nothing is on disk (so nothing is overtaken). Disk was not
            // needed after all: no "cannot spill" for this.
            Err(_) if self.memory_room_unbudgeted() > 0 => {
                self.file.clear_blocked();
                self.force_memory();
                self.push_to_memory(bytes)
            }
            Err(cause) => Fill::NoDisk(cause),
        }
    }

    /// `push` into memory, whose room (and charge) the caller saw to.
    fn push_to_memory(&mut self, bytes: &[u8]) -> Fill {
        if let Err(e) = self.pipe_to_memory() {
            return Fill::SpillFailed(e);
        }
        self.make_tail_room();
        let start = self.mem_head + self.mem_len;
        let n = (self.mem_limit - start).min(bytes.len());
        self.mem[start..start + n].copy_from_slice(&bytes[..n]);
        self.mem_len += n;
        self.check_invariants();
        Fill::Took(n)
    }

    /// The oldest bytes held, without taking them: as many as are in
    /// memory in one piece (bytes in the pipe, or on disk with memory
    /// empty, are brought into memory first). Empty when nothing is held.
    /// A buffer looked into is never spliced again, since a pipe cannot be
    /// looked into.
    pub fn peek(&mut self) -> io::Result<&[u8]> {
        self.splice = Splice::Never;
        self.pipe_to_memory()?;
        if self.mem_len == 0 && self.file_backlog() > 0 {
            self.take_from_file()?;
        }
        Ok(&self.mem[self.mem_head..self.mem_head + self.mem_len])
    }

    /// Drop the oldest `n` bytes, which `peek` showed.
    pub fn consume(&mut self, n: usize) {
        assert!(n <= self.mem_len, "consumed more than was peeked");
        self.mem_head += n;
        self.mem_len -= n;
        self.after_memory_drained();
        self.check_invariants();
    }

    /// Change how much may wait on disk from now on (0: nothing more goes
    /// to disk, and a full memory means backpressure).
    pub fn set_spill_limit(&mut self, limit: u64) {
        self.file.set_limit(limit);
    }

    /// Never use a pipe for this buffer's memory: its bytes are to be
    /// looked at or sent more than once (`peek`, `write_from`).
    pub fn no_splice(&mut self) {
        debug_assert!(self.pipe.is_none(), "no_splice after a pipe was made");
        self.splice = Splice::Never;
    }

    /// Give `dst` bytes held, starting `offset` bytes after the oldest,
    /// without taking them: they stay held, so they can be sent again (a
    /// request replayed on another connection). Only for a buffer that is
    /// not spliced (`no_splice`) and not filled meanwhile.
    pub fn write_from<W: Write>(&mut self, dst: &mut W, fd: Option<RawFd>, offset: u64) -> Drain {
        debug_assert!(self.pipe.as_ref().is_none_or(|p| p.len() == 0));
        if offset < self.mem_len as u64 {
            let from = self.mem_head + offset as usize;
            return write_step(dst, &self.mem[from..self.mem_head + self.mem_len]);
        }
        let in_file = offset - self.mem_len as u64;
        if in_file >= self.file_backlog() {
            return Drain::Empty;
        }
        if let Some(done) = fd.and_then(|fd| self.file.send_at(fd, in_file)) {
            return done;
        }
        let mut chunk = [0u8; 16 * 1024];
        match self.file.read_at(in_file, &mut chunk) {
            Ok(n) => write_step(dst, &chunk[..n]),
            Err(e) => Drain::SpillFailed(e),
        }
    }

    /// Splice up to `want` bytes from the socket `fd` into the pipe (made on
    /// first use). `None` if the kernel will not (no pipe to be had, or
    /// splicing unsupported): splicing stops for good and the caller reads
    /// instead.
    fn splice_in(&mut self, fd: RawFd, want: usize) -> Option<Fill> {
        // Memory grew past what the (empty) pipe was made for: a new one.
        if self
            .pipe
            .as_ref()
            .is_some_and(|p| p.memory() < self.mem_limit && p.len() == 0)
        {
            self.pipe = None;
        }
        if self.pipe.is_none() {
            match Pipe::new(self.mem_limit) {
                Ok(Some(pipe)) => self.pipe = Some(pipe),
                Ok(None) if self.mem_limit > self.mem_base => {
                    log::debug!("no pipe as large as memory_buffer_max to be had; not growing");
                    self.stop_growing();
                    return self.splice_in(fd, want.min(self.mem_base));
                }
                Ok(None) => {
                    log::debug!("no pipe as large as memory_buffer to be had; reading instead");
                    self.splice = Splice::Never;
                    return None;
                }
                Err(e) => {
                    log::debug!("cannot make a pipe ({e}); reading instead");
                    self.splice = Splice::Never;
                    return None;
                }
            }
        }
        let pipe = self.pipe.as_mut().expect("made above");
        match pipe.splice_from(fd, want) {
            Ok(0) => Some(Fill::Eof),
            Ok(n) => Some(Fill::Took(n)),
            // The pipe knows whether it was out of slots or the socket
            // had nothing (see `Pipe::splice_from`).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(if pipe.is_full() {
                Fill::Full
            } else {
                Fill::WouldBlock
            }),
            Err(e) if is_unsupported(&e) => {
                log::debug!("splice from a socket refused ({e}); reading instead");
                self.splice = Splice::Never;
                None
            }
            // The socket's own error, and the only report of it: the call
            // consumed it, and a read now would say EOF.
            Err(e) => Some(Fill::SourceFailed(e)),
        }
    }

    /// Move what the pipe holds into `mem`, so that plain reads and writes
    /// can carry on in order: when splicing stops, or the other end has no
    /// fd. Reading our own pipe can only fail if the kernel broke it.
    fn pipe_to_memory(&mut self) -> io::Result<()> {
        if self.pipe.as_ref().is_none_or(|p| p.len() == 0) {
            return Ok(());
        }
        debug_assert_eq!(self.mem_len, 0, "memory is a pipe or a Vec, never both");
        self.ensure_mem();
        let pipe = self.pipe.as_mut().expect("checked above");
        let n = pipe
            .read_all_into(&mut self.mem)
            .map_err(|e| io::Error::other(format!("reading back the memory pipe: {e}")))?;
        self.mem_head = 0;
        self.mem_len = n;
        Ok(())
    }

    /// Give at most one write's worth of the oldest bytes to `dst`.
    pub fn drain_into<W: Write>(&mut self, dst: &mut W) -> Drain {
        self.drain(dst, None, None)
    }

    /// `drain_into`, where `fd` is `dst`'s file descriptor if it has one
    /// (bytes in a pipe are then spliced out, bytes on disk sent straight
    /// from the page cache), and where, while at least `unit` bytes are
    /// held, only whole multiples of it are handed over and the rest kept
    /// for the next write. The caller passes the receiver's segment size
    /// when more bytes are about to arrive: a write that ends in a sliver
    /// of a segment costs a packet of its own (the sockets have Nagle
    /// off), which on loopback, where a segment is 64KiB, doubles the
    /// packets of a bulk transfer.
    pub fn drain<W: Write>(
        &mut self,
        dst: &mut W,
        fd: Option<RawFd>,
        unit: Option<usize>,
    ) -> Drain {
        if let Some(pipe) = self.pipe.as_mut().filter(|p| p.len() > 0) {
            if let Some(fd) = fd {
                match pipe.splice_to(fd, whole(pipe.len(), unit)) {
                    Ok(n) => {
                        self.settle_memory();
                        self.check_invariants();
                        return Drain::Gave(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drain::WouldBlock,
                    Err(e) if is_unsupported(&e) => {
                        log::debug!("splice to a socket refused ({e}); writing instead");
                        self.splice = Splice::Never;
                    }
                    Err(e) => return Drain::SinkFailed(e),
                }
            }
            if let Err(e) = self.pipe_to_memory() {
                return Drain::SpillFailed(e);
            }
        }
        if self.mem_len == 0 {
            if self.file_backlog() == 0 {
                return Drain::Empty;
            }
            if let Some(done) = fd.and_then(|fd| self.file.send_head(fd, unit)) {
                // An emptied buffer holds no memory (nor its charge).
                self.after_memory_drained();
                self.check_invariants();
                return done;
            }
            if let Err(e) = self.take_from_file() {
                return Drain::SpillFailed(e);
            }
        }
        // Memory must empty for splicing to begin: write it all this once.
        let unit = unit.filter(|_| !(self.splice == Splice::Yes && fd.is_some()));
        let len = whole(self.mem_len, unit);
        let head = &self.mem[self.mem_head..self.mem_head + len];
        loop {
            return match dst.write(head) {
                Ok(0) => Drain::SinkFailed(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.mem_head += n;
                    self.mem_len -= n;
                    self.after_memory_drained();
                    self.check_invariants();
                    Drain::Gave(n)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Drain::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Drain::SinkFailed(e),
            };
        }
    }

    /// Bytes left memory: rewind when it is empty, and give the buffer
    /// back when nothing at all is held (an idle connection holds none).
    fn after_memory_drained(&mut self) {
        if self.mem_len == 0 {
            self.mem_head = 0;
            if self.file_backlog() == 0 {
                self.free_mem();
            }
        }
    }

    /// Drop everything held (the receiver is gone) and free the disk space.
    /// Returns how many bytes were dropped.
    pub fn discard(&mut self) -> u64 {
        let dropped = self.len();
        self.mem_head = 0;
        self.mem_len = 0;
        self.pipe = None;
        self.free_mem();
        self.file.close();
        dropped
    }

    /// Has memory been a pipe? (Tests check that they took that path.)
    #[cfg(test)]
    pub(crate) fn spliced(&self) -> bool {
        self.pipe.is_some()
    }

    /// Memory is allocated on first use (an idle connection holds none).
    /// Under `--max-memory` it bypasses the pool, whose spare buffers
    /// would be memory the budget does not see.
    fn ensure_mem(&mut self) {
        if self.mem.is_empty() {
            self.mem = if self.mem_budget.is_some() {
                buffer_pool::take_unpooled(self.mem_limit)
            } else {
                buffer_pool::take(self.mem_limit)
            };
        }
    }

    /// Let the `Vec` go (to the pool, or under `--max-memory` to malloc),
    /// and with it the charge if the pipe holds nothing either.
    fn free_mem(&mut self) {
        let mem = std::mem::take(&mut self.mem);
        if self.mem_budget.is_some() {
            buffer_pool::give_unpooled(mem);
        } else {
            buffer_pool::give(mem);
        }
        self.settle_memory();
    }

    /// Make the free memory after the held bytes worth reading into:
    /// allocate on first use; slide the held bytes to the front only when
    /// more than half the free room is stuck before them. Sliding on every
    /// read would copy up to `--memory-buffer` bytes per read whenever a
    /// receiver takes part of what is held, the common case.
    fn make_tail_room(&mut self) {
        if self.mem.is_empty() {
            self.ensure_mem();
            return;
        }
        let tail = self.mem_limit - (self.mem_head + self.mem_len);
        let room = self.mem_limit - self.mem_len;
        if tail < room / 2 || tail == 0 {
            self.mem
                .copy_within(self.mem_head..self.mem_head + self.mem_len, 0);
            self.mem_head = 0;
        }
    }

    /// Move the oldest bytes of the file into (empty) memory.
    fn take_from_file(&mut self) -> io::Result<()> {
        debug_assert_eq!(self.mem_len, 0);
        self.force_memory();
        self.ensure_mem();
        let n = self.file.take_head(&mut self.mem)?;
        self.mem_head = 0;
        self.mem_len = n;
        self.check_invariants();
        Ok(())
    }

    fn check_invariants(&self) {
        debug_assert!(self.memory_len() <= self.mem_limit, "memory over budget");
        debug_assert!(
            self.mem_len == 0 || self.pipe.as_ref().is_none_or(|p| p.len() == 0),
            "memory is a pipe or a Vec, never both"
        );
        debug_assert!(self.mem_head + self.mem_len <= self.mem.len().max(self.mem_len));
    }
}

impl Drop for SpillBuffer {
    fn drop(&mut self) {
        self.pipe = None;
        self.free_mem();
    }
}

/// `len`, or its largest multiple of `unit` if that is not zero.
fn whole(len: usize, unit: Option<usize>) -> usize {
    match unit {
        Some(unit) if unit > 0 && len >= unit => len / unit * unit,
        _ => len,
    }
}

/// One `write`, retried on EINTR, with its result put in `Drain` terms.
fn write_step<W: Write>(dst: &mut W, bytes: &[u8]) -> Drain {
    loop {
        return match dst.write(bytes) {
            Ok(0) => Drain::SinkFailed(io::ErrorKind::WriteZero.into()),
            Ok(n) => Drain::Gave(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Drain::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Drain::SinkFailed(e),
        };
    }
}

/// One `read`, retried on EINTR, with its result put in `Fill` terms.
fn read_step<R: Read>(src: &mut R, into: &mut [u8]) -> Fill {
    debug_assert!(!into.is_empty());
    loop {
        return match src.read(into) {
            Ok(0) => Fill::Eof,
            Ok(n) => Fill::Took(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Fill::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Fill::SourceFailed(e),
        };
    }
}

/// Check once, at start, that spill files can be made in `dir`, so a bad
/// `--temp-dir` is a start-up error and not a surprise on the first spill.
pub fn check_temp_dir(dir: &Path) -> io::Result<PathBuf> {
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a directory",
        ));
    }
    let mut probe = tempfile::tempfile_in(dir)?;
    probe.write_all(b"x")?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::file::{BLOCK, RESERVE_STEP};
    use super::zerocopy::largest_folio;
    use super::*;
    use std::collections::VecDeque;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;

    /// xorshift64*: deterministic, seedable, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A sender that offers a numbered byte stream in random chunk sizes,
    /// sometimes with nothing ready or an EINTR.
    struct Sender<'a> {
        rng: &'a mut Rng,
        next_byte: u64,
        sent: &'a mut VecDeque<u8>,
    }
    impl Read for Sender<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.rng.below(10) {
                0 => return Err(io::ErrorKind::WouldBlock.into()),
                1 => return Err(io::ErrorKind::Interrupted.into()),
                _ => {}
            }
            let n = (1 + self.rng.below(buf.len() as u64)) as usize;
            for b in &mut buf[..n] {
                *b = (self.next_byte.wrapping_mul(131) >> 3) as u8;
                self.sent.push_back(*b);
                self.next_byte += 1;
            }
            Ok(n)
        }
    }

    /// A receiver that takes random amounts, sometimes none.
    struct Receiver<'a> {
        rng: &'a mut Rng,
        got: Vec<u8>,
    }
    impl Write for Receiver<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match self.rng.below(10) {
                0 => return Err(io::ErrorKind::WouldBlock.into()),
                1 => return Err(io::ErrorKind::Interrupted.into()),
                _ => {}
            }
            let n = (1 + self.rng.below(buf.len() as u64)) as usize;
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn temp_dir() -> (tempfile::TempDir, Arc<Path>) {
        let dir = tempfile::tempdir().unwrap();
        let path: Arc<Path> = dir.path().into();
        (dir, path)
    }

    impl Fill {
        fn took(&self) -> usize {
            match self {
                Fill::Took(n) => *n,
                other => panic!("expected Took, got {other:?}"),
            }
        }
    }

    fn unlimited() -> Arc<Budget> {
        Arc::new(Budget::new(None))
    }

    fn allocated(buf: &SpillBuffer) -> u64 {
        buf.file
            .file()
            .map_or(0, |f| f.metadata().unwrap().blocks() * 512)
    }

    /// Random interleavings of fill and drain against a plain queue: order
    /// and content preserved, limits kept, the file empty whenever the
    /// buffer is drained.
    #[test]
    fn matches_a_plain_queue_under_random_interleavings() {
        let (_dir, path) = temp_dir();
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mem_limit = 1 + rng.below(300) as usize;
            let spill_limit = rng.below(5000);
            let mut buf = SpillBuffer::new(mem_limit, spill_limit, path.clone(), unlimited());
            let mut model: VecDeque<u8> = VecDeque::new();
            let mut scratch = vec![0u8; 1 + rng.below(700) as usize];
            let mut delivered = Vec::new();
            let mut expected = Vec::new();
            let mut boundary_crossings = 0;
            // Phases that mostly fill, then mostly drain, so the buffer
            // swings between empty and full, crossing the memory/file line.
            let mut filling = true;
            for _ in 0..6000 {
                if filling && (!buf.has_room() || rng.below(300) == 0) {
                    filling = false;
                } else if !filling && buf.is_empty() {
                    filling = true;
                }
                let was_on_disk = buf.file_backlog() > 0;
                let mut op_rng = Rng(rng.next() | 1);
                let fill = filling && rng.below(10) < 8;
                if fill && buf.has_room() {
                    let mut src = Sender {
                        rng: &mut op_rng,
                        next_byte: expected.len() as u64 + model.len() as u64,
                        sent: &mut model,
                    };
                    match buf.fill_from(&mut src, &mut scratch) {
                        Fill::Took(_) | Fill::WouldBlock => {}
                        other => panic!("seed {seed}: unexpected {other:?}"),
                    }
                } else {
                    // Sometimes whole segments only, as a pump does
                    // while the sender has more.
                    let unit = match rng.below(3) {
                        0 => Some(1 + rng.below(400) as usize),
                        _ => None,
                    };
                    let mut dst = Receiver {
                        rng: &mut op_rng,
                        got: Vec::new(),
                    };
                    match buf.drain(&mut dst, None, unit) {
                        Drain::Gave(_) | Drain::WouldBlock | Drain::Empty => {}
                        other => panic!("seed {seed}: unexpected {other:?}"),
                    }
                    for _ in &dst.got {
                        expected.push(model.pop_front().expect("gave more than was put in"));
                    }
                    delivered.extend_from_slice(&dst.got);
                }
                assert_eq!(buf.len(), model.len() as u64, "seed {seed}: length");
                assert!(buf.mem_len <= mem_limit, "seed {seed}: memory over budget");
                assert!(
                    buf.file_backlog() <= spill_limit,
                    "seed {seed}: over max-spill"
                );
                // Disk use is what is charged: the backlog plus at most a
                // reservation step ahead and a punch step behind.
                assert!(
                    allocated(&buf) <= buf.disk_charge(),
                    "seed {seed}: more on disk than charged"
                );
                assert!(
                    buf.disk_charge()
                        <= buf.file_backlog() + RESERVE_STEP + largest_folio() + BLOCK,
                    "seed {seed}: charge {} for a backlog of {}",
                    buf.disk_charge(),
                    buf.file_backlog()
                );
                if was_on_disk != (buf.file_backlog() > 0) {
                    boundary_crossings += 1;
                }
            }
            assert_eq!(delivered, expected, "seed {seed}: bytes differ");
            if spill_limit > 0 {
                assert!(
                    boundary_crossings >= 6,
                    "seed {seed}: only {boundary_crossings} memory/file crossings (mem {mem_limit}, spill {spill_limit}, scratch {})",
                    scratch.len()
                );
            }
        }
    }

    /// A protocol layer's view: bytes filled from a sender, pushed by us,
    /// looked at with `peek` and dropped with `consume`, interleaved with
    /// drains at random, memory small so that the file is crossed often:
    /// the same queue as a plain `VecDeque`, and `fill` never takes more
    /// than its `max`.
    #[test]
    fn peek_consume_and_push_keep_the_queue_in_order() {
        let (_dir, path) = temp_dir();
        for seed in 1..=30u64 {
            let mut rng = Rng(seed.wrapping_mul(0xA076_1D64_78BD_642F) | 1);
            let mem_limit = 1 + rng.below(200) as usize;
            let mut buf = SpillBuffer::new(mem_limit, 1 << 20, path.clone(), unlimited());
            let mut model: VecDeque<u8> = VecDeque::new();
            let mut scratch = vec![0u8; 1 + rng.below(500) as usize];
            let mut next = 0u64;
            let mut peeked = 0;
            for _ in 0..4000 {
                let mut op_rng = Rng(rng.next() | 1);
                match rng.below(5) {
                    0 if buf.has_room() => {
                        let max = 1 + rng.below(300) as usize;
                        let before = model.len();
                        let mut src = Sender {
                            rng: &mut op_rng,
                            next_byte: next,
                            sent: &mut model,
                        };
                        match buf.fill(&mut src, None, &mut scratch, max) {
                            Fill::Took(n) => assert!(n <= max, "seed {seed}: took {n} > {max}"),
                            Fill::WouldBlock => {}
                            other => panic!("seed {seed}: {other:?}"),
                        }
                        next += (model.len() - before) as u64;
                    }
                    1 if buf.has_room() => {
                        let len = rng.below(400) as usize;
                        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                        match buf.push(&bytes) {
                            Fill::Took(n) => model.extend(&bytes[..n]),
                            other => panic!("seed {seed}: {other:?}"),
                        }
                    }
                    2 => {
                        let head = buf.peek().unwrap().to_vec();
                        let expect: Vec<u8> = model.iter().take(head.len()).copied().collect();
                        assert_eq!(head, expect, "seed {seed}: peek shows the oldest bytes");
                        assert!(
                            model.is_empty() || !head.is_empty(),
                            "seed {seed}: peek showed nothing with bytes held"
                        );
                        let k = if head.is_empty() {
                            0
                        } else {
                            rng.below(head.len() as u64 + 1) as usize
                        };
                        buf.consume(k);
                        model.drain(..k);
                        peeked += 1;
                    }
                    _ => {
                        let mut dst = Receiver {
                            rng: &mut op_rng,
                            got: Vec::new(),
                        };
                        match buf.drain(&mut dst, None, None) {
                            Drain::Gave(_) | Drain::WouldBlock | Drain::Empty => {}
                            other => panic!("seed {seed}: {other:?}"),
                        }
                        let expect: Vec<u8> = model.drain(..dst.got.len()).collect();
                        assert_eq!(dst.got, expect, "seed {seed}: drained out of order");
                    }
                }
                assert_eq!(buf.len(), model.len() as u64, "seed {seed}: length");
            }
            assert!(peeked > 100, "seed {seed}");
        }
    }

    #[test]
    fn the_file_is_truncated_when_the_backlog_drains() {
        let (_dir, path) = temp_dir();
        let mut buf = SpillBuffer::new(16, 1 << 20, path, unlimited());
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut src = &data[..];
        let mut scratch = vec![0u8; 8192];
        while !src.is_empty() {
            assert!(matches!(
                buf.fill_from(&mut src, &mut scratch),
                Fill::Took(_)
            ));
        }
        assert!(buf.has_spilled());
        assert!(allocated(&buf) >= 90_000, "the backlog is on disk");
        let mut out = Vec::new();
        while let Drain::Gave(_) = buf.drain_into(&mut out) {}
        assert_eq!(out, data);
        let file = buf.file.file().expect("the file stays open for reuse");
        assert_eq!(file.metadata().unwrap().len(), 0, "truncated");
        assert_eq!(allocated(&buf), 0);
        assert_eq!(buf.spilled_total(), 100_000 - 16);
    }

    /// A stream that never lets the file empty: the drained head is punched
    /// out, so disk use follows the backlog and not the bytes ever spilled.
    #[test]
    fn a_file_that_never_empties_gives_back_its_drained_head() {
        let (_dir, path) = temp_dir();
        let backlog = 256 * 1024u64;
        let mut buf = SpillBuffer::new(4096, 1 << 30, path, unlimited());
        let chunk = vec![7u8; 64 * 1024];
        let mut scratch = vec![0u8; 64 * 1024];
        let mut out: Vec<u8> = Vec::new();
        let mut max_alloc = 0;
        for _ in 0..512 {
            // Keep the backlog at about 256KiB while 32MiB pass through.
            let mut src = &chunk[..];
            while !src.is_empty() {
                buf.fill_from(&mut src, &mut scratch);
            }
            while buf.len() > backlog {
                out.clear();
                assert!(matches!(buf.drain_into(&mut out), Drain::Gave(_)));
            }
            max_alloc = max_alloc.max(allocated(&buf));
        }
        assert!(buf.spilled_total() > 30 << 20);
        if buf.file.can_punch {
            assert!(
                max_alloc <= backlog + 2 * largest_folio() + 2 * chunk.len() as u64,
                "disk use {max_alloc} tracks more than the backlog"
            );
        } else {
            eprintln!("this file system cannot punch holes; skipping the disk-use check");
        }
    }

    /// `sendfile` hands the socket page-cache pages, not copies: they sit
    /// in the send and (on loopback) the peer's receive queue until the
    /// peer reads them. Here the reader lags by megabytes at random while
    /// the file is drained into the socket, punched under a backlog that
    /// never empties, emptied (truncated) and written again from offset 0,
    /// in random cycles: every byte must arrive as it was sent. Punching
    /// part of a large folio, truncating to the middle of a page, or
    /// writing over an offset already sent would show up here as bytes
    /// changed in flight (zeros, or newer data).
    #[test]
    fn bytes_sent_from_the_file_survive_punching_truncating_and_rewriting() {
        use std::net::{TcpListener, TcpStream};
        let (_dir, path) = temp_dir();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut rx, _) = listener.accept().unwrap();
        tx.set_nonblocking(true).unwrap();
        rx.set_nonblocking(true).unwrap();
        let fd = tx.as_raw_fd();
        let mut rng = Rng(0x5EED_F11E);
        // Little memory, so nearly everything goes through the file.
        let mut buf = SpillBuffer::new(1024, 1 << 30, path, unlimited());
        let mut scratch = vec![0u8; 256 * 1024];
        let total: u64 = 96 << 20;
        let (mut sent, mut received) = (0u64, Vec::<u8>::with_capacity(total as usize));
        let mut read_buf = vec![0u8; 1 << 20];
        let byte = |i: u64| (i.wrapping_mul(0x9E37_79B9) >> 13) as u8;
        let (mut truncations, mut punched_max) = (0, 0);
        while (received.len() as u64) < total {
            // Phases: a burst of filling, a burst of sending, a burst of
            // reading; their sizes random, so the file empties sometimes
            // and sometimes not for many megabytes.
            match rng.below(3) {
                0 if sent < total => {
                    let want = (1 + rng.below(4 << 20)).min(total - sent) as usize;
                    let bytes: Vec<u8> = (sent..sent + want as u64).map(byte).collect();
                    let mut src = &bytes[..];
                    while !src.is_empty() && buf.has_room() {
                        match buf.fill_from(&mut src, &mut scratch) {
                            Fill::Took(_) => {}
                            other => panic!("fill: {other:?}"),
                        }
                    }
                    sent += (want - src.len()) as u64;
                }
                1 => {
                    for _ in 0..rng.below(64) {
                        let was_on_disk = buf.file_backlog() > 0;
                        match buf.drain(&mut tx, Some(fd), None) {
                            Drain::Gave(_) => {}
                            Drain::WouldBlock | Drain::Empty => break,
                            other => panic!("drain: {other:?}"),
                        }
                        if was_on_disk && buf.file_backlog() == 0 {
                            truncations += 1;
                        }
                        punched_max = punched_max.max(buf.file.punched);
                    }
                }
                _ => {
                    for _ in 0..rng.below(8) {
                        match rx.read(&mut read_buf) {
                            Ok(n) => received.extend_from_slice(&read_buf[..n]),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => panic!("read: {e}"),
                        }
                    }
                }
            }
        }
        assert!(
            buf.file.can_sendfile,
            "sendfile was refused here: nothing tested"
        );
        let expected: Vec<u8> = (0..total).map(byte).collect();
        if received != expected {
            let at = received
                .iter()
                .zip(&expected)
                .take_while(|(a, b)| a == b)
                .count();
            panic!(
                "bytes changed in flight: first difference at {at} of {total} (got {}, expected {})",
                received[at], expected[at]
            );
        }
        assert!(
            truncations >= 3,
            "the file emptied only {truncations} times"
        );
        if buf.file.can_punch {
            assert!(punched_max > 0, "never punched");
        }
    }

    #[test]
    fn no_room_once_memory_and_spill_limit_are_full() {
        let (_dir, path) = temp_dir();
        let mut buf = SpillBuffer::new(10, 20, path, unlimited());
        let data = [1u8; 100];
        let mut src = &data[..];
        let mut scratch = [0u8; 64];
        while buf.has_room() {
            assert!(matches!(
                buf.fill_from(&mut src, &mut scratch),
                Fill::Took(_)
            ));
        }
        assert_eq!(buf.len(), 30);
        assert_eq!(buf.file_backlog(), 20);
        let mut out = Vec::new();
        assert!(matches!(buf.drain_into(&mut out), Drain::Gave(10)));
        assert!(
            !buf.has_room(),
            "memory is free but bytes are on disk: no overtaking"
        );
        assert!(matches!(buf.drain_into(&mut out), Drain::Gave(10)));
        assert!(buf.has_room());
    }

    #[test]
    fn an_unusable_temp_dir_stops_reading_without_losing_bytes() {
        let mut buf = SpillBuffer::new(
            4,
            100,
            Path::new("/nonexistent/spillway").into(),
            unlimited(),
        );
        let data = [1u8; 10];
        let mut src = &data[..];
        let mut scratch = [0u8; 64];
        assert!(matches!(
            buf.fill_from(&mut src, &mut scratch),
            Fill::Took(4)
        ));
        assert!(matches!(
            buf.fill_from(&mut src, &mut scratch),
            Fill::NoDisk(Some(_))
        ));
        assert_eq!(src.len(), 6, "nothing read that could not be kept");
        assert!(buf.disk_blocked().is_some());
    }

    /// Two buffers share a --max-disk budget: when it is spent, a buffer
    /// stops taking bytes without reading any; when the other drains, it
    /// goes on; and every byte charged is given back when they are dropped.
    #[test]
    fn a_shared_disk_budget_blocks_then_resumes_and_is_returned() {
        let (_dir, path) = temp_dir();
        let budget = Arc::new(Budget::new(Some(256 * 1024)));
        let mut a = SpillBuffer::new(1024, 1 << 30, path.clone(), budget.clone());
        let mut b = SpillBuffer::new(1024, 1 << 30, path, budget.clone());
        let data = vec![5u8; 4 << 20];
        let mut scratch = vec![0u8; 64 * 1024];
        let mut src_a = &data[..];
        let mut src_b = &data[..];
        let fill_until_blocked = |buf: &mut SpillBuffer, src: &mut &[u8], scratch: &mut [u8]| {
            for _ in 0..10_000 {
                match buf.fill_from(src, scratch) {
                    Fill::Took(_) => {}
                    Fill::NoDisk(None) => return,
                    other => panic!("{other:?}"),
                }
            }
            panic!("never blocked");
        };
        fill_until_blocked(&mut a, &mut src_a, &mut scratch);
        assert_eq!(
            b.fill_from(&mut src_b, &mut scratch).took(),
            1024,
            "memory first"
        );
        assert!(matches!(
            b.fill_from(&mut src_b, &mut scratch),
            Fill::NoDisk(None)
        ));
        assert_eq!(src_b.len(), data.len() - 1024, "nothing read while blocked");
        assert!(budget.used() <= 256 * 1024);
        assert_eq!(budget.used(), a.disk_charge() + b.disk_charge());
        let mut out = Vec::new();
        while let Drain::Gave(_) = a.drain_into(&mut out) {}
        assert_eq!(a.disk_charge(), 0, "drained: charge returned");
        fill_until_blocked(&mut b, &mut src_b, &mut scratch);
        assert!(b.file_backlog() > 128 * 1024, "b got the space a gave back");
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0, "every charge returned");
    }

    /// `--max-memory`: a buffer that cannot get memory spills at once, one
    /// that may not spill waits (`memory_blocked`) until another gives its
    /// memory back; our own bytes get through all the same; every charge
    /// is returned.
    #[test]
    fn a_memory_budget_spills_or_blocks_and_is_returned() {
        let (_dir, path) = temp_dir();
        let memory = Arc::new(Budget::new(Some(1024)));
        let make = |spill: u64| {
            SpillBuffer::new(1024, spill, path.clone(), unlimited()).with_memory_budget(&memory)
        };
        let (mut a, mut b, mut c) = (make(1 << 20), make(1 << 20), make(0));
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut scratch = vec![0u8; 64 * 1024];
        let (mut src_a, mut src_b) = (&data[..], &data[..]);
        assert_eq!(a.fill_from(&mut src_a, &mut scratch).took(), 1024);
        assert_eq!(memory.used(), 1024, "a holds the whole budget");
        assert_eq!(b.fill_from(&mut src_b, &mut scratch).took(), 4096);
        assert_eq!(
            b.file_backlog(),
            4096,
            "no memory to be had: straight to disk"
        );
        assert!(
            !c.has_room() && c.memory_blocked(),
            "c may not spill: it waits"
        );
        assert!(matches!(
            c.push(b"HTTP/1.1 100 Continue\r\n\r\n"),
            Fill::Took(25)
        ));
        assert_eq!(memory.used(), 2048, "our own bytes overdraw by one buffer");
        let mut out = Vec::new();
        while let Drain::Gave(_) = c.drain_into(&mut out) {}
        assert_eq!(out, b"HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(memory.used(), 1024, "c gave its memory back once empty");
        assert!(c.memory_blocked(), "still none to be had");
        let mut got_a = Vec::new();
        while let Drain::Gave(_) = a.drain_into(&mut got_a) {}
        assert_eq!(got_a, data[..1024]);
        assert_eq!(memory.used(), 0, "a drained: its charge returned");
        assert!(c.has_room() && !c.memory_blocked());
        let mut got_b = Vec::new();
        while let Drain::Gave(_) = b.drain_into(&mut got_b) {}
        assert_eq!(got_b, data, "read back from disk whole");
        drop((a, b, c));
        assert_eq!(memory.used(), 0, "every charge returned");
    }

    /// A direction that shows bulk grows its memory to `--memory-buffer-max`
    /// once memory is empty again, if the budget has room for it, and not
    /// otherwise; what it holds stays in order.
    #[test]
    fn bulk_grows_memory_when_the_budget_has_room() {
        let (_dir, path) = temp_dir();
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8).collect();
        let mut scratch = vec![0u8; 64 * 1024];
        for (limit, grown) in [(None, 8192), (Some(8192), 8192), (Some(4096), 1024)] {
            let memory = Arc::new(Budget::new(limit));
            let mut buf = SpillBuffer::new(1024, 1 << 20, path.clone(), unlimited())
                .with_memory_budget(&memory)
                .with_growth(8192);
            let mut got = Vec::new();
            // Small first: no bulk seen yet.
            assert_eq!(buf.fill_from(&mut &data[..100], &mut scratch).took(), 100);
            while let Drain::Gave(_) = buf.drain_into(&mut got) {}
            assert_eq!(
                buf.memory_limit(),
                1024,
                "{limit:?}: no growth without bulk"
            );
            let mut src_rest = &data[100..];
            assert_eq!(
                buf.fill_from(&mut src_rest, &mut scratch).took(),
                1024,
                "fills memory"
            );
            while let Drain::Gave(_) = buf.drain_into(&mut got) {}
            assert_eq!(
                buf.fill_from(&mut src_rest, &mut scratch).took(),
                grown,
                "{limit:?}"
            );
            while let Drain::Gave(_) = buf.drain_into(&mut got) {}
            assert!(got == data[..got.len()], "{limit:?}: out of order");
            drop(buf);
            assert_eq!(memory.used(), 0, "{limit:?}: all returned");
        }
    }

    /// Our own bytes (a head, a canned answer) into an empty buffer while
    /// `--max-memory` is spent and disk refuses too: memory all the same,
    /// never dropped. (Found by review: they were refused, and a caller
    /// pushing a head or a PROXY header lost it.)
    #[test]
    fn our_bytes_go_to_memory_when_the_budget_and_the_disk_refuse() {
        let (_dir, path) = temp_dir();
        let memory = Arc::new(Budget::new(Some(1024)));
        let no_disk = Arc::new(Budget::new(Some(0)));
        let mut a =
            SpillBuffer::new(1024, 1 << 20, path.clone(), unlimited()).with_memory_budget(&memory);
        let mut scratch = vec![0u8; 4096];
        assert_eq!(
            a.fill_from(&mut &[7u8; 4096][..], &mut scratch).took(),
            1024
        );
        let mut c = SpillBuffer::new(1024, 1 << 20, path, no_disk).with_memory_budget(&memory);
        let head = b"HTTP/1.1 200 OK\r\n\r\n";
        assert!(matches!(c.push(head), Fill::Took(19)));
        assert!(c.disk_blocked().is_none(), "disk was not needed after all");
        let mut out = Vec::new();
        while let Drain::Gave(_) = c.drain_into(&mut out) {}
        assert_eq!(out, head);
        assert_eq!(memory.used(), 1024, "c's overdraft returned once empty");
    }

    /// A grown buffer that empties asks for `--memory-buffer` again, not
    /// for the grown size, until it is taken anew: one that may not spill
    /// is not kept waiting for a whole `--memory-buffer-max` of room.
    #[test]
    fn a_grown_buffer_asks_for_its_base_again_once_empty() {
        let (_dir, path) = temp_dir();
        let memory = Arc::new(Budget::new(Some(9216)));
        let data = vec![7u8; 64 * 1024];
        let mut scratch = vec![0u8; 4096];
        let mut a = SpillBuffer::new(1024, 0, path.clone(), unlimited())
            .with_memory_budget(&memory)
            .with_growth(8192);
        let mut src = &data[..];
        let mut sink = Vec::new();
        assert_eq!(a.fill_from(&mut src, &mut scratch).took(), 1024);
        while let Drain::Gave(_) = a.drain_into(&mut sink) {}
        assert_eq!(a.fill_from(&mut src, &mut scratch).took(), 8192, "grown");
        while let Drain::Gave(_) = a.drain_into(&mut sink) {}
        let mut b = SpillBuffer::new(2048, 0, path, unlimited()).with_memory_budget(&memory);
        assert_eq!(b.fill_from(&mut src, &mut scratch).took(), 2048);
        assert!(
            a.has_room() && !a.memory_blocked(),
            "7168 free: enough for a's base"
        );
        assert_eq!(a.fill_from(&mut src, &mut scratch).took(), 1024);
    }

    /// A buffer whose file was sent with `sendfile` until empty gives its
    /// memory (and its charge) back, as one drained by writes does.
    #[test]
    fn a_buffer_emptied_by_sendfile_holds_no_memory() {
        use std::os::unix::net::UnixStream;
        let (_dir, path) = temp_dir();
        let memory = Arc::new(Budget::new(Some(1 << 20)));
        let data = vec![7u8; 8192];
        let mut scratch = vec![0u8; 4096];
        let mut buf =
            SpillBuffer::new(1024, 1 << 20, path, unlimited()).with_memory_budget(&memory);
        let mut src = &data[..];
        assert_eq!(buf.fill_from(&mut src, &mut scratch).took(), 1024);
        assert!(buf.fill_from(&mut src, &mut scratch).took() > 0);
        assert!(buf.file_backlog() > 0);
        let (mut tx, mut rx) = UnixStream::pair().unwrap();
        tx.set_nonblocking(true).unwrap();
        let fd = tx.as_raw_fd();
        let mut sent = 0;
        loop {
            match buf.drain(&mut tx, Some(fd), None) {
                Drain::Gave(n) => sent += n,
                Drain::Empty => break,
                other => panic!("{other:?}"),
            }
        }
        let mut got = vec![0u8; sent];
        rx.read_exact(&mut got).unwrap();
        assert!(got == data[..sent], "bytes differ");
        assert!(buf.is_empty() && buf.mem.is_empty() && !buf.mem_charged);
        assert_eq!(memory.used(), 0);
    }

    /// Buffers sharing a budget, filled, pushed into, looked into and
    /// drained at random: each the same queue as its model, the budget
    /// charged exactly for the buffers that hold memory, a sender never
    /// charged past the limit, and nothing charged once all are gone.
    #[test]
    fn buffers_sharing_a_memory_budget_match_their_models() {
        let (_dir, path) = temp_dir();
        for seed in 1..=30u64 {
            let mut rng = Rng(seed.wrapping_mul(0xD6E8_FEB8_6659_FD93) | 1);
            let mem_limit = 1 + rng.below(300) as usize;
            let limit = mem_limit as u64 * (1 + rng.below(3));
            let memory = Arc::new(Budget::new(Some(limit)));
            let mut bufs: Vec<SpillBuffer> = (0..4)
                .map(|i| {
                    let spill = if i == 3 { 0 } else { rng.below(4000) };
                    SpillBuffer::new(mem_limit, spill, path.clone(), unlimited())
                        .with_memory_budget(&memory)
                        .with_growth(mem_limit * (1 + rng.below(3) as usize))
                })
                .collect();
            let mut models: Vec<VecDeque<u8>> = vec![VecDeque::new(); 4];
            let mut next = [0u64; 4];
            let mut scratch = vec![0u8; 1 + rng.below(500) as usize];
            for _ in 0..4000 {
                let i = rng.below(4) as usize;
                let (buf, model) = (&mut bufs[i], &mut models[i]);
                match rng.below(5) {
                    0 | 1 if buf.has_room() => {
                        let was_charged = buf.mem_charged;
                        let mut op_rng = Rng(rng.next() | 1);
                        let mut src = Sender {
                            rng: &mut op_rng,
                            next_byte: next[i],
                            sent: model,
                        };
                        match buf.fill_from(&mut src, &mut scratch) {
                            Fill::Took(_) | Fill::WouldBlock | Fill::Full => {}
                            other => panic!("seed {seed}: unexpected {other:?}"),
                        }
                        next[i] = src.next_byte;
                        if !was_charged && buf.mem_charged {
                            assert!(memory.used() <= limit, "seed {seed}: a sender overdrew");
                        }
                    }
                    2 => {
                        let n = 1 + rng.below(40) as usize;
                        let bytes: Vec<u8> = (0..n as u64).map(|k| (next[i] + k) as u8).collect();
                        if let Fill::Took(k) = buf.push(&bytes) {
                            model.extend(&bytes[..k]);
                            next[i] += k as u64;
                        }
                    }
                    3 => {
                        let shown = buf.peek().unwrap().to_vec();
                        let k = rng.below(shown.len() as u64 + 1) as usize;
                        for byte in &shown[..k] {
                            assert_eq!(Some(*byte), model.pop_front(), "seed {seed}: peek");
                        }
                        buf.consume(k);
                    }
                    _ => {
                        let mut op_rng = Rng(rng.next() | 1);
                        let mut dst = Receiver {
                            rng: &mut op_rng,
                            got: Vec::new(),
                        };
                        match buf.drain_into(&mut dst) {
                            Drain::Gave(_) | Drain::WouldBlock | Drain::Empty => {}
                            other => panic!("seed {seed}: unexpected {other:?}"),
                        }
                        for byte in &dst.got {
                            assert_eq!(Some(*byte), model.pop_front(), "seed {seed}: drain");
                        }
                    }
                }
                assert_eq!(buf.len(), model.len() as u64, "seed {seed}: length");
                let charged: u64 = bufs
                    .iter()
                    .map(|b| {
                        let holds =
                            !b.mem.is_empty() || b.pipe.as_ref().is_some_and(|p| p.len() > 0);
                        assert_eq!(
                            b.mem_charged, holds,
                            "seed {seed}: charged iff holding memory"
                        );
                        assert!(b.mem_limit == b.mem_base || b.mem_limit == b.mem_max);
                        if b.mem_charged { b.mem_limit as u64 } else { 0 }
                    })
                    .sum();
                assert_eq!(
                    memory.used(),
                    charged,
                    "seed {seed}: budget and buffers agree"
                );
            }
            drop(bufs);
            assert_eq!(memory.used(), 0, "seed {seed}: every charge returned");
        }
    }

    #[test]
    fn check_temp_dir_rejects_files_and_missing_dirs() {
        assert!(check_temp_dir(Path::new("/nonexistent/spillway")).is_err());
        let file = tempfile::NamedTempFile::new().unwrap();
        assert!(check_temp_dir(file.path()).is_err());
        let dir = tempfile::tempdir().unwrap();
        check_temp_dir(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe left behind"
        );
    }
}
