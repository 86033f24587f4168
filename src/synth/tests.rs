use super::*;
use safetensors::SafeTensors;

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// Every tensor of every `.safetensors` file in `dir`.
fn load_dir(dir: &Path) -> Tensors {
    let mut out = Tensors::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, v) in st.tensors() {
                let old = out.insert(
                    name.clone(),
                    (v.dtype(), v.shape().to_vec(), v.data().to_vec()),
                );
                assert!(old.is_none(), "{name} twice");
            }
        }
    }
    out
}

fn floats(ft: FloatType, bytes: &[u8]) -> Vec<f64> {
    let mut v = Vec::new();
    ft.decode_into(bytes, &mut v);
    v.into_iter().map(f64::from).collect()
}

fn tiny(models: usize) -> SynthOptions {
    SynthOptions {
        models,
        ..SynthOptions::new(Preset::Tiny)
    }
}

fn write(dir: &Path, opts: &SynthOptions) -> SynthReport {
    write_synthetic(dir, opts, &|_, _| {}).unwrap()
}

#[test]
fn llama_parameter_counts() {
    let count = |p, l| {
        preset_shapes(p, l)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum::<u64>()
    };
    assert_eq!(count(Preset::Llama7B, None), 6_738_415_616);
    assert_eq!(count(Preset::Llama13B, None), 13_015_864_320);
    // 2 * 32000 * 4096 + 2 * (4 * 4096^2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
    assert_eq!(count(Preset::Llama7B, Some(2)), 666_914_816);
    // tiny: 2 * 1024 * 256 + 2 * (4 * 256^2 + 3 * 256 * 688 + 2 * 256) + 256, plus 64 ids
    assert_eq!(count(Preset::Tiny, None), 2_106_624 + 64);
    let s7 = preset_shapes(Preset::Llama7B, None);
    assert_eq!(s7.len(), 2 + 32 * 9 + 1);
    assert_eq!(
        s7[0],
        ("model.embed_tokens.weight".to_string(), vec![32000, 4096])
    );
    assert_eq!(
        s7[5],
        (
            "model.layers.0.mlp.gate_proj.weight".to_string(),
            vec![11008, 4096]
        )
    );
    assert_eq!(
        s7[7],
        (
            "model.layers.0.mlp.down_proj.weight".to_string(),
            vec![4096, 11008]
        )
    );
    assert_eq!(
        s7[9],
        (
            "model.layers.0.post_attention_layernorm.weight".to_string(),
            vec![4096]
        )
    );
    assert_eq!(s7[290], ("lm_head.weight".to_string(), vec![32000, 4096]));
    assert!(!s7.iter().any(|(n, _)| n == "model.position_ids"));
    let t = preset_shapes(Preset::Tiny, Some(3));
    assert_eq!(
        t.last().unwrap(),
        &("model.position_ids".to_string(), vec![1, 64])
    );
    assert!(t
        .iter()
        .any(|(n, _)| n == "model.layers.2.self_attn.k_proj.weight"));
    assert!(t
        .iter()
        .all(|(_, s)| s.iter().product::<usize>() <= 1024 * 256));
}

#[test]
fn preset_names() {
    for p in [Preset::Tiny, Preset::Llama7B, Preset::Llama13B] {
        assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        assert_eq!(p.to_string(), p.name());
    }
    assert_eq!("7B".parse::<Preset>().unwrap(), Preset::Llama7B);
    let err = "70b".parse::<Preset>().unwrap_err();
    assert!(
        matches!(err, Error::Param(ref m) if m.contains("70b")),
        "{err}"
    );
}

