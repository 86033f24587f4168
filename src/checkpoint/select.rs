//! Which tensors are compressed, and in which allocation pool.
//!
//! Selected tensors are quantized and pruned; every other tensor that differs from the base is
//! stored losslessly by the caller (never silently dropped).

use super::dtype::{Dtype, FloatType};
use super::reader::TensorEntry;
use crate::error::{Error, Result};
use regex::Regex;
use std::sync::LazyLock;

/// A numbered transformer block: a component `layers.N`, `layer.N`, `h.N` or `blocks.N`
/// (N decimal), at the start of the name or after a `.`, with more components after it.
pub const BLOCK_PATTERN: &str = r"(?:^|\.)(?:layers|layer|h|blocks)\.[0-9]+\.";

static BLOCK_REGEX: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(BLOCK_PATTERN).expect("BLOCK_PATTERN is a valid regex"));

/// The deny-list of the default selection: a block tensor whose name has one of these
/// components (a whole `.`-separated component, anywhere in the name) is not compressed, whatever
/// its shape (docs/ALGORITHM.md, "Which tensors are compressed"):
/// - MoE routers: `gate` (Mixtral `block_sparse_moe.gate`, Qwen-MoE and DeepSeek `mlp.gate`),
///   `router`, `shared_expert_gate` (Qwen2-MoE), `e_score_correction_bias` (DeepSeek-V3);
/// - norms: any component containing `norm` (any case), GPT-2's `ln_1`, `ln_2`, ...;
/// - convolutions: any component containing `conv` (any case), e.g. Mamba's `conv1d`;
/// - position tables and biases: any component containing `position`, `pos_embed...`,
///   `rel_pos...`, T5's `relative_attention_bias`;
/// - rotary buffers: any component containing `rotary` (`rotary_emb.inv_freq`, cached
///   cos/sin tables);
/// - state-space parameters: `A_log` (Mamba's `[D, N]` log state matrix, exponentiated in the
///   recurrence), `dt_bias`.
pub const DENY_PATTERN: &str = concat!(
    r"(?:^|\.)(?:gate|router|shared_expert_gate|e_score_correction_bias",
    r"|(?i-u:[a-z0-9_]*norm[a-z0-9_]*)|ln_[a-z0-9]+",
    r"|(?i-u:[a-z0-9_]*conv[a-z0-9_]*)",
    r"|[a-z0-9_]*position[a-z0-9_]*|pos_embed[a-z0-9_]*|rel_pos[a-z0-9_]*",
    r"|relative_attention_bias",
    r"|[a-z0-9_]*rotary[a-z0-9_]*",
    r"|A_log|dt_bias)(?:\.|$)"
);

static DENY_REGEX: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(DENY_PATTERN).expect("DENY_PATTERN is a valid regex"));

/// The ranks the default selection takes: 2 (a matrix) and 3 (a stack of matrices, such as
/// fused MoE experts `[E, rows, cols]`, compressed as E matrices). Rank 1 is norms and biases;
/// rank 4 and more are convolution kernels and cached tables (GPT-2's causal mask buffer).
pub const DEFAULT_RANKS: std::ops::RangeInclusive<usize> = 2..=3;

/// Names of the embedding-like tables (together with the 2-D shape rule, see
/// [`TensorSelector::is_embedding`]): the `.weight` of a last component, at the start of the
/// name or after a `.`, that is one of
/// - LLaMA / Mistral / Qwen: `embed_tokens`, `lm_head` (the output head, tied or not);
/// - GPT-2: `wte`, `wpe`;
/// - BERT-style: `word_embeddings`, `position_embeddings`, `token_type_embeddings`;
/// - OPT / BART / Whisper: `embed_positions`;
/// - GPT-NeoX: `embed_in`, `embed_out`.
pub const EMBEDDING_PATTERN: &str = concat!(
    r"(?:^|\.)(?:embed_tokens|lm_head|wte|wpe",
    r"|word_embeddings|position_embeddings|token_type_embeddings",
    r"|embed_positions|embed_in|embed_out)\.weight$"
);

static EMBEDDING_REGEX: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(EMBEDDING_PATTERN).expect("EMBEDDING_PATTERN is a valid regex"));

