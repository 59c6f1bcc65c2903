//! Flow-map distillation: a student that jumps from any time s to any earlier time t along the
//! teacher's guided probability-flow ODE, X_{s→t}(x_s) ≈ x_t, instead of always to t = 0 as a
//! consistency model does (whose multi-step sampling re-noises every clean estimate, so errors
//! compound with more steps). The conditions and the choices made here are written up in
//! docs/flow-map.md.
//!
//! Parameterisation: the network predicts an ε̂(x_s, s, t, w) and the jump is the DDIM step that
//! uses it, X_{s→t} = √ᾱ_t·x̂₀ + √(1−ᾱ_t)·ε̂ with x̂₀ = (x_s − √(1−ᾱ_s)·ε̂)/√ᾱ_s. X_{s→s} is the
//! identity for any ε̂ (the boundary condition holds by construction), and a student initialised
//! from the teacher (its end-time embedding zero) starts as the teacher's one-step DDIM jump,
//! which is exact near the diagonal.
//!
//! Objectives (no forward-mode differentiation, which candle lacks), for a start s on the
//! solver grid, the teacher's guided DDIM step x' at s' = s − k, and an end t ≤ s':
//! - [`FlowCondition::Eulerian`] (discrete; TCD's trajectory-consistency target): X_{s→t}(x_s)
//!   = sg(X⁻_{s'→t}(x')), X⁻ the EMA target. At t = s' the target is the teacher step itself;
//!   at t = clean it is LCD's target. Every example carries one exact teacher step.
//! - [`FlowCondition::Semigroup`] (progressive self-distillation): for t < s', an intermediate
//!   u on the grid between them, X_{s→t}(x_s) = sg(X⁻_{u→t}(X⁻_{s→u}(x_s))); at t = s' the
//!   teacher step anchors it.
//!
//! The loss compares ε̂ with the ε that would make the jump land on the target, ε* = (target −
//! a·x_s)/b for X = a·x_s + b·ε̂: the same scale for every jump length (an x-space loss would
//! weight long jumps by b², short ones almost not at all).

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::lcd::{DdimSolver, Loss};
use crate::sample::denoiser::Denoiser;
use crate::sample::flowmap::{eps_for_target, jump, EndTime, CLEAN};
use crate::sample::schedule::{per_sample, NoiseSchedule};

/// Which self-consistency the off-diagonal targets use (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowCondition {
    Eulerian,
    Semigroup,
}

/// One batch, every random draw made by the caller.
pub struct FlowBatch<'a> {
    /// Clean latents (already scaled).
    pub z0: &'a Tensor,
    pub noise: &'a Tensor,
    /// Solver indices n: the start is the solver grid point n, the teacher step ends k below.
    pub index: &'a [usize],
    /// End times, each [`CLEAN`] or a timestep ≤ its teacher step's end.
    pub end: &'a [EndTime],
    /// For [`FlowCondition::Semigroup`]: the intermediate time of each sample whose end lies
    /// below its teacher step's end (ignored otherwise).
    pub mid: &'a [usize],
    /// Guidance w per sample (CFG = cond + w·(cond − uncond)).
    pub w: &'a [f64],
    pub prompt_embeds: &'a Tensor,
    pub uncond_embeds: &'a Tensor,
}

pub struct FlowConfig {
    pub condition: FlowCondition,
    pub w_embed_dim: Option<usize>,
    pub loss: Loss,
    pub units: LossUnits,
}

/// The units the loss compares ε̂ with ε* in (`--flow-loss`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum LossUnits {
    /// ε itself: one scale for every start and jump length.
    #[default]
    Eps,
    /// The clean estimate each ε implies at the start, x̂₀ = (x_s − √(1−ᾱ_s)·ε)/√ᾱ_s: errors
    /// weighted by √((1−ᾱ_s)/ᾱ_s), large at high noise, as LCD's loss on its x₀-like output
    /// weights them (the start of a 1-step jump is the noisiest).
    X0,
    /// x̂₀'s units for the jumps that end at the data (there the loss is LCD's: the consistency
    /// map, which a 1-step sample uses from the noisiest start), ε's for every other jump.
    CleanX0,
}

impl LossUnits {
    pub fn is_eps(&self) -> bool {
        *self == LossUnits::Eps
    }
}

/// How often each kind of end time is drawn, as integer weights `clean:step:between` (the
/// `--end-mix` flag): the data, the teacher step's own end, or uniform between them. The default
/// 1:1:2 gives the data a quarter of the examples; an LCM gives it all of them, which is what a
/// 1-step jump from pure noise needs most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndMix {
    pub clean: u32,
    pub step: u32,
    pub between: u32,
}

