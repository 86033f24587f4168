//! In-memory entry points of the decoders, shared by the `cargo fuzz` targets (`fuzz/`) and
//! the corpus regression test (`tests/fuzz_corpus.rs`), so that every corpus file and crash
//! reproducer runs through exactly what the fuzzer ran, on stable Rust and without temporary
//! files. See `docs/FUZZING.md`.
//!
//! Each entry point takes arbitrary bytes and returns `Ok` with a short summary of what was
//! decoded, or the decoder's error as text. Hostile input must only ever produce an `Err`: a
//! panic, a hang or an unbounded allocation is a bug. The entry points also check what the
//! decoders promise (decoded positions increasing and inside the tensor, re-encoding a
//! decoded codec payload gives back the same bytes, ...) with `assert!`, so that the fuzzer
//! reports a broken promise as a crash.

use crate::bytesource::ByteSource;
use crate::checkpoint::dtype::{byte_len, dtype_from_name, Dtype, FloatType};
use crate::checkpoint::reader::{parse_shard_header, parse_shard_index};
use crate::codec::{self, BlockInfo, BLOCK_ELEMENTS};
use crate::format::{
    CodedTensor, CompressedTensor, TensorKind, TensorRecord, UdeltaReader, END_MAGIC,
    FORMAT_VERSION, MAGIC,
};
use crate::pipeline::decompress::{decode_kept, reconstruct};
use crate::pipeline::lossless::restore_coded;
use std::path::Path;

/// The name the in-memory `.udelta` files carry in errors.
pub const UDELTA_NAME: &str = "fuzz.udelta";

/// The name the in-memory safetensors files carry in errors.
pub const SAFETENSORS_NAME: &str = "fuzz.safetensors";

/// The name the in-memory shard indexes carry in errors.
pub const SHARD_INDEX_NAME: &str = "model.safetensors.index.json";

/// Largest base tensor (elements) the `.udelta` targets make up to decode a compressed tensor
/// against. A real decompression decodes only against a base tensor of the shape the file
/// states, which bounds its memory by the base's size; the targets make their synthetic base
/// only this large, so larger tensors are checked and opened but not decoded.
pub const MAX_SYNTHETIC_NUMEL: u64 = 1 << 20;

/// Largest tensor (elements) the `codec_streams` target decodes: two blocks and a part.
pub const MAX_CODEC_NUMEL: u64 = 2 * BLOCK_ELEMENTS + 4096;

/// Opens `data` as a `.udelta` file and decodes every tensor: raw records are read and checked
/// against their shape; compressed tensors are decoded and applied to a synthetic base tensor
/// of the dtype and shape the file states (when it has at most [`MAX_SYNTHETIC_NUMEL`]
/// elements). Returns the number of tensors decoded.
pub fn udelta_file(data: &[u8]) -> Result<usize, String> {
    let reader = UdeltaReader::from_bytes(Path::new(UDELTA_NAME), data.to_vec())
        .map_err(|e| e.to_string())?;
    let mut decoded = 0;
    for r in &reader.index.tensors {
        if decode_record(&reader, r).map_err(|e| e.to_string())? {
            decoded += 1;
        }
    }
    Ok(decoded)
}

/// Decodes one tensor of an opened file; `Ok(false)` if there was nothing to decode (an
/// unchanged tensor, or one larger than [`MAX_SYNTHETIC_NUMEL`]).
fn decode_record(reader: &UdeltaReader, r: &TensorRecord) -> crate::Result<bool> {
    // The reader checked the dtypes and that the byte lengths fit in u64.
    let dtype = dtype_from_name(&r.dtype).expect("the reader checks dtypes");
    let want_len = byte_len(dtype, shape_numel(&r.shape));
    let out = match &r.kind {
        TensorKind::Unchanged { .. } => return Ok(false),
        TensorKind::Raw { data } => reader.read_record(data, &format!("tensor '{}'", r.name))?,
        TensorKind::Coded(c) => match decode_coded(reader, r, c, dtype, want_len)? {
            Some(out) => out,
            None => return Ok(false),
        },
        TensorKind::Compressed(c) => match decode_compressed(reader, r, c, dtype)? {
            Some(out) => out,
            None => return Ok(false),
        },
    };
    if out.len() as u64 != want_len {
        return Err(crate::Error::format(
            reader.path(),
            format!("tensor '{}': restored size differs from its shape", r.name),
        ));
    }
    Ok(true)
}

