//! [`SharedOut`]: a pointer that parallel chunks share to write disjoint slots of one array
//! (the sparse index of `tracenorm::sparse`, the CSC copy of `engine::gpu`).

/// A pointer that parallel chunks share to write disjoint slots of one array.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut<T>(pub(crate) *mut T);
// SAFETY: only used where parallel chunks write disjoint slots (see `write`).
unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// Writes `v` at `slot`.
    ///
    /// # Safety
    /// `slot` is in bounds and no other thread accesses it.
    #[inline(always)]
    pub(crate) unsafe fn write(self, slot: usize, v: T) {
        unsafe { self.0.add(slot).write(v) }
    }
}
