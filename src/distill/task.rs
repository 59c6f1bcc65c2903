//! The distillation trainer: latent consistency distillation ([`super::lcd::lcd_step`]) as a
//! [`Task`] of the shared training loop — an online student (trainable), its EMA target, a
//! frozen teacher — for any student network ([`Student`]) and any ε-predicting teacher.
//!
//! Every random draw of step s (example indices, solver indices, w, noise) comes from the shared
//! state's generator for (seed, s, micro-batch), so a resumed run reproduces the uninterrupted one.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::flowmap::{
    draw_times, flow_map_step, EndMix, FlowBatch, FlowCondition, FlowConfig, LossUnits,
};
use super::lcd::{lcd_step, DdimSolver, LcdBatch, LcdConfig, Loss};
use super::student::{Fresh, Student};
use crate::sample::denoiser::Denoiser;
use crate::sample::noise::{NoiseSource, SeededNoise};
use crate::sample::schedule::NoiseSchedule;
use crate::train::run::{Run, Task};
use crate::train::state::{EmaDecay, Metrics, TrainOptions, TrainState};

/// Everything that determines a distillation run (saved in every checkpoint).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DistillConfig {
    pub ddim_steps: usize,
    pub w_min: f64,
    pub w_max: f64,
    pub w_embed_dim: usize,
    pub ema: f64,
    pub huber_c: Option<f64>,
    /// The optimiser's settings (flattened: the checkpointed settings keep their shape).
    #[serde(flatten)]
    pub options: TrainOptions,
    pub batch_size: usize,
    pub timestep_scaling: f64,
    /// LCM-LoRA: the adapter rank (α = rank); None distils the whole U-Net with a w-embedding.
    pub lora_rank: Option<usize>,
    /// Offset noise on the forward noising (see [`crate::sample::schedule::offset_noise`]); use the
    /// teacher's own training value. 0 = the reference script's plain ε.
    #[serde(default)]
    pub noise_offset: f64,
    /// The teacher's CFG only at solver start timesteps ≥ this (see [`LcdConfig::guidance_from`]);
    /// 0 = everywhere, as the reference.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub guidance_from: usize,
    /// Latents are the VAE posterior's means, not samples (as `lcm pretrain unet
    /// --posterior-mean`); the reference samples.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub posterior_mean: bool,
    /// What the student learns: LCD's consistency function, or a flow map (docs/flow-map.md).
    #[serde(default, skip_serializing_if = "Objective::is_lcd")]
    pub objective: Objective,
    /// Flow maps: how the end times are drawn (clean:step:between weights).
    #[serde(default, skip_serializing_if = "EndMix::is_default")]
    pub end_mix: EndMix,
    /// Flow maps: the loss in ε or in the implied clean estimate's units.
    #[serde(default, skip_serializing_if = "LossUnits::is_eps")]
    pub flow_loss: LossUnits,
}

/// The distillation objective (`--objective`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Latent consistency distillation: every jump to the data.
    #[default]
    Lcd,
    /// A flow map, the discrete Eulerian condition (one teacher step, then the EMA jump).
    FlowMap,
    /// A flow map, the semigroup condition (two EMA jumps; the teacher on the diagonal).
    FlowMapSemigroup,
}

impl Objective {
    fn is_lcd(&self) -> bool {
        *self == Objective::Lcd
    }

    /// The flow-map condition, for the flow-map objectives.
    pub fn flow_condition(&self) -> Option<FlowCondition> {
        match self {
            Objective::Lcd => None,
            Objective::FlowMap => Some(FlowCondition::Eulerian),
            Objective::FlowMapSemigroup => Some(FlowCondition::Semigroup),
        }
    }
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

impl DistillConfig {
    /// The settings' own bounds, named by their flags (checked before any data is encoded).
    pub fn check(&self) -> Result<()> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1")
        }
        if self.w_min > self.w_max {
            bail!("--w-min {} exceeds --w-max {}", self.w_min, self.w_max)
        }
        if !(0.0..=1.0).contains(&self.noise_offset) {
            bail!("--noise-offset {} must be in [0, 1]", self.noise_offset)
        }
        if self.objective == Objective::Lcd && !self.flow_loss.is_eps() {
            bail!("--flow-loss applies to the flow-map objectives")
        }
        if self.objective == Objective::Lcd && !self.end_mix.is_default() {
            bail!(
                "--end-mix {} applies to the flow-map objectives; an LCM always jumps to the data",
                self.end_mix
            )
        }
        if self.objective != Objective::Lcd && self.lora_rank.is_some() {
            bail!("--objective flow-map needs a full student (its end-time embedding): drop --lora-rank")
        }
        self.options.check()
    }
}

