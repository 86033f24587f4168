//! Putting a finished output in place: without `--force` never over something that appeared
//! meanwhile (another run writing the same output), with it only over an output of the same
//! kind.
//!
//! [`place_new`] uses Linux's `renameat2(RENAME_NOREPLACE)`, which fails with `EEXIST` when the
//! destination exists, atomically. Where the file system refuses that flag (some network and
//! FUSE file systems, other systems), a file is linked to its final name (`link` also fails
//! when the name exists) and its temporary name removed; a directory, or a file on a file
//! system without hard links, first claims the name with an empty placeholder created
//! exclusively (`mkdir`, `O_CREAT|O_EXCL`) and is then renamed over its own placeholder. Of two
//! runs committing the same name exactly one succeeds; the other gets `AlreadyExists`.

use std::io::{Error, ErrorKind, Result};
use std::path::Path;

/// Renames `from` (a file or a directory) to `to`, failing with `AlreadyExists` if anything is
/// at `to` (a dangling symbolic link included) and leaving `to` untouched then.
pub fn place_new(from: &Path, to: &Path) -> Result<()> {
    match rename_with_flags(from, to, RenameFlag::NoReplace) {
        Err(e) if unsupported(&e) => place_new_portably(from, to),
        other => other,
    }
}

/// [`place_new`] without `renameat2`: a hard link for a file, else a placeholder.
pub fn place_new_portably(from: &Path, to: &Path) -> Result<()> {
    let is_dir = std::fs::symlink_metadata(from)?.is_dir();
    if !is_dir {
        match std::fs::hard_link(from, to) {
            Ok(()) => {
                // The output is in place; a temporary name that cannot be removed is only
                // a second name of the same file.
                let _ = std::fs::remove_file(from);
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Err(e),
            Err(_) => {} // no hard links here: claim the name instead
        }
    }
    place_over_placeholder(from, to, is_dir)
}

/// Claims `to` with an empty file or directory created exclusively, then renames `from` over
/// it (rename replaces an empty directory, and a file); the placeholder goes if that fails.
pub fn place_over_placeholder(from: &Path, to: &Path, is_dir: bool) -> Result<()> {
    if is_dir {
        std::fs::create_dir(to)?;
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(to)?;
    }
    std::fs::rename(from, to).inspect_err(|_| {
        let _ = if is_dir {
            std::fs::remove_dir(to)
        } else {
            std::fs::remove_file(to)
        };
    })
}

/// Renames the directory `from` over the existing directory `to` (`--force`): the two are
/// exchanged atomically (`RENAME_EXCHANGE`) and the old one, now at `from`, is removed; where
/// that flag is refused, the old one is removed first and `from` renamed after.
pub fn replace_dir(from: &Path, to: &Path) -> Result<()> {
    match rename_with_flags(from, to, RenameFlag::Exchange) {
        Ok(()) => std::fs::remove_dir_all(from),
        Err(e) if unsupported(&e) => {
            std::fs::remove_dir_all(to)?;
            std::fs::rename(from, to)
        }
        Err(e) => Err(e),
    }
}

#[derive(Clone, Copy)]
enum RenameFlag {
    NoReplace,
    Exchange,
}

/// Errors that mean "this file system (or system) does not do that flag".
fn unsupported(e: &Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

#[cfg(target_os = "linux")]
fn rename_with_flags(from: &Path, to: &Path, flag: RenameFlag) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "path holds a NUL byte"))
    };
    let (from_c, to_c) = (c(from)?, c(to)?);
    let flags = match flag {
        RenameFlag::NoReplace => libc::RENAME_NOREPLACE,
        RenameFlag::Exchange => libc::RENAME_EXCHANGE,
    };
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn rename_with_flags(_from: &Path, _to: &Path, _flag: RenameFlag) -> Result<()> {
    Err(Error::from_raw_os_error(libc::ENOSYS))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way of placing a new file or directory refuses an existing destination, leaves it
    /// as it was and keeps the source.
    #[test]
    fn every_route_refuses_an_existing_destination() {
        let d = tempfile::tempdir().unwrap();
        let (from, to) = (d.path().join("from"), d.path().join("to"));
        type Route = fn(&Path, &Path) -> Result<()>;
        let routes: [(&str, Route); 3] = [
            ("renameat2", place_new),
            ("link", place_new_portably),
            ("placeholder", |f, t| {
                place_over_placeholder(f, t, f.is_dir())
            }),
        ];
        for (name, route) in routes {
            for is_dir in [false, true] {
                if is_dir {
                    std::fs::create_dir(&from).unwrap();
                    std::fs::write(from.join("x"), b"new").unwrap();
                } else {
                    std::fs::write(&from, b"new").unwrap();
                }
                std::fs::write(&to, b"old").unwrap();
                let e = route(&from, &to).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{name} {is_dir}");
                assert_eq!(std::fs::read(&to).unwrap(), b"old", "{name} {is_dir}");
                std::fs::remove_file(&to).unwrap();
                route(&from, &to).unwrap();
                assert!(std::fs::symlink_metadata(&from).is_err(), "{name} {is_dir}");
                let placed = if is_dir { to.join("x") } else { to.clone() };
                assert_eq!(std::fs::read(&placed).unwrap(), b"new", "{name} {is_dir}");
                let _ = std::fs::remove_dir_all(&to);
                let _ = std::fs::remove_file(&to);
            }
        }
    }

    /// Threads racing to place their own file at one name: exactly one wins, by every route.
    #[test]
    fn of_racing_writers_exactly_one_wins() {
        type Route = fn(&Path, &Path) -> Result<()>;
        let routes: [Route; 3] = [place_new, place_new_portably, |f, t| {
            place_over_placeholder(f, t, false)
        }];
        for route in routes {
            let d = tempfile::tempdir().unwrap();
            let to = d.path().join("out");
            let barrier = std::sync::Barrier::new(8);
            let wins: Vec<bool> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|i| {
                        let (to, barrier) = (&to, &barrier);
                        let from = d.path().join(format!("tmp{i}"));
                        std::fs::write(&from, format!("writer {i}")).unwrap();
                        s.spawn(move || {
                            barrier.wait();
                            route(&from, to).is_ok()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(wins.iter().filter(|&&w| w).count(), 1, "{wins:?}");
            let winner = wins.iter().position(|&w| w).unwrap();
            assert_eq!(
                std::fs::read_to_string(&to).unwrap(),
                format!("writer {winner}")
            );
        }
    }

    #[test]
    fn a_forced_directory_replaces_the_old_one_whole() {
        let d = tempfile::tempdir().unwrap();
        let (from, to) = (d.path().join("from"), d.path().join("to"));
        std::fs::create_dir(&from).unwrap();
        std::fs::write(from.join("new"), b"n").unwrap();
        std::fs::create_dir(&to).unwrap();
        std::fs::write(to.join("old"), b"o").unwrap();
        replace_dir(&from, &to).unwrap();
        let names: Vec<_> = std::fs::read_dir(&to)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["new"]);
        assert!(std::fs::symlink_metadata(&from).is_err());
    }
}
