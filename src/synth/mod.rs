//! Synthetic LLaMA-shaped checkpoints for `udelta-gpu synth`, `udelta-gpu demo`, tests and
//! benchmarks.
//!
//! **These are synthetic weights, not a real model.** They have the tensor names, shapes,
//! dtypes and file layout of Hugging Face LLaMA-2 and Llama-3 checkpoints, and deltas whose statistics
//! resemble those of real fine-tunes, so that compression ratios, timings and the algorithm's
//! code paths are exercised realistically; no language model is in them.
//!
//! # Layout
//! [`write_synthetic`] writes `DIR/base` and `DIR/ft-1 .. DIR/ft-M`, each a Hugging Face style
//! directory: `model.safetensors` for one shard, or `model-0000K-of-0000N.safetensors` plus
//! `model.safetensors.index.json` for several, and a `config.json` (LLaMA fields plus
//! `"synthetic": true`, the preset, the seed and the role). Tensors are in the order of
//! [`preset_shapes`]; shards take consecutive tensors, each cut at the tensor boundary nearest
//! to an equal split of the bytes (a tensor is never split). Every directory is staged under a
//! temporary name and renamed into place when all are complete; an existing `DIR/base` or
//! `DIR/ft-K` is replaced.
//!
//! # Values
//! Base (f32 before rounding to the dtype, nearest-even):
//! - linear layers, `embed_tokens`, `lm_head`: `N(0, 0.02)` i.i.d.;
//! - RMS-norm weights: `1 + N(0, 0.05)`;
//! - `tiny` only: `model.position_ids`, int64 `[1, 64]` = `0..64`, identical in every model.
//!
//! Fine-tune `m` (0-based, ft-1 is `m = 0`): `F = round(B + D)` with `B` the base as stored and
//! `D` a fresh delta. For a 2-D tensor of shape `[R, C]`:
//!
//! `D[r][c] = s * c_c * ( sqrt(0.7) * T[r][c] + sqrt(0.3) * sum_k w_k u[r][k] v[c][k] )`
//!
//! - `T`: Student-t with 5 degrees of freedom scaled to unit variance (excess kurtosis 6):
//!   heavy tails, so that a per-tensor min/max grid is set by a few outliers, as in real
//!   deltas. Measured on the 7b shapes: excess kurtosis 4-5, `max |D| / std` 30-65, and with
//!   16 min/max levels 60-99 % of the entries fall in the most populated level;
//! - a rank-4 term `u v^T` (`u`, `v` standard normal, weights `w ∝ (1, 0.7, 0.5, 0.35)`,
//!   `sum w_k^2 = 1`) carrying 30 % of the expected energy: the spectrum has 4 spikes above the
//!   noise bulk, so trace norms are not those of pure noise;
//! - `c_c = exp(0.25 z_c - 0.0625)`, a log-normal per-column scale with `E[c^2] = 1`
//!   (mild "outlier channels");
//! - `s`, the tensor's delta standard deviation:
//!   - q/k/v/o/gate/up/down: log-uniform in `[3e-4, 3e-3]` per tensor, times a layer trend
//!     `0.8 + 0.4 * layer / (layers - 1)` (deeper layers move more; 1 with a single layer),
//!     times a projection factor
//!     (q, k 0.8; v 1.25; o 1.1; gate, up 1.0; down 1.15);
//!   - `embed_tokens`, `lm_head`: the same log-uniform, for the rows of *seen* tokens; the
//!     other rows times 0.02 (`embed_tokens`) or 0.1 (`lm_head`, whose every row gets a
//!     gradient through the softmax) — see "Vocabulary rows" below;
//!   - norm weights (1-D, `D = s * T`, no low-rank or column part): log-uniform in
//!     `[1e-3, 3e-3]`, one to a few f16 ulps near 1.0 (in f16 about 30 % of them round to a
//!     zero delta);
//!
//!   all times `(1 + 0.3 m)` (ft-K's deltas, and so its trace norm, are about
//!   `1 + 0.3 (K - 1)` times ft-1's) and a per-(model, tensor) jitter `exp(0.1 N(0, 1))`.
//!
//! The tensor factor of `s` is shared by all fine-tunes; `T`, `u`, `v` and `c` are drawn
//! independently for every fine-tune. In f16 the base's ulp near 0.02 is 1.5e-5, so deltas of
//! 3e-4..3e-3 survive the rounding of `B + D` with 20-200 ulps; in bf16 (ulp 1.2e-4 near
//! 0.02) they are coarser, and most norm deltas round to zero (as they do in real bf16
//! fine-tunes).
//!
//! Vocabulary rows: a full fine-tune moves the embedding rows of the tokens its training data
//! contains much more than the others. Token `r` (0-based row, frequency rank `r + 1`) occurs
//! in fine-tune `m`'s synthetic data `Poisson(lambda_r)` times, `lambda_r = 0.2 V / (H_V (r + 1))`
//! (Zipf's law with exponent 1 over a corpus of `0.2 V` tokens, `H_V = ln V + 0.5772`), and is
//! *seen* when it occurs at least once: about 11 % of the rows at V = 1024, 8 % at 32000, 7 % at
//! 128256 (the real MiniLM fine-tune of the tests moved 6.6 % of its word-embedding rows by
//! about 200 times the others). One uniform draw per (seed, fine-tune, row) decides, so
//! `embed_tokens` and `lm_head` agree on the seen rows, and every fine-tune has its own. Every
//! row drifts (unseen rows by the factor above); in f16 and bf16 part of the unseen rows'
//! drift rounds away, as it does in real half-precision fine-tunes.
//!
//! Edge cases: in the `tiny` preset `model.norm.weight` has an exactly zero delta (the
//! fine-tunes hold the base's bytes) and `model.position_ids` is an int64 tensor. With
//! `vocab_growth = g > 0` the fine-tunes' `embed_tokens` and `lm_head` have `V + g` rows: the
//! first `V` are base + delta, the new ones fresh `N(0, 0.02)` values, different in every
//! fine-tune; the base keeps `V`.
//!
//! # Determinism and streaming
//! Every row of every tensor draws from its own counter-based stream keyed by (seed, purpose,
//! model, tensor index, row): rows are generated in parallel with rayon and the bytes do not
//! depend on the thread count. The float transforms use only IEEE basic operations with our
//! own polynomials (no libm, no FMA), and the AVX2 and baseline builds of each kernel give
//! the same bits: the files are the same on every platform. The base and all fine-tunes are
//! generated together, a chunk of rows (32 MB over all models) at a time, while a writer
//! thread streams the previous chunk to the files: memory stays bounded (about 100 MB) whatever
//! the model size.

