//! The fuzz corpora as a regression suite on stable Rust: every file of
//! `fuzz/corpus/<target>/` (the minimized corpus) and `fuzz/regressions/<target>/` (crash,
//! hang and OOM reproducers) goes through the same entry point as the fuzz target
//! (`udelta_gpu::fuzzing`), in memory, so no temporary file is made. Then the fixes the
//! fuzzing led to are checked one by one on hand-made variations of a valid index.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use udelta_gpu::fuzzing::{self, SAFETENSORS_NAME, SHARD_INDEX_NAME, TARGETS, UDELTA_NAME};

/// The files of `fuzz/<kind>/<target>/`, sorted (none if the directory does not exist).
fn files(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.expect("directory entry").path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// What an error of `target` must name: the in-memory file it was given.
fn file_name_of(target: &str) -> Option<&'static str> {
    match target {
        "udelta_file" | "udelta_index" => Some(UDELTA_NAME),
        "safetensors_header" => Some(SAFETENSORS_NAME),
        "safetensors_index" => Some(SHARD_INDEX_NAME),
        // Codec errors name the block and stream; the caller adds file and tensor.
        _ => None,
    }
}

/// Runs every file of `kind` through its target; returns (files, accepted) per target.
fn run_all(kind: &str) -> Vec<(&'static str, usize, usize)> {
    TARGETS
        .iter()
        .map(|&(target, run)| {
            let inputs = files(kind, target);
            let mut accepted = 0;
            for path in &inputs {
                let data = std::fs::read(path).expect("read corpus file");
                match run(&data) {
                    Ok(_) => accepted += 1,
                    Err(e) => {
                        if let Some(name) = file_name_of(target) {
                            assert!(
                                e.starts_with(name),
                                "{}: error does not name the file: {e}",
                                path.display()
                            );
                        }
                    }
                }
            }
            (target, inputs.len(), accepted)
        })
        .collect()
}

#[test]
fn every_corpus_file_decodes_or_is_refused_without_panic() {
    for (target, n, accepted) in run_all("corpus") {
        assert!(n > 0, "fuzz/corpus/{target} is empty or missing");
        assert!(
            accepted > 0,
            "no file of fuzz/corpus/{target} is accepted: the entry point refuses valid input"
        );
    }
}

#[test]
fn every_crash_reproducer_is_refused_without_panic() {
    let results = run_all("regressions");
    let total: usize = results.iter().map(|r| r.1).sum();
    assert!(total > 0, "fuzz/regressions holds no reproducer");
}

/// A valid `udelta_index` input from the corpus holding a compressed tensor: its records and
/// its index JSON.
fn valid_index() -> (Vec<u8>, Value) {
    for path in files("corpus", "udelta_index") {
        let data = std::fs::read(&path).expect("read");
        let (records, json) = fuzzing::split_index_input(&data);
        let Ok(index) = serde_json::from_slice::<Value>(json) else {
            continue;
        };
        let compressed = index["tensors"]
            .as_array()
            .is_some_and(|ts| ts.iter().any(|t| t["kind"] == "compressed"));
        if compressed && fuzzing::udelta_index(&data).is_ok_and(|n| n > 0) {
            return (records.to_vec(), index);
        }
    }
    panic!("fuzz/corpus/udelta_index has no valid file with a compressed tensor");
}

/// The valid index with `edit` applied to its first compressed tensor; returns the error of
/// decoding it.
fn refused(edit: impl FnOnce(&mut Value)) -> String {
    let (records, mut index) = valid_index();
    let tensor = index["tensors"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|t| t["kind"] == "compressed")
        .unwrap();
    edit(tensor);
    let json = serde_json::to_vec(&index).unwrap();
    let err = fuzzing::udelta_index(&fuzzing::join_index_input(&records, &json))
        .expect_err("the edited index must be refused");
    assert!(err.starts_with(UDELTA_NAME), "{err}");
    assert!(
        err.contains("tensor '"),
        "error must name the tensor: {err}"
    );
    err
}

#[test]
fn the_valid_index_decodes() {
    let (records, index) = valid_index();
    let json = serde_json::to_vec(&index).unwrap();
    let n = fuzzing::udelta_index(&fuzzing::join_index_input(&records, &json)).unwrap();
    assert!(n > 0);
}

#[test]
fn histogram_sum_overflow_is_refused() {
    // Used to overflow `u64` while summing (a panic in debug builds, a wrap in release).
    let err = refused(|t| {
        let n = t["histogram"].as_array().unwrap().len();
        let mut h = vec![json!(0); n];
        h[0] = json!(u64::MAX);
        h[1] = json!(2u64);
        t["histogram"] = json!(h);
    });
    assert!(err.contains("element counts inconsistent"), "{err}");
}

#[test]
fn more_shared_elements_than_the_base_has_are_refused() {
    // The base tensor is what the kept positions index into.
    let err = refused(|t| t["base_shape"] = json!([1, 1]));
    assert!(err.contains("element counts inconsistent"), "{err}");
}

#[test]
fn shapes_whose_bytes_overflow_are_refused() {
    let err = refused(|t| t["shape"] = json!([1u64 << 32, 1u64 << 30]));
    assert!(err.contains("overflow"), "{err}");
    let err = refused(|t| t["base_shape"] = json!([1u64 << 32, 1u64 << 30]));
    assert!(err.contains("base shape too large"), "{err}");
}

#[test]
fn unknown_dtypes_are_refused_on_open() {
    let err = refused(|t| t["dtype"] = json!("F17"));
    assert!(err.contains("unknown dtype"), "{err}");
    let err = refused(|t| t["base_dtype"] = json!("Q4"));
    assert!(err.contains("unknown base dtype"), "{err}");
}

#[test]
fn a_block_table_of_the_wrong_length_is_refused_on_open() {
    let err = refused(|t| t["blocks"] = json!([]));
    assert!(err.contains("block table length"), "{err}");
}