impl Default for EndMix {
    fn default() -> Self {
        Self {
            clean: 1,
            step: 1,
            between: 2,
        }
    }
}

impl EndMix {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    fn total(&self) -> u32 {
        self.clean + self.step + self.between
    }
}

impl std::str::FromStr for EndMix {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let weights: Option<Vec<u32>> = parts.iter().map(|p| p.trim().parse().ok()).collect();
        match weights.as_deref() {
            Some(&[clean, step, between]) if clean + step + between > 0 => Ok(Self {
                clean,
                step,
                between,
            }),
            _ => bail!(
                "end-time mix {s:?}: expected three non-negative integer weights clean:step:between, not all 0 (e.g. 1:1:2)"
            ),
        }
    }
}

impl std::fmt::Display for EndMix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.clean, self.step, self.between)
    }
}

impl serde::Serialize for EndMix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for EndMix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Per example, an end time drawn by `mix` — the data, the teacher step's own end, or uniform
/// between — and an intermediate time strictly between end and start (used by the semigroup),
/// for starts `start` whose teacher steps end at `teacher_end`.
pub fn draw_times(
    rng: &mut impl rand::Rng,
    mix: EndMix,
    start: &[usize],
    teacher_end: &[usize],
) -> (Vec<EndTime>, Vec<usize>) {
    start
        .iter()
        .zip(teacher_end)
        .map(|(&s, &s1)| {
            // One integer draw over the weights' sum: the default 1:1:2 is the 0..4 draw every
            // earlier run made, so their random streams (and resumes) are unchanged.
            let k = rng.random_range(0..mix.total());
            let t: EndTime = if k < mix.clean {
                CLEAN
            } else if k < mix.clean + mix.step {
                s1 as EndTime
            } else {
                rng.random_range(CLEAN..=s1 as EndTime)
            };
            (t, rng.random_range((t + 1).max(0) as usize..s.max(1)))
        })
        .unzip()
}

/// What one step computed.
pub struct FlowOutputs {
    pub start: Vec<usize>,
    pub teacher_end: Vec<usize>,
    /// The teacher's guided DDIM step from the start to `teacher_end`.
    pub x_teacher: Tensor,
    pub online_eps: Tensor,
    pub target: Tensor,
    pub target_eps: Tensor,
    pub loss: Tensor,
}

