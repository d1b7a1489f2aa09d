//! Moving a direction's bytes without copying them through user space.
//!
//! - A pipe holds the in-memory part as references to the kernel's own
//!   pages: `splice(2)` moves them in from the sender's socket and out to
//!   the receiver's, and the bytes never visit a buffer of ours.
//! - `sendfile(2)` hands the receiver's socket the spill file's page-cache
//!   pages, where reading them back would copy them twice.
//!
//! Both hand the kernel *references*: a page spliced or sent is still the
//! same page after the call returns, queued in a socket until the peer
//! has it (on loopback, until the peer process has read it). So whatever
//! owns such a page must not change it in place. The spill buffer keeps to
//! that for its file (see `largest_folio`); pipe pages are the sender's
//! socket buffers, which nothing writes to again.
//!
//! Every call here is one system call, retried on EINTR; `WouldBlock` and
//! the rest come back as `io::Error` for the buffer to put in its terms.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

/// The in-memory part of a buffer, held in the kernel.
///
/// `len` is what we put in and have not taken out: the pipe itself only
/// says how much it holds through an ioctl, and we need the figure for
/// every decision.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    len: usize,
    /// The memory it was made to hold (`Pipe::new`'s `memory`).
    memory: usize,
    /// A splice in found no room although `len` says there is some: the
    /// pipe counts slots, one per piece of a socket buffer, not bytes, and
    /// a sender of many small packets fills them before the bytes add up.
    /// Cleared as soon as anything leaves.
    full: bool,
}

