//! Fuzz target `udelta_file`: see `udelta_gpu::fuzzing::udelta_file` and docs/FUZZING.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = udelta_gpu::fuzzing::udelta_file(data);
});
