//! Trusted output (issue 18, points 1, 2, 8, 9): a crafted `.udelta` whose checksums are all
//! valid is refused before anything is written when its index describes something that is not
//! a valid checkpoint (one rule per case: names, shards, layout, fields against each other);
//! no restored value is Inf or NaN (hostile parameters are refused when read, an honest scale
//! that would overflow f16 is refused at compress with a fix, a base value pushed past the
//! dtype's range is an error at restore); files the tool reads have size limits; output names
//! of up to 255 bytes work and names that cannot be stored as UTF-8 are refused, saying so.
//!
//! The crafted files keep the records of an honest file and replace its index through
//! `udelta_gpu::fuzzing::udelta_container` (correct index checksum and footer), so the check
//! under test is the one that fires.

mod common;
use common::*;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Names of the fixture's tensors of each kind (asserted when the fixture is made).
const COMPRESSED: &str = "model.layers.0.mlp.up_proj.weight";
const GROWN: &str = "model.embed_tokens.weight";
const CODED: &str = "model.layers.0.input_layernorm.weight";
const UNCHANGED: &str = "model.norm.weight";

/// A sharded (two files) f16 base and fine-tune with a grown vocabulary, and their `.udelta`.
struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    file: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (b, f) = llama_pair(Dtype::F16, 2, 18);
        let base = write_checkpoint(&dir.path().join("base"), &b, 2);
        let ft = write_checkpoint(&dir.path().join("ft"), &f, 2);
        let file = dir.path().join("good.udelta");
        ok(compress(&base, &ft, &file, &[]));
        let fx = Fixture { dir, base, file };
        let index = read_index(&fx.file);
        for (name, kind) in [
            (COMPRESSED, "compressed"),
            (GROWN, "compressed"),
            (CODED, "coded"),
            (UNCHANGED, "unchanged"),
        ] {
            assert_eq!(tensor_of(&index, name)["kind"], kind, "{name}");
        }
        assert!(!tensor_of(&index, GROWN)["tail"].is_null());
        fx
    }

    /// Writes `file` with its index edited by `edit` as `NAME.udelta` in the fixture.
    fn crafted(&self, name: &str, edit: &dyn Fn(&mut Value)) -> PathBuf {
        let bytes = std::fs::read(&self.file).unwrap();
        let footer = &bytes[bytes.len() - 40..];
        let index_offset = u64::from_le_bytes(footer[..8].try_into().unwrap()) as usize;
        let mut index = read_index(&self.file);
        edit(&mut index);
        let json = serde_json::to_vec(&index).unwrap();
        let out = self.dir.path().join(format!("{name}.udelta"));
        let container = udelta_gpu::fuzzing::udelta_container(&bytes[16..index_offset], &json);
        std::fs::write(&out, container).unwrap();
        out
    }
}

fn compress(base: &Path, ft: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut a = vec![
        "compress",
        "--base",
        s(base),
        "--finetuned",
        s(ft),
        "-o",
        s(out),
    ];
    a.extend_from_slice(&["--adapter", "cpu", "-q"]);
    a.extend_from_slice(extra);
    udelta(&a)
}

fn tensor_of<'a>(index: &'a Value, name: &str) -> &'a Value {
    index["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap()
}

fn tensor<'a>(index: &'a mut Value, name: &str) -> &'a mut Value {
    index["tensors"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["name"] == name)
        .unwrap()
}

fn shard_name(index: &mut Value, i: usize) -> &mut Value {
    &mut index["source"]["shards"][i]["file_name"]
}

/// Sets the model's gamma and the scale that goes with it.
fn set_gamma(index: &mut Value, gamma: f64) {
    let rescale = index["model"]["rescale"].as_f64().unwrap();
    index["model"]["gamma"] = json!(gamma);
    index["model"]["scale"] = json!(gamma * rescale);
}

type Edit = Box<dyn Fn(&mut Value)>;