thread_local! {
    /// Bytes in this thread's pipes now (for the memory gauge).
    static PIPED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Bytes held in this thread's pipes now.
pub fn piped() -> usize {
    PIPED.get()
}

/// `len` changed from `before` to `after`: keep the thread's sum.
fn track(before: usize, after: usize) {
    PIPED.set((PIPED.get() + after).saturating_sub(before));
}

impl Drop for Pipe {
    fn drop(&mut self) {
        track(self.len, 0);
    }
}

impl Pipe {
    /// A non-blocking pipe to hold up to `memory` bytes, or `None` if the
    /// kernel will not make one that large (past `pipe-max-size`, or a
    /// user over `pipe-user-pages-soft` gets two-page pipes): it would fill
    /// up short of `--memory-buffer` and spill early.
    ///
    /// It asks for twice that: a pipe counts slots (a page, or a piece of
    /// one), not bytes, and socket buffers come in pieces, one of them the
    /// sliver a whole-segment write leaves; with twice the slots, a whole
    /// memory's worth fits. The bytes in it stay within `memory`: that is
    /// all a splice ever asks for.
    pub fn new(memory: usize) -> io::Result<Option<Pipe>> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array it is given, which
        // is a live local of the right size.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let memory = memory.min(i32::MAX as usize / 2);
        // Never shrunk (a small `memory` keeps the default's slots), and
        // F_SETPIPE_SZ answers with the size it set: no ask after it.
        let mut capacity = pipe_capacity(&write)?;
        for want in [memory * 2, memory] {
            if capacity >= want {
                break;
            }
            // SAFETY: F_SETPIPE_SZ only reads its integer argument.
            let rc =
                unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
            // Refused (past pipe-max-size, or over the user's pipe pages):
            // the pipe keeps its size, and the smaller ask may still pass.
            if rc >= 0 {
                capacity = rc as usize;
            }
        }
        let pipe = Pipe {
            read,
            write,
            len: 0,
            memory,
            full: false,
        };
        Ok((capacity >= memory).then_some(pipe))
    }

    /// The memory it was made to hold.
    pub fn memory(&self) -> usize {
        self.memory
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Splice up to `max` bytes from the socket `src` in. `Ok(0)` is the
    /// sender's EOF. `WouldBlock` is unambiguous only while the pipe is
    /// empty: with bytes in it, it may just as well mean no slot was free,
    /// so then the pipe is marked full and the caller must not take the
    /// sender for drained.
    pub fn splice_from(&mut self, src: RawFd, max: usize) -> io::Result<usize> {
        let n = splice(src, self.write.as_raw_fd(), max).inspect_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock && self.len > 0 {
                self.full = true;
            }
        })?;
        track(self.len, self.len + n);
        self.len += n;
        Ok(n)
    }

    /// Splice up to `max` of the held bytes out to the socket `dst`.
    pub fn splice_to(&mut self, dst: RawFd, max: usize) -> io::Result<usize> {
        let n = splice(self.read.as_raw_fd(), dst, max.min(self.len))?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        track(self.len, self.len - n);
        self.len -= n;
        self.full = false;
        Ok(n)
    }

    /// Read the held bytes out into `buf` (at least `len` long): the way
    /// back to plain memory when splicing out is refused.
    pub fn read_all_into(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = self.len;
        let mut got = 0;
        while got < want {
            // SAFETY: the pointer and length describe the unfilled part
            // of `buf`, which is live and at least `want` long.
            let rc = unsafe {
                libc::read(
                    self.read.as_raw_fd(),
                    buf[got..want].as_mut_ptr().cast(),
                    want - got,
                )
            };
            match rc {
                n if n > 0 => got += n as usize,
                0 => break,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        if got != want {
            return Err(io::Error::other(format!(
                "the pipe gave back {got} of the {want} bytes put in"
            )));
        }
        track(self.len, 0);
        self.len = 0;
        self.full = false;
        Ok(got)
    }
}

fn pipe_capacity(fd: &OwnedFd) -> io::Result<usize> {
    // SAFETY: F_GETPIPE_SZ takes no argument and returns an int.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// One non-blocking `splice(2)` between two fds, one of them a pipe.
/// `SPLICE_F_NONBLOCK` covers the pipe; the sockets are non-blocking
/// themselves. A socket error raises no SIGPIPE: Rust programs ignore it.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: splice takes fds (owned by the caller for the duration),
        // null offsets (both ends are streams) and integers.
        let rc = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `sendfile(2)`: up to `len` bytes of `file` from `offset` to the
/// socket `dst`. `Ok(0)` only if the file is shorter than it should be.
pub fn sendfile(dst: RawFd, file: &File, offset: u64, len: usize) -> io::Result<usize> {
    let mut off = offset as libc::off_t;
    loop {
        // SAFETY: sendfile reads through the offset pointer and writes the
        // new offset back; it points at a live local. The fds are owned by
        // the caller for the duration.
        let rc = unsafe { libc::sendfile(dst, file.as_raw_fd(), &mut off, len) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The largest page-cache folio the kernel may use, in bytes: 2MiB with
/// 4KiB pages (the PMD size; the page cache caps folios at
/// `min(PMD order, 11)`).
///
/// Why the spill file cares: removing part of a large folio from the page
/// cache (a hole punched, or a truncation, that does not cover it whole)
/// makes the kernel zero that part *in place*, and a socket that was
/// handed the folio by `sendfile` and has not sent it yet would then send
/// zeros. Whole folios are only unlinked from the file; the socket keeps
/// its reference to the unchanged page. Folios are aligned to their size
/// in the file, so a range aligned to this size at both ends covers every
/// folio it touches whole, whatever sizes the file system chose.
pub fn largest_folio() -> u64 {
    static SIZE: OnceLock<u64> = OnceLock::new();
    *SIZE.get_or_init(|| {
        // SAFETY: sysconf only reads its integer argument.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = if page > 0 { page as u64 } else { 4096 };
        // A PMD maps as many pages as a page holds 8-byte entries.
        let pmd_order = (page / 8).trailing_zeros();
        page << pmd_order.min(11)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn folios_are_two_mib_with_four_kib_pages() {
        // SAFETY: sysconf only reads its integer argument.
        if unsafe { libc::sysconf(libc::_SC_PAGESIZE) } == 4096 {
            assert_eq!(largest_folio(), 2 << 20);
        }
        assert!(largest_folio().is_power_of_two());
    }

    /// Through a pipe and out again, in order; an empty pipe that finds
    /// nothing to take says WouldBlock, and the count follows the bytes.
    #[test]
    fn a_pipe_carries_bytes_between_sockets() {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        let (out, mut sink) = UnixStream::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        out.set_nonblocking(true).unwrap();
        let mut pipe = Pipe::new(64 * 1024).unwrap().expect("a 64KiB pipe");
        let err = pipe.splice_from(rx.as_raw_fd(), 1000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(!pipe.is_full(), "empty: nothing to take, not full");
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        tx.write_all(&data).unwrap();
        let (mut taken, mut given) = (0, 0);
        while taken < data.len() {
            taken += pipe.splice_from(rx.as_raw_fd(), 3000).unwrap();
            let n = pipe.splice_to(out.as_raw_fd(), 1234).unwrap();
            assert!(n <= 1234);
            given += n;
            assert_eq!(pipe.len(), taken - given);
        }
        while pipe.len() > 0 {
            pipe.splice_to(out.as_raw_fd(), usize::MAX).unwrap();
        }
        drop(tx);
        let n = pipe.splice_from(rx.as_raw_fd(), 10).unwrap();
        assert_eq!(n, 0, "EOF");
        drop(out);
        let mut got = Vec::new();
        sink.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn a_pipe_gives_its_bytes_back_to_memory() {
        let (mut tx, rx) = UnixStream::pair().unwrap();
        rx.set_nonblocking(true).unwrap();
        let mut pipe = Pipe::new(64 * 1024).unwrap().expect("a 64KiB pipe");
        tx.write_all(b"held in the kernel").unwrap();
        let n = pipe.splice_from(rx.as_raw_fd(), 100).unwrap();
        let mut buf = [0u8; 100];
        assert_eq!(pipe.read_all_into(&mut buf).unwrap(), n);
        assert_eq!(&buf[..n], b"held in the kernel");
        assert_eq!(pipe.len(), 0);
    }
}
