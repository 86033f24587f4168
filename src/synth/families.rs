//! The tensor lists of today's model families beyond the LLaMA layout: Mixtral, a Qwen3-MoE
//! with fused 3-D experts, Phi-3, Gemma-2 and DeepSeek-V2, with the names and shapes of their
//! published Hugging Face checkpoints (transformers' layouts). Only names, shapes and order come
//! from here; the values are those of every preset (see the module docs of [`super`]).

use super::{Dims, Kind, Proj, Spec};

/// How a layer's attention projections are stored.
#[derive(Debug, Clone, Copy)]
pub(super) enum Attention {
    /// `q_proj`, `k_proj`, `v_proj`, `o_proj`.
    Separate,
    /// Phi-3: one `qkv_proj` (queries, keys, values stacked by rows) and `o_proj`.
    FusedQkv,
    /// DeepSeek-V2 multi-head latent attention: `q_proj`, `kv_a_proj_with_mqa` (the latent
    /// and the shared rotary key), `kv_a_layernorm`, `kv_b_proj`, `o_proj`.
    Latent {
        kv_lora: usize,
        nope: usize,
        rope: usize,
        v_head: usize,
    },
}

/// How a layer's feed-forward weights are stored.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mlp {
    /// `gate_proj`, `up_proj`, `down_proj`.
    Dense,
    /// Phi-3: `gate_up_proj` (gate and up stacked by rows) and `down_proj`.
    FusedDense,
    /// Mixtral: router `block_sparse_moe.gate` and per expert `w1` (gate), `w2` (down),
    /// `w3` (up).
    Mixtral,
    /// Qwen3-MoE in the fused layout of recent transformers: router `mlp.gate`, and all
    /// experts in two 3-D tensors, `mlp.experts.gate_up_proj` `[E, 2F, H]` and
    /// `mlp.experts.down_proj` `[E, H, F]`.
    FusedExperts,
    /// DeepSeek-V2: the first `first_dense` layers dense, the others a router `mlp.gate`,
    /// per expert `gate_proj`/`up_proj`/`down_proj`, and `shared` experts fused into
    /// `mlp.shared_experts.*` of `shared * F` rows.
    DeepSeek { shared: usize, first_dense: usize },
}

/// One family's layout and published sizes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Family {
    pub hidden: usize,
    /// The dense feed-forward width.
    pub intermediate: usize,
    pub vocab: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Routed experts (0: none).
    pub experts: usize,
    /// An expert's feed-forward width.
    pub moe_intermediate: usize,
    pub attention: Attention,
    pub mlp: Mlp,
    /// Qwen3: per-head RMS norms of queries and keys (`q_norm`, `k_norm`).
    pub qk_norm: bool,
    /// Gemma-2: norms before and after the feed-forward block as well.
    pub sandwich_norms: bool,
    /// The output head is the embedding (no `lm_head.weight` in the checkpoint).
    pub tied: bool,
}

/// Divides a size by `shrink`, never below 1.
pub(super) fn shrunk(size: usize, shrink: usize) -> usize {
    (size / shrink).max(1)
}

impl Family {
    /// The same family with every size (not the counts of layers, heads or experts) divided by
    /// `shrink`, and `layers` layers if given.
    pub fn scaled(self, shrink: usize, layers: Option<usize>) -> Family {
        let s = |x| shrunk(x, shrink);
        let attention = match self.attention {
            Attention::Latent {
                kv_lora,
                nope,
                rope,
                v_head,
            } => Attention::Latent {
                kv_lora: s(kv_lora),
                nope: s(nope),
                rope: s(rope),
                v_head: s(v_head),
            },
            other => other,
        };
        Family {
            hidden: s(self.hidden),
            intermediate: s(self.intermediate),
            vocab: s(self.vocab),
            layers: layers.unwrap_or(self.layers),
            head_dim: s(self.head_dim),
            moe_intermediate: s(self.moe_intermediate),
            attention,
            ..self
        }
    }

    /// The sizes `config.json` and the value generator need.
    pub fn dims(&self) -> Dims {
        Dims {
            hidden: self.hidden,
            intermediate: self.intermediate,
            vocab: self.vocab,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
        }
    }

