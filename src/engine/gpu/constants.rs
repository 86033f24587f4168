//! Every value the WGSL kernels share with the host, defined once, here. The kernels see them
//! through [`wgsl_prelude`]: `const` declarations (and the `Params` struct) generated from these
//! Rust items, which [`super::kernels::compose`] puts in front of every kernel. No file of
//! `shaders/` declares them, so the two sides cannot drift apart.

use crate::algorithm::quantize::{self, LevelRule};
use crate::checkpoint::dtype::FloatType;
use bytemuck::{Pod, Zeroable};

/// Workgroup size of every kernel (`WG`).
pub const WORKGROUP: u32 = 256;
/// Elements per tile of the compaction kernels: one workgroup, four packed u8 levels (one u32
/// word) per invocation.
pub const TILE_ELEMENTS: usize = 4 * WORKGROUP as usize;

/// Widest quantization the kernels handle: levels are packed as u8.
pub const MAX_BITS: u32 = 8;
/// Most levels of a tensor (`MAX_LEVELS`).
pub const MAX_LEVELS: usize = 1 << MAX_BITS;
const _: () = assert!(MAX_LEVELS == quantize::MAX_LEVELS);

/// Top bits of a selection key that pick its bucket.
pub const BUCKET_BITS: u32 = 12;
/// `key >> BUCKET_SHIFT` is a key's bucket (`BUCKET_SHIFT`).
pub const BUCKET_SHIFT: u32 = 32 - BUCKET_BITS;
/// Buckets per level (`BUCKETS`).
pub const BUCKETS: usize = 1 << BUCKET_BITS;
/// The bits of a key below its bucket (`KEY_LOW_MASK`): a candidate of the gather kernel
/// carries them beside its level.
pub const KEY_LOW_MASK: u32 = (1 << BUCKET_SHIFT) - 1;

/// Offset of the (threshold, prune_all) pairs in the table buffer (`TABLE_THRESHOLDS`): the
/// words before it hold each level's cut bucket.
pub const TABLE_THRESHOLDS: usize = MAX_LEVELS;
/// Words in the table buffer: a cut bucket per level, then a (threshold, prune_all) pair.
pub const TABLE_WORDS: usize = TABLE_THRESHOLDS + 2 * MAX_LEVELS;

/// Words of the stats buffer (`STAT_*`) and the flags collected in `stats[STAT_FLAGS]`
/// (`FLAG_*`).
pub mod stat {
    /// Order key of the smallest delta.
    pub const MIN: usize = 0;
    /// Order key of the largest delta.
    pub const MAX: usize = 1;
    /// Lowest index of a non-finite delta (`u32::MAX`: none).
    pub const BAD: usize = 2;
    /// `FLAG_*` bits.
    pub const FLAGS: usize = 3;
    /// Candidates appended by the gather kernel.
    pub const CANDIDATES: usize = 4;
    /// Entries kept in the chunk (the scan kernel's total).
    pub const KEPT: usize = 5;
    /// Words in the stats buffer.
    pub const WORDS: usize = 8;
    /// A NaN or infinite input or delta.
    pub const FLAG_NONFINITE: u32 = 1;
    /// A subnormal input or result, where a device that flushes denormals could differ from
    /// IEEE arithmetic.
    pub const FLAG_TINY: u32 = 2;
}

// The histogram kernel clears and flushes its per-level bins with one invocation each, and a
// candidate stores its level in the bits of the bucket.
const _: () = assert!(WORKGROUP as usize >= MAX_LEVELS && MAX_LEVELS <= BUCKETS);

/// The WGSL spelling of a field type of the uniform block.
trait WgslType {
    fn wgsl() -> String;
}

impl WgslType for u32 {
    fn wgsl() -> String {
        "u32".into()
    }
}

impl WgslType for f32 {
    fn wgsl() -> String {
        "f32".into()
    }
}

/// An array in a uniform block has a 16-byte stride: f32s go four to a `vec4`.
impl<const N: usize> WgslType for [[f32; 4]; N] {
    fn wgsl() -> String {
        format!("array<vec4<f32>, {N}>")
    }
}

