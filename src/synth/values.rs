//! The values of the synthetic tensors, one block of rows at a time (see the module docs of
//! [`crate::synth`] for the statistics).

use super::rng::{exp2, key, log2, Batch, Normals, Rng};
use super::{Kind, Proj, Spec};
use crate::checkpoint::dtype::FloatType;
use crate::simd::multiversion;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Standard deviation of the base weights of linear layers and embeddings.
pub const BASE_STD: f32 = 0.02;
/// Norm weights of the base are `1 + NORM_BASE_STD * N(0, 1)`.
pub const NORM_BASE_STD: f32 = 0.05;
/// Rank of the low-rank part of every 2-D delta.
pub const LOW_RANK: usize = 4;
/// Fraction of a 2-D delta's expected energy (squared Frobenius norm) in the low-rank part.
pub const LOW_RANK_ENERGY: f32 = 0.3;
/// Relative weights of the low-rank components (normalized to unit energy).
const LOW_RANK_WEIGHTS: [f32; LOW_RANK] = [1.0, 0.7, 0.5, 0.35];
/// Log-normal sigma of the per-column scale of 2-D deltas ("outlier channels").
pub const COLUMN_SIGMA: f32 = 0.25;
/// Range of the log-uniform per-tensor delta scale (std) of linear layers, before the layer
/// trend, projection factor and model factor.
pub const LINEAR_SCALE: (f32, f32) = (3e-4, 3e-3);
/// Range of the per-tensor delta scale of norm weights.
pub const NORM_SCALE: (f32, f32) = (1e-3, 3e-3);
/// Rows of `embed_tokens` whose token the fine-tuning data does not contain move by this
/// fraction of the rows of seen tokens (which move at the linear layers' scale).
pub const UNSEEN_EMBED_FACTOR: f32 = 0.02;
/// The same for `lm_head`, whose every row gets a gradient through the softmax.
pub const UNSEEN_LM_HEAD_FACTOR: f32 = 0.1;
/// Length of the synthetic fine-tuning data, in tokens per vocabulary row: token `r`
/// (0-based, frequency rank `r + 1`) occurs `Poisson(TRAIN_TOKENS_PER_ROW * V / (H_V (r + 1)))`
/// times (Zipf's law with exponent 1, `H_V ≈ ln V + 0.5772` the harmonic number), and is seen
/// when it occurs at least once: about 11 % of the rows at V = 1024, 8 % at 32000, 7 % at
/// 128256.
pub const TRAIN_TOKENS_PER_ROW: f32 = 0.2;
/// Model `m` (0-based: ft-1 is 0) has its deltas scaled by `1 + MODEL_STEP * m`.
pub const MODEL_STEP: f32 = 0.3;
/// Log-normal sigma of a per-(model, tensor) jitter of the delta scale.
pub const MODEL_JITTER_SIGMA: f32 = 0.1;

// Purposes of the random streams.
const P_BASE: u64 = 1;
const P_DELTA: u64 = 2;
const P_COLUMNS: u64 = 3;
const P_NEW_ROWS: u64 = 4;
const P_TENSOR_SCALE: u64 = 5;
const P_MODEL_JITTER: u64 = 6;
const P_SEEN: u64 = 7;

/// Which vocabulary rows fine-tune `m` saw in its (synthetic) training data: row `r` with
/// probability `1 - exp(-lambda_r)`, `lambda_r = TRAIN_TOKENS_PER_ROW * V / (H_V (r + 1))`, from
/// one draw keyed by (seed, model, row), so that `embed_tokens` and `lm_head` agree.
#[derive(Debug, Clone, Copy)]
pub struct SeenTokens {
    seed: u64,
    m: usize,
    /// `TRAIN_TOKENS_PER_ROW * V / H_V`.
    lambda_1: f32,
}

impl SeenTokens {
    /// For fine-tune `m` (0-based) of a vocabulary of `vocab` rows.
    pub fn new(seed: u64, m: usize, vocab: usize) -> Self {
        let v = vocab.max(1) as f32;
        let harmonic = log2(v) * std::f32::consts::LN_2 + 0.577_215_7;
        SeenTokens {
            seed,
            m,
            lambda_1: TRAIN_TOKENS_PER_ROW * v / harmonic,
        }
    }

    /// Probability that row `r` is seen.
    pub fn probability(&self, r: usize) -> f32 {
        1.0 - exp(-self.lambda_1 / (r + 1) as f32)
    }

    /// Whether row `r` is seen.
    pub fn seen(&self, r: usize) -> bool {
        let mut rng = Rng::stream(&[self.seed, P_SEEN, 1 + self.m as u64, r as u64]);
        (rng.uniform_f64() as f32) < self.probability(r)
    }
}

