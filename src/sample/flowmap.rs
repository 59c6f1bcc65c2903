//! Flow-map sampling (see docs/flow-map.md): a network predicts the ε of a jump from time s to
//! time t, the jump is the DDIM step with it, and sampling is N jumps down one trajectory. Pure
//! functions over tensors, like the other samplers; the objective that trains such a network is
//! `crate::distill::flowmap`.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::denoiser::Denoiser;
use super::schedule::{per_sample, NoiseSchedule};

/// End time of a jump: a training timestep, or [`CLEAN`] for the data itself (ᾱ = 1).
pub type EndTime = i64;

/// The end time of the data (ᾱ = 1).
pub const CLEAN: EndTime = -1;

/// ᾱ at an end time (1 for [`CLEAN`]).
pub fn end_alpha_bar(schedule: &NoiseSchedule, t: EndTime) -> f64 {
    if t < 0 {
        1.0
    } else {
        schedule.alpha_bar(t)
    }
}

/// The coefficients (a, b) of X_{s→t} = a·x_s + b·ε̂ for one sample.
pub fn jump_coefficients(schedule: &NoiseSchedule, s: usize, t: EndTime) -> (f64, f64) {
    let (a_s, a_t) = (schedule.alpha_bar(s as i64), end_alpha_bar(schedule, t));
    let ratio = (a_t / a_s).sqrt();
    (ratio, (1.0 - a_t).sqrt() - ratio * (1.0 - a_s).sqrt())
}

/// X_{s→t}(x) for per-sample starts and ends, given the jump's ε̂.
pub fn jump(
    schedule: &NoiseSchedule,
    x: &Tensor,
    eps: &Tensor,
    start: &[usize],
    end: &[EndTime],
) -> Result<Tensor> {
    let (a, b): (Vec<f64>, Vec<f64>) = start
        .iter()
        .zip(end)
        .map(|(&s, &t)| jump_coefficients(schedule, s, t))
        .unzip();
    Ok(x.broadcast_mul(&per_sample(&a, x)?)?
        .add(&eps.broadcast_mul(&per_sample(&b, eps)?)?)?)
}

/// The ε̂ that makes X_{s→t}(x) equal `target` (ends strictly below starts).
pub fn eps_for_target(
    schedule: &NoiseSchedule,
    x: &Tensor,
    target: &Tensor,
    start: &[usize],
    end: &[EndTime],
) -> Result<Tensor> {
    let mut a = Vec::with_capacity(start.len());
    let mut inv_b = Vec::with_capacity(start.len());
    for (&s, &t) in start.iter().zip(end) {
        if t >= s as i64 {
            bail!("a jump must end before it starts (start {s}, end {t})")
        }
        let (ai, bi) = jump_coefficients(schedule, s, t);
        a.push(ai);
        inv_b.push(1.0 / bi);
    }
    Ok(target
        .sub(&x.broadcast_mul(&per_sample(&a, x)?)?)?
        .broadcast_mul(&per_sample(&inv_b, x)?)?)
}

/// Where a flow-map step aimed at `next` lands: `next`, or with γ > 0 lower, at ⌊(1−γ)·next⌋
/// (TCD's stochastic step; the data itself is never lowered).
pub fn landing(next: EndTime, gamma: f64) -> EndTime {
    if next > 0 && gamma > 0.0 {
        ((1.0 - gamma) * next as f64).floor() as EndTime
    } else {
        next
    }
}

/// `x` at `land`, re-noised up to `next` with a draw from `noise` when it landed lower.
pub fn renoise(
    schedule: &NoiseSchedule,
    x: &Tensor,
    land: EndTime,
    next: EndTime,
    noise: &mut dyn crate::sample::noise::NoiseSource,
) -> Result<Tensor> {
    if land >= next {
        return Ok(x.clone());
    }
    let ratio = end_alpha_bar(schedule, next) / end_alpha_bar(schedule, land);
    let z = noise.sample(x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(((x * ratio.sqrt())? + (z * (1.0 - ratio).sqrt())?)?)
}

/// Where flow-map sampling jumps.
pub struct FlowGrid<'a> {
    /// Descending start timesteps; after the last, a final jump to [`CLEAN`].
    pub grid: &'a [usize],
    /// TCD's γ: with γ > 0 each jump lands at ⌊(1−γ)·t⌋ and is re-noised up to t; 0 is
    /// deterministic.
    pub gamma: f64,
}

