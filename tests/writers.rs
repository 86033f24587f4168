//! Issue 18, points 3-7: one writer at a time (two runs to one output never both succeed),
//! `rescale` all or nothing (and links left links, a file named twice refused), the base's
//! identity independent of the tensors a fine-tune stores, special files (FIFOs, sockets,
//! devices) refused as inputs and outputs, and an exit status that always agrees with the
//! output (a run that fails leaves none).

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use udelta_gpu::staging::StagedPath;

/// Synthetic tiny checkpoints: `DIR/NAME/base`, `DIR/NAME/ft-1` .. `ft-M`.
fn synth(dir: &Path, name: &str, models: usize, layers: usize, seed: u64) -> PathBuf {
    let out = dir.join(name);
    ok(udelta(&[
        "synth",
        "--out",
        s(&out),
        "--preset",
        "tiny",
        "--layers",
        &layers.to_string(),
        "--models",
        &models.to_string(),
        "--seed",
        &seed.to_string(),
        "-q",
    ]));
    out
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_udelta-gpu"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `args` and fails the test if the run does not end within 30 s (a blocking open).
fn run_bounded(args: &[&str]) -> Output {
    let mut child = spawn(args);
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("{args:?} blocked");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().unwrap()
}

/// Names in `dir` that are temporaries of a staged output.
fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-"))
        .collect()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(s(path)).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

// ---------------------------------------------------------------- one writer at a time

/// Two processes compressing (then decompressing) to one output at once: exactly one succeeds,
/// the other says why and leaves nothing; the output is the winner's, whole (byte-identical to
/// a run alone).
#[test]
fn two_runs_to_one_output_never_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth(dir.path(), "m", 1, 4, 0);
    let (base, ft) = (m.join("base"), m.join("ft-1"));
    let alone = dir.path().join("alone.udelta");
    ok(udelta(&compress_args(&base, &ft, &alone)));
    let expected = std::fs::read(&alone).unwrap();
    let out_dir = dir.path().join("race");
    std::fs::create_dir(&out_dir).unwrap();
    for round in 0..3 {
        let out = out_dir.join(format!("r{round}.udelta"));
        let args = compress_args(&base, &ft, &out);
        let (a, b) = (spawn(&args), spawn(&args));
        let results = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
        one_winner(&results, &out, round);
        assert_eq!(std::fs::read(&out).unwrap(), expected, "round {round}");
        assert!(partials(&out_dir).is_empty());
        let restored = out_dir.join(format!("d{round}"));
        let dargs = [
            "decompress",
            s(&alone),
            "--base",
            s(&base),
            "-o",
            s(&restored),
            "-q",
        ];
        let (a, b) = (spawn(&dargs), spawn(&dargs));
        let results = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
        one_winner(&results, &restored, round);
        assert_eq!(read_checkpoint(&restored).len(), read_checkpoint(&ft).len());
        assert!(partials(&out_dir).is_empty());
    }
}

fn one_winner(results: &[Output; 2], out: &Path, round: usize) {
    let wins = results.iter().filter(|o| o.status.success()).count();
    assert_eq!(wins, 1, "round {round}: {} of 2 runs succeeded", wins);
    let loser = results.iter().find(|o| !o.status.success()).unwrap();
    let err = String::from_utf8_lossy(&loser.stderr);
    assert_eq!(loser.status.code(), Some(1), "{err}");
    assert!(err.contains(s(out)), "{err}");
    assert!(
        err.contains("already exists") || err.contains("appeared while"),
        "{err}"
    );
}