/// One flow-map distillation step. `online` is trained (its ε̂ carries gradients); `teacher` and
/// `target` run without.
pub fn flow_map_step(
    schedule: &NoiseSchedule,
    solver: &DdimSolver,
    online: &dyn Denoiser,
    teacher: &dyn Denoiser,
    target_net: &dyn Denoiser,
    batch: &FlowBatch,
    cfg: &FlowConfig,
) -> Result<FlowOutputs> {
    let (start, teacher_end) = solver.timesteps_for(batch.index);
    let n = start.len();
    if batch.end.len() != n || batch.w.len() != n {
        bail!(
            "flow-map batch: {n} starts, {} ends, {} w",
            batch.end.len(),
            batch.w.len()
        )
    }
    for (&t, &s1) in batch.end.iter().zip(&teacher_end) {
        if t > s1 as i64 {
            bail!("end time {t} lies above the teacher step's end {s1}")
        }
    }
    let x_s = schedule.add_noise(batch.z0, batch.noise, &start)?;
    let w_embedding = match cfg.w_embed_dim {
        Some(d) => {
            let w: Vec<f32> = batch.w.iter().map(|&w| w as f32).collect();
            Some(crate::nn::guidance_embedding(
                &Tensor::new(w.as_slice(), x_s.device())?,
                d,
            )?)
        }
        None => None,
    };

    // The teacher's guided DDIM step s → s' (the LCD solver step).
    let frozen = x_s.detach();
    let cond = teacher
        .predict_eps(&frozen, &start, batch.prompt_embeds, None)?
        .detach();
    let uncond = teacher
        .predict_eps(&frozen, &start, batch.uncond_embeds, None)?
        .detach();
    let w = per_sample(batch.w, &frozen)?;
    let cfg_eps = cond.add(&cond.sub(&uncond)?.broadcast_mul(&w)?)?;
    let teacher_ends: Vec<EndTime> = teacher_end.iter().map(|&t| t as EndTime).collect();
    let x_teacher = jump(schedule, &frozen, &cfg_eps, &start, &teacher_ends)?.detach();

    // Targets: the teacher step where the end is the step's own end; otherwise the EMA target's
    // jumps, from the teacher's point (Eulerian) or through an intermediate time (semigroup).
    let off: Vec<usize> = (0..n)
        .filter(|&i| batch.end[i] < teacher_end[i] as EndTime)
        .collect();
    let mut target = x_teacher.clone();
    if !off.is_empty() {
        let idx = Tensor::from_vec(
            off.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            off.len(),
            x_s.device(),
        )?;
        let pick = |t: &Tensor| t.index_select(&idx, 0);
        let ends: Vec<EndTime> = off.iter().map(|&i| batch.end[i]).collect();
        let prompts = pick(batch.prompt_embeds)?;
        let w_sub = match &w_embedding {
            Some(e) => Some(pick(e)?),
            None => None,
        };
        let reached = match cfg.condition {
            FlowCondition::Eulerian => {
                let from: Vec<usize> = off.iter().map(|&i| teacher_end[i]).collect();
                let x = pick(&x_teacher)?;
                let eps =
                    target_net.predict_jump_eps(&x, &from, &ends, &prompts, w_sub.as_ref())?;
                jump(schedule, &x, &eps, &from, &ends)?
            }
            FlowCondition::Semigroup => {
                let from: Vec<usize> = off.iter().map(|&i| start[i]).collect();
                let mid: Vec<usize> = off.iter().map(|&i| batch.mid[i]).collect();
                for ((&u, &s), &t) in mid.iter().zip(&from).zip(&ends) {
                    if u >= s || (u as EndTime) <= t {
                        bail!("intermediate time {u} is not between end {t} and start {s}")
                    }
                }
                let mids: Vec<EndTime> = mid.iter().map(|&u| u as EndTime).collect();
                let x = pick(&frozen)?;
                let e1 = target_net.predict_jump_eps(&x, &from, &mids, &prompts, w_sub.as_ref())?;
                let x_u = jump(schedule, &x, &e1, &from, &mids)?;
                let e2 =
                    target_net.predict_jump_eps(&x_u, &mid, &ends, &prompts, w_sub.as_ref())?;
                jump(schedule, &x_u, &e2, &mid, &ends)?
            }
        }
        .detach();
        // Row i of the target: the teacher step, or row k of `reached` where off[k] = i.
        let mut k = 0;
        let mut rows = Vec::with_capacity(n);
        for i in 0..n {
            if off.get(k) == Some(&i) {
                rows.push(reached.narrow(0, k, 1)?);
                k += 1;
            } else {
                rows.push(x_teacher.narrow(0, i, 1)?);
            }
        }
        target = Tensor::cat(&rows, 0)?;
    }
    let target = target.detach();
    let target_eps = eps_for_target(schedule, &frozen, &target, &start, batch.end)?.detach();
    let online_eps = online.predict_jump_eps(
        &x_s,
        &start,
        batch.end,
        batch.prompt_embeds,
        w_embedding.as_ref(),
    )?;
    let loss = match cfg.units {
        LossUnits::Eps => cfg.loss.compute(&online_eps, &target_eps)?,
        LossUnits::X0 | LossUnits::CleanX0 => {
            let k: Vec<f64> = start
                .iter()
                .zip(batch.end)
                .map(|(&s, &t)| {
                    if cfg.units == LossUnits::CleanX0 && t != CLEAN {
                        return 1.0;
                    }
                    let a = schedule.alpha_bar(s as i64);
                    ((1.0 - a) / a).sqrt()
                })
                .collect();
            let k = per_sample(&k, &online_eps)?;
            cfg.loss.compute(
                &online_eps.broadcast_mul(&k)?,
                &target_eps.broadcast_mul(&k)?,
            )?
        }
    };
    Ok(FlowOutputs {
        start,
        teacher_end,
        x_teacher,
        online_eps,
        target,
        target_eps,
        loss,
    })
}

#[cfg(test)]
mod tests {
    //! Closed forms: for Gaussian data x₀ ~ N(μ, σ²) the noisy marginals are Gaussian, the
    //! teacher's ε is known exactly, and the probability-flow ODE's map between any two times is
    //! the affine map between the marginals, X_{s→t}(x) = m_t + (σ_t/σ_s)(x − m_s).

    use candle_core::{Device, Var};
    use candle_nn::{Linear, Module, VarBuilder, VarMap};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::model::config::SchedulerConfig;
    use crate::sample::flowmap::{end_alpha_bar, sample_flow_map, FlowGrid};
    use crate::sample::noise::{NoiseSource, SeededNoise};
    use candle_core::DType;

    const MU: f64 = 1.5;
    const SIGMA: f64 = 0.5;

    fn schedule() -> NoiseSchedule {
        NoiseSchedule::from_config(&SchedulerConfig::default()).unwrap()
    }