#[test]
fn shards_are_contiguous_and_even() {
    for (preset, shards) in [
        (Preset::Llama7B, 2),
        (Preset::Llama13B, 3),
        (Preset::Llama7B, 7),
    ] {
        let sizes: Vec<u64> = preset_shapes(preset, None)
            .iter()
            .map(|(_, s)| 2 * s.iter().product::<usize>() as u64)
            .collect();
        let of = shard_plan(&sizes, shards);
        assert!(
            of.windows(2).all(|w| w[1] == w[0] || w[1] == w[0] + 1),
            "{of:?}"
        );
        assert_eq!((of[0], of[of.len() - 1]), (0, shards - 1));
        let total: u64 = sizes.iter().sum();
        let largest = *sizes.iter().max().unwrap();
        for k in 0..shards {
            let got: u64 = sizes
                .iter()
                .zip(&of)
                .filter(|(_, &s)| s == k)
                .map(|(b, _)| b)
                .sum();
            let ideal = total / shards as u64;
            assert!(
                got.abs_diff(ideal) <= largest,
                "{preset} shard {k}: {got} vs {ideal}"
            );
        }
    }
    // 7b in 2 shards: the cut lands within one layer's bytes of the middle.
    let sizes: Vec<u64> = preset_shapes(Preset::Llama7B, None)
        .iter()
        .map(|(_, s)| 2 * s.iter().product::<usize>() as u64)
        .collect();
    let of = shard_plan(&sizes, 2);
    let first: u64 = sizes
        .iter()
        .zip(&of)
        .filter(|(_, &s)| s == 0)
        .map(|(b, _)| b)
        .sum();
    assert!(
        first.abs_diff(sizes.iter().sum::<u64>() / 2) < 200 << 20,
        "{first}"
    );
    // As many shards as tensors: one each.
    assert_eq!(shard_plan(&[5, 1, 1, 9], 4), [0, 1, 2, 3]);
    assert_eq!(shard_plan(&[5, 1, 1, 9], 2), [0, 0, 0, 1]);
    assert_eq!(shard_plan(&[1, 1, 1, 1], 1), [0, 0, 0, 0]);
}

#[test]
fn tiny_files_load_with_expected_names_shapes_dtypes() {
    for dtype in [FloatType::F16, FloatType::BF16, FloatType::F32] {
        let dir = tempfile::tempdir().unwrap();
        let opts = SynthOptions {
            dtype,
            seed: 3,
            ..tiny(1)
        };
        let rep = write(dir.path(), &opts);
        assert_eq!(rep.base, dir.path().join("base"));
        assert_eq!(rep.finetuned, vec![dir.path().join("ft-1")]);
        assert_eq!(rep.params_per_model, 2_106_624 + 64);
        assert_eq!(
            rep.bytes_per_model,
            2_106_624 * dtype.size() as u64 + 64 * 8
        );
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["base", "ft-1"], "no temporaries left");
        for model in ["base", "ft-1"] {
            let d = dir.path().join(model);
            let mut files: Vec<_> = std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            files.sort();
            assert_eq!(files, ["config.json", "model.safetensors"]);
            let got = load_dir(&d);
            let want = preset_shapes(Preset::Tiny, None);
            assert_eq!(got.len(), want.len());
            for (name, shape) in &want {
                let (dt, sh, data) = &got[name];
                assert_eq!(sh, shape, "{name}");
                let want_dt = if name == "model.position_ids" {
                    Dtype::I64
                } else {
                    dtype.dtype()
                };
                assert_eq!(*dt, want_dt, "{name}");
                assert_eq!(
                    data.len(),
                    shape.iter().product::<usize>() * want_dt.bitsize() / 8
                );
            }
            let ids: Vec<i64> = got["model.position_ids"]
                .2
                .chunks(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(ids, (0..64).collect::<Vec<i64>>());
            let cfg: serde_json::Value =
                serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
            assert_eq!(cfg["synthetic"], true);
            assert_eq!(cfg["synthetic_preset"], "tiny");
            assert_eq!(cfg["synthetic_seed"], 3);
            assert_eq!(cfg["hidden_size"], 256);
            // Base weights look like N(0, 0.02), norms like 1 + N(0, 0.05).
            let q = floats(dtype, &got["model.layers.0.self_attn.q_proj.weight"].2);
            let sd = (q.iter().map(|x| x * x).sum::<f64>() / q.len() as f64).sqrt();
            assert!((sd - 0.02).abs() < 0.002, "{sd}");
            let n = floats(dtype, &got["model.layers.1.input_layernorm.weight"].2);
            let mean = n.iter().sum::<f64>() / n.len() as f64;
            assert!((mean - 1.0).abs() < 0.02, "{mean}");
        }
    }
}

