//! Test fixtures made independently of the code under test: checkpoints are written with the
//! `safetensors` crate's own serializer (not our writer, not `synth`), values come from a small
//! RNG here, and the algorithm's expectations are recomputed from ULTRADELTA.md in plain code.
#![allow(dead_code)]

use half::{bf16, f16};
use safetensors::{serialize_to_file, tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// SplitMix64 stream.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
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
        Dtype::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        Dtype::F32 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        _ => panic!("not a float dtype"),
    }
}

pub fn decode(dtype: Dtype, b: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        _ => panic!("not a float dtype"),
    }
}

impl T {
    pub fn float(name: &str, dtype: Dtype, shape: &[usize], v: &[f32]) -> T {
        T { name: name.into(), dtype, shape: shape.to_vec(), data: encode(dtype, v) }
    }
    pub fn values(&self) -> Vec<f32> {
        decode(self.dtype, &self.data)
    }
}

/// Writes `tensors` as a checkpoint: one file `dir/model.safetensors`, or `shards` files with
/// an index.json, using the safetensors crate's serializer.
pub fn write_checkpoint(dir: &Path, tensors: &[T], shards: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let meta: Option<HashMap<String, String>> = Some(HashMap::from([("format".into(), "pt".into())]));
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
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    dir.to_path_buf()
}

fn write_file(path: &Path, tensors: &[T], meta: &Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
        .collect();
    serialize_to_file(views, meta.clone(), path).unwrap();
}

/// Reads every tensor of a checkpoint directory (all .safetensors files) by name.
pub fn read_checkpoint(dir: &Path) -> HashMap<String, T> {
    let mut out = HashMap::new();
    let mut files: Vec<PathBuf> = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect()
    };
    files.sort();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, v) in st.tensors() {
            out.insert(name.clone(), T { name, dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() });
        }
    }
    out
}

/// A small LLaMA-shaped (base, fine-tune) pair: 2 layers, hidden 64, intermediate 172,
/// vocabulary 96 (+ `growth` rows in the fine-tune), with heavy-tailed deltas whose scale
/// differs per tensor, an unchanged norm, and an int64 buffer.
pub fn llama_pair(dtype: Dtype, growth: usize, seed: u64) -> (Vec<T>, Vec<T>) {
    let (h, i, v) = (64, 172, 96);
    let mut rng = Rng(seed);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..2 {
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            shapes.push((format!("model.layers.{l}.self_attn.{p}.weight"), vec![h, h]));
        }
        shapes.push((format!("model.layers.{l}.mlp.gate_proj.weight"), vec![i, h]));
        shapes.push((format!("model.layers.{l}.mlp.up_proj.weight"), vec![i, h]));
        shapes.push((format!("model.layers.{l}.mlp.down_proj.weight"), vec![h, i]));
        shapes.push((format!("model.layers.{l}.input_layernorm.weight"), vec![h]));
        shapes.push((format!("model.layers.{l}.post_attention_layernorm.weight"), vec![h]));
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    shapes.push(("lm_head.weight".into(), vec![v, h]));
    let (mut base, mut ft) = (Vec::new(), Vec::new());
    for (k, (name, shape)) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let is_norm = shape.len() == 1;
        let b: Vec<f32> = (0..n).map(|_| if is_norm { 1.0 + rng.normal(0.01) } else { rng.normal(0.02) }).collect();
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
        list.push(T { name: "model.position_ids".into(), dtype: Dtype::I64, shape: vec![1, 16], data: ids.clone() });
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
    assert!(out.status.success(), "failed: {}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts a clean failure (exit 1, no panic) whose message contains every `needle`; returns it.
pub fn fails(out: Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected exit 1, got {:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "message lacks '{n}': {err}");
    }
    err
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