mod families;
mod rng;
/// One step of the splitmix64 generator (shared by test-data and seed generators).
pub use rng::splitmix64;
mod values;

#[cfg(test)]
mod tests;

use crate::checkpoint::dtype::{Dtype, FloatType};
use crate::checkpoint::writer::{SafetensorsWriter, TensorHeader};
use crate::error::{Error, Result};
use crate::staging::StagedPath;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver};
use values::TensorGen;

/// The model shapes `synth` can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Preset {
    /// H = 256, I = 688, V = 1024, 2 layers (about 2.1 M parameters): compresses in well under
    /// a second, even on a software rasterizer; has the edge-case tensors (see module docs).
    #[default]
    Tiny,
    /// LLaMA-2-7B: H = 4096, I = 11008, V = 32000, 32 layers (6,738,415,616 parameters).
    Llama7B,
    /// LLaMA-2-13B: H = 5120, I = 13824, V = 32000, 40 layers (13,015,864,320 parameters).
    Llama13B,
    /// Llama-3-8B: H = 4096, I = 14336, V = 128256, 32 layers, 32 query heads and 8 key/value
    /// heads (GQA: `k_proj` and `v_proj` are `[1024, 4096]`), bf16 and 4 shards by default
    /// (8,030,261,248 parameters).
    Llama3_8B,
    /// Mistral-7B (v0.1): the LLaMA layout with H = 4096, I = 14336, V = 32000, 32 layers, 32
    /// query and 8 key/value heads, bf16, 2 shards (7,241,732,096 parameters).
    Mistral7B,
    /// Mixtral-8x7B: Mistral's attention, and per layer a router `block_sparse_moe.gate`
    /// `[8, 4096]` and 8 experts `block_sparse_moe.experts.N.w1/w3` `[14336, 4096]`, `w2`
    /// `[4096, 14336]`; bf16, 19 shards (46,702,792,704 parameters).
    Mixtral8x7B,
    /// Qwen3-30B-A3B in transformers' fused-experts layout: H = 2048, V = 151936, 48 layers,
    /// 32 query and 4 key/value heads of 128 (`q_norm`, `k_norm`), a router `mlp.gate`
    /// `[128, 2048]` and the 128 experts as `mlp.experts.gate_up_proj` `[128, 1536, 2048]` and
    /// `mlp.experts.down_proj` `[128, 2048, 768]`; bf16, 16 shards (30,532,122,624 parameters).
    Qwen3Moe,
    /// Phi-3-mini-4k: H = 3072, V = 32064, 32 layers, fused `qkv_proj` `[9216, 3072]` and
    /// `gate_up_proj` `[16384, 3072]`; bf16, 2 shards (3,821,079,552 parameters).
    Phi3Mini,
    /// Gemma-2-2B: H = 2304, I = 9216, V = 256000, 26 layers, 8 query and 4 key/value heads of
    /// 256, four norms per layer, tied embeddings (no `lm_head`); f32, 3 shards
    /// (2,614,341,888 parameters).
    Gemma2_2B,
    /// DeepSeek-V2-Lite: H = 2048, V = 102400, 27 layers of multi-head latent attention
    /// (`q_proj`, `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`); layer 0 a
    /// dense MLP (I = 10944), the others a router `mlp.gate` `[64, 2048]`, 64 experts
    /// `mlp.experts.N.{gate,up,down}_proj` (F = 1408) and the 2 shared experts fused in
    /// `mlp.shared_experts.*`; bf16, 4 shards (15,706,484,224 parameters).
    DeepSeekV2Lite,
}

