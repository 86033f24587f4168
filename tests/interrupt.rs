//! SIGINT/SIGTERM during compress (one fine-tune or several), decompress (full and
//! --delta-only) and synth: exit status 130, a message, and no output or temporary file left
//! behind.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts the binary, waits until a staged temporary appears in `dir`, sends `signal`, and
/// returns the exit status and stderr.
fn interrupt(args: &[&str], dir: &Path, signal: &str) -> (Option<i32>, String) {
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

/// Interrupts `args` with SIGINT and with SIGTERM; each time: status 130, the message, and
/// `dir` holding exactly `expected` afterwards.
fn interrupt_both(args: &[&str], dir: &Path, expected: &[&str]) {
    for signal in ["INT", "TERM"] {
        let (code, err) = interrupt(args, dir, signal);
        assert_eq!(code, Some(130), "{signal} {args:?}: {err}");
        assert!(err.contains("interrupted"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        let mut left: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, expected, "{signal} {args:?}: left behind");
    }
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
        "--models",
        "2",
        "-q",
    ]));
    let (base, ft, ft2) = (
        dir.path().join("base"),
        dir.path().join("ft-1"),
        dir.path().join("ft-2"),
    );
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let file = out_dir.join("x.udelta");
    let compress = [
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
    ];
    interrupt_both(&compress, &out_dir, &[]);
    // Several fine-tunes: the output is a staged directory of files.
    let many = out_dir.join("many");
    let mut several = compress.to_vec();
    several[6] = s(&many);
    several.extend(["--finetuned", s(&ft2)]);
    interrupt_both(&several, &out_dir, &[]);
    ok(udelta(&compress));
    let restored = out_dir.join("restored");
    for extra in [&[][..], &["--delta-only"]] {
        let mut args = vec![
            "decompress",
            s(&file),
            "--base",
            s(&base),
            "-o",
            s(&restored),
            "-q",
        ];
        args.extend_from_slice(extra);
        interrupt_both(&args, &out_dir, &["x.udelta"]);
    }
    // synth writes staged checkpoint directories too.
    let synth_dir = out_dir.join("synth");
    std::fs::create_dir(&synth_dir).unwrap();
    interrupt_both(
        &[
            "synth",
            "--out",
            s(&synth_dir),
            "--layers",
            "24",
            "--shards",
            "4",
            "-q",
        ],
        &synth_dir,
        &[],
    );
}
