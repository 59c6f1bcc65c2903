//! The seam between networks and everything that drives them: [`Denoiser`] is any ε-predicting
//! network (the image U-Net today, a motion transformer tomorrow), and [`denoise`] is the one
//! sampling loop over it — classifier-free guidance or the LCM guidance embedding, any sampler
//! (LCM, TCD, DDIM, a flow map's jumps). Distillation drives the same trait (`crate::distill`).

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::flowmap::EndTime;
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

    /// A flow map's ε for the jump from `timesteps` to `end` (see [`super::flowmap`]); networks
    /// without an end-time embedding refuse.
    fn predict_jump_eps(
        &self,
        _x: &Tensor,
        _timesteps: &[usize],
        _end: &[EndTime],
        _cond: &Tensor,
        _w_embedding: Option<&Tensor>,
    ) -> Result<Tensor> {
        anyhow::bail!("this network is not a flow map (it has no end-time embedding)")
    }

    /// Whether [`predict_jump_eps`](Self::predict_jump_eps) works (a flow-map student).
    fn is_flow_map(&self) -> bool {
        false
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
        super::flowmap::unet_eps(self, x, timesteps, None, cond, w_embedding)
    }

    fn predict_jump_eps(
        &self,
        x: &Tensor,
        timesteps: &[usize],
        end: &[EndTime],
        cond: &Tensor,
        w_embedding: Option<&Tensor>,
    ) -> Result<Tensor> {
        super::flowmap::unet_eps(self, x, timesteps, Some(end), cond, w_embedding)
    }

    fn is_flow_map(&self) -> bool {
        self.config.end_time_embedding
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
    Ok(denoise_until(net, sampler, latents, cond, noise, on_step, &all_wanted)?.latents)
}

/// Why work stopped early: whoever asked for it no longer wants it (a server request past its
/// deadline, a client gone, a shutdown).
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// What [`denoise_until`] finished: the final latents of the rows still wanted, and which rows of
/// the batch they are (ascending).
#[derive(Debug)]
pub struct Denoised {
    pub latents: Tensor,
    pub rows: Vec<usize>,
}

impl Conditioning {
    /// The conditioning of the `keep` rows (ascending) of a batch of `n`.
    pub fn select(&self, keep: &[usize], n: usize) -> Result<Conditioning> {
        let device = self.context.device();
        let idx = |rows: Vec<u32>, len: usize| Tensor::from_vec(rows, len, device);
        let rows: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
        let own = idx(rows.clone(), keep.len())?;
        let context = if self.cfg.is_some() {
            // [uncond; cond]: the same rows from both halves.
            let both: Vec<u32> = rows
                .iter()
                .copied()
                .chain(rows.iter().map(|&r| r + n as u32))
                .collect();
            self.context.index_select(&idx(both, 2 * keep.len())?, 0)?
        } else {
            self.context.index_select(&own, 0)?
        };
        let cfg = match &self.cfg {
            Some((g, Some(per))) => Some((*g, Some(per.index_select(&own, 0)?))),
            Some((g, None)) => Some((*g, None)),
            None => None,
        };
        let w_embedding = match &self.w_embedding {
            Some(w) => Some(w.index_select(&own, 0)?),
            None => None,
        };
        Ok(Conditioning {
            context,
            cfg,
            w_embedding,
        })
    }
}

/// Says, for the rows of a batch still running (ascending indices into the batch as it began),
/// which are still wanted: asked once before each network call.
pub type Wanted<'a> = dyn Fn(&[usize]) -> Vec<bool> + 'a;

/// Every row, always.
pub fn all_wanted(rows: &[usize]) -> Vec<bool> {
    vec![true; rows.len()]
}