/// Projection-specific factor of the delta scale.
fn proj_factor(p: Proj) -> f32 {
    match p {
        Proj::Q | Proj::K => 0.8,
        Proj::V => 1.25,
        Proj::O => 1.1,
        Proj::Gate | Proj::Up => 1.0,
        Proj::Down => 1.15,
    }
}

fn log_uniform(rng: &mut Rng, (lo, hi): (f32, f32)) -> f32 {
    let u = rng.uniform_f64() as f32;
    lo * exp2(u * log2(hi / lo))
}

/// `e^x` through the deterministic [`exp2`].
fn exp(x: f32) -> f32 {
    exp2(x * std::f32::consts::LOG2_E)
}

/// The standard deviation `s` of the delta of tensor `t` in fine-tune `m` (0-based), before
/// the per-column scales (whose mean square is 1) and, in `embed_tokens` and `lm_head`, before
/// the factor of unseen rows ([`UNSEEN_EMBED_FACTOR`], [`UNSEEN_LM_HEAD_FACTOR`]).
pub fn delta_scale(seed: u64, t: usize, spec: &Spec, layers: usize, m: usize) -> f32 {
    let mut r = Rng::stream(&[seed, P_TENSOR_SCALE, t as u64]);
    let base = match spec.kind {
        Kind::Proj(p) => {
            let trend = if layers > 1 {
                0.8 + 0.4 * spec.layer as f32 / (layers - 1) as f32
            } else {
                1.0
            };
            log_uniform(&mut r, LINEAR_SCALE) * trend * proj_factor(p)
        }
        Kind::Embed | Kind::LmHead => log_uniform(&mut r, LINEAR_SCALE),
        Kind::InputNorm | Kind::PostNorm | Kind::FinalNorm => log_uniform(&mut r, NORM_SCALE),
        Kind::PositionIds => 0.0,
    };
    let mut j = Normals::new(Rng::stream(&[seed, P_MODEL_JITTER, m as u64, t as u64]));
    base * (1.0 + MODEL_STEP * m as f32) * exp(MODEL_JITTER_SIGMA * j.next())
}

/// bf16 bits of `x`, rounded to nearest, ties to even (NaN stays NaN): the same as
/// `half::bf16::from_f32`, written without branches so that loops over it vectorize.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// Writes `v` as little-endian bytes into `out` (of twice its length).
fn put_u16s(out: &mut [u8], v: &[u16]) {
    if cfg!(target_endian = "little") {
        out.copy_from_slice(bytemuck::cast_slice(v));
    } else {
        for (o, x) in out.chunks_exact_mut(2).zip(v) {
            o.copy_from_slice(&x.to_le_bytes());
        }
    }
}

/// Rounding to the file's dtype and encoding, in batches that vectorize (half's slice
/// conversions use F16C where the CPU has it). The bytes are those of
/// [`FloatType::encode_into`] (tested).
#[derive(Default)]
pub struct Codec {
    h: Vec<f16>,
    bits: Vec<u16>,
}

impl Codec {
    /// Writes `vals` rounded to `dtype` (nearest, ties to even) as little-endian bytes into
    /// `out`, which has exactly their size.
    pub fn encode(&mut self, dtype: FloatType, vals: &[f32], out: &mut [u8]) {
        match dtype {
            FloatType::F32 => {
                if cfg!(target_endian = "little") {
                    out.copy_from_slice(bytemuck::cast_slice(vals));
                } else {
                    for (o, x) in out.chunks_exact_mut(4).zip(vals) {
                        o.copy_from_slice(&x.to_le_bytes());
                    }
                }
            }
            FloatType::F16 => {
                self.h.resize(vals.len(), f16::ZERO);
                self.h.convert_from_f32_slice(vals);
                put_u16s(out, self.h.reinterpret_cast());
            }
            FloatType::BF16 => {
                self.bits.clear();
                self.bits.extend(vals.iter().map(|&x| bf16_bits(x)));
                put_u16s(out, &self.bits);
            }
        }
    }

    /// Rounds `vals` to `dtype` in place and writes their bytes (as [`encode`](Self::encode)).
    pub fn round_and_encode(&mut self, dtype: FloatType, vals: &mut [f32], out: &mut [u8]) {
        self.encode(dtype, vals, out);
        match dtype {
            FloatType::F32 => {}
            FloatType::F16 => self.h.convert_to_f32_slice(vals),
            FloatType::BF16 => {
                for (v, &b) in vals.iter_mut().zip(&self.bits) {
                    *v = bf16::from_bits(b).to_f32();
                }
            }
        }
    }
}

