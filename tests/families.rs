//! Today's model families: `synth` presets with their published tensor names (sizes divided by
//! `--shrink`, a layer or two). For each, the default compress selects exactly the weights
//! written out below by hand, every other tensor comes back bit-exact, and the compressed ones
//! follow the algorithm recomputed in tests/common. Fused 3-D experts (`qwen3-moe`) are
//! compressed as one matrix per expert, restored into the one 3-D tensor, and written the same
//! by the GPU and CPU engines.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Writes `preset` with `layers` layers and every size divided by `shrink` under `dir`:
/// `(base, fine-tune)`.
fn synth(dir: &Path, preset: &str, layers: usize, shrink: usize) -> (PathBuf, PathBuf) {
    let (l, k) = (layers.to_string(), shrink.to_string());
    ok(udelta(&[
        "synth",
        "--out",
        s(dir),
        "--preset",
        preset,
        "--layers",
        &l,
        "--shrink",
        &k,
        "--shards",
        "2",
        "-q",
    ]));
    (dir.join("base"), dir.join("ft-1"))
}

/// Compresses with the default selection (CPU engine, sparsity 0.9) and returns the file.
fn compress(dir: &Path, base: &Path, ft: &Path) -> PathBuf {
    let file = dir.join("ft.udelta");
    ok(udelta(&[
        "compress",
        "--base",
        s(base),
        "--finetuned",
        s(ft),
        "-o",
        s(&file),
        "--adapter",
        "cpu",
        "--sparsity",
        "0.9",
        "-q",
    ]));
    file
}

