//! Fuzz target `codec_streams`: see `udelta_gpu::fuzzing::codec_streams` and docs/FUZZING.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = udelta_gpu::fuzzing::codec_streams(data);
});
