//! `compress --json` reports under `run` what the run read from disk, moved to and from the
//! device and waited for. These counters are checked here against sums taken independently
//! from the checkpoint files and the file's own report, on both engines (the GPU one on
//! lavapipe; without a Vulkan adapter that part says loudly that it did not run).

mod common;
use common::*;
use safetensors::Dtype;
use std::path::Path;

/// How many times a run reads each compressed tensor's inputs.
const READS_OF_EACH_INPUT: u64 = 1;

/// A tiny LLaMA-shaped pair written by `synth` (f16; the fine-tune's tensors have the base's
/// shapes): its directory.
fn synth(dir: &Path, models: usize) -> (std::path::PathBuf, Vec<std::path::PathBuf>) {
    ok(udelta(&[
        "synth",
        "--out",
        s(dir),
        "--preset",
        "tiny",
        "--layers",
        "2",
        "--models",
        &models.to_string(),
        "-q",
    ]));
    let fts = (1..=models).map(|i| dir.join(format!("ft-{i}"))).collect();
    (dir.join("base"), fts)
}

/// `compress --json` with `adapter` (and `extra` arguments): the first file's report.
fn compress_json(
    dir: &Path,
    base: &Path,
    fts: &[std::path::PathBuf],
    adapter: &str,
    extra: &[&str],
) -> serde_json::Value {
    compress_json_env(dir, base, fts, adapter, extra, &[])
}

/// [`compress_json`] with environment variables `env` set.
fn compress_json_env(
    dir: &Path,
    base: &Path,
    fts: &[std::path::PathBuf],
    adapter: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> serde_json::Value {
    let out = dir.join(format!("{adapter}.out"));
    let mut args = vec!["compress", "--base", s(base)];
    for f in fts {
        args.extend(["--finetuned", s(f)]);
    }
    args.extend([
        "-o",
        s(&out),
        "--adapter",
        adapter,
        "-q",
        "--json",
        "--force",
    ]);
    args.extend(extra);
    let v: serde_json::Value = serde_json::from_str(&ok(udelta_env(&args, env))).unwrap();
    match v {
        serde_json::Value::Array(mut files) => files.remove(0),
        one => one,
    }
}

/// Bytes of the tensors of `kind` in a file's report (the fine-tune's bytes).
fn bytes_of_kind(report: &serde_json::Value, kind: &str) -> u64 {
    report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == kind)
        .map(|t| t["bytes_tensor"].as_u64().unwrap())
        .sum()
}

fn counter(report: &serde_json::Value, name: &str) -> u64 {
    report["run"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("run.{name} missing in {}", report["run"]))
}

#[test]
fn cpu_run_reads_each_compressed_input_once_and_touches_no_device() {
    let dir = tempfile::tempdir().unwrap();
    let (base, fts) = synth(dir.path(), 1);
    let r = compress_json(dir.path(), &base, &fts, "cpu", &[]);
    let compressed = bytes_of_kind(&r, "compressed");
    let others: u64 = bytes_of_kind(&r, "coded") + bytes_of_kind(&r, "unchanged");
    assert!(compressed > 0 && others > 0);
    // The base tensors have the fine-tune's shapes and dtype: both sides, once each.
    assert_eq!(counter(&r, "compressed_input_bytes"), 2 * compressed);
    assert_eq!(counter(&r, "compressed_tensors"), 16);
    // Compressed pairs are read READS_OF_EACH_INPUT times; the others at most twice
    // (compared in pass 1, then coded against the base in pass 2).
    let read = counter(&r, "bytes_read");
    let pairs = READS_OF_EACH_INPUT * 2 * compressed;
    assert!(read >= pairs + others, "{read}");
    assert!(read <= pairs + 4 * others, "{read}");
    for c in [
        "bytes_uploaded",
        "bytes_read_back",
        "blocking_waits",
        "blocking_wait_us",
        "overlapped_tensors",
    ] {
        assert_eq!(counter(&r, c), 0, "{c} on the CPU engine");
    }
    for stage in [
        "read",
        "analyze",
        "analyze_start",
        "select",
        "encode",
        "write",
    ] {
        assert!(
            r["run"]["seconds"][stage].as_f64().unwrap() >= 0.0,
            "{stage}"
        );
    }
}

/// Whether the file system holding the checkpoint directory `dir` accepts `O_DIRECT`.
fn direct_io_supported(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::read_dir(dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(file)
        .is_ok()
}

/// Drops the page cache of every file under `dir` (written through first).
fn evict(dir: &Path) {
    use std::os::unix::io::AsRawFd;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            evict(&path);
            continue;
        }
        let f = std::fs::File::open(&path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: an advisory call on an open file.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
    }
}

