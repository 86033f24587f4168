//! `compress --dry-run` (the plan before the work) and `compress --target-size` /
//! `--target-ratio` (a size asked for instead of a sparsity).

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A synthetic pair of `preset` with `layers` layers under `dir`: `(base, ft-1)`.
fn synth(dir: &Path, preset: &str, layers: &str) -> (PathBuf, PathBuf) {
    let out = dir.join("m");
    ok(udelta(&[
        "synth",
        "--out",
        s(&out),
        "--preset",
        preset,
        "--layers",
        layers,
        "-q",
    ]));
    (out.join("base"), out.join("ft-1"))
}

/// The common `compress` arguments (`tests/common`) with `--json`.
fn json_args<'a>(base: &'a Path, ft: &'a Path, out: &'a Path) -> Vec<&'a str> {
    let mut args = compress_args(base, ft, out);
    args.push("--json");
    args
}

/// Runs `compress` with `extra` arguments and returns its JSON report.
fn compress(base: &Path, ft: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args = json_args(base, ft, out);
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(udelta(&args))).unwrap()
}

/// The tiny preset's compressed tensors by the default selection: per layer the 7 LLaMA
/// projections, and the embedding-like tables (written out by hand from the preset's names).
fn tiny_compressed(layers: usize) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "lm_head.weight".to_string(),
    ];
    for l in 0..layers {
        for p in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
        ] {
            names.push(format!("model.layers.{l}.{p}.weight"));
        }
        for p in ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] {
            names.push(format!("model.layers.{l}.{p}.weight"));
        }
    }
    names.sort();
    names
}

#[test]
fn dry_run_plans_the_tiny_preset_writes_nothing_and_estimates_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = synth(dir.path(), "tiny", "2");
    let file = dir.path().join("out.udelta");
    let before = snapshot(dir.path());
    let mut args = json_args(&base, &ft, &file);
    args.push("--dry-run");
    let plan: Value = serde_json::from_str(&ok(udelta(&args))).unwrap();
    assert_eq!(snapshot(dir.path()), before, "the dry run wrote something");
    let m = &plan["models"][0];
    let tensors = m["tensors"].as_array().unwrap();
    let with = |action: &str| -> Vec<String> {
        let mut v: Vec<String> = tensors
            .iter()
            .filter(|t| t["action"] == action)
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(with("compress"), tiny_compressed(2));
    // The norms are compared at run time; tiny's final norm and position_ids equal the base's.
    let compared = with("compare");
    assert_eq!(compared.len(), 2 * 2 + 2, "{compared:?}");
    for t in tensors.iter().filter(|t| t["action"] == "compare") {
        let same =
            ["model.norm.weight", "model.position_ids"].contains(&t["name"].as_str().unwrap());
        assert_eq!(t["sample_differs"], !same, "{t}");
    }
    assert!(with("store").is_empty());
    // Parameter counts: tiny is H = 256, F = 688, V = 1024.
    let (h, f, v) = (256u64, 688u64, 1024u64);
    let compressed = 2 * (4 * h * h + 3 * h * f) + 2 * v * h;
    assert_eq!(m["params"]["compressed"], compressed);
    assert_eq!(m["params"]["stored"], 2 * 2 * h);
    assert_eq!(m["params"]["unchanged"], h + 64);
    assert!(m["warning"].is_null());
    // Against the real file.
    let report = compress(&base, &ft, &file, &[]);
    let real = report["file_bytes"].as_f64().unwrap();
    let est = m["estimated_bytes"].as_f64().unwrap();
    let bound = plan["estimate_bound"].as_f64().unwrap();
    assert!(
        (est / real - 1.0).abs() <= bound,
        "estimate {est} vs file {real} (bound {bound})"
    );
    let range = m["estimated_range"].as_array().unwrap();
    assert!(range[0].as_f64().unwrap() <= real && real <= range[1].as_f64().unwrap());
}

#[test]
fn dry_run_warns_naming_the_largest_stored_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = synth(dir.path(), "tiny", "1");
    let file = dir.path().join("out.udelta");
    let mut args = json_args(&base, &ft, &file);
    args.retain(|a| *a != "--json");
    // The embeddings stored whole with the two layer norms: 2 x 1024 x 256 + 2 x 256 =
    // 524,800 of 1,315,648 parameters (linears 4 x 256^2 + 3 x 256 x 688, embeddings, three
    // norms of 256, position_ids 64): 39.9 %.
    args.extend(["--dry-run", "--embeddings", "lossless"]);
    let text = ok(udelta(&args));
    let warning = text
        .lines()
        .find(|l| l.starts_with("warning:"))
        .expect(&text);
    assert!(warning.contains("39.9 %"), "{warning}");
    let largest = warning.find("model.embed_tokens.weight").expect(warning);
    assert!(warning.contains("lm_head.weight"), "{warning}");
    assert!(warning.contains("--include"), "{warning}");
    // Norms are named after the tables (largest first).
    if let Some(norm) = warning.find("layernorm") {
        assert!(norm > largest, "{warning}");
    }
    assert!(!file.exists());
    assert!(!text.contains("the output exists"), "{text}");
    std::fs::write(&file, b"x").unwrap();
    let text = ok(udelta(&args));
    assert!(
        text.contains("note: the output exists: the run needs --force"),
        "{text}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    std::fs::remove_file(&file).unwrap();
    // Without the option nothing is stored beyond the norms: no warning.
    args.truncate(args.len() - 2);
    assert!(!ok(udelta(&args)).contains("warning:"));
}

