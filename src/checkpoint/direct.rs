//! Reading large tensors past the page cache (`O_DIRECT`), when they are not cached already.
//!
//! A buffered read of a cold file makes the kernel allocate a page-cache page for every 4 KiB,
//! reclaim older ones and copy each into the caller's buffer: on the test VM `cat` of a cold
//! 6.7 GB shard spends 3.4 s of system CPU for 6.5 s of wall time, one of its two vCPUs, which
//! `compress` needs for its own work. A direct read moves the data from the device into an
//! aligned buffer without any of that (`dd iflag=direct bs=64M`: 0.2 s of system CPU, 5.3 s).
//! The span of whole pages around the tensor is read into page-aligned memory ([`TensorBuf`]),
//! the tensor's bytes landing in place, by two threads so that two reads are in flight.
//!
//! Only ranges that are mostly not in the page cache are read this way (`mincore` on a mapping
//! that is never touched, so a file truncated meanwhile cannot fault): a warm file is still
//! read from memory. Any failure of the direct path (a file system without `O_DIRECT`, no
//! `/proc`, an error) falls back to a buffered read, which reports real errors.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

/// Alignment of direct reads' offsets, lengths and buffers: a page, a multiple of every
/// device's logical block size in practice.
const ALIGN: usize = 4096;

/// Bytes of one direct read (the piece each thread reads, then copies).
const PIECE: usize = 16 << 20;

/// Reads of fewer bytes than this always go through the page cache.
pub const DIRECT_MIN: u64 = 32 << 20;

/// Threads reading one range, each with one read in flight.
const READERS: usize = 2;

/// Opens the file behind `file` a second time with `O_DIRECT` (through `/proc/self/fd`, so
/// that it is the same file even if its path has been replaced since); `None` where that
/// fails.
pub fn reopen_direct(file: &File) -> Option<File> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Whether at most half of the pages of `[offset, offset + len)` of `file` are in the page
/// cache (`None` when that cannot be told).
pub fn mostly_uncached(file: &File, offset: u64, len: u64) -> Option<bool> {
    let start = offset / ALIGN as u64 * ALIGN as u64;
    let span = usize::try_from(offset + len - start).ok()?;
    if span == 0 {
        return Some(false);
    }
    // SAFETY: a fresh read-only shared mapping that is never dereferenced (mincore only asks
    // the kernel which of its pages are resident), unmapped before returning.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            start as libc::off_t,
        );
        if map == libc::MAP_FAILED {
            return None;
        }
        let mut resident = vec![0u8; span.div_ceil(ALIGN)];
        let ok = libc::mincore(map, span, resident.as_mut_ptr()) == 0;
        libc::munmap(map, span);
        ok.then(|| 2 * resident.iter().filter(|&&r| r & 1 != 0).count() <= resident.len())
    }
}

/// Zeroed memory aligned for direct reads (empty until first grown).
struct AlignedBytes {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: owned memory, handed between threads whole.
unsafe impl Send for AlignedBytes {}
// SAFETY: shared access only reads it.
unsafe impl Sync for AlignedBytes {}

impl Default for AlignedBytes {
    fn default() -> Self {
        AlignedBytes {
            ptr: std::ptr::null_mut(),
            len: 0,
        }
    }
}

impl AlignedBytes {
    /// At least `len` bytes (a multiple of [`ALIGN`]); the contents are not kept.
    fn grow_to(&mut self, len: usize) {
        if self.len >= len {
            return;
        }
        self.free();
        let layout = Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size (`len > self.len >= 0`). Zeroed: every byte
        // is initialized before any slice over it exists.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        (self.ptr, self.len) = (ptr, len);
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated in `grow_to` with this size and alignment.
            unsafe { dealloc(self.ptr, Layout::from_size_align_unchecked(self.len, ALIGN)) };
            (self.ptr, self.len) = (std::ptr::null_mut(), 0);
        }
    }

    fn bytes(&self) -> &[u8] {
        if self.ptr.is_null() {
            return &[];
        }
        // SAFETY: `len` initialized bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        if self.ptr.is_null() {
            return &mut [];
        }
        // SAFETY: `len` initialized bytes owned by `self`, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        self.free();
    }
}

/// A tensor's bytes where a read left them: `len` bytes from `start` of memory aligned for
/// direct reads (`start` is the tensor's offset within its first page, so that the read of
/// the aligned span around it lands each byte in place, with no copy). Derefs to the bytes.
#[derive(Default)]
pub struct TensorBuf {
    mem: AlignedBytes,
    start: usize,
    len: usize,
}

impl TensorBuf {
    /// Makes room for `len` bytes from `start` (below [`ALIGN`]) and returns the whole aligned
    /// span that holds them (its length a multiple of [`ALIGN`]).
    fn span_for(&mut self, start: usize, len: usize) -> &mut [u8] {
        let span = (start + len).div_ceil(ALIGN) * ALIGN;
        self.mem.grow_to(span);
        (self.start, self.len) = (start, len);
        &mut self.mem.bytes_mut()[..span]
    }

