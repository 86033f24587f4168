//! What pass 1 keeps of each compressed tensor for pass 2, so that pass 2 reads neither
//! checkpoint again ([`ForSelection`]): when the run's rates have a floor that leaves few
//! candidates, the selection candidates ([`CandidateSet`], about 6 % of the elements at 5
//! bytes each at the defaults), otherwise every element's packed level ([`PackedLevels`], 0.5
//! byte per element at 4 bits). They stay in host memory up to [`KEPT_LEVELS_BUDGET`] bytes
//! (a share of [`super::memory::MEMORY_BOUND`]); beyond it they go to an unnamed temporary file
//! beside the output (deleted by the system when closed, even after a crash), from which pass
//! 2 reads them back. A thread of their own writes them there, so that pass 1 does not wait
//! for the writes.

use super::memory::{bytes_from_env, KEPT_LEVELS_BUDGET};
use super::{timed, Run};
use crate::algorithm::{TensorKey, TensorStats};
use crate::engine::{CandidateSet, KeptEntries, PackedLevels};
use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

impl Run<'_> {
    /// Keeps what pass 2 needs to select tensor `tensor` of model `model` (statistics
    /// `stats`, every element's `levels`): its selection candidates when the run's rate
    /// floor makes them fewer bytes than the levels, else the levels.
    pub(super) fn keep_for_selection(
        &mut self,
        (model, tensor): (&str, &str),
        stats: &TensorStats,
        levels: PackedLevels,
    ) -> Result<Kept> {
        let data = match self.rate_floor {
            Some(floor) if CandidateSet::worth_it(levels.numel(), levels.bytes().len(), floor) => {
                let key = TensorKey::new(self.opts.params.seed, model, tensor);
                let set = timed(&mut self.times.candidates, || {
                    CandidateSet::extract(&levels, stats, key, floor)
                });
                levels.recycle();
                ForSelection::Candidates(set)
            }
            _ => ForSelection::Levels(levels),
        };
        self.kept.keep(data)
    }
}

/// The environment variable that replaces [`KEPT_LEVELS_BUDGET`] (bytes; tests use 0 to send
/// every tensor's levels through the temporary file).
pub const BUDGET_ENV: &str = "UDELTA_KEPT_LEVELS_BUDGET";

/// [`KEPT_LEVELS_BUDGET`], or the number of bytes in `UDELTA_KEPT_LEVELS_BUDGET`.
pub fn host_budget() -> Result<u64> {
    bytes_from_env(BUDGET_ENV, KEPT_LEVELS_BUDGET)
}

/// What pass 2 selects a tensor's kept entries from.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ForSelection {
    /// Every element's level.
    Levels(PackedLevels),
    /// The entries that can survive any rate the run allocates.
    Candidates(CandidateSet),
}

/// What a spilled [`ForSelection`] needs besides its bytes to be rebuilt.
#[derive(Debug, Clone)]
pub(super) enum SpilledShape {
    Levels {
        numel: usize,
        bits: u32,
    },
    Candidates {
        key: TensorKey,
        below: Vec<u64>,
        count: usize,
    },
}

impl ForSelection {
    /// Bytes it takes in memory, and in the temporary file.
    pub fn byte_len(&self) -> usize {
        match self {
            ForSelection::Levels(l) => l.bytes().len(),
            ForSelection::Candidates(c) => c.byte_len(),
        }
    }

    /// Its bytes, in the order written to the file: the packed levels; or the candidates'
    /// positions (little-endian u32) then their levels.
    fn parts(&self) -> [&[u8]; 2] {
        match self {
            ForSelection::Levels(l) => [l.bytes(), &[]],
            ForSelection::Candidates(c) => [bytemuck::cast_slice(&c.positions), &c.levels],
        }
    }

    fn shape(&self) -> SpilledShape {
        match self {
            ForSelection::Levels(l) => SpilledShape::Levels {
                numel: l.numel(),
                bits: l.packing_bits(),
            },
            ForSelection::Candidates(c) => SpilledShape::Candidates {
                key: c.key,
                below: c.below.clone(),
                count: c.len(),
            },
        }
    }