impl Preset {
    /// Every preset, in the order `synth --help` lists them.
    pub const ALL: [Preset; 10] = [
        Preset::Tiny,
        Preset::Llama7B,
        Preset::Llama13B,
        Preset::Llama3_8B,
        Preset::Mistral7B,
        Preset::Mixtral8x7B,
        Preset::Qwen3Moe,
        Preset::Phi3Mini,
        Preset::Gemma2_2B,
        Preset::DeepSeekV2Lite,
    ];

    /// The name accepted by [`FromStr`]: `tiny`, `7b`, `13b`, `llama3-8b`, `mistral-7b`,
    /// `mixtral-8x7b`, `qwen3-moe`, `phi3-mini`, `gemma2-2b` or `deepseek-v2-lite`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Llama7B => "7b",
            Preset::Llama13B => "13b",
            Preset::Llama3_8B => "llama3-8b",
            Preset::Mistral7B => "mistral-7b",
            Preset::Mixtral8x7B => "mixtral-8x7b",
            Preset::Qwen3Moe => "qwen3-moe",
            Preset::Phi3Mini => "phi3-mini",
            Preset::Gemma2_2B => "gemma2-2b",
            Preset::DeepSeekV2Lite => "deepseek-v2-lite",
        }
    }

    /// Shards per model when none is asked for (at most one per tensor): tiny 1, 7b 2, 13b 3,
    /// llama3-8b 4, and the published counts of the others.
    pub fn default_shards(self) -> usize {
        match self {
            Preset::Tiny => 1,
            Preset::Llama7B | Preset::Mistral7B | Preset::Phi3Mini => 2,
            Preset::Llama13B | Preset::Gemma2_2B => 3,
            Preset::Llama3_8B | Preset::DeepSeekV2Lite => 4,
            Preset::Mixtral8x7B => 19,
            Preset::Qwen3Moe => 16,
        }
    }

    /// Dtype when none is asked for: as released (bf16, f32 for gemma2-2b), f16 for the
    /// LLaMA-2 shapes and tiny.
    pub fn default_dtype(self) -> FloatType {
        match self {
            Preset::Tiny | Preset::Llama7B | Preset::Llama13B => FloatType::F16,
            Preset::Gemma2_2B => FloatType::F32,
            _ => FloatType::BF16,
        }
    }

    /// The family layout of the presets that are not in the LLaMA layout.
    fn family(self) -> Option<families::Family> {
        match self {
            Preset::Mixtral8x7B => Some(families::MIXTRAL_8X7B),
            Preset::Qwen3Moe => Some(families::QWEN3_MOE),
            Preset::Phi3Mini => Some(families::PHI3_MINI),
            Preset::Gemma2_2B => Some(families::GEMMA2_2B),
            Preset::DeepSeekV2Lite => Some(families::DEEPSEEK_V2_LITE),
            _ => None,
        }
    }

    /// `config.json`'s `architectures` entry and `model_type`.
    fn architecture(self) -> (&'static str, &'static str) {
        match self {
            Preset::Tiny | Preset::Llama7B | Preset::Llama13B | Preset::Llama3_8B => {
                ("LlamaForCausalLM", "llama")
            }
            Preset::Mistral7B => ("MistralForCausalLM", "mistral"),
            Preset::Mixtral8x7B => ("MixtralForCausalLM", "mixtral"),
            Preset::Qwen3Moe => ("Qwen3MoeForCausalLM", "qwen3_moe"),
            Preset::Phi3Mini => ("Phi3ForCausalLM", "phi3"),
            Preset::Gemma2_2B => ("Gemma2ForCausalLM", "gemma2"),
            Preset::DeepSeekV2Lite => ("DeepseekV2ForCausalLM", "deepseek_v2"),
        }
    }

    /// The sizes of the LLaMA-layout presets, every size divided by `shrink`.
    fn dims(self, layers: Option<usize>, shrink: usize) -> Dims {
        let (hidden, intermediate, vocab, default_layers, heads, kv_heads) = match self {
            Preset::Tiny => (256, 688, 1024, 2, 4, 4),
            Preset::Llama7B => (4096, 11008, 32000, 32, 32, 32),
            Preset::Llama13B => (5120, 13824, 32000, 40, 40, 40),
            Preset::Llama3_8B => (4096, 14336, 128256, 32, 32, 8),
            Preset::Mistral7B => (4096, 14336, 32000, 32, 32, 8),
            other => return other.family().expect("a family preset").dims(),
        };
        // Whole heads: the head dimension is divided, never the head counts.
        let head_dim = families::shrunk(hidden / heads, shrink);
        Dims {
            hidden: head_dim * heads,
            intermediate: families::shrunk(intermediate, shrink),
            vocab: families::shrunk(vocab, shrink),
            layers: layers.unwrap_or(default_layers),
            heads,
            kv_heads,
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tiny" => Ok(Preset::Tiny),
            "7b" => Ok(Preset::Llama7B),
            "13b" => Ok(Preset::Llama13B),
            lower => Preset::ALL
                .into_iter()
                .find(|p| p.name() == lower)
                .ok_or_else(|| {
                    let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
                    Error::Param(format!(
                        "unknown preset '{s}' (expected one of {})",
                        names.join(", ")
                    ))
                }),
        }
    }
}