/// How the embedding-like tensors ([`EMBEDDING_PATTERN`], 2-D) are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Embeddings {
    /// Compressed with UltraDelta, in one variance allocation with the block linears: the
    /// default, chosen by the quality bench on real weights (docs/ALGORITHM.md,
    /// "Embedding-like tensors").
    #[default]
    Lossy,
    /// Compressed with UltraDelta in an allocation of their own (a second pool beside the
    /// blocks', same target sparsity): measured slightly worse than [`Embeddings::Lossy`],
    /// kept so that the measurement can be repeated.
    Separate,
    /// Not compressed: stored losslessly when they differ from the base (the selection before
    /// this option existed).
    Lossless,
}

impl Embeddings {
    /// The names `--embeddings` accepts.
    pub const NAMES: &'static str = "lossy, lossless or separate";

    /// The option's name for this mode.
    pub fn name(self) -> &'static str {
        match self {
            Embeddings::Lossy => "lossy",
            Embeddings::Separate => "separate",
            Embeddings::Lossless => "lossless",
        }
    }
}

impl std::str::FromStr for Embeddings {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lossy" => Ok(Embeddings::Lossy),
            "separate" => Ok(Embeddings::Separate),
            "lossless" => Ok(Embeddings::Lossless),
            other => Err(Error::Param(format!(
                "--embeddings {other}: expected {}",
                Embeddings::NAMES
            ))),
        }
    }
}

/// The variance allocation a compressed tensor takes part in (each pool is allocated on its
/// own, with the same target sparsity, step and rescale).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Everything but the embedding-like tensors with [`Embeddings::Separate`].
    Blocks,
    /// Embedding-like tensors with [`Embeddings::Separate`].
    Embeddings,
}

/// Decides which tensors are compressed.
///
/// Only f16, bf16 and f32 tensors with at least one element are ever selected. Then:
/// - with an `include` regex: a tensor is selected iff `include` matches somewhere in its name
///   (a search, as [`Regex::is_match`]; anchor with `^`/`$` if needed), whatever its shape;
/// - without one, the default:
///   - an embedding-like table ([`EMBEDDING_PATTERN`], 2-D: `model.embed_tokens.weight`,
///     `lm_head.weight`, `embeddings.word_embeddings.weight`, ...) is selected unless the
///     embeddings mode is [`Embeddings::Lossless`];
///   - any other tensor is selected iff it has rank 2 or 3 ([`DEFAULT_RANKS`]), lies inside a
///     numbered block ([`BLOCK_PATTERN`]: `model.layers.0.`, `encoder.layer.3.`, `h.0.`,
///     `blocks.7.`) and no component of its name is on the deny-list ([`DENY_PATTERN`]:
///     routers, norms, convolutions, position tables, rotary buffers). No list of layer
///     names: `q_proj`, `qkv_proj`, `w1`, `kv_b_proj`, `c_attn`, `query`, fused
///     `experts.gate_up_proj` are all taken; layers outside the blocks (BERT's
///     `pooler.dense`) are not;
/// - in both cases a tensor whose name the `exclude` regex matches (searched likewise) is not
///   selected.
///
/// A selected 3-D tensor is compressed as the matrices of its last two dimensions
/// ([`crate::checkpoint::views`]).
///
/// A selected embedding-like tensor is in the [`Pool::Embeddings`] allocation with
/// [`Embeddings::Separate`], whether the default or `include` selected it; otherwise every
/// selected tensor is in [`Pool::Blocks`].
#[derive(Debug, Clone, Default)]
pub struct TensorSelector {
    include: Option<Regex>,
    exclude: Option<Regex>,
    embeddings: Embeddings,
}

impl TensorSelector {
    /// A selector with optional `include` and `exclude` regexes (`regex` crate syntax).
    /// An invalid regex is an [`Error::Param`] quoting the pattern and the parser's message.
    pub fn new(include: Option<&str>, exclude: Option<&str>) -> Result<Self> {
        let compile = |what: &str, pattern: Option<&str>| {
            pattern
                .map(|p| {
                    Regex::new(p)
                        .map_err(|e| Error::Param(format!("--{what} regex '{p}' is invalid: {e}")))
                })
                .transpose()
        };
        Ok(TensorSelector {
            include: compile("include", include)?,
            exclude: compile("exclude", exclude)?,
            embeddings: Embeddings::default(),
        })
    }

    /// The same selector with this embeddings mode.
    pub fn with_embeddings(self, embeddings: Embeddings) -> Self {
        TensorSelector { embeddings, ..self }
    }

