//! Bad inputs: each exits 1 with a message naming the file (and tensor), never panics, and
//! leaves no output (not even a temporary) behind.

mod common;
use common::*;
use safetensors::Dtype;
use std::path::{Path, PathBuf};

struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    ft: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = llama_pair(Dtype::F16, 0, 3);
    let base = write_checkpoint(&dir.path().join("base"), &b, 1);
    let ft = write_checkpoint(&dir.path().join("ft"), &f, 1);
    Fixture { dir, base, ft }
}

/// Names in `dir` other than those listed.
fn leftovers(dir: &Path, expected: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !expected.contains(&n.as_str()))
        .collect()
}

fn compress(fx: &Fixture, base: &Path, ft: &Path, extra: &[&str]) -> std::process::Output {
    let out = fx.dir.path().join("out.udelta");
    let mut args = vec![
        "compress",
        "--base",
        s(base),
        "--finetuned",
        s(ft),
        "-o",
        s(&out),
        "--adapter",
        "cpu",
        "-q",
    ];
    args.extend_from_slice(extra);
    udelta(&args)
}

fn assert_clean(fx: &Fixture) {
    assert_eq!(
        leftovers(fx.dir.path(), &["base", "ft"]),
        Vec::<String>::new()
    );
}

fn modified_ft(fx: &Fixture, name: &str, edit: impl FnOnce(&mut Vec<T>)) -> PathBuf {
    let (_, mut f) = llama_pair(Dtype::F16, 0, 3);
    edit(&mut f);
    write_checkpoint(&fx.dir.path().join(name), &f, 1)
}

#[test]
fn missing_and_unreadable_checkpoints() {
    let fx = fixture();
    let nowhere = fx.dir.path().join("nowhere");
    fails(compress(&fx, &nowhere, &fx.ft, &[]), &["nowhere"]);
    assert_clean(&fx);
    let file = fx.ft.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() - 7].to_vec()),
        ("empty", vec![]),
        ("garbage", b"this is not a safetensors file at all".to_vec()),
        (
            "huge-header",
            [u64::MAX.to_le_bytes().to_vec(), vec![0; 16]].concat(),
        ),
    ];
    for (name, content) in cases {
        let d = fx.dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("model.safetensors"), content).unwrap();
        fails(compress(&fx, &fx.base, &d, &[]), &[name]);
        std::fs::remove_dir_all(&d).unwrap();
        assert_clean(&fx);
    }
}

#[test]
fn wrong_shapes_and_missing_tensors_name_the_tensor() {
    let fx = fixture();
    let d = modified_ft(&fx, "bad", |f| {
        let t = f
            .iter_mut()
            .find(|t| t.name == "model.layers.1.self_attn.k_proj.weight")
            .unwrap();
        t.shape = vec![32, 128];
    });
    fails(
        compress(&fx, &fx.base, &d, &[]),
        &["model.layers.1.self_attn.k_proj.weight", "shape"],
    );
    std::fs::remove_dir_all(&d).unwrap();
    let d = modified_ft(&fx, "bad", |f| {
        f.retain(|t| t.name != "model.layers.0.mlp.up_proj.weight")
    });
    fails(
        compress(&fx, &fx.base, &d, &[]),
        &["model.layers.0.mlp.up_proj.weight", "missing"],
    );
    std::fs::remove_dir_all(&d).unwrap();
    assert_clean(&fx);
}