    /// Reads back what [`parts`](Self::parts) wrote at `offset` of `file`.
    fn read_back(
        shape: SpilledShape,
        file: &File,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Self> {
        Ok(match shape {
            SpilledShape::Levels { numel, bits } => {
                let mut data = PackedLevels::buffer(len);
                file.read_exact_at(&mut data, offset)?;
                ForSelection::Levels(
                    PackedLevels::from_bytes(numel, bits, data).expect("the length written"),
                )
            }
            SpilledShape::Candidates { key, below, count } => {
                let KeptEntries {
                    mut positions,
                    mut levels,
                } = KeptEntries::filled(count);
                file.read_exact_at(bytemuck::cast_slice_mut(&mut positions), offset)?;
                file.read_exact_at(&mut levels, offset + 4 * count as u64)?;
                ForSelection::Candidates(CandidateSet {
                    key,
                    below,
                    positions,
                    levels,
                })
            }
        })
    }

    /// Hands its buffers back for the next tensor's ([`PackedLevels::recycle`]).
    pub fn recycle(self) {
        match self {
            ForSelection::Levels(l) => l.recycle(),
            ForSelection::Candidates(c) => c.recycle(),
        }
    }
}

/// One compressed tensor's kept data, in memory or in the temporary file.
#[derive(Debug, Clone)]
pub(super) enum Kept {
    Memory(ForSelection),
    Spilled {
        shape: SpilledShape,
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
    /// Bytes kept, in memory or in the file.
    pub total: u64,
    /// Bytes written to the temporary file.
    pub spilled: u64,
    /// Candidates kept, and tensors kept as candidates.
    pub candidates: u64,
    pub candidate_tensors: u64,
}

/// A thread that writes spilled levels to the temporary file in the order given, then hands
/// their buffers back ([`PackedLevels::recycle`]): writing into the page cache costs about
/// as much as computing the levels on this project's machines, and need not hold up pass 1.
struct SpillWriter {
    /// Kept data and its offset in the file; room for one waiting beside the one being
    /// written, so that at most two tensors' spilled data are in memory.
    jobs: SyncSender<(ForSelection, u64)>,
    thread: JoinHandle<std::io::Result<()>>,
}

impl SpillWriter {
    fn start(file: Arc<File>) -> SpillWriter {
        let (jobs, pending) = sync_channel::<(ForSelection, u64)>(1);
        let thread = std::thread::Builder::new()
            .name("udelta-spill".into())
            .spawn(move || {
                for (data, offset) in pending {
                    let [first, second] = data.parts();
                    file.write_all_at(first, offset)?;
                    file.write_all_at(second, offset + first.len() as u64)?;
                    data.recycle();
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
            total: 0,
            spilled: 0,
            candidates: 0,
            candidate_tensors: 0,
        }
    }

    /// Keeps what pass 2 selects a tensor from (spilled data is written by the writer thread;
    /// a write error shows here for a later tensor, or in [`take`](Self::take)).
    pub fn keep(&mut self, data: ForSelection) -> Result<Kept> {
        let len = data.byte_len();
        self.total += len as u64;
        if let ForSelection::Candidates(c) = &data {
            self.candidates += c.len() as u64;
            self.candidate_tensors += 1;
        }
        if self.in_memory + len as u64 <= self.budget {
            self.in_memory += len as u64;
            return Ok(Kept::Memory(data));
        }
        let offset = self.file_len;
        let shape = data.shape();
        if self.writer.is_none() {
            let file = self.file()?.clone();
            self.writer = Some(SpillWriter::start(file));
        }
        let writer = self.writer.as_ref().expect("just started");
        if writer.jobs.send((data, offset)).is_err() {
            // The writer stopped on an error: report it.
            self.finish_writes()?;
            return Err(self.error(std::io::Error::other("the spill writer stopped")));
        }
        self.file_len += len as u64;
        self.spilled += len as u64;
        Ok(Kept::Spilled { shape, offset, len })
    }

    /// What `kept` holds (read back from the file when spilled, once every write is done).
    pub fn take(&mut self, kept: Kept) -> Result<ForSelection> {
        match kept {
            Kept::Memory(data) => {
                self.in_memory -= data.byte_len() as u64;
                Ok(data)
            }
            Kept::Spilled { shape, offset, len } => {
                self.finish_writes()?;
                let file = self.file.as_ref().expect("a spilled tensor has a file");
                ForSelection::read_back(shape, file, offset, len).map_err(|e| self.error(e))
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
    fn data_beyond_the_budget_goes_to_the_file_and_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = KeptStore::new(10, dir.path());
        let levels = |n: usize| {
            let l: Vec<u8> = (0..n).map(|i| (i % 16) as u8).collect();
            ForSelection::Levels(PackedLevels::pack(&l, 4))
        };
        let candidates = |n: u32| {
            ForSelection::Candidates(CandidateSet {
                key: TensorKey { k0: n, k1: 7 },
                below: vec![3, n as u64],
                positions: (0..n).map(|i| 1_000_000 * i + 5).collect(),
                levels: (0..n).map(|i| (i % 2) as u8).collect(),
            })
        };
        let data = [levels(8), candidates(1), levels(7), candidates(2)];
        let kept: Vec<Kept> = data
            .iter()
            .map(|d| store.keep(d.clone()).unwrap())
            .collect();
        // 4 + 5 bytes fit in 10; the 7 levels (4 bytes) and the 2 candidates (10 bytes) spill.
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
                len: 10,
                ..
            }
        ));
        assert_eq!((store.total, store.spilled), (23, 14));
        assert_eq!((store.candidates, store.candidate_tensors), (3, 2));
        // The file is unnamed: nothing appears in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        for (k, want) in kept.into_iter().zip(&data).rev() {
            assert_eq!(&store.take(k).unwrap(), want);
        }
        assert_eq!(store.in_memory, 0);
    }
}
