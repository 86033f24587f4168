//! Trace-norm rescaling (step 5): several fine-tunes compressed together get
//! `gamma_m = min T / T_m` within 1% of the value from exact nuclear norms (nalgebra SVD of the
//! restored deltas), and `rescale` over files compressed separately reproduces the joint run.

mod common;
use common::*;
use nalgebra::DMatrix;
use std::path::Path;

/// Exact `T_m`: the sum of nuclear norms of the 2-D compressed deltas before gamma, from
/// `decompress --delta-only` (which writes `gamma * rescale * value`).
fn exact_trace_norm(file: &Path, base: &Path, dir: &Path, gamma: f64) -> f64 {
    let out = dir.join(format!(
        "{}-deltas",
        file.file_stem().unwrap().to_string_lossy()
    ));
    ok(udelta(&[
        "decompress",
        s(file),
        "--base",
        s(base),
        "-o",
        s(&out),
        "--delta-only",
        "-q",
    ]));
    read_checkpoint(&out)
        .values()
        .filter(|t| t.shape.len() == 2)
        .map(|t| {
            let m = DMatrix::from_row_slice(
                t.shape[0],
                t.shape[1],
                &t.values()
                    .iter()
                    .map(|&v| v as f64 / gamma)
                    .collect::<Vec<_>>(),
            );
            m.singular_values().sum()
        })
        .sum()
}

fn index_of(file: &Path) -> (f64, f64) {
    let i = read_index(file);
    (
        i["model"]["trace_norm"].as_f64().unwrap(),
        i["model"]["gamma"].as_f64().unwrap(),
    )
}

#[test]
fn joint_gamma_matches_exact_nuclear_norms_and_rescale_reproduces_it() {
    let dir = tempfile::tempdir().unwrap();
    ok(udelta(&[
        "synth",
        "--out",
        s(dir.path()),
        "--preset",
        "tiny",
        "--models",
        "3",
        "-q",
    ]));
    let base = dir.path().join("base");
    let fts: Vec<_> = (1..=3)
        .map(|m| dir.path().join(format!("ft-{m}")))
        .collect();
    let joint = dir.path().join("joint");
    let mut args = vec![
        "compress",
        "--base",
        s(&base),
        "-o",
        s(&joint),
        "-q",
        "--adapter",
        "cpu",
    ];
    for f in &fts {
        args.extend(["--finetuned", s(f)]);
    }
    ok(udelta(&args));
    let files: Vec<_> = (1..=3)
        .map(|m| joint.join(format!("ft-{m}.udelta")))
        .collect();
    let (norms, gammas): (Vec<f64>, Vec<f64>) = files.iter().map(|f| index_of(f)).unzip();
    let exact: Vec<f64> = files
        .iter()
        .zip(&gammas)
        .map(|(f, &g)| exact_trace_norm(f, &base, dir.path(), g))
        .collect();
    let min_exact = exact.iter().cloned().fold(f64::INFINITY, f64::min);
    for m in 0..3 {
        assert!(
            (norms[m] - exact[m]).abs() <= 0.01 * exact[m],
            "model {m}: T {} vs exact {}",
            norms[m],
            exact[m]
        );
        let want = min_exact / exact[m];
        assert!(
            (gammas[m] - want).abs() <= 0.01 * want,
            "model {m}: gamma {} vs {want}",
            gammas[m]
        );
    }
    // The synthetic fine-tunes' deltas grow with m, so gamma falls: 1 for the first.
    assert_eq!(gammas[0], 1.0);
    assert!(gammas[1] < 1.0 && gammas[2] < gammas[1]);

    // Separately, each with --trace-norm, then rescale.
    let sep: Vec<_> = (1..=3)
        .map(|m| dir.path().join(format!("sep-{m}.udelta")))
        .collect();
    for (f, out) in fts.iter().zip(&sep) {
        ok(udelta(&[
            "compress",
            "--base",
            s(&base),
            "--finetuned",
            s(f),
            "-o",
            s(out),
            "-q",
            "--adapter",
            "cpu",
            "--trace-norm",
        ]));
        assert_eq!(index_of(out).1, 1.0);
    }
    let mut args = vec!["rescale"];
    args.extend(sep.iter().map(|p| s(p)));
    ok(udelta(&args));
    for (j, p) in files.iter().zip(&sep) {
        assert_eq!(index_of(j), index_of(p), "{}", p.display());
    }
    // And decompress applies gamma * factor / (1 - s).
    // Exactly: the index's floats are parsed with serde_json's `float_roundtrip` (the default
    // parser may land on a neighbour of the value written).
    let i = read_index(&sep[2]);
    let (scale, want) = (
        i["model"]["scale"].as_f64().unwrap(),
        gammas[2] * i["model"]["rescale"].as_f64().unwrap(),
    );
    assert_eq!(scale, want);
}

#[test]
fn rescale_refuses_files_without_trace_norms() {
    let dir = tempfile::tempdir().unwrap();
    ok(udelta(&[
        "synth",
        "--out",
        s(dir.path()),
        "--preset",
        "tiny",
        "--models",
        "2",
        "-q",
    ]));
    let base = dir.path().join("base");
    for m in 1..=2 {
        let f = dir.path().join(format!("ft-{m}"));
        let out = dir.path().join(format!("{m}.udelta"));
        ok(udelta(&[
            "compress",
            "--base",
            s(&base),
            "--finetuned",
            s(&f),
            "-o",
            s(&out),
            "-q",
            "--adapter",
            "cpu",
        ]));
    }
    let (a, b) = (dir.path().join("1.udelta"), dir.path().join("2.udelta"));
    fails(
        udelta(&["rescale", s(&a), s(&b)]),
        &["1.udelta", "--trace-norm"],
    );
}