/// Per-column coefficients of one fine-tune's delta of one tensor:
/// `delta[r][j] = a[j] * T[r][j] + sum_k u[r][k] * b[k][j]`, with `T` unit-variance Student-t
/// and `u` standard normal.
struct DeltaParams {
    a: Vec<f32>,
    /// `None` for 1-D tensors (no low-rank part).
    b: Option<[Vec<f32>; LOW_RANK]>,
    /// Vocabulary tables: which rows are seen, and the factor of the others.
    rows: Option<(SeenTokens, f32)>,
}

impl DeltaParams {
    fn new(seed: u64, m: usize, t: usize, spec: &Spec, layers: usize, cols: usize) -> Self {
        let s = delta_scale(seed, t, spec, layers, m);
        if spec.shape.len() < 2 {
            return DeltaParams {
                a: vec![s; cols],
                b: None,
                rows: None,
            };
        }
        let unseen = match spec.kind {
            Kind::Embed => Some(UNSEEN_EMBED_FACTOR),
            Kind::LmHead => Some(UNSEEN_LM_HEAD_FACTOR),
            _ => None,
        };
        let rows = unseen.map(|f| (SeenTokens::new(seed, m, spec.shape[0]), f));
        let norm = LOW_RANK_WEIGHTS.iter().map(|w| w * w).sum::<f32>().sqrt();
        let lr = LOW_RANK_ENERGY.sqrt() / norm;
        let noise = (1.0 - LOW_RANK_ENERGY).sqrt();
        let mut n = Normals::new(Rng::stream(&[seed, P_COLUMNS, 1 + m as u64, t as u64]));
        let mut a = Vec::with_capacity(cols);
        let mut b: [Vec<f32>; LOW_RANK] = Default::default();
        for _ in 0..cols {
            // E[c^2] = 1.
            let c = exp(COLUMN_SIGMA * n.next() - COLUMN_SIGMA * COLUMN_SIGMA);
            a.push(s * c * noise);
            for (k, bk) in b.iter_mut().enumerate() {
                bk.push(s * c * lr * LOW_RANK_WEIGHTS[k] * n.next());
            }
        }
        DeltaParams {
            a,
            b: Some(b),
            rows,
        }
    }

    /// `out[j] = base[j] + delta[r][j]` for fine-tune `m`.
    fn add_row(
        &self,
        seed: u64,
        (m, t, r): (usize, usize, usize),
        base: &[f32],
        out: &mut [f32],
        sc: &mut Scratch,
    ) {
        let mut rng = Rng::stream(&[seed, P_DELTA, 1 + m as u64, t as u64, r as u64]);
        sc.t.resize(base.len(), 0.0);
        let g = match self.rows {
            Some((seen, unseen)) if !seen.seen(r) => unseen,
            _ => 1.0,
        };
        match &self.b {
            None => {
                rng.fill_t5(&mut sc.t, &mut sc.batch);
                combine(out, base, &sc.t, &self.a, g, [0.0; LOW_RANK], &[]);
            }
            Some(b) => {
                let (u0, u1) = rng.normal_pair();
                let (u2, u3) = rng.normal_pair();
                rng.fill_t5(&mut sc.t, &mut sc.batch);
                combine(out, base, &sc.t, &self.a, g, [u0, u1, u2, u3], b);
            }
        }
    }
}

multiversion! {
    /// `out[j] = base[j] + g * (a[j] * t[j] + (u[0] b[0][j] + .. + u[3] b[3][j]))`; without
    /// `b`, `out[j] = base[j] + g * (a[j] * t[j])`.
    fn combine(out: &mut [f32], base: &[f32], t: &[f32], a: &[f32], g: f32, u: [f32; LOW_RANK], b: &[Vec<f32>]) {
        let n = out.len();
        let (base, t, a) = (&base[..n], &t[..n], &a[..n]);
        if let [b0, b1, b2, b3] = b {
            let (b0, b1, b2, b3) = (&b0[..n], &b1[..n], &b2[..n], &b3[..n]);
            for j in 0..n {
                let lr = u[0] * b0[j] + u[1] * b1[j] + u[2] * b2[j] + u[3] * b3[j];
                out[j] = base[j] + g * (a[j] * t[j] + lr);
            }
        } else {
            for j in 0..n {
                out[j] = base[j] + g * (a[j] * t[j]);
            }
        }
    }
}

/// Reusable buffers of one worker.
#[derive(Default)]
struct Scratch {
    batch: Batch,
    codec: Codec,
    /// Raw variates of one row.
    t: Vec<f32>,
}

/// Generates one tensor of every model, block of rows by block of rows.
pub struct TensorGen<'a> {
    seed: u64,
    t: usize,
    spec: &'a Spec,
    dtype: FloatType,
    cols: usize,
    /// One per fine-tune; `None`: the fine-tune keeps the base bytes.
    deltas: Vec<Option<DeltaParams>>,
}

