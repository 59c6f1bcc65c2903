//! Distribution figures on features: mean and covariance, and the Fréchet distance between two
//! Gaussians (FID when the features are an evaluator's).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use nalgebra::{DMatrix, DVector, SymmetricEigen};

/// Mean and (unbiased) covariance of `[n, d]` features, in f64.
pub fn feature_stats(features: &Tensor) -> Result<(DVector<f64>, DMatrix<f64>)> {
    let (n, d) = features.dims2()?;
    if n < 2 {
        bail!("feature statistics need at least 2 images, got {n}")
    }
    let data = features
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let x = DMatrix::from_row_slice(n, d, &data);
    let mu = DVector::from_iterator(d, x.column_iter().map(|c| c.mean()));
    let mut centred = x;
    for mut row in centred.row_iter_mut() {
        row -= mu.transpose();
    }
    let sigma = centred.transpose() * &centred / (n as f64 - 1.0);
    Ok((mu, sigma))
}

/// Fréchet distance between N(mu1, s1) and N(mu2, s2):
/// |mu1 − mu2|² + tr(s1 + s2 − 2 (s1^½ s2 s1^½)^½). The symmetric form needs only symmetric
/// eigendecompositions (tr √(s1 s2) = tr √(s1^½ s2 s1^½)).
pub fn fid(
    mu1: &DVector<f64>,
    s1: &DMatrix<f64>,
    mu2: &DVector<f64>,
    s2: &DMatrix<f64>,
) -> Result<f64> {
    if mu1.len() != mu2.len() || s1.shape() != s2.shape() || s1.nrows() != mu1.len() {
        bail!("FID: feature sizes differ ({} vs {})", mu1.len(), mu2.len())
    }
    let sqrt_psd = |m: &DMatrix<f64>| {
        let e = SymmetricEigen::new((m + m.transpose()) * 0.5);
        let roots = e.eigenvalues.map(|v| v.max(0.0).sqrt());
        &e.eigenvectors * DMatrix::from_diagonal(&roots) * e.eigenvectors.transpose()
    };
    let r1 = sqrt_psd(s1);
    let m = &r1 * s2 * &r1;
    let e = SymmetricEigen::new((&m + m.transpose()) * 0.5);
    let tr_sqrt: f64 = e.eigenvalues.iter().map(|v| v.max(0.0).sqrt()).sum();
    Ok((mu1 - mu2).norm_squared() + s1.trace() + s2.trace() - 2.0 * tr_sqrt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn diag(v: &[f64]) -> DMatrix<f64> {
        DMatrix::from_diagonal(&DVector::from_row_slice(v))
    }

    #[test]
    fn fid_matches_closed_forms() -> Result<()> {
        let mu = DVector::from_row_slice(&[1.0, -2.0, 0.5]);
        let s = DMatrix::from_row_slice(3, 3, &[2.0, 0.3, 0.1, 0.3, 1.0, 0.2, 0.1, 0.2, 0.5]);
        assert!(fid(&mu, &s, &mu, &s)?.abs() < 1e-9);
        // Commuting (diagonal) covariances: Σ (√a − √b)² plus the mean term.
        let (a, b) = ([4.0, 1.0, 9.0], [1.0, 1.0, 4.0]);
        let mu2 = DVector::from_row_slice(&[0.0, -2.0, 0.5]);
        let want = 1.0 + (2.0f64 - 1.0).powi(2) + 0.0 + (3.0f64 - 2.0).powi(2);
        assert!((fid(&mu, &diag(&a), &mu2, &diag(&b))? - want).abs() < 1e-9);
        // Symmetric in its arguments even when the covariances do not commute.
        let s2 = DMatrix::from_row_slice(3, 3, &[1.0, -0.4, 0.0, -0.4, 2.0, 0.5, 0.0, 0.5, 1.5]);
        let (x, y) = (fid(&mu, &s, &mu2, &s2)?, fid(&mu2, &s2, &mu, &s)?);
        assert!((x - y).abs() < 1e-9 && x > 0.0, "{x} {y}");
        Ok(())
    }

    #[test]
    fn feature_stats_are_mean_and_unbiased_covariance() -> Result<()> {
        let f = Tensor::new(&[[1f32, 2.0], [3.0, 2.0], [5.0, 8.0]], &Device::Cpu)?;
        let (mu, s) = feature_stats(&f)?;
        assert_eq!(mu.as_slice(), &[3.0, 4.0]);
        // x: 1,3,5 (var 4); y: 2,2,8 (var 12); cov = ((−2)(−2) + 0 + 2·4)/2 = 6.
        assert_eq!(s.as_slice(), &[4.0, 6.0, 6.0, 12.0]);
        Ok(())
    }
}
