//! Every WGSL file in `shaders/` parses and validates with naga, as the engine composes it
//! (its `// include:` files first). Runs without any adapter.

use std::collections::BTreeSet;
use std::path::Path;
use udelta_gpu::engine::gpu::{compose_shader, shader_modules, SHADER_FILES};

fn validate(name: &str, source: &str) {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{name}: WGSL parse error:\n{}", e.emit_to_string(source)));
    let mut validator = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::empty(),
    );
    if let Err(e) = validator.validate(&module) {
        panic!("{name}: validation error:\n{}", e.emit_to_string(source));
    }
    let entry: Vec<_> = module
        .entry_points
        .iter()
        .map(|e| (e.name.as_str(), e.stage, e.workgroup_size))
        .collect();
    assert_eq!(
        entry,
        [("main", naga::ShaderStage::Compute, [256, 1, 1])],
        "{name}"
    );
}

#[test]
fn every_shader_file_is_known_to_the_engine_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    let compiled_in: BTreeSet<String> = SHADER_FILES.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(on_disk, compiled_in, "shaders/ and SHADER_FILES differ");

    let mut included = BTreeSet::new();
    let mut kernels = 0;
    for name in &on_disk {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(
            SHADER_FILES.iter().find(|(n, _)| n == name).unwrap().1,
            text,
            "{name} is stale"
        );
        if !text.contains("@compute") {
            continue; // a library file: validated as part of the kernels that include it
        }
        kernels += 1;
        let line = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("// include:"))
            .unwrap_or("");
        included.extend(line.split_whitespace().map(str::to_string));
        validate(
            name,
            &compose_shader(name).unwrap_or_else(|| panic!("{name}: unknown include")),
        );
    }
    assert_eq!(
        kernels,
        shader_modules().len(),
        "every kernel file is a pipeline"
    );
    for name in &on_disk {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(
            text.contains("@compute") || included.contains(name),
            "{name} is neither a kernel nor included"
        );
    }
}

#[test]
fn a_broken_shader_fails_validation() {
    // The check above would notice: a call to an undefined function does not validate.
    let (name, src) = &shader_modules()[0];
    let broken = src.replace("mix32(mix32(", "mix33(mix32(");
    let parsed = naga::front::wgsl::parse_str(&broken);
    assert!(parsed.is_err(), "{name}: undefined function accepted");
}
