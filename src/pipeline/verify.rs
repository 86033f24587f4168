//! Checks a decompressed checkpoint against the original fine-tune and the algorithm's rules
//! (used by `demo`, and by users who want to see what the compression did).

use crate::checkpoint::reader::Checkpoint;
use crate::error::{Error, Result};
use crate::format::{TensorKind, UdeltaReader};
use serde::Serialize;

/// What verification found.
#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyReport {
    /// Tensors restored bit-exact (unchanged, raw and coded ones).
    pub exact_tensors: usize,
    /// Compressed tensors checked.
    pub compressed_tensors: usize,
    /// Elements of compressed tensors that differ from the base in the output.
    pub changed_elements: u64,
    /// Elements of compressed tensors.
    pub compressed_elements: u64,
    /// Cosine similarity between the reconstructed and the true delta, over all compressed tensors.
    pub delta_cosine: f64,
}

/// Compares `restored` (decompress output) with the original `finetuned` and `base`.
pub fn verify(
    reader: &UdeltaReader,
    base: &Checkpoint,
    finetuned: &Checkpoint,
    restored: &Checkpoint,
) -> Result<VerifyReport> {
    let mut rep = VerifyReport::default();
    let (mut dot, mut nr, mut nt) = (0f64, 0f64, 0f64);
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for r in &reader.index.tensors {
        let (Some(ft), Some(out)) = (finetuned.get(&r.name), restored.get(&r.name)) else {
            return Err(Error::tensor(
                &restored.path,
                &r.name,
                "missing from the restored checkpoint",
            ));
        };
        if out.dtype != ft.dtype || out.shape != ft.shape {
            return Err(Error::tensor(
                &restored.path,
                &r.name,
                "dtype or shape differs from the fine-tune",
            ));
        }
        finetuned.read_tensor(ft, &mut a)?;
        restored.read_tensor(out, &mut b)?;
        match &r.kind {
            TensorKind::Unchanged { .. } | TensorKind::Raw { .. } | TensorKind::Coded(_) => {
                if a != b {
                    return Err(Error::tensor(
                        &restored.path,
                        &r.name,
                        "not restored bit-exact",
                    ));
                }
                rep.exact_tensors += 1;
            }
            TensorKind::Compressed(cz) => {
                let bt = base
                    .get(&r.name)
                    .ok_or_else(|| Error::tensor(&base.path, &r.name, "missing from the base"))?;
                base.read_tensor(bt, &mut c)?;
                let (ty, bty) = (
                    ft.float_type().expect("compressed tensors are float"),
                    bt.float_type().expect("float base"),
                );
                for i in 0..cz.shared_numel as usize {
                    let base_v = bty.load(&c, i) as f64;
                    let restored_v = ty.load(&b, i) as f64;
                    let true_d = ty.load(&a, i) as f64 - base_v;
                    let rec_d = restored_v - base_v;
                    if rec_d != 0.0 {
                        rep.changed_elements += 1;
                    }
                    dot += rec_d * true_d;
                    nr += rec_d * rec_d;
                    nt += true_d * true_d;
                }
                let tail = cz.shared_numel as usize * ty.size();
                if a[tail..] != b[tail..] {
                    return Err(Error::tensor(
                        &restored.path,
                        &r.name,
                        "new vocabulary rows not restored bit-exact",
                    ));
                }
                rep.compressed_tensors += 1;
                rep.compressed_elements += cz.shared_numel;
            }
        }
    }
    rep.delta_cosine = if nr > 0.0 && nt > 0.0 {
        dot / (nr.sqrt() * nt.sqrt())
    } else {
        0.0
    };
    Ok(rep)
}
