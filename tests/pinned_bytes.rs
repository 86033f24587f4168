//! Pins the exact bytes of files built from synthetic inputs, so that a change meant to leave
//! the output alone (a refactor, a speed-up) is caught if it does not. The expected values are
//! CRC-32s and lengths recorded on 2026-12-06 from commit 1980d76, updated the same day when
//! embedding-like tensors became compressed by default (`--embeddings lossy`) and `synth`
//! got seen/unseen vocabulary rows; a change that is *meant* to change the bytes (a format or
//! algorithm change) updates them in the same commit and says why.
//!
//! Each case goes through the binary with the CPU engine (the GPU engine is held to the CPU
//! engine byte for byte by `gpu_engine.rs`).

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;

/// CRC-32 and length of every file under `dir`, by path relative to it.
fn digest(dir: &Path) -> BTreeMap<String, (u32, u64)> {
    snapshot(dir)
        .into_iter()
        .map(|(p, (len, crc))| {
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            (rel, (crc, len))
        })
        .collect()
}

fn synth(out: &Path, args: &[&str]) {
    let mut a = vec!["synth", "--out", s(out), "-q"];
    a.extend_from_slice(args);
    ok(udelta(&a));
}

fn compress(args: &[&str]) {
    let mut a = vec!["compress", "--adapter", "cpu", "-q"];
    a.extend_from_slice(args);
    ok(udelta(&a));
}

fn decompress(file: &Path, base: &Path, out: &Path) {
    ok(udelta(&[
        "decompress",
        s(file),
        "--base",
        s(base),
        "-o",
        s(out),
    ]));
}

fn check(got: BTreeMap<String, (u32, u64)>, want: &[(&str, u32, u64)]) {
    let want: BTreeMap<String, (u32, u64)> = want
        .iter()
        .map(|&(n, c, l)| (n.to_string(), (c, l)))
        .collect();
    if got != want {
        let mut table = String::new();
        for (n, (c, l)) in &got {
            table.push_str(&format!("        (\"{n}\", 0x{c:08x}, {l}),\n"));
        }
        panic!("pinned bytes changed; the files now are:\n{table}");
    }
}

/// Two bf16 fine-tunes of one sharded base, compressed together (trace-norm gamma), restored.
#[test]
fn two_bf16_sharded_finetunes_with_trace_norm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth(
        &d.join("in"),
        &[
            "--preset", "tiny", "--models", "2", "--dtype", "bf16", "--shards", "2", "--seed", "3",
        ],
    );
    let (base, ft1, ft2) = (d.join("in/base"), d.join("in/ft-1"), d.join("in/ft-2"));
    compress(&[
        "--base",
        s(&base),
        "--finetuned",
        s(&ft1),
        "--finetuned",
        s(&ft2),
        "-o",
        s(&d.join("out")),
    ]);
    decompress(&d.join("out/ft-2.udelta"), &base, &d.join("restored"));
    let mut got = digest(&d.join("out"));
    got.extend(
        digest(&d.join("restored"))
            .into_iter()
            .map(|(n, v)| (format!("restored/{n}"), v)),
    );
    check(
        got,
        &[
            ("ft-1.udelta", 0x63c0e023, 96562),
            ("ft-2.udelta", 0x37edaa1a, 96026),
            ("restored/config.json", 0x923a9b98, 638),
            (
                "restored/model-00001-of-00002.safetensors",
                0x3f9586b3,
                2107464,
            ),
            (
                "restored/model-00002-of-00002.safetensors",
                0xc8ef260e,
                2108640,
            ),
            ("restored/model.safetensors.index.json", 0x87336909, 1789),
        ],
    );
}

/// One f16 fine-tune with added vocabulary rows, single file, s = 0.9, with `--trace-norm`.
#[test]
fn f16_vocabulary_growth_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth(
        &d.join("in"),
        &[
            "--preset",
            "tiny",
            "--dtype",
            "f16",
            "--shards",
            "1",
            "--seed",
            "11",
            "--vocab-growth",
            "3",
        ],
    );
    let (base, ft) = (d.join("in/base"), d.join("in/ft-1"));
    let file = d.join("ft.udelta");
    compress(&[
        "--base",
        s(&base),
        "--finetuned",
        s(&ft),
        "-o",
        s(&file),
        "--sparsity",
        "0.9",
        "--trace-norm",
    ]);
    decompress(&file, &base, &d.join("restored"));
    let mut got = digest(&d.join("restored"));
    got.insert("ft.udelta".into(), {
        let bytes = std::fs::read(&file).unwrap();
        (crc32fast::hash(&bytes), bytes.len() as u64)
    });
    check(
        got,
        &[
            ("config.json", 0x9337eb47, 638),
            ("ft.udelta", 0x69ebde6c, 164510),
            ("model.safetensors", 0xe4d25d55, 4219128),
        ],
    );
}

/// One f32 fine-tune from the test helpers (3 shards), s = 0.99, 2 bits, fixed gamma and seed.
#[test]
fn f32_sharded_two_bits_fixed_gamma() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (b, f) = llama_pair(safetensors::Dtype::F32, 0, 5);
    let base = write_checkpoint(&d.join("base"), &b, 3);
    let ft = write_checkpoint(&d.join("ft"), &f, 3);
    let file = d.join("ft.udelta");
    compress(&[
        "--base",
        s(&base),
        "--finetuned",
        s(&ft),
        "-o",
        s(&file),
        "--sparsity",
        "0.99",
        "--bits",
        "2",
        "--gamma",
        "0.75",
        "--seed",
        "9",
    ]);
    decompress(&file, &base, &d.join("restored"));
    let mut got = digest(&d.join("restored"));
    got.insert("ft.udelta".into(), {
        let bytes = std::fs::read(&file).unwrap();
        (crc32fast::hash(&bytes), bytes.len() as u64)
    });
    check(
        got,
        &[
            ("ft.udelta", 0xfb84f175, 4523),
            ("model-00001-of-00003.safetensors", 0x727fe742, 223056),
            ("model-00002-of-00003.safetensors", 0xcf4012f4, 154960),
            ("model-00003-of-00003.safetensors", 0x8d70d777, 70080),
            ("model.safetensors.index.json", 0x3c23fcd8, 1788),
        ],
    );
}
