//! The DDPM noise schedule every sampler and the distillation share: betas → ᾱ_t (alphas_cumprod),
//! forward noising, and the epsilon-parameterisation identities. Pure functions over tensors.

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

use crate::model::config::SchedulerConfig;
use crate::sample::noise::NoiseSource;

#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// ᾱ_t for t = 0 … T−1, rounded to f32 as diffusers stores them, held as f64.
    pub alphas_cumprod: Vec<f64>,
    /// ᾱ used for a "previous" timestep below zero (`set_alpha_to_one`).
    pub final_alpha_cumprod: f64,
}

impl NoiseSchedule {
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let n = cfg.num_train_timesteps;
        let lin = |a: f64, b: f64| -> Vec<f64> {
            (0..n)
                .map(|i| {
                    if n == 1 {
                        a
                    } else {
                        a + (b - a) * i as f64 / (n - 1) as f64
                    }
                })
                .collect()
        };
        let betas: Vec<f64> = match cfg.beta_schedule.as_str() {
            "scaled_linear" => lin(cfg.beta_start.sqrt(), cfg.beta_end.sqrt())
                .into_iter()
                .map(|b| b * b)
                .collect(),
            "linear" => lin(cfg.beta_start, cfg.beta_end),
            other => bail!("beta_schedule {other:?} is not supported"),
        };
        let mut acc = 1.0f64;
        let alphas_cumprod: Vec<f64> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc as f32 as f64
            })
            .collect();
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// ᾱ_t, or the final ᾱ for t < 0.
    pub fn alpha_bar(&self, t: i64) -> f64 {
        if t < 0 {
            self.final_alpha_cumprod
        } else {
            self.alphas_cumprod[(t as usize).min(self.alphas_cumprod.len() - 1)]
        }
    }

    /// x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise with one t per sample (`timesteps.len()` = batch).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let a: Vec<f64> = timesteps
            .iter()
            .map(|&t| self.alpha_bar(t as i64))
            .collect();
        let sa = per_sample(&a.iter().map(|a| a.sqrt()).collect::<Vec<_>>(), x0)?;
        let sb = per_sample(&a.iter().map(|a| (1.0 - a).sqrt()).collect::<Vec<_>>(), x0)?;
        Ok(x0.broadcast_mul(&sa)?.add(&noise.broadcast_mul(&sb)?)?)
    }
}

/// diffusers' `noise_offset` (offset noise): ε + s·δ, δ ~ N(0, 1) drawn from `src` once per
/// sample and channel and constant over space. Small latents leave the per-channel mean of x_T
/// readable at SD1.5's last timestep (at 16×16 the mean of ε has std 1/16, about the signal
/// √ᾱ_T·std(mean x0)), so a model trained on plain ε takes the image's overall colour from the
/// seed instead of the prompt; the offset makes that mean uninformative.
pub fn offset_noise(noise: &Tensor, strength: f64, src: &mut dyn NoiseSource) -> Result<Tensor> {
    let dims = noise.dims();
    let mut shape = dims[..2].to_vec();
    shape.extend(std::iter::repeat_n(1, dims.len().saturating_sub(2)));
    let delta = src.sample(&shape.into(), noise.device())?;
    Ok(noise.broadcast_add(&delta.affine(strength, 0.0)?)?)
}

/// `[b, 1, 1, …]` tensor of per-sample scalars, shaped to broadcast against `like`, in its dtype.
pub fn per_sample(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![values.len()];
    shape.extend(std::iter::repeat_n(1, like.rank().saturating_sub(1)));
    let t = Tensor::from_vec(
        values.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
        shape,
        like.device(),
    )?;
    Ok(t.to_dtype(like.dtype())?)
}

/// x0 = (x_t − √(1−ᾱ)·ε)/√ᾱ, with `alpha_bar` broadcastable against `x` (scalar or per sample).
pub fn x0_from_eps(x: &Tensor, eps: &Tensor, alpha_bar: &Tensor) -> Result<Tensor> {
    let sa = alpha_bar.sqrt()?;
    let sb = alpha_bar.affine(-1.0, 1.0)?.sqrt()?;
    Ok(x.sub(&eps.broadcast_mul(&sb)?)?.broadcast_div(&sa)?)
}

/// √ᾱ·x0 + √(1−ᾱ)·ε: the inverse of [`x0_from_eps`] and the deterministic DDIM step.
pub fn ddim_combine(x0: &Tensor, eps: &Tensor, alpha_bar: &Tensor) -> Result<Tensor> {
    let sa = alpha_bar.sqrt()?;
    let sb = alpha_bar.affine(-1.0, 1.0)?.sqrt()?;
    Ok(x0.broadcast_mul(&sa)?.add(&eps.broadcast_mul(&sb)?)?)
}

