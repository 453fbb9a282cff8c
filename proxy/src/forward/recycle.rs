//! Receive buffers that are cut into messages and handed to other tasks
//! (`split().freeze()`), reused once every message cut from them is gone.
//!
//! A reader that runs ahead of its consumers (the SPDY session's read loop
//! feeding up to a queue of frames per stream; a local connection's reads
//! queued for the session's writer) would otherwise allocate a fresh buffer
//! each time its current one runs out while messages are still in flight:
//! with buffers of hundreds of KiB, glibc hands them back to the kernel on
//! free and every byte then lands on a freshly faulted, zeroed page (a
//! profile of a SPDY bulk transfer had page faults and `realloc` copies at
//! about a tenth of kproxy's CPU).

use std::collections::VecDeque;

use bytes::BytesMut;

pub struct Recycler {
    current: BytesMut,
    /// Buffers replaced while messages cut from them were still alive,
    /// oldest first; each is reused once they are all dropped.
    retired: VecDeque<BytesMut>,
    /// Capacity of a new buffer.
    size: usize,
    /// How many replaced buffers are kept for reuse (what an idle reader
    /// holds beyond its current buffer).
    keep: usize,
}

impl Recycler {
    pub fn new(size: usize, keep: usize) -> Recycler {
        Recycler {
            current: BytesMut::with_capacity(size),
            retired: VecDeque::new(),
            size,
            keep,
        }
    }

    /// The current buffer: messages are cut from its front.
    pub fn buf(&mut self) -> &mut BytesMut {
        &mut self.current
    }

    /// The current buffer with room for at least `need` more bytes. When
    /// it lacks the room, what it holds (the start of a message) moves to a
    /// buffer whose messages are all gone, else to a new one.
    pub fn room(&mut self, need: usize) -> &mut BytesMut {
        if self.current.capacity() - self.current.len() < need && !self.current.try_reclaim(need) {
            let cap = self.size.max(self.current.len() + need);
            let free = self
                .retired
                .iter_mut()
                .position(|b| b.try_reclaim(cap))
                .and_then(|i| self.retired.remove(i));
            let mut old = std::mem::replace(
                &mut self.current,
                free.unwrap_or_else(|| BytesMut::with_capacity(cap)),
            );
            self.current.extend_from_slice(&old);
            old.clear();
            self.retired.push_back(old);
            while self.retired.len() > self.keep {
                self.retired.pop_front();
            }
        }
        &mut self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes};

    /// Fills `n` bytes of `r`'s room and cuts them off as a message.
    fn message(r: &mut Recycler, n: usize) -> Bytes {
        let b = r.room(n);
        b.put_bytes(7, n);
        b.split().freeze()
    }

    fn base(b: &Bytes) -> usize {
        b.as_ptr() as usize
    }

    #[test]
    fn a_buffer_is_reused_once_its_messages_are_dropped() {
        let mut r = Recycler::new(1024, 4);
        let first: Vec<Bytes> = (0..4).map(|_| message(&mut r, 256)).collect();
        let start = base(&first[0]);
        // Full while its messages live: the next message takes a new buffer.
        let held = message(&mut r, 256);
        assert!(base(&held) < start || base(&held) >= start + 1024);
        drop(first);
        // The first buffer is free again; the second one fills first.
        let mut seen_first = false;
        let mut keep = vec![held];
        for _ in 0..8 {
            let m = message(&mut r, 256);
            seen_first |= (start..start + 1024).contains(&base(&m));
            keep.push(m);
        }
        assert!(seen_first, "the first buffer was not reused");
    }

    #[test]
    fn a_partial_message_moves_with_its_bytes() {
        let mut r = Recycler::new(64, 2);
        let held = message(&mut r, 60);
        r.room(4).put_slice(b"abcd");
        // 10 more bytes do not fit behind "abcd": the start moves along.
        let b = r.room(10);
        assert_eq!(&b[..], b"abcd");
        assert!(b.capacity() - b.len() >= 10);
        b.put_slice(b"0123456789");
        assert_eq!(&b.split().freeze()[..], b"abcd0123456789");
        assert_eq!(held.len(), 60);
    }

    #[test]
    fn a_message_larger_than_a_buffer_gets_a_buffer_of_its_size() {
        let mut r = Recycler::new(64, 2);
        let b = r.room(1000);
        assert!(b.capacity() >= 1000);
    }

    #[test]
    fn what_is_kept_is_bounded() {
        let mut r = Recycler::new(64, 2);
        let held: Vec<Bytes> = (0..10).map(|_| message(&mut r, 64)).collect();
        assert!(r.retired.len() <= 2);
        drop(held);
    }

    #[test]
    fn without_messages_alive_one_buffer_serves_every_read() {
        let mut r = Recycler::new(256, 2);
        let start = base(&message(&mut r, 200));
        for _ in 0..100 {
            let m = message(&mut r, 200);
            assert_eq!(base(&m), start);
        }
        assert!(r.retired.is_empty());
    }
}