    /// Whether tensor `name` of this shape is an embedding-like table: 2-D and named as
    /// [`EMBEDDING_PATTERN`] says (whatever the mode).
    pub fn is_embedding(name: &str, shape: &[usize]) -> bool {
        shape.len() == 2 && EMBEDDING_REGEX.is_match(name)
    }

    /// The allocation pool of a selected tensor of this name and (base) shape.
    pub fn pool(&self, name: &str, shape: &[usize]) -> Pool {
        if self.embeddings == Embeddings::Separate && Self::is_embedding(name, shape) {
            Pool::Embeddings
        } else {
            Pool::Blocks
        }
    }

    /// Whether tensor `name` of this shape and dtype is compressed.
    pub fn selects(&self, name: &str, shape: &[usize], dtype: Dtype) -> bool {
        if FloatType::from_dtype(dtype).is_none() || shape.contains(&0) {
            return false;
        }
        let included = match &self.include {
            Some(include) => include.is_match(name),
            None if Self::is_embedding(name, shape) => self.embeddings != Embeddings::Lossless,
            None => Self::is_block_weight(name, shape),
        };
        included && !self.exclude.as_ref().is_some_and(|x| x.is_match(name))
    }

    /// Whether checkpoint entry `t` is compressed: for a matrix view, whether its 3-D tensor
    /// is ([`crate::checkpoint::views`]).
    pub fn selects_entry(&self, t: &TensorEntry) -> bool {
        let (name, shape) = super::views::selection_identity(t);
        self.selects(name, shape, t.dtype)
    }

    /// The default rule for tensors that are not embedding-like: rank 2 or 3, inside a
    /// numbered block, no component on the deny-list.
    pub fn is_block_weight(name: &str, shape: &[usize]) -> bool {
        DEFAULT_RANKS.contains(&shape.len())
            && BLOCK_REGEX.is_match(name)
            && !DENY_REGEX.is_match(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: &[usize] = &[8, 4];

    /// The block-linear rule alone (today's selection with `--embeddings lossless`).
    fn default_selects(name: &str) -> bool {
        TensorSelector::default()
            .with_embeddings(Embeddings::Lossless)
            .selects(name, W, Dtype::F16)
    }

    const EMBEDDING_LIKE: [&str; 12] = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "wte.weight",
        "transformer.wpe.weight",
        "embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "model.decoder.embed_positions.weight",
        "gpt_neox.embed_in.weight",
        "embed_out.weight",
        "model.decoder.embed_tokens.weight",
        "transformer.wte.weight",
    ];

    #[test]
    fn embedding_rule_by_name_and_shape() {
        for name in EMBEDDING_LIKE {
            assert!(TensorSelector::is_embedding(name, &[100, 8]), "{name}");
            assert!(!TensorSelector::is_embedding(name, &[100]), "{name} 1-D");
            assert!(
                !TensorSelector::is_embedding(name, &[2, 100, 8]),
                "{name} 3-D"
            );
        }
        for name in [
            "embeddings.LayerNorm.weight",
            "model.embed_tokens.bias",
            "model.embed_tokens_extra.weight",
            "model.xembed_tokens.weight",
            "lm_head.weight.scale",
            "model.layers.0.self_attn.q_proj.weight",
            "pooler.dense.weight",
            "embeddings.position_ids",
        ] {
            assert!(!TensorSelector::is_embedding(name, &[100, 8]), "{name}");
        }
    }

    #[test]
    fn embeddings_mode_decides_selection_and_pool() {
        let q = "model.layers.0.self_attn.q_proj.weight";
        for (mode, selected, pool) in [
            (Embeddings::Lossy, true, Pool::Blocks),
            (Embeddings::Separate, true, Pool::Embeddings),
            (Embeddings::Lossless, false, Pool::Blocks),
        ] {
            let s = TensorSelector::default().with_embeddings(mode);
            for name in EMBEDDING_LIKE {
                assert_eq!(s.selects(name, W, Dtype::BF16), selected, "{mode:?} {name}");
                assert_eq!(s.pool(name, W), pool, "{mode:?} {name}");
                // 1-D or integer tables are never compressed.
                assert!(!s.selects(name, &[8], Dtype::F16), "{mode:?} {name}");
                assert!(!s.selects(name, W, Dtype::I64), "{mode:?} {name}");
            }
            assert!(s.selects(q, W, Dtype::F16));
            assert_eq!(s.pool(q, W), Pool::Blocks);
            assert!(!s.selects("model.norm.weight", &[8], Dtype::F16));
        }
        // The default mode is lossy, in one pool.
        let s = TensorSelector::default();
        assert!(s.selects("lm_head.weight", W, Dtype::F16));
        assert_eq!(s.pool("lm_head.weight", W), Pool::Blocks);
        // exclude still wins; include overrides the selection but not the pool rule.
        let s = TensorSelector::new(None, Some("lm_head")).unwrap();
        assert!(!s.selects("lm_head.weight", W, Dtype::F16));
        assert!(s.selects("model.embed_tokens.weight", W, Dtype::F16));
        let s = TensorSelector::new(Some("lm_head"), None)
            .unwrap()
            .with_embeddings(Embeddings::Separate);
        assert!(!s.selects("model.embed_tokens.weight", W, Dtype::F16));
        assert!(s.selects("lm_head.weight", W, Dtype::F16));
        assert_eq!(s.pool("lm_head.weight", W), Pool::Embeddings);
    }

    #[test]
    fn embeddings_mode_names() {
        for mode in [
            Embeddings::Lossy,
            Embeddings::Separate,
            Embeddings::Lossless,
        ] {
            assert_eq!(mode.name().parse::<Embeddings>().unwrap(), mode);
        }
        let err = "raw".parse::<Embeddings>().unwrap_err();
        assert!(
            matches!(err, Error::Param(ref m) if m.contains("raw")),
            "{err}"
        );
    }

    /// Block weights of today's families (2-D unless a shape is given): all selected.
    const BLOCK_WEIGHTS: [&str; 24] = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.31.mlp.down_proj.weight",
        "model.layers.0.self_attn.qkv_proj.weight",
        "model.layers.0.mlp.gate_up_proj.weight",
        "model.layers.3.block_sparse_moe.experts.7.w1.weight",
        "model.layers.3.block_sparse_moe.experts.0.w2.weight",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.1.self_attn.kv_b_proj.weight",
        "model.layers.1.self_attn.q_a_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.layers.1.mlp.shared_expert.down_proj.weight",
        "model.transformer.blocks.2.att_proj.weight",
        "transformer.blocks.0.attn.Wqkv.weight",
        "encoder.layer.3.attention.self.query.weight",
        "encoder.layer.3.attention.output.dense.weight",
        "bert.encoder.layer.11.output.dense.weight",
        "h.0.attn.c_attn.weight",
        "transformer.h.11.mlp.c_fc.weight",
        "gpt_neox.layers.2.attention.query_key_value.weight",
        "transformer.h.5.mlp.dense_4h_to_h.weight",
        "vision.blocks.7.attn.qkv.weight",
        "model.layers.0.self_attn.q_proj_extra.weight",
        "model.layers.0.q_proj.weight.other",
        "model.layers.0.mlp.experts.down_proj",
    ];

