//! Orchestration of whole runs: reading checkpoints, driving an engine, coding, writing.

pub mod compress;
pub mod decompress;
pub mod lossless;
pub mod norm_worker;
pub mod prefetch;
pub mod rescale;
pub mod side_files;
pub mod verify;
