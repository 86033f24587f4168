//! The side files of a model directory: every regular file that is not a weight file
//! (`config.json`, `generation_config.json`, tokenizer files, `*.model`, `*.jinja`,
//! sentence-transformers module configs in subfolders, `README.md`, licence, ...).
//!
//! This module finds them, reads them safely and writes them back; it knows nothing of the
//! `.udelta` format. Listing never follows a symbolic link, never opens anything but a regular
//! file (a FIFO would block, a device would never end), and bounds sizes, counts and depth;
//! what it leaves out it says, with the reason. Paths are relative, `/`-separated, UTF-8, and
//! checked by [`check_relative_path`] both when a directory is listed and when a `.udelta`
//! file is read, so no path can leave the directory it is written into.

use crate::error::{Error, Result};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub use crate::limits::{MAX_SIDE_FILES_TOTAL, MAX_SIDE_FILE_LEN};
/// Most side files of one model.
pub const MAX_SIDE_FILES: usize = 4096;
/// Deepest subfolder listed (`1_Pooling/config.json` is at depth 1).
pub const MAX_DEPTH: usize = 8;
/// Longest relative path, in bytes.
pub const MAX_PATH_LEN: usize = 1024;

/// File extensions of weights, which are never side files.
const WEIGHT_EXTENSIONS: &[&str] = &[
    "safetensors",
    "bin",
    "pt",
    "pth",
    "ckpt",
    "h5",
    "msgpack",
    "onnx",
    "gguf",
    "ot",
    "tflite",
];

/// Which side files are carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SideFileOptions {
    /// Carry none (`--no-side-files`).
    pub omit: bool,
    /// Also carry Python files (`modeling_*.py` for `trust_remote_code`).
    pub remote_code: bool,
}

/// What [`list`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Relative paths of the side files, in byte order.
    pub files: Vec<String>,
    /// `path: reason` of every file or folder left out.
    pub skipped: Vec<String>,
}

/// Checks that `rel` is a safe relative path: `/`-separated non-empty components, none `.` or
/// `..`, no backslash or control character, at most [`MAX_PATH_LEN`] bytes and [`MAX_DEPTH`]
/// folders deep. Returns what is wrong.
pub fn check_relative_path(rel: &str) -> std::result::Result<(), String> {
    if rel.is_empty() {
        return Err("empty path".into());
    }
    if rel.len() > MAX_PATH_LEN {
        return Err(format!("path longer than {MAX_PATH_LEN} bytes"));
    }
    if rel.starts_with('/') {
        return Err("absolute path".into());
    }
    if rel.chars().any(|c| c == '\\' || c.is_control()) {
        return Err("backslash or control character in the path".into());
    }
    let components: Vec<&str> = rel.split('/').collect();
    if components
        .iter()
        .any(|c| c.is_empty() || *c == "." || *c == "..")
    {
        return Err("empty, '.' or '..' path component".into());
    }
    if components.len() > MAX_DEPTH + 1 {
        return Err(format!("more than {MAX_DEPTH} folders deep"));
    }
    Ok(())
}

/// Whether `name` is a weight file or a weight index, by its name.
pub fn is_weight_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let ext = |n: &str| n.rsplit_once('.').map(|(_, e)| e.to_string());
    let indexed = lower
        .strip_suffix(".index.json")
        .is_some_and(|stem| ext(stem).is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e.as_str())));
    indexed || ext(&lower).is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e.as_str()))
}

/// Running totals while listing.
struct Walk<'a> {
    exclude: &'a [String],
    opts: SideFileOptions,
    total: u64,
    listing: Listing,
}

/// Lists the side files under `dir`: every regular file except the paths in `exclude` (the
/// weights the checkpoint reads, silently) and, with a reason in [`Listing::skipped`], other
/// weight files, Python files (unless `remote_code`), symbolic links, non-regular files, hidden
/// folders (`.git`, `.cache`), unsafe or non-UTF-8 names, and anything over the limits.
pub fn list(dir: &Path, exclude: &[String], opts: SideFileOptions) -> Result<Listing> {
    let mut walk = Walk {
        exclude,
        opts,
        total: 0,
        listing: Listing::default(),
    };
    walk.folder(dir, "", 0)?;
    Ok(walk.listing)
}