    #[test]
    fn the_end_mix_parses_round_trips_and_rejects_bad_weights() {
        let mix: EndMix = "2:1:1".parse().unwrap();
        assert_eq!((mix.clean, mix.step, mix.between), (2, 1, 1));
        assert_eq!(mix.to_string(), "2:1:1");
        assert!(EndMix::default().is_default() && !mix.is_default());
        let json = serde_json::to_string(&mix).unwrap();
        assert_eq!(serde_json::from_str::<EndMix>(&json).unwrap(), mix);
        for bad in ["", "1:1", "1:1:2:1", "0:0:0", "a:1:1", "-1:1:2", "0.5:1:1"] {
            let err = bad.parse::<EndMix>().unwrap_err().to_string();
            assert!(err.contains("clean:step:between"), "{bad}: {err}");
        }
    }

    /// The default mix draws exactly as the 0..4 draw earlier runs made (their checkpoints
    /// resume and their scripts reproduce the shipped weights), and other mixes give each kind of
    /// end its share.
    #[test]
    fn draw_times_follows_the_mix() {
        let start: Vec<usize> = (0..4000).map(|i| 999 - (i % 49) * 20).collect();
        let teacher_end: Vec<usize> = start.iter().map(|s| s - 20).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (end, mid) = draw_times(&mut rng, EndMix::default(), &start, &teacher_end);
        let mut old = ChaCha8Rng::seed_from_u64(3);
        for ((&s, &s1), (&t, &u)) in start.iter().zip(&teacher_end).zip(end.iter().zip(&mid)) {
            let want: EndTime = match old.random_range(0..4) {
                0 => CLEAN,
                1 => s1 as EndTime,
                _ => old.random_range(CLEAN..=s1 as EndTime),
            };
            assert_eq!(t, want);
            assert_eq!(u, old.random_range((want + 1).max(0) as usize..s.max(1)));
        }
        let mut share = |mix: &str| {
            let (end, mid) = draw_times(&mut rng, mix.parse().unwrap(), &start, &teacher_end);
            for ((&t, &u), (&s, &s1)) in end.iter().zip(&mid).zip(start.iter().zip(&teacher_end)) {
                assert!(
                    t <= s1 as EndTime && (u as EndTime) > t && u < s,
                    "{t} {u} {s}"
                );
            }
            let n = end.len() as f64;
            let clean = end.iter().filter(|&&t| t == CLEAN).count() as f64 / n;
            let step = end
                .iter()
                .zip(&teacher_end)
                .filter(|(&t, &s1)| t == s1 as EndTime);
            (clean, step.count() as f64 / n)
        };
        let (clean, step) = share("2:1:1");
        assert!(
            (clean - 0.5).abs() < 0.03 && (step - 0.25).abs() < 0.03,
            "{clean} {step}"
        );
        assert_eq!(share("1:0:0"), (1.0, 0.0));
    }

    /// Mean and standard deviation of the marginal at an end time.
    fn marginal(s: &NoiseSchedule, t: EndTime) -> (f64, f64) {
        let a = end_alpha_bar(s, t);
        (a.sqrt() * MU, (a * SIGMA * SIGMA + 1.0 - a).sqrt())
    }

    fn exact_map(s: &NoiseSchedule, x: &Tensor, from: EndTime, to: EndTime) -> Result<Tensor> {
        let ((m0, s0), (m1, s1)) = (marginal(s, from), marginal(s, to));
        Ok(((x - m0)? * (s1 / s0))?.affine(1.0, m1)?)
    }

    /// The exact ε-prediction for the Gaussian data (the conditioning is ignored).
    struct GaussianTeacher(NoiseSchedule);

    impl Denoiser for GaussianTeacher {
        fn predict_eps(
            &self,
            x: &Tensor,
            t: &[usize],
            _c: &Tensor,
            _w: Option<&Tensor>,
        ) -> Result<Tensor> {
            let (m, k): (Vec<f64>, Vec<f64>) = t
                .iter()
                .map(|&t| {
                    let a = self.0.alpha_bar(t as i64);
                    let (m, sd) = marginal(&self.0, t as EndTime);
                    (m, (1.0 - a).sqrt() / (sd * sd))
                })
                .unzip();
            Ok(x.broadcast_sub(&per_sample(&m, x)?)?
                .broadcast_mul(&per_sample(&k, x)?)?)
        }
    }

    /// The ε̂ whose jump is the exact map.
    struct Oracle(NoiseSchedule);

    impl Denoiser for Oracle {
        fn predict_eps(
            &self,
            _x: &Tensor,
            _t: &[usize],
            _c: &Tensor,
            _w: Option<&Tensor>,
        ) -> Result<Tensor> {
            anyhow::bail!("a flow map only jumps here")
        }

