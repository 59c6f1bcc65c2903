//! Samplers as diffusers defines them, reduced to bookkeeping over tensors: a timestep grid and a
//! `step` that maps (model output, x_t) to x_{prev}. No model inside, so every formula is tested
//! against diffusers' numbers on its own.
//!
//! * LCM multistep (Luo et al. 2023, `LCMScheduler`): consistency function with boundary scalings
//!   c_skip/c_out, re-noised to the next timestep between steps, not after the last.
//! * TCD (Zheng et al. 2024, `TCDScheduler`): strategic stochastic sampling with gamma (diffusers'
//!   `eta`); gamma = 0 is deterministic, gamma = 1 re-noises fully like LCM.
//! * DDIM (Song et al. 2020, `DDIMScheduler`, eta 0): the teacher's sampler.
//! * Flow map (`lcm` only, docs/flow-map.md): on the LCM grid, each step is the network's own
//!   jump to the next grid time (the last to the data), optionally TCD-style re-noised; the
//!   network is asked for the jump's ε ([`Sampler::jump_end`]).

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::model::config::SchedulerConfig;
use crate::sample::noise::NoiseSource;
use crate::sample::schedule::{boundary_scalings, ddim_combine, x0_from_eps, NoiseSchedule};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    Lcm,
    Tcd,
    Ddim,
    FlowMap,
}

/// `--sampler` for clap (its parsers want a displayable error).
pub fn parse_flag(s: &str) -> std::result::Result<SamplerKind, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

impl FromStr for SamplerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "lcm" => Ok(Self::Lcm),
            "tcd" => Ok(Self::Tcd),
            "ddim" => Ok(Self::Ddim),
            "flowmap" | "flow-map" => Ok(Self::FlowMap),
            _ => bail!("unknown sampler {s:?} (expected lcm, tcd, ddim or flowmap)"),
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Lcm => "lcm",
            Self::Tcd => "tcd",
            Self::Ddim => "ddim",
            Self::FlowMap => "flowmap",
        })
    }
}

/// LCM/TCD inference grid: the distillation grid [k−1, 2k−1, …, T−1] with k = T / original_steps,
/// reversed and sampled at floor(linspace(0, original_steps, n, endpoint=False)).
pub fn lcm_timesteps(num_train: usize, original_steps: usize, n: usize) -> Result<Vec<usize>> {
    lcm_timesteps_strength(num_train, original_steps, n, 1.0)
}

/// [`lcm_timesteps`] for image-to-image at `strength` (diffusers' `LCMScheduler.set_timesteps`
/// with `strength`): only the first ⌊original_steps · strength⌋ points of the distillation grid,
/// [k−1, …, m·k−1], reversed and sampled the same way.
pub fn lcm_timesteps_strength(
    num_train: usize,
    original_steps: usize,
    n: usize,
    strength: f64,
) -> Result<Vec<usize>> {
    if n == 0 {
        bail!("steps must be at least 1")
    }
    if original_steps == 0 || original_steps > num_train {
        bail!("original_inference_steps {original_steps} must be in 1..={num_train}")
    }
    check_strength(strength)?;
    let m = (original_steps as f64 * strength) as usize;
    if n > m {
        if m == original_steps {
            bail!("steps {n} exceed original_inference_steps {original_steps}")
        }
        bail!(
            "steps {n} exceed the {m} distillation timesteps that strength {strength} leaves of {original_steps}"
        )
    }
    let k = num_train / original_steps;
    let origin: Vec<usize> = (1..=m).rev().map(|i| i * k - 1).collect();
    Ok((0..n)
        .map(|i| origin[(i as f64 * m as f64 / n as f64).floor() as usize])
        .collect())
}

fn check_strength(strength: f64) -> Result<()> {
    if !(strength > 0.0 && strength <= 1.0) {
        bail!("strength must be in (0, 1], got {strength}")
    }
    Ok(())
}

