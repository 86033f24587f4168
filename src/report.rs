//! What `inspect` (and `compress`, for the file it wrote) reports: per-tensor sizes measured
//! from the file itself, totals, the measured ratio and the paper's entropy-bound ratio.

use crate::checkpoint::dtype::{checked_byte_len, dtype_from_name};
use crate::format::{TensorKind, UdeltaReader};
use serde::Serialize;
use std::collections::BTreeMap;

/// One tensor's line.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    /// Name.
    pub name: String,
    /// Fine-tuned shape.
    pub shape: Vec<usize>,
    /// `compressed`, `coded` (lossless, format v2), `raw` (format v1) or `unchanged`.
    pub kind: &'static str,
    /// Bytes of the fine-tuned tensor (its dtype and shape).
    pub bytes_tensor: u64,
    /// Pruning rate (compressed tensors).
    pub rate: Option<f64>,
    /// Kept entries (compressed tensors).
    pub kept: Option<u64>,
    /// Bytes of the position stream.
    pub bytes_positions: u64,
    /// Bytes of the level stream.
    pub bytes_levels: u64,
    /// Bytes of this tensor's index entry (its share of the deflated index).
    pub bytes_meta: u64,
    /// Bytes stored losslessly (coded and raw tensors, new vocabulary rows).
    pub bytes_raw: u64,
}

impl TensorReport {
    /// Bytes this tensor takes in the file: its records and its share of the index.
    pub fn bytes_stored(&self) -> u64 {
        self.bytes_positions + self.bytes_levels + self.bytes_meta + self.bytes_raw
    }
}

/// The tensors of one kind, together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KindBytes {
    /// How many.
    pub tensors: u64,
    /// Their bytes in the fine-tuned checkpoint.
    pub tensor_bytes: u64,
    /// Their bytes in the file (records and index share).
    pub stored_bytes: u64,
}

/// One side file (config, tokenizer, ...) the file carries.
#[derive(Debug, Clone, Serialize)]
pub struct SideFileReport {
    /// Path relative to the checkpoint directory.
    pub path: String,
    /// Its size once restored.
    pub bytes: u64,
    /// Bytes it takes in the file (0 when it is the base's file).
    pub bytes_stored: u64,
    /// `same as base`, `against base` or `alone`.
    pub coding: &'static str,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    /// Model name.
    pub model: String,
    /// Engine that wrote the file.
    pub engine: String,
    /// Target sparsity.
    pub sparsity: f64,
    /// Bits.
    pub bits: u32,
    /// Sparsity step.
    pub step: f64,
    /// Additional factor.
    pub factor: f64,
    /// Seed.
    pub seed: u64,
    /// Trace-norm factor gamma.
    pub gamma: f64,
    /// Trace norm `T_m`, when estimated.
    pub trace_norm: Option<f64>,
    /// `gamma * factor / (1 - s)`.
    pub scale: f64,
    /// Base fingerprint.
    pub base_fingerprint: String,
    /// Per tensor.
    pub tensors: Vec<TensorReport>,
    /// The side files restored beside the weights.
    pub side_files: Vec<SideFileReport>,
    /// Parameters of the compressed tensors.
    pub compressed_params: u64,
    /// Kept entries.
    pub kept: u64,
    /// Bytes on disk of the compressed tensors (positions + levels + their index entries).
    pub compressed_bytes: u64,
    /// Bytes stored losslessly.
    pub raw_bytes: u64,
    /// Whole file.
    pub file_bytes: u64,
    /// Bytes of the fine-tuned checkpoint's tensors.
    pub tensor_bytes: u64,
    /// `tensor_bytes / file_bytes`: the whole-checkpoint ratio.
    pub ratio_file: f64,
    /// Per kind (`compressed`, `coded`, `raw`, `unchanged`; kinds present only).
    pub kinds: BTreeMap<&'static str, KindBytes>,
    /// fp16 bytes of the compressed tensors / `compressed_bytes`.
    pub ratio_measured: f64,
    /// `16 / (p*b + H2(p))` at the achieved density `p`.
    pub ratio_paper: f64,
    /// Achieved density `p = kept / compressed_params`.
    pub density: f64,
}