/// What [`write_synthetic`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthOptions {
    /// Model shape.
    pub preset: Preset,
    /// Overrides the preset's layer count (at least 1).
    pub layers: Option<usize>,
    /// Dtype of the float tensors.
    pub dtype: FloatType,
    /// Number of fine-tunes, at least 1.
    pub models: usize,
    /// Shards per model; default [`Preset::default_shards`].
    pub shards: Option<usize>,
    /// Seed of every random stream.
    pub seed: u64,
    /// Extra vocabulary rows in the fine-tunes' `embed_tokens` and `lm_head`.
    pub vocab_growth: usize,
    /// Replace existing `base/` and `ft-N/` directories (otherwise they are an error).
    pub replace: bool,
    /// Divides every size (hidden, feed-forward and expert widths, vocabulary, head
    /// dimension, latent ranks; never a count of layers, heads or experts) by this, at least
    /// 1 (1: the published shapes). Keeps every name: small checkpoints of a family for tests.
    pub shrink: usize,
}

impl SynthOptions {
    /// Defaults for `preset`: its default dtype, one fine-tune, default shards, seed 0, no
    /// vocabulary growth.
    pub fn new(preset: Preset) -> Self {
        SynthOptions {
            preset,
            layers: None,
            dtype: preset.default_dtype(),
            models: 1,
            shards: None,
            seed: 0,
            vocab_growth: 0,
            replace: false,
            shrink: 1,
        }
    }
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self::new(Preset::Tiny)
    }
}

/// What [`write_synthetic`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthReport {
    /// `DIR/base`.
    pub base: PathBuf,
    /// `DIR/ft-1 .. DIR/ft-M`.
    pub finetuned: Vec<PathBuf>,
    /// Elements in one fine-tune (all tensors, int64 ones included). The base has
    /// `2 * vocab_growth * hidden` fewer.
    pub params_per_model: u64,
    /// Tensor data bytes of one fine-tune (the index's `total_size`; file headers excluded).
    pub bytes_per_model: u64,
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    hidden: usize,
    intermediate: usize,
    vocab: usize,
    layers: usize,
    heads: usize,
    /// Key/value heads (GQA when fewer than `heads`).
    kv_heads: usize,
}

/// The linear projections of a LLaMA layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