/// Point 1: the names and the layout the index describes, one rule per case.
fn name_and_layout_cases() -> Vec<(&'static str, Edit, &'static str)> {
    let other_shard = |t: &mut Value| t["shard"] = json!(1 - t["shard"].as_u64().unwrap());
    vec![
        (
            "duplicate-entry",
            Box::new(|i: &mut Value| {
                let first = i["tensors"][0].clone();
                i["tensors"].as_array_mut().unwrap().push(first);
            }),
            "listed twice",
        ),
        (
            "duplicate-in-other-shard",
            Box::new(move |i: &mut Value| {
                let mut first = i["tensors"][0].clone();
                other_shard(&mut first);
                i["tensors"].as_array_mut().unwrap().push(first);
            }),
            "listed twice",
        ),
        (
            "reserved-name",
            Box::new(|i: &mut Value| {
                tensor(i, UNCHANGED)["name"] = json!("__metadata__");
            }),
            "reserved for the file's metadata",
        ),
        (
            "shard-twice",
            Box::new(|i: &mut Value| {
                *shard_name(i, 1) = shard_name(i, 0).clone();
            }),
            "collides with another shard",
        ),
        (
            "shard-twice-by-case",
            Box::new(|i: &mut Value| {
                *shard_name(i, 1) = json!(shard_name(i, 0).as_str().unwrap().to_uppercase());
            }),
            "collides with another shard",
        ),
        (
            "shard-is-the-index",
            Box::new(|i: &mut Value| {
                *shard_name(i, 0) = json!("model.safetensors.index.json");
            }),
            "collides with another shard or with model.safetensors.index.json",
        ),
        (
            "shard-dotdot",
            Box::new(|i: &mut Value| {
                *shard_name(i, 0) = json!("../escaped.safetensors");
            }),
            "'..'",
        ),
        (
            "shard-in-folder",
            Box::new(|i: &mut Value| {
                *shard_name(i, 0) = json!("sub/x.safetensors");
            }),
            "a path, not a file name",
        ),
        (
            "shard-absolute",
            Box::new(|i: &mut Value| {
                *shard_name(i, 0) = json!("/tmp/escaped.safetensors");
            }),
            "absolute path",
        ),
        (
            "shard-nul",
            Box::new(|i: &mut Value| {
                *shard_name(i, 0) = json!("x\u{0}.safetensors");
            }),
            "control character",
        ),
        (
            "shard-hidden",
            Box::new(|i: &mut Value| {
                *shard_name(i, 0) = json!(".x.safetensors");
            }),
            "hidden name",
        ),
        (
            "shard-too-long",
            Box::new(|i: &mut Value| {
                *shard_name(i, 0) = json!(format!("{}.safetensors", "a".repeat(244)));
            }),
            "longer than 255 bytes",
        ),
        (
            "shard-empty",
            Box::new(|i: &mut Value| {
                *shard_name(i, 0) = json!("");
            }),
            "empty path",
        ),
        (
            "layout-unknown",
            Box::new(|i: &mut Value| {
                i["source"]["layout"] = json!("zip");
            }),
            "unknown layout 'zip'",
        ),
        (
            "layout-single-with-two-files",
            Box::new(|i: &mut Value| {
                i["source"]["layout"] = json!("single");
            }),
            "layout 'single' with 2 shard files",
        ),
    ]
}

