//! Writes seed corpora for the fuzz targets (see docs/FUZZING.md):
//! `cargo run --example fuzz_seeds -- [OUT_DIR]` (default `fuzz/corpus-full`) creates
//! `OUT_DIR/<target>/` for every target of `udelta_gpu::fuzzing::TARGETS` and fills it with
//! small valid inputs made by the tool itself (`.udelta` files compressed from tiny
//! checkpoints, their indexes, encoded codec payloads, safetensors files and shard indexes)
//! plus hand-made edge cases. Checkpoints are made in a temporary directory that is removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use udelta_gpu::algorithm::CompressParams;
use udelta_gpu::checkpoint::dtype::{Dtype, FloatType};
use udelta_gpu::checkpoint::select::TensorSelector;
use udelta_gpu::checkpoint::writer::{SafetensorsWriter, TensorHeader};
use udelta_gpu::codec::{self, BLOCK_ELEMENTS};
use udelta_gpu::engine::cpu::CpuEngine;
use udelta_gpu::format::UdeltaReader;
use udelta_gpu::fuzzing::{self, CodecInput};
use udelta_gpu::pipeline::compress::{compress, CompressOptions};

/// A small deterministic generator (the crate's SplitMix64).
struct Rng(udelta_gpu::splitmix::SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// One tensor of a test checkpoint.
struct Spec {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
}

fn spec(name: &'static str, dtype: Dtype, shape: &[usize]) -> Spec {
    Spec {
        name,
        dtype,
        shape: shape.to_vec(),
    }
}

/// The tensors of the tiny base; the fine-tune has the same, with two more vocabulary rows.
fn specs(vocab: usize) -> Vec<Spec> {
    vec![
        spec("model.embed_tokens.weight", Dtype::F16, &[vocab, 16]),
        spec(
            "model.layers.0.self_attn.q_proj.weight",
            Dtype::F16,
            &[24, 16],
        ),
        spec(
            "model.layers.0.self_attn.k_proj.weight",
            Dtype::BF16,
            &[8, 16],
        ),
        spec("model.layers.0.mlp.down_proj.weight", Dtype::F32, &[16, 40]),
        spec("model.layers.0.input_layernorm.weight", Dtype::F16, &[16]),
        spec("model.position_ids", Dtype::I64, &[1, 6]),
        spec("model.empty", Dtype::F32, &[0, 3]),
    ]
}

/// Bytes of one tensor: base values, plus a small delta in the fine-tune (`ft`), except for
/// the layer norm, which stays unchanged.
fn tensor_bytes(s: &Spec, ft: bool, rng: &mut Rng) -> Vec<u8> {
    let numel: usize = s.shape.iter().product();
    let Some(ft_type) = FloatType::from_dtype(s.dtype) else {
        return (0..numel as i64).flat_map(|i| i.to_le_bytes()).collect();
    };
    let changed = ft && !s.name.contains("layernorm");
    let values: Vec<f32> = (0..numel)
        .map(|i| {
            let base = ((i * 7919) % 97) as f32 / 97.0 - 0.5;
            base + if changed { 0.01 * rng.unit() } else { 0.0 }
        })
        .collect();
    let mut out = Vec::new();
    ft_type.encode_into(&values, &mut out);
    out
}

/// Writes `specs` (from index `range`) as one safetensors file.
fn write_st(path: &Path, specs: &[Spec], ft: bool, seed: u64) -> Vec<(String, String)> {
    let headers: Vec<TensorHeader> = specs
        .iter()
        .map(|s| TensorHeader {
            name: s.name.to_string(),
            dtype: s.dtype,
            shape: s.shape.clone(),
        })
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut w = SafetensorsWriter::create(path, &headers, Some(&metadata)).expect("create");
    let mut rng = Rng(udelta_gpu::splitmix::SplitMix64(seed));
    for s in specs {
        w.write(&tensor_bytes(s, ft, &mut rng)).expect("write");
    }
    w.finish().expect("finish");
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    specs
        .iter()
        .map(|s| (s.name.to_string(), file.clone()))
        .collect()
}

/// Writes the base (one file) and a fine-tune, single-file or sharded in two.
fn write_pair(dir: &Path, sharded: bool, seed: u64) -> (PathBuf, PathBuf) {
    let base = dir.join("base.safetensors");
    write_st(&base, &specs(12), false, 0);
    let ft_dir = dir.join(format!("ft-{seed}"));
    std::fs::create_dir_all(&ft_dir).expect("mkdir");
    let all = specs(14);
    if !sharded {
        write_st(&ft_dir.join("model.safetensors"), &all, true, seed);
        return (base, ft_dir);
    }
    let (a, b) = all.split_at(3);
    let mut map = write_st(
        &ft_dir.join("model-00001-of-00002.safetensors"),
        a,
        true,
        seed,
    );
    map.extend(write_st(
        &ft_dir.join("model-00002-of-00002.safetensors"),
        b,
        true,
        seed + 1,
    ));
    let index = serde_json::json!({
        "metadata": {"total_size": 4242},
        "weight_map": map.into_iter().collect::<BTreeMap<_, _>>(),
    });
    std::fs::write(
        ft_dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .expect("index");
    (base, ft_dir)
}

/// Saves one seed and checks that its target accepts it (when `valid`).
fn save(out: &Path, target: &str, name: &str, bytes: &[u8], valid: bool) {
    let (_, run) = fuzzing::TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .expect("known target");
    let result = run(bytes);
    if valid {
        if let Err(e) = &result {
            panic!("seed {target}/{name} is refused: {e}");
        }
    }
    let dir = out.join(target);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

/// `.udelta` seeds (and their `udelta_index` and safetensors counterparts).
fn udelta_seeds(out: &Path, tmp: &Path) {
    let configs = [
        (false, None, 0.95, 4),
        (true, None, 0.5, 2),
        (false, Some(".*"), 0.9, 1),
        (true, Some(".*"), 0.99, 8),
        (false, Some("proj"), 0.3, 3),
    ];
    for (i, &(sharded, include, sparsity, bits)) in configs.iter().enumerate() {
        let (base, ft) = write_pair(tmp, sharded, i as u64 + 1);
        let file = tmp.join(format!("seed-{i}.udelta"));
        let opts = CompressOptions {
            params: CompressParams {
                sparsity,
                bits,
                ..CompressParams::default()
            },
            selector: TensorSelector::new(include, None).expect("regex"),
            model_name: None,
            force: true,
            verify: false,
            progress: false,
            trace_norm: false,
            gamma: None,
            side_files: Default::default(),
            target: None,
        };
        compress(
            &base,
            std::slice::from_ref(&ft),
            &file,
            &opts,
            &mut CpuEngine,
        )
        .expect("compress");
        let bytes = std::fs::read(&file).expect("read");
        save(
            out,
            "udelta_file",
            &format!("seed-{i}.udelta"),
            &bytes,
            true,
        );
        let reader = UdeltaReader::open(&file).expect("open");
        let records = &bytes[16..reader.index_offset as usize];
        let json = serde_json::to_vec(&reader.index).expect("json");
        let input = fuzzing::join_index_input(records, &json);
        save(out, "udelta_index", &format!("seed-{i}"), &input, true);
        for entry in std::fs::read_dir(&ft).expect("ls") {
            let path = entry.expect("entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let data = std::fs::read(&path).expect("read");
            let target = if name.ends_with(".json") {
                "safetensors_index"
            } else {
                "safetensors_header"
            };
            save(out, target, &format!("seed-{i}-{name}"), &data, true);
        }
    }
    // Edge cases: an empty index, a truncated file, a footer alone.
    let empty = fuzzing::udelta_container(&[], b"{}");
    save(out, "udelta_file", "edge-empty-index", &empty, false);
    save(out, "udelta_file", "edge-header-only", &empty[..16], false);
    save(
        out,
        "udelta_file",
        "edge-footer-only",
        &empty[empty.len() - 40..],
        false,
    );
}

/// Encodes kept entries drawn with probability `p` and levels from a skewed distribution.
fn codec_seed(numel: u64, bits: u32, p: f64, rng: &mut Rng) -> Vec<u8> {
    let levels_n = 1usize << bits;
    let mut positions = Vec::new();
    let mut levels = Vec::new();
    for i in 0..numel {
        if (rng.next() >> 11) as f64 / (1u64 << 53) as f64 >= p {
            continue;
        }
        positions.push(i as u32);
        // Level = number of leading ones of a random draw: geometric, capped.
        let l = ((rng.next().leading_ones() as usize) % levels_n) as u8;
        levels.push(l);
    }
    let mut kept_counts = vec![0u64; levels_n];
    for &l in &levels {
        kept_counts[usize::from(l)] += 1;
    }
    let enc = codec::encode_tensor(numel, &positions, &levels, &kept_counts).expect("encode");
    CodecInput {
        numel,
        kept_counts,
        blocks: enc.blocks,
        positions: enc.positions,
        levels: enc.levels,
    }
    .to_bytes()
}

fn codec_seeds(out: &Path) {
    let mut rng = Rng(udelta_gpu::splitmix::SplitMix64(7));
    let cases: [(u64, u32, f64); 10] = [
        (0, 1, 0.5),
        (1, 1, 1.0),
        (7, 2, 0.5),
        (100, 4, 0.05),
        (1000, 4, 0.6),
        (1000, 8, 0.3),
        (4096, 3, 0.005),
        (300, 1, 1.0),
        (BLOCK_ELEMENTS + 5, 2, 0.002),
        (2 * BLOCK_ELEMENTS + 100, 1, 0.999),
    ];
    for (i, &(numel, bits, p)) in cases.iter().enumerate() {
        let bytes = codec_seed(numel, bits, p, &mut rng);
        save(out, "codec_streams", &format!("seed-{i}"), &bytes, true);
    }
    save(out, "codec_streams", "edge-empty", &[], true);
}

fn safetensors_edge_seeds(out: &Path) {
    let file = |header: &str, data_len: usize| {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data_len, 0x3c);
        v
    };
    let cases: [(&str, &str, usize, bool); 6] = [
        ("edge-empty-header", "{}", 0, true),
        (
            "edge-metadata-only",
            r#"{"__metadata__":{"a":"b"}}"#,
            0,
            true,
        ),
        (
            "edge-all-dtypes",
            r#"{"a":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]},"b":{"dtype":"U8","shape":[1],"data_offsets":[3,4]},"c":{"dtype":"BF16","shape":[2,1],"data_offsets":[4,8]},"d":{"dtype":"F64","shape":[],"data_offsets":[8,16]},"e":{"dtype":"I32","shape":[0,5],"data_offsets":[16,16]}}"#,
            16,
            true,
        ),
        (
            "edge-overlap",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
            false,
        ),
        (
            "edge-huge-shape",
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#,
            4,
            false,
        ),
        (
            "edge-gap",
            r#"{"a":{"dtype":"F16","shape":[1],"data_offsets":[2,4]}}"#,
            4,
            false,
        ),
    ];
    for (name, header, data_len, valid) in cases {
        save(
            out,
            "safetensors_header",
            name,
            &file(header, data_len),
            valid,
        );
    }
    save(out, "safetensors_header", "edge-short", &[1, 0, 0], false);
    let indexes: [(&str, &str, bool); 4] = [
        ("edge-empty-map", r#"{"weight_map":{}}"#, true),
        ("edge-no-map", r#"{"metadata":{"total_size":1}}"#, false),
        ("edge-number-value", r#"{"weight_map":{"a":1}}"#, false),
        ("edge-not-object", "[1,2]", false),
    ];
    for (name, json, valid) in indexes {
        save(out, "safetensors_index", name, json.as_bytes(), valid);
    }
}

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus-full".into()),
    );
    let tmp = tempfile::tempdir().expect("temporary directory");
    udelta_seeds(&out, tmp.path());
    codec_seeds(&out);
    safetensors_edge_seeds(&out);
    for (target, _) in fuzzing::TARGETS {
        let n = std::fs::read_dir(out.join(target)).map_or(0, |d| d.count());
        println!("{target}: {n} seeds in {}", out.join(target).display());
    }
}
