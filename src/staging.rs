//! Outputs that appear whole or not at all.
//!
//! Every file or directory udelta-gpu produces is first written under a temporary sibling name
//! (`.NAME.partial-PID`) and renamed into place by [`StagedPath::commit`]. Dropping a
//! `StagedPath` without committing (an error, a panic, an interrupt) removes the temporary.
//! Without `--force` the rename never replaces an output that appeared meanwhile (another run
//! writing the same output loses, with an error, and leaves nothing: [`crate::no_replace`]);
//! with it, only an output of the same kind (a regular file, a directory) is replaced.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Temporaries alive right now, so a signal handler can remove them.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Set (under the `LIVE` lock) by [`committing`]: the run is putting its outputs in place and
/// will exit 0 unless that fails, so a signal no longer interrupts it.
static COMMITTING: AtomicBool = AtomicBool::new(false);

/// A temporary path that becomes `target` on [`commit`](StagedPath::commit).
#[derive(Debug)]
pub struct StagedPath {
    tmp: PathBuf,
    target: PathBuf,
    force: bool,
    committed: bool,
}

impl StagedPath {
    /// Stages `target`. Fails if `target` exists and `force` is false; with `force` an existing
    /// target is replaced only at commit.
    pub fn new(target: &Path, force: bool) -> Result<Self> {
        if target.exists() && !force {
            return Err(already_exists(target));
        }
        let name = target
            .file_name()
            .ok_or_else(|| Error::checkpoint(target, "output path has no file name"))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(Error::checkpoint(
                target,
                "the output's parent directory does not exist",
            ));
        }
        let tmp = parent.join(temporary_name(name, std::process::id()));
        remove_any(&tmp);
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tmp.clone());
        Ok(StagedPath {
            tmp,
            target: target.to_path_buf(),
            force,
            committed: false,
        })
    }

    /// Where to write now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final name.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Renames the temporary into place. Without `force` an output that appeared since
    /// [`new`](Self::new) is never replaced (the commit fails and the temporary goes); with it
    /// only a regular file (for a file) or a directory (for a directory) is. Holds the
    /// registry of temporaries meanwhile, so a signal handler waits for the rename.
    pub fn commit(mut self) -> Result<()> {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        let is_dir = self.tmp.is_dir();
        let placed = if self.force {
            replace_same_kind(&self.tmp, &self.target, is_dir)
        } else {
            crate::no_replace::place_new(&self.tmp, &self.target).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    appeared_meanwhile(&self.target)
                } else {
                    Error::io(&self.target, e)
                }
            })
        };
        live.retain(|q| q != &self.tmp);
        if placed.is_err() {
            remove_any(&self.tmp);
        }
        self.committed = true;
        placed
    }
}

/// `--force`: puts `tmp` at `target`, replacing only what is of the same kind.
fn replace_same_kind(tmp: &Path, target: &Path, is_dir: bool) -> Result<()> {
    let existing = std::fs::symlink_metadata(target).ok();
    match existing.map(|m| m.file_type()) {
        Some(t) if is_dir && t.is_dir() => {
            crate::no_replace::replace_dir(tmp, target).map_err(|e| Error::io(target, e))
        }
        None => std::fs::rename(tmp, target).map_err(|e| Error::io(target, e)),
        Some(t) if !is_dir && t.is_file() => {
            std::fs::rename(tmp, target).map_err(|e| Error::io(target, e))
        }
        Some(t) => Err(Error::checkpoint(
            target,
            format!(
                "output became {} while this run wrote it; not replaced",
                kind_name(t)
            ),
        )),
    }
}

/// The refusal of an output that another writer put in place while this run wrote its own.
fn appeared_meanwhile(target: &Path) -> Error {
    Error::checkpoint(
        target,
        "output appeared while this run was writing it (another run writing the same output?); \
         it was left as it is and this run's output discarded (use --force to replace it)",
    )
}

impl Drop for StagedPath {
    fn drop(&mut self) {
        if !self.committed {
            remove_any(&self.tmp);
            forget_live(&self.tmp);
        }
    }
}

