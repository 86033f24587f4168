//! Step 5: trace-norm-guided rescaling across fine-tunes of one base.

/// `gamma_m = min_j T_j / T_m` for the trace norms `T` of models compressed together; a single
/// model gets exactly 1. Fails (naming the model's position) when a model's whole compressed
/// delta is zero, for which gamma is undefined.
pub fn gammas(trace_norms: &[f64]) -> Result<Vec<f64>, String> {
    if trace_norms.len() == 1 {
        return Ok(vec![1.0]);
    }
    if let Some(i) = trace_norms
        .iter()
        .position(|&t| !(t.is_finite() && t > 0.0))
    {
        return Err(format!(
            "model {} has a trace norm of {}: its compressed delta is zero, so gamma is undefined",
            i + 1,
            trace_norms[i]
        ));
    }
    let min = trace_norms.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(trace_norms.iter().map(|&t| min / t).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smallest_trace_norm_gets_one() {
        assert_eq!(gammas(&[7.0]).unwrap(), vec![1.0]);
        assert_eq!(gammas(&[2.0, 4.0, 8.0]).unwrap(), vec![1.0, 0.5, 0.25]);
        assert!(gammas(&[2.0, 0.0]).unwrap_err().contains("model 2"));
    }
}
