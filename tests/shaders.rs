//! Every WGSL file in `shaders/` parses and validates with naga, as the engine composes it
//! (the generated prelude of shared values, then its `// include:` files). Runs without any
//! adapter.

use std::collections::BTreeSet;
use std::path::Path;
use udelta_gpu::engine::gpu::constants::{self, stat, wgsl_prelude, Params, WORKGROUP};
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
        [("main", naga::ShaderStage::Compute, [WORKGROUP, 1, 1])],
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

/// The value of the `u32` constant `name` of a parsed module.
fn constant(module: &naga::Module, name: &str) -> u32 {
    let c = module
        .constants
        .iter()
        .find(|(_, c)| c.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no constant {name}"))
        .1;
    match module.global_expressions[c.init] {
        naga::Expression::Literal(naga::Literal::U32(v)) => v,
        ref e => panic!("{name} = {e:?}"),
    }
}

#[test]
fn shared_values_come_only_from_the_generated_prelude() {
    // No file declares a constant or the uniform block itself (a second declaration of a
    // prelude name would also fail validation above).
    for (name, text) in SHADER_FILES {
        for line in text.lines() {
            let l = line.trim_start();
            assert!(
                !l.starts_with("const ")
                    && !l.starts_with("override ")
                    && !l.starts_with("struct Params"),
                "{name} declares a shared value by hand: {line}"
            );
        }
    }
    // The composed kernels see the Rust values.
    let source = compose_shader("scan.wgsl").unwrap();
    assert!(source.starts_with(&wgsl_prelude()));
    let module = naga::front::wgsl::parse_str(&source).unwrap();
    for (name, value) in [
        ("WG", WORKGROUP),
        ("MAX_LEVELS", constants::MAX_LEVELS as u32),
        ("BUCKET_SHIFT", constants::BUCKET_SHIFT),
        ("BUCKETS", constants::BUCKETS as u32),
        ("KEY_LOW_MASK", constants::KEY_LOW_MASK),
        ("TABLE_THRESHOLDS", constants::TABLE_THRESHOLDS as u32),
        ("STAT_FLAGS", stat::FLAGS as u32),
        ("STAT_KEPT", stat::KEPT as u32),
        ("FLAG_TINY", stat::FLAG_TINY),
    ] {
        assert_eq!(constant(&module, name), value, "{name}");
    }
    // The uniform block has the layout of the Rust struct under WGSL's uniform rules.
    let (_, ty) = module
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some("Params"))
        .expect("struct Params");
    let naga::TypeInner::Struct { members, span } = &ty.inner else {
        panic!("Params is not a struct");
    };
    let rust = [
        ("n", std::mem::offset_of!(Params, n)),
        ("start", std::mem::offset_of!(Params, start)),
        ("base_type", std::mem::offset_of!(Params, base_type)),
        ("ft_type", std::mem::offset_of!(Params, ft_type)),
        ("lo", std::mem::offset_of!(Params, lo)),
        ("k", std::mem::offset_of!(Params, k)),
        ("max_level", std::mem::offset_of!(Params, max_level)),
        ("num_levels", std::mem::offset_of!(Params, num_levels)),
        ("key0", std::mem::offset_of!(Params, key0)),
        ("key1", std::mem::offset_of!(Params, key1)),
        ("num_tiles", std::mem::offset_of!(Params, num_tiles)),
        ("pad", std::mem::offset_of!(Params, pad)),
        ("bounds", std::mem::offset_of!(Params, bounds)),
    ];
    let wgsl: Vec<(&str, usize)> = members
        .iter()
        .map(|m| (m.name.as_deref().unwrap(), m.offset as usize))
        .collect();
    assert_eq!(wgsl, rust);
    assert_eq!(*span as usize, std::mem::size_of::<Params>());
}
