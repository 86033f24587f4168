//! End-to-end round trips through the binary, checked against the algorithm recomputed here
//! from ULTRADELTA.md (levels, allocation, per-level kept counts, values, uniformity).

mod common;
use common::*;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

/// Reads the JSON index of a .udelta file straight from its footer (format v1, docs/FORMAT.md).
fn read_index(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"UDELTA\r\n");
    let f = &bytes[bytes.len() - 32..];
    assert_eq!(&f[24..], b"UDLTEND\n");
    let off = u64::from_le_bytes(f[0..8].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(f[8..16].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[off..off + len]).unwrap()
}

fn is_linear(name: &str) -> bool {
    name.contains(".layers.") && name.ends_with("_proj.weight")
}

struct Expect {
    levels: Vec<usize>,
    values: Vec<f32>,
    rate: f64,
    kept_per_level: Vec<u64>,
}

/// Steps 1-3 of ULTRADELTA.md for every compressed tensor of one model.
fn expectations(base: &HashMap<String, T>, ft: &HashMap<String, T>, sp: f64, step: f64, bits: u32) -> HashMap<String, Expect> {
    let nl = 1usize << bits;
    let mut names: Vec<&String> = ft.keys().filter(|n| is_linear(n)).collect();
    names.sort();
    let mut out = HashMap::new();
    let mut stds = Vec::new();
    for name in &names {
        let (b, f) = (base[*name].values(), ft[*name].values());
        let d: Vec<f32> = f.iter().zip(&b).map(|(x, y)| x - y).collect();
        let lo = d.iter().cloned().fold(f32::INFINITY, f32::min);
        let hi = d.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let k = ((nl - 1) as f64 / (hi as f64 - lo as f64)) as f32;
        let levels: Vec<usize> = d.iter().map(|&x| ((x - lo) * k).round_ties_even().clamp(0.0, (nl - 1) as f32) as usize).collect();
        let values: Vec<f32> = (0..nl).map(|q| (lo as f64 + q as f64 * (hi as f64 - lo as f64) / (nl - 1) as f64) as f32).collect();
        let n = d.len() as f64;
        let mean = levels.iter().map(|&q| values[q] as f64).sum::<f64>() / n;
        let var = levels.iter().map(|&q| (values[q] as f64 - mean).powi(2)).sum::<f64>() / n;
        stds.push((name.to_string(), d.len() as u64, var.sqrt()));
        out.insert(name.to_string(), Expect { levels, values, rate: 0.0, kept_per_level: vec![] });
    }
    // Thirds by parameter count.
    let total: u64 = stds.iter().map(|x| x.1).sum();
    let mut order: Vec<usize> = (0..stds.len()).collect();
    order.sort_by(|&a, &b| stds[a].2.partial_cmp(&stds[b].2).unwrap());
    let (mut cum, mut nlow, mut nmid, mut nhigh) = (0u64, 0u64, 0u64, 0u64);
    let mut group = vec![0; stds.len()];
    for &i in &order {
        cum += stds[i].1;
        group[i] = if cum as f64 <= total as f64 / 3.0 { 0 } else if cum as f64 <= 2.0 * total as f64 / 3.0 { 1 } else { 2 };
        match group[i] {
            0 => nlow += stds[i].1,
            1 => nmid += stds[i].1,
            _ => nhigh += stds[i].1,
        }
    }
    let high = ((sp * total as f64 - sp * nmid as f64 - (sp + step) * nlow as f64) / nhigh as f64).clamp(0.0, 0.99);
    for (i, (name, _, _)) in stds.iter().enumerate() {
        let e = out.get_mut(name).unwrap();
        e.rate = [sp + step, sp, high][group[i]];
        let mut hist = vec![0u64; nl];
        e.levels.iter().for_each(|&q| hist[q] += 1);
        let n: u64 = hist.iter().sum();
        let z = (0..nl).filter(|&q| e.values[q] == 0.0).map(|q| hist[q]).sum::<u64>() as f64 / n as f64;
        let r = ((e.rate - z) / (1.0 - z)).max(0.0);
        e.kept_per_level = hist.iter().map(|&c| c - (c as f64 * r).round_ties_even() as u64).collect();
    }
    out
}