/// The names of the compressed records of a file.
fn compressed_names(file: &Path) -> BTreeSet<String> {
    read_index(file)["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "compressed")
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

/// `prefix.` + each of `names`.
fn under(prefix: &str, names: &[&str]) -> Vec<String> {
    names.iter().map(|n| format!("{prefix}.{n}")).collect()
}

/// The embedding and output head (compressed by default, `--embeddings lossy`).
fn embeddings(tied: bool) -> Vec<String> {
    let mut v = vec!["model.embed_tokens.weight".to_string()];
    if !tied {
        v.push("lm_head.weight".into());
    }
    v
}

/// The four separate attention projections of layer `l`.
fn attention(l: usize) -> Vec<String> {
    under(
        &format!("model.layers.{l}.self_attn"),
        &[
            "q_proj.weight",
            "k_proj.weight",
            "v_proj.weight",
            "o_proj.weight",
        ],
    )
}

/// A dense gate/up/down MLP under `prefix`.
fn dense_mlp(prefix: &str) -> Vec<String> {
    under(
        prefix,
        &["gate_proj.weight", "up_proj.weight", "down_proj.weight"],
    )
}

/// Synthesizes `preset`, compresses it, checks the compressed set is `expected` exactly and
/// the round trip (every other tensor bit-exact, the compressed ones as the algorithm says).
fn check_family(preset: &str, layers: usize, shrink: usize, expected: Vec<String>) {
    check_family_split(preset, layers, shrink, expected, |_| false)
}

/// [`check_family`] where the 3-D tensors for which `split` holds are stored as matrices.
fn check_family_split(
    preset: &str,
    layers: usize,
    shrink: usize,
    expected: Vec<String>,
    split: impl Fn(&str) -> bool + Copy,
) {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = synth(dir.path(), preset, layers, shrink);
    let file = compress(dir.path(), &base, &ft);
    let expected: BTreeSet<String> = expected.into_iter().collect();
    let got = compressed_names(&file);
    assert_eq!(
        got.difference(&expected).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "{preset}: compressed but not expected"
    );
    assert_eq!(
        expected.difference(&got).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "{preset}: expected but not compressed"
    );
    check_split_against_algorithm(
        dir.path(),
        &base,
        &ft,
        &file,
        0.9,
        |n| expected.contains(n),
        split,
    );
}

#[test]
fn mistral_7b_selects_its_linears_and_round_trips() {
    let mut want = embeddings(false);
    want.extend(attention(0));
    want.extend(dense_mlp("model.layers.0.mlp"));
    check_family("mistral-7b", 1, 32, want);
}

#[test]
fn mixtral_8x7b_selects_every_expert_but_not_the_router() {
    let mut want = embeddings(false);
    for l in 0..2 {
        want.extend(attention(l));
        for e in 0..8 {
            want.extend(under(
                &format!("model.layers.{l}.block_sparse_moe.experts.{e}"),
                &["w1.weight", "w2.weight", "w3.weight"],
            ));
        }
    }
    check_family("mixtral-8x7b", 2, 32, want);
}

#[test]
fn qwen3_moe_compresses_fused_experts_as_one_matrix_each() {
    let mut want = embeddings(false);
    want.extend(attention(0));
    for e in 0..128 {
        want.push(format!("model.layers.0.mlp.experts.gate_up_proj[{e}]"));
        want.push(format!("model.layers.0.mlp.experts.down_proj[{e}]"));
    }
    check_family_split("qwen3-moe", 1, 32, want, |n| n.contains(".mlp.experts."));
}

#[test]
fn phi3_mini_selects_its_fused_projections() {
    let mut want = embeddings(false);
    want.extend(under(
        "model.layers.0",
        &[
            "self_attn.qkv_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_up_proj.weight",
            "mlp.down_proj.weight",
        ],
    ));
    check_family("phi3-mini", 1, 32, want);
}

#[test]
fn gemma2_2b_selects_its_linears_and_no_norm() {
    let mut want = embeddings(true);
    want.extend(attention(0));
    want.extend(dense_mlp("model.layers.0.mlp"));
    check_family("gemma2-2b", 1, 32, want);
}

#[test]
fn deepseek_v2_lite_selects_latent_attention_and_all_experts() {
    let mut want = embeddings(false);
    for l in 0..2 {
        want.extend(under(
            &format!("model.layers.{l}.self_attn"),
            &[
                "q_proj.weight",
                "kv_a_proj_with_mqa.weight",
                "kv_b_proj.weight",
                "o_proj.weight",
            ],
        ));
    }
    want.extend(dense_mlp("model.layers.0.mlp"));
    for e in 0..64 {
        want.extend(dense_mlp(&format!("model.layers.1.mlp.experts.{e}")));
    }
    want.extend(dense_mlp("model.layers.1.mlp.shared_experts"));
    check_family("deepseek-v2-lite", 2, 32, want);
}

#[test]
fn fused_experts_file_is_version_3_with_one_record_per_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = synth(dir.path(), "qwen3-moe", 1, 64);
    let file = compress(dir.path(), &base, &ft);
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes[8..12], 3u32.to_le_bytes(), "a version 3 header");
    let index = read_index(&file);
    assert_eq!(index["format_version"], 3);
    // hidden 2048/64 = 32, F = 768/64 = 12: gate_up_proj [128, 24, 32]
    let views: Vec<&serde_json::Value> = index["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"].as_str().unwrap().contains("gate_up_proj["))
        .collect();
    assert_eq!(views.len(), 128);
    for (e, v) in views.iter().enumerate() {
        assert_eq!(
            v["name"],
            format!("model.layers.0.mlp.experts.gate_up_proj[{e}]")
        );
        assert_eq!(v["shape"], serde_json::json!([24, 32]));
        assert_eq!(v["base_shape"], serde_json::json!([24, 32]));
        assert_eq!(v["shared_numel"], 24 * 32);
        assert_eq!(
            v["matrix_of"],
            serde_json::json!({
                "name": "model.layers.0.mlp.experts.gate_up_proj",
                "shape": [128, 24, 32],
                "index": e
            })
        );
    }
    // Each expert is its own matrix for the variance ranking: their deltas differ, so do
    // their standard deviations.
    let stds: BTreeSet<u64> = views
        .iter()
        .map(|v| v["std"].as_f64().unwrap().to_bits())
        .collect();
    assert!(stds.len() > 100, "{} distinct stds", stds.len());
    // A dense-only file stays version 2, readable by earlier builds.
    let (b2, f2) = synth(&dir.path().join("dense"), "phi3-mini", 1, 64);
    let dense = compress(&dir.path().join("dense"), &b2, &f2);
    assert_eq!(read_index(&dense)["format_version"], 2);
}

