//! The spill file: the part of a direction's backlog that waits on disk.
//!
//! An unnamed temporary file (`O_TMPFILE`, mode 0600), made on first need
//! in `--temp-dir`, holding the bytes `head .. tail`. It knows nothing of
//! the memory in front of it; `SpillBuffer` decides when bytes come here.
//!
//! Disk space is reserved (`fallocate`, keeping the file size) and charged
//! to the shared `Budget` *before* bytes are read from the sender, so
//! that when the disk is full, over quota or `--max-disk` is reached,
//! nothing has been read that could not be stored. Disk use follows the
//! backlog: when the file empties it is truncated to zero and both offsets
//! rewind; a file that never empties has its sent head released with
//! `FALLOC_FL_PUNCH_HOLE`, in whole `largest_folio()` steps (see
//! `zerocopy::largest_folio`: never part of a page a socket may still be
//! sending). Bytes are only appended past everything sent and the file is
//! only truncated to zero, so no page handed to a socket changes in flight.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use super::Drain;
use super::zerocopy::{self, largest_folio};
use crate::budget::Budget;
use crate::io_error::{is_file_read_error, is_unsupported};

/// Most bytes one `sendfile` may hand over. The page cache is not ours to
/// ration, but one call is one step of a pump's turn: this keeps a turn of
/// 32 steps near the 2MiB that memory-sized steps make, for fairness
/// between connections, while a slow receiver's socket takes what fits.
const SENDFILE_STEP: usize = 256 * 1024;

/// Disk is reserved ahead in steps of this size (within `--max-spill`),
/// so that a steady spill makes one `fallocate` per step, not per read.
pub const RESERVE_STEP: u64 = 1 << 20;

/// File systems allocate in blocks; a hole can only be punched in whole ones.
pub const BLOCK: u64 = 4096;

pub struct SpillFile {
    file: Option<File>,
    /// Offset of the oldest byte still on disk.
    head: u64,
    /// Offset one past the newest byte on disk.
    tail: u64,
    /// Offset below which the file's blocks have been released.
    pub(super) punched: u64,
    /// Block-aligned offset up to which disk is reserved and charged to the
    /// budget (`>= tail`); the charge is `reserved - punched`.
    reserved: u64,
    /// Cleared when the file system cannot reserve space ahead
    /// (`fallocate` unsupported); the budget is still charged.
    can_reserve: bool,
    /// Cleared when the file system refuses to punch holes; the file is
    /// then only reclaimed when it empties.
    pub(super) can_punch: bool,
    /// Cleared when `sendfile` is refused: the head is then read back into
    /// memory before it is written.
    pub(super) can_sendfile: bool,
    budget: Arc<Budget>,
    /// `--max-spill`: the most bytes waiting here.
    limit: u64,
    temp_dir: Arc<Path>,
    /// Bytes ever appended, for the close summary.
    spilled_total: u64,
    /// Why the last attempt to get disk space failed, until one succeeds.
    blocked: Option<String>,
}

impl SpillFile {
    pub fn new(limit: u64, temp_dir: Arc<Path>, budget: Arc<Budget>) -> SpillFile {
        SpillFile {
            file: None,
            head: 0,
            tail: 0,
            punched: 0,
            reserved: 0,
            can_reserve: true,
            can_punch: true,
            can_sendfile: true,
            budget,
            limit,
            temp_dir,
            spilled_total: 0,
            blocked: None,
        }
    }

    /// Bytes waiting here.
    pub fn backlog(&self) -> u64 {
        self.tail - self.head
    }

