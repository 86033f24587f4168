//! Writes a `.udelta` file: header, records as they come, then index and footer; the file is
//! staged under a temporary name and appears only when [`UdeltaWriter::finish`] succeeds.

use super::{index::FileIndex, RecordRef, END_MAGIC, FOOTER_LEN, MAGIC};
use crate::error::{Error, Result};
use crate::staging::{DurableFile, StagedPath};
use std::path::Path;

/// Streaming writer of one `.udelta` file.
pub struct UdeltaWriter {
    staged: StagedPath,
    out: DurableFile,
    version: u32,
}

impl UdeltaWriter {
    /// Stages `target` (refused if it exists and `force` is false) and writes the header of
    /// format `version` ([`super::version_for`]).
    pub fn create(target: &Path, force: bool, version: u32) -> Result<Self> {
        let staged = StagedPath::new(target, force)?;
        let out = DurableFile::create(staged.path(), target)?;
        let mut w = UdeltaWriter {
            staged,
            out,
            version,
        };
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&version.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        w.out.write(&header)?;
        Ok(w)
    }

    /// Appends one record and returns its reference.
    pub fn append(&mut self, bytes: &[u8]) -> Result<RecordRef> {
        let r = RecordRef {
            offset: self.out.written(),
            len: bytes.len() as u64,
            crc32: super::index::crc32(bytes),
        };
        self.out.write(bytes)?;
        Ok(r)
    }

    /// Appends a record given in pieces (e.g. a raw tensor read chunk by chunk).
    pub fn append_chunks(
        &mut self,
        mut next: impl FnMut(&mut Vec<u8>) -> Result<bool>,
    ) -> Result<RecordRef> {
        let offset = self.out.written();
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = Vec::new();
        while next(&mut buf)? {
            hasher.update(&buf);
            self.out.write(&buf)?;
        }
        Ok(RecordRef {
            offset,
            len: self.out.written() - offset,
            crc32: hasher.finalize(),
        })
    }

    /// The format version of the header, which the index must state too.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The final path of the file.
    pub fn target(&self) -> &Path {
        self.staged.target()
    }

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.out.written()
    }

    /// Writes the index and footer, syncs, and renames the file into place. Returns its size.
    pub fn finish(self, index: &FileIndex) -> Result<u64> {
        let (staged, size) = self.complete(index)?;
        staged.commit()?;
        Ok(size)
    }

    /// Writes the index and footer and syncs, leaving the complete file under its temporary
    /// name for the caller to commit. Returns it with its size.
    pub fn complete(mut self, index: &FileIndex) -> Result<(StagedPath, u64)> {
        write_index(&mut self.out, index, self.staged.target())?;
        let size = self.out.written();
        self.out.finish()?;
        Ok((self.staged, size))
    }

    /// Stages a copy of the existing file `path` (whose index starts at `index_offset`) with
    /// its records and `index` in place of its index, complete and synced, beside it; the
    /// caller commits it over `path` (or drops it, and `path` is unchanged).
    pub fn stage_rewritten_index(
        path: &Path,
        index_offset: u64,
        index: &FileIndex,
    ) -> Result<StagedPath> {
        let staged = StagedPath::new(path, true)?;
        std::fs::copy(path, staged.path()).map_err(|e| Error::io(path, e))?;
        let mut out = DurableFile::truncate_and_append(staged.path(), path, index_offset)?;
        write_index(&mut out, index, path)?;
        out.finish()?;
        Ok(staged)
    }
}

/// Appends the deflated index and the footer, after the checks the reader makes of an index
/// (an index it would refuse is not written, and the write fails naming what is wrong).
fn write_index(out: &mut DurableFile, index: &FileIndex, path: &Path) -> Result<()> {
    super::validate::check_index(index)
        .map_err(|why| Error::format(path, format!("not written: {why}")))?;
    let json = serde_json::to_vec(index).map_err(|e| Error::format(path, e.to_string()))?;
    let packed = miniz_oxide::deflate::compress_to_vec(&json, 9);
    let index_offset = out.written();
    out.write(&packed)?;
    let mut footer = Vec::with_capacity(FOOTER_LEN as usize);
    footer.extend_from_slice(&index_offset.to_le_bytes());
    footer.extend_from_slice(&(packed.len() as u64).to_le_bytes());
    footer.extend_from_slice(&(json.len() as u64).to_le_bytes());
    footer.extend_from_slice(&super::index::crc32(&packed).to_le_bytes());
    // The index's version: a rewritten version-1 file keeps its version-1 header.
    footer.extend_from_slice(&index.format_version.to_le_bytes());
    footer.extend_from_slice(&END_MAGIC);
    out.write(&footer)
}