/// What a tensor is, which decides its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Embed,
    Proj(Proj),
    InputNorm,
    PostNorm,
    FinalNorm,
    LmHead,
    PositionIds,
}

/// One tensor of the base checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: Kind,
    /// Layer index (0 outside the layers).
    pub layer: usize,
}

impl Spec {
    /// Length of the last dimension (a row).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    /// Number of rows (product of all but the last dimension).
    pub fn rows(&self) -> usize {
        self.shape[..self.shape.len().saturating_sub(1)]
            .iter()
            .product()
    }
    fn grows(&self) -> bool {
        matches!(self.kind, Kind::Embed | Kind::LmHead)
    }
}

fn plan(preset: Preset, layers: Option<usize>, shrink: usize) -> (Dims, Vec<Spec>) {
    if let Some(family) = preset.family() {
        let family = family.scaled(shrink, layers);
        return (family.dims(), family.specs());
    }
    let d = preset.dims(layers, shrink);
    let (h, i, v) = (d.hidden, d.intermediate, d.vocab);
    let kv = h / d.heads * d.kv_heads;
    let spec = |name: String, shape: Vec<usize>, kind, layer| Spec {
        name,
        shape,
        kind,
        layer,
    };
    let mut out = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        Kind::Embed,
        0,
    )];
    for l in 0..d.layers {
        let p = format!("model.layers.{l}");
        for (n, proj, rows) in [
            ("q", Proj::Q, h),
            ("k", Proj::K, kv),
            ("v", Proj::V, kv),
            ("o", Proj::O, h),
        ] {
            out.push(spec(
                format!("{p}.self_attn.{n}_proj.weight"),
                vec![rows, h],
                Kind::Proj(proj),
                l,
            ));
        }
        out.push(spec(
            format!("{p}.mlp.gate_proj.weight"),
            vec![i, h],
            Kind::Proj(Proj::Gate),
            l,
        ));
        out.push(spec(
            format!("{p}.mlp.up_proj.weight"),
            vec![i, h],
            Kind::Proj(Proj::Up),
            l,
        ));
        out.push(spec(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, i],
            Kind::Proj(Proj::Down),
            l,
        ));
        out.push(spec(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            Kind::InputNorm,
            l,
        ));
        out.push(spec(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Kind::PostNorm,
            l,
        ));
    }
    out.push(spec(
        "model.norm.weight".into(),
        vec![h],
        Kind::FinalNorm,
        0,
    ));
    out.push(spec("lm_head.weight".into(), vec![v, h], Kind::LmHead, 0));
    if preset == Preset::Tiny {
        out.push(spec(
            "model.position_ids".into(),
            vec![1, POSITION_IDS],
            Kind::PositionIds,
            0,
        ));
    }
    (d, out)
}

/// Length of the tiny preset's int64 `model.position_ids`.
const POSITION_IDS: usize = 64;

/// Tensor names and shapes of the base checkpoint of `preset`, in file order. All are float
/// tensors of the chosen dtype except `model.position_ids` (tiny only), which is int64.
/// Fine-tunes with vocabulary growth have `V + g` rows in `embed_tokens` and `lm_head`.
pub fn preset_shapes(preset: Preset, layers: Option<usize>) -> Vec<(String, Vec<usize>)> {
    scaled_preset_shapes(preset, layers, 1)
}

/// [`preset_shapes`] with every size divided by `shrink` ([`SynthOptions::shrink`]).
pub fn scaled_preset_shapes(
    preset: Preset,
    layers: Option<usize>,
    shrink: usize,
) -> Vec<(String, Vec<usize>)> {
    plan(preset, layers, shrink)
        .1
        .into_iter()
        .map(|s| (s.name, s.shape))
        .collect()
}

/// Does the fine-tune keep the base's bytes for this tensor?
fn unchanged(preset: Preset, spec: &Spec) -> bool {
    preset == Preset::Tiny && matches!(spec.kind, Kind::FinalNorm | Kind::PositionIds)
}

/// Headers of one model's tensors: `growth` extra rows in embed_tokens and lm_head.
fn headers(specs: &[Spec], dtype: FloatType, growth: usize) -> Vec<TensorHeader> {
    specs
        .iter()
        .map(|s| {
            let mut shape = s.shape.clone();
            if s.grows() {
                shape[0] += growth;
            }
            let dtype = if s.kind == Kind::PositionIds {
                Dtype::I64
            } else {
                dtype.dtype()
            };
            TensorHeader {
                name: s.name.clone(),
                dtype,
                shape,
            }
        })
        .collect()
}

