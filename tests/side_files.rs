//! Side files: a fine-tuned directory's config, tokenizer and other non-weight files travel in
//! the `.udelta` and come back byte for byte, on synthetic HF directories (single file and
//! sharded) and on the real MiniLM pair; hostile side files are left out with a message, and a
//! crafted index cannot make decompress write outside its output directory. Version-1 files
//! (without side files) stay readable.

mod common;
use common::*;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every regular file under `dir` by relative path, with its bytes.
fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    snapshot(dir)
        .into_keys()
        .filter(|p| p.is_file())
        .map(|p| {
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            (rel, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// A binary "sentencepiece model": bytes that are not text.
fn binary_blob(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// Side files of a LLaMA-style base and of its fine-tune: the fine-tune changes some (added
/// tokens, chat template, generation settings), keeps others byte for byte, and adds some.
fn write_side_files(base: &Path, ft: &Path) {
    let vocab: String = (0..3000).map(|i| format!("tok{i}\n")).collect();
    let tokenizer = |extra: &str| {
        format!(
            "{{\"version\": \"1.0\", \"added_tokens\": [{extra}], \"model\": {{\"vocab\": \"{}\"}}}}",
            vocab.replace('\n', " ")
        )
    };
    let common_files: [(&str, Vec<u8>); 3] = [
        ("vocab.txt", vocab.clone().into_bytes()),
        ("tokenizer.model", binary_blob(7, 20_000)),
        ("LICENSE", b"Apache License 2.0\n".to_vec()),
    ];
    for (dir, added, template, temp) in [
        (base, "", "{{ messages }}", "0.6"),
        (
            ft,
            "{\"id\": 3000, \"content\": \"<tool>\"}",
            "{% for m in messages %}{{ m }}{% endfor %}",
            "0.2",
        ),
    ] {
        std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
        for (name, bytes) in &common_files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let w = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        w(
            "config.json",
            format!("{{\"model_type\": \"llama\", \"vocab_size\": {}}}", 96),
        );
        w("tokenizer.json", tokenizer(added));
        w(
            "tokenizer_config.json",
            format!("{{\"chat_template\": \"{template}\"}}"),
        );
        w(
            "generation_config.json",
            format!("{{\"temperature\": {temp}}}"),
        );
        w(
            "1_Pooling/config.json",
            "{\"pooling_mode_mean_tokens\": true}".into(),
        );
    }
    std::fs::write(
        ft.join("chat_template.jinja"),
        "{% for m in messages %}{{ m }}{% endfor %}",
    )
    .unwrap();
    std::fs::write(ft.join("README.md"), "# A fine-tune\n").unwrap();
}

/// A synthetic base/fine-tune pair of HF directories with side files.
fn hf_pair(root: &Path, shards: usize) -> (PathBuf, PathBuf) {
    let (b, f) = llama_pair(Dtype::F16, 0, 11);
    let base = write_checkpoint(&root.join("base"), &b, shards);
    let ft = write_checkpoint(&root.join("ft"), &f, shards);
    write_side_files(&base, &ft);
    (base, ft)
}

fn compress(base: &Path, ft: &Path, file: &Path, extra: &[&str]) -> std::process::Output {
    let mut a = vec![
        "compress",
        "--base",
        s(base),
        "--finetuned",
        s(ft),
        "-o",
        s(file),
    ];
    a.extend_from_slice(&["--adapter", "cpu", "--sparsity", "0.9", "-q"]);
    a.extend_from_slice(extra);
    udelta(&a)
}

fn decompress(file: &Path, base: &Path, out: &Path) -> std::process::Output {
    udelta(&["decompress", s(file), "--base", s(base), "-o", s(out), "-q"])
}

/// The restored directory holds the fine-tune's file names, every side file byte-identical,
/// and the weights readable with the fine-tune's tensor names.
fn assert_restores_directory(ft: &Path, restored: &Path) {
    let (want, got) = (files_of(ft), files_of(restored));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "file names differ"
    );
    // The weights and their index are rewritten by decompress (the index as pretty JSON).
    for (rel, bytes) in &want {
        if !rel.ends_with(".safetensors") && !rel.ends_with(".index.json") {
            assert!(got[rel] == *bytes, "{rel} differs");
        }
    }
    let (a, b) = (read_checkpoint(ft), read_checkpoint(restored));
    let names = |m: &std::collections::HashMap<String, T>| {
        let mut v: Vec<String> = m.keys().cloned().collect();
        v.sort();
        v
    };
    assert_eq!(names(&a), names(&b));
}

#[test]
fn synthetic_directories_restore_with_their_side_files() {
    for shards in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let (base, ft) = hf_pair(dir.path(), shards);
        let file = dir.path().join("ft.udelta");
        ok(compress(&base, &ft, &file, &[]));
        let restored = dir.path().join("restored");
        ok(decompress(&file, &base, &restored));
        assert_restores_directory(&ft, &restored);

        let report: serde_json::Value =
            serde_json::from_str(&ok(udelta(&["inspect", s(&file), "--json"]))).unwrap();
        let listed: BTreeMap<String, (u64, String)> = report["side_files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let size = f["bytes"].as_u64().unwrap();
                (
                    f["path"].as_str().unwrap().into(),
                    (size, f["coding"].as_str().unwrap().into()),
                )
            })
            .collect();
        let sizes: BTreeMap<String, u64> = files_of(&ft)
            .into_iter()
            .filter(|(r, _)| !r.ends_with(".safetensors") && !r.ends_with(".index.json"))
            .map(|(r, b)| (r, b.len() as u64))
            .collect();
        assert_eq!(
            listed
                .iter()
                .map(|(p, (n, _))| (p.clone(), *n))
                .collect::<BTreeMap<_, _>>(),
            sizes
        );
        assert_eq!(listed["vocab.txt"].1, "same as base");
        assert_eq!(listed["tokenizer.model"].1, "same as base");
        assert_eq!(listed["tokenizer.json"].1, "against base");
        assert_eq!(listed["README.md"].1, "alone");
        let text = ok(udelta(&["inspect", s(&file)]));
        assert!(
            text.contains("generation_config.json") && text.contains("side_files 10"),
            "{text}"
        );
    }
}

#[test]
fn coding_against_the_base_pays_and_identical_files_cost_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = hf_pair(dir.path(), 1);
    let file = dir.path().join("ft.udelta");
    ok(compress(&base, &ft, &file, &[]));
    let index = read_index(&file);
    let entry = |p: &str| {
        index["side_files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == p)
            .unwrap()
            .clone()
    };
    // The 20 kB of random bytes of tokenizer.model are the base's: no record at all.
    assert!(entry("tokenizer.model")["data"].is_null());
    // tokenizer.json: one added token over a ~27 kB base file.
    let tok_len = entry("tokenizer.json")["len"].as_u64().unwrap();
    let stored = entry("tokenizer.json")["data"]["len"].as_u64().unwrap();
    assert!(
        tok_len > 20_000 && stored < 200,
        "{stored} bytes for {tok_len}"
    );
}

#[test]
fn no_side_files_and_single_file_inputs_carry_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = hf_pair(dir.path(), 1);
    let file = dir.path().join("ft.udelta");
    ok(compress(&base, &ft, &file, &["--no-side-files"]));
    let restored = dir.path().join("r1");
    ok(decompress(&file, &base, &restored));
    assert_eq!(
        files_of(&restored).into_keys().collect::<Vec<_>>(),
        ["model.safetensors"]
    );

    let single = dir.path().join("single.udelta");
    let out = udelta(&[
        "compress",
        "--base",
        s(&base.join("model.safetensors")),
        "--finetuned",
        s(&ft.join("model.safetensors")),
        "-o",
        s(&single),
        "--adapter",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(err.contains("not a directory: no side files"), "{err}");
    assert!(ok(udelta(&["inspect", s(&single)])).contains("side_files 0 (0 bytes"));
}

#[test]
fn hostile_side_files_are_left_out_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = hf_pair(dir.path(), 1);
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "outside the model directory").unwrap();
    std::os::unix::fs::symlink(&secret, ft.join("special_tokens_map.json")).unwrap();
    let fifo = std::ffi::CString::new(s(&ft.join("added_tokens.json"))).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    // 10 GB, sparse: nothing is read.
    let huge = std::fs::File::create(ft.join("huge.json")).unwrap();
    huge.set_len(10_000_000_000).unwrap();
    std::fs::write(ft.join("modeling_custom.py"), "import torch\n").unwrap();
    std::fs::create_dir_all(ft.join(".git")).unwrap();
    std::fs::write(ft.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();

    let file = dir.path().join("ft.udelta");
    let out = compress(&base, &ft, &file, &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    for (name, why) in [
        ("special_tokens_map.json", "symbolic link"),
        ("added_tokens.json", "not a regular file"),
        ("huge.json", "10000000000 bytes, over the limit"),
        ("modeling_custom.py", "--with-remote-code"),
        (".git/", "hidden folder"),
    ] {
        let line = err
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name}: {err}"));
        assert!(
            line.starts_with("warning:") && line.contains(why) && line.contains("not carried"),
            "{line}"
        );
    }
    let restored = dir.path().join("restored");
    ok(decompress(&file, &base, &restored));
    let got = files_of(&restored);
    for absent in [
        "special_tokens_map.json",
        "added_tokens.json",
        "huge.json",
        "modeling_custom.py",
        ".git/HEAD",
    ] {
        assert!(!got.contains_key(absent), "{absent} was carried");
    }
    assert!(got.contains_key("tokenizer.json") && got.contains_key("1_Pooling/config.json"));

    let with_code = dir.path().join("code.udelta");
    ok(compress(&base, &ft, &with_code, &["--with-remote-code"]));
    let restored = dir.path().join("restored-code");
    ok(decompress(&with_code, &base, &restored));
    assert_eq!(
        std::fs::read(restored.join("modeling_custom.py")).unwrap(),
        b"import torch\n"
    );
}

/// The file's records (everything between header and index) and its index JSON.
fn split_file(file: &Path) -> (Vec<u8>, serde_json::Value) {
    let bytes = std::fs::read(file).unwrap();
    let footer = &bytes[bytes.len() - 40..];
    let index_offset = u64::from_le_bytes(footer[..8].try_into().unwrap()) as usize;
    (bytes[16..index_offset].to_vec(), read_index(file))
}

/// `file` with its index replaced by `index` (records kept in place; header and footer carry
/// the index's `format_version`).
fn with_index(file: &Path, index: &serde_json::Value, out: &Path) {
    let (records, _) = split_file(file);
    let json = serde_json::to_vec(index).unwrap();
    std::fs::write(out, udelta_gpu::fuzzing::udelta_container(&records, &json)).unwrap();
}

#[test]
fn crafted_side_file_entries_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = hf_pair(dir.path(), 1);
    let file = dir.path().join("ft.udelta");
    ok(compress(&base, &ft, &file, &[]));
    let (_, index) = split_file(&file);
    let readme = index["side_files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "README.md")
        .unwrap()
        .clone();
    let with_entry = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut i = index.clone();
        let mut e = readme.clone();
        edit(&mut e);
        i["side_files"].as_array_mut().unwrap().push(e);
        i
    };
    let set_path = |p: &'static str| move |e: &mut serde_json::Value| e["path"] = p.into();
    // A record longer than any coding of one byte (at most 64 bytes): a tensor's.
    let tensor_record = index["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|t| {
            t.get("positions")
                .filter(|p| p["len"].as_u64().unwrap() > 100)
        })
        .unwrap()
        .clone();
    let long_record = |e: &mut serde_json::Value| {
        e["path"] = "z.md".into();
        e["len"] = 1.into();
        e["data"] = tensor_record.clone();
    };
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("dotdot", with_entry(&set_path("../escaped.md")), "'..'"),
        (
            "deep-dotdot",
            with_entry(&set_path("1_Pooling/../../escaped.md")),
            "'..'",
        ),
        (
            "absolute",
            with_entry(&set_path("/tmp/escaped.md")),
            "absolute path",
        ),
        (
            "backslash",
            with_entry(&set_path("..\\escaped.md")),
            "backslash",
        ),
        (
            "duplicate",
            with_entry(&set_path("README.md")),
            "listed twice",
        ),
        (
            "weights",
            with_entry(&set_path("model.safetensors")),
            "weight file",
        ),
        (
            "index",
            with_entry(&set_path("model.safetensors.index.json")),
            "weight file",
        ),
        (
            "file-and-folder",
            with_entry(&set_path("README.md/x")),
            "also a folder",
        ),
        (
            "huge",
            with_entry(&|e| e["len"] = 10_000_000_000u64.into()),
            "larger than the limit",
        ),
        (
            "no-data",
            with_entry(&|e| {
                e["path"] = "x.md".into();
                e["data"] = serde_json::Value::Null
            }),
            "neither a record",
        ),
        (
            "outside",
            with_entry(&|e| {
                e["path"] = "y.md".into();
                e["data"]["offset"] = 1u64.into()
            }),
            "record outside",
        ),
        (
            "long-record",
            with_entry(&long_record),
            "record longer than any coding",
        ),
        (
            "version-1",
            {
                let mut i = index.clone();
                i["format_version"] = 1.into();
                i
            },
            "version-1 file",
        ),
    ];
    let before = snapshot(dir.path());
    for (name, crafted, needle) in cases {
        let bad = dir.path().join(format!("{name}.udelta"));
        with_index(&file, &crafted, &bad);
        let out_dir = dir.path().join(format!("out-{name}"));
        fails(decompress(&bad, &base, &out_dir), &[needle, s(&bad)]);
        fails(udelta(&["inspect", s(&bad)]), &[needle]);
        assert!(!out_dir.exists(), "{name}: output left behind");
        std::fs::remove_file(&bad).unwrap();
    }
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a file was written or changed"
    );
    assert!(!dir.path().join("escaped.md").exists() && !Path::new("/tmp/escaped.md").exists());
}