/// Point 1: every field against every other.
fn field_cases() -> Vec<(&'static str, Edit, &'static str)> {
    vec![
        (
            "compressed-base-shape",
            Box::new(|i: &mut Value| {
                tensor(i, COMPRESSED)["base_shape"] = json!([64, 172]);
            }),
            "base shape neither equal",
        ),
        (
            "shared-count",
            Box::new(|i: &mut Value| {
                let t = tensor(i, COMPRESSED);
                t["shared_numel"] = json!(t["shared_numel"].as_u64().unwrap() - 1);
            }),
            "element counts inconsistent",
        ),
        (
            "grown-without-tail",
            Box::new(|i: &mut Value| {
                tensor(i, GROWN)["tail"] = Value::Null;
            }),
            "record (tail) inconsistent",
        ),
        (
            "tail-short",
            Box::new(|i: &mut Value| {
                let t = &mut tensor(i, GROWN)["tail"];
                t["len"] = json!(t["len"].as_u64().unwrap() - 2);
            }),
            "record (tail) inconsistent",
        ),
        (
            "compressed-integer",
            Box::new(|i: &mut Value| {
                tensor(i, COMPRESSED)["dtype"] = json!("I16");
            }),
            "non-float dtype",
        ),
        (
            "compressed-integer-base",
            Box::new(|i: &mut Value| {
                tensor(i, COMPRESSED)["base_dtype"] = json!("I16");
            }),
            "non-float dtype",
        ),
        (
            "rate-above-one",
            Box::new(|i: &mut Value| {
                tensor(i, COMPRESSED)["rate"] = json!(1.5);
            }),
            "pruning rates outside [0, 1]",
        ),
        (
            "coded-base-shape",
            Box::new(|i: &mut Value| {
                tensor(i, CODED)["base"]["shape"] = json!([32, 2]);
            }),
            "base shape neither equal",
        ),
        (
            "raw-length",
            Box::new(|i: &mut Value| {
                let positions = tensor(i, COMPRESSED)["positions"].clone();
                let t = tensor(i, UNCHANGED);
                t["kind"] = json!("raw");
                t["data"] = positions;
            }),
            "raw record length differs",
        ),
        (
            "scale-not-gamma-times-rescale",
            Box::new(|i: &mut Value| {
                i["model"]["scale"] = json!(i["model"]["scale"].as_f64().unwrap() * 2.0);
            }),
            "model scale",
        ),
        (
            "rescale-not-the-parameters'",
            Box::new(|i: &mut Value| {
                i["model"]["rescale"] = json!(i["model"]["rescale"].as_f64().unwrap() * 2.0);
                set_gamma(i, 1.0);
            }),
            "model rescale",
        ),
        (
            "gamma-zero",
            Box::new(|i: &mut Value| set_gamma(i, 0.0)),
            "gamma 0",
        ),
        (
            "sparsity-out-of-range",
            Box::new(|i: &mut Value| {
                i["params"]["sparsity"] = json!(1.5);
            }),
            "parameters",
        ),
        (
            "trace-norm-negative",
            Box::new(|i: &mut Value| {
                i["model"]["trace_norm"] = json!(-1.0);
            }),
            "trace norm",
        ),
    ]
}

/// Point 2: hostile values whose restore would not be finite.
fn value_cases() -> Vec<(&'static str, Edit, &'static str)> {
    vec![
        (
            "lo-nan",
            Box::new(|i: &mut Value| {
                tensor(i, COMPRESSED)["lo_bits"] = json!(f32::NAN.to_bits());
            }),
            "is not finite and ordered",
        ),
        (
            "hi-infinite",
            Box::new(|i: &mut Value| {
                tensor(i, COMPRESSED)["hi_bits"] = json!(f32::INFINITY.to_bits());
            }),
            "is not finite and ordered",
        ),
        (
            "lo-above-hi",
            Box::new(|i: &mut Value| {
                let t = tensor(i, COMPRESSED);
                let (lo, hi) = (t["lo_bits"].clone(), t["hi_bits"].clone());
                (t["lo_bits"], t["hi_bits"]) = (hi, lo);
            }),
            "is not finite and ordered",
        ),
        (
            "scale-overflows-f16",
            Box::new(|i: &mut Value| set_gamma(i, 1e9)),
            "would overflow F16",
        ),
        (
            "scale-overflows-f32",
            Box::new(|i: &mut Value| set_gamma(i, 1e300)),
            "would overflow F16",
        ),
    ]
}

#[test]
fn crafted_indexes_are_refused_before_anything_is_written() {
    let fx = Fixture::new();
    let cases: Vec<_> = [name_and_layout_cases(), field_cases(), value_cases()]
        .into_iter()
        .flatten()
        .collect();
    let files: Vec<(&str, PathBuf, &str)> = cases
        .iter()
        .map(|(name, edit, needle)| (*name, fx.crafted(name, edit.as_ref()), *needle))
        .collect();
    let out = fx.dir.path().join("restored");
    for (name, file, needle) in &files {
        let needles = [*needle, s(file)];
        for (what, extra) in [("full", None), ("delta-only", Some("--delta-only"))] {
            let mut args = vec!["decompress", s(file), "--base", s(&fx.base), "-o", s(&out)];
            args.extend(extra);
            BadRun::new(&format!("{name} ({what})"), &args, &needles).check(fx.dir.path());
        }
        BadRun::new(
            &format!("{name} (inspect)"),
            &["inspect", s(file)],
            &needles,
        )
        .check(fx.dir.path());
    }
    // The untouched file restores: the refusals come from the edits.
    ok(udelta(&[
        "decompress",
        s(&fx.file),
        "--base",
        s(&fx.base),
        "-o",
        s(&out),
        "-q",
    ]));
    assert!(!fx.dir.path().join("escaped.safetensors").exists());
    assert!(!Path::new("/tmp/escaped.safetensors").exists());
}

