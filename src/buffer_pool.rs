//! Memory buffers (`--memory-buffer` each) kept for reuse by the thread
//! that freed them, so a new connection, or a direction that emptied and
//! fills again, does not go to malloc: a fresh buffer costs a zeroing
//! memset and, once the heap has given pages back, a page fault per 4KiB.
//! With short connections at tens of thousands a second that was a tenth
//! of the proxy's CPU.
//!
//! One pool per thread (each worker is one thread), so no lock. The pool
//! keeps at most `KEEP_BYTES` of buffers; beyond, they go back to malloc.

use std::cell::{Cell, RefCell};

/// What one thread keeps for reuse at most.
const KEEP_BYTES: usize = 8 << 20;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// The bytes in `FREE`, whatever sizes its buffers have.
    static KEPT: Cell<usize> = const { Cell::new(0) };
    /// The bytes of buffers taken and not given back: memory in use.
    static IN_USE: Cell<usize> = const { Cell::new(0) };
}

/// A buffer of exactly `len` bytes (contents unspecified).
pub fn take(len: usize) -> Vec<u8> {
    IN_USE.set(IN_USE.get() + len);
    FREE.with_borrow_mut(|free| match free.iter().rposition(|b| b.len() == len) {
        Some(at) => {
            KEPT.set(KEPT.get() - len);
            free.swap_remove(at)
        }
        None => vec![0; len],
    })
}

/// Bytes of this thread's buffers in use now (taken, not given back).
pub fn in_use() -> usize {
    IN_USE.get()
}

/// Keep `buffer` for a later `take`, if the pool has room.
pub fn give(buffer: Vec<u8>) {
    if buffer.is_empty() {
        return;
    }
    IN_USE.set(IN_USE.get().saturating_sub(buffer.len()));
    FREE.with_borrow_mut(|free| {
        if KEPT.get() + buffer.len() <= KEEP_BYTES {
            KEPT.set(KEPT.get() + buffer.len());
            free.push(buffer);
        }
    });
}

/// Give everything kept back to malloc (when load has dropped).
pub fn clear() {
    FREE.with_borrow_mut(|free| *free = Vec::new());
    KEPT.set(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_is_taken_again_and_the_pool_is_bounded() {
        let b = take(4096);
        let at = b.as_ptr();
        give(b);
        let again = take(4096);
        assert_eq!(again.as_ptr(), at, "reused");
        for _ in 0..(KEEP_BYTES / (1 << 20) + 4) {
            give(vec![0; 1 << 20]);
        }
        FREE.with_borrow(|free| assert_eq!(free.len(), KEEP_BYTES / (1 << 20)));
        // Bounded in bytes, whatever the sizes: one small buffer fits in
        // no more (the pool is full), and after one big is taken it does.
        give(vec![0; 4096]);
        FREE.with_borrow(|free| assert_eq!(free.len(), KEEP_BYTES / (1 << 20)));
        drop(take(1 << 20));
        give(vec![0; 4096]);
        assert_eq!(KEPT.get(), KEEP_BYTES - (1 << 20) + 4096);
        clear();
        FREE.with_borrow(|free| assert!(free.is_empty()));
    }
}