#[test]
fn sharded_index_matches_files() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        shards: Some(3),
        vocab_growth: 5,
        ..tiny(2)
    };
    let rep = write(dir.path(), &opts);
    assert_eq!(rep.params_per_model, 2_106_624 + 64 + 2 * 5 * 256);
    for (i, d) in std::iter::once(&rep.base).chain(&rep.finetuned).enumerate() {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("model.safetensors.index.json")).unwrap())
                .unwrap();
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), preset_shapes(Preset::Tiny, None).len());
        let mut total = 0u64;
        let mut files = std::collections::BTreeSet::new();
        for (name, file) in map {
            let file = file.as_str().unwrap();
            files.insert(file.to_string());
            let bytes = std::fs::read(d.join(file)).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            total += st
                .tensor(name)
                .unwrap_or_else(|_| panic!("{name} not in {file}"))
                .data()
                .len() as u64;
        }
        assert_eq!(index["metadata"]["total_size"].as_u64().unwrap(), total);
        if i > 0 {
            assert_eq!(total, rep.bytes_per_model);
        }
        assert_eq!(
            files.into_iter().collect::<Vec<_>>(),
            (1..=3)
                .map(|k| format!("model-{k:05}-of-00003.safetensors"))
                .collect::<Vec<_>>()
        );
        // Every tensor is in exactly one file; the files hold nothing else.
        assert_eq!(load_dir(d).len(), map.len());
    }
}

fn moments(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let m2 = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let m4 = v.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n;
    (m2.sqrt(), m4 / (m2 * m2) - 3.0)
}

/// Largest singular value of the row-major `[r, c]` matrix `a` (power iteration).
fn top_singular(a: &[f64], r: usize, c: usize) -> f64 {
    let mut v: Vec<f64> = (0..c).map(|j| 1.0 + (j % 7) as f64 * 0.1).collect();
    let mut sigma = 0.0;
    for _ in 0..60 {
        let u: Vec<f64> = (0..r)
            .map(|i| {
                a[i * c..(i + 1) * c]
                    .iter()
                    .zip(&v)
                    .map(|(x, y)| x * y)
                    .sum()
            })
            .collect();
        let mut w = vec![0.0; c];
        for i in 0..r {
            for j in 0..c {
                w[j] += a[i * c + j] * u[i];
            }
        }
        let nw = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        sigma = nw.sqrt();
        v = w.into_iter().map(|x| x / nw).collect();
    }
    sigma
}