/// Decodes compressed tensor `c` (record `r`, fine-tuned dtype `dtype`) against a synthetic
/// base; `None` if the base would be larger than [`MAX_SYNTHETIC_NUMEL`].
fn decode_compressed(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CompressedTensor,
    dtype: Dtype,
) -> crate::Result<Option<Vec<u8>>> {
    let base_dtype = dtype_from_name(&c.base_dtype).expect("the reader checks dtypes");
    let base_numel = shape_numel(&c.base_shape);
    if base_numel > MAX_SYNTHETIC_NUMEL {
        return Ok(None);
    }
    let not_float = || {
        crate::Error::format(
            reader.path(),
            format!(
                "tensor '{}': compressed tensor of a non-float dtype",
                r.name
            ),
        )
    };
    let base_type = FloatType::from_dtype(base_dtype).ok_or_else(not_float)?;
    let out_type = FloatType::from_dtype(dtype).ok_or_else(not_float)?;
    let (positions, levels) = decode_kept(reader, r, c)?;
    assert!(
        positions.windows(2).all(|w| w[0] < w[1])
            && positions
                .last()
                .is_none_or(|&p| u64::from(p) < c.shared_numel),
        "decoded positions must increase and lie inside the tensor"
    );
    assert!(
        levels.iter().all(|&l| usize::from(l) < c.kept_counts.len()),
        "decoded levels must lie on the grid"
    );
    let values: Vec<f32> = (0..base_numel).map(synthetic_value).collect();
    let mut base = Vec::new();
    base_type.encode_into(&values, &mut base);
    reconstruct(reader, r, c, base, base_type, out_type).map(Some)
}

/// Decodes coded tensor `c` (record `r`, `want_len` bytes of `dtype`) over a zero base;
/// `None` if it would be larger than [`MAX_SYNTHETIC_NUMEL`] elements. (Against the wrong
/// base, a tensor coded against one fails its restored checksum: an error, as it should be.)
fn decode_coded(
    reader: &UdeltaReader,
    r: &TensorRecord,
    c: &CodedTensor,
    dtype: Dtype,
    want_len: u64,
) -> crate::Result<Option<Vec<u8>>> {
    if shape_numel(&r.shape) > MAX_SYNTHETIC_NUMEL {
        return Ok(None);
    }
    let base = c
        .base
        .as_ref()
        .map(|b| vec![0u8; byte_len(dtype, shape_numel(&b.shape)) as usize]);
    restore_coded(reader, r, c, dtype, want_len, base, true).map(Some)
}

/// Element `i` of a synthetic base tensor: small, varied, exactly representable in f16.
fn synthetic_value(i: u64) -> f32 {
    ((i % 17) as f32 - 8.0) * 0.125
}

/// Elements of a shape the reader has checked not to overflow.
fn shape_numel(shape: &[usize]) -> u64 {
    shape.iter().map(|&d| d as u64).product()
}

/// A `.udelta` container around `records` (placed right after the header, so a record
/// reference's offset is 16 + its position in `records`) and the index JSON `json`, with a
/// correct footer, checksum and deflated index. Header and footer carry the index's
/// `format_version` when it has a numeric one (a version-1 seed stays a version-1 file), else
/// [`FORMAT_VERSION`].
pub fn udelta_container(records: &[u8], json: &[u8]) -> Vec<u8> {
    let version = serde_json::from_slice::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("format_version")?.as_u64())
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(FORMAT_VERSION);
    let packed = miniz_oxide::deflate::compress_to_vec(json, 6);
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(records);
    let index_offset = out.len() as u64;
    out.extend_from_slice(&packed);
    for word in [index_offset, packed.len() as u64, json.len() as u64] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(&crate::format::index::crc32(&packed).to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&END_MAGIC);
    out
}

/// Splits a `udelta_index` input: `u32` LE length `n`, `n` bytes of records, then the index
/// JSON (a short input is all JSON and no records).
pub fn split_index_input(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return (&[], data);
    };
    let n = (u32::from_le_bytes(*len) as usize).min(rest.len());
    rest.split_at(n)
}

/// The inverse of [`split_index_input`].
pub fn join_index_input(records: &[u8], json: &[u8]) -> Vec<u8> {
    let mut out = (records.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(records);
    out.extend_from_slice(json);
    out
}

/// Treats `data` as records and an index JSON ([`split_index_input`]), wraps them in a valid
/// container ([`udelta_container`]) and runs [`udelta_file`] on it, so that the fuzzer
/// mutates the index directly instead of fighting the deflate stream and its checksum.
pub fn udelta_index(data: &[u8]) -> Result<usize, String> {
    let (records, json) = split_index_input(data);
    udelta_file(&udelta_container(records, json))
}

/// Little-endian reader of the `codec_streams` input; reads past the end give zeros.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u32(&mut self) -> u32 {
        let mut word = [0u8; 4];
        let n = self.0.len().min(4);
        word[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        u32::from_le_bytes(word)
    }
}

/// One `codec_streams` input, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecInput {
    /// Elements of the tensor (at most [`MAX_CODEC_NUMEL`]).
    pub numel: u64,
    /// Kept entries per level (`2^bits` of them).
    pub kept_counts: Vec<u64>,
    /// The block table (`block_count(numel)` entries).
    pub blocks: Vec<BlockInfo>,
    /// The position streams.
    pub positions: Vec<u8>,
    /// The level streams.
    pub levels: Vec<u8>,
}

