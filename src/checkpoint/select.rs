//! Which tensors are compressed, and in which allocation pool.
//!
//! Selected tensors are quantized and pruned; every other tensor that differs from the base is
//! stored losslessly by the caller (never silently dropped).

use super::dtype::{Dtype, FloatType};
use crate::error::{Error, Result};
use regex::Regex;
use std::sync::LazyLock;

/// Names the default selection accepts (together with the 2-D shape rule, see
/// [`TensorSelector`]): the `.weight` of a linear layer inside a numbered transformer block.
///
/// - Block component: `layers.N`, `layer.N`, `h.N` or `blocks.N` (N decimal), at the start of
///   the name or after a `.`.
/// - Layer (the last component before `.weight`), later in the name than the block:
///   - LLaMA / Mistral / Qwen: `q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`
///   - GPT-NeoX / Falcon: `query_key_value dense dense_h_to_4h dense_4h_to_h`
///   - GPT-2: `c_attn c_proj c_fc`
///   - BERT-style: `query key value dense` (BERT's `attention.output.dense`,
///     `intermediate.dense`, `output.dense`)
pub const DEFAULT_PATTERN: &str = concat!(
    r"(?:^|\.)(?:layers|layer|h|blocks)\.[0-9]+\.(?:.*\.)?",
    r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj",
    r"|query_key_value|dense|dense_h_to_4h|dense_4h_to_h",
    r"|c_attn|c_proj|c_fc",
    r"|query|key|value)\.weight$"
);

static DEFAULT_REGEX: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(DEFAULT_PATTERN).expect("DEFAULT_PATTERN is a valid regex"));

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
/// - without one, the default: 2-D tensors whose name matches [`DEFAULT_PATTERN`], i.e. the
///   linear-layer weights of the transformer blocks (`model.layers.0.self_attn.q_proj.weight`,
///   `encoder.layer.3.attention.output.dense.weight`, `h.0.attn.c_attn.weight`, ...), and,
///   unless the embeddings mode is [`Embeddings::Lossless`], the embedding-like tables
///   ([`EMBEDDING_PATTERN`]: `model.embed_tokens.weight`, `lm_head.weight`,
///   `embeddings.word_embeddings.weight`, ...); never norms, biases, or layers outside the
///   blocks such as BERT's `pooler.dense`;
/// - in both cases a tensor whose name the `exclude` regex matches (searched likewise) is not
///   selected.
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
            None => {
                shape.len() == 2
                    && (DEFAULT_REGEX.is_match(name)
                        || (self.embeddings != Embeddings::Lossless
                            && EMBEDDING_REGEX.is_match(name)))
            }
        };
        included && !self.exclude.as_ref().is_some_and(|x| x.is_match(name))
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

    #[test]
    fn default_takes_llama_block_linears_only() {
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            assert!(
                default_selects(&format!("model.layers.0.self_attn.{proj}.weight")),
                "{proj}"
            );
        }
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            assert!(
                default_selects(&format!("model.layers.31.mlp.{proj}.weight")),
                "{proj}"
            );
        }
        for name in [
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.rotary_emb.inv_freq",
            // the layer name must be a whole component, the block a numbered one
            "model.layers.0.self_attn.xq_proj.weight",
            "model.layers.0.self_attn.q_proj_extra.weight",
            "model.layers.x.self_attn.q_proj.weight",
            "model.xlayers.0.self_attn.q_proj.weight",
            "model.layers.0.q_proj.weight.other",
        ] {
            assert!(!default_selects(name), "{name}");
        }
    }

    #[test]
    fn default_takes_bert_gpt2_neox_falcon_block_linears() {
        for name in [
            "encoder.layer.3.attention.self.query.weight",
            "encoder.layer.3.attention.self.key.weight",
            "encoder.layer.3.attention.self.value.weight",
            "encoder.layer.3.attention.output.dense.weight",
            "encoder.layer.3.intermediate.dense.weight",
            "encoder.layer.3.output.dense.weight",
            "bert.encoder.layer.11.output.dense.weight",
            "h.0.attn.c_attn.weight",
            "transformer.h.11.attn.c_proj.weight",
            "transformer.h.11.mlp.c_fc.weight",
            "gpt_neox.layers.2.attention.query_key_value.weight",
            "gpt_neox.layers.2.attention.dense.weight",
            "gpt_neox.layers.2.mlp.dense_h_to_4h.weight",
            "transformer.h.5.mlp.dense_4h_to_h.weight",
            "vision.blocks.7.attn.q_proj.weight",
        ] {
            assert!(default_selects(name), "{name}");
        }
        for name in [
            "encoder.layer.3.attention.self.query.bias",
            "encoder.layer.3.attention.output.LayerNorm.weight",
            "pooler.dense.weight",
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "h.0.ln_1.weight",
            "wte.weight",
            "gpt_neox.embed_in.weight",
            "embed_out.weight",
        ] {
            assert!(!default_selects(name), "{name}");
        }
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
        assert!(!s.selects(name, &[2, 4, 4], Dtype::F16));
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
