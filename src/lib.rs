//! udelta-gpu: UltraDelta compression of fine-tuned LLM weight deltas, on the GPU through wgpu
//! compute shaders, with a CPU reference engine that produces the same bytes.
//!
//! Data flow (one module per stage):
//! [`checkpoint`] (read safetensors) -> [`engine`] (delta, min/max, levels, selection) with the
//! pure rules of [`algorithm`] -> [`codec`] (entropy coding) -> [`format`] (the `.udelta`
//! container) -> [`pipeline`] (compress / decompress orchestration) -> [`cli`].

pub mod algorithm;
pub mod bytesource;
pub mod checkpoint;
pub mod cli;
pub mod codec;
mod disjoint;
pub mod engine;
pub mod error;
pub mod format;
pub mod fuzzing;
pub mod limits;
pub mod no_replace;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod report;
pub mod restore;
pub mod simd;
pub mod special_files;
pub mod splitmix;
pub mod staging;
pub mod synth;
pub mod tracenorm;

pub use error::{Error, Result};