fn check_round_trip(dtype: Dtype, shards: usize, growth: usize, sparsity: f64) {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = llama_pair(dtype, growth, 42);
    let base = write_checkpoint(&dir.path().join("base"), &b, shards);
    let ftp = write_checkpoint(&dir.path().join("ft"), &f, shards);
    let file = dir.path().join("ft.udelta");
    ok(udelta(&["compress", "--base", s(&base), "--finetuned", s(&ftp), "-o", s(&file), "--sparsity", &sparsity.to_string(), "--adapter", "cpu", "-q"]));
    let index = read_index(&file);
    let (bm, fm) = (read_checkpoint(&base), read_checkpoint(&ftp));
    let exp = expectations(&bm, &fm, sparsity, 0.01, 4);
    let scale = 1.0 / (1.0 - sparsity);
    assert!((index["model"]["scale"].as_f64().unwrap() - scale).abs() < 1e-12);

    // Full reconstruction.
    let out = dir.path().join("restored");
    ok(udelta(&["decompress", s(&file), "--base", s(&base), "-o", s(&out), "-q"]));
    if shards > 1 {
        assert!(out.join("model.safetensors.index.json").exists());
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), shards + 1);
    }
    let restored = read_checkpoint(&out);
    assert_eq!(restored.len(), fm.len());
    let deltas_dir = dir.path().join("deltas");
    ok(udelta(&["decompress", s(&file), "--base", s(&base), "-o", s(&deltas_dir), "--delta-only", "-q"]));
    let deltas = read_checkpoint(&deltas_dir);
    assert_eq!(deltas.len(), exp.len());

    for (name, t) in &fm {
        let r = &restored[name];
        assert_eq!((r.dtype, &r.shape), (t.dtype, &t.shape), "{name}");
        let Some(e) = exp.get(name) else {
            assert_eq!(r.data, t.data, "{name} must be restored bit-exact");
            continue;
        };
        let entry = index["tensors"].as_array().unwrap().iter().find(|x| x["name"] == name.as_str()).unwrap();
        assert_eq!(entry["kind"], "compressed", "{name}");
        assert!((entry["rate"].as_f64().unwrap() - e.rate).abs() < 1e-12, "{name}: rate {} vs {}", entry["rate"], e.rate);
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
                let want = decode(dtype, &encode(dtype, &[bv[i] + d[i]]))[0];
                assert_eq!(rv[i].to_bits(), want.to_bits(), "{name}[{i}]");
            } else {
                assert_eq!(rv[i].to_bits(), bv[i].to_bits(), "{name}[{i}] pruned must equal base");
            }
        }
        for q in 0..kept.len() {
            if e.values[q] != 0.0 {
                assert_eq!(kept[q], e.kept_per_level[q], "{name}: level {q}");
            }
        }
        // Uniform spread: kept counts in 4 equal element ranges within 5 sigma of their mean.
        let n = d.len();
        let p = kept_pos.len() as f64 / n as f64;
        for part in 0..4 {
            let (a, z) = (part * n / 4, (part + 1) * n / 4);
            let c = kept_pos.iter().filter(|&&i| i >= a && i < z).count() as f64;
            let mean = p * (z - a) as f64;
            assert!((c - mean).abs() <= 5.0 * (mean * (1.0 - p)).sqrt() + 1.0, "{name}: range {part}: {c} vs {mean}");
        }
    }
}

#[test]
fn f16_single_file() {
    check_round_trip(Dtype::F16, 1, 0, 0.95);
}

#[test]
fn bf16_sharded() {
    check_round_trip(Dtype::BF16, 3, 0, 0.9);
}

#[test]
fn f32_with_vocabulary_growth() {
    check_round_trip(Dtype::F32, 2, 5, 0.99);
}

#[test]
fn same_inputs_give_identical_bytes_whatever_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = llama_pair(Dtype::F16, 0, 7);
    let base = write_checkpoint(&dir.path().join("base"), &b, 1);
    let ftp = write_checkpoint(&dir.path().join("ft"), &f, 1);
    let mut files = Vec::new();
    for threads in ["1", "2", "1"] {
        let out = dir.path().join(format!("x{}.udelta", files.len()));
        ok(udelta_env(&["compress", "--base", s(&base), "--finetuned", s(&ftp), "-o", s(&out), "--adapter", "cpu", "-q", "--model-name", "m"], &[("RAYON_NUM_THREADS", threads)]));
        files.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(files[0], files[1]);
    assert_eq!(files[0], files[2]);
}
