//! The side files in the index (format version 2): a fine-tune's config, tokenizer and other
//! non-weight files, each coded against the base's file of the same path, and the checks a
//! reader makes on them before anything is written (`docs/FORMAT.md`, "Side files").

use super::index::{FileIndex, RecordRef};
use crate::checkpoint::reader::INDEX_FILE_NAME;
use crate::checkpoint::side_files::{
    check_relative_path, MAX_SIDE_FILES, MAX_SIDE_FILES_TOTAL, MAX_SIDE_FILE_LEN,
};
use crate::codec::prefixed::max_frame_len;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The base's file a side file was coded against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseFileRef {
    /// Its length in bytes.
    pub len: u64,
    /// Its CRC-32.
    pub crc32: u32,
}

/// One side file of the fine-tuned directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideFileEntry {
    /// Path relative to the checkpoint directory, `/`-separated.
    pub path: String,
    /// Length of the file in bytes.
    pub len: u64,
    /// CRC-32 of the file.
    pub crc32: u32,
    /// The base's file of the same path, when the file is coded against it.
    pub base: Option<BaseFileRef>,
    /// The zstd frame (`codec::prefixed`), or null when the file is the base's file itself.
    pub data: Option<RecordRef>,
}

/// How a side file is stored, for `inspect`.
impl SideFileEntry {
    /// `same as base`, `against base` or `alone`.
    pub fn coding(&self) -> &'static str {
        match (&self.data, &self.base) {
            (None, _) => "same as base",
            (Some(_), Some(_)) => "against base",
            (Some(_), None) => "alone",
        }
    }

    /// Bytes it takes in the file's records.
    pub fn stored_len(&self) -> u64 {
        self.data.map_or(0, |d| d.len)
    }
}

/// Checks the side files of `index`: none in a version-1 file; at most [`MAX_SIDE_FILES`], each
/// at most [`MAX_SIDE_FILE_LEN`] (base files too) and [`MAX_SIDE_FILES_TOTAL`] in all; safe,
/// distinct paths that collide with no weight file decompression writes and with no folder
/// another path needs; a record inside the file (`in_range`), or, without one, a base file of
/// the same length and CRC-32. Returns what is wrong, naming the side file.
pub fn check(index: &FileIndex, in_range: impl Fn(&RecordRef) -> bool) -> Result<(), String> {
    let files = &index.side_files;
    if index.format_version < 2 && !files.is_empty() {
        return Err("side files in a version-1 file".into());
    }
    if files.len() > MAX_SIDE_FILES {
        return Err(format!("more than {MAX_SIDE_FILES} side files"));
    }
    let mut total = 0u64;
    for f in files {
        check_entry(f, &in_range).map_err(|why| format!("side file '{}': {why}", f.path))?;
        total += f.len; // each is at most 64 MiB, their count at most 4096: no overflow
    }
    if total > MAX_SIDE_FILES_TOTAL {
        return Err(format!(
            "side files of {total} bytes in all, over the limit of {MAX_SIDE_FILES_TOTAL}"
        ));
    }
    check_paths_distinct(index)
}

fn check_entry(f: &SideFileEntry, in_range: &impl Fn(&RecordRef) -> bool) -> Result<(), String> {
    check_relative_path(&f.path)?;
    let base_len = f.base.map_or(0, |b| b.len);
    if f.len > MAX_SIDE_FILE_LEN || base_len > MAX_SIDE_FILE_LEN {
        return Err(format!(
            "larger than the limit of {MAX_SIDE_FILE_LEN} bytes"
        ));
    }
    match (&f.data, &f.base) {
        (Some(d), _) if !in_range(d) => Err("record outside the file".into()),
        (Some(d), _) if d.len > max_frame_len(f.len) => {
            Err("record longer than any coding of the file".into())
        }
        (None, None) => Err("neither a record nor a base file".into()),
        (None, Some(b)) if (b.len, b.crc32) != (f.len, f.crc32) => {
            Err("stored as the base's file, but its length or CRC-32 differs".into())
        }
        _ => Ok(()),
    }
}

/// No two side files at one path, none at a weight file's path, and no path used both as a
/// file and as a folder (`a` and `a/b`).
fn check_paths_distinct(index: &FileIndex) -> Result<(), String> {
    let weights = index
        .source
        .shards
        .iter()
        .map(|s| s.file_name.as_str())
        .chain([INDEX_FILE_NAME]);
    let mut files: HashSet<&str> = weights.collect();
    let mut folders: HashSet<&str> = HashSet::new();
    for f in &index.side_files {
        if !files.insert(&f.path) {
            return Err(format!(
                "side file '{}': listed twice, or the name of a weight file",
                f.path
            ));
        }
        let ancestors = f.path.match_indices('/').map(|(i, _)| &f.path[..i]);
        folders.extend(ancestors);
    }
    match folders.iter().find(|d| files.contains(*d)) {
        Some(clash) => Err(format!(
            "side file '{clash}' is also a folder of another side file"
        )),
        None => Ok(()),
    }
}
