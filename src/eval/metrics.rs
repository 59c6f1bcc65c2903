//! Figures on an evaluator's embeddings, for any modality: mean and covariance and the Fréchet
//! distance between two Gaussians (FID); cross-modal R-precision and matching distance (MM-Dist),
//! Diversity and MultiModality with the T2M evaluators' formulas; a mean with its 95 % interval
//! over replications.

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

/// `[n, d]` features as an n × d matrix of f64 (one sample per row).
pub fn to_matrix(features: &Tensor) -> Result<DMatrix<f64>> {
    let (n, d) = features.dims2()?;
    let data = features
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(n, d, &data))
}

fn row_distance(a: &DMatrix<f64>, i: usize, b: &DMatrix<f64>, j: usize) -> f64 {
    (a.row(i) - b.row(j)).norm()
}

/// Cross-modal retrieval figures of paired embeddings (row i of `samples` belongs with row i of
/// `captions`), as the T2M evaluators compute them: the pairs in order are cut into groups of
/// `group` (32 in the literature; a last partial group is dropped); within a group each sample
/// ranks the group's captions by Euclidean distance. Returns R-precision at top 1..=`top_k` and
/// the matching distance (MM-Dist: the mean distance of each sample to its own caption, over the
/// same pairs).
pub fn r_precision(
    samples: &DMatrix<f64>,
    captions: &DMatrix<f64>,
    group: usize,
    top_k: usize,
) -> Result<(Vec<f64>, f64)> {
    if samples.shape() != captions.shape() {
        bail!(
            "R-precision: {:?} samples vs {:?} captions",
            samples.shape(),
            captions.shape()
        )
    }
    let groups = samples.nrows() / group.max(1);
    if group == 0 || groups == 0 {
        bail!(
            "R-precision needs at least one group of {group} pairs, got {}",
            samples.nrows()
        )
    }
    let (mut hits, mut matched) = (vec![0usize; top_k], 0f64);
    for g in 0..groups {
        let base = g * group;
        for i in base..base + group {
            let own = row_distance(samples, i, captions, i);
            matched += own;
            // The caption's rank: how many others are strictly nearer (ties count in its favour).
            let nearer = (base..base + group)
                .filter(|&j| j != i && row_distance(samples, i, captions, j) < own)
                .count();
            for (k, h) in hits.iter_mut().enumerate() {
                *h += usize::from(nearer <= k);
            }
        }
    }
    let n = (groups * group) as f64;
    Ok((hits.iter().map(|&h| h as f64 / n).collect(), matched / n))
}

/// Diversity: the mean distance between `pairs` random pairs of samples (two independent draws
/// of `pairs` distinct rows; 300 in the literature).
pub fn diversity(samples: &DMatrix<f64>, pairs: usize, rng: &mut impl rand::Rng) -> Result<f64> {
    let n = samples.nrows();
    if pairs == 0 || pairs > n {
        bail!("diversity: {pairs} pairs from {n} samples")
    }
    let a = rand::seq::index::sample(rng, n, pairs);
    let b = rand::seq::index::sample(rng, n, pairs);
    let total: f64 = a
        .iter()
        .zip(b.iter())
        .map(|(i, j)| row_distance(samples, i, samples, j))
        .sum();
    Ok(total / pairs as f64)
}

/// MultiModality: for each caption, the mean distance between `pairs` random pairs among its own
/// samples (`per_caption[c]` holds caption c's samples, one per row), averaged over captions.
pub fn multimodality(
    per_caption: &[DMatrix<f64>],
    pairs: usize,
    rng: &mut impl rand::Rng,
) -> Result<f64> {
    if per_caption.is_empty() {
        bail!("multimodality: no captions")
    }
    let mut total = 0.0;
    for m in per_caption {
        total += diversity(m, pairs, rng)?;
    }
    Ok(total / per_caption.len() as f64)
}

/// Mean and 95 % confidence half-width (1.96 σ/√n) of repeated measurements.
pub fn mean_interval(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.96 * var.sqrt() / n.sqrt())
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

    fn points(n: usize, d: usize, seed: u64) -> DMatrix<f64> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        DMatrix::from_fn(n, d, |_, _| rng.random_range(-1.0..1.0))
    }

    #[test]
    fn retrieval_figures_have_their_closed_forms() -> Result<()> {
        use rand::SeedableRng;
        let x = points(64, 8, 1);
        // Perfectly matched embeddings: every caption is its sample's nearest, distance 0.
        let (r, mm) = r_precision(&x, &x, 32, 3)?;
        assert_eq!(r, [1.0, 1.0, 1.0]);
        assert_eq!(mm, 0.0);
        // Captions shifted by one within each group: no sample finds its own first.
        let mut shifted = x.clone();
        for g in 0..2 {
            for i in 0..32 {
                shifted.set_row(g * 32 + i, &x.row(g * 32 + (i + 1) % 32));
            }
        }
        let (r, _) = r_precision(&x, &shifted, 32, 1)?;
        assert_eq!(r, [0.0]);
        // Independent random captions: near chance, k/32.
        let (r, _) = r_precision(&points(3200, 8, 2), &points(3200, 8, 3), 32, 3)?;
        for (k, v) in r.iter().enumerate() {
            let chance = (k + 1) as f64 / 32.0;
            assert!((v - chance).abs() < 0.02, "R@{}: {v} vs {chance}", k + 1);
        }
        // Diversity of one repeated point is 0; of two points at distance 2, half the random
        // pairs differ (mean ≈ 1 over many draws).
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let same = DMatrix::from_element(10, 3, 0.5);
        assert_eq!(diversity(&same, 10, &mut rng)?, 0.0);
        assert_eq!(multimodality(&[same.clone(), same], 5, &mut rng)?, 0.0);
        let two = DMatrix::from_fn(1000, 1, |i, _| if i % 2 == 0 { -1.0 } else { 1.0 });
        let d = diversity(&two, 1000, &mut rng)?;
        assert!((d - 1.0).abs() < 0.1, "{d}");
        assert!(diversity(&two, 1001, &mut rng).is_err());
        let (m, h) = mean_interval(&[1.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((h - 1.96 / 2f64.sqrt()).abs() < 1e-12);
        Ok(())
    }
}
