//! SIGINT/SIGTERM during compress and decompress: exit status 130, a message, and no output
//! or temporary file left behind.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts the binary, waits until a staged temporary appears in `dir`, sends `signal`, and
/// returns the exit status and stderr.
fn interrupt(args: &[&str], dir: &std::path::Path, signal: &str) -> (Option<i32>, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_udelta-gpu"))
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let partial = || {
        std::fs::read_dir(dir).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".partial-")
        })
    };
    while !partial() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no temporary output appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn signals_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    // A synthetic checkpoint large enough that compression takes a moment.
    ok(udelta(&[
        "synth",
        "--out",
        s(dir.path()),
        "--preset",
        "tiny",
        "--layers",
        "24",
        "-q",
    ]));
    let (base, ft) = (dir.path().join("base"), dir.path().join("ft-1"));
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let file = out_dir.join("x.udelta");
    for signal in ["INT", "TERM"] {
        let (code, err) = interrupt(
            &[
                "compress",
                "--base",
                s(&base),
                "--finetuned",
                s(&ft),
                "-o",
                s(&file),
                "-q",
                "--adapter",
                "cpu",
            ],
            &out_dir,
            signal,
        );
        // The temporary appears when the run starts, well before it can finish.
        assert_eq!(code, Some(130), "{signal}: {err}");
        assert!(err.contains("interrupted"), "{err}");
        let left: Vec<_> = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{signal}: left {left:?}");
    }
    ok(udelta(&[
        "compress",
        "--base",
        s(&base),
        "--finetuned",
        s(&ft),
        "-o",
        s(&file),
        "-q",
        "--adapter",
        "cpu",
    ]));
    let restored = out_dir.join("restored");
    let (code, err) = interrupt(
        &[
            "decompress",
            s(&file),
            "--base",
            s(&base),
            "-o",
            s(&restored),
            "-q",
        ],
        &out_dir,
        "INT",
    );
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["x.udelta".to_string()]);
}
