//! The tool's output side: a reader that closes stdout early (`udelta-gpu inspect f | head`)
//! must not make it panic.

mod common;
use common::*;
use std::process::{Command, Stdio};

#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_file(dir.path(), &[]);
    for args in [
        vec!["inspect", s(&file)],
        vec!["inspect", s(&file), "--json"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_udelta-gpu"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the tool writes: its writes fail with EPIPE.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

/// `demo` on a server without a desktop session (no `XDG_RUNTIME_DIR`, as under ssh or in a
/// container) prints nothing on stderr but the notices it means to give: no driver noise.
#[test]
fn demo_prints_no_driver_noise_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_udelta-gpu"))
        .arg("demo")
        .current_dir(dir.path())
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .output()
        .unwrap();
    assert!(out.status.success(), "demo failed: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let unexpected: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("udelta-gpu: "))
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected stderr lines from demo: {unexpected:#?}"
    );
}