        fn predict_jump_eps(
            &self,
            x: &Tensor,
            start: &[usize],
            end: &[EndTime],
            _c: &Tensor,
            _w: Option<&Tensor>,
        ) -> Result<Tensor> {
            let rows = (0..x.dim(0)?)
                .map(|i| exact_map(&self.0, &x.narrow(0, i, 1)?, start[i] as EndTime, end[i]))
                .collect::<Result<Vec<_>>>()?;
            eps_for_target(&self.0, x, &Tensor::cat(&rows, 0)?, start, end)
        }
    }

    /// `sample_flow_map` of `net` from `x_t` (a zero condition, no guidance embedding) on `grid`
    /// with re-noising `gamma` drawn from seed `seed`.
    fn flow_samples(
        net: &dyn Denoiser,
        x_t: &Tensor,
        grid: &[usize],
        gamma: f64,
        seed: u64,
    ) -> Result<Tensor> {
        let cond = Tensor::zeros((x_t.dim(0)?, 1), DType::F32, x_t.device())?;
        let g = FlowGrid { grid, gamma };
        let mut noise = SeededNoise::new(seed);
        sample_flow_map(&schedule(), net, x_t.clone(), &g, &cond, None, &mut noise)
    }

    #[test]
    fn the_exact_map_composes_and_jumps_reproduce_it() -> Result<()> {
        let s = schedule();
        let x = Tensor::new(&[[-2.0f32], [0.3], [1.7], [4.0]], &Device::Cpu)?;
        let oracle = Oracle(schedule());
        let cond = Tensor::zeros((4, 1), DType::F32, &Device::Cpu)?;
        let via = |x: &Tensor, a: usize, b: EndTime| -> Result<Tensor> {
            let eps = oracle.predict_jump_eps(x, &[a; 4], &[b; 4], &cond, None)?;
            jump(&s, x, &eps, &[a; 4], &[b; 4])
        };
        for (from, mid, to) in [
            (999, 500, CLEAN),
            (999, 19, 0),
            (759, 259, 99),
            (519, 499, CLEAN),
        ] {
            let direct = via(&x, from, to)?;
            let composed = via(&via(&x, from, mid as EndTime)?, mid, to)?;
            let residual = crate::kernels::max_abs_diff(&direct, &composed)?;
            assert!(
                residual < 1e-5,
                "{from}→{mid}→{to}: semigroup residual {residual}"
            );
            let err =
                crate::kernels::max_abs_diff(&direct, &exact_map(&s, &x, from as EndTime, to)?)?;
            assert!(
                err < 1e-5,
                "{from}→{to}: jump differs from the map by {err}"
            );
        }
        // X_{s→s} is the identity whatever ε̂ says.
        let eps = Tensor::new(&[[5.0f32], [-3.0], [0.0], [1.0]], &Device::Cpu)?;
        let same = jump(&s, &x, &eps, &[300; 4], &[300; 4])?;
        assert!(crate::kernels::max_abs_diff(&same, &x)? < 1e-6);
        Ok(())
    }

    /// With the exact map, deterministic and re-noising (γ) sampling both give the data
    /// distribution; bad grids and γ are refused.
    #[test]
    fn sampling_the_exact_map_gives_the_data_distribution() -> Result<()> {
        let s = schedule();
        let dev = Device::Cpu;
        let n = 8192;
        // Start from the exact marginal at 999 (pure N(0, 1) is off by √ᾱ₉₉₉·μ ≈ 0.1 in mean).
        let (m, sd) = marginal(&s, 999);
        let x_t = SeededNoise::new(3)
            .sample(&(n, 1).into(), &dev)?
            .affine(sd, m)?;
        let grid = crate::sample::sampler::lcm_timesteps(1000, 50, 4)?;
        for gamma in [0.0, 0.3, 1.0] {
            let x = flow_samples(&Oracle(schedule()), &x_t, &grid, gamma, 4)?;
            let mean = x.mean_all()?.to_scalar::<f32>()? as f64;
            let sd = (x
                .affine(1.0, -mean)?
                .sqr()?
                .mean_all()?
                .to_scalar::<f32>()? as f64)
                .sqrt();
            assert!(
                (mean - MU).abs() < 0.03 && (sd - SIGMA).abs() < 0.03,
                "γ {gamma}: mean {mean}, sd {sd}"
            );
        }
        let bad = |grid: &[usize], gamma| {
            flow_samples(&Oracle(schedule()), &x_t, grid, gamma, 4).is_err()
        };
        assert!(bad(&[], 0.0) && bad(&[259, 499], 0.0) && bad(&grid, 1.5));
        Ok(())
    }