#[test]
fn tensors_not_cached_are_read_past_the_page_cache_to_the_same_file() {
    // On the build directory's disk (`/tmp` may be a tmpfs, which has no page cache to skip).
    let target = concat!(env!("CARGO_MANIFEST_DIR"), "/target");
    std::fs::create_dir_all(target).unwrap();
    let dir = tempfile::tempdir_in(target).unwrap();
    let (base, fts) = synth(dir.path(), 1);
    let run = |name: &str, setting: &str| {
        evict(dir.path());
        let env = [("UDELTA_DIRECT_READS", setting)];
        let r = compress_json_env(dir.path(), &base, &fts, "cpu", &[], &env);
        let file = std::fs::read(dir.path().join("cpu.out")).unwrap();
        std::fs::rename(dir.path().join("cpu.out"), dir.path().join(name)).unwrap();
        (r, file)
    };
    let (buffered, want) = run("buffered", "off");
    assert_eq!(counter(&buffered, "bytes_read_direct"), 0);
    // Every tensor of one byte or more may be read directly.
    let (direct, got) = run("direct", "1");
    let inputs = counter(&direct, "compressed_input_bytes");
    let read_direct = counter(&direct, "bytes_read_direct");
    if direct_io_supported(&base) {
        assert!(2 * read_direct >= inputs, "{read_direct} of {inputs}");
    } else {
        // A file system that refuses O_DIRECT: every read falls back to the page cache.
        eprintln!("\n!!!!!!!! O_DIRECT refused here: only the fallback was exercised\n");
        assert_eq!(read_direct, 0);
    }
    assert_eq!(
        counter(&direct, "bytes_read"),
        counter(&buffered, "bytes_read")
    );
    assert!(got == want, "direct reads changed the file");
    // Once cached, the same tensors are read from the cache.
    for ckpt in std::iter::once(&base).chain(&fts) {
        for entry in std::fs::read_dir(ckpt).unwrap() {
            std::fs::read(entry.unwrap().path()).unwrap();
        }
    }
    let env = [("UDELTA_DIRECT_READS", "1")];
    let warm = compress_json_env(dir.path(), &base, &fts, "cpu", &[], &env);
    assert_eq!(counter(&warm, "bytes_read_direct"), 0);
}

#[test]
fn several_fine_tunes_read_the_base_once() {
    let dir = tempfile::tempdir().unwrap();
    let (base, fts) = synth(dir.path(), 2);
    let r = compress_json(dir.path(), &base, &fts, "cpu", &[]);
    let compressed = bytes_of_kind(&r, "compressed");
    // One base tensor and two fine-tuned tensors per compressed name.
    assert_eq!(counter(&r, "compressed_input_bytes"), 3 * compressed);
    assert_eq!(counter(&r, "compressed_tensors"), 32);
    let read = counter(&r, "bytes_read");
    let inputs = READS_OF_EACH_INPUT * 3 * compressed;
    assert!(read >= inputs && read < inputs + compressed / 4, "{read}");
}