impl<'a> TensorGen<'a> {
    /// Tensor `t` (`spec`) of a checkpoint with `layers` layers, for `models` fine-tunes.
    /// `unchanged`: the fine-tunes equal the base.
    pub fn new(
        seed: u64,
        t: usize,
        spec: &'a Spec,
        dtype: FloatType,
        layers: usize,
        models: usize,
        unchanged: bool,
    ) -> Self {
        let cols = spec.cols();
        let deltas = (0..models)
            .map(|m| (!unchanged).then(|| DeltaParams::new(seed, m, t, spec, layers, cols)))
            .collect();
        TensorGen {
            seed,
            t,
            spec,
            dtype,
            cols,
            deltas,
        }
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols * self.dtype.size()
    }

    /// Rows `r0..` of the base (`outs[0]`) and of every fine-tune (`outs[1..]`), encoded into
    /// `outs`, which hold whole rows (all as many).
    pub fn fill(&self, r0: usize, outs: &mut [&mut [u8]]) {
        let rb = self.row_bytes();
        let mut sc = Scratch::default();
        let mut base = vec![0.0; self.cols];
        let mut ft = vec![0.0; self.cols];
        let (mean, std) = if self.spec.shape.len() < 2 {
            (1.0, NORM_BASE_STD)
        } else {
            (0.0, BASE_STD)
        };
        let (b, fts) = outs.split_first_mut().expect("base output");
        for (i, brow) in b.chunks_exact_mut(rb).enumerate() {
            let r = r0 + i;
            let mut rng = Rng::stream(&[self.seed, P_BASE, self.t as u64, r as u64]);
            rng.fill_normal(&mut base, &mut sc.batch);
            for v in base.iter_mut() {
                *v = mean + std * *v;
            }
            sc.codec.round_and_encode(self.dtype, &mut base, brow);
            for (m, (out, delta)) in fts.iter_mut().zip(&self.deltas).enumerate() {
                let orow = &mut out[i * rb..(i + 1) * rb];
                match delta {
                    None => orow.copy_from_slice(brow),
                    Some(d) => {
                        d.add_row(self.seed, (m, self.t, r), &base, &mut ft, &mut sc);
                        sc.codec.encode(self.dtype, &ft, orow);
                    }
                }
            }
        }
    }

    /// Rows `r0..` (at or past the base's row count) of every fine-tune, into `outs` (one per
    /// fine-tune, whole rows): fresh values, `BASE_STD * N(0, 1)`, different in every fine-tune.
    pub fn fill_growth(&self, r0: usize, outs: &mut [&mut [u8]]) {
        let mut sc = Scratch::default();
        let mut vals = vec![0.0; self.cols];
        for (m, out) in outs.iter_mut().enumerate() {
            for (i, orow) in out.chunks_exact_mut(self.row_bytes()).enumerate() {
                let r = (r0 + i) as u64;
                let key = key(&[self.seed, P_NEW_ROWS, 1 + m as u64, self.t as u64, r]);
                Rng::from_key(key).fill_normal(&mut vals, &mut sc.batch);
                vals.iter_mut().for_each(|v| *v *= BASE_STD);
                sc.codec.encode(self.dtype, &vals, orow);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_matches_encode_into() {
        let mut r = Rng::from_key(3);
        let mut vals: Vec<f32> = (0..100_000)
            .map(|i| {
                let x = f32::from_bits(r.next_u64() as u32);
                match i % 4 {
                    0 => x, // any bit pattern: NaN, inf, subnormal, huge
                    1 => 0.02 * r.normal_pair().0,
                    2 => 1e-6 * r.normal_pair().0, // f16 subnormals
                    _ => r.normal_pair().0,
                }
            })
            .collect();
        // Exact ties for both 16-bit types, and values that overflow f16.
        vals.extend([
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            65520.0,
            -7e4,
        ]);
        for dtype in [FloatType::F16, FloatType::BF16, FloatType::F32] {
            let mut want = Vec::new();
            dtype.encode_into(&vals, &mut want);
            let mut codec = Codec::default();
            let mut got = vec![7u8; want.len()];
            codec.encode(dtype, &vals, &mut got);
            assert!(got == want, "{dtype:?}");
            let finite: Vec<f32> = vals.iter().copied().filter(|v| v.is_finite()).collect();
            let mut rounded = finite.clone();
            let mut want = Vec::new();
            dtype.encode_into(&finite, &mut want);
            let mut got = vec![0u8; want.len()];
            codec.round_and_encode(dtype, &mut rounded, &mut got);
            assert!(got == want, "{dtype:?}");
            let mut back = Vec::new();
            dtype.decode_into(&want, &mut back);
            assert!(
                rounded
                    .iter()
                    .zip(&back)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dtype:?}"
            );
        }
    }
}
