//! FIFOs, sockets and devices: never read as an input (opening a FIFO for reading blocks until
//! a writer comes), never replaced or written as an output.

use crate::error::{Error, Result};
use std::fs::{File, FileType};
use std::path::Path;

/// What a file type is when it is neither a regular file, a directory nor a symbolic link.
pub fn special_kind(t: FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else {
        None
    }
}

/// Refuses `path` (following symbolic links) if it is a FIFO, a socket or a device; a missing
/// path passes (the caller reports it).
pub fn refuse_special(path: &Path, role: &str) -> Result<()> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    match special_kind(meta.file_type()) {
        Some(kind) => Err(Error::checkpoint(
            path,
            format!("{role} is {kind}, not a regular file or directory"),
        )),
        None => Ok(()),
    }
}

/// Opens the input file `path` for reading without ever blocking: a special file is refused
/// before the open (a socket cannot be opened at all), and the open is non-blocking, so a FIFO
/// put there meanwhile does not wait for a writer either; then it must be a regular file.
pub fn open_regular(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    refuse_special(path, "the file")?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let kind = special_kind(meta.file_type()).unwrap_or("a directory");
        return Err(Error::checkpoint(
            path,
            format!("is {kind}, not a regular file"),
        ));
    }
    Ok(file)
}

/// Reads the open regular file `file`, `len` bytes long by its metadata, whole, refusing more
/// than `limit` bytes: `Ok(None)` when it is larger or grows past the limit while read (at
/// most `limit + 1` bytes are read).
pub fn read_capped(file: File, len: u64, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    if len > limit {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

/// Whether `path`, or the path it resolves to, lies under `/dev/`: outputs are never written
/// there (device nodes, and `/dev/stdout`-like links to whatever the process holds open).
pub fn under_dev(path: &Path) -> bool {
    let dev = Path::new("/dev");
    let lexical = std::path::absolute(path).is_ok_and(|p| p.starts_with(dev));
    let resolved = resolve_parent(path).is_some_and(|p| p.starts_with(dev));
    lexical || resolved
}

/// `path` with its existing part resolved (links, `..`).
fn resolve_parent(path: &Path) -> Option<std::path::PathBuf> {
    if let Ok(c) = std::fs::canonicalize(path) {
        return Some(c);
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some(std::fs::canonicalize(parent).ok()?.join(path.file_name()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking_and_dev_paths_are_spotted() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("pipe") && e.contains("FIFO"), "{e}");
        let e = refuse_special(&fifo, "the base").unwrap_err().to_string();
        assert!(e.contains("the base is a FIFO"), "{e}");
        refuse_special(d.path(), "the base").unwrap();
        refuse_special(&d.path().join("missing"), "the base").unwrap();
        assert!(open_regular(d.path()).is_err());
        assert!(under_dev(Path::new("/dev/null")));
        assert!(under_dev(Path::new("/dev/new-file")));
        assert!(under_dev(Path::new("/dev/../dev/x")));
        assert!(!under_dev(&d.path().join("x.udelta")));
        let link = d.path().join("to-dev");
        std::os::unix::fs::symlink("/dev", &link).unwrap();
        assert!(under_dev(&link.join("x")));
    }
}
