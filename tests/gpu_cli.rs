//! Whole files through the binary: `--adapter vulkan` (lavapipe in CI) and `--adapter cpu`
//! write the same tensor payloads, on a sharded LLaMA-shaped checkpoint and on the real MiniLM
//! pair. Without a Vulkan adapter the test says loudly that it did not run; with `CI=true` it
//! fails.

mod common;
use common::*;
use safetensors::Dtype;
use std::path::Path;

/// Whether `--adapter vulkan` works here (loud message or CI failure when not).
fn vulkan_available() -> bool {
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
fn payload(dir: &Path, base: &Path, ft: &Path, adapter: &str) -> (Vec<u8>, serde_json::Value) {
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

fn same_payloads(base: &Path, ft: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let cpu = payload(dir.path(), base, ft, "cpu");
    let gpu = payload(dir.path(), base, ft, "vulkan");
    assert!(
        cpu.0 == gpu.0,
        "record bytes differ between the CPU and GPU engines"
    );
    assert_eq!(cpu.1, gpu.1);
}

#[test]
fn gpu_and_cpu_files_match_on_a_sharded_bf16_checkpoint() {
    if !vulkan_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = llama_pair(Dtype::BF16, 3, 11);
    let base = write_checkpoint(&dir.path().join("base"), &b, 2);
    let ft = write_checkpoint(&dir.path().join("ft"), &f, 2);
    same_payloads(&base, &ft);
}

#[test]
fn gpu_and_cpu_files_match_on_minilm() {
    if !vulkan_available() {
        return;
    }
    let (base, ft) = minilm();
    same_payloads(&base, &ft);
}