#[test]
fn fused_experts_are_byte_identical_on_gpu_and_cpu() {
    if !vulkan_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = synth(dir.path(), "qwen3-moe", 1, 64);
    same_payloads(&base, &ft);
}

#[test]
fn crafted_matrix_views_and_a_wrong_base_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = synth(&dir.path().join("a"), "qwen3-moe", 1, 64);
    let file = compress(dir.path(), &base, &ft);
    let bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    let index_off = u64::from_le_bytes(bytes[n - 40..n - 32].try_into().unwrap()) as usize;
    let records = &bytes[16..index_off];
    let index = read_index(&file);
    let first_view = index["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .position(|t| !t["matrix_of"].is_null())
        .unwrap();
    let crafted = |what: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut i = index.clone();
        edit(&mut i);
        let json = serde_json::to_vec(&i).unwrap();
        let path = dir.path().join(format!("{what}.udelta"));
        std::fs::write(&path, udelta_gpu::fuzzing::udelta_container(records, &json)).unwrap();
        path
    };
    let tensors = |i: &mut serde_json::Value| i["tensors"].as_array_mut().unwrap().clone();
    for (what, edit, needle) in [
        (
            "swapped",
            Box::new(move |i: &mut serde_json::Value| {
                let mut t = tensors(i);
                t.swap(first_view + 1, first_view + 2);
                i["tensors"] = t.into();
            }) as Box<dyn Fn(&mut serde_json::Value)>,
            "out of order",
        ),
        (
            "missing",
            Box::new(move |i: &mut serde_json::Value| {
                let mut t = tensors(i);
                t.remove(first_view + 5);
                i["tensors"] = t.into();
            }),
            "consecutive matrix records",
        ),
        (
            "version-2",
            Box::new(|i: &mut serde_json::Value| i["format_version"] = 2.into()),
            "matrix views in a version 2 file",
        ),
        (
            "other-shape",
            Box::new(move |i: &mut serde_json::Value| {
                i["tensors"][first_view + 3]["shape"] = serde_json::json!([12, 64]);
            }),
            "another shape",
        ),
    ] {
        let path = crafted(what, &*edit);
        fails(udelta(&["inspect", s(&path)]), &[needle, "gate_up_proj"]);
    }
    // A base whose experts have another shape is refused before anything is written.
    let (other, _) = synth(&dir.path().join("b"), "qwen3-moe", 1, 32);
    let out = dir.path().join("restored");
    fails(
        udelta(&[
            "decompress",
            s(&file),
            "--base",
            s(&other),
            "-o",
            s(&out),
            "-q",
        ]),
        &["mlp.experts.gate_up_proj", "[128, 48, 64]", "wrong base"],
    );
    assert!(!out.exists());
    // So is a fine-tune whose experts have another shape than the base's, before any output.
    let ft_other = dir.path().join("b").join("ft-1");
    let refused = dir.path().join("refused.udelta");
    fails(
        udelta(&[
            "compress",
            "--base",
            s(&base),
            "--finetuned",
            s(&ft_other),
            "-o",
            s(&refused),
            "--adapter",
            "cpu",
            "-q",
        ]),
        &[
            "mlp.experts.gate_up_proj",
            "[128, 48, 64]",
            "[128, 24, 32]",
            "right base",
        ],
    );
    assert!(!refused.exists());
}