#[test]
fn a_changed_or_missing_base_side_file_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = hf_pair(dir.path(), 1);
    let file = dir.path().join("ft.udelta");
    ok(compress(&base, &ft, &file, &[]));
    std::fs::write(base.join("tokenizer_config.json"), "{}").unwrap();
    let out = dir.path().join("r");
    fails(
        decompress(&file, &base, &out),
        &["tokenizer_config.json", "differs from the base's file"],
    );
    std::fs::remove_file(base.join("tokenizer_config.json")).unwrap();
    fails(
        decompress(&file, &base, &out),
        &["tokenizer_config.json", "missing"],
    );
    fails(
        decompress(&file, &base.join("model.safetensors"), &out),
        &["give the base as its directory"],
    );
    assert!(!out.exists());
}

#[test]
fn version_1_files_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ft) = hf_pair(dir.path(), 2);
    let v2 = dir.path().join("v2.udelta");
    // Every tensor compressed (`--include .`): no `coded` entry, which version 1 lacks.
    ok(compress(
        &base,
        &ft,
        &v2,
        &["--no-side-files", "--include", "."],
    ));
    let (_, mut index) = split_file(&v2);
    assert_eq!(index["format_version"], 2);
    assert!(index.get("side_files").is_none(), "no side files: no field");
    index["format_version"] = 1.into();
    let v1 = dir.path().join("v1.udelta");
    with_index(&v2, &index, &v1);
    let bytes = std::fs::read(&v1).unwrap();
    assert_eq!(&bytes[8..12], &1u32.to_le_bytes());
    assert_eq!(
        &bytes[bytes.len() - 12..bytes.len() - 8],
        &1u32.to_le_bytes()
    );
    let (r1, r2) = (dir.path().join("r1"), dir.path().join("r2"));
    ok(decompress(&v1, &base, &r1));
    ok(decompress(&v2, &base, &r2));
    assert_eq!(files_of(&r1), files_of(&r2));
    ok(udelta(&["inspect", s(&v1)]));
    // A version this build does not know is refused by name.
    index["format_version"] = 4.into();
    let v4 = dir.path().join("v4.udelta");
    with_index(&v2, &index, &v4);
    fails(
        udelta(&["inspect", s(&v4)]),
        &["format version 4", "versions 1 to 3"],
    );
}