/// One f16 tensor of the LLaMA pair replaced: `base` everywhere, the fine-tune `base + delta(i)`.
fn pair_with(dir: &Path, base: f32, delta: impl Fn(usize) -> f32) -> (PathBuf, PathBuf) {
    let (mut b, mut f) = llama_pair(Dtype::F16, 0, 5);
    let n: usize = [172, 64].iter().product();
    let bv = vec![base; n];
    let fv: Vec<f32> = (0..n).map(|i| base + delta(i)).collect();
    for (list, v) in [(&mut b, &bv), (&mut f, &fv)] {
        let t = list.iter_mut().find(|t| t.name == COMPRESSED).unwrap();
        *t = T::float(COMPRESSED, Dtype::F16, &[172, 64], v);
    }
    (
        write_checkpoint(&dir.join("base"), &b, 1),
        write_checkpoint(&dir.join("ft"), &f, 1),
    )
}

#[test]
fn an_honest_scale_that_overflows_f16_is_refused_at_compress_with_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    // Deltas up to 4000 are f16 values, but times 1 / (1 - 0.95) = 20 they reach 80,000.
    let (base, ft) = pair_with(dir.path(), 0.0, |i| 1000.0 + (i % 4) as f32 * 1000.0);
    let out = dir.path().join("x.udelta");
    let err = fails(
        compress(&base, &ft, &out, &[]),
        &[COMPRESSED, "would overflow F16"],
    );
    assert!(
        err.contains("lower --sparsity") && err.contains(s(&out)),
        "{err}"
    );
    assert!(!out.exists());
    // The fix it suggests works: a lower sparsity (scale 2) keeps every value in range.
    ok(compress(&base, &ft, &out, &["--sparsity", "0.5"]));
    let restored = dir.path().join("restored");
    ok(udelta(&[
        "decompress",
        s(&out),
        "--base",
        s(&base),
        "-o",
        s(&restored),
        "-q",
    ]));
    let got = read_checkpoint(&restored)[COMPRESSED].values();
    assert!(got.iter().all(|v| v.is_finite()), "an Inf was restored");
}

#[test]
fn an_honest_factor_or_gamma_that_overflows_is_refused_at_compress() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = llama_pair(Dtype::F16, 0, 5);
    let base = write_checkpoint(&dir.path().join("base"), &b, 1);
    let ft = write_checkpoint(&dir.path().join("ft"), &f, 1);
    let out = dir.path().join("x.udelta");
    let before = snapshot(dir.path());
    for (extra, needle) in [
        (&["--factor", "1e30"][..], "would overflow F16"),
        (&["--gamma", "1e300"][..], "would overflow F16"),
        (
            &["--factor", "1e308", "--sparsity", "0.99"][..],
            "overflows",
        ),
        (&["--gamma", "1e307", "--sparsity", "0.99"][..], "overflows"),
    ] {
        fails(compress(&base, &ft, &out, extra), &[needle, s(&out)]);
        assert_eq!(
            snapshot(dir.path()),
            before,
            "{extra:?}: a file was written"
        );
    }
}

#[test]
fn a_restored_value_beyond_f16_is_an_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    // The scaled deltas (about 20 x 450 = 9,000) fit f16, but not added to a base of 60,000.
    let (base, ft) = pair_with(dir.path(), 60000.0, |i| 400.0 + (i % 7) as f32 * 16.0);
    let file = dir.path().join("x.udelta");
    ok(compress(&base, &ft, &file, &[]));
    let out = dir.path().join("restored");
    let args = ["decompress", s(&file), "--base", s(&base), "-o", s(&out)];
    let needles = [s(&file), COMPRESSED, "beyond the range of F16"];
    BadRun::new("base near the f16 limit", &args, &needles).check(dir.path());
}

