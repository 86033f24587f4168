//! Whole files through the binary: `--adapter vulkan` (lavapipe in CI) and `--adapter cpu`
//! write the same tensor payloads, on a sharded LLaMA-shaped checkpoint and on the real MiniLM
//! pair. Without a Vulkan adapter the test says loudly that it did not run; with `CI=true` it
//! fails.

mod common;
use common::*;
use safetensors::Dtype;

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