impl Default for DistillConfig {
    /// `train_lcm_distill_sd_wds.py`'s defaults (batch size aside).
    fn default() -> Self {
        Self {
            ddim_steps: 50,
            w_min: 5.0,
            w_max: 15.0,
            w_embed_dim: 256,
            ema: 0.95,
            huber_c: None,
            options: TrainOptions {
                warmup_steps: 500,
                ..Default::default()
            },
            batch_size: 8,
            timestep_scaling: 10.0,
            lora_rank: None,
            noise_offset: 0.0,
            guidance_from: 0,
            posterior_mean: false,
            objective: Objective::Lcd,
            end_mix: EndMix::default(),
            flow_loss: LossUnits::Eps,
        }
    }
}

/// Pre-encoded training data: the student's latent space and prompt embeddings, one row per
/// example.
pub struct TrainData {
    pub latents: Tensor,
    pub prompt_embeds: Tensor,
    /// The empty prompt's embedding `[1, tokens, d]` (the unconditional branch of the teacher's CFG).
    pub uncond_embeds: Tensor,
}

impl DistillConfig {
    /// The student's guidance-embedding width: none for LCM-LoRA students.
    pub fn student_w_embed(&self) -> Option<usize> {
        self.lora_rank.is_none().then_some(self.w_embed_dim)
    }
}

/// Writes the student's weights somewhere (a sample grid, an exported folder): the modality's
/// own part of a distillation run.
pub type WeightsSink<'t> = Box<dyn FnMut(&HashMap<String, Tensor>, &Path) -> Result<()> + 't>;

/// One distillation run's task: the LCD step over the data, with the student, target and teacher.
pub struct LcdTask<'t> {
    pub config: DistillConfig,
    schedule: NoiseSchedule,
    solver: DdimSolver,
    lcd: LcdConfig,
    /// Set for a flow-map objective.
    flow: Option<FlowConfig>,
    teacher: &'t dyn Denoiser,
    student: Box<dyn Denoiser>,
    target: Box<dyn Denoiser>,
    spec: Box<dyn Student + 't>,
    data: TrainData,
    /// LCM-LoRA: the frozen base weights the adapters (the trainable variables) are merged into.
    lora_base: Option<HashMap<String, Tensor>>,
    /// Sample grids at `--sample-every`, from the student's full weights.
    pub preview: Option<WeightsSink<'t>>,
    /// The exported model (the full student) into the run folder; LCM-LoRA runs write the
    /// adapters themselves.
    pub exporter: Option<WeightsSink<'t>>,
}

/// A distillation run: the shared state with the LCD task.
pub type Distillation<'t> = Run<LcdTask<'t>>;

