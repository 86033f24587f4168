//! The WGSL kernels: sources (compiled in with `include_str!`), composition of each kernel's
//! module (the generated prelude of [`super::constants`], then the files of its `// include:`
//! line), pipelines, and the recording of one dispatch.

use super::constants::{wgsl_prelude, WORKGROUP};

/// Most workgroups of a grid-stride kernel: 262,144 invocations fill the largest GPUs, and
/// fewer, longer-running workgroups cost less per-workgroup setup (3x faster on lavapipe).
pub const MAX_STRIDE_GROUPS: usize = 1024;

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

/// The complete WGSL module of kernel file `name`: the generated [`wgsl_prelude`], the files
/// named on its first `// include:` line, in order, then the file itself. `None` for an
/// unknown file or include.
pub fn compose(name: &str) -> Option<String> {
    let body = shader_file(name)?;
    let mut out = wgsl_prelude();
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

    /// Records one dispatch of `kernel` on `groups` workgroups (x, y) with `buffers` bound to
    /// bindings 0, 1, ... of group 0.
    pub fn dispatch(
        &self,
        device: &wgpu::Device,
        enc: &mut wgpu::CommandEncoder,
        kernel: Kernel,
        buffers: &[&wgpu::Buffer],
        groups: (u32, u32),
    ) {
        let pipeline = self.get(kernel);
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.file()),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(kernel.file()),
            timestamp_writes: None,
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, 1);
    }
}

/// Workgroups for a grid-stride loop over `items` (one per invocation at most, at most
/// [`MAX_STRIDE_GROUPS`] and `max_groups`).
pub fn stride_groups(items: usize, max_groups: u32) -> (u32, u32) {
    let g = items
        .div_ceil(WORKGROUP as usize)
        .clamp(1, (max_groups as usize).min(MAX_STRIDE_GROUPS));
    (g as u32, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_composes_after_the_prelude() {
        for (name, src) in shader_modules() {
            assert!(src.starts_with(&wgsl_prelude()), "{name}");
            assert!(src.contains("fn main"), "{name}");
            assert!(src.contains("fn mix32"), "{name} lacks common.wgsl");
        }
        assert!(compose("nope.wgsl").is_none());
    }

    #[test]
    fn stride_groups_are_bounded() {
        assert_eq!(stride_groups(0, 65535), (1, 1));
        assert_eq!(stride_groups(257, 65535), (2, 1));
        assert_eq!(stride_groups(1 << 30, 65535), (MAX_STRIDE_GROUPS as u32, 1));
        assert_eq!(stride_groups(1 << 30, 7), (7, 1));
    }
}