/// Flow-map sampling from `x` along `g`, re-noising (γ > 0) with draws from `noise`.
pub fn sample_flow_map(
    schedule: &NoiseSchedule,
    net: &dyn Denoiser,
    x: Tensor,
    g: &FlowGrid,
    cond: &Tensor,
    w_embedding: Option<&Tensor>,
    noise: &mut dyn crate::sample::noise::NoiseSource,
) -> Result<Tensor> {
    let (grid, gamma) = (g.grid, g.gamma);
    if !(0.0..=1.0).contains(&gamma) {
        bail!("gamma must be in [0, 1], got {gamma}")
    }
    if grid.windows(2).any(|w| w[1] >= w[0]) || grid.is_empty() {
        bail!("the flow-map grid must be non-empty and descending, got {grid:?}")
    }
    let b = x.dim(0)?;
    let mut x = x.to_dtype(DType::F32)?;
    for (i, &s) in grid.iter().enumerate() {
        let next: EndTime = grid.get(i + 1).map_or(CLEAN, |&t| t as EndTime);
        let land = landing(next, gamma);
        let starts = vec![s; b];
        let ends = vec![land; b];
        let eps = net.predict_jump_eps(&x, &starts, &ends, cond, w_embedding)?;
        x = renoise(
            schedule,
            &jump(schedule, &x, &eps, &starts, &ends)?,
            land,
            next,
            noise,
        )?;
    }
    Ok(x)
}

/// Timesteps and end times ([`CLEAN`] as −1) as a network's f32 `[b]` inputs.
fn times(
    timesteps: &[usize],
    end: Option<&[EndTime]>,
    like: &Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let f32s = |v: Vec<f32>| Tensor::new(v.as_slice(), like.device());
    let t = f32s(timesteps.iter().map(|&t| t as f32).collect())?;
    let end = end
        .map(|e| f32s(e.iter().map(|&t| t as f32).collect()))
        .transpose()?;
    Ok((t, end))
}

/// The U-Net's ε at `timesteps`, of the jump to `end` for a flow-map student (`None`: the
/// plain ε), in `x`'s dtype whatever the network's own: the one body of both its [`Denoiser`]
/// methods.
pub(crate) fn unet_eps(
    net: &crate::model::unet::UNet2DConditionModel,
    x: &Tensor,
    timesteps: &[usize],
    end: Option<&[EndTime]>,
    cond: &Tensor,
    w_embedding: Option<&Tensor>,
) -> Result<Tensor> {
    let (t, end) = times(timesteps, end, x)?;
    let dtype = net.dtype();
    let w = w_embedding.map(|w| w.to_dtype(dtype)).transpose()?;
    Ok(net
        .forward_to(
            &x.to_dtype(dtype)?,
            &t,
            end.as_ref(),
            &cond.to_dtype(dtype)?,
            w.as_ref(),
        )?
        .to_dtype(x.dtype())?)
}