/// The shard of each tensor: consecutive tensors, the `k`-th cut at the tensor boundary
/// nearest to `k/shards` of the bytes, every shard non-empty (`1 <= shards <= sizes.len()`).
fn shard_plan(sizes: &[u64], shards: usize) -> Vec<usize> {
    let n = sizes.len();
    let total: u64 = sizes.iter().sum();
    let mut prefix = vec![0u64; n + 1];
    for (i, s) in sizes.iter().enumerate() {
        prefix[i + 1] = prefix[i] + s;
    }
    let mut cuts = vec![0usize];
    for k in 1..shards {
        let ideal = total as u128 * k as u128 / shards as u128;
        let lo = cuts[k - 1] + 1;
        let hi = n - (shards - k);
        let best = (lo..=hi)
            .min_by_key(|&i| (prefix[i] as u128).abs_diff(ideal))
            .unwrap_or(lo);
        cuts.push(best);
    }
    cuts.push(n);
    let mut of = vec![0; n];
    for k in 0..shards {
        of[cuts[k]..cuts[k + 1]].fill(k);
    }
    of
}

fn shard_file(k: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
    }
}

/// One model's output directory, filled shard by shard.
struct ModelOut {
    staged: StagedPath,
    headers: Vec<TensorHeader>,
    shard_of: Vec<usize>,
    shards: usize,
    writer: Option<(usize, SafetensorsWriter)>,
    config: serde_json::Value,
}

impl ModelOut {
    /// Makes sure the writer of tensor `t`'s shard is open.
    fn prepare(&mut self, t: usize) -> Result<()> {
        let k = self.shard_of[t];
        if matches!(self.writer, Some((open, _)) if open == k) {
            return Ok(());
        }
        if let Some((_, w)) = self.writer.take() {
            w.finish()?;
        }
        let tensors: Vec<TensorHeader> = self
            .headers
            .iter()
            .zip(&self.shard_of)
            .filter(|(_, &s)| s == k)
            .map(|(h, _)| h.clone())
            .collect();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let path = self.staged.path().join(shard_file(k, self.shards));
        self.writer = Some((k, SafetensorsWriter::create(&path, &tensors, Some(&meta))?));
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.writer {
            Some((_, w)) => w.write(bytes),
            None => Err(Error::checkpoint(self.staged.path(), "no shard open")),
        }
    }

