//! Bad inputs: each exits non-zero (1; 2 for command-line syntax) with a message naming the
//! file (and tensor), never panics, and leaves no output (not even a temporary) behind, nor
//! changes any input. The cases are tables run by one checker ([`BadRun::check`]); the
//! `.udelta` corruption sweeps (every bit, every truncation) run in-process through the
//! library. docs/RELIABILITY.md lists them.

mod common;
use common::*;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use udelta_gpu::pipeline::decompress::{decompress, DecompressOptions};

const Q0: &str = "model.layers.0.self_attn.q_proj.weight";
const K0: &str = "model.layers.0.self_attn.k_proj.weight";
const V0: &str = "model.layers.0.self_attn.v_proj.weight";
const UP0: &str = "model.layers.0.mlp.up_proj.weight";

/// A base, a fine-tune, a valid `.udelta` of them, and an empty `out/` where outputs go.
struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    ft: PathBuf,
    good: PathBuf,
    out: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (b, f) = llama_pair(Dtype::F16, 0, 3);
        let base = write_checkpoint(&dir.path().join("base"), &b, 1);
        let ft = write_checkpoint(&dir.path().join("ft"), &f, 1);
        let good = dir.path().join("good.udelta");
        ok(udelta(&[
            "compress",
            "--base",
            s(&base),
            "--finetuned",
            s(&ft),
            "-o",
            s(&good),
            "--adapter",
            "cpu",
            "-q",
        ]));
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        Fixture {
            dir,
            base,
            ft,
            good,
            out,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The fine-tune's single file, as bytes.
    fn ft_bytes(&self) -> Vec<u8> {
        std::fs::read(self.ft.join("model.safetensors")).unwrap()
    }

    /// Writes `bytes` as `bad/NAME/model.safetensors`; returns the directory.
    fn bad_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let d = self.path(&format!("bad/{name}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
        d
    }

    /// Writes the fixture's fine-tune (or base, `base = true`) edited by `edit` as checkpoint
    /// `bad/NAME`.
    fn bad_ckpt(&self, name: &str, base: bool, edit: impl FnOnce(&mut Vec<T>)) -> PathBuf {
        let (b, f) = llama_pair(Dtype::F16, 0, 3);
        let mut list = if base { b } else { f };
        edit(&mut list);
        write_checkpoint(&self.path(&format!("bad/{name}")), &list, 1)
    }

    /// `compress` of `base` and `ft` into `out/x.udelta` on the CPU engine, plus `extra`.
    fn compress(&self, base: &Path, ft: &Path, extra: &[&str]) -> Vec<String> {
        let out = self.out.join("x.udelta");
        let mut a: Vec<String> = [
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
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    }

    /// `decompress` of `file` against `base` into `out/restored`, plus `extra`.
    fn decompress(&self, file: &Path, base: &Path, extra: &[&str]) -> Vec<String> {
        let out = self.out.join("restored");
        let mut a: Vec<String> = [
            "decompress",
            s(file),
            "--base",
            s(base),
            "-o",
            s(&out),
            "-q",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    }
}

/// A case from owned arguments.
fn case(name: &str, args: Vec<String>, needles: &[&str]) -> BadRun {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    BadRun::new(name, &refs, needles)
}

/// Runs every case, checking that nothing under the fixture changes; returns how many ran.
fn run_all(fx: &Fixture, cases: &[BadRun]) -> usize {
    let mut names = std::collections::HashSet::new();
    for c in cases {
        assert!(names.insert(c.name.clone()), "duplicate case {}", c.name);
        c.check(fx.dir.path());
    }
    eprintln!("{} bad inputs refused cleanly", cases.len());
    cases.len()
}

/// The value of tensor `name` in a parsed safetensors header.
fn entry<'a>(h: &'a mut Value, name: &str) -> &'a mut Value {
    h.get_mut(name).unwrap()
}

/// `name`'s values with element 100 replaced by `v`.
fn poison(list: &mut [T], name: &str, v: f32) {
    let t = list.iter_mut().find(|t| t.name == name).unwrap();
    let mut vals = t.values();
    vals[100] = v;
    *t = T::float(name, t.dtype, &t.shape.clone(), &vals);
}

/// Safetensors files that are broken, and checkpoints that do not fit the base.
fn checkpoint_cases(fx: &Fixture) -> Vec<BadRun> {
    let good = fx.ft_bytes();
    let (header, data) = st_split(&good);
    let offsets = |h: &Value, name: &str| h[name]["data_offsets"].clone();
    let mut cases = Vec::new();
    let mut file_case = |name: &str, bytes: Vec<u8>, needles: &[&str]| {
        let d = fx.bad_file(name, &bytes);
        let mut n = vec![name];
        n.extend_from_slice(needles);
        cases.push(case(name, fx.compress(&fx.base, &d, &[]), &n));
    };
    file_case("ft-truncated", good[..good.len() - 7].to_vec(), &[]);
    file_case("ft-empty-file", vec![], &[]);
    file_case("ft-three-bytes", vec![1, 2, 3], &[]);
    file_case(
        "ft-garbage",
        b"this is not a safetensors file at all".to_vec(),
        &[],
    );
    file_case(
        "ft-header-length-overflows",
        [u64::MAX.to_le_bytes().to_vec(), vec![b'{'; 16]].concat(),
        &[],
    );
    file_case(
        "ft-header-past-end",
        [5000u64.to_le_bytes().to_vec(), b"{}      ".to_vec()].concat(),
        &[],
    );
    file_case(
        "ft-header-not-json",
        st_join("{\"a\": nope", &data),
        &["JSON"],
    );
    file_case("ft-header-not-object", st_join("[1, 2, 3]", &data), &[]);
    file_case(
        "ft-header-not-utf8",
        [8u64.to_le_bytes().to_vec(), vec![0xff; 8], data.clone()].concat(),
        &[],
    );
    file_case(
        "ft-overlapping-offsets",
        st_edit(&good, |h| {
            let o = offsets(h, K0);
            entry(h, Q0)["data_offsets"] = o;
        }),
        &[],
    );
    file_case(
        "ft-offsets-out-of-bounds",
        st_edit(&good, |h| {
            let n = data.len() as u64;
            entry(h, Q0)["data_offsets"] = json!([n, n + 8192]);
        }),
        &[],
    );
    file_case(
        "ft-offsets-reversed",
        st_edit(&good, |h| {
            let o = offsets(h, Q0);
            entry(h, Q0)["data_offsets"] = json!([o[1], o[0]]);
        }),
        &[],
    );
    file_case(
        "ft-data-not-covered",
        st_join(&header.to_string(), &[data.clone(), vec![0; 64]].concat()),
        &[],
    );
    file_case(
        "ft-hole-in-data",
        st_edit(&good, |h| {
            h.as_object_mut().unwrap().remove(K0);
        }),
        &[],
    );
    file_case(
        "ft-dtype-f8",
        st_edit(&good, |h| {
            entry(h, Q0)["dtype"] = json!("F8_E4M3");
            entry(h, Q0)["shape"] = json!([128, 64]);
        }),
        &[Q0, "F8_E4M3"],
    );
    file_case(
        "ft-dtype-int16",
        st_edit(&good, |h| entry(h, Q0)["dtype"] = json!("I16")),
        &[Q0, "I16"],
    );
    file_case(
        "ft-dtype-unknown",
        st_edit(&good, |h| entry(h, Q0)["dtype"] = json!("Q4_K")),
        &[Q0],
    );
    file_case(
        "ft-shape-vs-bytes",
        st_edit(&good, |h| entry(h, Q0)["shape"] = json!([64, 63])),
        &[Q0],
    );
    file_case(
        "ft-negative-shape",
        st_edit(&good, |h| entry(h, Q0)["shape"] = json!([-64, -64])),
        &[],
    );
    // Duplicate names: the header text holds one key twice.
    let text = header.to_string();
    let q = format!("\"{Q0}\":{}", header[Q0]);
    let dup = text.replacen(&q, &format!("{q},{q}"), 1);
    assert_ne!(dup, text);
    file_case("ft-duplicate-name", st_join(&dup, &data), &[Q0]);
    file_case(
        "ft-no-tensors",
        st_join(r#"{"__metadata__":{"format":"pt"}}"#, &[]),
        &["no tensors"],
    );

    // Sharded checkpoints whose index is wrong.
    let (_, f) = llama_pair(Dtype::F16, 0, 3);
    let sharded = |name: &str, edit: &dyn Fn(&Path)| {
        let d = write_checkpoint(&fx.path(&format!("bad/{name}")), &f, 2);
        edit(&d);
        d
    };
    let index_edit = |edit: fn(&mut Value)| {
        move |d: &Path| {
            let p = d.join("model.safetensors.index.json");
            let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            edit(&mut v);
            std::fs::write(&p, v.to_string()).unwrap();
        }
    };
    let d = sharded("shard-missing", &|d: &Path| {
        std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap()
    });
    cases.push(case(
        "shard-missing",
        fx.compress(&fx.base, &d, &[]),
        &["model-00002-of-00002.safetensors"],
    ));
    let d = sharded(
        "shard-lacks-tensor",
        &index_edit(|v| {
            v["weight_map"]["ghost.weight"] = json!("model-00001-of-00002.safetensors")
        }),
    );
    cases.push(case(
        "shard-lacks-tensor",
        fx.compress(&fx.base, &d, &[]),
        &["shard-lacks-tensor", "ghost.weight"],
    ));
    let d = sharded("shard-index-not-json", &|d: &Path| {
        std::fs::write(d.join("model.safetensors.index.json"), "{\"weight_map\": ").unwrap()
    });
    cases.push(case(
        "shard-index-not-json",
        fx.compress(&fx.base, &d, &[]),
        &["model.safetensors.index.json"],
    ));
    let d = sharded(
        "shard-index-escapes",
        &index_edit(|v| v["weight_map"][Q0] = json!("../../base/model.safetensors")),
    );
    cases.push(case(
        "shard-index-escapes",
        fx.compress(&fx.base, &d, &[]),
        &["shard-index-escapes"],
    ));

    // Checkpoints that are valid files but do not fit together.
    let mut pair_case = |name: &str, base: bool, needles: &[&str], edit: &dyn Fn(&mut Vec<T>)| {
        let d = fx.bad_ckpt(name, base, edit);
        let args = if base {
            fx.compress(&d, &fx.ft, &[])
        } else {
            fx.compress(&fx.base, &d, &[])
        };
        let mut n = vec![name];
        n.extend_from_slice(needles);
        cases.push(case(name, args, &n));
    };
    pair_case("ft-shape-mismatch", false, &[K0, "shape"], &|f| {
        f.iter_mut().find(|t| t.name == K0).unwrap().shape = vec![32, 128];
    });
    pair_case("ft-missing-tensor", false, &[UP0, "missing"], &|f| {
        f.retain(|t| t.name != UP0)
    });
    pair_case("ft-renamed-tensor", false, &[UP0, "missing"], &|f| {
        f.iter_mut().find(|t| t.name == UP0).unwrap().name = "model.layers.0.mlp.up.weight".into();
    });
    pair_case("ft-nan", false, &[V0, "element 100", "not finite"], &|f| {
        poison(f, V0, f32::NAN)
    });
    pair_case("ft-inf", false, &[V0, "element 100", "not finite"], &|f| {
        poison(f, V0, f32::NEG_INFINITY)
    });
    pair_case("base-nan", true, &[V0, "element 100", "base"], &|b| {
        poison(b, V0, f32::NAN)
    });
    pair_case("base-inf", true, &[V0, "element 100", "base"], &|b| {
        poison(b, V0, f32::INFINITY)
    });
    pair_case("base-shape-mismatch", true, &[Q0, "shape"], &|b| {
        b.iter_mut().find(|t| t.name == Q0).unwrap().shape = vec![16, 256];
    });
    pair_case(
        "base-other-model",
        true,
        &[
            "bert.encoder.layer.0.attention.self.query.weight",
            "missing",
        ],
        &|b| {
            for t in b.iter_mut() {
                t.name = t
                    .name
                    .replace("model.layers.", "bert.encoder.layer.")
                    .replace("self_attn.q_proj", "attention.self.query");
            }
        },
    );
    let empty = fx.bad_file("base-no-tensors", &st_join("{}", &[]));
    cases.push(case(
        "base-no-tensors",
        fx.compress(&empty, &fx.ft, &[]),
        &["base-no-tensors", "no tensors"],
    ));
    let nothing = fx.path("bad/dir-without-safetensors");
    std::fs::create_dir_all(&nothing).unwrap();
    std::fs::write(nothing.join("config.json"), "{}").unwrap();
    cases.push(case(
        "dir-without-safetensors",
        fx.compress(&fx.base, &nothing, &[]),
        &["dir-without-safetensors"],
    ));
    let two = fx.path("bad/dir-two-files");
    std::fs::create_dir_all(&two).unwrap();
    for n in ["a.safetensors", "b.safetensors"] {
        std::fs::write(two.join(n), &good).unwrap();
    }
    cases.push(case(
        "dir-two-files",
        fx.compress(&fx.base, &two, &[]),
        &["dir-two-files"],
    ));
    cases.push(case(
        "ft-nonexistent",
        fx.compress(&fx.base, &fx.path("nowhere"), &[]),
        &["nowhere"],
    ));
    cases.push(case(
        "base-nonexistent",
        fx.compress(&fx.path("nobase"), &fx.ft, &[]),
        &["nobase"],
    ));
    cases
}

#[test]
fn broken_and_mismatched_checkpoints() {
    let fx = Fixture::new();
    let n = run_all(&fx, &checkpoint_cases(&fx));
    assert!(n >= 35, "{n} cases");
}

/// Outputs that cannot or must not be written.
fn output_cases(fx: &Fixture) -> Vec<BadRun> {
    let sys = format!("/sys/udelta-test-{}", std::process::id());
    let x = fx.out.join("x.udelta");
    let ft_file = fx.ft.join("model.safetensors");
    let compress_to = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "compress",
            "--base",
            s(&fx.base),
            "--finetuned",
            s(&fx.ft),
            "-o",
            s(out),
            "--adapter",
            "cpu",
            "-q",
        ];
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let restore_to = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "decompress",
            s(&fx.good),
            "--base",
            s(&fx.base),
            "-o",
            s(out),
            "-q",
        ];
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let sys_file = PathBuf::from(format!("{sys}.udelta"));
    vec![
        case("out-dir-not-writable", compress_to(&sys_file, &[]), &[&sys]),
        case(
            "out-parent-missing",
            compress_to(&fx.out.join("no/such/dir/x.udelta"), &[]),
            &["x.udelta", "parent"],
        ),
        case(
            "out-is-a-directory",
            compress_to(&fx.out, &[]),
            &["out", "exists"],
        ),
        case(
            "out-is-a-directory-forced",
            compress_to(&fx.out, &["--force"]),
            &["out", "is a directory"],
        ),
        case(
            "out-is-the-finetuned-file",
            compress_to(&ft_file, &["--force"]),
            &["model.safetensors", "input"],
        ),
        case(
            "out-is-the-base-dir",
            {
                let mut a = compress_to(&fx.base, &["--force"]);
                a[4] = s(&ft_file).to_string();
                a
            },
            &["base", "directory"],
        ),
        case(
            "out-exists",
            compress_to(&fx.good, &[]),
            &["good.udelta", "exists"],
        ),
        case(
            "out-disk-full",
            // lossless embeddings: an output well above the 10 KiB limit
            compress_to(&x, &["--embeddings", "lossless"]),
            &["x.udelta", "File too large"],
        )
        .file_limit(20),
        case(
            "restore-into-the-base",
            restore_to(&fx.base, &["--force"]),
            &["base", "is the input"],
        ),
        case(
            "restore-over-the-udelta",
            restore_to(&fx.good, &["--force"]),
            &["good.udelta", "is a regular file"],
        ),
        case(
            "restore-over-a-parent-of-the-input",
            restore_to(fx.dir.path(), &["--force"]),
            &["contains the input"],
        ),
        case(
            "restore-exists",
            restore_to(&fx.out, &[]),
            &["out", "exists"],
        ),
        case(
            "restore-dir-not-writable",
            restore_to(Path::new(&sys), &[]),
            &[&sys],
        ),
        case(
            "restore-disk-full",
            restore_to(&fx.out.join("restored"), &[]),
            &["restored", "File too large"],
        )
        .file_limit(100),
        case(
            "restore-delta-only-disk-full",
            restore_to(&fx.out.join("restored"), &["--delta-only"]),
            &["restored", "File too large"],
        )
        .file_limit(20),
    ]
}