#[test]
fn gpu_run_counts_its_uploads_readbacks_and_waits() {
    let out = udelta(&["adapters", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    if !list
        .as_array()
        .is_some_and(|l| l.iter().any(|a| a["backend"] == "Vulkan"))
    {
        report_missing_gpu("no Vulkan adapter");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, fts) = synth(dir.path(), 1);
    let r = compress_json(dir.path(), &base, &fts, "vulkan", &[]);
    let inputs = counter(&r, "compressed_input_bytes");
    let tensors = counter(&r, "compressed_tensors");
    let uploaded = counter(&r, "bytes_uploaded");
    let waits = counter(&r, "blocking_waits");
    eprintln!("uploaded {uploaded} for {inputs} input bytes, {waits} waits for {tensors} tensors");
    assert!(uploaded >= inputs, "every input goes to the device");
    // The tiny preset's tensors fit in one chunk: uploaded once, plus parameter words.
    assert!(
        uploaded as f64 <= 1.05 * inputs as f64,
        "{uploaded} for {inputs}"
    );
    // Per tensor one map: min/max and the flags; the levels, their histogram and the selection
    // are computed on the host (nothing else read back).
    assert!(
        waits >= tensors,
        "at least one wait per tensor for its statistics"
    );
    assert!(waits <= 3 * tensors, "{waits} waits for {tensors} tensors");
    let read_back = counter(&r, "bytes_read_back");
    assert!(read_back > 0 && read_back <= tensors * 1024, "{read_back}");
    let seconds = &r["run"]["seconds"];
    let (start, all) = (
        seconds["analyze_start"].as_f64(),
        seconds["analyze"].as_f64(),
    );
    assert!(start.unwrap() <= all.unwrap(), "{seconds}");
    // Pass 1 keeps one tensor in flight: each tensor but the first is submitted before the
    // host reads the one before it back.
    assert_eq!(counter(&r, "overlapped_tensors"), tensors - 1);
    // Unless two pairs take more than the in-flight bound: then none overlaps, same file.
    let file = std::fs::read(dir.path().join("vulkan.out")).unwrap();
    let env = [("UDELTA_IN_FLIGHT_BYTES", "1")];
    let r = compress_json_env(dir.path(), &base, &fts, "vulkan", &[], &env);
    assert_eq!(counter(&r, "overlapped_tensors"), 0);
    assert!(std::fs::read(dir.path().join("vulkan.out")).unwrap() == file);
}

#[test]
fn data_spilled_to_the_temporary_file_give_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let (base, fts) = synth(dir.path(), 1);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let run = |name: &str, sparsity: &str, budget: &str| {
        let file = out_dir.join(format!("{name}-{sparsity}.udelta"));
        let out = udelta_env(
            &[
                "compress",
                "--base",
                s(&base),
                "--finetuned",
                s(&fts[0]),
                "-o",
                s(&file),
                "--adapter",
                "cpu",
                "-q",
                "--json",
                "--sparsity",
                sparsity,
            ],
            &[("UDELTA_KEPT_LEVELS_BUDGET", budget)],
        );
        let r: serde_json::Value = serde_json::from_str(&ok(out)).unwrap();
        let spilled = counter(&r, "kept_spilled_bytes");
        (std::fs::read(&file).unwrap(), spilled, r)
    };
    // Every compressed parameter, for the checks below.
    let params = |r: &serde_json::Value| -> u64 {
        r["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"] == "compressed")
            .map(|t| t["bytes_tensor"].as_u64().unwrap() / 2)
            .sum()
    };
    for sparsity in ["0.95", "0.5"] {
        let (in_memory, none, _) = run("memory", sparsity, "1000000000");
        let (spilled, bytes, r) = run("spilled", sparsity, "0");
        assert_eq!(none, 0);
        assert_eq!(counter(&r, "kept_bytes"), bytes, "everything spilled");
        assert!(in_memory == spilled, "the spilled run wrote other bytes");
        let n = params(&r);
        let (candidates, tensors) = (counter(&r, "candidates"), counter(&r, "candidate_tensors"));
        if sparsity == "0.5" {
            // Rates from 0.49 on: half the entries are candidates, 5 bytes each, against half
            // a byte per parameter for its 4-bit level: every tensor keeps its levels.
            assert_eq!((candidates, tensors), (0, 0));
            assert_eq!(bytes, n.div_ceil(2), "half a byte per compressed parameter");
        } else {
            // Rates from 0.94 on: about 6 % of the entries (more in small levels, whose
            // margins are wider), 5 bytes each.
            assert_eq!(bytes, 5 * candidates);
            let share = candidates as f64 / n as f64;
            assert!(share > 0.06 && share < 0.09, "{share}");
            let compressed = r["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["kind"] == "compressed")
                .count() as u64;
            assert_eq!(tensors, compressed);
        }
    }
    // The temporary file was unnamed: only the two outputs are in the directory.
    let names: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    fails(
        udelta_env(
            &[
                "compress",
                "--base",
                s(&base),
                "--finetuned",
                s(&fts[0]),
                "-o",
                s(&out_dir.join("x.udelta")),
                "--adapter",
                "cpu",
                "-q",
            ],
            &[("UDELTA_KEPT_LEVELS_BUDGET", "lots")],
        ),
        &["UDELTA_KEPT_LEVELS_BUDGET=lots"],
    );
    assert!(!out_dir.join("x.udelta").exists());
}

/// Tensor names whose inputs take more bytes than this go through the blocked path in
/// `blocked_analysis_gives_the_same_file_and_reads_those_tensors_twice`.
const SMALL_BLOCKED_THRESHOLD: u64 = 20_000;

/// Compresses `ft` against `base` on the CPU engine into `file`, with `UDELTA_BLOCKED_INPUT_BYTES`
/// set to `threshold` when given.
fn compress_blocked(
    base: &Path,
    ft: &Path,
    file: &Path,
    threshold: Option<&str>,
) -> std::process::Output {
    let args = [
        "compress",
        "--base",
        s(base),
        "--finetuned",
        s(ft),
        "-o",
        s(file),
        "--adapter",
        "cpu",
        "-q",
        "--json",
        "--force",
    ];
    let env: Vec<(&str, &str)> = threshold
        .map(|t| ("UDELTA_BLOCKED_INPUT_BYTES", t))
        .into_iter()
        .collect();
    udelta_env(&args, &env)
}

#[test]
fn blocked_analysis_gives_the_same_file_and_reads_those_tensors_twice() {
    for dtype in [Dtype::F16, Dtype::BF16, Dtype::F32] {
        let dir = tempfile::tempdir().unwrap();
        // Vocabulary growth: the embedding and head have new rows, read once as a tail.
        let (b, f) = llama_pair(dtype, 3, 11);
        let base = write_checkpoint(&dir.path().join("base"), &b, 1);
        let ft = write_checkpoint(&dir.path().join("ft"), &f, 2);
        let (whole_file, blocked_file) = (
            dir.path().join("whole.udelta"),
            dir.path().join("blocked.udelta"),
        );
        let whole: serde_json::Value =
            serde_json::from_str(&ok(compress_blocked(&base, &ft, &whole_file, None))).unwrap();
        let threshold = SMALL_BLOCKED_THRESHOLD.to_string();
        let blocked: serde_json::Value = serde_json::from_str(&ok(compress_blocked(
            &base,
            &ft,
            &blocked_file,
            Some(&threshold),
        )))
        .unwrap();
        assert!(
            std::fs::read(&whole_file).unwrap() == std::fs::read(&blocked_file).unwrap(),
            "{dtype:?}: the blocked run wrote other bytes"
        );
        // Each blocked pair's shared part (the base tensor and as many fine-tuned bytes, same
        // dtype) is read a second time; small pairs and the new rows are read once.
        let base_len = |name: &str| b.iter().find(|t| t.name == name).unwrap().data.len() as u64;
        let extra: u64 = whole["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"] == "compressed")
            .map(|t| {
                (
                    base_len(t["name"].as_str().unwrap()),
                    t["bytes_tensor"].as_u64().unwrap(),
                )
            })
            .filter(|&(bl, fl)| bl + fl > SMALL_BLOCKED_THRESHOLD)
            .map(|(bl, _)| 2 * bl)
            .sum();
        // Some pairs stay whole (f16 and bf16 attention matrices: 16,384 bytes), others are blocked.
        assert!(
            extra > 0
                && (dtype == Dtype::F32 || extra < 2 * counter(&whole, "compressed_input_bytes")),
            "{dtype:?}: {extra}"
        );
        assert_eq!(
            counter(&blocked, "bytes_read"),
            counter(&whole, "bytes_read") + extra,
            "{dtype:?}"
        );
        assert_eq!(
            counter(&blocked, "compressed_input_bytes"),
            counter(&whole, "compressed_input_bytes")
        );
    }
}

