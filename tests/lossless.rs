//! Format v2's lossless tensors: everything UltraDelta does not compress restores bit-exact
//! (f16, bf16, f32, sharded, vocabulary growth, tensors absent from the base); version 1 files
//! stay readable; `inspect` reports the whole-file ratio.

mod common;

use common::*;
use safetensors::Dtype;
use std::path::Path;

/// A pair from `llama_pair` plus a tensor the base lacks (coded alone) and a non-float one
/// that changed (coded against the base).
fn pair(dtype: Dtype, growth: usize, seed: u64) -> (Vec<T>, Vec<T>) {
    let (mut base, mut ft) = llama_pair(dtype, growth, seed);
    let ids = |k: i64| -> Vec<u8> { (0..300i64).flat_map(|i| (i * k).to_le_bytes()).collect() };
    let t = |name: &str, data: Vec<u8>| T {
        name: name.into(),
        dtype: Dtype::I64,
        shape: vec![300],
        data,
    };
    base.push(t("position_ids", ids(1)));
    ft.push(t("position_ids", ids(2)));
    let added: Vec<f32> = (0..600).map(|i| i as f32 * 0.01).collect();
    ft.push(T {
        name: "added.bias".into(),
        dtype: Dtype::F32,
        shape: vec![600],
        data: encode(Dtype::F32, &added),
    });
    (base, ft)
}