#[test]
fn outputs_that_cannot_or_must_not_be_written() {
    let fx = Fixture::new();
    assert!(run_all(&fx, &output_cases(&fx)) >= 15);
}

/// Every command-line parameter out of range, for every command.
fn parameter_cases(fx: &Fixture) -> Vec<BadRun> {
    let mut cases = Vec::new();
    let x = fx.out.join("x.udelta");
    for (name, extra, needle, code) in [
        ("sparsity-one", &["--sparsity", "1"][..], "--sparsity", 1),
        ("sparsity-zero", &["--sparsity", "0"], "--sparsity", 1),
        (
            "sparsity-negative",
            &["--sparsity", "-0.5"],
            "--sparsity",
            1,
        ),
        ("sparsity-nan", &["--sparsity", "NaN"], "--sparsity", 1),
        ("sparsity-text", &["--sparsity", "lots"], "--sparsity", 2),
        ("bits-zero", &["--bits", "0"], "--bits", 1),
        ("bits-nine", &["--bits", "9"], "--bits", 1),
        ("bits-negative", &["--bits", "-4"], "--bits", 2),
        ("step-negative", &["--step", "-1"], "--step", 1),
        ("step-nan", &["--step", "nan"], "--step", 1),
        (
            "step-past-one",
            &["--sparsity", "0.995", "--step", "0.01"],
            "above 1",
            1,
        ),
        ("factor-zero", &["--factor", "0"], "--factor", 1),
        ("factor-infinite", &["--factor", "inf"], "--factor", 1),
        ("factor-negative", &["--factor", "-2"], "--factor", 1),
        ("gamma-zero", &["--gamma", "0"], "--gamma", 1),
        ("gamma-negative", &["--gamma", "-1"], "--gamma", 1),
        ("gamma-nan", &["--gamma", "NaN"], "--gamma", 1),
        ("seed-negative", &["--seed", "-1"], "--seed", 2),
        ("gpu-mem-zero", &["--gpu-mem", "0"], "--gpu-mem", 2),
        ("gpu-mem-unit", &["--gpu-mem", "12 parsecs"], "--gpu-mem", 2),
        ("include-bad-regex", &["--include", "("], "regex", 1),
        ("exclude-bad-regex", &["--exclude", "[a-"], "regex", 1),
        (
            "model-name-for-two",
            &["--model-name", "m", "--finetuned", s(&fx.ft)],
            "--model-name",
            1,
        ),
    ] {
        let mut n = vec![needle];
        if code == 1 {
            n.push("x.udelta");
        }
        cases.push(
            case(
                &format!("compress-{name}"),
                fx.compress(&fx.base, &fx.ft, extra),
                &n,
            )
            .code(code),
        );
    }
    // Two fine-tunes whose names collide (the output is a directory).
    cases.push(case(
        "compress-two-finetunes-one-name",
        {
            let mut a = fx.compress(&fx.base, &fx.ft, &["--finetuned", s(&fx.ft)]);
            a[6] = s(&fx.out.join("many")).to_string();
            a
        },
        &["many", "ft"],
    ));
    cases.push(
        case(
            "compress-no-finetuned",
            vec![
                "compress".into(),
                "--base".into(),
                s(&fx.base).into(),
                "-o".into(),
                s(&x).into(),
            ],
            &["--finetuned"],
        )
        .code(2),
    );
    cases.push(BadRun::new(
        "compress-adapter-unknown",
        &[
            "compress",
            "--base",
            s(&fx.base),
            "--finetuned",
            s(&fx.ft),
            "-o",
            s(&x),
            "--adapter",
            "quantum",
        ],
        &["--adapter", "quantum", "x.udelta"],
    ));
    cases.push(
        BadRun::new(
            "compress-bad-fault-variable",
            &[
                "compress",
                "--base",
                s(&fx.base),
                "--finetuned",
                s(&fx.ft),
                "-o",
                s(&x),
                "--adapter",
                "auto",
                "-q",
            ],
            &["x.udelta", "UDELTA_GPU_FAULT"],
        )
        .env("UDELTA_GPU_FAULT", "meteor"),
    );
    let synth = fx.out.join("synth");
    for (name, extra, needle, code) in [
        ("preset", &["--preset", "huge"][..], "huge", 1),
        ("layers-zero", &["--layers", "0"], "layer", 1),
        ("layers-text", &["--layers", "many"], "--layers", 2),
        ("dtype", &["--dtype", "int8"], "--dtype", 1),
        ("dtype-f8", &["--dtype", "f8"], "--dtype", 1),
        ("models-zero", &["--models", "0"], "models", 1),
        ("shards-zero", &["--shards", "0"], "shards", 1),
        ("shards-too-many", &["--shards", "1000"], "shards", 1),
        ("seed-negative", &["--seed", "-3"], "-3", 2),
        ("vocab-growth-negative", &["--vocab-growth", "-1"], "-1", 2),
        ("layers-too-many", &["--layers", "5000"], "1024", 1),
        // 26 GB per checkpoint, 1001 checkpoints: refused before anything is written.
        (
            "no-space",
            &["--preset", "13b", "--models", "1000"],
            "free",
            1,
        ),
    ] {
        let mut a = vec!["synth", "--out", s(&synth), "-q"];
        a.extend_from_slice(extra);
        let mut n = vec![needle];
        if code == 1 {
            n.push("synth");
        }
        cases.push(BadRun::new(&format!("synth-{name}"), &a, &n).code(code));
    }
    cases.push(BadRun::new(
        "synth-existing-output",
        &["synth", "--out", s(fx.dir.path()), "-q"],
        &["already exists", "base"],
    ));
    cases.push(BadRun::new(
        "synth-out-is-a-file",
        &["synth", "--out", s(&fx.good), "-q"],
        &["good.udelta"],
    ));
    // decompress, inspect, rescale with inputs that do not exist or are not .udelta files.
    let restored = fx.out.join("restored");
    let ft_file = fx.ft.join("model.safetensors");
    for (name, input, needle) in [
        ("missing", fx.path("nowhere.udelta"), "nowhere.udelta"),
        ("directory", fx.ft.clone(), "ft"),
        ("safetensors", ft_file.clone(), "model.safetensors"),
    ] {
        cases.push(BadRun::new(
            &format!("decompress-input-{name}"),
            &[
                "decompress",
                s(&input),
                "--base",
                s(&fx.base),
                "-o",
                s(&restored),
                "-q",
            ],
            &[needle],
        ));
        cases.push(BadRun::new(
            &format!("inspect-input-{name}"),
            &["inspect", s(&input)],
            &[needle],
        ));
        cases.push(BadRun::new(
            &format!("rescale-input-{name}"),
            &["rescale", s(&fx.good), s(&input)],
            &[needle],
        ));
    }
    cases.push(BadRun::new(
        "decompress-base-missing",
        &[
            "decompress",
            s(&fx.good),
            "--base",
            s(&fx.path("nobase")),
            "-o",
            s(&restored),
            "-q",
        ],
        &["nobase"],
    ));
    cases.push(
        BadRun::new(
            "decompress-no-base",
            &["decompress", s(&fx.good), "-o", s(&restored)],
            &["--base"],
        )
        .code(2),
    );
    cases.push(BadRun::new("inspect-no-input", &["inspect"], &["INPUT"]).code(2));
    cases.push(BadRun::new("rescale-one-file", &["rescale", s(&fx.good)], &["FILES"]).code(2));
    cases.push(BadRun::new(
        "rescale-same-file-twice",
        &["rescale", s(&fx.good), s(&fx.good)],
        &["good.udelta", "names the same file"],
    ));
    cases.push(BadRun::new("unknown-command", &["explode"], &["explode"]).code(2));
    cases
}