/// The tail of a many-step grid that image-to-image runs at `strength` (diffusers'
/// `StableDiffusionImg2ImgPipeline.get_timesteps`): the last ⌊n · strength⌋ of its n steps.
pub fn strength_tail(grid: &[usize], strength: f64) -> Result<Vec<usize>> {
    check_strength(strength)?;
    let n = grid.len();
    let keep = ((n as f64 * strength) as usize).min(n);
    if keep == 0 {
        bail!(
            "strength {strength} of {n} steps leaves no step to run (needs at least {:.3})",
            1.0 / n as f64
        )
    }
    Ok(grid[n - keep..].to_vec())
}

/// DDIM grid for diffusers' `timestep_spacing` (leading / trailing / linspace) and `steps_offset`.
pub fn ddim_timesteps(cfg: &SchedulerConfig, n: usize) -> Result<Vec<usize>> {
    let t = cfg.num_train_timesteps;
    if n == 0 || n > t {
        bail!("steps must be in 1..={t}, got {n}")
    }
    let steps: Vec<usize> = match cfg.timestep_spacing.as_str() {
        "leading" => {
            let r = t / n;
            (0..n).rev().map(|i| i * r + cfg.steps_offset).collect()
        }
        "trailing" => {
            let r = t as f64 / n as f64;
            (0..n)
                .map(|i| (t as f64 - i as f64 * r).round() as usize - 1)
                .collect()
        }
        "linspace" => (0..n)
            .rev()
            .map(|i| {
                let v = if n == 1 {
                    0.0
                } else {
                    i as f64 * (t - 1) as f64 / (n - 1) as f64
                };
                v.round_ties_even() as usize
            })
            .collect(),
        other => bail!("timestep_spacing {other:?} is not supported"),
    };
    Ok(steps.into_iter().map(|s| s.min(t - 1)).collect())
}

/// What one step produced.
pub struct StepOutput {
    /// x at the next timestep (after the last step: the final latents to decode).
    pub prev_sample: Tensor,
    /// The step's clean-latent estimate (LCM `denoised`, TCD `pred_noised_sample`, DDIM x0).
    pub denoised: Tensor,
}

/// A sampler configured for one run: its kind, schedule and timestep grid.
pub struct Sampler {
    pub kind: SamplerKind,
    pub schedule: NoiseSchedule,
    pub timesteps: Vec<usize>,
    num_train: usize,
    timestep_scaling: f64,
    /// TCD gamma (diffusers `eta`).
    gamma: f64,
    /// The step count the grid was made for (image-to-image runs only its tail), which sets
    /// DDIM's step size.
    grid_steps: usize,
}

/// Knobs of a sampler beyond its kind and step count.
#[derive(Debug, Clone, Copy)]
pub struct SamplerOptions {
    pub original_inference_steps: usize,
    pub tcd_gamma: f64,
    /// Image-to-image: how much of the schedule to run (1: all of it, text-to-image). LCM takes it
    /// as `LatentConsistencyModelImg2ImgPipeline` does (a shorter distillation grid), DDIM and
    /// TCD as `StableDiffusionImg2ImgPipeline` does (the tail of the full grid).
    pub strength: f64,
    /// The flow-map sampler's γ (0: deterministic jumps).
    pub flow_gamma: f64,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            original_inference_steps: 50,
            tcd_gamma: 0.3,
            strength: 1.0,
            flow_gamma: 0.0,
        }
    }
}

impl SamplerOptions {
    /// The defaults with one γ for both stochastic samplers, each reading its own: `None` keeps
    /// each one's default (TCD 0.3, flow map 0: deterministic jumps).
    pub fn with_gamma(gamma: Option<f64>) -> Self {
        let d = Self::default();
        Self {
            tcd_gamma: gamma.unwrap_or(d.tcd_gamma),
            flow_gamma: gamma.unwrap_or(d.flow_gamma),
            ..d
        }
    }

    /// The γ a sampler of this kind reads.
    pub fn gamma(&self, kind: SamplerKind) -> f64 {
        if kind == SamplerKind::FlowMap {
            self.flow_gamma
        } else {
            self.tcd_gamma
        }
    }
}