/// Binary entropy in bits.
pub fn h2(p: f64) -> f64 {
    if p <= 0.0 || p >= 1.0 {
        0.0
    } else {
        -p * p.log2() - (1.0 - p) * (1.0 - p).log2()
    }
}

/// The paper's ratio (entropy bound of the mask plus `bits`-bit values, against fp16).
pub fn paper_ratio(p: f64, bits: u32) -> f64 {
    16.0 / (p * bits as f64 + h2(p))
}

impl InspectReport {
    /// Builds the report of an open file.
    pub fn of(reader: &UdeltaReader) -> Self {
        let index = &reader.index;
        let tensors: Vec<TensorReport> = index
            .tensors
            .iter()
            .map(|r| {
                // The index is stored deflated: each tensor is charged its share of it.
                let json = serde_json::to_vec(r).map(|v| v.len() as u64).unwrap_or(0);
                let bytes_meta = (json as f64 * reader.index_len as f64
                    / reader.json_len.max(1) as f64)
                    .ceil() as u64;
                // The reader checked that dtype and shape give a byte size that fits in u64.
                let bytes_tensor = dtype_from_name(&r.dtype)
                    .and_then(|d| checked_byte_len(d, r.shape.iter().map(|&x| x as u64).product()))
                    .unwrap_or(0);
                let mut t = TensorReport {
                    name: r.name.clone(),
                    shape: r.shape.clone(),
                    kind: "unchanged",
                    bytes_tensor,
                    rate: None,
                    kept: None,
                    bytes_positions: 0,
                    bytes_levels: 0,
                    bytes_meta,
                    bytes_raw: 0,
                };
                match &r.kind {
                    TensorKind::Unchanged { .. } => {}
                    TensorKind::Raw { data } => {
                        t.kind = "raw";
                        t.bytes_raw = data.len;
                    }
                    TensorKind::Coded(c) => {
                        t.kind = "coded";
                        t.bytes_raw = c.data.len;
                    }
                    TensorKind::Compressed(c) => {
                        t.kind = "compressed";
                        t.rate = Some(c.rate);
                        t.kept = Some(c.kept());
                        t.bytes_positions = c.positions.len;
                        t.bytes_levels = c.levels.len;
                        t.bytes_raw = c.tail.map_or(0, |x| x.len);
                    }
                }
                t
            })
            .collect();
        let compressed = || {
            index.tensors.iter().filter_map(|r| match &r.kind {
                TensorKind::Compressed(c) => Some(c.as_ref()),
                _ => None,
            })
        };
        let compressed_params: u64 = compressed().map(|c| c.shared_numel).sum();
        let kept: u64 = compressed().map(|c| c.kept()).sum();
        let compressed_bytes: u64 = tensors
            .iter()
            .filter(|t| t.kind == "compressed")
            .map(|t| t.bytes_positions + t.bytes_levels + t.bytes_meta)
            .sum();
        let density = if compressed_params > 0 {
            kept as f64 / compressed_params as f64
        } else {
            0.0
        };
        let p = &index.params;
        let mut kinds: BTreeMap<&'static str, KindBytes> = BTreeMap::new();
        for t in &tensors {
            let k = kinds.entry(t.kind).or_default();
            k.tensors += 1;
            k.tensor_bytes += t.bytes_tensor;
            k.stored_bytes += t.bytes_stored();
        }
        let tensor_bytes: u64 = tensors.iter().map(|t| t.bytes_tensor).sum();
        InspectReport {
            model: index.model.name.clone(),
            engine: index.engine.clone(),
            sparsity: p.sparsity,
            bits: p.bits,
            step: p.step,
            factor: p.factor,
            seed: p.seed,
            gamma: index.model.gamma,
            trace_norm: index.model.trace_norm,
            scale: index.model.scale,
            base_fingerprint: index.base.fingerprint.clone(),
            raw_bytes: tensors.iter().map(|t| t.bytes_raw).sum(),
            tensors,
            side_files: index
                .side_files
                .iter()
                .map(|f| SideFileReport {
                    path: f.path.clone(),
                    bytes: f.len,
                    bytes_stored: f.stored_len(),
                    coding: f.coding(),
                })
                .collect(),
            compressed_params,
            kept,
            compressed_bytes,
            file_bytes: reader.file_len,
            tensor_bytes,
            ratio_file: tensor_bytes as f64 / reader.file_len.max(1) as f64,
            kinds,
            ratio_measured: if compressed_bytes > 0 {
                2.0 * compressed_params as f64 / compressed_bytes as f64
            } else {
                0.0
            },
            ratio_paper: paper_ratio(density, p.bits),
            density,
        }
    }

