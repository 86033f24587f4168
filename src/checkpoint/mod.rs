//! Checkpoint I/O: safetensors files (single or HF-sharded), dtypes, tensor selection, writing.

pub mod direct;
pub mod dtype;
pub mod reader;
pub mod select;
pub mod side_files;
pub mod views;
pub mod writer;