#[test]
fn parameters_out_of_range_are_refused_before_any_work() {
    let fx = Fixture::new();
    assert!(run_all(&fx, &parameter_cases(&fx)) >= 40);
}

/// Corrupted `.udelta` files and wrong bases at decompress (through the command line).
fn udelta_cases(fx: &Fixture) -> Vec<BadRun> {
    let good = std::fs::read(&fx.good).unwrap();
    let n = good.len();
    let index_off = u64::from_le_bytes(good[n - 40..n - 32].try_into().unwrap()) as usize;
    let with = |pos: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[pos..pos + bytes.len()].copy_from_slice(bytes);
        b
    };
    let flip = |pos: usize| {
        let mut b = good.clone();
        b[pos] ^= 0x10;
        b
    };
    let files: Vec<(&str, Vec<u8>, &str)> = vec![
        ("udelta-empty", vec![], "truncated"),
        ("udelta-truncated-footer", good[..n - 5].to_vec(), "footer"),
        ("udelta-truncated-half", good[..n / 2].to_vec(), "truncated"),
        ("udelta-wrong-magic", with(0, b"XXXXXXXX"), "magic"),
        (
            "udelta-future-version",
            with(8, &4u32.to_le_bytes()),
            "version 4",
        ),
        (
            "udelta-future-footer-version",
            with(n - 12, &4u32.to_le_bytes()),
            "version",
        ),
        (
            "udelta-unknown-flags",
            with(12, &1u32.to_le_bytes()),
            "flags",
        ),
        ("udelta-bit-in-record", flip(20), "checksum"),
        ("udelta-bit-mid-records", flip(index_off / 2), "checksum"),
        ("udelta-bit-in-index", flip(index_off + 10), "checksum"),
        ("udelta-bit-in-footer", flip(n - 20), "corrupted"),
        (
            "udelta-appended-byte",
            [good.clone(), vec![0]].concat(),
            "footer",
        ),
    ];
    let mut cases = Vec::new();
    for (name, bytes, needle) in files {
        let p = fx.path(&format!("bad/{name}.udelta"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        cases.push(case(
            name,
            fx.decompress(&p, &fx.base, &[]),
            &[name, needle],
        ));
        // inspect reads the index only: record checksums are decompress's to check.
        if name.contains("record") {
            continue;
        }
        cases.push(BadRun::new(
            &format!("inspect-{name}"),
            &["inspect", s(&p)],
            &[name, needle],
        ));
    }
    let (other, _) = llama_pair(Dtype::F16, 0, 99);
    let wrong = write_checkpoint(&fx.path("bad/wrong-base"), &other, 1);
    for (tag, extra) in [("", &[][..]), ("-delta-only", &["--delta-only"][..])] {
        cases.push(case(
            &format!("wrong-base{tag}"),
            fx.decompress(&fx.good, &wrong, extra),
            &["wrong-base", "model.safetensors", "checksum", "--force"],
        ));
    }
    let lacking = fx.bad_ckpt("base-lacks-tensor", true, |b| b.retain(|t| t.name != Q0));
    cases.push(case(
        "base-lacks-tensor",
        fx.decompress(&fx.good, &lacking, &[]),
        &["base-lacks-tensor", Q0, "missing"],
    ));
    let reshaped = fx.bad_ckpt("base-reshaped", true, |b| {
        b.iter_mut().find(|t| t.name == Q0).unwrap().shape = vec![16, 256]
    });
    cases.push(case(
        "base-reshaped",
        fx.decompress(&fx.good, &reshaped, &[]),
        &["base-reshaped", Q0, "wrong base"],
    ));
    cases
}

#[test]
fn corrupted_files_and_wrong_bases_are_refused() {
    let fx = Fixture::new();
    assert!(run_all(&fx, &udelta_cases(&fx)) >= 25);
}

#[test]
fn a_wrong_base_is_accepted_with_force() {
    let fx = Fixture::new();
    let (other, _) = llama_pair(Dtype::F16, 0, 99);
    let wrong = write_checkpoint(&fx.path("wrong"), &other, 1);
    for extra in [&["--force"][..], &["--force", "--delta-only"]] {
        let restored = fx.path("restored");
        let mut a = fx.decompress(&fx.good, &wrong, extra);
        a[5] = s(&restored).to_string();
        ok(udelta(&a.iter().map(String::as_str).collect::<Vec<_>>()));
        let got = read_checkpoint(&restored);
        if extra.len() == 1 {
            // Unchanged tensors come from the base given: the wrong one was really applied.
            let norm = other
                .iter()
                .find(|t| t.name == "model.norm.weight")
                .unwrap();
            assert_eq!(got["model.norm.weight"].data, norm.data);
        } else {
            assert!(got.contains_key(Q0));
        }
        std::fs::remove_dir_all(&restored).unwrap();
    }
}

/// A tiny pair (two compressed tensors of different dtypes, an unchanged one, a raw one) and its
/// `.udelta`: small enough to corrupt every bit of it.
fn tiny_file(dir: &Path) -> (PathBuf, PathBuf) {
    let mut rng = Rng::new(7);
    let (mut base, mut ft) = (Vec::new(), Vec::new());
    for (name, dtype, shape) in [
        (Q0, Dtype::F16, vec![8, 32]),
        (UP0, Dtype::F32, vec![4, 16]),
        ("model.norm.weight", Dtype::BF16, vec![8]),
        ("lm_head.weight", Dtype::F16, vec![4, 4]),
    ] {
        let n: usize = shape.iter().product();
        let b: Vec<f32> = (0..n).map(|_| rng.normal(0.02)).collect();
        let f: Vec<f32> = if name == "model.norm.weight" {
            b.clone()
        } else {
            b.iter().map(|x| x + rng.laplace(1e-3)).collect()
        };
        base.push(T::float(name, dtype, &shape, &b));
        ft.push(T::float(name, dtype, &shape, &f));
    }
    let b = write_checkpoint(&dir.join("base"), &base, 1);
    let f = write_checkpoint(&dir.join("ft"), &ft, 1);
    let file = dir.join("tiny.udelta");
    ok(udelta(&[
        "compress",
        "--base",
        s(&b),
        "--finetuned",
        s(&f),
        "-o",
        s(&file),
        "--adapter",
        "cpu",
        "-q",
        "--sparsity",
        "0.8",
    ]));
    (b, file)
}

/// Decompresses `bytes` (written as `dir/c.udelta`) in-process; `Err` with the message, or
/// `Ok` when it succeeded. Either way nothing but `c.udelta` may remain in `dir`.
fn try_decompress(dir: &Path, base: &Path, bytes: &[u8], delta_only: bool) -> Result<(), String> {
    let file = dir.join("c.udelta");
    std::fs::write(&file, bytes).unwrap();
    let out = dir.join("r");
    let opts = DecompressOptions {
        delta_only,
        force: false,
        progress: false,
    };
    let r = decompress(&file, base, &out, &opts).map_err(|e| e.to_string());
    if r.is_ok() {
        std::fs::remove_dir_all(&out).unwrap();
    }
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "c.udelta")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    r
}

