//! Sources of the Gaussian noise sampling and training draw: seeded (ChaCha8, reproducible within
//! `lcm`) or recorded (replaying another run's draws, e.g. diffusers').

use std::collections::VecDeque;

use anyhow::{bail, Result};
use candle_core::{Device, Shape, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Source of the Gaussian noise a sampler draws (initial latents, LCM/TCD re-noising).
pub trait NoiseSource {
    fn sample(&mut self, shape: &Shape, device: &Device) -> Result<Tensor>;

    /// Keep drawing for the rows `keep` marks only (rows of the batch this source has drawn for
    /// so far). One stream for a whole batch cannot lose rows without changing the others' draws,
    /// so by default only "keep all" is allowed; [`SplitNoise`] drops whole sources.
    fn retain(&mut self, keep: &[bool]) -> Result<()> {
        if keep.contains(&false) {
            bail!("rows of one noise stream cannot leave a batch (give each row its own source)")
        }
        Ok(())
    }
}

/// Deterministic N(0, 1) noise from a seed (ChaCha8). Not torch's generator: use recorded latents
/// to reproduce a diffusers run exactly.
pub struct SeededNoise(ChaCha8Rng);

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }
}

impl NoiseSource for SeededNoise {
    fn sample(&mut self, shape: &Shape, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| StandardNormal.sample(&mut self.0))
            .collect();
        Ok(Tensor::from_vec(v, shape.clone(), device)?)
    }
}

/// Replays given tensors in order (e.g. the noise diffusers drew), failing when they run out.
pub struct RecordedNoise(pub VecDeque<Tensor>);

impl NoiseSource for RecordedNoise {
    fn sample(&mut self, shape: &Shape, device: &Device) -> Result<Tensor> {
        let Some(t) = self.0.pop_front() else {
            bail!("recorded noise exhausted")
        };
        if t.shape() != shape {
            bail!(
                "recorded noise has shape {:?}, sampler needs {:?}",
                t.shape(),
                shape
            )
        }
        Ok(t.to_device(device)?)
    }
}

/// A batch's noise: each request's rows come from that request's own source, so a request draws
/// the same numbers batched or alone. One source gets the whole shape, unchanged.
pub struct SplitNoise<'a> {
    /// Rows (samples) per source, in batch order.
    pub counts: Vec<usize>,
    pub sources: Vec<&'a mut dyn NoiseSource>,
}

impl NoiseSource for SplitNoise<'_> {
    /// A source whose rows all leave goes; one that keeps some is asked to retain those.
    fn retain(&mut self, keep: &[bool]) -> Result<()> {
        if keep.len() != self.counts.iter().sum::<usize>() {
            bail!(
                "{} rows to keep or drop in a batch of {}",
                keep.len(),
                self.counts.iter().sum::<usize>()
            )
        }
        let mut start = 0;
        let mut counts = Vec::with_capacity(self.counts.len());
        let mut sources = Vec::with_capacity(self.sources.len());
        for (k, src) in self.counts.iter().zip(self.sources.drain(..)) {
            let own = &keep[start..start + k];
            start += k;
            let kept = own.iter().filter(|&&b| b).count();
            if kept > 0 {
                src.retain(own)?;
                counts.push(kept);
                sources.push(src);
            }
        }
        self.counts = counts;
        self.sources = sources;
        Ok(())
    }

    fn sample(&mut self, shape: &Shape, device: &Device) -> Result<Tensor> {
        if self.sources.len() == 1 {
            return self.sources[0].sample(shape, device);
        }
        let dims = shape.dims();
        if dims.first() != Some(&self.counts.iter().sum()) {
            bail!("batched noise of shape {dims:?} does not match the batch")
        }
        let mut parts = Vec::with_capacity(self.counts.len());
        for (k, src) in self.counts.iter().zip(self.sources.iter_mut()) {
            let mut d = dims.to_vec();
            d[0] = *k;
            parts.push(src.sample(&d.into(), device)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}
