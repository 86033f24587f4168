//! Small dense eigen solvers in f64: the implicit QL algorithm for symmetric tridiagonal
//! matrices (optionally tracking the first row of the eigenvector matrix, which is all Gauss
//! quadrature needs), Householder tridiagonalization of a dense symmetric matrix (eigenvalues
//! only), and cyclic Jacobi with eigenvectors for the small Rayleigh-Ritz problems.

/// Eigenvalues of the symmetric tridiagonal matrix with diagonal `d` and sub-diagonal `e`
/// (`e[i]` couples `i` and `i + 1`; `e.len() == d.len()`, the last entry is ignored), by the
/// implicit QL algorithm with Wilkinson-like shifts. On return `d` holds the eigenvalues
/// (unsorted). If `z` is given it must start as the first row of the initial eigenvector matrix
/// (usually `e_1^T`) and ends as the first row of the eigenvector matrix: `z[i]` is the first
/// component of the eigenvector of `d[i]`. Returns false if an eigenvalue did not converge in
/// 60 iterations (the values are then still usable approximations).
pub fn tridiagonal_ql(d: &mut [f64], e: &mut [f64], mut z: Option<&mut [f64]>) -> bool {
    let n = d.len();
    assert_eq!(e.len(), n);
    if n == 0 {
        return true;
    }
    e[n - 1] = 0.0;
    let mut ok = true;
    for l in 0..n {
        let mut iter = 0;
        loop {
            let mut m = l;
            while m + 1 < n {
                let dd = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * dd {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            iter += 1;
            if iter > 60 {
                ok = false;
                break;
            }
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[m] - d[l] + e[l] / (g + if g >= 0.0 { r } else { -r });
            let (mut s, mut c, mut p) = (1.0f64, 1.0f64, 0.0f64);
            let mut early = false;
            let mut i = m;
            while i > l {
                i -= 1;
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    early = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
                if let Some(z) = z.as_deref_mut() {
                    let f = z[i + 1];
                    z[i + 1] = s * z[i] + c * f;
                    z[i] = c * z[i] - s * f;
                }
            }
            if early {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    ok
}

/// Gauss quadrature of `sqrt` for the spectral measure encoded by an upper bidiagonal matrix
/// (diagonal `alpha`, super-diagonal `beta`, `beta.len() >= alpha.len() - 1`; extra entries
/// ignored): `sum_i w_i sqrt(theta_i)` with `theta_i` the eigenvalues of `T = B^T B` and `w_i`
/// the squared first components of its eigenvectors. The weights sum to 1.
pub fn bidiagonal_sqrt_quadrature(alpha: &[f64], beta: &[f64]) -> f64 {
    let k = alpha.len();
    if k == 0 {
        return 0.0;
    }
    let mut d = vec![0.0; k];
    let mut e = vec![0.0; k];
    for j in 0..k {
        d[j] = alpha[j] * alpha[j];
        if j > 0 {
            d[j] += beta[j - 1] * beta[j - 1];
        }
        if j + 1 < k {
            e[j] = alpha[j] * beta[j];
        }
    }
    let mut z = vec![0.0; k];
    z[0] = 1.0;
    tridiagonal_ql(&mut d, &mut e, Some(&mut z));
    d.iter()
        .zip(&z)
        .map(|(&t, &w)| w * w * t.max(0.0).sqrt())
        .sum()
}

/// Eigenvalues of a dense symmetric `n x n` matrix (row-major, both triangles filled; it is
/// overwritten) by Householder reduction to tridiagonal form and the implicit QL algorithm.
pub fn symmetric_eigenvalues(a: &mut [f64], n: usize) -> Vec<f64> {
    assert_eq!(a.len(), n * n);
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    if n == 0 {
        return d;
    }
    let mut v = vec![0.0; n];
    let mut p = vec![0.0; n];
    for k in 0..n.saturating_sub(2) {
        // Householder vector for column k below the diagonal.
        let len = n - k - 1;
        let x0 = a[(k + 1) * n + k];
        let mut norm2 = 0.0;
        for i in k + 1..n {
            let x = a[i * n + k];
            norm2 += x * x;
        }
        let norm = norm2.sqrt();
        if norm == 0.0 {
            e[k] = 0.0;
            continue;
        }
        let alpha = if x0 >= 0.0 { -norm } else { norm };
        let v = &mut v[..len];
        for (t, i) in (k + 1..n).enumerate() {
            v[t] = a[i * n + k];
        }
        v[0] -= alpha;
        let vtv = norm2 - 2.0 * alpha * x0 + alpha * alpha;
        if vtv == 0.0 {
            e[k] = x0;
            continue;
        }
        let tau = 2.0 / vtv;
        // p = tau * A22 v
        let p = &mut p[..len];
        for (t, i) in (k + 1..n).enumerate() {
            let row = &a[i * n + k + 1..i * n + n];
            p[t] = tau * row.iter().zip(v.iter()).map(|(x, y)| x * y).sum::<f64>();
        }
        let kk = 0.5 * tau * p.iter().zip(v.iter()).map(|(x, y)| x * y).sum::<f64>();
        for t in 0..len {
            p[t] -= kk * v[t];
        }
        // A22 -= v p^T + p v^T
        for (t, i) in (k + 1..n).enumerate() {
            let (vt, pt) = (v[t], p[t]);
            let row = &mut a[i * n + k + 1..i * n + n];
            for s in 0..len {
                row[s] -= vt * p[s] + pt * v[s];
            }
        }
        e[k] = alpha;
    }
    for i in 0..n {
        d[i] = a[i * n + i];
    }
    if n >= 2 {
        e[n - 2] = a[(n - 1) * n + n - 2];
    }
    tridiagonal_ql(&mut d, &mut e, None);
    d
}

/// Eigen-decomposition of a small dense symmetric `n x n` matrix (row-major, overwritten) by
/// cyclic Jacobi rotations. Returns the eigenvalues and the eigenvectors as the columns of a
/// row-major `n x n` matrix, sorted by decreasing eigenvalue.
pub fn jacobi_eigen(a: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(a.len(), n * n);
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..60 {
        let mut off = 0.0;
        let mut diag = 0.0;
        for i in 0..n {
            diag += a[i * n + i] * a[i * n + i];
            for j in i + 1..n {
                off += a[i * n + j] * a[i * n + j];
            }
        }
        if off <= 1e-30 * diag || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let app = a[p * n + p];
                let aqq = a[q * n + q];
                let theta = (aqq - app) / (2.0 * apq);
                let t = if theta >= 0.0 {
                    1.0 / (theta + (theta * theta + 1.0).sqrt())
                } else {
                    -1.0 / (-theta + (theta * theta + 1.0).sqrt())
                };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]));
    let vals = order.iter().map(|&i| a[i * n + i]).collect();
    let mut vecs = vec![0.0; n * n];
    for (c, &i) in order.iter().enumerate() {
        for k in 0..n {
            vecs[k * n + c] = v[k * n + i];
        }
    }
    (vals, vecs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut v: Vec<f64>) -> Vec<f64> {
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }

    #[test]
    fn tridiagonal_ql_matches_known_spectrum() {
        // The (-1, 2, -1) matrix has eigenvalues 2 - 2 cos(k pi / (n + 1)).
        let n = 50;
        let mut d = vec![2.0; n];
        let mut e = vec![-1.0; n];
        let mut z = vec![0.0; n];
        z[0] = 1.0;
        assert!(tridiagonal_ql(&mut d, &mut e, Some(&mut z)));
        let got = sorted(d);
        for (k, g) in got.iter().enumerate() {
            let want = 2.0 - 2.0 * ((k + 1) as f64 * std::f64::consts::PI / (n + 1) as f64).cos();
            assert!((g - want).abs() < 1e-12, "{k}: {g} vs {want}");
        }
        let wsum: f64 = z.iter().map(|x| x * x).sum();
        assert!((wsum - 1.0).abs() < 1e-12);
    }

    #[test]
    fn dense_solvers_agree() {
        let n = 40;
        let key = crate::tracenorm::rng::vector_key(3, 4, 5);
        let mut m = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..=i {
                let x = crate::tracenorm::rng::normal(key, (i * n + j) as u64);
                m[i * n + j] = x;
                m[j * n + i] = x;
            }
        }
        let trace: f64 = (0..n).map(|i| m[i * n + i]).sum();
        let a = sorted(symmetric_eigenvalues(&mut m.clone(), n));
        let (b, vecs) = jacobi_eigen(&mut m.clone(), n);
        let b = sorted(b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-10, "{x} vs {y}");
        }
        assert!((a.iter().sum::<f64>() - trace).abs() < 1e-10);
        // Eigenvectors are orthonormal.
        for c in 0..n {
            let nrm: f64 = (0..n).map(|k| vecs[k * n + c] * vecs[k * n + c]).sum();
            assert!((nrm - 1.0).abs() < 1e-10);
        }
    }

    #[test]
    fn bidiagonal_quadrature_is_exact_for_a_full_run() {
        // For B = diag(alpha) (beta = 0) started at e_1 the measure is a point mass at alpha_1^2.
        assert!((bidiagonal_sqrt_quadrature(&[3.0, 5.0], &[0.0]) - 3.0).abs() < 1e-14);
        // A 2x2 bidiagonal: weights are the squared first eigenvector components of B^T B.
        let (a, b) = ([1.0, 2.0], [1.5]);
        let t = [1.0, 1.5, 1.5, 1.5 * 1.5 + 4.0];
        let (vals, vecs) = jacobi_eigen(&mut t.to_vec(), 2);
        let want: f64 = (0..2).map(|i| vecs[i] * vecs[i] * vals[i].sqrt()).sum();
        assert!((bidiagonal_sqrt_quadrature(&a, &b) - want).abs() < 1e-14);
    }
}
