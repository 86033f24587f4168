//! The `.udelta` container (format v3, specified in `docs/FORMAT.md`).
//!
//! ```text
//! header  16 bytes: magic "UDELTA\r\n", u32 format version, u32 flags (0)
//! records          : byte blobs (coded tensors, position streams, level streams), each referenced
//!                    from the index by offset, length and CRC-32
//! index            : UTF-8 JSON (`FileIndex`), raw-DEFLATE compressed: parameters, model
//!                    scale, base fingerprint, per-tensor metadata and record references
//! footer  40 bytes: u64 index offset, u64 index stored length, u64 index JSON length,
//!                    u32 CRC-32 of the stored index, u32 format version, magic "UDLTEND\n"
//! ```
//! All integers little-endian. Records come first and the index last because the model's
//! scale (gamma) is known only after every tensor is done.

pub mod index;
pub mod matrix_views;
pub mod reader;
pub mod side_files;
pub mod validate;
pub mod writer;

pub use index::{
    CodedBase, CodedTensor, CompressedTensor, FileIndex, RecordRef, TensorKind, TensorRecord,
};
pub use reader::UdeltaReader;
pub use writer::UdeltaWriter;

/// Leading magic.
pub const MAGIC: [u8; 8] = *b"UDELTA\r\n";
/// Trailing magic.
pub const END_MAGIC: [u8; 8] = *b"UDLTEND\n";
/// The newest format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 3;
/// The version of a file without matrix views: 2, which builds before version 3 read too.
pub const VERSION_WITHOUT_MATRIX_VIEWS: u32 = 2;
/// The first version with matrix views (a 3-D tensor stored as its matrices,
/// [`TensorRecord::matrix_of`]).
pub const MATRIX_VIEWS_VERSION: u32 = 3;

/// The version a file is written in: the oldest that describes it (version 2 unless it holds
/// matrix views), so that older builds read every file they can.
pub fn version_for(matrix_views: bool) -> u32 {
    if matrix_views {
        MATRIX_VIEWS_VERSION
    } else {
        VERSION_WITHOUT_MATRIX_VIEWS
    }
}
/// The oldest format version this build reads (version 1 has no side files).
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// Header length in bytes.
pub const HEADER_LEN: u64 = 16;
/// Footer length in bytes.
pub const FOOTER_LEN: u64 = 40;
/// Largest index this reader accepts (a hostile file cannot make it allocate more).
pub use crate::limits::MAX_UDELTA_INDEX_LEN as MAX_INDEX_LEN;
