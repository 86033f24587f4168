//! Outputs that appear whole or not at all.
//!
//! Every file or directory udelta-gpu produces is first written under a temporary sibling name
//! (`.NAME.partial-PID`) and renamed into place by [`StagedPath::commit`]. Dropping a
//! `StagedPath` without committing (an error, a panic, an interrupt) removes the temporary.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Temporaries alive right now, so a signal handler can remove them.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A temporary path that becomes `target` on [`commit`](StagedPath::commit).
#[derive(Debug)]
pub struct StagedPath {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedPath {
    /// Stages `target`. Fails if `target` exists and `force` is false; with `force` an existing
    /// target is replaced only at commit.
    pub fn new(target: &Path, force: bool) -> Result<Self> {
        if target.exists() && !force {
            return Err(Error::checkpoint(
                target,
                "output already exists (use --force to replace it)",
            ));
        }
        let name = target
            .file_name()
            .ok_or_else(|| Error::checkpoint(target, "output path has no file name"))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(Error::checkpoint(
                target,
                "the output's parent directory does not exist",
            ));
        }
        let tmp = parent.join(format!(
            ".{}.partial-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        remove_any(&tmp);
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tmp.clone());
        Ok(StagedPath {
            tmp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Where to write now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final name.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the temporary into place (replacing an existing target).
    pub fn commit(mut self) -> Result<()> {
        if self.target.is_dir() && self.tmp.is_dir() {
            std::fs::remove_dir_all(&self.target).map_err(|e| Error::io(&self.target, e))?;
        }
        std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        forget_live(&self.tmp);
        Ok(())
    }
}

impl Drop for StagedPath {
    fn drop(&mut self) {
        if !self.committed {
            remove_any(&self.tmp);
            forget_live(&self.tmp);
        }
    }
}

fn forget_live(p: &Path) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|q| q != p);
}

fn remove_any(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

/// Removes every temporary still alive (for signal handlers; safe to call at any time).
pub fn remove_all_live() {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    for p in live.iter() {
        remove_any(p);
    }
}

/// Bytes written between two background syncs of a [`DurableFile`].
const SYNC_EVERY: u64 = 256 << 20;

/// A buffered output file that is handed to the disk in the background as it grows (so the
/// sync before the final rename is short) and fully synced by [`finish`](Self::finish).
pub struct DurableFile {
    out: BufWriter<File>,
    path: PathBuf,
    written: u64,
    synced_to: u64,
    syncs: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl DurableFile {
    /// Creates `path`; `name` is the path errors mention (the final name of a staged file).
    pub fn create(path: &Path, name: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::io(name, e))?;
        Ok(Self::wrap(file, name, 0))
    }

    /// Opens the existing `path`, cuts it to `len` bytes, and appends from there.
    pub fn truncate_and_append(path: &Path, name: &Path, len: u64) -> Result<Self> {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(name, e))?;
        file.set_len(len).map_err(|e| Error::io(name, e))?;
        file.seek(SeekFrom::Start(len))
            .map_err(|e| Error::io(name, e))?;
        Ok(Self::wrap(file, name, len))
    }

    fn wrap(file: File, name: &Path, written: u64) -> Self {
        DurableFile {
            out: BufWriter::with_capacity(1 << 22, file),
            path: name.to_path_buf(),
            written,
            synced_to: written,
            syncs: Vec::new(),
        }
    }

    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.written += bytes.len() as u64;
        if self.written - self.synced_to >= SYNC_EVERY {
            self.out.flush().map_err(|e| Error::io(&self.path, e))?;
            let file = self
                .out
                .get_ref()
                .try_clone()
                .map_err(|e| Error::io(&self.path, e))?;
            self.syncs.retain(|h| !h.is_finished());
            self.syncs
                .push(std::thread::spawn(move || file.sync_data()));
            self.synced_to = self.written;
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Flushes, waits for the background syncs and syncs the rest.
    pub fn finish(mut self) -> Result<()> {
        for h in self.syncs.drain(..) {
            h.join()
                .unwrap_or(Ok(()))
                .map_err(|e| Error::io(&self.path, e))?;
        }
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_output_vanishes_and_existing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        {
            let s = StagedPath::new(&target, false).unwrap();
            std::fs::write(s.path(), b"half").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let s = StagedPath::new(&target, false).unwrap();
        std::fs::write(s.path(), b"whole").unwrap();
        s.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        let err = StagedPath::new(&target, false).unwrap_err().to_string();
        assert!(
            err.contains("out.bin") && err.contains("already exists"),
            "{err}"
        );
    }
}
