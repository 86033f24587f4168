//! What pass 1 keeps of each compressed tensor for pass 2, so that pass 2 reads neither
//! checkpoint again: the packed levels ([`PackedLevels`], 0.5 byte per element at 4 bits) and
//! the fine-tuned rows beyond the base's (stored whole). They stay in host memory up to
//! [`KEPT_LEVELS_BUDGET`] bytes (a share of [`super::memory::MEMORY_BOUND`]); beyond it they go to an unnamed temporary file beside the output
//! (deleted by the system when closed, even after a crash), from which pass 2 reads them back.
//! A thread of their own writes them there, so that pass 1 does not wait for the writes.

use super::memory::{bytes_from_env, KEPT_LEVELS_BUDGET};
use crate::engine::PackedLevels;
use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The environment variable that replaces [`KEPT_LEVELS_BUDGET`] (bytes; tests use 0 to send
/// every tensor's levels through the temporary file).
pub const BUDGET_ENV: &str = "UDELTA_KEPT_LEVELS_BUDGET";

/// [`KEPT_LEVELS_BUDGET`], or the number of bytes in `UDELTA_KEPT_LEVELS_BUDGET`.
pub fn host_budget() -> Result<u64> {
    bytes_from_env(BUDGET_ENV, KEPT_LEVELS_BUDGET)
}

/// One compressed tensor's kept data, in memory or in the temporary file.
#[derive(Debug, Clone)]
pub(super) enum Kept {
    Memory(PackedLevels),
    Spilled {
        numel: usize,
        bits: u32,
        offset: u64,
        len: usize,
    },
}

/// The kept levels of a run: a memory budget, then the temporary file.
pub(super) struct KeptStore {
    budget: u64,
    in_memory: u64,
    /// Where the temporary file is made (the output's directory).
    dir: PathBuf,
    file: Option<Arc<File>>,
    file_len: u64,
    /// The thread writing spilled levels, while pass 1 goes on.
    writer: Option<SpillWriter>,
    /// Bytes written to the temporary file.
    pub spilled: u64,
}

/// A thread that writes spilled levels to the temporary file in the order given, then hands
/// their buffers back ([`PackedLevels::recycle`]): writing into the page cache costs about
/// as much as computing the levels on this project's machines, and need not hold up pass 1.
struct SpillWriter {
    /// Levels and their offset in the file; room for one waiting beside the one being
    /// written, so that at most two tensors' spilled levels are in memory.
    jobs: SyncSender<(PackedLevels, u64)>,
    thread: JoinHandle<std::io::Result<()>>,
}

impl SpillWriter {
    fn start(file: Arc<File>) -> SpillWriter {
        let (jobs, pending) = sync_channel::<(PackedLevels, u64)>(1);
        let thread = std::thread::Builder::new()
            .name("udelta-spill".into())
            .spawn(move || {
                for (levels, offset) in pending {
                    file.write_all_at(levels.bytes(), offset)?;
                    levels.recycle();
                }
                Ok(())
            })
            .expect("spawning the spill writer thread");
        SpillWriter { jobs, thread }
    }

    /// Waits for every write handed over; the first error, if any.
    fn finish(self) -> std::io::Result<()> {
        drop(self.jobs);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spill writer thread panicked")))
    }
}

impl KeptStore {
    /// A store holding up to `budget` bytes in memory, spilling into a file made in `dir`.
    pub fn new(budget: u64, dir: &Path) -> KeptStore {
        KeptStore {
            budget,
            in_memory: 0,
            dir: dir.to_path_buf(),
            file: None,
            file_len: 0,
            writer: None,
            spilled: 0,
        }
    }

    /// Keeps the levels of a tensor of `bits` bits (spilled ones are written by the writer
    /// thread; a write error shows here for a later tensor, or in [`take`](Self::take)).
    pub fn keep(&mut self, levels: PackedLevels, bits: u32) -> Result<Kept> {
        let len = levels.bytes().len();
        if self.in_memory + len as u64 <= self.budget {
            self.in_memory += len as u64;
            return Ok(Kept::Memory(levels));
        }
        let offset = self.file_len;
        let numel = levels.numel();
        if self.writer.is_none() {
            let file = self.file()?.clone();
            self.writer = Some(SpillWriter::start(file));
        }
        let writer = self.writer.as_ref().expect("just started");
        if writer.jobs.send((levels, offset)).is_err() {
            // The writer stopped on an error: report it.
            self.finish_writes()?;
            return Err(self.error(std::io::Error::other("the spill writer stopped")));
        }
        self.file_len += len as u64;
        self.spilled += len as u64;
        Ok(Kept::Spilled {
            numel,
            bits,
            offset,
            len,
        })
    }

    /// The levels `kept` holds (read back from the file when spilled, once every write is
    /// done).
    pub fn take(&mut self, kept: Kept) -> Result<PackedLevels> {
        match kept {
            Kept::Memory(levels) => {
                self.in_memory -= levels.bytes().len() as u64;
                Ok(levels)
            }
            Kept::Spilled {
                numel,
                bits,
                offset,
                len,
            } => {
                self.finish_writes()?;
                let mut data = PackedLevels::buffer(len);
                let file = self.file.as_ref().expect("a spilled tensor has a file");
                file.read_exact_at(&mut data, offset)
                    .map_err(|e| self.error(e))?;
                Ok(PackedLevels::from_bytes(numel, bits, data).expect("the length written"))
            }
        }
    }

    /// Waits for the writer thread, if one runs, to write everything handed over.
    fn finish_writes(&mut self) -> Result<()> {
        match self.writer.take() {
            Some(w) => w.finish().map_err(|e| self.error(e)),
            None => Ok(()),
        }
    }

    fn file(&mut self) -> Result<&Arc<File>> {
        if self.file.is_none() {
            let f = tempfile::tempfile_in(&self.dir).map_err(|e| self.error(e))?;
            self.file = Some(Arc::new(f));
        }
        Ok(self.file.as_ref().expect("just made"))
    }

    fn error(&self, e: std::io::Error) -> Error {
        Error::io(
            &self.dir,
            std::io::Error::new(
                e.kind(),
                format!("temporary file of the levels kept between the passes: {e}"),
            ),
        )
    }
}

impl Drop for KeptStore {
    fn drop(&mut self) {
        // No write outlives the run (its error, if any, no longer matters).
        let _ = self.finish_writes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_beyond_the_budget_go_to_the_file_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = KeptStore::new(10, dir.path());
        let tensors: Vec<PackedLevels> = [8usize, 12, 7, 3]
            .iter()
            .map(|&n| PackedLevels::pack(&(0..n).map(|i| (i % 16) as u8).collect::<Vec<_>>(), 4))
            .collect();
        let kept: Vec<Kept> = tensors
            .iter()
            .map(|t| store.keep(t.clone(), 4).unwrap())
            .collect();
        // 4 + 6 bytes fit in 10; the 7-level tensor (4 bytes) and the next spill.
        assert!(matches!(kept[0], Kept::Memory(_)) && matches!(kept[1], Kept::Memory(_)));
        assert!(matches!(
            kept[2],
            Kept::Spilled {
                offset: 0,
                len: 4,
                ..
            }
        ));
        assert!(matches!(
            kept[3],
            Kept::Spilled {
                offset: 4,
                len: 2,
                ..
            }
        ));
        assert_eq!(store.spilled, 6);
        // The file is unnamed: nothing appears in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        for (k, want) in kept.into_iter().zip(&tensors).rev() {
            assert_eq!(&store.take(k).unwrap(), want);
        }
        assert_eq!(store.in_memory, 0);
    }
}
