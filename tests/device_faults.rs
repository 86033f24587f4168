//! Device faults, simulated with `UDELTA_GPU_FAULT` (device creation fails, out of memory on
//! the first allocation, device lost when the second tensor starts): with `--adapter vulkan`
//! each is a clear error naming the file and leaves no output; with `--adapter auto` the run
//! falls back to the CPU engine, says so on stderr, and writes exactly the CPU engine's bytes.
//! Needs a Vulkan adapter (lavapipe will do); without one it says loudly that it did not run.

mod common;
use common::*;
use safetensors::Dtype;

const FAULTS: [&str; 3] = ["device", "oom", "lost"];

#[test]
fn faults_fail_cleanly_on_vulkan_and_fall_back_on_auto() {
    if !udelta_gpu::engine::gpu::list_adapters()
        .iter()
        .any(|a| a.backend == "Vulkan" && a.compute_shaders)
    {
        report_missing_gpu("no Vulkan adapter for the device-fault tests");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (b, f) = llama_pair(Dtype::BF16, 0, 5);
    let base = write_checkpoint(&dir.path().join("base"), &b, 1);
    let ft = write_checkpoint(&dir.path().join("ft"), &f, 2);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let file = out.join("x.udelta");
    let args = |adapter: &'static str| {
        vec![
            "compress".to_string(),
            "--base".into(),
            s(&base).into(),
            "--finetuned".into(),
            s(&ft).into(),
            "-o".into(),
            s(&file).into(),
            "-q".into(),
            "--adapter".into(),
            adapter.into(),
        ]
    };
    let cpu_file = dir.path().join("cpu.udelta");
    let mut cpu = args("cpu");
    cpu[6] = s(&cpu_file).into();
    ok(udelta(&cpu.iter().map(String::as_str).collect::<Vec<_>>()));
    let cpu_bytes = std::fs::read(&cpu_file).unwrap();

    for fault in FAULTS {
        // A named backend: an error naming the file, nothing written.
        let needles: &[&str] = match fault {
            "device" => &["x.udelta", "not written", "device"],
            "oom" => &["model-0000", "tensor '", "Out of Memory"],
            _ => &["model-0000", "tensor '", "device lost"],
        };
        let mut needles = needles.to_vec();
        needles.push(fault);
        BadRun::new(
            &format!("vulkan-{fault}"),
            &args("vulkan")
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            &needles,
        )
        .env("UDELTA_GPU_FAULT", fault)
        .check(dir.path());

        // auto: a visible fallback and the CPU engine's bytes.
        let a = args("auto");
        let run = udelta_env(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            &[("UDELTA_GPU_FAULT", fault)],
        );
        let err = String::from_utf8_lossy(&run.stderr).into_owned();
        ok(run);
        assert!(
            err.contains("CPU engine") && err.contains(fault),
            "auto/{fault}: no fallback line: {err}"
        );
        let got = std::fs::read(&file).unwrap();
        assert!(
            got == cpu_bytes,
            "auto/{fault}: bytes differ from the CPU engine's"
        );
        std::fs::remove_file(&file).unwrap();
        let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert!(left.is_empty(), "auto/{fault}: left {left:?}");
    }

    // Without a fault the GPU engine runs (so the faults above hit a working device) and writes
    // the same records and index, but for the informational engine name; a --gpu-mem too
    // small for any buffer is an error naming the output.
    ok(udelta(
        &args("vulkan")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));
    let (mut gi, mut ci) = (read_index(&file), read_index(&cpu_file));
    assert!(
        gi["engine"].as_str().unwrap().starts_with("gpu"),
        "{}",
        gi["engine"]
    );
    for i in [&mut gi, &mut ci] {
        i.as_object_mut().unwrap().remove("engine");
    }
    assert_eq!(gi, ci);
    let records = |b: &[u8]| {
        let off = u64::from_le_bytes(b[b.len() - 40..b.len() - 32].try_into().unwrap());
        b[..off as usize].to_vec()
    };
    assert!(records(&std::fs::read(&file).unwrap()) == records(&cpu_bytes));
    std::fs::remove_file(&file).unwrap();
    let mut tiny = args("vulkan");
    tiny.extend(["--gpu-mem".into(), "1KB".into()]);
    BadRun::new(
        "vulkan-gpu-mem-too-small",
        &tiny.iter().map(String::as_str).collect::<Vec<_>>(),
        &["x.udelta", "--gpu-mem"],
    )
    .check(dir.path());
}