#[test]
fn delta_statistics_resemble_fine_tunes() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        vocab_growth: 3,
        seed: 11,
        ..tiny(2)
    };
    let rep = write(dir.path(), &opts);
    let base = load_dir(&rep.base);
    let fts: Vec<Tensors> = rep.finetuned.iter().map(|d| load_dir(d)).collect();
    let f16 = FloatType::F16;
    let delta = |ft: &Tensors, name: &str| -> Vec<f64> {
        let b = floats(f16, &base[name].2);
        let f = floats(f16, &ft[name].2);
        b.iter().zip(&f).map(|(b, f)| f - b).collect()
    };
    let mut stds = Vec::new();
    let mut energy = [0.0f64; 2];
    for (name, shape) in preset_shapes(Preset::Tiny, None) {
        if !name.ends_with("_proj.weight") {
            continue;
        }
        for (m, ft) in fts.iter().enumerate() {
            let d = delta(ft, &name);
            energy[m] += d.iter().map(|x| x * x).sum::<f64>();
            let (sd, kurt) = moments(&d);
            let zeros = d.iter().filter(|&&x| x == 0.0).count() as f64 / d.len() as f64;
            assert!(zeros < 0.05, "{name}: {zeros} of the delta rounded away");
            assert!(kurt > 1.5, "{name} ft-{}: excess kurtosis {kurt}", m + 1);
            assert!((1e-4..6e-3).contains(&sd), "{name}: std {sd}");
            // Low-rank structure: the top singular value stands well above the noise edge
            // (about sd * (sqrt(R) + sqrt(C)) for i.i.d. noise of the same energy).
            let (r, c) = (shape[0], shape[1]);
            let edge = sd * ((r as f64).sqrt() + (c as f64).sqrt());
            let s1 = top_singular(&d, r, c);
            let max = d.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            eprintln!(
                "{name} ft-{}: std {sd:.3e} excess kurtosis {kurt:.2} max/std {:.1} zeros {zeros:.4} sigma1/edge {:.2}",
                m + 1,
                max / sd,
                s1 / edge
            );
            assert!(s1 > 2.0 * edge, "{name}: sigma_1 {s1} vs noise edge {edge}");
            if m == 0 {
                stds.push(sd);
            }
        }
    }
    let (lo, hi) = stds
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
    assert!(hi / lo > 2.0, "per-tensor scales {lo}..{hi}");
    // ft-2's deltas are about 1.3x ft-1's.
    let ratio = (energy[1] / energy[0]).sqrt();
    assert!((1.15..1.45).contains(&ratio), "{ratio}");
    // Deltas of the two fine-tunes are different draws.
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_ne!(fts[0][q].2, fts[1][q].2);

    for ft in &fts {
        // Exactly-zero delta tensor and the int64 passthrough.
        assert_eq!(ft["model.norm.weight"].2, base["model.norm.weight"].2);
        assert_eq!(ft["model.position_ids"].2, base["model.position_ids"].2);
        // Other norms: tiny but present deltas.
        let d = delta(ft, "model.layers.0.input_layernorm.weight");
        assert!(d.iter().any(|&x| x != 0.0) && d.iter().all(|x| x.abs() < 0.02));
        // Vocabulary growth: 3 new rows, the first V rows are base + small delta.
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            assert_eq!(base[name].1, [1024, 256]);
            assert_eq!(ft[name].1, [1027, 256]);
            let f = floats(f16, &ft[name].2);
            let b = floats(f16, &base[name].2);
            let d: Vec<f64> = b.iter().zip(&f).map(|(b, f)| f - b).collect();
            let (sd, _) = moments(&d);
            assert!(sd > 3e-5 && sd < 2e-3, "{name}: delta std {sd}");
            let (new_sd, _) = moments(&f[1024 * 256..]);
            assert!(
                (new_sd - 0.02).abs() < 0.004,
                "{name}: new rows std {new_sd}"
            );
        }
    }
    assert_ne!(
        fts[0]["lm_head.weight"].2[1024 * 512..],
        fts[1]["lm_head.weight"].2[1024 * 512..]
    );
}

#[test]
fn bytes_do_not_depend_on_thread_count() {
    let opts = SynthOptions {
        shards: Some(2),
        vocab_growth: 2,
        dtype: FloatType::BF16,
        seed: 5,
        ..tiny(2)
    };
    let run = |threads: usize| {
        let dir = tempfile::tempdir().unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| write(dir.path(), &opts));
        let mut files = BTreeMap::new();
        for m in ["base", "ft-1", "ft-2"] {
            for e in std::fs::read_dir(dir.path().join(m)).unwrap() {
                let p = e.unwrap().path();
                files.insert(
                    format!("{m}/{}", p.file_name().unwrap().to_string_lossy()),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
        files
    };
    let one = run(1);
    let two = run(2);
    assert_eq!(one.len(), 3 * 4);
    assert!(one == two, "files differ between 1 and 2 threads");
    let other = {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            &SynthOptions {
                seed: 6,
                ..opts.clone()
            },
        );
        std::fs::read(dir.path().join("ft-1/model-00001-of-00002.safetensors")).unwrap()
    };
    assert_ne!(other, one["ft-1/model-00001-of-00002.safetensors"]);
}

#[test]
fn progress_and_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let calls = std::cell::RefCell::new(Vec::new());
    let rep = write_synthetic(dir.path(), &tiny(1), &|a, b| {
        calls.borrow_mut().push((a, b))
    })
    .unwrap();
    let calls = calls.into_inner();
    let total = 2 * rep.bytes_per_model;
    assert_eq!(calls.first(), Some(&(0, total)));
    assert_eq!(calls.last(), Some(&(total, total)));
    assert!(calls
        .windows(2)
        .all(|w| w[0].0 <= w[1].0 && w[1].1 == total));
    // Writing again is refused unless asked to replace, and then leaves no stale shard.
    let err = write_synthetic(dir.path(), &tiny(1), &|_, _| {}).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert!(err.to_string().contains("base"), "{err}");
    write(
        dir.path(),
        &SynthOptions {
            shards: Some(2),
            replace: true,
            ..tiny(1)
        },
    );
    assert!(!dir.path().join("base/model.safetensors").exists());

    for bad in [
        SynthOptions {
            models: 0,
            ..tiny(1)
        },
        SynthOptions {
            shards: Some(0),
            ..tiny(1)
        },
        SynthOptions {
            shards: Some(100),
            ..tiny(1)
        },
        SynthOptions {
            layers: Some(0),
            ..tiny(1)
        },
        SynthOptions {
            layers: Some(MAX_LAYERS + 1),
            ..tiny(1)
        },
    ] {
        let err = write_synthetic(dir.path(), &bad, &|_, _| {}).unwrap_err();
        assert!(matches!(err, Error::Param(_)), "{bad:?}: {err}");
    }
}

