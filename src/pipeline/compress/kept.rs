//! What pass 1 keeps of each compressed tensor for pass 2, so that pass 2 reads neither
//! checkpoint again: the packed levels ([`PackedLevels`], 0.5 byte per element at 4 bits) and
//! the fine-tuned rows beyond the base's (stored whole). They stay in host memory up to
//! [`KEPT_LEVELS_BUDGET`] bytes (a share of [`super::memory::MEMORY_BOUND`]); beyond it they go to an unnamed temporary file beside the output
//! (deleted by the system when closed, even after a crash), from which pass 2 reads them back.

use super::memory::{bytes_from_env, KEPT_LEVELS_BUDGET};
use crate::engine::PackedLevels;
use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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
    file: Option<File>,
    file_len: u64,
    /// Bytes written to the temporary file.
    pub spilled: u64,
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
            spilled: 0,
        }
    }

    /// Keeps the levels of a tensor of `bits` bits.
    pub fn keep(&mut self, levels: PackedLevels, bits: u32) -> Result<Kept> {
        let len = levels.bytes().len();
        if self.in_memory + len as u64 <= self.budget {
            self.in_memory += len as u64;
            return Ok(Kept::Memory(levels));
        }
        let offset = self.file_len;
        self.file()?
            .write_all_at(levels.bytes(), offset)
            .map_err(|e| self.error(e))?;
        self.file_len += len as u64;
        self.spilled += len as u64;
        let numel = levels.numel();
        levels.recycle();
        Ok(Kept::Spilled {
            numel,
            bits,
            offset,
            len,
        })
    }

    /// The levels `kept` holds (read back from the file when spilled).
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
                let mut data = PackedLevels::buffer(len);
                let file = self.file.as_ref().expect("a spilled tensor has a file");
                file.read_exact_at(&mut data, offset)
                    .map_err(|e| self.error(e))?;
                Ok(PackedLevels::from_bytes(numel, bits, data).expect("the length written"))
            }
        }
    }

    fn file(&mut self) -> Result<&File> {
        if self.file.is_none() {
            let f = tempfile::tempfile_in(&self.dir).map_err(|e| self.error(e))?;
            self.file = Some(f);
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
