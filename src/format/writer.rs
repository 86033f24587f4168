//! Writes a `.udelta` file: header, records as they come, then index and footer; the file is
//! staged under a temporary name and appears only when [`UdeltaWriter::finish`] succeeds.

use super::{index::FileIndex, RecordRef, END_MAGIC, FORMAT_VERSION, MAGIC};
use crate::error::{Error, Result};
use crate::staging::StagedPath;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Streaming writer of one `.udelta` file.
pub struct UdeltaWriter {
    staged: StagedPath,
    out: BufWriter<File>,
    offset: u64,
    /// Offset up to which a background `fdatasync` has been started.
    synced_to: u64,
    syncs: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

/// Bytes written between two background syncs: large outputs are flushed to disk while the
/// compression goes on, so the final sync before the rename is short.
const SYNC_EVERY: u64 = 256 << 20;

impl UdeltaWriter {
    /// Stages `target` (refused if it exists and `force` is false) and writes the header.
    pub fn create(target: &Path, force: bool) -> Result<Self> {
        let staged = StagedPath::new(target, force)?;
        let file = File::create(staged.path()).map_err(|e| Error::io(target, e))?;
        let mut w = UdeltaWriter {
            staged,
            out: BufWriter::with_capacity(1 << 22, file),
            offset: 0,
            synced_to: 0,
            syncs: Vec::new(),
        };
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        w.write_bytes(&header)?;
        Ok(w)
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(self.staged.target(), e))?;
        self.offset += bytes.len() as u64;
        if self.offset - self.synced_to >= SYNC_EVERY {
            self.sync_in_background()?;
        }
        Ok(())
    }

    /// Hands what is written so far to the disk on another thread.
    fn sync_in_background(&mut self) -> Result<()> {
        let target = self.staged.target().to_path_buf();
        self.out.flush().map_err(|e| Error::io(&target, e))?;
        let file = self
            .out
            .get_ref()
            .try_clone()
            .map_err(|e| Error::io(&target, e))?;
        self.syncs.retain(|h| !h.is_finished());
        self.syncs
            .push(std::thread::spawn(move || file.sync_data()));
        self.synced_to = self.offset;
        Ok(())
    }

    /// Appends one record and returns its reference.
    pub fn append(&mut self, bytes: &[u8]) -> Result<RecordRef> {
        let r = RecordRef {
            offset: self.offset,
            len: bytes.len() as u64,
            crc32: super::index::crc32(bytes),
        };
        self.write_bytes(bytes)?;
        Ok(r)
    }

    /// Appends a record given in pieces (e.g. a raw tensor read chunk by chunk).
    pub fn append_chunks(
        &mut self,
        mut next: impl FnMut(&mut Vec<u8>) -> Result<bool>,
    ) -> Result<RecordRef> {
        let offset = self.offset;
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = Vec::new();
        while next(&mut buf)? {
            hasher.update(&buf);
            self.write_bytes(&buf)?;
        }
        Ok(RecordRef {
            offset,
            len: self.offset - offset,
            crc32: hasher.finalize(),
        })
    }

    /// The final path of the file.
    pub fn target(&self) -> &Path {
        self.staged.target()
    }

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Writes the index and footer, syncs, and renames the file into place. Returns its size.
    pub fn finish(mut self, index: &FileIndex) -> Result<u64> {
        let json = serde_json::to_vec(index)
            .map_err(|e| Error::format(self.staged.target(), e.to_string()))?;
        let index_offset = self.offset;
        self.write_bytes(&json)?;
        let mut footer = Vec::with_capacity(32);
        footer.extend_from_slice(&index_offset.to_le_bytes());
        footer.extend_from_slice(&(json.len() as u64).to_le_bytes());
        footer.extend_from_slice(&super::index::crc32(&json).to_le_bytes());
        footer.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        footer.extend_from_slice(&END_MAGIC);
        self.write_bytes(&footer)?;
        let target = self.staged.target().to_path_buf();
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&target, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&target, e))?;
        drop(file);
        self.staged.commit()?;
        Ok(self.offset)
    }
}
