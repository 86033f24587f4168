//! Side files in `compress` and `decompress`: the fine-tuned directory's config, tokenizer and
//! other non-weight files travel in the `.udelta`, each coded against the base's file of the
//! same path ([`codec::prefixed`]), so that base + `.udelta` restore a directory that loads as
//! the fine-tune does. Listing and safe file access: [`crate::checkpoint::side_files`]; index
//! entries and their checks: [`crate::format::side_files`].

use crate::checkpoint::reader::Checkpoint;
use crate::checkpoint::side_files::{
    self as files, ReadRefusal, SideFileOptions, MAX_SIDE_FILE_LEN,
};
use crate::codec::prefixed;
use crate::error::{Error, Result};
use crate::format::index::crc32;
use crate::format::index::RecordRef;
use crate::format::side_files::{BaseFileRef, SideFileEntry};
use crate::format::{UdeltaReader, UdeltaWriter};
use std::path::Path;

/// Lists, codes and appends to `writer` the side files of the fine-tune `ft` (a directory),
/// and returns their index entries. What is left out is said on stderr; a fine-tune given as a
/// file carries nothing (said unless `quiet`).
pub fn carry(
    base_path: &Path,
    ft: &Checkpoint,
    writer: &mut UdeltaWriter,
    opts: SideFileOptions,
    quiet: bool,
) -> Result<Vec<SideFileEntry>> {
    code_side_files(base_path, ft, opts, quiet, &mut |frame| {
        writer.append(frame)
    })
}

/// [`carry`] with the coded frames handed to `append` (which returns their record
/// reference) instead of a writer: `compress --dry-run` counts them.
pub fn code_side_files(
    base_path: &Path,
    ft: &Checkpoint,
    opts: SideFileOptions,
    quiet: bool,
    append: &mut dyn FnMut(&[u8]) -> Result<RecordRef>,
) -> Result<Vec<SideFileEntry>> {
    if opts.omit {
        return Ok(Vec::new());
    }
    let dir = &ft.path;
    if !dir.is_dir() {
        if !quiet {
            eprintln!(
                "note: {} is not a directory: no side files (config, tokenizer) are carried; \
                 give the model's directory to carry them",
                dir.display()
            );
        }
        return Ok(Vec::new());
    }
    let listing = files::list(dir, &weight_paths(ft), opts)?;
    for why in &listing.skipped {
        eprintln!("warning: {}/{why}: not carried", dir.display());
    }
    let base_dir = base_path.is_dir().then_some(base_path);
    let mut entries = Vec::with_capacity(listing.files.len());
    for rel in &listing.files {
        let path = dir.join(rel);
        let bytes = match files::read_regular(&path, MAX_SIDE_FILE_LEN) {
            Ok(b) => b,
            Err(ReadRefusal::Io(e)) => return Err(Error::io(&path, e)),
            Err(ReadRefusal::Missing) => {
                return Err(Error::checkpoint(&path, "vanished while read"))
            }
            Err(ReadRefusal::Unsafe(why)) => {
                eprintln!("warning: {}: {why}: not carried", path.display());
                continue;
            }
        };
        let base = base_dir.and_then(|d| files::read_regular(&d.join(rel), MAX_SIDE_FILE_LEN).ok());
        entries.push(code_one(rel, &bytes, base.as_deref(), append, &path)?);
    }
    Ok(entries)
}

/// The paths, relative to the checkpoint directory, of the weight files it reads.
fn weight_paths(ft: &Checkpoint) -> Vec<String> {
    let files = ft.shards.iter().map(|s| s.path.as_path());
    files
        .chain(ft.index_path.as_deref())
        .filter_map(|p| p.strip_prefix(&ft.path).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

/// One side file's entry: no record when it is the base's file, else a zstd frame against
/// the base's file (or alone).
fn code_one(
    rel: &str,
    bytes: &[u8],
    base: Option<&[u8]>,
    append: &mut dyn FnMut(&[u8]) -> Result<RecordRef>,
    path: &Path,
) -> Result<SideFileEntry> {
    let data = match base {
        Some(b) if b == bytes => None,
        _ => {
            let frame = prefixed::encode(base.unwrap_or_default(), bytes)
                .map_err(|e| Error::checkpoint(path, format!("side file not coded: {e}")))?;
            Some(append(&frame)?)
        }
    };
    Ok(SideFileEntry {
        path: rel.to_string(),
        len: bytes.len() as u64,
        crc32: crc32(bytes),
        base: base.map(|b| BaseFileRef {
            len: b.len() as u64,
            crc32: crc32(b),
        }),
        data,
    })
}

/// Writes the side files of `reader` into `dir` (the staged output directory), decoding each
/// against the base's file of the same path, which must be the one it was coded against.
pub fn restore(reader: &UdeltaReader, base_path: &Path, dir: &Path) -> Result<()> {
    for f in &reader.index.side_files {
        let base = match &f.base {
            Some(want) => Some(base_file(reader, base_path, f, want)?),
            None => None,
        };
        let bytes = match (&f.data, base) {
            (None, Some(b)) => b,
            (Some(d), base) => decode_one(reader, f, d, base.as_deref())?,
            (None, None) => {
                return Err(Error::format(
                    reader.path(),
                    format!("side file '{}': neither a record nor a base file", f.path),
                ))
            }
        };
        files::write_into(dir, &f.path, &bytes)?;
    }
    Ok(())
}

fn decode_one(
    reader: &UdeltaReader,
    f: &SideFileEntry,
    data: &crate::format::RecordRef,
    base: Option<&[u8]>,
) -> Result<Vec<u8>> {
    let what = format!("side file '{}'", f.path);
    let frame = reader.read_record(data, &what)?;
    let bytes = prefixed::decode(base.unwrap_or_default(), &frame, f.len as usize)
        .map_err(|e| Error::format(reader.path(), format!("{what}: {e}")))?;
    if crc32(&bytes) != f.crc32 {
        return Err(Error::format(
            reader.path(),
            format!("{what}: checksum mismatch after decoding (corrupted)"),
        ));
    }
    Ok(bytes)
}

/// The base's file `f` was coded against, checked by length and CRC-32.
fn base_file(
    reader: &UdeltaReader,
    base_path: &Path,
    f: &SideFileEntry,
    want: &BaseFileRef,
) -> Result<Vec<u8>> {
    let file = reader.path().display();
    if !base_path.is_dir() {
        return Err(Error::checkpoint(
            base_path,
            format!(
                "side file '{}' of {file} is coded against the base's file of that path: \
                 give the base as its directory",
                f.path
            ),
        ));
    }
    let path = base_path.join(&f.path);
    let bytes = files::read_regular(&path, MAX_SIDE_FILE_LEN).map_err(|r| match r {
        ReadRefusal::Io(e) => Error::io(&path, e),
        ReadRefusal::Missing => Error::checkpoint(
            &path,
            format!("missing, but {file} was made against a base that has it"),
        ),
        ReadRefusal::Unsafe(why) => Error::checkpoint(&path, why),
    })?;
    if bytes.len() as u64 != want.len || crc32(&bytes) != want.crc32 {
        return Err(Error::checkpoint(
            &path,
            format!("differs from the base's file {file} was made against (checksum mismatch): wrong base?"),
        ));
    }
    Ok(bytes)
}
