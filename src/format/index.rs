//! The JSON index of a `.udelta` file.

use super::side_files::SideFileEntry;
use crate::algorithm::{CompressParams, Group};
use crate::checkpoint::views::MatrixOf;
use crate::codec::BlockInfo;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A byte range of the file holding one record, with its CRC-32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RecordRef {
    /// Absolute file offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// CRC-32 (IEEE) of the bytes.
    pub crc32: u32,
}

/// The model-wide scale: kept values are multiplied by `scale = gamma * factor / (1 - s)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The fine-tune's name (its path's last component); part of the selection hash.
    pub name: String,
    /// `factor / (1 - s)`.
    pub rescale: f64,
    /// Trace-norm rescaling factor (1 for a model compressed alone).
    pub gamma: f64,
    /// Sum of nuclear norms of the compressed, rescaled deltas (`T_m`), when estimated.
    pub trace_norm: Option<f64>,
    /// `gamma * rescale`: what decompress multiplies every kept value by.
    pub scale: f64,
}

/// How the fine-tuned checkpoint was laid out, to write it back the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceLayout {
    /// `single` (one .safetensors file), `directory` (DIR/model.safetensors) or `sharded`.
    pub layout: String,
    /// The files, in order, with their `__metadata__`.
    pub shards: Vec<ShardInfo>,
    /// The `metadata` object of `model.safetensors.index.json`, for sharded checkpoints.
    pub index_metadata: Option<serde_json::Value>,
}

/// One file of the fine-tuned checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name.
    pub file_name: String,
    /// Its safetensors `__metadata__`.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Identity of the base checkpoint the file was made against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseInfo {
    /// CRC-32, hex: with `identity` [`BASE_IDENTITY_HEADER`], over the name, dtype and shape of
    /// every base tensor (the whole base, whichever tensors the fine-tune used); without it
    /// (older files), over the names and CRC-32s of the base tensors used.
    pub fingerprint: String,
    /// Number of base tensors the fingerprint covers.
    pub tensors: usize,
    /// What the fingerprint covers; absent in files written before it was the whole base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// [`BaseInfo::identity`] of a fingerprint over every base tensor's name, dtype and shape.
pub const BASE_IDENTITY_HEADER: &str = "names-dtypes-shapes";

/// Everything about one compressed tensor except its streams' bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressedTensor {
    /// Base tensor dtype (safetensors spelling).
    pub base_dtype: String,
    /// Base tensor shape.
    pub base_shape: Vec<usize>,
    /// CRC-32 of the base tensor's bytes.
    pub base_crc32: u32,
    /// Elements shared with the base (all of them unless the vocabulary grew).
    pub shared_numel: u64,
    /// Bits of the smallest delta (`lo`, f32).
    pub lo_bits: u32,
    /// Bits of the largest delta (`hi`, f32).
    pub hi_bits: u32,
    /// Bit width.
    pub bits: u32,
    /// Allocation group.
    pub group: Group,
    /// Pruning rate `r`.
    pub rate: f64,
    /// Zero-adjusted rate `r'`.
    pub adjusted_rate: f64,
    /// Standard deviation of the dequantized delta.
    pub std: f64,
    /// Entries per level.
    pub histogram: Vec<u64>,
    /// Kept entries per level.
    pub kept_counts: Vec<u64>,
    /// Codec blocks.
    pub blocks: Vec<BlockInfo>,
    /// Position stream.
    pub positions: RecordRef,
    /// Level stream.
    pub levels: RecordRef,
    /// Raw bytes of the fine-tune's rows beyond the base (vocabulary growth).
    pub tail: Option<RecordRef>,
}

impl CompressedTensor {
    /// `lo` as f32.
    pub fn lo(&self) -> f32 {
        f32::from_bits(self.lo_bits)
    }
    /// `hi` as f32.
    pub fn hi(&self) -> f32 {
        f32::from_bits(self.hi_bits)
    }
    /// The quantization grid.
    pub fn grid(&self) -> crate::algorithm::QuantGrid {
        crate::algorithm::QuantGrid {
            lo: self.lo(),
            hi: self.hi(),
            bits: self.bits,
        }
    }
    /// Number of kept entries.
    pub fn kept(&self) -> u64 {
        self.kept_counts.iter().sum()
    }
}

/// The base tensor a losslessly coded tensor was coded against (same name and dtype; its
/// words are the first words of the fine-tune's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodedBase {
    /// Base tensor shape (equal to the fine-tune's, or fewer rows when the vocabulary grew).
    pub shape: Vec<usize>,
    /// CRC-32 of the base tensor's bytes.
    pub crc32: u32,
}

