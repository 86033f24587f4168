//! Fuzz target `udelta_index`: see `udelta_gpu::fuzzing::udelta_index` and docs/FUZZING.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = udelta_gpu::fuzzing::udelta_index(data);
});