/// Longest file name (one path component) the file systems udelta-gpu writes to accept, in
/// bytes (`NAME_MAX` of Linux, macOS and the BSDs).
pub const NAME_MAX: usize = 255;

/// The temporary sibling name under which output `name` is written: `.NAME.partial-PID`, or,
/// when that would not fit in [`NAME_MAX`] bytes (an output name of up to 255 bytes is legal),
/// `.PREFIX~HASH.partial-PID` with as much of the name as fits and the CRC-32 of the whole
/// name, so that every legal output name can be staged. The name's bytes are kept as they are
/// (a name that is not UTF-8 stays so).
fn temporary_name(name: &std::ffi::OsStr, pid: u32) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let name = name.as_bytes();
    let suffix = format!(".partial-{pid}");
    let whole = 1 + name.len() + suffix.len();
    let mut tmp = vec![b'.'];
    if whole <= NAME_MAX {
        tmp.extend_from_slice(name);
    } else {
        let hash = format!("~{:08x}", crc32fast::hash(name));
        let mut room = NAME_MAX - 1 - hash.len() - suffix.len();
        if let Ok(text) = std::str::from_utf8(name) {
            // Cut a UTF-8 name between characters, so the temporary is UTF-8 too.
            room = (0..=room)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
        }
        tmp.extend_from_slice(&name[..room]);
        tmp.extend_from_slice(hash.as_bytes());
    }
    tmp.extend_from_slice(suffix.as_bytes());
    std::ffi::OsString::from_vec(tmp)
}

fn forget_live(p: &Path) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.retain(|q| q != p);
}

