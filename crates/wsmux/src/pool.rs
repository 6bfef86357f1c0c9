//! A small bounded pool of frame-sized buffers.
//!
//! Frames are allocated and freed at a high rate (one per 32 KiB of data in
//! each direction). Handing each one back to the system allocator makes the
//! heap grow and shrink constantly, and every byte then lands on a freshly
//! faulted page. The pool keeps up to `max` buffers for reuse; a buffer comes
//! back to it when the last `Bytes` referring to it is dropped.

use bytes::Bytes;
use std::sync::{Arc, Mutex};

pub(crate) struct BufPool {
    bufs: Mutex<Vec<Vec<u8>>>,
    max: usize,
    cap: usize,
}

struct Pooled {
    v: Vec<u8>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.v
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.v);
        if v.capacity() == self.pool.cap {
            if let Ok(mut bufs) = self.pool.bufs.lock() {
                if bufs.len() < self.pool.max {
                    bufs.push(v);
                }
            }
        }
    }
}

impl BufPool {
    /// A pool of at most `max` buffers of capacity `cap`.
    pub(crate) fn new(cap: usize, max: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            bufs: Mutex::new(Vec::new()),
            max,
            cap,
        })
    }

    /// An empty buffer of the pool's capacity (from the pool when it has one).
    pub(crate) fn take(&self) -> Vec<u8> {
        let mut v = self
            .bufs
            .lock()
            .ok()
            .and_then(|mut b| b.pop())
            .unwrap_or_else(|| Vec::with_capacity(self.cap));
        v.clear();
        v
    }

    /// Turn a buffer into `Bytes`; it returns to the pool when dropped (if it
    /// still has the pool's capacity).
    pub(crate) fn wrap(self: &Arc<Self>, v: Vec<u8>) -> Bytes {
        if v.capacity() != self.cap {
            return Bytes::from(v);
        }
        Bytes::from_owner(Pooled {
            v,
            pool: self.clone(),
        })
    }

    /// Copy `parts` into one pooled buffer when they fit, else into an exact
    /// allocation.
    pub(crate) fn bytes(self: &Arc<Self>, parts: &[&[u8]]) -> Bytes {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.cap {
            let mut v = Vec::with_capacity(len);
            for p in parts {
                v.extend_from_slice(p);
            }
            return Bytes::from(v);
        }
        let mut v = self.take();
        for p in parts {
            v.extend_from_slice(p);
        }
        self.wrap(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let pool = BufPool::new(16, 2);
        let a = pool.bytes(&[b"abc", b"def"]);
        assert_eq!(&a[..], b"abcdef");
        let p = a.as_ptr();
        drop(a);
        let b = pool.bytes(&[b"xyz"]);
        assert_eq!(b.as_ptr(), p, "reused");
        let big = pool.bytes(&[&[0u8; 17]]);
        assert_eq!(big.len(), 17);
        let c = pool.bytes(&[b"1"]);
        let d = pool.bytes(&[b"2"]);
        let e = pool.bytes(&[b"3"]);
        drop((b, big, c, d, e));
        assert_eq!(pool.bufs.lock().unwrap().len(), 2);
    }
}
