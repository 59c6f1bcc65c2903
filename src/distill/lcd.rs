//! Latent consistency distillation (Luo et al. 2023, diffusers' `train_lcm_distill_sd_wds.py`),
//! as small functions over tensors: the skipping-step DDIM solver, the noisy input at t_{n+k},
//! the guided teacher step to t_n, the online prediction with boundary scalings, the EMA target
//! and the loss. The networks are any [`Denoiser`], so the same step distils the image U-Net and
//! any other ε-predicting network.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use crate::sample::denoiser::Denoiser;
use crate::sample::schedule::{
    boundary_scalings, ddim_combine, per_sample, x0_from_eps, NoiseSchedule,
};

/// The skipping-step DDIM solver on a grid of `ddim_steps` of the T training steps:
/// grid[i] = (i + 1)·k − 1 with k = T / ddim_steps, and ᾱ of the step below each grid point.
#[derive(Debug, Clone)]
pub struct DdimSolver {
    pub timesteps: Vec<usize>,
    pub alpha_cumprods_prev: Vec<f64>,
    /// k: how many training steps one solver step skips.
    pub skip: usize,
}

impl DdimSolver {
    pub fn new(schedule: &NoiseSchedule, ddim_steps: usize) -> Result<Self> {
        let t = schedule.num_train_timesteps();
        if ddim_steps == 0 || ddim_steps > t {
            bail!("--ddim-steps must be in 1..={t}, got {ddim_steps}")
        }
        let skip = t / ddim_steps;
        let timesteps: Vec<usize> = (1..=ddim_steps).map(|i| i * skip - 1).collect();
        let mut alpha_cumprods_prev = vec![schedule.alphas_cumprod[0]];
        alpha_cumprods_prev.extend(
            timesteps[..ddim_steps - 1]
                .iter()
                .map(|&s| schedule.alphas_cumprod[s]),
        );
        Ok(Self {
            timesteps,
            alpha_cumprods_prev,
            skip,
        })
    }

    /// (t_{n+k}, t_n) for solver indices n: the start on the grid and the target k steps below
    /// (clamped at 0).
    pub fn timesteps_for(&self, index: &[usize]) -> (Vec<usize>, Vec<usize>) {
        let start: Vec<usize> = index.iter().map(|&i| self.timesteps[i]).collect();
        let target = start.iter().map(|&s| s.saturating_sub(self.skip)).collect();
        (start, target)
    }

    /// One deterministic DDIM step from (x0, ε) to the solver grid point below `index`.
    pub fn step(&self, x0: &Tensor, eps: &Tensor, index: &[usize]) -> Result<Tensor> {
        let a: Vec<f64> = index.iter().map(|&i| self.alpha_cumprods_prev[i]).collect();
        ddim_combine(x0, eps, &per_sample(&a, x0)?)
    }
}

/// Per-sample `[b, 1, 1, 1]` boundary scalings (c_skip, c_out) at the given timesteps.
pub fn boundary_tensors(
    timesteps: &[usize],
    scaling: f64,
    like: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (s, o): (Vec<f64>, Vec<f64>) = timesteps
        .iter()
        .map(|&t| boundary_scalings(t as f64, scaling))
        .unzip();
    Ok((per_sample(&s, like)?, per_sample(&o, like)?))
}

/// x0 from an ε prediction with per-sample timesteps.
pub fn predict_x0(
    schedule: &NoiseSchedule,
    x: &Tensor,
    eps: &Tensor,
    t: &[usize],
) -> Result<Tensor> {
    let a: Vec<f64> = t.iter().map(|&t| schedule.alpha_bar(t as i64)).collect();
    x0_from_eps(x, eps, &per_sample(&a, x)?)
}

/// The distillation loss between the online prediction and the (gradient-free) target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    L2,
    /// Pseudo-Huber: mean(√((a − b)² + c²) − c).
    Huber {
        c: f64,
    },
}

impl Loss {
    pub fn compute(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        let d2 = pred
            .to_dtype(DType::F32)?
            .sub(&target.to_dtype(DType::F32)?)?
            .sqr()?;
        Ok(match self {
            Loss::L2 => d2.mean_all()?,
            Loss::Huber { c } => ((d2 + c * c)?.sqrt()? - *c)?.mean_all()?,
        })
    }
}

/// One training example batch for [`lcd_step`], with every random draw made by the caller.
pub struct LcdBatch<'a> {
    /// Clean latents, already × the VAE scaling factor.
    pub z0: &'a Tensor,
    pub noise: &'a Tensor,
    /// Solver indices n (one per sample).
    pub index: &'a [usize],
    /// Guidance w per sample (the LCM-paper convention: CFG = cond + w·(cond − uncond)).
    pub w: &'a [f64],
    pub prompt_embeds: &'a Tensor,
    pub uncond_embeds: &'a Tensor,
}