    /// The pipelines' loop with `SamplerKind::FlowMap` is the flow-map sampler: same jumps,
    /// same re-noising draws.
    #[test]
    fn the_sampling_loop_with_the_flow_map_sampler_matches_the_sampler_function() -> Result<()> {
        use crate::sample::denoiser::{denoise, Conditioning};
        use crate::sample::sampler::{Sampler, SamplerKind, SamplerOptions};
        let dev = Device::Cpu;
        let x_t = SeededNoise::new(3).sample(&(64, 1).into(), &dev)?;
        let cond = Tensor::zeros((64, 1), DType::F32, &dev)?;
        for (steps, gamma) in [(1, 0.0), (4, 0.0), (4, 0.3), (8, 1.0)] {
            let grid = crate::sample::sampler::lcm_timesteps(1000, 50, steps)?;
            let want = flow_samples(&Oracle(schedule()), &x_t, &grid, gamma, 4)?;
            let sampler = Sampler::new(
                SamplerKind::FlowMap,
                &SchedulerConfig::default(),
                steps,
                SamplerOptions {
                    flow_gamma: gamma,
                    ..Default::default()
                },
            )?;
            let c = Conditioning {
                context: cond.clone(),
                cfg: None,
                w_embedding: None,
            };
            let got = denoise(
                &Oracle(schedule()),
                &sampler,
                x_t.clone(),
                &c,
                &mut SeededNoise::new(4),
                &mut |_| {},
            )?;
            let d = crate::kernels::max_abs_diff(&got, &want)?;
            assert!(d < 1e-5, "{steps} steps, γ {gamma}: differs by {d}");
        }
        Ok(())
    }

    /// The objective at the exact map: zero for every off-diagonal semigroup target; at the
    /// diagonal it is the teacher step's own discretisation error, which is small.
    #[test]
    fn the_exact_map_zeroes_the_semigroup_objective() -> Result<()> {
        let s = schedule();
        let solver = DdimSolver::new(&s, 50)?;
        let dev = Device::Cpu;
        let z0 = Tensor::new(&[[1.2f32], [2.0], [0.9]], &dev)?;
        let noise = Tensor::new(&[[0.3f32], [-1.1], [0.7]], &dev)?;
        let cond = Tensor::zeros((3, 1), DType::F32, &dev)?;
        let run_as = |condition: FlowCondition,
                      units: LossUnits,
                      end: &[EndTime],
                      mid: &[usize]|
         -> Result<FlowOutputs> {
            let batch = FlowBatch {
                z0: &z0,
                noise: &noise,
                index: &[49, 30, 12],
                end,
                mid,
                w: &[0.0; 3],
                prompt_embeds: &cond,
                uncond_embeds: &cond,
            };
            let cfg = FlowConfig {
                units,
                condition,
                w_embed_dim: None,
                loss: Loss::L2,
            };
            flow_map_step(
                &s,
                &solver,
                &Oracle(schedule()),
                &GaussianTeacher(schedule()),
                &Oracle(schedule()),
                &batch,
                &cfg,
            )
        };
        let run_in = |units: LossUnits, end: &[EndTime], mid: &[usize]| {
            run_as(FlowCondition::Semigroup, units, end, mid)
        };
        let run = |end: &[EndTime], mid: &[usize]| -> Result<f32> {
            Ok(run_in(LossUnits::Eps, end, mid)?.loss.to_scalar::<f32>()?)
        };
        // Starts 999, 619, 259; ends well below each teacher step.
        let off = run(&[CLEAN, 99, 0], &[500, 300, 100])?;
        assert!(off < 1e-9, "semigroup loss at the exact map: {off}");
        // On the diagonal (ends at the teacher steps 979, 599, 239) only the DDIM step's error.
        let diag = run(&[979, 599, 239], &[0, 0, 0])?;
        assert!(diag > 0.0 && diag < 1e-3, "diagonal loss {diag}");
        // In clean-estimate units each sample's ε error counts √((1−ᾱ_s)/ᾱ_s) times.
        let out = run_in(LossUnits::X0, &[979, 599, 239], &[0, 0, 0])?;
        let d: Vec<f32> = (&out.online_eps - &out.target_eps)?
            .flatten_all()?
            .to_vec1()?;
        let want: f64 = d
            .iter()
            .zip(&out.start)
            .map(|(&d, &t)| {
                let a = s.alpha_bar(t as i64);
                (1.0 - a) / a * (d as f64).powi(2)
            })
            .sum::<f64>()
            / 3.0;
        let got = out.loss.to_scalar::<f32>()? as f64;
        assert!(
            (got - want).abs() <= 1e-5 * want,
            "x0 units: {got} vs {want}"
        );
        // Mixed: only the jump to the data (the first) counts in clean-estimate units. (Eulerian:
        // its target carries the teacher step's error to every end, so no row's error is 0.)
        let out = run_as(
            FlowCondition::Eulerian,
            LossUnits::CleanX0,
            &[CLEAN, 599, 239],
            &[0, 0, 0],
        )?;
        let d: Vec<f32> = (&out.online_eps - &out.target_eps)?
            .flatten_all()?
            .to_vec1()?;
        let a = s.alpha_bar(out.start[0] as i64);
        let want =
            ((1.0 - a) / a * (d[0] as f64).powi(2) + (d[1] as f64).powi(2) + (d[2] as f64).powi(2))
                / 3.0;
        let got = out.loss.to_scalar::<f32>()? as f64;
        assert!(
            d[0] != 0.0 && (got - want).abs() <= 1e-5 * want,
            "clean-x0 units: {got} vs {want}"
        );
        // Bad ends and intermediates are refused.
        assert!(run(&[990, 0, 0], &[500, 100, 10]).is_err());
        assert!(run(&[CLEAN, 99, 0], &[999, 300, 100]).is_err());
        Ok(())
    }