#[test]
fn the_restorer_yields_fused_experts_as_the_decompressed_3d_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = synth(dir.path(), "qwen3-moe", 1, 64);
    let file = compress(dir.path(), &base, &ft);
    let out = dir.path().join("restored");
    ok(udelta(&[
        "decompress",
        s(&file),
        "--base",
        s(&base),
        "-o",
        s(&out),
        "-q",
    ]));
    let written = read_checkpoint(&out);
    let mut restorer = udelta_gpu::restore::Restorer::open(&file, &base, false, false).unwrap();
    let mut seen = 0;
    while let Some(next) = restorer.next_tensor() {
        let (h, bytes) = next.unwrap();
        let w = &written[&h.name];
        assert_eq!((&h.shape, &bytes), (&w.shape, &w.data), "{}", h.name);
        seen += 1;
    }
    assert_eq!(seen, written.len());
    let experts = &written["model.layers.0.mlp.experts.down_proj"];
    assert_eq!(experts.shape, [128, 32, 12]);
}

/// The nuclear norm of a `rows x cols` matrix (exact, nalgebra's SVD).
fn nuclear_norm(rows: usize, cols: usize, values: &[f32]) -> f64 {
    let v: Vec<f64> = values.iter().map(|&x| x as f64).collect();
    nalgebra::DMatrix::from_row_slice(rows, cols, &v)
        .singular_values()
        .sum()
}

#[test]
fn each_expert_is_its_own_matrix_in_the_trace_norm() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = synth(dir.path(), "qwen3-moe", 1, 64);
    let file = dir.path().join("ft.udelta");
    let mut args = compress_args(&base, &ft, &file);
    args.push("--trace-norm");
    ok(udelta(&args));
    let t_m = read_index(&file)["model"]["trace_norm"].as_f64().unwrap();
    let out = dir.path().join("deltas");
    ok(udelta(&[
        "decompress",
        s(&file),
        "--base",
        s(&base),
        "-o",
        s(&out),
        "--delta-only",
        "-q",
    ]));
    // gamma is 1 for one model: the deltas are `rescale * value`, as T_m counts them.
    let deltas = read_checkpoint(&out);
    let exact: f64 = deltas
        .values()
        .map(|t| nuclear_norm(t.shape[0], t.shape[1], &t.values()))
        .sum();
    assert!(
        (t_m - exact).abs() <= 0.01 * exact,
        "T_m {t_m} vs exact {exact}"
    );
    // Taking the experts as one [E * R, C] matrix would give another sum.
    let stacked = |name: &str| {
        let (mut rows, mut values, mut separate) = (0, Vec::new(), 0.0);
        for e in 0..128 {
            let t = &deltas[&format!("model.layers.0.mlp.experts.{name}[{e}]")];
            rows += t.shape[0];
            values.extend(t.values());
            separate += nuclear_norm(t.shape[0], t.shape[1], &t.values());
        }
        let cols = values.len() / rows;
        (separate, nuclear_norm(rows, cols, &values))
    };
    let (separate, together) = stacked("gate_up_proj");
    assert!(separate > 1.05 * together, "{separate} vs {together}");
}

#[test]
fn include_and_exclude_match_the_3d_tensor_not_its_matrices() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = synth(dir.path(), "qwen3-moe", 1, 64);
    let with = |what: &str, args: &[&str]| {
        let file = dir.path().join(format!("{what}.udelta"));
        let mut all = vec![
            "compress",
            "--base",
            s(&base),
            "--finetuned",
            s(&ft),
            "-o",
            s(&file),
            "--adapter",
            "cpu",
            "-q",
        ];
        all.extend(args);
        ok(udelta(&all));
        file
    };
    let only_down = with("include", &["--include", r"experts\.down_proj$"]);
    let want: BTreeSet<String> = (0..128)
        .map(|e| format!("model.layers.0.mlp.experts.down_proj[{e}]"))
        .collect();
    assert_eq!(compressed_names(&only_down), want);
    // Excluded, the experts are stored whole (coded against the base): a version 2 file.
    let no_experts = with("exclude", &["--exclude", "experts"]);
    let index = read_index(&no_experts);
    assert_eq!(index["format_version"], 2);
    let gate_up = index["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.0.mlp.experts.gate_up_proj")
        .unwrap();
    assert_eq!(gate_up["kind"], "coded");
    assert!(!compressed_names(&no_experts)
        .iter()
        .any(|n| n.contains("experts")));
}
