//! The seam between networks and everything that drives them: [`Denoiser`] is any ε-predicting
//! network (the image U-Net today, a motion transformer tomorrow), and [`denoise`] is the one
//! sampling loop over it — classifier-free guidance or the LCM guidance embedding, any sampler
//! (LCM, TCD, DDIM). Distillation drives the same trait (`crate::distill::lcd`).

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::noise::NoiseSource;
use super::sampler::{Sampler, StepOutput};

/// An ε-prediction network: `x` `[b, …]`, one timestep per sample, conditioning `[b, …]`, and the
/// optional guidance embedding `[b, d]`. The output has `x`'s dtype whatever the network's own.
pub trait Denoiser {
    fn predict_eps(
        &self,
        x: &Tensor,
        timesteps: &[usize],
        cond: &Tensor,
        w_embedding: Option<&Tensor>,
    ) -> Result<Tensor>;

    /// Width of the guidance embedding the network was distilled with (an LCM), if any.
    fn guidance_embedding_dim(&self) -> Option<usize> {
        None
    }

    /// The precision the network computes in (conditioning is converted to it).
    fn compute_dtype(&self) -> DType {
        DType::F32
    }
}

impl Denoiser for crate::model::unet::UNet2DConditionModel {
    fn predict_eps(
        &self,
        x: &Tensor,
        timesteps: &[usize],
        cond: &Tensor,
        w_embedding: Option<&Tensor>,
    ) -> Result<Tensor> {
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::new(t.as_slice(), x.device())?;
        let dtype = self.dtype();
        let w = match w_embedding {
            Some(w) => Some(w.to_dtype(dtype)?),
            None => None,
        };
        Ok(self
            .forward(&x.to_dtype(dtype)?, &t, &cond.to_dtype(dtype)?, w.as_ref())?
            .to_dtype(x.dtype())?)
    }

    fn guidance_embedding_dim(&self) -> Option<usize> {
        self.config.time_cond_proj_dim
    }

    fn compute_dtype(&self) -> DType {
        self.dtype()
    }
}

/// How the prompt steers a batch of n samples.
pub struct Conditioning {
    /// `[n, …]` prompt conditioning, or with CFG `[2n, …]`: the negative prompts' rows first.
    pub context: Tensor,
    /// Classifier-free guidance: ε = ε_u + g·(ε_c − ε_u), one scalar g for the batch, or one per
    /// sample (`[n, 1, …]`) when they differ. `None`: one network call per step, no CFG.
    pub cfg: Option<(f64, Option<Tensor>)>,
    /// The guidance embedding `[n, d]` of a distilled student (LCM), if it takes one.
    pub w_embedding: Option<Tensor>,
}

/// What the loop reports after each step.
pub struct StepEvent<'a> {
    pub index: usize,
    pub timestep: usize,
    /// The network's output for the whole batch (with CFG: [uncond; cond]).
    pub unet_output: &'a Tensor,
    /// The ε the sampler used (after guidance).
    pub model_output: &'a Tensor,
    pub output: &'a StepOutput,
}

/// Run `sampler`'s timesteps from `latents` (f32): the network, guidance, then the sampler step;
/// `noise` feeds the samplers that re-noise. Returns the final latents.
pub fn denoise(
    net: &dyn Denoiser,
    sampler: &Sampler,
    latents: Tensor,
    cond: &Conditioning,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(StepEvent),
) -> Result<Tensor> {
    denoise_until(net, sampler, latents, cond, noise, on_step, &|| false)
}

/// Why work stopped early: whoever asked for it no longer wants it (a server request past its
/// deadline, a client gone, a shutdown).
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// [`denoise`], checking `stop` before each network call: once it says yes, the loop ends with
/// [`Cancelled`] (so a long batch nobody waits for does not run to its end).
pub fn denoise_until(
    net: &dyn Denoiser,
    sampler: &Sampler,
    mut latents: Tensor,
    cond: &Conditioning,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(StepEvent),
    stop: &dyn Fn() -> bool,
) -> Result<Tensor> {
    let n = latents.dim(0)?;
    let batch = if cond.cfg.is_some() { 2 * n } else { n };
    for (i, &t) in sampler.timesteps.iter().enumerate() {
        if stop() {
            return Err(Cancelled.into());
        }
        let model_in = if cond.cfg.is_some() {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents.clone()
        };
        let out = net.predict_eps(
            &model_in,
            &vec![t; batch],
            &cond.context,
            cond.w_embedding.as_ref(),
        )?;
        let eps = match &cond.cfg {
            Some((scale, per_sample)) => {
                let u = out.narrow(0, 0, n)?;
                let c = out.narrow(0, n, n)?;
                let diff = (c - &u)?;
                // One scalar keeps the single-request path identical to diffusers' arithmetic.
                let scaled = match per_sample {
                    Some(g) => diff.broadcast_mul(g)?,
                    None => (diff * *scale)?,
                };
                (&u + scaled)?
            }
            None => out.clone(),
        };
        let step = sampler.step(i, &eps, &latents, noise)?;
        on_step(StepEvent {
            index: i,
            timestep: t,
            unet_output: &out,
            model_output: &eps,
            output: &step,
        });
        latents = step.prev_sample;
    }
    Ok(latents)
}