/// The adapter file an LCM-LoRA run writes into its output folder (diffusers' name).
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// The student's starting weights: `init`'s tensors (the reference script: the teacher's own)
/// where the student has them, fresh ones ([`Student::fresh`]) where it does not.
fn student_weights_from(
    spec: &dyn Student,
    init: &HashMap<String, Tensor>,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let map = VarMap::new();
    spec.build(VarBuilder::from_varmap(&map, DType::F32, device))?;
    let vars = map.data().lock().expect("varmap lock").clone();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x636f_6e64);
    let mut out = HashMap::new();
    for name in names {
        let dims = vars[name].as_tensor().dims().to_vec();
        let t = match init.get(name) {
            Some(w) if w.dims() == dims.as_slice() => w.to_dtype(DType::F32)?.to_device(device)?,
            Some(w) => bail!(
                "the student's initial {name} has shape {:?}, the student wants {dims:?}",
                w.dims()
            ),
            None => match spec.fresh(name) {
                Some(Fresh::Linear) => {
                    // nn.Linear's default init: U(−1/√fan_in, 1/√fan_in).
                    let bound = 1.0 / (dims[1] as f64).sqrt();
                    let v: Vec<f32> = (0..dims.iter().product::<usize>())
                        .map(|_| rng.random_range(-bound..bound) as f32)
                        .collect();
                    Tensor::from_vec(v, dims, device)?
                }
                Some(Fresh::Zero) => Tensor::zeros(dims, DType::F32, device)?,
                None => bail!("the student's initial weights lack {name}"),
            },
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// Set up a distillation: student and EMA target from `student_init` plus fresh guidance
/// embedding (LCM-LoRA: adapters over the frozen `student_init`, the target being the student
/// without gradients), AdamW, the solver. The teacher may be any ε-predictor.
pub fn distillation<'t>(
    teacher: &'t dyn Denoiser,
    spec: Box<dyn Student + 't>,
    student_init: &HashMap<String, Tensor>,
    schedule: NoiseSchedule,
    config: DistillConfig,
    data: TrainData,
    device: &Device,
) -> Result<Distillation<'t>> {
    config.check()?;
    let solver = DdimSolver::new(&schedule, config.ddim_steps)?;
    let lcd = LcdConfig {
        timestep_scaling: config.timestep_scaling,
        w_embed_dim: config.student_w_embed(),
        loss: config.huber_c.map_or(Loss::L2, |c| Loss::Huber { c }),
        guidance_from: config.guidance_from,
    };
    let options = config.options;
    let (state, student, target, lora_base) = if let Some(rank) = config.lora_rank {
        let base: HashMap<String, Tensor> = student_init
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::F32)?.to_device(device)?)))
            .collect::<Result<_>>()?;
        let adapters = crate::nn::lora::init(&base, rank, config.options.seed, device)?;
        let state = TrainState::new(adapters, options)?.with_groups("student", "target");
        // The adapters sit beside the frozen base layers (computed on the activations, see
        // crate::nn::Linear): the student sees the adapter variables, the target the same
        // storage detached, so it follows every update without gradients.
        let with_adapters = |detach: bool| -> Result<Box<dyn Denoiser>> {
            let mut w = base.clone();
            for (k, v) in state.trainable() {
                let t = if detach {
                    v.as_tensor().detach()
                } else {
                    v.as_tensor().clone()
                };
                w.insert(k.strip_prefix("unet.").unwrap_or(k).to_string(), t);
            }
            spec.build(VarBuilder::from_tensors(w, DType::F32, device))
        };
        let (s, t) = crate::nn::with_shared_frozen(|| -> Result<_> {
            Ok((with_adapters(false)?, with_adapters(true)?))
        })?;
        (state, s, t, Some(base))
    } else {
        let init = student_weights_from(spec.as_ref(), student_init, config.options.seed, device)?;
        let state = TrainState::new(init, options)?
            .with_ema(EmaDecay::Fixed(config.ema))?
            .with_groups("student", "target");
        let student = spec.build(state.var_builder(device))?;
        let target_weights = state.ema_weights().expect("an EMA target");
        // The EMA update writes into these tensors: the target must not cache copies of them.
        let target = crate::nn::with_live_weights(|| {
            spec.build(VarBuilder::from_tensors(target_weights, DType::F32, device))
        })?;
        (state, student, target, None)
    };
    let flow = config
        .objective
        .flow_condition()
        .map(|condition| FlowConfig {
            condition,
            w_embed_dim: lcd.w_embed_dim,
            loss: lcd.loss,
            units: config.flow_loss,
        });
    let task = LcdTask {
        config,
        schedule,
        solver,
        lcd,
        flow,
        teacher,
        student,
        target,
        spec,
        data,
        lora_base,
        preview: None,
        exporter: None,
    };
    Ok(Run::new(state, task))
}