#[test]
fn non_finite_deltas_name_file_tensor_and_element() {
    let fx = fixture();
    for (tag, v) in [("nan", f32::NAN), ("inf", f32::INFINITY)] {
        let d = modified_ft(&fx, tag, |f| {
            let t = f
                .iter_mut()
                .find(|t| t.name == "model.layers.0.self_attn.v_proj.weight")
                .unwrap();
            let mut vals = t.values();
            vals[100] = v;
            *t = T::float(&t.name.clone(), t.dtype, &t.shape.clone(), &vals);
        });
        fails(
            compress(&fx, &fx.base, &d, &[]),
            &[
                tag,
                "model.layers.0.self_attn.v_proj.weight",
                "element 100",
                "not finite",
            ],
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
    assert_clean(&fx);
}

#[test]
fn parameters_out_of_range_are_refused_before_any_work() {
    let fx = fixture();
    for (args, needle) in [
        (vec!["--sparsity", "1"], "--sparsity"),
        (vec!["--sparsity", "0"], "--sparsity"),
        (vec!["--sparsity", "-0.5"], "--sparsity"),
        (vec!["--bits", "0"], "--bits"),
        (vec!["--bits", "9"], "--bits"),
        (vec!["--sparsity", "0.995", "--step", "0.01"], "above 1"),
        (vec!["--factor", "0"], "--factor"),
        (vec!["--step", "-1"], "--step"),
        (vec!["--include", "("], "regex"),
    ] {
        fails(compress(&fx, &fx.base, &fx.ft, &args), &[needle]);
        assert_clean(&fx);
    }
    let out = fx.dir.path().join("out.udelta");
    let args = [
        "compress",
        "--base",
        s(&fx.base),
        "--finetuned",
        s(&fx.ft),
        "-o",
        s(&out),
        "--adapter",
        "quantum",
    ];
    fails(udelta(&args), &["--adapter"]);
    assert_clean(&fx);
}

#[test]
fn existing_outputs_need_force() {
    let fx = fixture();
    let out = fx.dir.path().join("out.udelta");
    std::fs::write(&out, b"precious").unwrap();
    fails(
        compress(&fx, &fx.base, &fx.ft, &[]),
        &["out.udelta", "exists"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    ok(compress(&fx, &fx.base, &fx.ft, &["--force"]));
    let restored = fx.dir.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    fails(
        udelta(&[
            "decompress",
            s(&out),
            "--base",
            s(&fx.base),
            "-o",
            s(&restored),
            "-q",
        ]),
        &["restored", "exists"],
    );
}

#[test]
fn corrupted_udelta_files_are_detected() {
    let fx = fixture();
    let out = fx.dir.path().join("out.udelta");
    ok(compress(&fx, &fx.base, &fx.ft, &[]));
    let good = std::fs::read(&out).unwrap();
    let n = good.len();
    let index_off = u64::from_le_bytes(good[n - 40..n - 32].try_into().unwrap()) as usize;
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("truncated-footer".into(), good[..n - 5].to_vec()),
        ("truncated-half".into(), good[..n / 2].to_vec()),
        (
            "no-magic".into(),
            [b"XXXXXXXX".to_vec(), good[8..].to_vec()].concat(),
        ),
    ];
    let mut future = good.clone();
    future[8] = 2;
    cases.push(("future-version".into(), future));
    // One flipped bit in the header, in a record, in the index and in the footer.
    for (tag, pos) in [
        ("header", 12),
        ("record", 20),
        ("record-mid", index_off / 2),
        ("index", index_off + 10),
        ("footer", n - 20),
    ] {
        let mut b = good.clone();
        b[pos] ^= 0x10;
        cases.push((format!("bit-{tag}"), b));
    }
    for (tag, bytes) in cases {
        let bad = fx.dir.path().join(format!("{tag}.udelta"));
        std::fs::write(&bad, bytes).unwrap();
        let restored = fx.dir.path().join("restored");
        let err = fails(
            udelta(&[
                "decompress",
                s(&bad),
                "--base",
                s(&fx.base),
                "-o",
                s(&restored),
                "-q",
            ]),
            &[&tag],
        );
        assert!(!restored.exists(), "{tag}: partial output left: {err}");
        assert_eq!(
            leftovers(
                fx.dir.path(),
                &["base", "ft", "out.udelta", &format!("{tag}.udelta")]
            ),
            Vec::<String>::new(),
            "{tag}"
        );
        std::fs::remove_file(&bad).unwrap();
    }
}

#[test]
fn a_wrong_base_is_refused_unless_forced() {
    let fx = fixture();
    let out = fx.dir.path().join("out.udelta");
    ok(compress(&fx, &fx.base, &fx.ft, &[]));
    let (other, _) = llama_pair(Dtype::F16, 0, 99);
    let wrong = write_checkpoint(&fx.dir.path().join("wrong"), &other, 1);
    let restored = fx.dir.path().join("restored");
    fails(
        udelta(&[
            "decompress",
            s(&out),
            "--base",
            s(&wrong),
            "-o",
            s(&restored),
            "-q",
        ]),
        &["wrong", "wrong base", "checksum"],
    );
    assert!(!restored.exists());
    ok(udelta(&[
        "decompress",
        s(&out),
        "--base",
        s(&wrong),
        "-o",
        s(&restored),
        "-q",
        "--force",
    ]));
}