    #[test]
    fn default_takes_every_block_matrix_without_a_name_list() {
        for name in BLOCK_WEIGHTS {
            assert!(default_selects(name), "{name}");
            assert!(
                TensorSelector::default()
                    .with_embeddings(Embeddings::Lossless)
                    .selects(name, &[4, 8, 4], Dtype::BF16),
                "{name} 3-D"
            );
        }
    }

    #[test]
    fn default_denies_routers_norms_convolutions_positions_rotary_state_space() {
        for name in [
            "model.layers.3.block_sparse_moe.gate.weight",
            "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.router.weight",
            "model.layers.1.mlp.router.layer.weight",
            "model.layers.1.mlp.shared_expert_gate.weight",
            "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.kv_a_layernorm.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "encoder.layer.3.attention.output.LayerNorm.weight",
            "h.0.ln_1.weight",
            "model.layers.0.mixer.conv1d.weight",
            "blocks.0.Conv2d.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "model.layers.0.position_embeddings.weight",
            "blocks.1.attn.rel_pos_h",
            "blocks.1.pos_embed",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            "model.layers.0.self_attn.rotary_emb.cos_cached",
            "backbone.layers.0.mixer.A_log",
            "model.layers.3.mamba.dt_bias",
        ] {
            assert!(!default_selects(name), "{name}");
            assert!(
                !TensorSelector::default().selects(name, &[4, 8, 4], Dtype::F16),
                "{name} 3-D"
            );
        }
        // deny-list words inside another component do not count
        for name in [
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.experts.gate_up_proj",
            "model.layers.0.mlp.gated.weight",
            "backbone.layers.0.mixer.dt_proj.weight",
            "backbone.layers.0.mixer.x_proj.weight",
        ] {
            assert!(default_selects(name), "{name}");
        }
    }