/// Defines the uniform block as a Rust struct and as its WGSL declaration, from one field list.
macro_rules! uniform_block {
    ($(#[doc = $doc:literal])* struct $name:ident { $($(#[doc = $fdoc:literal])* $field:ident: $ty:ty,)* }) => {
        $(#[doc = $doc])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Pod, Zeroable)]
        pub struct $name {
            $($(#[doc = $fdoc])* pub $field: $ty,)*
        }

        impl Default for $name {
            fn default() -> Self {
                Zeroable::zeroed()
            }
        }

        /// The WGSL declaration of the uniform block.
        fn params_wgsl() -> String {
            let mut out = format!("struct {} {{\n", stringify!($name));
            $(out.push_str(&format!("    {}: {},\n", stringify!($field), <$ty as WgslType>::wgsl()));)*
            out.push_str("}\n");
            out
        }
    };
}

uniform_block! {
    /// The uniform block `params` (binding 0) of every kernel.
    struct Params {
        /// Elements in this chunk (rows of the block for the sparse product).
        n: u32,
        /// Global index of the chunk's first element (first row of the block).
        start: u32,
        /// [`FloatType::code`] of the base tensor.
        base_type: u32,
        /// [`FloatType::code`] of the fine-tuned tensor.
        ft_type: u32,
        /// Quantization ([`LevelRule`]): `j = u32(clamp((d - lo) * k, 0, max_level))`, then
        /// `level = j + (d >= bounds[j])`.
        lo: f32,
        /// The grid's multiplier.
        k: f32,
        /// Highest level, as f32.
        max_level: f32,
        /// Levels of the grid (vectors per block for the sparse product).
        num_levels: u32,
        /// Selection key `k0`.
        key0: u32,
        /// Selection key `k1`.
        key1: u32,
        /// Tiles of [`TILE_ELEMENTS`] elements in this chunk.
        num_tiles: u32,
        /// Padding to a multiple of 16 bytes.
        pad: u32,
        /// [`LevelRule::bounds`], four to a `vec4` (`bounds[j / 4][j % 4]`).
        bounds: [[f32; 4]; MAX_LEVELS / 4],
    }
}

impl Params {
    /// These parameters with the quantization of `rule`.
    pub fn with_levels(self, rule: &LevelRule) -> Params {
        let mut bounds = [[0.0; 4]; MAX_LEVELS / 4];
        for (b, r) in bounds.iter_mut().zip(rule.bounds.chunks_exact(4)) {
            b.copy_from_slice(r);
        }
        Params {
            lo: rule.lo,
            k: rule.k,
            max_level: rule.max_level,
            num_levels: rule.levels as u32,
            bounds,
            ..self
        }
    }
}

/// The shared `u32` constants: WGSL name, value, and what the kernels use it for.
fn shared_constants() -> [(&'static str, u32, &'static str); 17] {
    [
        ("WG", WORKGROUP, "workgroup size of every kernel"),
        ("MAX_LEVELS", MAX_LEVELS as u32, "most levels of a tensor"),
        (
            "BUCKET_SHIFT",
            BUCKET_SHIFT,
            "key >> BUCKET_SHIFT is its bucket",
        ),
        ("BUCKETS", BUCKETS as u32, "key buckets per level"),
        (
            "KEY_LOW_MASK",
            KEY_LOW_MASK,
            "the key bits below the bucket",
        ),
        (
            "TABLE_THRESHOLDS",
            TABLE_THRESHOLDS as u32,
            "table: cut buckets, then (threshold, prune_all) pairs from here",
        ),
        (
            "STAT_MIN",
            stat::MIN as u32,
            "stats word: smallest order key",
        ),
        (
            "STAT_MAX",
            stat::MAX as u32,
            "stats word: largest order key",
        ),
        (
            "STAT_BAD",
            stat::BAD as u32,
            "stats word: first non-finite index",
        ),
        ("STAT_FLAGS", stat::FLAGS as u32, "stats word: FLAG_* bits"),
        (
            "STAT_CANDIDATES",
            stat::CANDIDATES as u32,
            "stats word: candidates",
        ),
        ("STAT_KEPT", stat::KEPT as u32, "stats word: kept entries"),
        (
            "FLAG_NONFINITE",
            stat::FLAG_NONFINITE,
            "a NaN or infinite value",
        ),
        ("FLAG_TINY", stat::FLAG_TINY, "a subnormal input or result"),
        (
            "TYPE_F16",
            FloatType::F16.code(),
            "Params.base_type/ft_type: f16",
        ),
        (
            "TYPE_BF16",
            FloatType::BF16.code(),
            "Params.base_type/ft_type: bf16",
        ),
        (
            "TYPE_F32",
            FloatType::F32.code(),
            "Params.base_type/ft_type: f32",
        ),
    ]
}

/// The WGSL declarations of every shared value: the constants and the `Params` struct,
/// generated from the Rust items of this module.
pub fn wgsl_prelude() -> String {
    let mut out = String::from("// Generated by the host from src/engine/gpu/constants.rs.\n");
    for (name, value, what) in shared_constants() {
        out.push_str(&format!("// {what}\nconst {name}: u32 = {value}u;\n"));
    }
    out.push_str(&params_wgsl());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prelude_declares_each_value_once_as_written_in_rust() {
        let prelude = wgsl_prelude();
        assert!(prelude.contains("\nconst WG: u32 = 256u;\n"), "{prelude}");
        assert!(prelude.contains("\nconst BUCKET_SHIFT: u32 = 20u;\n"));
        assert!(prelude.contains("\nconst KEY_LOW_MASK: u32 = 1048575u;\n"));
        assert!(prelude.contains("\nconst TYPE_F32: u32 = 2u;\n"));
        let names: Vec<_> = shared_constants().iter().map(|c| c.0).collect();
        for n in &names {
            assert_eq!(names.iter().filter(|m| *m == n).count(), 1, "{n}");
        }
        assert!(prelude.contains("struct Params {\n    n: u32,\n    start: u32,\n"));
        assert!(prelude.contains("    lo: f32,\n"));
        assert!(prelude.contains("    bounds: array<vec4<f32>, 64>,\n}\n"));
        assert_eq!(std::mem::size_of::<Params>(), 48 + 4 * MAX_LEVELS);
    }
}
