//! Reading large tensors past the page cache (`O_DIRECT`), when they are not cached already.
//!
//! A buffered read of a cold file makes the kernel allocate a page-cache page for every 4 KiB,
//! reclaim older ones and copy each into the caller's buffer: on the test VM `cat` of a cold
//! 6.7 GB shard spends 3.4 s of system CPU for 6.5 s of wall time, one of its two vCPUs, which
//! `compress` needs for its own work. A direct read moves the data from the device into an
//! aligned buffer without any of that (`dd iflag=direct bs=64M`: 0.2 s of system CPU, 5.3 s).
//! The data then needs one copy into the caller's buffer (the caller's memory is not aligned),
//! which two threads do while the other's next read is in flight.
//!
//! Only ranges that are mostly not in the page cache are read this way (`mincore` on a mapping
//! that is never touched, so a file truncated meanwhile cannot fault): a warm file is still
//! read from memory. Any failure of the direct path (a file system without `O_DIRECT`, no
//! `/proc`, an error) falls back to a buffered read, which reports real errors.

use std::alloc::{alloc, dealloc, Layout};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::Mutex;

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

/// A zeroed buffer aligned for direct reads.
struct Bounce {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is owned memory, used by one thread at a time.
unsafe impl Send for Bounce {}

impl Bounce {
    /// Room for one piece and the alignment slack at both ends.
    fn new() -> Bounce {
        let layout = Layout::from_size_align(PIECE + 2 * ALIGN, ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Bounce { ptr, layout }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `layout.size()` bytes owned by `self` (uninitialized bytes are
        // only ever written by the kernel's reads before the bytes read are looked at; a u8
        // has no invalid values).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Bounce buffers from one read to the next (faulted in once).
static SPARE: Mutex<Vec<Bounce>> = Mutex::new(Vec::new());

fn take_bounce() -> Bounce {
    let spare = SPARE.lock().unwrap_or_else(|e| e.into_inner()).pop();
    spare.unwrap_or_else(Bounce::new)
}

fn give_back(b: Bounce) {
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    if spare.len() < READERS {
        spare.push(b);
    }
}

/// Fills `buf` from `offset` of `direct` (a file opened with `O_DIRECT`): pieces of
/// [`PIECE`] bytes, each read aligned into a bounce buffer and copied out, by [`READERS`]
/// threads taking pieces in turn.
pub fn read_exact_direct(direct: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let pieces: Vec<(u64, &mut [u8])> = buf
        .chunks_mut(PIECE)
        .enumerate()
        .map(|(i, piece)| (offset + (i * PIECE) as u64, piece))
        .collect();
    let mut shares: Vec<Vec<(u64, &mut [u8])>> = (0..READERS).map(|_| Vec::new()).collect();
    for (i, p) in pieces.into_iter().enumerate() {
        shares[i % READERS].push(p);
    }
    std::thread::scope(|s| {
        let workers: Vec<_> = shares
            .into_iter()
            .map(|share| {
                s.spawn(move || {
                    let mut bounce = take_bounce();
                    let result = share
                        .into_iter()
                        .try_for_each(|(at, piece)| read_piece(direct, at, piece, &mut bounce));
                    give_back(bounce);
                    result
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

/// Reads `piece.len()` bytes at `offset` through `bounce`: the aligned span around them, then
/// the bytes asked for.
fn read_piece(direct: &File, offset: u64, piece: &mut [u8], bounce: &mut Bounce) -> io::Result<()> {
    let start = offset / ALIGN as u64 * ALIGN as u64;
    let skip = (offset - start) as usize;
    let need = skip + piece.len();
    let span = need.div_ceil(ALIGN) * ALIGN;
    let bytes = &mut bounce.bytes()[..span];
    let mut got = 0;
    while got < need {
        // Every read starts at an aligned offset with an aligned length: `got` is a multiple of
        // the alignment unless the file ended (then the next read returns 0).
        match direct.read_at(&mut bytes[got..], start + got as u64) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    piece.copy_from_slice(&bytes[skip..need]);
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
        let direct = reopen_direct(&file).expect("O_DIRECT on the build directory's file system");
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
            let mut buf = vec![0u8; n];
            read_exact_direct(&direct, offset as u64, &mut buf).unwrap();
            assert!(
                buf == data[offset..offset + n],
                "offset {offset}, {n} bytes"
            );
        }
        // Past the end: an error, never bytes that are not there.
        let mut buf = vec![0u8; 100];
        let e = read_exact_direct(&direct, (len - 50) as u64, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
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