#[test]
fn blocked_analysis_names_the_same_non_finite_element() {
    let dir = tempfile::tempdir().unwrap();
    let (b, mut f) = llama_pair(Dtype::F32, 0, 12);
    let gate = f
        .iter_mut()
        .find(|t| t.name == "model.layers.1.mlp.gate_proj.weight")
        .unwrap();
    // Blocks of 624 f32 elements (20,000 / 8 bytes per side): element 5,000 is in the ninth.
    let mut v = gate.values();
    v[5_000] = f32::NAN;
    *gate = T::float(&gate.name.clone(), Dtype::F32, &gate.shape.clone(), &v);
    let base = write_checkpoint(&dir.path().join("base"), &b, 1);
    let ft = write_checkpoint(&dir.path().join("ft"), &f, 1);
    let file = dir.path().join("x.udelta");
    let threshold = SMALL_BLOCKED_THRESHOLD.to_string();
    let whole = fails(
        compress_blocked(&base, &ft, &file, None),
        &["element 5000", "gate_proj"],
    );
    let blocked = fails(
        compress_blocked(&base, &ft, &file, Some(&threshold)),
        &["element 5000", "gate_proj"],
    );
    assert_eq!(whole, blocked);
    assert!(!file.exists());
    fails(
        compress_blocked(&base, &ft, &file, Some("lots")),
        &["UDELTA_BLOCKED_INPUT_BYTES=lots"],
    );
}