    /// A small MLP ε̂(x, s, t): the time features are s/T, t/T and a few sinusoids of each.
    struct Mlp {
        layers: Vec<Linear>,
    }

    fn features(t: &[f64], dev: &Device) -> Result<Tensor> {
        let rows: Vec<f32> = t
            .iter()
            .flat_map(|&t| {
                let u = t / 1000.0;
                [
                    u,
                    (3.0 * u).sin(),
                    (3.0 * u).cos(),
                    (9.0 * u).sin(),
                    (9.0 * u).cos(),
                ]
                .map(|v| v as f32)
            })
            .collect();
        Ok(Tensor::from_vec(rows, (t.len(), 5), dev)?)
    }

    impl Mlp {
        fn new(vb: VarBuilder) -> Result<Self> {
            let dims = [11, 64, 64, 1];
            let layers = dims
                .windows(2)
                .enumerate()
                .map(|(i, d)| candle_nn::linear(d[0], d[1], vb.pp(i.to_string())))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Self { layers })
        }
    }

    impl Denoiser for Mlp {
        fn predict_eps(
            &self,
            _x: &Tensor,
            _t: &[usize],
            _c: &Tensor,
            _w: Option<&Tensor>,
        ) -> Result<Tensor> {
            anyhow::bail!("a flow map only jumps here")
        }

        fn predict_jump_eps(
            &self,
            x: &Tensor,
            start: &[usize],
            end: &[EndTime],
            _c: &Tensor,
            _w: Option<&Tensor>,
        ) -> Result<Tensor> {
            let dev = x.device();
            let s: Vec<f64> = start.iter().map(|&s| s as f64).collect();
            let t: Vec<f64> = end.iter().map(|&t| t as f64).collect();
            let mut h = Tensor::cat(&[x.clone(), features(&s, dev)?, features(&t, dev)?], 1)?;
            for (i, l) in self.layers.iter().enumerate() {
                h = l.forward(&h)?;
                if i + 1 < self.layers.len() {
                    h = h.silu()?;
                }
            }
            Ok(h)
        }
    }

    /// Sampling error against the exact ODE solution from the same noise, over n-step grids.
    fn sample_errors(net: &dyn Denoiser, x_t: &Tensor) -> Result<Vec<(usize, f32)>> {
        let s = schedule();
        let exact = exact_map(&s, x_t, 999, CLEAN)?;
        [1, 2, 4, 8, 16]
            .into_iter()
            .map(|n| {
                let grid = crate::sample::sampler::lcm_timesteps(1000, 50, n)?;
                let x = flow_samples(net, x_t, &grid, 0.0, 0)?;
                let rmse = (x - &exact)?
                    .sqr()?
                    .mean_all()?
                    .sqrt()?
                    .to_scalar::<f32>()?;
                Ok((n, rmse))
            })
            .collect()
    }

    /// Figures of one training run: mean loss of the first and last 20 steps, sampling RMSE by
    /// step count before and after, and the teacher's own 1-step DDIM RMSE.
    struct Trained {
        first: f32,
        last: f32,
        before: Vec<(usize, f32)>,
        after: Vec<(usize, f32)>,
        teacher_1: f32,
    }

    /// A small MLP trained from scratch with `condition` against the exact Gaussian teacher.
    fn train(condition: FlowCondition) -> Result<Trained> {
        let dev = Device::Cpu;
        let s = schedule();
        let solver = DdimSolver::new(&s, 50)?;
        let online_vars = VarMap::new();
        let online = Mlp::new(VarBuilder::from_varmap(&online_vars, DType::F32, &dev))?;
        let target_vars = VarMap::new();
        let target = Mlp::new(VarBuilder::from_varmap(&target_vars, DType::F32, &dev))?;
        let pairs = |m: &VarMap| -> Vec<(String, Var)> {
            let mut v: Vec<_> = m
                .data()
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        // Seeded initialisation (candle's own draws are not): N(0, 1/fan_in) weights, zero biases;
        // the target starts equal to the online network.
        let mut init = SeededNoise::new(5);
        for ((_, t), (_, o)) in pairs(&target_vars).iter().zip(pairs(&online_vars)) {
            let v = match o.dims() {
                [_, fan_in] => (init.sample(o.shape(), &dev)? / (*fan_in as f64).sqrt())?,
                _ => o.zeros_like()?,
            };
            o.set(&v)?;
            t.set(&v)?;
        }
        let mut opt = candle_nn::AdamW::new(
            online_vars.all_vars(),
            candle_nn::ParamsAdamW {
                lr: 2e-3,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        use candle_nn::Optimizer;
        let teacher = GaussianTeacher(schedule());
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut noise_src = SeededNoise::new(8);
        let x_eval = noise_src.sample(&(256, 1).into(), &dev)?;
        let before = sample_errors(&online, &x_eval)?;
        let b = 128;
        let cond = Tensor::zeros((b, 1), DType::F32, &dev)?;
        let cfg = FlowConfig {
            condition,
            w_embed_dim: None,
            loss: Loss::L2,
            units: LossUnits::Eps,
        };
        let mut losses = Vec::new();
        for _ in 0..2000 {
            let index: Vec<usize> = (0..b).map(|_| rng.random_range(0..50)).collect();
            let (start, teacher_end) = solver.timesteps_for(&index);
            let (end, mid) = draw_times(&mut rng, EndMix::default(), &start, &teacher_end);
            let z0 = noise_src.sample(&(b, 1).into(), &dev)?.affine(SIGMA, MU)?;
            let noise = noise_src.sample(&(b, 1).into(), &dev)?;
            let batch = FlowBatch {
                z0: &z0,
                noise: &noise,
                index: &index,
                end: &end,
                mid: &mid,
                w: &vec![0.0; b],
                prompt_embeds: &cond,
                uncond_embeds: &cond,
            };
            let out = flow_map_step(&s, &solver, &online, &teacher, &target, &batch, &cfg)?;
            opt.backward_step(&out.loss)?;
            losses.push(out.loss.to_scalar::<f32>()?);
            for ((_, t), (_, o)) in pairs(&target_vars).iter().zip(pairs(&online_vars)) {
                t.set(&((t.as_tensor() * 0.95)? + (o.as_tensor() * 0.05)?)?)?;
            }
        }
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let teacher_1 = {
            let eps = teacher.predict_eps(&x_eval, &[999; 256], &x_eval, None)?;
            let x = jump(&s, &x_eval, &eps, &[999; 256], &[CLEAN; 256])?;
            (x - exact_map(&s, &x_eval, 999, CLEAN)?)?
                .sqr()?
                .mean_all()?
                .sqrt()?
                .to_scalar::<f32>()?
        };
        Ok(Trained {
            first: mean(&losses[..20]),
            last: mean(&losses[losses.len() - 20..]),
            before,
            after: sample_errors(&online, &x_eval)?,
            teacher_1,
        })
    }

    /// Each objective from scratch against the exact Gaussian teacher: the loss falls over 10×,
    /// and the flow map it learns samples in 1 to 16 steps close to the exact ODE solution, with
    /// no decay as steps are added, beating the teacher's own 1-step DDIM by 3×.
    #[test]
    fn a_student_learns_the_gaussian_flow_map() -> Result<()> {
        for condition in [FlowCondition::Eulerian, FlowCondition::Semigroup] {
            let r = train(condition)?;
            println!(
                "{condition:?}: loss {:.4} → {:.6}; teacher 1-step DDIM RMSE {:.4}",
                r.first, r.last, r.teacher_1
            );
            println!(
                "  RMSE by steps before {:?}\n                after  {:?}",
                r.before, r.after
            );
            assert!(
                r.last <= r.first / 10.0,
                "{condition:?}: loss {} → {}",
                r.first,
                r.last
            );
            for &(n, e) in &r.after {
                assert!(
                    e <= 0.3 * r.teacher_1,
                    "{condition:?}, {n} steps: RMSE {e} (teacher 1-step {})",
                    r.teacher_1
                );
                assert!(
                    e <= 0.3 * r.before[0].1,
                    "{condition:?}, {n} steps: {e}, untrained {}",
                    r.before[0].1
                );
            }
        }
        Ok(())
    }
}