#[test]
fn target_ratio_meets_the_ratio_on_a_small_preset() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = synth(dir.path(), "tiny", "4");
    let file = dir.path().join("out.udelta");
    for want in [20.0f64, 50.0] {
        let r = want.to_string();
        let report = compress(&base, &ft, &file, &["--target-ratio", &r, "--force"]);
        let ratio = report["ratio_file"].as_f64().unwrap();
        // The size model's error: the coder's streams within 0.5 % of its expectation (random
        // masks, `codec::estimate`'s test) and the index entries by constants, which weigh
        // more in a 150 kB file than in 7b's 27 MB. Measured 0.01 % at 20x and 0.10 % at 50x
        // (2026-12-06); 1 % leaves room and is a third of the acceptance bound at 7b (3 %).
        assert!(
            (ratio / want - 1.0).abs() < 0.01,
            "ratio {ratio} for {want}"
        );
        let target = &report["target"];
        assert_eq!(target["file_bytes"], report["file_bytes"]);
        let s = target["sparsity"].as_f64().unwrap();
        assert_eq!(report["sparsity"].as_f64().unwrap(), s);
        assert!(s > 0.5 && s < 0.999, "{s}");
        // The file was made at the chosen sparsity: the same as asking for it directly.
        let again = dir.path().join("again.udelta");
        let direct = compress(
            &base,
            &ft,
            &again,
            &["--sparsity", &s.to_string(), "--force"],
        );
        assert_eq!(direct["file_bytes"], report["file_bytes"]);
    }
    // A higher ratio needs a higher sparsity.
    let lo = compress(&base, &ft, &file, &["--target-ratio", "20", "--force"]);
    let hi = compress(&base, &ft, &file, &["--target-ratio", "50", "--force"]);
    assert!(hi["sparsity"].as_f64() > lo["sparsity"].as_f64());
}

#[test]
fn target_size_in_bytes_and_the_dry_run_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = synth(dir.path(), "tiny", "2");
    let file = dir.path().join("out.udelta");
    let report = compress(&base, &ft, &file, &["--target-size", "60KB"]);
    let bytes = report["file_bytes"].as_f64().unwrap();
    // Measured +0.44 % (2026-12-06): at 70x the index is a larger share of the file.
    assert!((bytes / 60_000.0 - 1.0).abs() < 0.02, "{bytes}");
    assert_eq!(report["target"]["target_bytes"], 60_000);
    let text_args = {
        let mut a = json_args(&base, &ft, &file);
        a.retain(|x| *x != "--json");
        a.extend(["--target-size", "60KB", "--force"]);
        a
    };
    let text = ok(udelta(&text_args));
    assert!(text.contains("target 60000 bytes: sparsity"), "{text}");
    // The dry run plans with the sparsity the target gives (from samples: close, not equal).
    let mut args = json_args(&base, &ft, &file);
    args.extend(["--dry-run", "--target-size", "60KB"]);
    let plan: Value = serde_json::from_str(&ok(udelta(&args))).unwrap();
    let planned = plan["models"][0]["sparsity"].as_f64().unwrap();
    let chosen = report["sparsity"].as_f64().unwrap();
    assert!((planned - chosen).abs() < 0.02, "{planned} vs {chosen}");
}

#[test]
fn target_options_are_checked_before_any_output() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = synth(dir.path(), "tiny", "1");
    let file = dir.path().join("out.udelta");
    let run = |extra: &[&str]| {
        let mut args = json_args(&base, &ft, &file);
        args.extend_from_slice(extra);
        udelta(&args)
    };
    let clash = run(&["--target-ratio", "50", "--sparsity", "0.9"]);
    assert_eq!(clash.status.code(), Some(2));
    let err = String::from_utf8_lossy(&clash.stderr);
    assert!(
        err.contains("--target-ratio") && err.contains("--sparsity"),
        "{err}"
    );
    let both = run(&["--target-ratio", "50", "--target-size", "1MB"]);
    assert_eq!(both.status.code(), Some(2));
    fails(
        run(&["--target-ratio", "0.5"]),
        &["--target-ratio 0.5", "> 1"],
    );
    // Far beyond what any sparsity reaches: refused, and nothing is left behind.
    fails(
        run(&["--target-size", "100"]),
        &["outside the", "not written"],
    );
    assert!(!file.exists());
    let second = dir.path().join("m/ft-2");
    std::fs::create_dir_all(&second).unwrap();
    let mut args = json_args(&base, &ft, dir.path());
    args.extend(["--finetuned", s(&ft), "--target-ratio", "20"]);
    fails(udelta(&args), &["single --finetuned"]);
}

#[test]
fn dry_run_estimates_the_real_minilm_file_within_its_bound() {
    let (base, ft) = minilm();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("minilm.udelta");
    for extra in [&[][..], &["--embeddings", "lossless"][..]] {
        let mut args = json_args(&base, &ft, &file);
        args.extend_from_slice(extra);
        args.push("--dry-run");
        let plan: Value = serde_json::from_str(&ok(udelta(&args))).unwrap();
        let m = &plan["models"][0];
        // 6 layers x 6 linears, and the word, position and token-type embeddings.
        let compressed = m["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["action"] == "compress")
            .count();
        assert_eq!(compressed, if extra.is_empty() { 39 } else { 36 });
        // The stored share passes 5 % only when the embeddings are stored.
        assert_eq!(m["warning"].is_null(), extra.is_empty(), "{}", m["warning"]);
        let mut extra_force = extra.to_vec();
        extra_force.push("--force");
        let real = compress(&base, &ft, &file, &extra_force)["file_bytes"]
            .as_f64()
            .unwrap();
        let est = m["estimated_bytes"].as_f64().unwrap();
        let bound = plan["estimate_bound"].as_f64().unwrap();
        assert!(
            (est / real - 1.0).abs() <= bound,
            "{extra:?}: {est} vs {real}"
        );
    }
}
