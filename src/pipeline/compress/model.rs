//! The state of one fine-tune as it goes through the steps: its tensors' kinds (step 1),
//! plans (pass 1, completed by the allocation) and records (pass 2).

use super::kept::Kept;
use super::open::{Kind, Source};
use crate::algorithm::{Allocation, TensorStats};
use crate::checkpoint::reader::Checkpoint;
use crate::format::side_files::SideFileEntry;
use crate::format::{TensorRecord, UdeltaWriter};
use std::sync::Arc;

/// What pass 1 learned about a compressed tensor.
#[derive(Debug, Clone)]
pub(super) struct Analysis {
    /// The base tensor's index in the base checkpoint.
    pub base: usize,
    /// Elements shared with the base (rows beyond are stored as a raw tail).
    pub shared_numel: usize,
    pub stats: TensorStats,
    pub base_crc32: u32,
    /// Set by the allocation step.
    pub allocation: Option<Allocation>,
    /// The levels pass 2 selects from (taken by pass 2).
    pub kept: Option<Kept>,
    /// The fine-tuned bytes beyond the shared elements (new rows, stored whole).
    pub tail: Vec<u8>,
}

/// How one fine-tuned tensor will be stored, once pass 1 has seen it.
#[derive(Debug, Clone)]
pub(super) enum Plan {
    Unchanged { base_crc32: u32 },
    Raw,
    Compress(Analysis),
}

/// One fine-tune being compressed.
pub(super) struct Model {
    pub name: String,
    pub ckpt: Arc<Checkpoint>,
    pub writer: UdeltaWriter,
    pub kinds: Vec<Kind>,
    pub plans: Vec<Option<Plan>>,
    pub records: Vec<Option<TensorRecord>>,
    /// Sum of the nuclear norms of the compressed, rescaled 2-D deltas.
    pub trace_norm: f64,
    /// The fine-tuned directory's side files, already in the file.
    pub side_files: Vec<SideFileEntry>,
}

impl Model {
    /// A fine-tune that has its output: nothing planned or written yet.
    pub fn new(source: Source, writer: UdeltaWriter, side_files: Vec<SideFileEntry>) -> Model {
        let n = source.ckpt.tensors.len();
        Model {
            name: source.name,
            ckpt: source.ckpt,
            writer,
            kinds: source.kinds,
            plans: vec![None; n],
            records: vec![None; n],
            trace_norm: 0.0,
            side_files,
        }
    }
}