impl Sampler {
    pub fn new(
        kind: SamplerKind,
        cfg: &SchedulerConfig,
        steps: usize,
        opts: SamplerOptions,
    ) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(cfg)?;
        let original = cfg
            .original_inference_steps
            .unwrap_or(opts.original_inference_steps);
        let timesteps = match kind {
            SamplerKind::Lcm => {
                lcm_timesteps_strength(cfg.num_train_timesteps, original, steps, opts.strength)?
            }
            SamplerKind::Tcd | SamplerKind::FlowMap => strength_tail(
                &lcm_timesteps(cfg.num_train_timesteps, original, steps)?,
                opts.strength,
            )?,
            SamplerKind::Ddim => strength_tail(&ddim_timesteps(cfg, steps)?, opts.strength)?,
        };
        if !(0.0..=1.0).contains(&opts.tcd_gamma) {
            bail!("TCD gamma must be in [0, 1], got {}", opts.tcd_gamma)
        }
        if !(0.0..=1.0).contains(&opts.flow_gamma) {
            bail!("flow-map gamma must be in [0, 1], got {}", opts.flow_gamma)
        }
        Ok(Self {
            kind,
            schedule,
            timesteps,
            num_train: cfg.num_train_timesteps,
            timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0),
            gamma: opts.gamma(kind),
            grid_steps: steps,
        })
    }

    fn scalar(&self, v: f64, like: &Tensor) -> Result<Tensor> {
        Ok(Tensor::new(v as f32, like.device())?.to_dtype(like.dtype())?)
    }

    /// The flow-map sampler's jump target at step `i`: the next grid time ([`CLEAN`] after the
    /// last), lowered to ⌊(1−γ)·t⌋ with γ > 0. `None` for the ε samplers.
    ///
    /// [`CLEAN`]: crate::sample::flowmap::CLEAN
    pub fn jump_end(&self, i: usize) -> Option<crate::sample::flowmap::EndTime> {
        (self.kind == SamplerKind::FlowMap)
            .then(|| crate::sample::flowmap::landing(self.flow_next(i), self.gamma))
    }

    /// The grid time after step `i` ([`CLEAN`](crate::sample::flowmap::CLEAN) after the last).
    fn flow_next(&self, i: usize) -> crate::sample::flowmap::EndTime {
        self.timesteps
            .get(i + 1)
            .map_or(crate::sample::flowmap::CLEAN, |&t| t as i64)
    }

    /// Advance from step `i` (at `self.timesteps[i]`), given the model's ε prediction (for the
    /// flow map: the ε of its jump to [`jump_end`](Self::jump_end)).
    pub fn step(
        &self,
        i: usize,
        eps: &Tensor,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput> {
        let t = self.timesteps[i];
        let last = i + 1 == self.timesteps.len();
        let a_t = self.scalar(self.schedule.alpha_bar(t as i64), sample)?;
        match self.kind {
            SamplerKind::Lcm => {
                let prev_t = if last { t } else { self.timesteps[i + 1] };
                let (c_skip, c_out) = boundary_scalings(t as f64, self.timestep_scaling);
                let x0 = x0_from_eps(sample, eps, &a_t)?;
                let denoised = ((x0 * c_out)? + (sample * c_skip)?)?;
                let prev_sample = if last {
                    denoised.clone()
                } else {
                    let z = noise
                        .sample(sample.shape(), sample.device())?
                        .to_dtype(sample.dtype())?;
                    let a_prev = self.scalar(self.schedule.alpha_bar(prev_t as i64), sample)?;
                    ddim_combine(&denoised, &z, &a_prev)?
                };
                Ok(StepOutput {
                    prev_sample,
                    denoised,
                })
            }
            SamplerKind::Tcd => {
                let prev_t = if last { 0 } else { self.timesteps[i + 1] };
                let s = ((1.0 - self.gamma) * prev_t as f64).floor() as i64;
                let a_s = self.schedule.alpha_bar(s);
                let x0 = x0_from_eps(sample, eps, &a_t)?;
                let denoised = ddim_combine(&x0, eps, &self.scalar(a_s, sample)?)?;
                let prev_sample = if self.gamma > 0.0 && !last {
                    let z = noise
                        .sample(sample.shape(), sample.device())?
                        .to_dtype(sample.dtype())?;
                    let ratio = self.schedule.alpha_bar(prev_t as i64) / a_s;
                    ((&denoised * ratio.sqrt())? + (z * (1.0 - ratio).sqrt())?)?
                } else {
                    denoised.clone()
                };
                Ok(StepOutput {
                    prev_sample,
                    denoised,
                })
            }
            SamplerKind::FlowMap => {
                use crate::sample::flowmap::{jump, renoise, CLEAN};
                let land = self.jump_end(i).unwrap_or(CLEAN);
                let b = sample.dim(0)?;
                let landed = jump(&self.schedule, sample, eps, &vec![t; b], &vec![land; b])?;
                let prev_sample = renoise(&self.schedule, &landed, land, self.flow_next(i), noise)?;
                Ok(StepOutput {
                    prev_sample,
                    denoised: landed,
                })
            }
            SamplerKind::Ddim => {
                let prev_t = t as i64 - (self.num_train / self.grid_steps) as i64;
                let a_prev = self.scalar(self.schedule.alpha_bar(prev_t), sample)?;
                let x0 = x0_from_eps(sample, eps, &a_t)?;
                let prev_sample = ddim_combine(&x0, eps, &a_prev)?;
                Ok(StepOutput {
                    prev_sample,
                    denoised: x0,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcm_grid_matches_diffusers_examples() {
        assert_eq!(lcm_timesteps(1000, 50, 1).unwrap(), vec![999]);
        assert_eq!(
            lcm_timesteps(1000, 50, 4).unwrap(),
            vec![999, 759, 499, 259]
        );
        assert!(lcm_timesteps(1000, 50, 0).is_err());
        assert!(lcm_timesteps(1000, 50, 51).is_err());
    }

    /// Image-to-image grids, as diffusers 0.42.1 computes them (LCMScheduler.set_timesteps with
    /// strength; StableDiffusionImg2ImgPipeline.get_timesteps over DDIM and TCD, SD1.5's schedule).
    #[test]
    fn strength_grids_match_diffusers() {
        let cfg = SchedulerConfig {
            steps_offset: 1,
            ..Default::default()
        };
        let opts = |strength| SamplerOptions {
            strength,
            ..Default::default()
        };
        let grid = |kind, n, strength| {
            Sampler::new(kind, &cfg, n, opts(strength))
                .unwrap()
                .timesteps
        };
        assert_eq!(grid(SamplerKind::Lcm, 4, 0.3), [299, 239, 159, 79]);
        assert_eq!(grid(SamplerKind::Lcm, 4, 0.5), [499, 379, 259, 139]);
        assert_eq!(grid(SamplerKind::Lcm, 4, 0.75), [739, 559, 379, 199]);
        assert_eq!(grid(SamplerKind::Lcm, 4, 1.0), [999, 759, 499, 259]);
        assert_eq!(
            grid(SamplerKind::Ddim, 10, 0.75),
            [601, 501, 401, 301, 201, 101, 1]
        );
        assert_eq!(grid(SamplerKind::Ddim, 10, 0.3), [201, 101, 1]);
        assert_eq!(grid(SamplerKind::Ddim, 4, 0.5), [251, 1]);
        assert_eq!(grid(SamplerKind::Tcd, 4, 0.5), [499, 259]);
        assert_eq!(grid(SamplerKind::Tcd, 4, 0.8), [759, 499, 259]);
        // Out of range, and too little left to run.
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(Sampler::new(SamplerKind::Lcm, &cfg, 4, opts(bad)).is_err());
        }
        assert!(Sampler::new(SamplerKind::Ddim, &cfg, 4, opts(0.2)).is_err());
        assert!(Sampler::new(SamplerKind::Lcm, &cfg, 4, opts(0.05)).is_err());
    }

    #[test]
    fn sampler_names_parse() {
        assert_eq!("LCM".parse::<SamplerKind>().unwrap(), SamplerKind::Lcm);
        let err = "euler".parse::<SamplerKind>().unwrap_err().to_string();
        assert!(err.contains("euler"));
    }
}