    /// Every tensor of the base checkpoint, in file order.
    pub fn specs(&self) -> Vec<Spec> {
        let (h, v) = (self.hidden, self.vocab);
        let mut out = vec![spec(
            "model.embed_tokens.weight",
            vec![v, h],
            Kind::Embed,
            0,
        )];
        for l in 0..self.layers {
            let mut layer = Layer {
                out: &mut out,
                prefix: format!("model.layers.{l}"),
                layer: l,
            };
            self.attention(&mut layer);
            self.mlp(&mut layer);
            self.norms(&mut layer);
        }
        out.push(spec("model.norm.weight", vec![h], Kind::FinalNorm, 0));
        if !self.tied {
            out.push(spec("lm_head.weight", vec![v, h], Kind::LmHead, 0));
        }
        out
    }

    fn attention(&self, l: &mut Layer) {
        let (h, hd) = (self.hidden, self.head_dim);
        let (q, kv) = (self.heads * hd, self.kv_heads * hd);
        let p = Kind::Proj;
        match self.attention {
            Attention::Separate => {
                l.push("self_attn.q_proj.weight", vec![q, h], p(Proj::Q));
                l.push("self_attn.k_proj.weight", vec![kv, h], p(Proj::K));
                l.push("self_attn.v_proj.weight", vec![kv, h], p(Proj::V));
                l.push("self_attn.o_proj.weight", vec![h, q], p(Proj::O));
            }
            Attention::FusedQkv => {
                l.push("self_attn.qkv_proj.weight", vec![q + 2 * kv, h], p(Proj::Q));
                l.push("self_attn.o_proj.weight", vec![h, q], p(Proj::O));
            }
            Attention::Latent {
                kv_lora,
                nope,
                rope,
                v_head,
            } => {
                let heads = self.heads;
                l.push(
                    "self_attn.q_proj.weight",
                    vec![heads * (nope + rope), h],
                    p(Proj::Q),
                );
                l.push(
                    "self_attn.kv_a_proj_with_mqa.weight",
                    vec![kv_lora + rope, h],
                    p(Proj::K),
                );
                l.push(
                    "self_attn.kv_a_layernorm.weight",
                    vec![kv_lora],
                    Kind::InputNorm,
                );
                l.push(
                    "self_attn.kv_b_proj.weight",
                    vec![heads * (nope + v_head), kv_lora],
                    p(Proj::V),
                );
                l.push(
                    "self_attn.o_proj.weight",
                    vec![h, heads * v_head],
                    p(Proj::O),
                );
            }
        }
        if self.qk_norm {
            l.push("self_attn.q_norm.weight", vec![hd], Kind::InputNorm);
            l.push("self_attn.k_norm.weight", vec![hd], Kind::InputNorm);
        }
    }

    fn mlp(&self, l: &mut Layer) {
        let (h, e, f) = (self.hidden, self.experts, self.moe_intermediate);
        let p = Kind::Proj;
        match self.mlp {
            Mlp::Dense => dense_mlp(l, "mlp", h, self.intermediate),
            Mlp::DeepSeek { first_dense, .. } if l.layer < first_dense => {
                dense_mlp(l, "mlp", h, self.intermediate)
            }
            Mlp::FusedDense => {
                let i = self.intermediate;
                l.push("mlp.gate_up_proj.weight", vec![2 * i, h], p(Proj::Gate));
                l.push("mlp.down_proj.weight", vec![h, i], p(Proj::Down));
            }
            Mlp::Mixtral => {
                l.push("block_sparse_moe.gate.weight", vec![e, h], p(Proj::Gate));
                for x in 0..e {
                    let w = |n| format!("block_sparse_moe.experts.{x}.{n}.weight");
                    l.push(&w("w1"), vec![f, h], p(Proj::Gate));
                    l.push(&w("w2"), vec![h, f], p(Proj::Down));
                    l.push(&w("w3"), vec![f, h], p(Proj::Up));
                }
            }
            Mlp::FusedExperts => {
                l.push("mlp.gate.weight", vec![e, h], p(Proj::Gate));
                l.push("mlp.experts.gate_up_proj", vec![e, 2 * f, h], p(Proj::Gate));
                l.push("mlp.experts.down_proj", vec![e, h, f], p(Proj::Down));
            }
            Mlp::DeepSeek { shared, .. } => {
                l.push("mlp.gate.weight", vec![e, h], p(Proj::Gate));
                for x in 0..e {
                    dense_mlp(l, &format!("mlp.experts.{x}"), h, f);
                }
                dense_mlp(l, "mlp.shared_experts", h, shared * f);
            }
        }
    }