    /// The human-readable table.
    pub fn to_text(&self, per_tensor: bool) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        if per_tensor {
            let _ = writeln!(
                s,
                "{:<56} {:>16} {:>10} {:>7} {:>10} {:>11} {:>10} {:>8} {:>10}",
                "tensor", "shape", "kind", "rate", "kept", "positions", "levels", "meta", "raw"
            );
            for t in &self.tensors {
                let shape = format!("{:?}", t.shape);
                let rate = t.rate.map_or("-".into(), |r| format!("{r:.4}"));
                let kept = t.kept.map_or("-".into(), |k| k.to_string());
                let _ = writeln!(
                    s,
                    "{:<56} {:>16} {:>10} {:>7} {:>10} {:>11} {:>10} {:>8} {:>10}",
                    t.name,
                    shape,
                    t.kind,
                    rate,
                    kept,
                    t.bytes_positions,
                    t.bytes_levels,
                    t.bytes_meta,
                    t.bytes_raw
                );
            }
        }
        if per_tensor {
            self.side_files_text(&mut s);
        }
        let _ = writeln!(
            s,
            "model {}  engine {}  base {}",
            self.model, self.engine, self.base_fingerprint
        );
        let _ = writeln!(s, "sparsity {}  bits {}  step {}  factor {}  seed {}  gamma {}  trace_norm {}  scale {:.6}",
            self.sparsity, self.bits, self.step, self.factor, self.seed, self.gamma,
            self.trace_norm.map_or("-".into(), |t| format!("{t:.6e}")), self.scale);
        let _ = writeln!(s, "compressed_params {}  kept {} (density {:.5})  compressed_bytes {}  raw_bytes {}  file_bytes {}",
            self.compressed_params, self.kept, self.density, self.compressed_bytes, self.raw_bytes, self.file_bytes);
        let _ = writeln!(
            s,
            "tensor_bytes {}  file_bytes {}  ratio_file {:.2}x",
            self.tensor_bytes, self.file_bytes, self.ratio_file
        );
        for (kind, k) in &self.kinds {
            let _ = writeln!(
                s,
                "  {kind:<10} {:>6} tensors  {:>14} tensor bytes  {:>14} stored bytes",
                k.tensors, k.tensor_bytes, k.stored_bytes
            );
        }
        let _ = writeln!(s, "ratio_measured {:.1}x  ratio_paper {:.1}x (16 / (p*b + H2(p)) at the achieved density)", self.ratio_measured, self.ratio_paper);
        let _ = writeln!(
            s,
            "side_files {} ({} bytes, {} stored)",
            self.side_files.len(),
            self.side_files.iter().map(|f| f.bytes).sum::<u64>(),
            self.side_files.iter().map(|f| f.bytes_stored).sum::<u64>()
        );
        s
    }

    /// The table of side files (nothing when there are none).
    fn side_files_text(&self, s: &mut String) {
        use std::fmt::Write;
        if self.side_files.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "{:<56} {:>12} {:>12}  coding",
            "side file", "bytes", "stored"
        );
        for f in &self.side_files {
            let _ = writeln!(
                s,
                "{:<56} {:>12} {:>12}  {}",
                f.path, f.bytes, f.bytes_stored, f.coding
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_ratios_match_the_published_figures() {
        // ULTRADELTA.md: 18.4, 32.9, 50.9, 132.5, 244.6 at s = 0.90 .. 0.995, b = 4.
        let want = [
            (0.90, 18.4),
            (0.95, 32.9),
            (0.97, 50.9),
            (0.99, 132.5),
            (0.995, 244.6),
        ];
        for (s, r) in want {
            let got = paper_ratio(1.0 - s, 4);
            assert!((got - r).abs() < 0.05, "s={s}: {got}");
        }
        assert_eq!(h2(0.5), 1.0);
    }
}
