//! The WGSL kernels: sources (compiled in with `include_str!`), composition of each kernel's
//! module from its `// include:` line, pipelines, and the uniform parameter block.

use bytemuck::{Pod, Zeroable};

/// Workgroup size of every kernel (`WG` in `shaders/common.wgsl`).
pub const WORKGROUP: u32 = 256;
/// Elements per tile of the compaction kernels: one workgroup, four elements per thread.
pub const TILE_ELEMENTS: usize = 4 * WORKGROUP as usize;

/// Every file of `shaders/`, by name.
pub const SHADER_FILES: &[(&str, &str)] = &[
    ("common.wgsl", include_str!("../../../shaders/common.wgsl")),
    ("delta.wgsl", include_str!("../../../shaders/delta.wgsl")),
    ("keep.wgsl", include_str!("../../../shaders/keep.wgsl")),
    ("minmax.wgsl", include_str!("../../../shaders/minmax.wgsl")),
    (
        "histogram.wgsl",
        include_str!("../../../shaders/histogram.wgsl"),
    ),
    ("levels.wgsl", include_str!("../../../shaders/levels.wgsl")),
    ("gather.wgsl", include_str!("../../../shaders/gather.wgsl")),
    (
        "tile_count.wgsl",
        include_str!("../../../shaders/tile_count.wgsl"),
    ),
    ("scan.wgsl", include_str!("../../../shaders/scan.wgsl")),
    (
        "workgroup_scan.wgsl",
        include_str!("../../../shaders/workgroup_scan.wgsl"),
    ),
    (
        "scatter.wgsl",
        include_str!("../../../shaders/scatter.wgsl"),
    ),
    ("spmm.wgsl", include_str!("../../../shaders/spmm.wgsl")),
];

/// The compute kernels, one pipeline each (entry point `main`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Analyze pass 1: min/max, first non-finite index, flags.
    MinMax,
    /// Analyze pass 2: level histogram.
    Histogram,
    /// Select pass A: packed levels and per-level key-bucket histogram.
    Levels,
    /// Select pass B: keys in each level's cut bucket.
    Gather,
    /// Select pass C1: kept entries per tile.
    TileCount,
    /// Select pass C2: exclusive scan of the tile counts.
    Scan,
    /// Select pass C3: ordered compaction of the kept entries.
    Scatter,
    /// Nuclear-norm products: CSR sparse matrix times a dense block of vectors.
    Spmm,
}

impl Kernel {
    /// All kernels.
    pub const ALL: [Kernel; 8] = [
        Kernel::MinMax,
        Kernel::Histogram,
        Kernel::Levels,
        Kernel::Gather,
        Kernel::TileCount,
        Kernel::Scan,
        Kernel::Scatter,
        Kernel::Spmm,
    ];

    /// The kernel's WGSL file.
    pub fn file(self) -> &'static str {
        match self {
            Kernel::MinMax => "minmax.wgsl",
            Kernel::Histogram => "histogram.wgsl",
            Kernel::Levels => "levels.wgsl",
            Kernel::Gather => "gather.wgsl",
            Kernel::TileCount => "tile_count.wgsl",
            Kernel::Scan => "scan.wgsl",
            Kernel::Scatter => "scatter.wgsl",
            Kernel::Spmm => "spmm.wgsl",
        }
    }
}

fn shader_file(name: &str) -> Option<&'static str> {
    SHADER_FILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
}

/// The complete WGSL module of kernel file `name`: the files named on its first
/// `// include:` line, in order, then the file itself. `None` for an unknown file or include.
pub fn compose(name: &str) -> Option<String> {
    let body = shader_file(name)?;
    let mut out = String::new();
    if let Some(line) = body
        .lines()
        .find_map(|l| l.trim().strip_prefix("// include:"))
    {
        for inc in line.split_whitespace() {
            out.push_str(shader_file(inc)?);
            out.push('\n');
        }
    }
    out.push_str(body);
    Some(out)
}

/// `(file name, composed module)` of every kernel.
pub fn shader_modules() -> Vec<(&'static str, String)> {
    Kernel::ALL
        .iter()
        .map(|k| {
            (
                k.file(),
                compose(k.file()).expect("kernel includes are known files"),
            )
        })
        .collect()
}

/// The uniform block `Params` of `shaders/common.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Pod, Zeroable)]
pub struct Params {
    pub n: u32,
    pub start: u32,
    pub base_type: u32,
    pub ft_type: u32,
    pub lo: f32,
    pub k: f32,
    pub max_level: f32,
    pub num_levels: u32,
    pub key0: u32,
    pub key1: u32,
    pub num_tiles: u32,
    pub pad: u32,
}

/// Words of the stats buffer (`STAT_*` in `shaders/common.wgsl`).
pub mod stat {
    pub const MIN: usize = 0;
    pub const MAX: usize = 1;
    pub const BAD: usize = 2;
    pub const FLAGS: usize = 3;
    pub const CANDIDATES: usize = 4;
    pub const KEPT: usize = 5;
    /// Words in the stats buffer.
    pub const WORDS: usize = 8;
    /// `FLAG_TINY`.
    pub const FLAG_TINY: u32 = 2;
}

/// Offset of the (threshold, prune_all) pairs in the table buffer (`TABLE_THRESHOLDS`).
pub const TABLE_THRESHOLDS: usize = 256;
/// Words in the table buffer: 256 cut buckets, then 256 (threshold, prune_all) pairs.
pub const TABLE_WORDS: usize = TABLE_THRESHOLDS + 2 * 256;

/// The compiled pipelines.
pub struct Kernels {
    pipelines: Vec<(Kernel, wgpu::ComputePipeline)>,
}

impl Kernels {
    /// Compiles every kernel (auto layouts).
    pub fn new(device: &wgpu::Device) -> Self {
        let pipelines = Kernel::ALL
            .iter()
            .map(|&k| {
                let source = compose(k.file()).expect("kernel includes are known files");
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(k.file()),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                });
                let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(k.file()),
                    layout: None,
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                });
                (k, pipeline)
            })
            .collect();
        Kernels { pipelines }
    }

    /// The pipeline of `kernel`.
    pub fn get(&self, kernel: Kernel) -> &wgpu::ComputePipeline {
        &self
            .pipelines
            .iter()
            .find(|(k, _)| *k == kernel)
            .expect("all kernels are compiled")
            .1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_composes_and_params_match_the_wgsl_layout() {
        for (name, src) in shader_modules() {
            assert!(src.contains("fn main"), "{name}");
            assert!(src.contains("fn mix32"), "{name} lacks common.wgsl");
        }
        assert_eq!(std::mem::size_of::<Params>(), 48);
        assert!(compose("nope.wgsl").is_none());
    }
}