    #[test]
    fn default_needs_a_numbered_block_and_rank_2_or_3() {
        for name in [
            "model.layers.x.self_attn.q_proj.weight",
            "model.xlayers.0.self_attn.q_proj.weight",
            "model.layers.0",
            "pooler.dense.weight",
            "model.norm.weight",
            "lm_head_extra.weight",
            "model.vision_tower.proj.weight",
        ] {
            assert!(!default_selects(name), "{name}");
        }
        let s = TensorSelector::default();
        let q = "model.layers.0.self_attn.q_proj.weight";
        assert!(!s.selects(q, &[8], Dtype::F16), "biases, norms: rank 1");
        assert!(!s.selects(q, &[1, 1, 8, 8], Dtype::F16), "rank 4");
        assert!(!s.selects(q, &[], Dtype::F16), "scalar");
        assert!(s.selects(q, &[8, 8], Dtype::F16));
        assert!(s.selects(q, &[2, 8, 8], Dtype::F16));
    }

    #[test]
    fn default_needs_2d_float_with_elements() {
        let s = TensorSelector::default();
        assert!(s.selects("lm_head.weight", W, Dtype::F32));
        assert!(!s.selects("lm_head.weight", &[0, 4], Dtype::F32));
        let name = "model.layers.0.self_attn.q_proj.weight";
        for dtype in [Dtype::F16, Dtype::BF16, Dtype::F32] {
            assert!(s.selects(name, W, dtype), "{dtype:?}");
        }
        for dtype in [
            Dtype::I64,
            Dtype::I32,
            Dtype::U8,
            Dtype::F64,
            Dtype::F8_E4M3,
            Dtype::BOOL,
        ] {
            assert!(!s.selects(name, W, dtype), "{dtype:?}");
        }
        assert!(!s.selects(name, &[32], Dtype::F16));
        assert!(s.selects(name, &[2, 4, 4], Dtype::F16));
        assert!(!s.selects(name, &[], Dtype::F16));
        assert!(!s.selects(name, &[0, 4], Dtype::F16));
    }

    #[test]
    fn include_overrides_the_default_and_exclude_wins() {
        let s = TensorSelector::new(Some(r"layernorm|embed_tokens"), None).unwrap();
        assert!(s.selects("model.layers.0.input_layernorm.weight", &[4096], Dtype::F32));
        assert!(s.selects("model.embed_tokens.weight", &[32000, 4096], Dtype::BF16));
        assert!(!s.selects("model.layers.0.self_attn.q_proj.weight", W, Dtype::F16));
        // a 1-D f32 tensor only through include, and never an integer one
        assert!(!TensorSelector::default().selects(
            "model.layers.0.input_layernorm.weight",
            &[4096],
            Dtype::F32
        ));
        assert!(!s.selects("model.embed_tokens.weight", &[10], Dtype::I64));
        assert!(!s.selects("model.embed_tokens.weight", &[0], Dtype::F32));
        // scalars have one element
        let all = TensorSelector::new(Some("."), None).unwrap();
        assert!(all.selects("scale", &[], Dtype::F32));
        assert!(!all.selects("position_ids", &[1, 512], Dtype::I64));

        let s = TensorSelector::new(None, Some(r"\.mlp\.")).unwrap();
        assert!(s.selects("model.layers.0.self_attn.q_proj.weight", W, Dtype::F16));
        assert!(!s.selects("model.layers.0.mlp.up_proj.weight", W, Dtype::F16));

        let s = TensorSelector::new(Some("proj"), Some("^model.layers.1[.]")).unwrap();
        assert!(s.selects("model.layers.0.mlp.up_proj.weight", W, Dtype::F16));
        assert!(s.selects("model.layers.10.mlp.up_proj.weight", W, Dtype::F16));
        assert!(!s.selects("model.layers.1.mlp.up_proj.weight", W, Dtype::F16));
    }

    #[test]
    fn bad_regex_is_a_param_error_quoting_it() {
        for (inc, exc, bad) in [
            (Some("(unclosed"), None, "(unclosed"),
            (None, Some("a[z-a]"), "a[z-a]"),
        ] {
            let err = TensorSelector::new(inc, exc).unwrap_err();
            assert!(matches!(err, Error::Param(_)), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(bad) && msg.contains("regex"), "{msg}");
        }
    }
}