fn remove_any(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

/// Removes `paths`, again while other threads may still be creating files in them (a staged
/// directory cannot be removed while a writer adds a shard to it), for up to ~100 ms.
fn remove_until_gone(paths: &[PathBuf]) {
    for _ in 0..50 {
        paths.iter().for_each(|p| remove_any(p));
        if paths.iter().all(|p| std::fs::symlink_metadata(p).is_err()) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// For signal handlers: removes every temporary, prints `message` on stderr and exits with
/// `code`, holding the registry the whole time so that no new temporary can be staged (and left
/// behind) between the cleanup and the exit, and no output committed. Returns, doing nothing,
/// once the run is [`committing`] its outputs (it then exits 0, or 1 if a rename fails).
pub fn remove_all_live_and_exit(code: i32, message: &str) {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    if COMMITTING.load(Ordering::SeqCst) {
        return;
    }
    remove_until_gone(&live);
    let _ = writeln!(std::io::stderr(), "{message}");
    std::process::exit(code)
}

/// Marks the start of the last step of a command-line run: everything that can fail has
/// succeeded and the outputs are renamed into place next. From here a signal is ignored
/// (see [`remove_all_live_and_exit`]), so the exit status always says whether the outputs
/// are there: an interrupt either removes them all before any is committed, or comes too late.
pub fn committing() {
    let _live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    COMMITTING.store(true, Ordering::SeqCst);
}

/// Bytes available to this user on the file system that holds, or would hold, `dir` (its
/// nearest existing ancestor is asked), or None where the platform does not say.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let dir = std::path::absolute(dir).ok()?;
        let existing = dir.ancestors().find(|a| a.exists())?;
        let path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
        // SAFETY: `path` is a NUL-terminated string and `stats` a plain struct that statvfs
        // fills in; it is read only when the call succeeds.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
            return None;
        }
        Some((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// The refusal of an existing output without `--force`.
fn already_exists(target: &Path) -> Error {
    Error::checkpoint(target, "output already exists (use --force to replace it)")
}

/// What an output path must become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A file (a `.udelta`).
    File,
    /// A directory (a checkpoint, or several `.udelta` files).
    Dir,
}

/// Checks an output path before any work: it must not be under `/dev/`, must not exist
/// (unless `force`), may be replaced only if it is of the same kind (a regular file where a file
/// is written, a directory where a directory is; never a link, FIFO, socket or device), and
/// must be neither one of `inputs`, nor a directory holding one, nor an existing file inside an
/// input directory (replacing it would destroy the input, even with `force`).
pub fn check_output(target: &Path, kind: OutputKind, force: bool, inputs: &[&Path]) -> Result<()> {
    if crate::special_files::under_dev(target) {
        return Err(Error::checkpoint(
            target,
            "output is under /dev/ (a device or a link to one): choose a file-system path",
        ));
    }
    let meta = std::fs::symlink_metadata(target).ok();
    if let Some(m) = &meta {
        if !force {
            return Err(already_exists(target));
        }
        let t = m.file_type();
        let same_kind = match kind {
            OutputKind::File => t.is_file(),
            OutputKind::Dir => t.is_dir(),
        };
        if !same_kind {
            let wanted = match kind {
                OutputKind::File => "a file",
                OutputKind::Dir => "a directory",
            };
            return Err(Error::checkpoint(
                target,
                format!(
                    "output is {}; the output is {wanted} (--force replaces only a regular file \
                     with a file, a directory with a directory)",
                    kind_name(t)
                ),
            ));
        }
    }
    let Some(canonical) = canonical_target(target) else {
        return Ok(()); // a missing parent is reported by StagedPath::new
    };
    for input in inputs {
        let Ok(input_canon) = std::fs::canonicalize(input) else {
            continue; // reported when the input is opened
        };
        let clash = if canonical == input_canon {
            Some("is the input")
        } else if input_canon.starts_with(&canonical) {
            Some("contains the input")
        } else if meta.is_some() && canonical.starts_with(&input_canon) {
            Some("is a file of the input")
        } else {
            None
        };
        if let Some(c) = clash {
            return Err(Error::checkpoint(
                target,
                format!(
                    "output {c} {}: writing it would destroy the input; choose another output",
                    input.display()
                ),
            ));
        }
    }
    Ok(())
}

/// What a file type is, for messages.
fn kind_name(t: std::fs::FileType) -> &'static str {
    if let Some(special) = crate::special_files::special_kind(t) {
        special
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else {
        "a regular file"
    }
}

/// `target` with its parent resolved (symbolic links, `..`), or `None` without a parent.
fn canonical_target(target: &Path) -> Option<PathBuf> {
    if let Ok(c) = std::fs::canonicalize(target) {
        return Some(c);
    }
    let name = target.file_name()?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::canonicalize(parent).ok().map(|p| p.join(name))
}

/// Bytes written between two background syncs of a [`DurableFile`].
const SYNC_EVERY: u64 = 256 << 20;

/// A buffered output file that is handed to the disk in the background as it grows (so the
/// sync before the final rename is short) and fully synced by [`finish`](Self::finish).
pub struct DurableFile {
    out: BufWriter<File>,
    path: PathBuf,
    written: u64,
    synced_to: u64,
    syncs: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl DurableFile {
    /// Creates `path`; `name` is the path errors mention (the final name of a staged file).
    pub fn create(path: &Path, name: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::io(name, e))?;
        Ok(Self::wrap(file, name, 0))
    }

    /// Opens the existing `path`, cuts it to `len` bytes, and appends from there.
    pub fn truncate_and_append(path: &Path, name: &Path, len: u64) -> Result<Self> {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(name, e))?;
        file.set_len(len).map_err(|e| Error::io(name, e))?;
        file.seek(SeekFrom::Start(len))
            .map_err(|e| Error::io(name, e))?;
        Ok(Self::wrap(file, name, len))
    }

    fn wrap(file: File, name: &Path, written: u64) -> Self {
        DurableFile {
            out: BufWriter::with_capacity(1 << 22, file),
            path: name.to_path_buf(),
            written,
            synced_to: written,
            syncs: Vec::new(),
        }
    }

    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.written += bytes.len() as u64;
        if self.written - self.synced_to >= SYNC_EVERY {
            self.out.flush().map_err(|e| Error::io(&self.path, e))?;
            let file = self
                .out
                .get_ref()
                .try_clone()
                .map_err(|e| Error::io(&self.path, e))?;
            self.syncs.retain(|h| !h.is_finished());
            self.syncs
                .push(std::thread::spawn(move || file.sync_data()));
            self.synced_to = self.written;
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Flushes, waits for the background syncs and syncs the rest.
    pub fn finish(mut self) -> Result<()> {
        for h in self.syncs.drain(..) {
            h.join()
                .unwrap_or(Ok(()))
                .map_err(|e| Error::io(&self.path, e))?;
        }
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_output_vanishes_and_existing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        {
            let s = StagedPath::new(&target, false).unwrap();
            std::fs::write(s.path(), b"half").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let s = StagedPath::new(&target, false).unwrap();
        std::fs::write(s.path(), b"whole").unwrap();
        s.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        let err = StagedPath::new(&target, false).unwrap_err().to_string();
        assert!(
            err.contains("out.bin") && err.contains("already exists"),
            "{err}"
        );
    }

    #[test]
    fn every_legal_output_name_can_be_staged() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        // Short names keep the readable form.
        assert_eq!(
            temporary_name(OsStr::new("ft.udelta"), 42),
            ".ft.udelta.partial-42"
        );
        let long_a = "a".repeat(NAME_MAX);
        let long_b = format!("{}b", "a".repeat(NAME_MAX - 1));
        let accented = "\u{e9}".repeat(NAME_MAX / 2); // 254 bytes, 2 per character
        let not_utf8 = OsStr::from_bytes(b"ft-\xff\xfe.udelta");
        let (ta, tb) = (
            temporary_name(OsStr::new(&long_a), u32::MAX),
            temporary_name(OsStr::new(&long_b), u32::MAX),
        );
        assert!(ta.len() <= NAME_MAX && tb.len() <= NAME_MAX, "{ta:?}");
        assert_ne!(
            ta, tb,
            "names differing only past the cut get different temporaries"
        );
        assert!(ta.to_str().unwrap().starts_with(".aaaa"));
        assert!(ta
            .to_str()
            .unwrap()
            .ends_with(&format!(".partial-{}", u32::MAX)));
        let te = temporary_name(OsStr::new(&accented), 7);
        assert!(
            te.len() <= NAME_MAX && te.to_str().is_some(),
            "cut inside a character"
        );
        for name in [OsStr::new(&long_a), OsStr::new(&accented), not_utf8] {
            let target = dir.path().join(name);
            let staged = StagedPath::new(&target, false).unwrap();
            std::fs::write(staged.path(), b"whole").unwrap();
            staged.commit().unwrap();
            assert_eq!(std::fs::read(&target).unwrap(), b"whole", "{name:?}");
        }
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        let mut want = vec![long_a.into(), accented.into(), not_utf8.to_owned()];
        want.sort();
        assert_eq!(names, want, "exactly the three outputs, no temporary left");
    }

    #[test]
    fn outputs_that_would_destroy_an_input_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        std::fs::create_dir(&ckpt).unwrap();
        let file = ckpt.join("model.safetensors");
        std::fs::write(&file, b"weights").unwrap();
        let err = |t: &Path, k| check_output(t, k, true, &[&ckpt]).unwrap_err().to_string();
        assert!(err(&file, OutputKind::File).contains("is a file of the input"));
        assert!(err(&ckpt, OutputKind::Dir).contains("is the input"));
        assert!(err(dir.path(), OutputKind::Dir).contains("contains the input"));
        assert!(err(&ckpt, OutputKind::File).contains("is a directory"));
        assert!(err(&file, OutputKind::Dir).contains("is a regular file"));
        let via_dots = ckpt.join("..").join("ckpt").join("model.safetensors");
        assert!(check_output(&via_dots, OutputKind::File, true, &[&file]).is_err());
        // A new file inside an input directory, or anywhere else, is fine.
        check_output(&ckpt.join("d.udelta"), OutputKind::File, false, &[&ckpt]).unwrap();
        check_output(&dir.path().join("x"), OutputKind::Dir, false, &[&ckpt]).unwrap();
        assert!(check_output(&file, OutputKind::File, false, &[])
            .unwrap_err()
            .to_string()
            .contains("already exists"));
    }
}
