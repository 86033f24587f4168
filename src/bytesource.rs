//! Positioned, read-only access to the bytes of a file or of a buffer in memory, so that the
//! decoders ([`crate::format::UdeltaReader`], the safetensors header parser) work the same on a
//! file and on bytes (for the fuzz targets and tests, which then need no temporary file).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// A fixed-size run of bytes that can be read at any offset, from several threads at once.
pub trait ByteSource: Send + Sync + std::fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Fills `buf` with the bytes at `offset`; `UnexpectedEof` if they run past the end.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Reads `len` bytes at `offset` into a new buffer, after checking the range against
    /// [`ByteSource::size`], so that a hostile length cannot make it allocate more than the
    /// source holds.
    fn read_vec_at(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let size = self.size()?;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(past_end(offset, len, size));
        }
        let len = usize::try_from(len).map_err(|_| past_end(offset, len, size))?;
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// The error for a read of `len` bytes at `offset` from a source of `size` bytes.
fn past_end(offset: u64, len: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("read of {len} bytes at offset {offset} runs past the end ({size} bytes)"),
    )
}

impl ByteSource for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ByteSource for Vec<u8> {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

impl ByteSource for &[u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.len() as u64;
        let len = buf.len() as u64;
        let start = usize::try_from(offset)
            .ok()
            .filter(|_| offset.checked_add(len).is_some_and(|end| end <= size))
            .ok_or_else(|| past_end(offset, len, size))?;
        buf.copy_from_slice(&self[start..start + buf.len()]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_reads_inside_and_past_the_end() {
        let data: Vec<u8> = (0u8..10).collect();
        let mut buf = [0u8; 3];
        data.read_exact_at(&mut buf, 7).unwrap();
        assert_eq!(buf, [7, 8, 9]);
        let err = data.read_exact_at(&mut buf, 8).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(data.read_exact_at(&mut buf, u64::MAX).is_err());
        assert_eq!(data.read_vec_at(2, 2).unwrap(), vec![2, 3]);
        assert_eq!(data.read_vec_at(10, 0).unwrap(), Vec::<u8>::new());
        // A huge length is refused before anything is allocated.
        let err = data.read_vec_at(1, u64::MAX).unwrap_err();
        assert!(
            err.to_string().contains("runs past the end (10 bytes)"),
            "{err}"
        );
    }
}
