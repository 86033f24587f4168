//! The files `rescale` rewrites: each argument must be a regular `.udelta` file (a symbolic
//! link is followed: its target is rewritten and the link stays a link), writable, and named
//! only once (`a`, `./a`, a link to `a` and a hard link of `a` are one file); and their file
//! systems must have room for a rewritten copy of every one of them at once.

use crate::error::{Error, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One argument resolved.
pub struct Target {
    /// The file the argument names, links resolved: what is rewritten.
    pub real: PathBuf,
    /// Its length.
    pub len: u64,
    /// Its device, for the room check.
    dev: u64,
}

/// Resolves every argument, refusing special, read-only and repeated files.
pub fn resolve(files: &[PathBuf]) -> Result<Vec<Target>> {
    let mut seen: Vec<((u64, u64), &Path)> = Vec::with_capacity(files.len());
    let mut targets = Vec::with_capacity(files.len());
    for f in files {
        crate::special_files::refuse_special(f, "the file")?;
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        if !meta.is_file() {
            return Err(Error::format(f, "is not a regular file"));
        }
        if meta.permissions().readonly() {
            return Err(Error::format(
                f,
                "is read-only: rescale rewrites it (nothing was changed)",
            ));
        }
        let id = (meta.dev(), meta.ino());
        if let Some((_, earlier)) = seen.iter().find(|(i, _)| *i == id) {
            return Err(Error::format(
                f,
                format!(
                    "names the same file as {} (each file may be given once)",
                    earlier.display()
                ),
            ));
        }
        seen.push((id, f));
        let real = std::fs::canonicalize(f).map_err(|e| Error::io(f, e))?;
        targets.push(Target {
            real,
            len: meta.len(),
            dev: meta.dev(),
        });
    }
    Ok(targets)
}

/// Refuses before writing anything when a file system lacks room for the rewritten copies of
/// the files it holds (each copy is as long as its file, give or take its index).
pub fn check_room(targets: &[Target]) -> Result<()> {
    for t in targets {
        let needed: u64 = targets
            .iter()
            .filter(|o| o.dev == t.dev)
            .map(|o| o.len)
            .sum();
        let dir = t.real.parent().unwrap_or(Path::new("."));
        match crate::staging::free_bytes(dir) {
            Some(free) if free < needed => {
                return Err(Error::format(
                    &t.real,
                    format!(
                        "not enough free space to rewrite the files on its file system: {needed} \
                         bytes needed, {free} free (nothing was changed)"
                    ),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}