    fn norms(&self, l: &mut Layer) {
        let h = self.hidden;
        l.push("input_layernorm.weight", vec![h], Kind::InputNorm);
        l.push("post_attention_layernorm.weight", vec![h], Kind::PostNorm);
        if self.sandwich_norms {
            l.push("pre_feedforward_layernorm.weight", vec![h], Kind::PostNorm);
            l.push("post_feedforward_layernorm.weight", vec![h], Kind::PostNorm);
        }
    }
}

/// `{prefix}.gate_proj`, `up_proj` (`[i, h]`) and `down_proj` (`[h, i]`).
fn dense_mlp(l: &mut Layer, prefix: &str, h: usize, i: usize) {
    l.push(
        &format!("{prefix}.gate_proj.weight"),
        vec![i, h],
        Kind::Proj(Proj::Gate),
    );
    l.push(
        &format!("{prefix}.up_proj.weight"),
        vec![i, h],
        Kind::Proj(Proj::Up),
    );
    l.push(
        &format!("{prefix}.down_proj.weight"),
        vec![h, i],
        Kind::Proj(Proj::Down),
    );
}

fn spec(name: &str, shape: Vec<usize>, kind: Kind, layer: usize) -> Spec {
    Spec {
        name: name.to_string(),
        shape,
        kind,
        layer,
    }
}

/// The tensors of one layer being listed.
struct Layer<'a> {
    out: &'a mut Vec<Spec>,
    prefix: String,
    layer: usize,
}

impl Layer<'_> {
    fn push(&mut self, suffix: &str, shape: Vec<usize>, kind: Kind) {
        let name = format!("{}.{suffix}", self.prefix);
        self.out.push(spec(&name, shape, kind, self.layer));
    }
}

/// Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1): 46,702,792,704 parameters.
pub(super) const MIXTRAL_8X7B: Family = Family {
    hidden: 4096,
    intermediate: 14336,
    vocab: 32000,
    layers: 32,
    heads: 32,
    kv_heads: 8,
    head_dim: 128,
    experts: 8,
    moe_intermediate: 14336,
    attention: Attention::Separate,
    mlp: Mlp::Mixtral,
    qk_norm: false,
    sandwich_norms: false,
    tied: false,
};

/// Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B) in the fused-experts layout: 30,532,122,624
/// parameters.
pub(super) const QWEN3_MOE: Family = Family {
    hidden: 2048,
    intermediate: 6144,
    vocab: 151936,
    layers: 48,
    heads: 32,
    kv_heads: 4,
    head_dim: 128,
    experts: 128,
    moe_intermediate: 768,
    attention: Attention::Separate,
    mlp: Mlp::FusedExperts,
    qk_norm: true,
    sandwich_norms: false,
    tied: false,
};

/// Phi-3-mini (microsoft/Phi-3-mini-4k-instruct): 3,821,079,552 parameters.
pub(super) const PHI3_MINI: Family = Family {
    hidden: 3072,
    intermediate: 8192,
    vocab: 32064,
    layers: 32,
    heads: 32,
    kv_heads: 32,
    head_dim: 96,
    experts: 0,
    moe_intermediate: 0,
    attention: Attention::FusedQkv,
    mlp: Mlp::FusedDense,
    qk_norm: false,
    sandwich_norms: false,
    tied: false,
};

/// Gemma-2-2B (google/gemma-2-2b): 2,614,341,888 parameters, tied embeddings.
pub(super) const GEMMA2_2B: Family = Family {
    hidden: 2304,
    intermediate: 9216,
    vocab: 256000,
    layers: 26,
    heads: 8,
    kv_heads: 4,
    head_dim: 256,
    experts: 0,
    moe_intermediate: 0,
    attention: Attention::Separate,
    mlp: Mlp::Dense,
    qk_norm: false,
    sandwich_norms: true,
    tied: true,
};

/// DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite): 15,706,484,224 parameters.
pub(super) const DEEPSEEK_V2_LITE: Family = Family {
    hidden: 2048,
    intermediate: 10944,
    vocab: 102400,
    layers: 27,
    heads: 16,
    kv_heads: 16,
    head_dim: 128,
    experts: 64,
    moe_intermediate: 1408,
    attention: Attention::Latent {
        kv_lora: 512,
        nope: 128,
        rope: 64,
        v_head: 128,
    },
    mlp: Mlp::DeepSeek {
        shared: 2,
        first_dense: 1,
    },
    qk_norm: false,
    sandwich_norms: false,
    tied: false,
};