/// Everything one distillation step computes (the intermediates are kept for tests and logs).
pub struct LcdOutputs {
    pub start_timesteps: Vec<usize>,
    pub timesteps: Vec<usize>,
    pub noisy_model_input: Tensor,
    pub w_embedding: Option<Tensor>,
    pub online_eps: Tensor,
    pub model_pred: Tensor,
    pub teacher_cond_eps: Tensor,
    pub teacher_uncond_eps: Tensor,
    pub cfg_x0: Tensor,
    pub cfg_eps: Tensor,
    pub x_prev: Tensor,
    pub target_eps: Tensor,
    pub target: Tensor,
    pub loss: Tensor,
}

pub struct LcdConfig {
    pub timestep_scaling: f64,
    /// Width of the guidance embedding; `None` for LCM-LoRA style students without one.
    pub w_embed_dim: Option<usize>,
    pub loss: Loss,
    /// The teacher's guidance applies only from this timestep up (a guidance interval, after
    /// Kynkäänniemi et al. 2024); below it the solver follows the teacher's conditional
    /// prediction while the student is still told w. 0 = guidance everywhere, as the reference.
    pub guidance_from: usize,
}

/// One latent-consistency-distillation step. `online` is the student (gradients flow through its
/// prediction); `teacher` and `target` run without gradients.
pub fn lcd_step(
    schedule: &NoiseSchedule,
    solver: &DdimSolver,
    online: &dyn Denoiser,
    teacher: &dyn Denoiser,
    target_net: &dyn Denoiser,
    batch: &LcdBatch,
    cfg: &LcdConfig,
) -> Result<LcdOutputs> {
    let (start, t_n) = solver.timesteps_for(batch.index);
    let z0 = batch.z0;
    let x_t = schedule.add_noise(z0, batch.noise, &start)?;

    let w_embedding = match cfg.w_embed_dim {
        Some(d) => {
            let w: Vec<f32> = batch.w.iter().map(|&w| w as f32).collect();
            Some(crate::nn::guidance_embedding(
                &Tensor::new(w.as_slice(), z0.device())?,
                d,
            )?)
        }
        None => None,
    };

    // Online student at t_{n+k}, through the boundary-condition parameterisation.
    let online_eps = online.predict_eps(&x_t, &start, batch.prompt_embeds, w_embedding.as_ref())?;
    let online_x0 = predict_x0(schedule, &x_t, &online_eps, &start)?;
    let (c_skip_start, c_out_start) = boundary_tensors(&start, cfg.timestep_scaling, &x_t)?;
    let model_pred = x_t
        .broadcast_mul(&c_skip_start)?
        .add(&online_x0.broadcast_mul(&c_out_start)?)?;

    // Teacher: guided DDIM step from t_{n+k} to t_n (no gradients).
    let x_t_frozen = x_t.detach();
    let cond = teacher
        .predict_eps(&x_t_frozen, &start, batch.prompt_embeds, None)?
        .detach();
    let uncond = teacher
        .predict_eps(&x_t_frozen, &start, batch.uncond_embeds, None)?
        .detach();
    let cond_x0 = predict_x0(schedule, &x_t_frozen, &cond, &start)?;
    let uncond_x0 = predict_x0(schedule, &x_t_frozen, &uncond, &start)?;
    let teacher_w: Vec<f64> = batch
        .w
        .iter()
        .zip(&start)
        .map(|(&w, &t)| if t < cfg.guidance_from { 0.0 } else { w })
        .collect();
    let w = per_sample(&teacher_w, &x_t)?;
    let cfg_x0 = cond_x0.add(&cond_x0.sub(&uncond_x0)?.broadcast_mul(&w)?)?;
    let cfg_eps = cond.add(&cond.sub(&uncond)?.broadcast_mul(&w)?)?;
    let x_prev = solver.step(&cfg_x0, &cfg_eps, batch.index)?;

    // Target network at t_n (EMA of the student; no gradients).
    let target_eps = target_net
        .predict_eps(&x_prev, &t_n, batch.prompt_embeds, w_embedding.as_ref())?
        .detach();
    let target_x0 = predict_x0(schedule, &x_prev, &target_eps, &t_n)?;
    let (c_skip, c_out) = boundary_tensors(&t_n, cfg.timestep_scaling, &x_prev)?;
    let target = x_prev
        .broadcast_mul(&c_skip)?
        .add(&target_x0.broadcast_mul(&c_out)?)?
        .detach();

    let loss = cfg.loss.compute(&model_pred, &target)?;
    Ok(LcdOutputs {
        start_timesteps: start,
        timesteps: t_n,
        noisy_model_input: x_t,
        w_embedding,
        online_eps,
        model_pred,
        teacher_cond_eps: cond,
        teacher_uncond_eps: uncond,
        cfg_x0,
        cfg_eps,
        x_prev,
        target_eps,
        target,
        loss,
    })
}