    /// Bytes of aligned memory it holds (0 before its first read).
    pub fn capacity(&self) -> usize {
        self.mem.len
    }

    /// Makes room for `len` bytes and returns them (for a buffered read).
    pub fn prepare(&mut self, len: usize) -> &mut [u8] {
        self.span_for(0, len);
        &mut self.mem.bytes_mut()[..len]
    }
}

impl std::ops::Deref for TensorBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.mem.bytes()[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for TensorBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorBuf({} bytes)", self.len)
    }
}

/// Fills `buf` with the `len` bytes at `offset` of `direct` (a file opened with `O_DIRECT`):
/// the aligned span around them is read in pieces of [`PIECE`] bytes straight into `buf`'s
/// aligned memory, by [`READERS`] threads taking pieces in turn.
pub fn read_direct_into(
    direct: &File,
    offset: u64,
    len: usize,
    buf: &mut TensorBuf,
) -> io::Result<()> {
    let skip = (offset % ALIGN as u64) as usize;
    let start = offset - skip as u64;
    let need = skip + len;
    let span = buf.span_for(skip, len);
    let mut shares: Vec<Vec<(u64, &mut [u8], usize)>> = (0..READERS).map(|_| Vec::new()).collect();
    for (i, piece) in span.chunks_mut(PIECE).enumerate() {
        let from = i * PIECE;
        let wanted = need.saturating_sub(from).min(piece.len());
        shares[i % READERS].push((start + from as u64, piece, wanted));
    }
    std::thread::scope(|s| {
        let workers: Vec<_> = shares
            .into_iter()
            .map(|share| {
                s.spawn(move || {
                    share
                        .into_iter()
                        .try_for_each(|(at, piece, wanted)| read_piece(direct, at, piece, wanted))
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("a reader panicked")))
            })
            .collect::<io::Result<Vec<()>>>()
    })?;
    Ok(())
}

/// Reads at aligned `offset` into the aligned `piece` until at least `wanted` bytes are in.
fn read_piece(direct: &File, offset: u64, piece: &mut [u8], wanted: usize) -> io::Result<()> {
    let mut got = 0;
    while got < wanted {
        // Every read starts at an aligned offset with an aligned length: `got` is a multiple of
        // the alignment unless the file ended (then the next read returns 0).
        match direct.read_at(&mut piece[got..], offset + got as u64) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file of `len` bytes of a recognizable pattern, on a disk file system (the build
    /// directory; `/tmp` may be a tmpfs without `O_DIRECT`), written through to the disk.
    fn pattern_file(len: usize) -> (tempfile::TempDir, File, Vec<u8>) {
        let target = concat!(env!("CARGO_MANIFEST_DIR"), "/target");
        std::fs::create_dir_all(target).unwrap();
        let dir = tempfile::tempdir_in(target).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4099) as u8).collect();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        (dir, File::open(&path).unwrap(), data)
    }

    #[test]
    fn direct_reads_equal_the_bytes_at_any_offset_and_length() {
        let len = 2 * PIECE + 3 * ALIGN + 123;
        let (_dir, file, data) = pattern_file(len);
        let Some(direct) = reopen_direct(&file) else {
            // Some file systems (older tmpfs, some container overlays) refuse O_DIRECT: there
            // the reader always reads through the page cache, which `tests/io_counters.rs`
            // checks. Said loudly, as nothing of this test applies.
            eprintln!("\n!!!!!!!! O_DIRECT refused under target/: direct reads not exercised\n");
            return;
        };
        let mut long: Option<TensorBuf> = None;
        // Unaligned starts and ends, one and several pieces, up to the file's last byte.
        for (offset, n) in [
            (0, 10),
            (1, ALIGN),
            (ALIGN - 1, 2),
            (5000, PIECE),
            (3, 2 * PIECE + 7),
            (len - PIECE - 17, PIECE + 17),
            (len - 1, 1),
        ] {
            // A buffer that held a longer read before, then a fresh one.
            for mut buf in [long.take().unwrap_or_default(), TensorBuf::default()] {
                read_direct_into(&direct, offset as u64, n, &mut buf).unwrap();
                assert!(
                    *buf == data[offset..offset + n],
                    "offset {offset}, {n} bytes"
                );
                long = Some(buf);
            }
        }
        // Past the end: an error, never bytes that are not there.
        let mut buf = TensorBuf::default();
        let e = read_direct_into(&direct, (len - 50) as u64, 100, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // A buffered read into the same kind of buffer.
        buf.prepare(5).copy_from_slice(&data[..5]);
        assert!(*buf == data[..5]);
    }

    #[test]
    fn residency_is_told_from_the_page_cache() {
        let (_dir, file, _) = pattern_file(64 * ALIGN);
        let mut buf = vec![0u8; 64 * ALIGN];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(mostly_uncached(&file, 0, buf.len() as u64), Some(false));
        // SAFETY: an advisory call on an open file (the pages are clean: written through).
        let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        assert_eq!(mostly_uncached(&file, 100, 30 * ALIGN as u64), Some(true));
    }
}