/// Consistency-model boundary scalings at timestep `t` (sigma_data 0.5, diffusers'
/// `get_scalings_for_boundary_condition_discrete`): c_skip(0) = 1, c_out(0) = 0.
pub fn boundary_scalings(t: f64, timestep_scaling: f64) -> (f64, f64) {
    let sigma_data2 = 0.25;
    let s = t * timestep_scaling;
    let c_skip = sigma_data2 / (s * s + sigma_data2);
    let c_out = s / (s * s + sigma_data2).sqrt();
    (c_skip, c_out)
}

/// Min-SNR-γ loss weights for ε-prediction (Hang et al. 2023; diffusers' `--snr_gamma`):
/// min(SNR_t, γ)/SNR_t with SNR_t = ᾱ_t/(1 − ᾱ_t). Nearly clean timesteps, where the ε loss is
/// spent on fine detail, are weighted down; the noisy ones that decide layout keep weight 1.
pub fn min_snr_weights(schedule: &NoiseSchedule, timesteps: &[usize], gamma: f64) -> Vec<f64> {
    timesteps
        .iter()
        .map(|&t| {
            let a = schedule.alpha_bar(t as i64);
            let snr = a / (1.0 - a);
            snr.min(gamma) / snr
        })
        .collect()
}

/// Mean over all but the batch dimension, e.g. a per-sample loss.
pub fn mean_per_sample(x: &Tensor) -> Result<Tensor> {
    let b = x.dim(0)?;
    Ok(x.reshape((b, ()))?.mean(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_noise_shifts_each_channel_by_its_own_constant() {
        let dev = candle_core::Device::Cpu;
        let noise = Tensor::randn(0f32, 1.0, (2, 3, 4, 4), &dev).unwrap();
        let delta = Tensor::new(&[[1f32, -2.0, 0.5], [0.0, 3.0, -1.0]], &dev).unwrap();
        let mut src = crate::sample::noise::RecordedNoise(
            [delta.reshape((2, 3, 1, 1)).unwrap()].into_iter().collect(),
        );
        let out = offset_noise(&noise, 0.1, &mut src).unwrap();
        assert_eq!(out.dims(), noise.dims());
        let diff = (out - &noise)
            .unwrap()
            .flatten_from(2)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let want = delta.to_vec2::<f32>().unwrap();
        for (b, row) in diff.iter().enumerate() {
            for (c, px) in row.iter().enumerate() {
                for v in px {
                    assert!((v - 0.1 * want[b][c]).abs() < 1e-6, "{b} {c} {v}");
                }
            }
        }
    }

    #[test]
    fn min_snr_weights_cap_only_the_clean_timesteps() {
        let s = NoiseSchedule::from_config(&SchedulerConfig::default()).unwrap();
        let ts = [0, 100, 500, 999];
        let w = min_snr_weights(&s, &ts, 5.0);
        for (&t, &w) in ts.iter().zip(&w) {
            let a = s.alphas_cumprod[t];
            let snr = a / (1.0 - a);
            let want = if snr > 5.0 { 5.0 / snr } else { 1.0 };
            assert!((w - want).abs() < 1e-12, "t {t}: {w} vs {want}");
        }
        // SD1.5's schedule: t = 0 is almost clean (weight ≪ 1), t = 999 pure noise (weight 1).
        assert!(w[0] < 0.01 && w[3] == 1.0);
        assert!(w.windows(2).all(|p| p[0] <= p[1]));
        assert!(min_snr_weights(&s, &ts, f64::INFINITY)
            .iter()
            .all(|&w| w == 1.0));
    }

    #[test]
    fn boundary_conditions_hold() {
        let (s, o) = boundary_scalings(0.0, 10.0);
        assert_eq!((s, o), (1.0, 0.0));
        let (s, o) = boundary_scalings(999.0, 10.0);
        assert!(s < 1e-8 && (o - 1.0).abs() < 1e-8);
    }

    #[test]
    fn alpha_bar_decreases_and_final_follows_config() {
        let mut cfg = SchedulerConfig {
            set_alpha_to_one: Some(false),
            ..Default::default()
        };
        let s = NoiseSchedule::from_config(&cfg).unwrap();
        assert!(s.alphas_cumprod.windows(2).all(|w| w[1] < w[0]));
        assert_eq!(s.alpha_bar(-1), s.alphas_cumprod[0]);
        cfg.set_alpha_to_one = Some(true);
        assert_eq!(NoiseSchedule::from_config(&cfg).unwrap().alpha_bar(-5), 1.0);
    }
}