/// An output created between staging and the final rename is never replaced (file or
/// directory); the staged temporary goes. With `force` it is replaced, but only by the same
/// kind: a FIFO that appeared is refused.
#[test]
fn an_output_that_appears_before_the_commit_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.udelta");
    let staged = StagedPath::new(&target, false).unwrap();
    std::fs::write(staged.path(), b"mine").unwrap();
    std::fs::write(&target, b"theirs").unwrap();
    let err = staged.commit().unwrap_err().to_string();
    assert!(
        err.contains("out.udelta") && err.contains("appeared while"),
        "{err}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"theirs");
    assert!(partials(dir.path()).is_empty());

    let ckpt = dir.path().join("ckpt");
    let staged = StagedPath::new(&ckpt, false).unwrap();
    std::fs::create_dir(staged.path()).unwrap();
    std::fs::write(staged.path().join("model.safetensors"), b"mine").unwrap();
    std::fs::create_dir(&ckpt).unwrap(); // empty: rename(2) alone would replace it
    assert!(staged
        .commit()
        .unwrap_err()
        .to_string()
        .contains("appeared while"));
    assert_eq!(std::fs::read_dir(&ckpt).unwrap().count(), 0);
    assert!(partials(dir.path()).is_empty());

    let staged = StagedPath::new(&target, true).unwrap();
    std::fs::write(staged.path(), b"mine").unwrap();
    staged.commit().unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"mine");

    let fifo = dir.path().join("fifo.udelta");
    let staged = StagedPath::new(&fifo, true).unwrap();
    std::fs::write(staged.path(), b"mine").unwrap();
    mkfifo(&fifo);
    let err = staged.commit().unwrap_err().to_string();
    assert!(
        err.contains("FIFO") && err.contains("not replaced"),
        "{err}"
    );
    assert!(partials(dir.path()).is_empty());
}

/// The same through the library's compress: the file is complete and staged, another writer
/// puts a file at the name, the commit fails and leaves theirs.
#[test]
fn a_compress_that_loses_the_race_leaves_the_winner_alone() {
    use udelta_gpu::pipeline::compress::{compress_staged, CompressOptions};
    let dir = tempfile::tempdir().unwrap();
    let m = synth(dir.path(), "m", 1, 2, 0);
    let out = dir.path().join("out.udelta");
    let opts = CompressOptions::default();
    let mut engine = udelta_gpu::engine::create("cpu", 1 << 30).unwrap();
    let staged = compress_staged(
        &m.join("base"),
        &[m.join("ft-1")],
        &out,
        &opts,
        engine.as_mut(),
    )
    .unwrap();
    assert!(!out.exists());
    let (tmp, len) = staged.files()[0].clone();
    assert_eq!(std::fs::metadata(&tmp).unwrap().len(), len);
    std::fs::write(&out, b"the other run").unwrap();
    let err = staged.commit().unwrap_err().to_string();
    assert!(err.contains("appeared while"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"the other run");
    assert!(!tmp.exists());
}

// ---------------------------------------------------------------- rescale

/// Three fine-tunes of one base compressed separately with --trace-norm; the third at a lower
/// sparsity, so its file is the largest.
struct RescaleFixture {
    dir: tempfile::TempDir,
    files: [PathBuf; 3],
}

impl RescaleFixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let m = synth(dir.path(), "m", 3, 2, 0);
        let base = m.join("base");
        let files = [1, 2, 3].map(|i| dir.path().join(format!("f{i}.udelta")));
        for (i, f) in files.iter().enumerate() {
            let ft = m.join(format!("ft-{}", i + 1));
            let mut args = compress_args(&base, &ft, f);
            args.extend(["--trace-norm", "--sparsity", ["0.95", "0.95", "0.5"][i]]);
            ok(udelta(&args));
        }
        RescaleFixture { dir, files }
    }

    fn args<'a>(&'a self, files: &[&'a Path]) -> Vec<&'a str> {
        std::iter::once("rescale")
            .chain(files.iter().map(|f| s(f)))
            .collect()
    }
}

/// gamma_m = min_j T_j / T_m over the trace norms stored in the files (docs/ALGORITHM.md).
fn expected_gammas(files: &[&Path]) -> Vec<f64> {
    let norms: Vec<f64> = files
        .iter()
        .map(|f| read_index(f)["model"]["trace_norm"].as_f64().unwrap())
        .collect();
    let min = norms.iter().copied().fold(f64::INFINITY, f64::min);
    norms.iter().map(|t| min / t).collect()
}