#[test]
fn every_flipped_bit_and_every_truncation_is_detected() {
    let fx = tempfile::tempdir().unwrap();
    let (base, file) = tiny_file(fx.path());
    let good = std::fs::read(&file).unwrap();
    let work = tempfile::tempdir().unwrap();
    for delta_only in [false, true] {
        try_decompress(work.path(), &base, &good, delta_only)
            .expect("the intact file decompresses");
    }
    let mut flips = 0;
    for i in 0..good.len() * 8 {
        let mut b = good.clone();
        b[i / 8] ^= 1 << (i % 8);
        let e = try_decompress(work.path(), &base, &b, false)
            .expect_err(&format!("flipped bit {i} (byte {}) not detected", i / 8));
        assert!(e.contains("c.udelta"), "bit {i}: {e}");
        flips += 1;
    }
    for len in 0..good.len() {
        let e = try_decompress(work.path(), &base, &good[..len], false)
            .expect_err(&format!("truncation to {len} bytes not detected"));
        assert!(e.contains("c.udelta"), "length {len}: {e}");
    }
    eprintln!(
        "{flips} flipped bits and {} truncations of a {}-byte file detected",
        good.len(),
        good.len()
    );
}

#[test]
fn truncation_at_every_section_boundary_is_detected() {
    let fx = Fixture::new();
    let good = std::fs::read(&fx.good).unwrap();
    let index = read_index(&fx.good);
    let n = good.len();
    let index_off = u64::from_le_bytes(good[n - 40..n - 32].try_into().unwrap()) as usize;
    let mut cuts = vec![0, 8, 12, 16, index_off, n - 40, n - 8, n - 1];
    let refs = |v: &Value| {
        ["data", "positions", "levels", "tail"]
            .iter()
            .filter_map(|k| v.get(*k).filter(|r| r.is_object()).cloned())
            .collect::<Vec<_>>()
    };
    for t in index["tensors"].as_array().unwrap() {
        for r in refs(t) {
            let (off, len) = (
                r["offset"].as_u64().unwrap() as usize,
                r["len"].as_u64().unwrap() as usize,
            );
            cuts.extend([off, off + len, off + len / 2]);
        }
    }
    cuts.sort();
    cuts.dedup();
    assert!(cuts.len() > 30, "{} boundaries", cuts.len());
    let work = tempfile::tempdir().unwrap();
    for delta_only in [false, true] {
        for &c in &cuts {
            let e = try_decompress(work.path(), &fx.base, &good[..c], delta_only)
                .expect_err(&format!("truncation at {c} not detected"));
            assert!(
                e.contains("c.udelta") && e.contains("truncated"),
                "{c}: {e}"
            );
        }
    }
}