/// A tensor stored losslessly by `codec::lossless`, against its base or alone (format v2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodedTensor {
    /// The base tensor it is coded against; `None` when coded alone.
    pub base: Option<CodedBase>,
    /// Byte length of each block's stream, in order.
    pub blocks: Vec<u64>,
    /// The concatenated block streams.
    pub data: RecordRef,
    /// CRC-32 of the restored (fine-tuned) tensor bytes.
    pub restored_crc32: u32,
}

/// How one fine-tuned tensor is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TensorKind {
    /// Identical to the base tensor (same dtype, shape and bytes): costs nothing.
    Unchanged {
        /// CRC-32 of the base bytes.
        base_crc32: u32,
    },
    /// Stored verbatim (written by format version 1 only).
    Raw {
        /// The bytes.
        data: RecordRef,
    },
    /// Stored losslessly, coded against the base (format version 2).
    Coded(Box<CodedTensor>),
    /// UltraDelta-compressed delta.
    Compressed(Box<CompressedTensor>),
}

impl TensorKind {
    /// The CRC-32 of the base tensor this entry needs, `None` if it needs none.
    pub fn base_crc32(&self) -> Option<u32> {
        match self {
            TensorKind::Unchanged { base_crc32 } => Some(*base_crc32),
            TensorKind::Compressed(c) => Some(c.base_crc32),
            TensorKind::Coded(c) => c.base.as_ref().map(|b| b.crc32),
            TensorKind::Raw { .. } => None,
        }
    }
}

/// One tensor of the fine-tuned checkpoint, in file order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorRecord {
    /// Name.
    pub name: String,
    /// Fine-tuned dtype (safetensors spelling).
    pub dtype: String,
    /// Fine-tuned shape.
    pub shape: Vec<usize>,
    /// Index into `SourceLayout::shards`.
    pub shard: usize,
    /// For one matrix of a 3-D tensor (format version 3): that tensor. The matrices of a
    /// 3-D tensor are consecutive records, in order; restoring writes the one tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix_of: Option<MatrixOf>,
    /// How it is stored.
    #[serde(flatten)]
    pub kind: TensorKind,
}

/// The whole index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileIndex {
    /// Format version (1, 2 or 3).
    pub format_version: u32,
    /// Writer, e.g. `udelta-gpu 0.1.0`.
    pub tool: String,
    /// Engine that computed the payloads (informational; payloads do not depend on it).
    pub engine: String,
    /// UltraDelta parameters.
    pub params: CompressParams,
    /// Model name and scale.
    pub model: ModelInfo,
    /// Base identity.
    pub base: BaseInfo,
    /// Fine-tuned layout.
    pub source: SourceLayout,
    /// Every tensor of the fine-tune.
    pub tensors: Vec<TensorRecord>,
    /// The fine-tuned directory's other files (version 2; absent: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub side_files: Vec<SideFileEntry>,
}

/// Bytes per piece when [`crc32`] checksums a large buffer on several threads.
const CRC_PIECE: usize = 4 << 20;

/// CRC-32 of `bytes`. Buffers of more than two pieces ([`CRC_PIECE`]) are checksummed piece by
/// piece in parallel and the pieces' CRCs combined in order (the same value).
pub fn crc32(bytes: &[u8]) -> u32 {
    use rayon::prelude::*;
    if bytes.len() <= 2 * CRC_PIECE {
        return crc32fast::hash(bytes);
    }
    let pieces: Vec<crc32fast::Hasher> = bytes
        .par_chunks(CRC_PIECE)
        .map(|piece| {
            let mut h = crc32fast::Hasher::new();
            h.update(piece);
            h
        })
        .collect();
    let mut whole = crc32fast::Hasher::new();
    pieces.iter().for_each(|h| whole.combine(h));
    whole.finalize()
}

#[cfg(test)]
mod crc_tests {
    use super::*;

    #[test]
    fn crc32_in_pieces_equals_the_sequential_crc() {
        // The check value of CRC-32 (ISO-HDLC).
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        // Several pieces and a short last one.
        let bytes: Vec<u8> = (0..3 * CRC_PIECE + 12_345)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8)
            .collect();
        let mut sequential = crc32fast::Hasher::new();
        for chunk in bytes.chunks(1000) {
            sequential.update(chunk);
        }
        assert_eq!(crc32(&bytes), sequential.finalize());
    }
}
