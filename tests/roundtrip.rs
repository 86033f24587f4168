//! End-to-end round trips through the binary, checked against the algorithm recomputed in
//! `common` from the rules of `docs/ALGORITHM.md` (levels, allocation, per-level kept counts, values, uniformity).

mod common;
use common::*;
use safetensors::Dtype;

/// A LLaMA-shaped pair through compress and decompress with `--embeddings embeddings`.
fn check_round_trip(dtype: Dtype, shards: usize, growth: usize, sparsity: f64, embeddings: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = llama_pair(dtype, growth, 42);
    let base = write_checkpoint(&dir.path().join("base"), &b, shards);
    let ftp = write_checkpoint(&dir.path().join("ft"), &f, shards);
    let file = dir.path().join("ft.udelta");
    ok(udelta(&[
        "compress",
        "--base",
        s(&base),
        "--finetuned",
        s(&ftp),
        "-o",
        s(&file),
        "--sparsity",
        &sparsity.to_string(),
        "--embeddings",
        embeddings,
        "--adapter",
        "cpu",
        "-q",
    ]));
    // lossy: embed_tokens and lm_head join the block linears' allocation.
    let tables = embeddings == "lossy";
    let restored = check_against_algorithm(dir.path(), &base, &ftp, &file, sparsity, |n| {
        (n.contains(".layers.") && n.ends_with("_proj.weight"))
            || (tables && (n == "model.embed_tokens.weight" || n == "lm_head.weight"))
    });
    if shards > 1 {
        assert!(restored.join("model.safetensors.index.json").exists());
        assert_eq!(std::fs::read_dir(&restored).unwrap().count(), shards + 1);
    }
}

#[test]
fn f16_single_file() {
    check_round_trip(Dtype::F16, 1, 0, 0.95, "lossy");
}

#[test]
fn f16_single_file_lossless_embeddings() {
    check_round_trip(Dtype::F16, 1, 0, 0.95, "lossless");
}

#[test]
fn bf16_sharded() {
    check_round_trip(Dtype::BF16, 3, 0, 0.9, "lossy");
}

#[test]
fn f32_with_vocabulary_growth() {
    check_round_trip(Dtype::F32, 2, 5, 0.99, "lossy");
}

#[test]
fn f16_vocabulary_growth_lossless_embeddings() {
    check_round_trip(Dtype::F16, 1, 3, 0.95, "lossless");
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
        ok(udelta_env(
            &[
                "compress",
                "--base",
                s(&base),
                "--finetuned",
                s(&ftp),
                "-o",
                s(&out),
                "--adapter",
                "cpu",
                "-q",
                "--model-name",
                "m",
            ],
            &[("RAYON_NUM_THREADS", threads)],
        ));
        files.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(files[0], files[1]);
    assert_eq!(files[0], files[2]);
}