/// The motion denoiser's ε, as [`unet_eps`] (a one-row `cond` is shared by the batch).
pub(crate) fn motion_eps(
    net: &crate::model::motion_denoiser::MotionDenoiser,
    x: &Tensor,
    timesteps: &[usize],
    end: Option<&[EndTime]>,
    cond: &Tensor,
    w_embedding: Option<&Tensor>,
) -> Result<Tensor> {
    let (t, end) = times(timesteps, end, x)?;
    let cond = if cond.dim(0)? == 1 && x.dim(0)? > 1 {
        cond.repeat((x.dim(0)?, 1, 1))?
    } else {
        cond.clone()
    };
    let w = w_embedding.map(|w| w.to_dtype(DType::F32)).transpose()?;
    Ok(net
        .forward_to(
            &x.to_dtype(DType::F32)?,
            &t,
            end.as_ref(),
            &cond.to_dtype(DType::F32)?,
            w.as_ref(),
        )?
        .to_dtype(x.dtype())?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use candle_core::Device;
    use candle_nn::{VarBuilder, VarMap};

    use super::*;

    /// A student with the teacher's weights and a zero `end_proj` predicts the teacher's ε for
    /// every end time; a non-zero one makes the end time matter. Checked on the motion denoiser
    /// and the U-Net (random weights, the shipped and fixture layouts).
    #[test]
    fn a_zero_end_embedding_starts_the_student_at_the_teacher() -> Result<()> {
        let dev = Device::Cpu;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let with_end = |teacher: &VarMap, end: f32| -> HashMap<String, Tensor> {
            let mut w: HashMap<String, Tensor> = teacher
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            let d = w["time_embedding.linear_1.weight"].dim(1).unwrap();
            w.insert(
                "time_embedding.end_proj.weight".into(),
                (Tensor::eye(d, DType::F32, &dev).unwrap() * end as f64).unwrap(),
            );
            w
        };
        let ends = [CLEAN, 0, 500];
        let differs = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
        };

        // Motion denoiser.
        use crate::model::motion_denoiser::{MotionDenoiser, MotionDenoiserConfig};
        let cfg =
            MotionDenoiserConfig::load(&root.join("weights/tiny-motion/denoiser/config.json"))?;
        let mut teacher_cfg = cfg.clone();
        teacher_cfg.time_cond_proj_dim = None;
        let vars = VarMap::new();
        let teacher = MotionDenoiser::new(
            &teacher_cfg,
            VarBuilder::from_varmap(&vars, DType::F32, &dev),
        )?;
        let mut student_cfg = teacher_cfg.clone();
        student_cfg.end_time_embedding = true;
        let x = Tensor::randn(0f32, 1.0, (3, cfg.latent_tokens, cfg.latent_channels), &dev)?;
        let c = Tensor::randn(0f32, 1.0, (3, cfg.text_tokens, cfg.text_dim), &dev)?;
        let want = teacher.predict_eps(&x, &[999, 500, 20], &c, None)?;
        for (scale, same) in [(0.0, true), (0.5, false)] {
            let student = MotionDenoiser::new(
                &student_cfg,
                VarBuilder::from_tensors(with_end(&vars, scale), DType::F32, &dev),
            )?;
            for &e in &ends {
                let got = student.predict_jump_eps(&x, &[999, 500, 20], &[e; 3], &c, None)?;
                let d = differs(&got, &want)?;
                assert_eq!(
                    d == 0.0,
                    same,
                    "motion, end_proj ×{scale}, end {e}: differs by {d}"
                );
            }
        }

        // U-Net.
        use crate::model::unet::UNet2DConditionModel;
        let cfg: crate::model::config::UNetConfig =
            crate::model::config::read_json(&root.join("tests/fixtures/tiny-sd/unet/config.json"))?;
        let vars = VarMap::new();
        let teacher =
            UNet2DConditionModel::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &dev))?;
        let mut student_cfg = cfg.clone();
        student_cfg.end_time_embedding = true;
        let s = cfg.sample_size.unwrap_or(8);
        let x = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, s, s), &dev)?;
        let c = Tensor::randn(0f32, 1.0, (2, 4, cfg.cross_attention_dim), &dev)?;
        let want = teacher.predict_eps(&x, &[999, 20], &c, None)?;
        for (scale, same) in [(0.0, true), (0.5, false)] {
            let student = UNet2DConditionModel::new(
                &student_cfg,
                VarBuilder::from_tensors(with_end(&vars, scale), DType::F32, &dev),
            )?;
            for &e in &ends {
                let got = student.predict_jump_eps(&x, &[999, 20], &[e; 2], &c, None)?;
                let d = differs(&got, &want)?;
                assert_eq!(
                    d == 0.0,
                    same,
                    "U-Net, end_proj ×{scale}, end {e}: differs by {d}"
                );
            }
        }
        Ok(())
    }
}