#[test]
fn llama3_8b_preset_shapes_names_and_defaults() {
    let (h, kv, i, v) = (4096usize, 1024usize, 14336usize, 128256usize);
    let mut want: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..32 {
        let p = format!("model.layers.{l}");
        want.extend([
            (format!("{p}.self_attn.q_proj.weight"), vec![h, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
        ]);
    }
    want.push(("model.norm.weight".into(), vec![h]));
    want.push(("lm_head.weight".into(), vec![v, h]));
    let got = preset_shapes(Preset::Llama3_8B, None);
    assert_eq!(got, want);
    // Meta-Llama-3-8B's published parameter count.
    let params: u64 = got
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    assert_eq!(params, 8_030_261_248);
    // With 2 layers: the same names for layers 0 and 1.
    let two = preset_shapes(Preset::Llama3_8B, Some(2));
    assert_eq!(two.len(), 2 + 2 * 9 + 1);
    assert_eq!(two[..19], want[..19]);
    assert_eq!(two[19..], want[want.len() - 2..]);

    assert_eq!("llama3-8b".parse::<Preset>().unwrap(), Preset::Llama3_8B);
    assert_eq!(Preset::Llama3_8B.default_shards(), 4);
    let opts = SynthOptions::new(Preset::Llama3_8B);
    assert_eq!(opts.dtype, FloatType::BF16);
    assert_eq!(SynthOptions::new(Preset::Llama7B).dtype, FloatType::F16);
    let (dims, _) = plan(Preset::Llama3_8B, Some(2), 1);
    let cfg = config_json(&opts, &dims, Some(1));
    assert_eq!(cfg["num_attention_heads"], 32);
    assert_eq!(cfg["num_key_value_heads"], 8);
    assert_eq!(cfg["intermediate_size"], 14336);
    assert_eq!(cfg["vocab_size"], 128256);
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert_eq!(cfg["num_hidden_layers"], 2);
}

/// Root mean square of each row of a `[rows, cols]` delta.
fn row_rms(d: &[f64], cols: usize) -> Vec<f64> {
    d.chunks(cols)
        .map(|r| (r.iter().map(|x| x * x).sum::<f64>() / cols as f64).sqrt())
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

#[test]
fn seen_token_rows_move_more_than_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        dtype: FloatType::F32,
        seed: 21,
        ..tiny(2)
    };
    let rep = write(dir.path(), &opts);
    let base = load_dir(&rep.base);
    let (vocab, cols) = (1024usize, 256usize);
    // Expected number of seen rows, recomputed from the model's definition in f64.
    let harmonic = (vocab as f64).ln() + 0.577_215_664_9;
    let p: Vec<f64> = (0..vocab)
        .map(|r| 1.0 - (-0.2 * vocab as f64 / (harmonic * (r + 1) as f64)).exp())
        .collect();
    let expected: f64 = p.iter().sum();
    let sd = p.iter().map(|q| q * (1.0 - q)).sum::<f64>().sqrt();
    let mut seen_sets = Vec::new();
    for ft_dir in &rep.finetuned {
        let ft = load_dir(ft_dir);
        let mut seen_of = Vec::new();
        for (name, factor) in [
            ("model.embed_tokens.weight", 1.0 / 0.02),
            ("lm_head.weight", 1.0 / 0.1),
        ] {
            let b = floats(FloatType::F32, &base[name].2);
            let f = floats(FloatType::F32, &ft[name].2);
            let d: Vec<f64> = b.iter().zip(&f).map(|(b, f)| f - b).collect();
            let rms = row_rms(&d, cols);
            assert!(rms.iter().all(|&x| x > 0.0), "{name}: every row drifts");
            // The two populations are far apart: split at the geometric middle.
            let lo = rms.iter().cloned().fold(f64::MAX, f64::min);
            let hi = rms.iter().cloned().fold(0.0, f64::max);
            let cut = (lo * hi).sqrt();
            let seen: Vec<bool> = rms.iter().map(|&x| x > cut).collect();
            let n_seen = seen.iter().filter(|&&s| s).count() as f64;
            assert!(
                (n_seen - expected).abs() < 4.0 * sd,
                "{name}: {n_seen} seen rows, expected {expected:.1} +- {sd:.1}"
            );
            let pick = |want: bool| -> Vec<f64> {
                rms.iter()
                    .zip(&seen)
                    .filter(|(_, &s)| s == want)
                    .map(|(x, _)| *x)
                    .collect()
            };
            let ratio = median(&pick(true)) / median(&pick(false));
            assert!(
                (0.75 * factor..1.33 * factor).contains(&ratio),
                "{name}: seen rows move {ratio:.1}x the others, expected {factor}"
            );
            // Frequent tokens (low ids) are seen far more often than rare ones.
            let frac = |a: usize, z: usize| {
                seen[a..z].iter().filter(|&&s| s).count() as f64 / (z - a) as f64
            };
            assert!(frac(0, vocab / 8) > 4.0 * frac(vocab / 2, vocab), "{name}");
            seen_of.push(seen);
        }
        assert_eq!(
            seen_of[0], seen_of[1],
            "embed_tokens and lm_head see the same tokens"
        );
        seen_sets.push(seen_of.remove(0));
    }
    assert_ne!(
        seen_sets[0], seen_sets[1],
        "each fine-tune has its own data"
    );
}

#[test]
fn family_presets_have_the_published_parameter_counts() {
    let count = |p: Preset| {
        preset_shapes(p, None)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum::<u64>()
    };
    // The counts the model cards / config-derived totals publish.
    for (preset, params) in [
        (Preset::Mistral7B, 7_241_732_096u64),
        (Preset::Mixtral8x7B, 46_702_792_704),
        (Preset::Qwen3Moe, 30_532_122_624),
        (Preset::Phi3Mini, 3_821_079_552),
        (Preset::Gemma2_2B, 2_614_341_888),
        (Preset::DeepSeekV2Lite, 15_706_484_224),
    ] {
        assert_eq!(count(preset), params, "{preset}");
        assert_eq!(preset.name().parse::<Preset>().unwrap(), preset);
    }
    let err = "mixtral".parse::<Preset>().unwrap_err().to_string();
    assert!(
        err.contains("mixtral-8x7b") && err.contains("deepseek-v2-lite"),
        "{err}"
    );
}

#[test]
fn shrink_divides_sizes_and_keeps_names_and_counts() {
    let full = preset_shapes(Preset::Qwen3Moe, Some(1));
    let small = scaled_preset_shapes(Preset::Qwen3Moe, Some(1), 32);
    let names = |v: &[(String, Vec<usize>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&full), names(&small));
    let shape =
        |v: &[(String, Vec<usize>)], n: &str| v.iter().find(|(m, _)| m == n).unwrap().1.clone();
    let gate_up = "model.layers.0.mlp.experts.gate_up_proj";
    assert_eq!(shape(&full, gate_up), [128, 1536, 2048]);
    // experts kept, F = 768 / 32, H = 2048 / 32
    assert_eq!(shape(&small, gate_up), [128, 48, 64]);
    // 32 heads of 128 / 32 = 4
    assert_eq!(
        shape(&small, "model.layers.0.self_attn.q_proj.weight"),
        [128, 64]
    );
    assert_eq!(shape(&small, "model.layers.0.mlp.gate.weight"), [128, 64]);
    // LLaMA-layout presets too; 1 keeps the published shapes.
    assert_eq!(
        scaled_preset_shapes(Preset::Llama7B, Some(1), 1),
        preset_shapes(Preset::Llama7B, Some(1))
    );
    let m = scaled_preset_shapes(Preset::Mistral7B, Some(1), 32);
    assert_eq!(
        shape(&m, "model.layers.0.self_attn.k_proj.weight"),
        [32, 128]
    );
    assert_eq!(shape(&m, "model.embed_tokens.weight"), [1000, 128]);
}