    /// Change `--max-spill` for what comes next (0: never spill). Not below
    /// what waits on disk now.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit.max(self.backlog());
    }

    /// Bytes that may still come before `--max-spill` is reached.
    pub fn room(&self) -> u64 {
        self.limit - self.backlog()
    }

    pub fn spilled_total(&self) -> u64 {
        self.spilled_total
    }

    pub fn temp_dir(&self) -> &Path {
        &self.temp_dir
    }

    pub fn blocked(&self) -> Option<&str> {
        self.blocked.as_deref()
    }

    /// The space `make_room` could not get was not needed after all.
    pub fn clear_blocked(&mut self) {
        self.blocked = None;
    }

    /// Disk held now: reserved or written, not yet released.
    pub fn disk_charge(&self) -> u64 {
        self.reserved - self.punched
    }

    /// Make sure up to `want` bytes past the tail have disk reserved and
    /// charged, making the file on first need: how many do (at least one),
    /// or why none can (`None`: `--max-disk` reached).
    pub fn make_room(&mut self, want: usize) -> Result<usize, Option<io::Error>> {
        let outcome = self.open().map_err(Some).and_then(|()| self.reserve(want));
        self.blocked = match &outcome {
            Ok(_) => None,
            Err(None) => Some("--max-disk reached".to_string()),
            Err(Some(e)) => Some(e.to_string()),
        };
        outcome
    }

    fn open(&mut self) -> io::Result<()> {
        if self.file.is_none() {
            self.file = Some(tempfile::tempfile_in(&*self.temp_dir)?);
        }
        Ok(())
    }

    fn reserve(&mut self, want: usize) -> Result<usize, Option<io::Error>> {
        let end = self.tail + want as u64;
        if end > self.reserved {
            // Ahead by a step, but never past what --max-spill allows.
            let ahead = (self.reserved + RESERVE_STEP).min(self.head + self.limit);
            let needed = end.max(ahead).div_ceil(BLOCK) * BLOCK - self.reserved;
            let granted = self.budget.charge_up_to(needed, BLOCK);
            if granted > 0 && self.can_reserve {
                let file = self.file.as_ref().expect("opened before reserving");
                match fallocate(file, libc::FALLOC_FL_KEEP_SIZE, self.reserved, granted) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        log::debug!("spill file: cannot reserve space here ({e}); writing without");
                        self.can_reserve = false;
                    }
                    Err(e) => {
                        self.budget.refund(granted);
                        return self.reserved_room().ok_or(Some(e));
                    }
                }
            }
            self.reserved += granted;
        }
        self.reserved_room().ok_or(None).map(|room| room.min(want))
    }

    /// Bytes reserved past the tail, if any.
    fn reserved_room(&self) -> Option<usize> {
        let room = self.reserved - self.tail;
        (room > 0).then_some(room.min(usize::MAX as u64) as usize)
    }

    /// Append bytes read into space `make_room` granted.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let file = self.file.as_ref().expect("opened before appending");
        file.write_all_at(bytes, self.tail)?;
        self.tail += bytes.len() as u64;
        self.spilled_total += bytes.len() as u64;
        self.check_invariants();
        Ok(())
    }

    /// Move the oldest bytes (as many as fit in `into`) out of the file.
    pub fn take_head(&mut self, into: &mut [u8]) -> io::Result<usize> {
        let n = self.backlog().min(into.len() as u64) as usize;
        let file = self.file.as_ref().expect("a backlog implies a file");
        file.read_exact_at(&mut into[..n], self.head)?;
        self.advance(n)?;
        Ok(n)
    }

    /// Hand the socket `fd` up to `SENDFILE_STEP` bytes of the head (whole
    /// multiples of `unit` if given) straight from the page cache. `None`
    /// if `sendfile` is refused: it is then not tried again, and the caller
    /// takes the head into memory and writes it.
    pub fn send_head(&mut self, fd: RawFd, unit: Option<usize>) -> Option<Drain> {
        if !self.can_sendfile {
            return None;
        }
        let file = self.file.as_ref().expect("a backlog implies a file");
        let len = super::whole(self.backlog().min(SENDFILE_STEP as u64) as usize, unit);
        match zerocopy::sendfile(fd, file, self.head, len) {
            Ok(0) => {
                log::debug!("sendfile gave nothing with {len} bytes on disk; reading instead");
                self.can_sendfile = false;
                None
            }
            Ok(n) => Some(match self.advance(n) {
                Ok(()) => Drain::Gave(n),
                Err(e) => Drain::SpillFailed(e),
            }),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(Drain::WouldBlock),
            Err(e) if is_unsupported(&e) => {
                log::debug!("sendfile refused ({e}); reading instead");
                self.can_sendfile = false;
                None
            }
            // The errors of reading a file; anything else is the socket's
            // (and consumed by this call: it must be reported now).
            Err(e) if is_file_read_error(&e) => Some(Drain::SpillFailed(e)),
            Err(e) => Some(Drain::SinkFailed(e)),
        }
    }

    /// `send_head` without taking: up to `SENDFILE_STEP` bytes from `pos`
    /// bytes past the head. `None` if `sendfile` is refused.
    pub fn send_at(&mut self, fd: RawFd, pos: u64) -> Option<Drain> {
        if !self.can_sendfile {
            return None;
        }
        let file = self.file.as_ref().expect("a backlog implies a file");
        let len = (self.backlog() - pos).min(SENDFILE_STEP as u64) as usize;
        match zerocopy::sendfile(fd, file, self.head + pos, len) {
            Ok(0) => {
                self.can_sendfile = false;
                None
            }
            Ok(n) => Some(Drain::Gave(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(Drain::WouldBlock),
            Err(e) if is_unsupported(&e) => {
                self.can_sendfile = false;
                None
            }
            Err(e) if is_file_read_error(&e) => Some(Drain::SpillFailed(e)),
            Err(e) => Some(Drain::SinkFailed(e)),
        }
    }

    /// Read bytes from `pos` past the head into `into`, without taking.
    pub fn read_at(&self, pos: u64, into: &mut [u8]) -> io::Result<usize> {
        let n = (self.backlog() - pos).min(into.len() as u64) as usize;
        let file = self.file.as_ref().expect("a backlog implies a file");
        file.read_exact_at(&mut into[..n], self.head + pos)?;
        Ok(n)
    }

    /// `n` bytes left the head: give back the disk space of what has gone.
    fn advance(&mut self, n: usize) -> io::Result<()> {
        self.head += n as u64;
        let file = self.file.as_ref().expect("called with a file");
        if self.head == self.tail {
            // Empty: rewind to the start so the file never grows past the
            // largest backlog, and drop all its blocks (reserved ones too).
            file.set_len(0)?;
            self.forget_bytes();
            // Nothing waits for disk any more: whatever kept it from being
            // had is over for this backlog, and the next spill will say
            // anew. (A receiver that keeps up may never need it again.)
            self.blocked = None;
            return Ok(());
        }
        // Whole folios only, so that no page still queued in a socket by
        // `sendfile` is zeroed in place; see `zerocopy::largest_folio`.
        let reclaimable = self.head / largest_folio() * largest_folio();
        if self.can_punch && reclaimable > self.punched {
            let len = reclaimable - self.punched;
            match fallocate(
                file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                self.punched,
                len,
            ) {
                Ok(()) => {
                    self.budget.release(len);
                    self.punched = reclaimable;
                }
                Err(e) => {
                    log::debug!(
                        "spill file: cannot punch holes here ({e}); space is reclaimed when the file empties"
                    );
                    self.can_punch = false;
                }
            }
        }
        self.check_invariants();
        Ok(())
    }

    /// Close the file (the kernel frees an unlinked file's blocks), then
    /// give its charge back to the budget. In that order: a charge given
    /// back while its blocks are still taken can be granted at once to a
    /// direction of another worker, whose reservation then takes disk on
    /// top of them, past `--max-disk` (or fails with ENOSPC on a disk sized
    /// to it) for as long as this thread takes to close the file; under
    /// load, a preemption between the two made that milliseconds.
    pub fn close(&mut self) {
        self.file = None;
        self.forget_bytes();
    }

    /// The file holds nothing any more (closed, or cut to length 0): give
    /// its charge back and count from its start again. Only once the
    /// kernel has freed the blocks, like every release of the budget.
    fn forget_bytes(&mut self) {
        self.budget.release(self.disk_charge());
        self.head = 0;
        self.tail = 0;
        self.punched = 0;
        self.reserved = 0;
    }

    /// The file, if one is open (tests look at its allocated size).
    #[cfg(test)]
    pub(super) fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    fn check_invariants(&self) {
        debug_assert_eq!(self.punched % largest_folio(), 0, "punched part of a folio");
        debug_assert!(self.head <= self.tail, "file offsets out of order");
        debug_assert!(self.punched <= self.head, "punched past live bytes");
        debug_assert!(self.tail <= self.reserved, "written past the reservation");
        debug_assert_eq!(self.reserved % BLOCK, 0, "reservations are whole blocks");
        debug_assert!(self.backlog() <= self.limit, "file over --max-spill");
        debug_assert!(
            self.file.is_some() || self.tail == 0,
            "a backlog without a file"
        );
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        self.close();
    }
}

/// `fallocate(2)`: reserve blocks (`KEEP_SIZE`) or release them
/// (`PUNCH_HOLE | KEEP_SIZE`) without changing the file's size.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by
    // `file`, which outlives the call.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    /// A tmpfs of `size` bytes, unmounted on drop; `Err` where it cannot
    /// be mounted (not root).
    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        fn mount(size: u64) -> Result<Tmpfs, String> {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .output()
                .map_err(|e| format!("cannot run mount: {e}"))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
            }
            Ok(Tmpfs(dir))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let done = Command::new("umount")
                .arg(self.0.path())
                .status()
                .is_ok_and(|s| s.success());
            if !done {
                let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
            }
        }
    }

    /// Every charge given back is free on the disk already, so `--max-disk`
    /// holds for what the disk holds, not only for the books: on a tmpfs
    /// exactly the budget's size, two threads (two workers) fill spill
    /// files until the budget says no, then drop them (a connection cut)
    /// or drain part (punching) or all (truncating) of them first, each
    /// reserving as soon as the other gives back. Not one reservation the
    /// budget grants may then fail for want of space. (When closing gave
    /// the charge back before closing the file, this failed at the first
    /// file closed, ten runs out of ten.)
    #[test]
    fn the_budget_grants_no_disk_that_is_still_taken() {
        const LIMIT: u64 = 8 << 20;
        let tmpfs = match Tmpfs::mount(LIMIT) {
            Ok(t) => t,
            Err(why) => {
                eprintln!("SKIPPED: needs an 8MiB tmpfs (root, mount rights): {why}");
                return;
            }
        };
        let dir: Arc<Path> = tmpfs.0.path().into();
        let budget = Arc::new(Budget::new(Some(LIMIT)));
        let no_space = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_secs(3);
        let files = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..2u8)
                .map(|t| {
                    let (dir, budget) = (dir.clone(), budget.clone());
                    let (no_space, stop) = (&no_space, &stop);
                    scope.spawn(move || {
                        let chunk = vec![t; 256 * 1024];
                        let mut scratch = vec![0u8; 1 << 20];
                        let mut files = 0u32;
                        while files < 300 && !stop.load(Ordering::Relaxed) {
                            // More than half the budget each: they contend.
                            let mut file = SpillFile::new(6 << 20, dir.clone(), budget.clone());
                            while file.room() > 0 && !stop.load(Ordering::Relaxed) {
                                match file.make_room(chunk.len()) {
                                    Ok(n) => file.append(&chunk[..n]).unwrap(),
                                    Err(None) if file.backlog() > 0 => break,
                                    Err(None) => std::thread::yield_now(),
                                    Err(Some(e)) => {
                                        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                                        no_space.fetch_add(1, Ordering::Relaxed);
                                        stop.store(true, Ordering::Relaxed);
                                    }
                                }
                                if Instant::now() >= deadline {
                                    stop.store(true, Ordering::Relaxed);
                                }
                            }
                            let drain = match files % 3 {
                                0 => 0,
                                1 => file.backlog() / 2,
                                _ => file.backlog(),
                            };
                            let mut taken = 0;
                            while taken < drain {
                                let n = (drain - taken).min(scratch.len() as u64) as usize;
                                taken += file.take_head(&mut scratch[..n]).unwrap() as u64;
                            }
                            file.close();
                            files += 1;
                        }
                        files
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(
            no_space.load(Ordering::Relaxed),
            0,
            "the budget granted space the disk did not have (after {files:?} files)"
        );
        assert!(files.iter().all(|&n| n >= 20), "too few files: {files:?}");
        assert_eq!(budget.used(), 0, "every charge returned");
    }
}