/// A file that cannot be rewritten (read-only; a write that fails midway, here the third
/// copy, by a file-size limit) changes none of them.
#[test]
fn rescale_changes_all_files_or_none() {
    let fx = RescaleFixture::new();
    let [a, b, c] = &fx.files;
    let before = snapshot(fx.dir.path());
    std::fs::set_permissions(c, std::fs::Permissions::from_mode(0o444)).unwrap();
    fails(
        udelta(&fx.args(&[a, b, c])),
        &["f3.udelta", "read-only", "nothing was changed"],
    );
    std::fs::set_permissions(c, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(snapshot(fx.dir.path()), before);

    let (small, big) = (
        std::fs::metadata(a).unwrap().len(),
        std::fs::metadata(c).unwrap().len(),
    );
    assert!(small + 4096 < big, "{small} vs {big}");
    let limit = (small + big) / 2;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_udelta-gpu"));
    cmd.args(fx.args(&[a, b, c]));
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    fails(cmd.output().unwrap(), &["f3.udelta"]);
    assert_eq!(snapshot(fx.dir.path()), before);

    // And when nothing fails, all change, to the hand-computed gammas.
    let out = ok(udelta(&fx.args(&[a, b, c])));
    let gammas = expected_gammas(&[a, b, c]);
    for (f, g) in [a, b, c].iter().zip(&gammas) {
        let i = read_index(f);
        assert_eq!(i["model"]["gamma"].as_f64().unwrap(), *g);
        assert!(
            out.contains(&format!("{}  gamma {g:.6}", f.display())),
            "{out}"
        );
    }
}

/// A symbolic link argument rewrites its target and stays a link; the same file named twice
/// (`a` and `./a`, a symbolic link, a hard link) is refused before anything changes.
#[test]
fn rescale_follows_links_and_refuses_a_file_named_twice() {
    let fx = RescaleFixture::new();
    let [a, b, _] = &fx.files;
    let link = fx.dir.path().join("link.udelta");
    std::os::unix::fs::symlink(a, &link).unwrap();
    let hard = fx.dir.path().join("hard.udelta");
    std::fs::hard_link(b, &hard).unwrap();
    let dotted = fx.dir.path().join(".").join("f1.udelta");
    let before = snapshot(fx.dir.path());
    for (first, second) in [(a, &dotted), (a, &link), (b, &hard)] {
        fails(
            udelta(&fx.args(&[first, second])),
            &[s(second), "names the same file", s(first)],
        );
        assert_eq!(snapshot(fx.dir.path()), before);
    }
    ok(udelta(&fx.args(&[&link, b])));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let gammas = expected_gammas(&[a, b]);
    assert_eq!(read_index(a)["model"]["gamma"].as_f64().unwrap(), gammas[0]);
    assert_eq!(read_index(b)["model"]["gamma"].as_f64().unwrap(), gammas[1]);
    assert_eq!(
        read_index(&hard)["model"]["gamma"].as_f64().unwrap(),
        1.0,
        "the rewritten b is a new file: its other hard link keeps the old one"
    );
    assert_ne!(gammas[0], gammas[1]);
}

// ---------------------------------------------------------------- base identity

/// The fingerprint is over every base tensor's name, dtype and shape in name order,
/// recomputed here from the base's safetensors header.
fn header_fingerprint(base_file: &Path) -> (String, usize) {
    let (header, _) = st_split(&std::fs::read(base_file).unwrap());
    let mut entries: Vec<(&String, &serde_json::Value)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .collect();
    entries.sort_by(|x, y| x.0.cmp(y.0));
    let mut h = crc32fast::Hasher::new();
    for (name, v) in &entries {
        let dtype = v["dtype"].as_str().unwrap();
        let shape: Vec<u64> = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(dtype.len() as u64).to_le_bytes());
        h.update(dtype.as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        shape.iter().for_each(|d| h.update(&d.to_le_bytes()));
    }
    (format!("{:08x}", h.finalize()), entries.len())
}

/// Fine-tunes of one base that store different subsets of base tensors (the second dropped
/// `model.norm.weight`, which a fine-tune may: it is not compressed) have one fingerprint, that
/// of the whole base, and rescale accepts them; a base of another seed (same shapes, other
/// values) or of another shape is refused.
#[test]
fn base_identity_is_the_base_not_the_subset_used() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth(dir.path(), "m", 2, 2, 0);
    let mut ft2: Vec<T> = read_checkpoint(&m.join("ft-2")).into_values().collect();
    ft2.retain(|t| t.name != "model.norm.weight");
    ft2.sort_by(|x, y| x.name.cmp(&y.name));
    let ft2_dir = write_checkpoint(&dir.path().join("ft-2-dropped"), &ft2, 1);
    let (a, b) = (dir.path().join("a.udelta"), dir.path().join("b.udelta"));
    let base = m.join("base");
    for (ft, f) in [(m.join("ft-1"), &a), (ft2_dir, &b)] {
        let mut args = compress_args(&base, &ft, f);
        args.push("--trace-norm");
        ok(udelta(&args));
    }
    let with_crc = |f: &Path| -> Vec<String> {
        read_index(f)["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t.get("base_crc32").is_some() || t["base"].is_object())
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_ne!(with_crc(&a), with_crc(&b), "the subsets should differ");
    let base_file = std::fs::read_dir(m.join("base"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .expect("a single-file base");
    let (fingerprint, count) = header_fingerprint(&base_file);
    for f in [&a, &b] {
        let base = &read_index(f)["base"];
        assert_eq!(base["fingerprint"], fingerprint.as_str());
        assert_eq!(base["tensors"], count);
        assert_eq!(base["identity"], "names-dtypes-shapes");
    }
    let out = ok(udelta(&["rescale", s(&a), s(&b)]));
    assert!(
        out.contains("a.udelta") && out.contains("b.udelta"),
        "{out}"
    );

    let other_seed = synth(dir.path(), "o", 1, 2, 7);
    let other_shape = synth(dir.path(), "p", 1, 3, 0);
    for (name, o) in [("seed", &other_seed), ("shape", &other_shape)] {
        let f = dir.path().join(format!("{name}.udelta"));
        let (o_base, o_ft) = (o.join("base"), o.join("ft-1"));
        let mut args = compress_args(&o_base, &o_ft, &f);
        args.push("--trace-norm");
        ok(udelta(&args));
        let before = snapshot(dir.path());
        fails(udelta(&["rescale", s(&a), s(&f)]), &[s(&f), "another base"]);
        assert_eq!(snapshot(dir.path()), before, "{name}");
    }
}

// ---------------------------------------------------------------- special files

/// FIFOs, sockets and devices as inputs are refused at once (a FIFO nobody writes would block
/// an open for reading forever); nothing is written.
#[test]
fn special_files_as_inputs_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth(dir.path(), "m", 1, 2, 0);
    let (base, ft) = (m.join("base"), m.join("ft-1"));
    let good = dir.path().join("good.udelta");
    ok(udelta(&compress_args(&base, &ft, &good)));
    let fifo = dir.path().join("pipe.safetensors");
    mkfifo(&fifo);
    let sock_path = dir.path().join("sock.udelta");
    let _sock = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
    let fifo_shard_dir = dir.path().join("fifo-ckpt");
    std::fs::create_dir(&fifo_shard_dir).unwrap();
    mkfifo(&fifo_shard_dir.join("model-00001-of-00001.safetensors"));
    std::fs::write(
        fifo_shard_dir.join("model.safetensors.index.json"),
        r#"{"weight_map": {"w": "model-00001-of-00001.safetensors"}}"#,
    )
    .unwrap();
    let out = dir.path().join("out.udelta");
    let restored = dir.path().join("restored");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            compress_args(&fifo, &ft, &out),
            vec!["pipe.safetensors", "FIFO"],
        ),
        (
            compress_args(&base, &fifo, &out),
            vec!["pipe.safetensors", "FIFO"],
        ),
        (
            compress_args(Path::new("/dev/zero"), &ft, &out),
            vec!["/dev/zero", "character device"],
        ),
        (
            compress_args(&base, &fifo_shard_dir, &out),
            vec!["model-00001-of-00001.safetensors", "FIFO"],
        ),
        (
            vec![
                "decompress",
                s(&fifo),
                "--base",
                s(&base),
                "-o",
                s(&restored),
            ],
            vec!["pipe.safetensors", "FIFO"],
        ),
        (
            vec![
                "decompress",
                s(&sock_path),
                "--base",
                s(&base),
                "-o",
                s(&restored),
            ],
            vec!["sock.udelta", "socket"],
        ),
        (
            vec![
                "decompress",
                s(&good),
                "--base",
                s(&fifo),
                "-o",
                s(&restored),
            ],
            vec!["pipe.safetensors", "FIFO"],
        ),
        (vec!["inspect", s(&fifo)], vec!["pipe.safetensors", "FIFO"]),
        (
            vec!["rescale", s(&good), s(&fifo)],
            vec!["pipe.safetensors", "FIFO"],
        ),
    ];
    let before = snapshot_regular(dir.path());
    for (args, needles) in cases {
        fails(run_bounded(&args), &needles);
        assert_eq!(snapshot_regular(dir.path()), before, "{args:?}");
    }
}

/// Outputs: nothing under /dev/ (with or without --force), and --force replaces only a regular
/// file (compress) or a directory (decompress): never a FIFO, a socket or a symbolic link.
#[test]
fn special_outputs_are_refused_even_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth(dir.path(), "m", 1, 2, 0);
    let (base, ft) = (m.join("base"), m.join("ft-1"));
    let good = dir.path().join("good.udelta");
    ok(udelta(&compress_args(&base, &ft, &good)));
    let fifo = dir.path().join("fifo.udelta");
    mkfifo(&fifo);
    let sock = dir.path().join("sock.udelta");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let link = dir.path().join("link.udelta");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    let dir_link = dir.path().join("dir-link");
    std::os::unix::fs::symlink(&m, &dir_link).unwrap();
    let decompress_to = |out: &Path| -> Vec<String> {
        [
            "decompress",
            s(&good),
            "--base",
            s(&base),
            "-o",
            s(out),
            "--force",
        ]
        .map(String::from)
        .to_vec()
    };
    let compress_to = |out: &Path| -> Vec<String> {
        let mut a: Vec<String> = compress_args(&base, &ft, out)
            .into_iter()
            .map(String::from)
            .collect();
        a.push("--force".into());
        a
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            compress_to(Path::new("/dev/null")),
            vec!["/dev/null", "/dev/"],
        ),
        (
            compress_to(Path::new("/dev/new.udelta")),
            vec!["/dev/new.udelta", "/dev/"],
        ),
        (
            decompress_to(Path::new("/dev/null")),
            vec!["/dev/null", "/dev/"],
        ),
        (compress_to(&fifo), vec!["fifo.udelta", "a FIFO"]),
        (compress_to(&sock), vec!["sock.udelta", "a socket"]),
        (compress_to(&link), vec!["link.udelta", "a symbolic link"]),
        (decompress_to(&fifo), vec!["fifo.udelta", "a FIFO"]),
        (
            decompress_to(&dir_link),
            vec!["dir-link", "a symbolic link"],
        ),
    ];
    let before = snapshot_regular(dir.path());
    for (args, needles) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(run_bounded(&args), &needles);
        assert_eq!(snapshot_regular(dir.path()), before, "{args:?}");
    }
    // Without --force too, for /dev/.
    let mut plain = compress_args(&base, &ft, Path::new("/dev/null"));
    plain.retain(|a| *a != "--force");
    fails(udelta(&plain), &["/dev/null", "/dev/"]);
}