impl Walk<'_> {
    fn skip(&mut self, rel: &str, reason: impl Into<String>) {
        self.listing
            .skipped
            .push(format!("{rel}: {}", reason.into()));
    }

    fn folder(&mut self, abs: &Path, prefix: &str, depth: usize) -> Result<()> {
        let mut entries = std::fs::read_dir(abs)
            .map_err(|e| Error::io(abs, e))?
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::io(abs, e))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                let shown = format!("{prefix}{}", name.to_string_lossy());
                self.skip(&shown, "name is not UTF-8");
                continue;
            };
            let rel = format!("{prefix}{name}");
            let kind = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
            if kind.is_symlink() {
                self.skip(
                    &rel,
                    "a symbolic link (not followed; copy the file in place to carry it)",
                );
            } else if kind.is_dir() {
                self.subfolder(&entry.path(), &rel, depth)?;
            } else if kind.is_file() {
                let len = entry
                    .metadata()
                    .map_err(|e| Error::io(entry.path(), e))?
                    .len();
                self.file(rel, name, len);
            } else {
                self.skip(&rel, "not a regular file (a FIFO, socket or device)");
            }
        }
        Ok(())
    }

    fn subfolder(&mut self, abs: &Path, rel: &str, depth: usize) -> Result<()> {
        if rel.rsplit('/').next().is_some_and(|n| n.starts_with('.')) {
            self.skip(&format!("{rel}/"), "a hidden folder (not carried)");
        } else if depth + 1 > MAX_DEPTH {
            self.skip(
                &format!("{rel}/"),
                format!("more than {MAX_DEPTH} folders deep"),
            );
        } else {
            self.folder(abs, &format!("{rel}/"), depth + 1)?;
        }
        Ok(())
    }

    fn file(&mut self, rel: String, name: &str, len: u64) {
        if self.exclude.contains(&rel) {
            return;
        }
        let refusal = if is_weight_name(name) {
            Some("a weight file the checkpoint does not use (not carried)".to_string())
        } else if name.ends_with(".py") && !self.opts.remote_code {
            Some("Python code is carried only with --with-remote-code".to_string())
        } else if let Err(why) = check_relative_path(&rel) {
            Some(why)
        } else if len > MAX_SIDE_FILE_LEN {
            Some(format!(
                "{len} bytes, over the limit of {MAX_SIDE_FILE_LEN} for a side file"
            ))
        } else if self.listing.files.len() >= MAX_SIDE_FILES {
            Some(format!("more than {MAX_SIDE_FILES} side files"))
        } else if self.total + len > MAX_SIDE_FILES_TOTAL {
            Some(format!(
                "the side files would exceed {MAX_SIDE_FILES_TOTAL} bytes in all"
            ))
        } else {
            None
        };
        match refusal {
            Some(why) => self.skip(&rel, why),
            None => {
                self.total += len;
                self.listing.files.push(rel);
            }
        }
    }
}

/// Why a file was not read.
#[derive(Debug)]
pub enum ReadRefusal {
    /// Nothing at that path.
    Missing,
    /// A symbolic link, a non-regular file, or over the size limit.
    Unsafe(String),
    /// Any other I/O error.
    Io(std::io::Error),
}

/// Reads the regular file `path`, at most `limit` bytes, without following a symbolic link and
/// without blocking on a FIFO (the file is opened non-blocking and checked before reading).
pub fn read_regular(path: &Path, limit: u64) -> std::result::Result<Vec<u8>, ReadRefusal> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ReadRefusal::Missing),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(ReadRefusal::Unsafe("a symbolic link (not followed)".into()))
        }
        Err(e) => return Err(ReadRefusal::Io(e)),
    };
    let meta = file.metadata().map_err(ReadRefusal::Io)?;
    if !meta.is_file() {
        return Err(ReadRefusal::Unsafe("not a regular file".into()));
    }
    if meta.len() > limit {
        return Err(ReadRefusal::Unsafe(format!(
            "{} bytes, over the limit of {limit}",
            meta.len()
        )));
    }
    crate::special_files::read_capped(file, meta.len(), limit)
        .map_err(ReadRefusal::Io)?
        .ok_or_else(|| {
            ReadRefusal::Unsafe(format!("grew past the limit of {limit} bytes while read"))
        })
}