impl CodecInput {
    /// Parses `data`: `u32` bits (taken mod 8, plus 1), `u32` numel (mod
    /// `MAX_CODEC_NUMEL + 1`), `2^bits` `u32` kept counts, for every block `u32` kept,
    /// position bytes and level bytes, then the position streams (as many bytes as the table
    /// says, or what is left) and the level streams (the rest). Missing bytes read as zeros.
    pub fn parse(data: &[u8]) -> Self {
        let mut cur = Cursor(data);
        let bits = cur.u32() % 8 + 1;
        let numel = u64::from(cur.u32()) % (MAX_CODEC_NUMEL + 1);
        let kept_counts = (0..1u32 << bits).map(|_| u64::from(cur.u32())).collect();
        let blocks: Vec<BlockInfo> = (0..codec::block_count(numel))
            .map(|_| BlockInfo {
                kept: cur.u32(),
                position_bytes: cur.u32(),
                level_bytes: cur.u32(),
            })
            .collect();
        let pos_len: u64 = blocks.iter().map(|b| u64::from(b.position_bytes)).sum();
        let rest = cur.0;
        let (positions, levels) = rest.split_at((pos_len.min(rest.len() as u64)) as usize);
        CodecInput {
            numel,
            kept_counts,
            blocks,
            positions: positions.to_vec(),
            levels: levels.to_vec(),
        }
    }

    /// The bytes [`CodecInput::parse`] reads back as `self` (for `numel`, `kept_counts` and
    /// `blocks` in range).
    pub fn to_bytes(&self) -> Vec<u8> {
        let bits = self.kept_counts.len().trailing_zeros();
        let mut words = vec![bits.saturating_sub(1), self.numel as u32];
        words.extend(self.kept_counts.iter().map(|&c| c as u32));
        for b in &self.blocks {
            words.extend([b.kept, b.position_bytes, b.level_bytes]);
        }
        let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.extend_from_slice(&self.positions);
        out.extend_from_slice(&self.levels);
        out
    }
}

/// Decodes the codec payload described by `data` ([`CodecInput::parse`]) with
/// [`codec::decode_tensor`]; when it decodes, re-encodes the result and checks that it gives
/// back the same block table and streams (the streams are canonical). Returns the number of
/// kept entries.
pub fn codec_streams(data: &[u8]) -> Result<usize, String> {
    let input = CodecInput::parse(data);
    let (positions, levels) = codec::decode_tensor(
        input.numel,
        &input.kept_counts,
        &input.blocks,
        &input.positions,
        &input.levels,
    )
    .map_err(|e| e.to_string())?;
    assert!(
        positions.windows(2).all(|w| w[0] < w[1])
            && positions.last().is_none_or(|&p| u64::from(p) < input.numel),
        "decoded positions must increase and lie inside the tensor"
    );
    let again = codec::encode_tensor(input.numel, &positions, &levels, &input.kept_counts)
        .expect("a decoded payload must encode");
    assert_eq!(
        again.blocks, input.blocks,
        "block table differs on re-encoding"
    );
    assert!(
        again.positions == input.positions && again.levels == input.levels,
        "streams differ on re-encoding"
    );
    Ok(positions.len())
}

/// Parses `data` as a safetensors file ([`parse_shard_header`]) and, for every tensor, takes
/// its bytes and, for a float dtype, decodes them. Returns the number of tensors.
pub fn safetensors_header(data: &[u8]) -> Result<usize, String> {
    let path = Path::new(SAFETENSORS_NAME);
    let header = parse_shard_header(path, &data).map_err(|e| e.to_string())?;
    let mut end = 0usize;
    for (name, info) in &header.tensors {
        let (s, e) = info.data_offsets;
        assert_eq!(s, end, "tensor '{name}': data must be contiguous");
        end = e;
        let numel = shape_numel(&info.shape);
        assert_eq!(
            (e - s) as u64,
            byte_len(info.dtype, numel),
            "tensor '{name}': size must match its shape"
        );
        let bytes = data
            .read_vec_at(header.data_start + s as u64, (e - s) as u64)
            .map_err(|err| format!("{SAFETENSORS_NAME}: tensor '{name}': {err}"))?;
        if let Some(ft) = FloatType::from_dtype(info.dtype) {
            let mut values = Vec::new();
            ft.decode_into(&bytes, &mut values);
            assert_eq!(values.len() as u64, numel, "tensor '{name}': element count");
        }
    }
    assert_eq!(end as u64, header.data_len, "data section length");
    Ok(header.tensors.len())
}

/// Parses `data` as a shard index ([`parse_shard_index`]). Returns the number of entries of
/// its weight map.
pub fn safetensors_index(data: &[u8]) -> Result<usize, String> {
    parse_shard_index(Path::new(SHARD_INDEX_NAME), data)
        .map(|(_, map)| map.len())
        .map_err(|e| e.to_string())
}

/// An entry point: bytes in, a count of what was decoded or the error as text out.
pub type EntryPoint = fn(&[u8]) -> Result<usize, String>;

/// The fuzz targets by name, as the corpus directories `fuzz/corpus/<name>` are named.
pub const TARGETS: [(&str, EntryPoint); 5] = [
    ("udelta_file", udelta_file),
    ("udelta_index", udelta_index),
    ("codec_streams", codec_streams),
    ("safetensors_header", safetensors_header),
    ("safetensors_index", safetensors_index),
];
