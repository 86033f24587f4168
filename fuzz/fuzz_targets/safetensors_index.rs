//! Fuzz target `safetensors_index`: see `udelta_gpu::fuzzing::safetensors_index` and docs/FUZZING.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = udelta_gpu::fuzzing::safetensors_index(data);
});