/// Every regular file (length, CRC-32), directory and other entry (by kind) under `dir`.
fn snapshot_regular(dir: &Path) -> std::collections::BTreeMap<PathBuf, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let t = std::fs::symlink_metadata(&p).unwrap().file_type();
            let what = if t.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if t.is_file() {
                let bytes = std::fs::read(&p).unwrap();
                format!("{} {:08x}", bytes.len(), crc32fast::hash(&bytes))
            } else {
                format!("{t:?}")
            };
            out.insert(p, what);
        }
    }
    out
}

// ---------------------------------------------------------------- exit status and output

/// A report that cannot be written (stdout is /dev/full) fails the run, which then leaves no
/// output (compress: one file, several, --json; rescale: no file rewritten). A closed stdout
/// (the reader went away) or an unwritable stderr is no failure: exit 0 and the output there.
#[test]
fn a_run_that_fails_leaves_no_output_and_one_that_succeeds_does() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth(dir.path(), "m", 2, 2, 0);
    let (base, ft, ft2) = (m.join("base"), m.join("ft-1"), m.join("ft-2"));
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let with_stdout = |args: &[&str], stdout: Stdio, stderr: Stdio| {
        Command::new(env!("CARGO_BIN_EXE_udelta-gpu"))
            .args(args)
            .stdout(stdout)
            .stderr(stderr)
            .output()
            .unwrap()
    };
    let full = || Stdio::from(std::fs::File::create("/dev/full").unwrap());
    let one = work.join("one.udelta");
    let several = work.join("several");
    let mut json = compress_args(&base, &ft, &one);
    json.push("--json");
    let mut two = compress_args(&base, &ft, &several);
    two.extend(["--finetuned", s(&ft2)]);
    for args in [compress_args(&base, &ft, &one), json, two] {
        let out = with_stdout(&args, full(), Stdio::piped());
        fails(out, &["stdout", "No space left"]);
        assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "{args:?}");
    }

    // stderr full: the notes are lost, the run is not.
    let args = compress_args(&base, &ft, &one);
    let mut loud = args.clone();
    loud.retain(|a| *a != "-q");
    let out = with_stdout(&loud, Stdio::piped(), full());
    assert!(out.status.success(), "{out:?}");
    assert!(one.is_file());
    std::fs::remove_file(&one).unwrap();

    // A reader that closed the pipe before the report: exit 0, file there.
    let mut child = Command::new(env!("CARGO_BIN_EXE_udelta-gpu"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(one.is_file());

    // rescale: gammas not printable, no file rewritten.
    let (a, b) = (work.join("a.udelta"), work.join("b.udelta"));
    for (f, t) in [(&a, &ft), (&b, &ft2)] {
        let mut c = compress_args(&base, t, f);
        c.push("--trace-norm");
        ok(udelta(&c));
    }
    let before = snapshot(&work);
    let out = with_stdout(&["rescale", s(&a), s(&b)], full(), Stdio::piped());
    fails(out, &["stdout"]);
    assert_eq!(snapshot(&work), before);
}

/// SIGINT/SIGTERM while the run waits to write its report (stdout a full pipe), with its
/// outputs complete but not yet committed: exit 130 and no output (the step added before the
/// final rename is covered by the signal handler like every other).
#[test]
fn a_signal_before_the_commit_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let m = synth(dir.path(), "m", 1, 2, 0);
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let out = work.join("out.udelta");
    let (base, ft) = (m.join("base"), m.join("ft-1"));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let (read_end, write_end) = full_pipe();
        let mut args = compress_args(&base, &ft, &out);
        args.retain(|a| *a != "-q");
        let mut child = Command::new(env!("CARGO_BIN_EXE_udelta-gpu"))
            .args(&args)
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The stages line on stderr comes right before the report is written.
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        while !seen.contains("stages (s)") {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
            assert!(n > 0, "no stages line: {seen}");
            seen += &line;
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the report did not block"
        );
        assert!(!out.exists());
        // SAFETY: a signal to our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "signal {signal}");
        assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
        drop(read_end);
    }
}

/// A pipe whose buffer is already full: a write to its write end blocks until the read end is
/// read (or closed).
fn full_pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors, which are owned from here on; the writes below go
    // to the non-blocking write end until it is full, and then it is made blocking again.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK), 0);
        let chunk = [0u8; 4096];
        while libc::write(fds[1], chunk.as_ptr().cast(), chunk.len()) > 0 {}
        let one = [0u8; 1];
        while libc::write(fds[1], one.as_ptr().cast(), 1) > 0 {}
        let flags = libc::fcntl(fds[1], libc::F_GETFL);
        libc::fcntl(fds[1], libc::F_SETFL, flags & !libc::O_NONBLOCK);
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}