fn compress_and_restore(d: &Path, dtype: Dtype, growth: usize, shards: usize) {
    let (base, ft) = pair(dtype, growth, 17 + growth as u64);
    let (bp, fp) = (
        write_checkpoint(&d.join("base"), &base, shards),
        write_checkpoint(&d.join("ft"), &ft, shards),
    );
    let file = d.join("ft.udelta");
    ok(udelta(&[
        "compress",
        "--adapter",
        "cpu",
        "-q",
        "--base",
        s(&bp),
        "--finetuned",
        s(&fp),
        "-o",
        s(&file),
        // Embeddings stored whole (not the default), so that a grown table is coded too.
        "--embeddings",
        "lossless",
    ]));
    let index = read_index(&file);
    assert_eq!(index["format_version"], 2);
    let kinds: Vec<(&str, &serde_json::Value)> = index["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t))
        .collect();
    let kind_of = |n: &str| kinds.iter().find(|(m, _)| *m == n).unwrap().1;
    assert_eq!(kind_of("added.bias")["kind"], "coded");
    assert!(
        kind_of("added.bias")["base"].is_null(),
        "absent from the base: coded alone"
    );
    assert_eq!(kind_of("position_ids")["kind"], "coded");
    assert_eq!(
        kind_of("position_ids")["base"]["shape"],
        serde_json::json!([300])
    );
    let embed = kind_of("model.embed_tokens.weight");
    assert_eq!(embed["kind"], "coded");
    assert_eq!(embed["base"]["shape"], serde_json::json!([96, 64]));
    assert!(index["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["kind"] != "raw"));

    let out = d.join("restored");
    ok(udelta(&[
        "decompress",
        s(&file),
        "--base",
        s(&bp),
        "-o",
        s(&out),
    ]));
    let got = read_checkpoint(&out);
    for t in &ft {
        let g = &got[&t.name];
        if kind_of(&t.name)["kind"] != "compressed" {
            assert!(g.data == t.data, "{}: not bit-exact", t.name);
        }
        assert_eq!((g.dtype, &g.shape), (t.dtype, &t.shape), "{}", t.name);
    }
}

#[test]
fn lossless_tensors_restore_bit_exact_on_every_dtype_layout_and_growth() {
    for (dtype, growth, shards) in [
        (Dtype::F16, 0, 1),
        (Dtype::BF16, 0, 2),
        (Dtype::F32, 0, 1),
        (Dtype::F16, 5, 2),
        (Dtype::BF16, 3, 1),
    ] {
        let dir = tempfile::tempdir().unwrap();
        compress_and_restore(dir.path(), dtype, growth, shards);
    }
}

#[test]
fn version_1_files_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data: Vec<u8> = (0..24u8).collect();
    let json = serde_json::json!({
        "format_version": 1, "tool": "udelta-gpu 0.1.0", "engine": "cpu",
        "params": {"sparsity": 0.95, "bits": 4, "step": 0.01, "factor": 1.0, "seed": 0},
        "model": {"name": "ft", "rescale": 20.0, "gamma": 1.0, "trace_norm": null, "scale": 20.0},
        "base": {"fingerprint": "00000000", "tensors": 0},
        "source": {"layout": "single", "shards": [{"file_name": "model.safetensors", "metadata": null}],
                   "index_metadata": null},
        "tensors": [{"name": "w", "dtype": "F32", "shape": [2, 3], "shard": 0, "kind": "raw",
                     "data": {"offset": 16, "len": 24, "crc32": crc32fast::hash(&data)}}]
    });
    let bytes = udelta_gpu::fuzzing::udelta_container(&data, json.to_string().as_bytes());
    assert_eq!(bytes[8..12], 1u32.to_le_bytes(), "a version 1 header");
    let file = d.join("v1.udelta");
    std::fs::write(&file, bytes).unwrap();
    let base = write_checkpoint(
        &d.join("base"),
        &[T {
            name: "other".into(),
            dtype: Dtype::F32,
            shape: vec![1],
            data: vec![0; 4],
        }],
        1,
    );
    let out = d.join("out");
    ok(udelta(&[
        "decompress",
        s(&file),
        "--base",
        s(&base),
        "-o",
        s(&out),
    ]));
    assert_eq!(read_checkpoint(&out)["w"].data, data);
    let report: serde_json::Value =
        serde_json::from_str(&ok(udelta(&["inspect", "--json", s(&file)]))).unwrap();
    assert_eq!(report["tensors"][0]["kind"], "raw");
}

#[test]
fn inspect_reports_the_whole_file_ratio_and_bytes_per_kind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, ft) = pair(Dtype::BF16, 0, 5);
    let (bp, fp) = (
        write_checkpoint(&d.join("base"), &base, 1),
        write_checkpoint(&d.join("ft"), &ft, 1),
    );
    let file = d.join("ft.udelta");
    ok(udelta(&[
        "compress",
        "--adapter",
        "cpu",
        "-q",
        "--base",
        s(&bp),
        "--finetuned",
        s(&fp),
        "-o",
        s(&file),
    ]));
    let r: serde_json::Value =
        serde_json::from_str(&ok(udelta(&["inspect", "--json", s(&file)]))).unwrap();
    let tensor_bytes: u64 = ft.iter().map(|t| t.data.len() as u64).sum();
    let file_bytes = std::fs::metadata(&file).unwrap().len();
    assert_eq!(r["tensor_bytes"], tensor_bytes);
    assert_eq!(r["file_bytes"], file_bytes);
    let ratio = r["ratio_file"].as_f64().unwrap();
    assert!((ratio - tensor_bytes as f64 / file_bytes as f64).abs() < 1e-9);
    let kinds = r["kinds"].as_object().unwrap();
    let sum = |f: &str| -> u64 { kinds.values().map(|k| k[f].as_u64().unwrap()).sum() };
    assert_eq!(sum("tensor_bytes"), tensor_bytes);
    assert_eq!(sum("tensors"), ft.len() as u64);
    // Records and their index shares: within the file less header and footer.
    let stored = sum("stored_bytes");
    assert!(
        stored > 0 && stored <= file_bytes - 56,
        "{stored} of {file_bytes}"
    );
    assert!(kinds.contains_key("coded") && kinds.contains_key("compressed"));
    let text = ok(udelta(&["inspect", s(&file)]));
    assert!(
        text.contains("ratio_file") && text.contains("coded"),
        "{text}"
    );
}