    /// Finishes the last shard, writes the index and config.
    fn finish(&mut self) -> Result<()> {
        if let Some((_, w)) = self.writer.take() {
            w.finish()?;
        }
        let dir = self.staged.path();
        if self.shards > 1 {
            let total: u64 = self.headers.iter().map(TensorHeader::byte_len).sum();
            let map: BTreeMap<&str, String> = self
                .headers
                .iter()
                .zip(&self.shard_of)
                .map(|(h, &k)| (h.name.as_str(), shard_file(k, self.shards)))
                .collect();
            let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
            write_json(&dir.join("model.safetensors.index.json"), &index)?;
        }
        write_json(&dir.join("config.json"), &self.config)
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s =
        serde_json::to_string_pretty(v).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    s.push('\n');
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

fn config_json(opts: &SynthOptions, d: &Dims, finetune: Option<usize>) -> serde_json::Value {
    let torch_dtype = match opts.dtype {
        FloatType::F16 => "float16",
        FloatType::BF16 => "bfloat16",
        FloatType::F32 => "float32",
    };
    let vocab = d.vocab
        + if finetune.is_some() {
            opts.vocab_growth
        } else {
            0
        };
    let (architecture, model_type) = opts.preset.architecture();
    let tied = opts.preset.family().is_some_and(|f| f.tied);
    let comment = match model_type {
        "llama" => "Synthetic LLaMA-shaped weights written by udelta-gpu synth: not a real model.",
        _ => "Synthetic weights of this model type's shapes written by udelta-gpu synth: not a real model.",
    };
    serde_json::json!({
        "synthetic": true,
        "_comment": comment,
        "synthetic_preset": opts.preset.name(),
        "synthetic_seed": opts.seed,
        "synthetic_role": if finetune.is_some() { "finetuned" } else { "base" },
        "synthetic_finetune_index": finetune,
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": if opts.preset == Preset::Llama3_8B { 8192 } else { 4096 },
        "rope_theta": if opts.preset == Preset::Llama3_8B { 500_000.0 } else { 10_000.0 },
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": torch_dtype,
    })
}

/// Elements per parallel work item (a block of whole rows).
const BLOCK_ELEMS: usize = 1 << 16;
/// Bytes generated (over all models) per chunk handed to the writer thread; at most three
/// chunks are alive at a time (one written, one queued, one generated), and their buffers are
/// recycled. Per model a chunk is usually above the writer's 4 MiB buffer, so it goes to the
/// file without another copy.
const CHUNK_BYTES: usize = 32 << 20;

/// Work for the writer thread.
enum Job {
    /// Tensor `t` comes next: open the shards that hold it.
    Open(usize),
    /// The next bytes of models `skip..` (0: the base first), one buffer each.
    Data { skip: usize, bufs: Vec<Vec<u8>> },
}

/// Generates every tensor of every model in file order, a chunk of rows at a time, handing
/// the bytes to `emit`, which returns false to stop early. Buffers come from `recycle` when it
/// has some (the writer returns them there).
fn generate(
    opts: &SynthOptions,
    dims: &Dims,
    specs: &[Spec],
    recycle: &Receiver<Vec<u8>>,
    mut emit: impl FnMut(Job) -> bool,
) -> bool {
    let models = opts.models + 1;
    let esize = opts.dtype.size();
    let buffer = |len: usize| {
        let mut b = recycle.try_recv().unwrap_or_default();
        b.resize(len, 0);
        b
    };
    for (t, spec) in specs.iter().enumerate() {
        if !emit(Job::Open(t)) {
            return false;
        }
        if spec.kind == Kind::PositionIds {
            let bytes: Vec<u8> = (0..spec.shape.iter().product::<usize>() as i64)
                .flat_map(i64::to_le_bytes)
                .collect();
            if !emit(Job::Data {
                skip: 0,
                bufs: vec![bytes; models],
            }) {
                return false;
            }
            continue;
        }
        let unchanged = unchanged(opts.preset, spec);
        let gen = TensorGen::new(
            opts.seed,
            t,
            spec,
            opts.dtype,
            dims.layers,
            opts.models,
            unchanged,
        );
        let cols = spec.cols();
        let block_rows = (BLOCK_ELEMS / cols).max(1);
        let chunk_rows = (CHUNK_BYTES / (cols * esize * models) / block_rows).max(1) * block_rows;
        let base_rows = spec.rows();
        let growth = if spec.grows() { opts.vocab_growth } else { 0 };
        // Base rows go to every model, growth rows to the fine-tunes only.
        for (first, end, skip) in [(0, base_rows, 0), (base_rows, base_rows + growth, 1)] {
            for c0 in (first..end).step_by(chunk_rows) {
                let c1 = (c0 + chunk_rows).min(end);
                let mut bufs: Vec<Vec<u8>> = (skip..models)
                    .map(|_| buffer((c1 - c0) * gen.row_bytes()))
                    .collect();
                // Block k of every model's buffer: rows c0 + k * block_rows ..
                let mut blocks: Vec<Vec<&mut [u8]>> = Vec::new();
                for buf in bufs.iter_mut() {
                    for (k, part) in buf.chunks_mut(block_rows * gen.row_bytes()).enumerate() {
                        if k == blocks.len() {
                            blocks.push(Vec::with_capacity(models));
                        }
                        blocks[k].push(part);
                    }
                }
                blocks
                    .into_par_iter()
                    .enumerate()
                    .for_each(|(k, mut outs)| {
                        let r0 = c0 + k * block_rows;
                        if skip == 0 {
                            gen.fill(r0, &mut outs)
                        } else {
                            gen.fill_growth(r0, &mut outs)
                        }
                    });
                if !emit(Job::Data { skip, bufs }) {
                    return false;
                }
            }
        }
    }
    true
}

/// Most layers `synth` writes: the tensor list is planned in memory before anything is
/// written, so an absurd count must be refused before it is.
pub const MAX_LAYERS: usize = 1024;

/// Refuses to start writing `bytes` under `dir` when its file system has less free space (as
/// far as the platform tells; elsewhere the write itself fails cleanly when the disk fills).
/// Replaced directories count as occupied: their space is freed only after the new ones are
/// complete.
fn check_free_space(dir: &Path, bytes: u64) -> Result<()> {
    match crate::staging::free_bytes(dir) {
        Some(free) if free < bytes => Err(Error::checkpoint(
            dir,
            format!(
                "synth would write {:.2} GB here but only {:.2} GB are free",
                bytes as f64 / 1e9,
                free as f64 / 1e9
            ),
        )),
        _ => Ok(()),
    }
}

/// Writes `DIR/base` and `DIR/ft-1 .. DIR/ft-M` (see the module docs), calling `progress`
/// with the tensor bytes written so far and the total, over all models.
pub fn write_synthetic(
    out_dir: &Path,
    opts: &SynthOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<SynthReport> {
    if opts.models == 0 {
        return Err(Error::Param(
            "synth needs at least one fine-tune (models >= 1)".into(),
        ));
    }
    if opts.layers == Some(0) {
        return Err(Error::Param("synth needs at least one layer".into()));
    }
    if opts.layers.is_some_and(|l| l > MAX_LAYERS) {
        return Err(Error::Param(format!(
            "synth writes at most {MAX_LAYERS} layers (LLaMA-2-70B has 80)"
        )));
    }
    if opts.shrink == 0 {
        return Err(Error::Param("synth --shrink must be at least 1".into()));
    }
    let (dims, specs) = plan(opts.preset, opts.layers, opts.shrink);
    let shards = opts
        .shards
        .unwrap_or(opts.preset.default_shards().min(specs.len()));
    if shards == 0 || shards > specs.len() {
        return Err(Error::Param(format!(
            "shards must be between 1 and the number of tensors ({}), not {shards}",
            specs.len()
        )));
    }
    let headers_of = |m: usize| {
        headers(
            &specs,
            opts.dtype,
            if m == 0 { 0 } else { opts.vocab_growth },
        )
    };
    let bytes_of = |h: &[TensorHeader]| h.iter().map(TensorHeader::byte_len).sum::<u64>();
    let total = bytes_of(&headers_of(0)) + opts.models as u64 * bytes_of(&headers_of(1));
    check_free_space(out_dir, total)?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;

    let mut outs: Vec<ModelOut> = Vec::with_capacity(opts.models + 1);
    for m in 0..=opts.models {
        let name = if m == 0 {
            "base".to_string()
        } else {
            format!("ft-{m}")
        };
        let staged = StagedPath::new(&out_dir.join(name), opts.replace)?;
        std::fs::create_dir(staged.path()).map_err(|e| Error::io(staged.path(), e))?;
        let headers = headers_of(m);
        let sizes: Vec<u64> = headers.iter().map(TensorHeader::byte_len).collect();
        outs.push(ModelOut {
            staged,
            shard_of: shard_plan(&sizes, shards),
            headers,
            shards,
            writer: None,
            config: config_json(opts, &dims, (m > 0).then_some(m)),
        });
    }
    let written = AtomicU64::new(0);
    progress(0, total);

    // A writer thread owns the files; this thread generates the next chunk (on the rayon pool)
    // while it writes the last one. The channel holds one chunk: at most three are alive.
    let outs = std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Job>(1);
        let (recycle_tx, recycle_rx) = channel::<Vec<u8>>();
        let written = &written;
        let writer = scope.spawn(move || -> Result<Vec<ModelOut>> {
            for job in rx {
                match job {
                    Job::Open(t) => outs.iter_mut().try_for_each(|o| o.prepare(t))?,
                    Job::Data { skip, bufs } => {
                        for (o, buf) in outs[skip..].iter_mut().zip(bufs) {
                            o.write(&buf)?;
                            written.fetch_add(buf.len() as u64, Ordering::Relaxed);
                            let _ = recycle_tx.send(buf);
                        }
                    }
                }
            }
            outs.iter_mut().try_for_each(ModelOut::finish)?;
            Ok(outs)
        });
        // A failed send means the writer stopped on an error, which join returns.
        generate(opts, &dims, &specs, &recycle_rx, |job| {
            let sent = tx.send(job).is_ok();
            progress(written.load(Ordering::Relaxed), total);
            sent
        });
        drop(tx);
        writer
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })?;
    progress(total, total);
    let bytes_per_model = bytes_of(&outs[opts.models].headers);
    let params_per_model = outs[opts.models]
        .headers
        .iter()
        .map(TensorHeader::numel)
        .sum();
    let mut paths = Vec::with_capacity(outs.len());
    for o in outs {
        paths.push(o.staged.target().to_path_buf());
        o.staged.commit()?;
    }
    let base = paths.remove(0);
    Ok(SynthReport {
        base,
        finetuned: paths,
        params_per_model,
        bytes_per_model,
    })
}