#[test]
fn an_oversized_shard_index_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = llama_pair(Dtype::F16, 0, 5);
    let base = write_checkpoint(&dir.path().join("base"), &b, 2);
    let ft = write_checkpoint(&dir.path().join("ft"), &f, 2);
    let index = ft.join("model.safetensors.index.json");
    // Sparse: one byte over the limit costs no disk, and is refused from its size.
    let limit = udelta_gpu::limits::MAX_SHARD_INDEX_LEN;
    std::fs::File::create(&index)
        .unwrap()
        .set_len(limit + 1)
        .unwrap();
    let out = dir.path().join("x.udelta");
    let args = [
        "compress",
        "--base",
        s(&base),
        "--finetuned",
        s(&ft),
        "-o",
        s(&out),
    ];
    let needle = format!("limit of {limit} bytes");
    BadRun::new("oversized index", &args, &[s(&index), &needle]).check(dir.path());
}

#[test]
fn output_names_of_255_bytes_work() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = llama_pair(Dtype::F16, 0, 5);
    let base = write_checkpoint(&dir.path().join("base"), &b, 1);
    let ft = write_checkpoint(&dir.path().join("ft"), &f, 1);
    let file = dir.path().join(format!("{}.udelta", "f".repeat(248)));
    let out = dir.path().join("d".repeat(255));
    ok(compress(&base, &ft, &file, &[]));
    ok(udelta(&[
        "decompress",
        s(&file),
        "--base",
        s(&base),
        "-o",
        s(&out),
        "-q",
    ]));
    assert_eq!(read_checkpoint(&out).len(), f.len());
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want = vec![
        "base".to_string(),
        "ft".into(),
        file.file_name().unwrap().to_str().unwrap().into(),
        "d".repeat(255),
    ];
    want.sort();
    assert_eq!(names, want, "no temporary left behind");
}

#[test]
fn names_that_cannot_be_stored_as_utf8_are_refused_saying_so() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = llama_pair(Dtype::F16, 0, 5);
    let base = write_checkpoint(&dir.path().join("base"), &b, 1);
    let ft = write_checkpoint(&dir.path().join("ft"), &f, 1);
    let not_utf8 = |name: &[u8]| dir.path().join(std::ffi::OsStr::from_bytes(name));
    // A fine-tune directory whose name (the model's name) is not UTF-8.
    let ft_dir = not_utf8(b"ft-\xff");
    std::fs::rename(&ft, &ft_dir).unwrap();
    // A fine-tune file whose name (stored to write it back) is not UTF-8.
    let ft_file = not_utf8(b"w\xfe.safetensors");
    std::fs::copy(ft_dir.join("model.safetensors"), &ft_file).unwrap();
    let out = dir.path().join("x.udelta");
    let run = |ft: &Path, extra: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_udelta-gpu"));
        c.args([
            "compress",
            "--base",
            s(&base),
            "-o",
            s(&out),
            "--adapter",
            "cpu",
            "-q",
        ]);
        c.args(extra).arg("--finetuned").arg(ft).output().unwrap()
    };
    let before = snapshot(dir.path());
    fails(
        run(&ft_dir, &[]),
        &["name \"ft-\\xFF\" is not valid UTF-8", "--model-name"],
    );
    // Even with a model name, the file's own name is stored (to write it back): refused.
    let named = ["--model-name", "ft"];
    let needles = [
        "file name \"w\\xFE.safetensors\" is not valid UTF-8",
        "rename the file",
    ];
    fails(run(&ft_file, &named), &needles);
    assert_eq!(snapshot(dir.path()), before);
    // Named with --model-name, the directory compresses; outputs may have any name.
    let odd_out = not_utf8(b"o\xfd.udelta");
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_udelta-gpu"));
    c.args([
        "compress",
        "--base",
        s(&base),
        "--model-name",
        "ft",
        "--adapter",
        "cpu",
        "-q",
    ]);
    ok(c.arg("--finetuned")
        .arg(&ft_dir)
        .arg("-o")
        .arg(&odd_out)
        .output()
        .unwrap());
    assert!(odd_out.is_file());
}
