//! Buffers handed back when a tensor is done with them, for the next tensor's. Memory fresh
//! from the system costs a page fault per 4 KiB page on its first touch (on the 2-vCPU test
//! machine about 0.5 ms per MB, twice that with both threads faulting at once), and a large
//! model's tensors go through the same steps one after another: reused, buffers are faulted
//! in once.

use std::sync::{Mutex, MutexGuard};

/// A pool of spare vectors of `T`, holding at most `max_bytes` of them (the largest kept).
pub struct Spare<T> {
    pool: Mutex<Vec<Vec<T>>>,
    max_bytes: usize,
}

impl<T: Copy + Default> Spare<T> {
    /// An empty pool that keeps up to `max_bytes` of buffers.
    pub const fn new(max_bytes: usize) -> Spare<T> {
        Spare {
            pool: Mutex::new(Vec::new()),
            max_bytes,
        }
    }

    /// The buffers, whatever a thread that panicked while holding them left (buffers only).
    fn pool(&self) -> MutexGuard<'_, Vec<Vec<T>>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The smallest spare vector with room for `capacity` values, as its last user left it.
    fn take(&self, capacity: usize) -> Option<Vec<T>> {
        let mut pool = self.pool();
        let fit = (0..pool.len())
            .filter(|&i| pool[i].capacity() >= capacity)
            .min_by_key(|&i| pool[i].capacity());
        fit.map(|i| pool.swap_remove(i))
    }

    /// An empty vector with room for `capacity` values: the smallest spare one that has it,
    /// else a fresh one.
    pub fn with_capacity(&self, capacity: usize) -> Vec<T> {
        let mut v = self
            .take(capacity)
            .unwrap_or_else(|| Vec::with_capacity(capacity));
        v.clear();
        v
    }

    /// A vector of `len` values; the values are unspecified (the caller overwrites them):
    /// only the part beyond what the spare vector's last user filled is written.
    pub fn filled(&self, len: usize) -> Vec<T> {
        match self.take(len) {
            Some(mut v) => {
                v.truncate(len);
                v.resize(len, T::default());
                v
            }
            None => vec![T::default(); len],
        }
    }

    /// Hands `v` over to the next caller (the largest spare buffers are kept).
    pub fn give(&self, v: Vec<T>) {
        if v.capacity() == 0 {
            return;
        }
        let mut pool = self.pool();
        pool.push(v);
        pool.sort_unstable_by_key(|b| std::cmp::Reverse(b.capacity()));
        let mut total = 0;
        let size = std::mem::size_of::<T>().max(1);
        pool.retain(|b| {
            total += b.capacity() * size;
            total <= self.max_bytes
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_smallest_fitting_first_and_bounded() {
        let spare: Spare<u32> = Spare::new(1000);
        let (a, b) = (vec![1u32; 100], vec![2u32; 50]);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        spare.give(a);
        spare.give(b);
        // 40 values fit in both: the smaller one comes back, its values left as they were.
        let v = spare.filled(40);
        assert_eq!((v.as_ptr(), v.len()), (pb, 40));
        assert!(v.iter().all(|&x| x == 2));
        let w = spare.with_capacity(60);
        assert_eq!((w.as_ptr(), w.len()), (pa, 0));
        // Nothing left that fits: a fresh one.
        assert!(spare.with_capacity(10).capacity() >= 10);
        // Beyond 1000 bytes (250 u32) the smallest buffers are dropped.
        spare.give(vec![0u32; 200]);
        spare.give(vec![0u32; 100]);
        assert_eq!(spare.pool().len(), 1);
    }
}