/// [`denoise`], asking `wanted` about the rows still in the batch before each network call: a
/// row nobody wants any more leaves the batch — its latents, conditioning and noise stream
/// (`noise` must be able to [drop](NoiseSource::retain) it) — and the rest go on unchanged, so a
/// cancelled request stops costing its share of every later step. Once no row is wanted the loop
/// ends with [`Cancelled`].
pub fn denoise_until(
    net: &dyn Denoiser,
    sampler: &Sampler,
    mut latents: Tensor,
    cond: &Conditioning,
    noise: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(StepEvent),
    wanted: &Wanted,
) -> Result<Denoised> {
    let mut rows: Vec<usize> = (0..latents.dim(0)?).collect();
    // The conditioning of the rows left, once some have gone.
    let mut narrowed: Option<Conditioning> = None;
    for (i, &t) in sampler.timesteps.iter().enumerate() {
        let keep = wanted(&rows);
        if keep.len() != rows.len() {
            anyhow::bail!("asked about {} rows, told about {}", rows.len(), keep.len())
        }
        if !keep.contains(&true) {
            return Err(Cancelled.into());
        }
        if keep.contains(&false) {
            let local: Vec<usize> = (0..rows.len()).filter(|&k| keep[k]).collect();
            noise.retain(&keep)?;
            let current = narrowed.as_ref().unwrap_or(cond);
            narrowed = Some(current.select(&local, rows.len())?);
            let idx: Vec<u32> = local.iter().map(|&k| k as u32).collect();
            latents =
                latents.index_select(&Tensor::from_vec(idx, local.len(), latents.device())?, 0)?;
            rows = local.iter().map(|&k| rows[k]).collect();
        }
        let cond = narrowed.as_ref().unwrap_or(cond);
        let n = rows.len();
        let batch = if cond.cfg.is_some() { 2 * n } else { n };
        let model_in = if cond.cfg.is_some() {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents.clone()
        };
        let out = match sampler.jump_end(i) {
            Some(end) => net.predict_jump_eps(
                &model_in,
                &vec![t; batch],
                &vec![end; batch],
                &cond.context,
                cond.w_embedding.as_ref(),
            )?,
            None => net.predict_eps(
                &model_in,
                &vec![t; batch],
                &cond.context,
                cond.w_embedding.as_ref(),
            )?,
        };
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
    Ok(Denoised { latents, rows })
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use candle_core::Device;

    use super::*;
    use crate::model::config::SchedulerConfig;
    use crate::sample::noise::{SeededNoise, SplitNoise};
    use crate::sample::sampler::{SamplerKind, SamplerOptions};

    /// A network each row of which depends on that row alone (x, its conditioning, its
    /// guidance embedding), recording the batch size of every call.
    struct RowWise(RefCell<Vec<usize>>);

    impl Denoiser for RowWise {
        fn predict_eps(
            &self,
            x: &Tensor,
            _t: &[usize],
            cond: &Tensor,
            w: Option<&Tensor>,
        ) -> Result<Tensor> {
            self.0.borrow_mut().push(x.dim(0)?);
            let c = cond.broadcast_as(x.shape())?;
            let mut eps = ((x * 0.3)? + (c * 0.5)?)?;
            if let Some(w) = w {
                // With CFG the network sees every row twice, the embedding once per sample.
                let w = w.repeat(x.dim(0)? / w.dim(0)?)?;
                eps = eps.broadcast_add(&w.reshape((x.dim(0)?, 1, 1))?)?;
            }
            Ok(eps)
        }

        fn guidance_embedding_dim(&self) -> Option<usize> {
            None
        }
    }

    /// Rows `rows` of a three-row batch: conditioning, per-sample CFG and a w embedding, each
    /// row's noise its own seeded stream.
    fn run(rows: &[usize], wanted: &Wanted, net: &RowWise) -> Result<Denoised> {
        let dev = Device::Cpu;
        let n = rows.len();
        let pick = |v: &[f32]| rows.iter().map(|&r| v[r]).collect::<Vec<f32>>();
        let cond = Tensor::from_vec(pick(&[0.1, -0.2, 0.4]), (n, 1, 1), &dev)?;
        let uncond = Tensor::from_vec(pick(&[0.0, 0.05, -0.1]), (n, 1, 1), &dev)?;
        let cond = Conditioning {
            context: Tensor::cat(&[&uncond, &cond], 0)?,
            cfg: Some((
                2.0,
                Some(Tensor::from_vec(pick(&[2.0, 3.0, 5.0]), (n, 1, 1), &dev)?),
            )),
            w_embedding: Some(Tensor::from_vec(pick(&[0.01, 0.02, 0.03]), n, &dev)?),
        };
        let mut sources: Vec<SeededNoise> =
            rows.iter().map(|&r| SeededNoise::new(r as u64)).collect();
        let mut noise = SplitNoise {
            counts: vec![1; n],
            sources: sources
                .iter_mut()
                .map(|s| s as &mut dyn NoiseSource)
                .collect(),
        };
        let sampler = Sampler::new(
            SamplerKind::Lcm,
            &SchedulerConfig::default(),
            4,
            SamplerOptions::default(),
        )?;
        let latents = noise.sample(&(n, 2, 3).into(), &dev)?;
        denoise_until(
            net,
            &sampler,
            latents,
            &cond,
            &mut noise,
            &mut |_| {},
            wanted,
        )
    }

    #[test]
    fn rows_that_leave_stop_costing_and_the_rest_equal_running_alone() -> Result<()> {
        let net = RowWise(RefCell::new(Vec::new()));
        let calls = RefCell::new(0);
        // Row 1 goes after the second step.
        let wanted = |rows: &[usize]| {
            *calls.borrow_mut() += 1;
            rows.iter()
                .map(|&r| r != 1 || *calls.borrow() <= 2)
                .collect()
        };
        let done = run(&[0, 1, 2], &wanted, &net)?;
        assert_eq!(done.rows, [0, 2]);
        // CFG doubles the rows: 3 rows for two steps, then 2.
        assert_eq!(*net.0.borrow(), [6, 6, 4, 4]);
        // The LCM sampler re-noises every step: rows 0 and 2 drew from their own streams
        // throughout, so they are exactly what the two alone make.
        let alone = run(&[0, 2], &all_wanted, &RowWise(RefCell::new(Vec::new())))?;
        let diff = (done.latents - alone.latents)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn nobody_left_is_cancelled_and_one_shared_stream_cannot_lose_rows() -> Result<()> {
        let net = RowWise(RefCell::new(Vec::new()));
        let err = run(&[0, 1, 2], &|rows: &[usize]| vec![false; rows.len()], &net).unwrap_err();
        assert!(err.is::<Cancelled>());
        assert!(net.0.borrow().is_empty());
        // One stream for the batch: dropping a row would shift the others' draws, so it errors.
        let mut one = SeededNoise::new(7);
        assert!(one.retain(&[true, true]).is_ok());
        let e = one.retain(&[true, false]).unwrap_err().to_string();
        assert!(e.contains("own source"), "{e}");
        Ok(())
    }
}