/// Writes `bytes` as `dir/rel` (a new file; its folders are created), after checking `rel`
/// again. `dir` is a directory this process created, so nothing in it is a link.
pub fn write_into(dir: &Path, rel: &str, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join(rel);
    check_relative_path(rel).map_err(|why| Error::checkpoint(&path, why))?;
    create_folders_below(dir, rel)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    std::io::Write::write_all(&mut file, bytes).map_err(|e| Error::io(&path, e))?;
    file.sync_all().map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// Creates the folders of `rel` (a checked relative path) below `dir`, one level at a time,
/// never `dir` itself: when an interrupt has just removed a staged output directory, writing
/// into it fails instead of creating it again (`create_dir_all` would, and leave it behind).
fn create_folders_below(dir: &Path, rel: &str) -> Result<()> {
    let mut at = dir.to_path_buf();
    let folders = rel.split('/').collect::<Vec<_>>();
    for folder in &folders[..folders.len() - 1] {
        at.push(folder);
        match std::fs::create_dir(&at) {
            Err(e) if !(e.kind() == std::io::ErrorKind::AlreadyExists && at.is_dir()) => {
                return Err(Error::io(&at, e));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_created_below_an_existing_directory_only() {
        let d = tempfile::tempdir().unwrap();
        write_into(d.path(), "1_Pooling/sub/config.json", b"{}").unwrap();
        assert_eq!(
            std::fs::read(d.path().join("1_Pooling/sub/config.json")).unwrap(),
            b"{}"
        );
        write_into(d.path(), "1_Pooling/other.json", b"[]").unwrap();
        let gone = d.path().join("staged");
        assert!(write_into(&gone, "1_Pooling/config.json", b"{}").is_err());
        assert!(
            !gone.exists(),
            "a removed staging directory is not created again"
        );
    }

    #[test]
    fn relative_paths_are_checked() {
        for good in [
            "config.json",
            "1_Pooling/config.json",
            ".gitattributes",
            "a b/c-d.txt",
        ] {
            assert_eq!(check_relative_path(good), Ok(()), "{good}");
        }
        let deepest = "x/".repeat(MAX_DEPTH + 1);
        assert_eq!(check_relative_path(deepest.trim_end_matches('/')), Ok(()));
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            "a\\..\\b",
            "a\nb",
            "a\0b",
            "x/".repeat(MAX_DEPTH + 2).trim_end_matches('/'),
            &"x".repeat(MAX_PATH_LEN + 1),
        ] {
            assert!(check_relative_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn weight_names_are_recognized() {
        for w in [
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "onnx/model.onnx",
            "Model.GGUF",
        ] {
            assert!(is_weight_name(w), "{w}");
        }
        for s in [
            "config.json",
            "tokenizer.model",
            "index.json",
            "vocab.txt",
            "chat_template.jinja",
        ] {
            assert!(!is_weight_name(s), "{s}");
        }
    }

    #[test]
    fn listing_skips_what_it_must_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("1_Pooling")).unwrap();
        std::fs::create_dir_all(d.join(".git/objects")).unwrap();
        for (p, b) in [
            ("model.safetensors", "w"),
            ("config.json", "{}"),
            ("1_Pooling/config.json", "{}"),
            ("pytorch_model.bin", "w"),
            ("modeling_x.py", "import torch"),
            (".gitattributes", "*"),
            (".git/objects/a", "x"),
        ] {
            std::fs::write(d.join(p), b).unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", d.join("link.json")).unwrap();
        let big = std::fs::File::create(d.join("huge.txt")).unwrap();
        big.set_len(MAX_SIDE_FILE_LEN + 1).unwrap();
        let fifo = std::ffi::CString::new(d.join("pipe").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

        let l = list(d, &["model.safetensors".into()], SideFileOptions::default()).unwrap();
        assert_eq!(
            l.files,
            [".gitattributes", "1_Pooling/config.json", "config.json"]
        );
        let why = |p: &str| {
            l.skipped
                .iter()
                .find(|s| s.starts_with(&format!("{p}:")))
                .unwrap_or_else(|| panic!("{p} not reported: {:?}", l.skipped))
                .clone()
        };
        assert!(why(".git/").contains("hidden folder"));
        assert!(why("huge.txt").contains("over the limit"));
        assert!(why("link.json").contains("symbolic link"));
        assert!(why("modeling_x.py").contains("--with-remote-code"));
        assert!(why("pipe").contains("not a regular file"));
        assert!(why("pytorch_model.bin").contains("weight file"));
        assert_eq!(l.skipped.len(), 6, "{:?}", l.skipped);

        let code = SideFileOptions {
            remote_code: true,
            ..Default::default()
        };
        assert!(list(d, &[], code)
            .unwrap()
            .files
            .contains(&"modeling_x.py".into()));

        // Reading refuses the link and the FIFO without blocking.
        assert!(matches!(
            read_regular(&d.join("link.json"), 100),
            Err(ReadRefusal::Unsafe(_))
        ));
        assert!(matches!(
            read_regular(&d.join("pipe"), 100),
            Err(ReadRefusal::Unsafe(_))
        ));
        assert!(matches!(
            read_regular(&d.join("nope"), 100),
            Err(ReadRefusal::Missing)
        ));
        assert!(matches!(
            read_regular(&d.join("config.json"), 1),
            Err(ReadRefusal::Unsafe(_))
        ));
        assert_eq!(read_regular(&d.join("config.json"), 2).unwrap(), b"{}");
    }

    #[test]
    fn writing_refuses_unsafe_paths_and_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        write_into(&out, "1_Pooling/config.json", b"{}").unwrap();
        assert_eq!(
            std::fs::read(out.join("1_Pooling/config.json")).unwrap(),
            b"{}"
        );
        assert!(write_into(&out, "1_Pooling/config.json", b"x").is_err());
        assert!(write_into(&out, "../escaped", b"x").is_err());
        assert!(write_into(&out, "/tmp/escaped", b"x").is_err());
        assert!(!dir.path().join("escaped").exists());
    }
}