impl LcdTask<'_> {
    /// The EMA target network (what the consistency targets are computed with).
    pub fn target(&self) -> &dyn Denoiser {
        self.target.as_ref()
    }

    /// The student's full weights (LCM-LoRA: the adapters merged into the base).
    pub fn student_weights(&self, state: &TrainState) -> Result<HashMap<String, Tensor>> {
        let Some(base) = &self.lora_base else {
            return Ok(state.weights());
        };
        let pairs = crate::nn::lora::parse(
            &state.weights(),
            &crate::nn::lora::target_modules(base),
            "LoRA student",
        )?;
        crate::nn::lora::merge(base, &pairs, 1.0, "LoRA student")
    }
}

impl Task for LcdTask<'_> {
    fn settings(&self) -> serde_json::Value {
        serde_json::json!({"config": self.config, "student": self.spec.config_json()})
    }

    fn loss(&self, rng: &mut ChaCha8Rng) -> Result<(Tensor, Metrics)> {
        let n = self.data.latents.dim(0)?;
        if n == 0 {
            bail!("no training examples")
        }
        let cfg = &self.config;
        let device = self.data.latents.device();
        let b = cfg.batch_size;
        let rows_t = crate::data::random_rows(rng, n, b, device)?;
        let index: Vec<usize> = (0..b)
            .map(|_| rng.random_range(0..cfg.ddim_steps))
            .collect();
        let w: Vec<f64> = (0..b)
            .map(|_| rng.random_range(cfg.w_min..=cfg.w_max))
            .collect();
        let z0 = self.data.latents.index_select(&rows_t, 0)?;
        let prompt = self.data.prompt_embeds.index_select(&rows_t, 0)?;
        let uncond = self.data.uncond_embeds.repeat((b, 1, 1))?;
        let mut noise = SeededNoise::new(rng.random()).sample(z0.shape(), device)?;
        if cfg.noise_offset > 0.0 {
            // Drawn only with an offset, so plain runs keep their random stream.
            let mut src = SeededNoise::new(rng.random());
            noise = crate::sample::schedule::offset_noise(&noise, cfg.noise_offset, &mut src)?;
        }
        if let Some(flow) = &self.flow {
            let (start, teacher_end) = self.solver.timesteps_for(&index);
            let (end, mid) = draw_times(rng, cfg.end_mix, &start, &teacher_end);
            let batch = FlowBatch {
                z0: &z0,
                noise: &noise,
                index: &index,
                end: &end,
                mid: &mid,
                w: &w,
                prompt_embeds: &prompt,
                uncond_embeds: &uncond,
            };
            let out = flow_map_step(
                &self.schedule,
                &self.solver,
                self.student.as_ref(),
                self.teacher,
                self.target.as_ref(),
                &batch,
                flow,
            )?;
            return Ok((out.loss, Metrics::new()));
        }
        let batch = LcdBatch {
            z0: &z0,
            noise: &noise,
            index: &index,
            w: &w,
            prompt_embeds: &prompt,
            uncond_embeds: &uncond,
        };
        let out = lcd_step(
            &self.schedule,
            &self.solver,
            self.student.as_ref(),
            self.teacher,
            self.target.as_ref(),
            &batch,
            &self.lcd,
        )?;
        Ok((out.loss, Metrics::new()))
    }

    fn sample(&mut self, state: &TrainState, path: &Path) -> Result<()> {
        if self.preview.is_some() {
            let weights = self.student_weights(state)?;
            if let Some(preview) = self.preview.as_mut() {
                preview(&weights, path)?;
            }
        }
        Ok(())
    }

    fn export(&mut self, state: &TrainState, run_dir: &Path) -> Result<()> {
        if self.lora_base.is_some() {
            return crate::files::save_safetensors(&state.weights(), &run_dir.join(LORA_FILE));
        }
        let weights = self.student_weights(state)?;
        match self.exporter.as_mut() {
            Some(export) => export(&weights, run_dir),
            None => Ok(()),
        }
    }
}