#[test]
fn minilm_directories_restore_with_their_side_files() {
    let (base, ft) = minilm();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("minilm.udelta");
    ok(compress(&base, &ft, &file, &[]));
    let restored = dir.path().join("restored");
    ok(decompress(&file, &base, &restored));
    assert_restores_directory(&ft, &restored);
    assert!(files_of(&restored).contains_key("1_Pooling/config.json"));
}

/// The Python that has torch and transformers: `UDELTA_HF_PYTHON`, else the virtual environment
/// `.ci/run` makes in `target/hf-venv`.
fn hf_python() -> PathBuf {
    std::env::var_os("UDELTA_HF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/hf-venv/bin/python"))
}

#[test]
fn transformers_loads_the_restored_directories_as_the_fine_tunes() {
    let (minilm_base, _) = minilm();
    let python = hf_python();
    if !python.exists() {
        let why = format!(
            "{} does not exist (.ci/run makes it: torch + transformers)",
            python.display()
        );
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI requires the transformers check: {why}");
        }
        eprintln!("\n!!!!!!!! TRANSFORMERS CHECK DID NOT RUN: {why}\n");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(&python)
        .arg(root.join("scripts/check-hf-load.py"))
        .arg(env!("CARGO_BIN_EXE_udelta-gpu"))
        .arg(minilm_base.parent().unwrap())
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("restored directories load as the fine-tunes do"),
        "{stdout}"
    );
}
