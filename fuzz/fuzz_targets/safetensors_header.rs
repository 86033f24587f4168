//! Fuzz target `safetensors_header`: see `udelta_gpu::fuzzing::safetensors_header` and docs/FUZZING.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = udelta_gpu::fuzzing::safetensors_header(data);
});
