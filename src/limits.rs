//! Every limit on how much udelta-gpu reads from one file, in one place.
//!
//! Each file the tool reads is read against one of these bounds, and refused with an error
//! naming it (and the limit) when it is larger, before its contents are allocated: a hostile
//! or mistaken input (a 10 GB `config.json`, a FIFO, a header claiming a terabyte) can make the
//! tool fail, never exhaust memory. Tensor data is never read whole (see
//! [`crate::checkpoint::reader`]), so it needs no limit here.

/// Largest safetensors JSON header, in bytes (the limit the `safetensors` crate uses too).
pub const MAX_SAFETENSORS_HEADER_LEN: u64 = 100_000_000;

/// Largest `model.safetensors.index.json` (shard index), in bytes: about 100 bytes per tensor,
/// so room for over half a million tensors.
pub const MAX_SHARD_INDEX_LEN: u64 = 64 << 20;

/// Largest side file carried (`config.json`, tokenizer files: a LLaMA-3 `tokenizer.json` is
/// 9 MB, Gemma's 33 MB).
pub const MAX_SIDE_FILE_LEN: u64 = 64 << 20;

/// Largest total of the side files of one model.
pub const MAX_SIDE_FILES_TOTAL: u64 = 256 << 20;

/// Largest `.udelta` index, stored (deflated) and inflated, in bytes.
pub const MAX_UDELTA_INDEX_LEN: u64 = 256 << 20;
