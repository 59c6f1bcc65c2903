//! The distillation trainer around [`crate::lcd::lcd_step`]: an online student (trainable
//! VarMap), its EMA target, a frozen teacher, AdamW with warm-up and clipping, gradient
//! accumulation, and checkpoints from which a resumed run continues bit-exactly.
//!
//! Every random draw of step s (example indices, solver indices, w, noise) comes from a generator
//! seeded with (seed, s, micro-batch), so resuming needs no generator state and reproduces the
//! uninterrupted run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Checkpoint};
use crate::config::UNetConfig;
use crate::lcd::{lcd_step, DdimSolver, LcdBatch, LcdConfig, Loss};
use crate::optim::{clip_grad_norm, ema_update, warmup_lr, AdamW, AdamWConfig};
use crate::sampler::{NoiseSource, SeededNoise};
use crate::schedule::NoiseSchedule;
use crate::unet::UNet2DConditionModel;

/// Everything that determines a distillation run (saved in every checkpoint).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DistillConfig {
    pub ddim_steps: usize,
    pub w_min: f64,
    pub w_max: f64,
    pub w_embed_dim: usize,
    pub ema: f64,
    pub huber_c: Option<f64>,
    pub adamw: AdamWConfig,
    pub warmup_steps: u64,
    pub max_grad_norm: f64,
    pub grad_accum: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub timestep_scaling: f64,
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
            adamw: AdamWConfig::default(),
            warmup_steps: 500,
            max_grad_norm: 1.0,
            grad_accum: 1,
            batch_size: 8,
            seed: 0,
            timestep_scaling: 10.0,
        }
    }
}

/// Pre-encoded training data: U-Net-space latents and prompt embeddings, one row per example.
pub struct TrainData {
    pub latents: Tensor,
    pub prompt_embeds: Tensor,
    /// The empty prompt's embedding `[1, tokens, d]` (the unconditional branch of the teacher's CFG).
    pub uncond_embeds: Tensor,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

/// A frozen copy of a Var set: plain tensors sharing the Vars' storage, so a model built from them
/// records no autograd graph yet sees every in-place EMA update.
fn frozen_view(vars: &HashMap<String, Var>) -> HashMap<String, Tensor> {
    vars.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect()
}

pub struct Trainer<'t> {
    pub config: DistillConfig,
    schedule: NoiseSchedule,
    solver: DdimSolver,
    teacher: &'t UNet2DConditionModel,
    pub student_cfg: UNetConfig,
    student_vars: VarMap,
    student: UNet2DConditionModel,
    target_vars: HashMap<String, Var>,
    target: UNet2DConditionModel,
    opt: AdamW,
    pub step: u64,
    device: Device,
}

impl<'t> Trainer<'t> {
    /// Student and target start from the teacher's weights plus a guidance-embedding projection
    /// (`time_embedding.cond_proj`, initialised from the seed), as the reference script does.
    pub fn new(
        teacher: &'t UNet2DConditionModel,
        teacher_weights: &HashMap<String, Tensor>,
        schedule: NoiseSchedule,
        config: DistillConfig,
        device: &Device,
    ) -> Result<Self> {
        if config.batch_size == 0 || config.grad_accum == 0 {
            bail!("--batch-size and --grad-accum must be at least 1")
        }
        if config.w_min > config.w_max {
            bail!("--w-min {} exceeds --w-max {}", config.w_min, config.w_max)
        }
        let mut student_cfg = teacher.config.clone();
        student_cfg.time_cond_proj_dim = Some(config.w_embed_dim);
        let student_vars = VarMap::new();
        let student = UNet2DConditionModel::new(
            &student_cfg,
            VarBuilder::from_varmap(&student_vars, DType::F32, device),
        )?;
        {
            let vars = student_vars.data().lock().expect("varmap lock");
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x636f_6e64);
            for (name, var) in vars.iter() {
                match teacher_weights.get(name) {
                    Some(w) => var.set(&w.to_dtype(DType::F32)?.to_device(device)?)?,
                    None if name.contains("cond_proj") => {
                        // nn.Linear's default init: U(−1/√fan_in, 1/√fan_in).
                        let dims = var.as_tensor().dims().to_vec();
                        let bound = 1.0 / (dims[1] as f64).sqrt();
                        let v: Vec<f32> = (0..dims.iter().product::<usize>())
                            .map(|_| rng.random_range(-bound..bound) as f32)
                            .collect();
                        var.set(&Tensor::from_vec(v, dims, device)?)?;
                    }
                    None => bail!("teacher weights lack {name}"),
                }
            }
        }
        let student_map: HashMap<String, Var> =
            student_vars.data().lock().expect("varmap lock").clone();
        let target_vars: HashMap<String, Var> = student_map
            .iter()
            .map(|(k, v)| Ok((k.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
            .collect::<Result<_>>()?;
        let target = UNet2DConditionModel::new(
            &student_cfg,
            VarBuilder::from_tensors(frozen_view(&target_vars), DType::F32, device),
        )?;
        let opt = AdamW::new(student_map, config.adamw)?;
        let solver = DdimSolver::new(&schedule, config.ddim_steps)?;
        Ok(Self {
            config,
            schedule,
            solver,
            teacher,
            student_cfg,
            student_vars,
            student,
            target_vars,
            target,
            opt,
            step: 0,
            device: device.clone(),
        })
    }

    fn rng(&self, micro: usize) -> ChaCha8Rng {
        let s =
            self.config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (self.step << 8) ^ micro as u64;
        ChaCha8Rng::seed_from_u64(s)
    }

    /// One optimizer step (over `grad_accum` micro-batches).
    pub fn train_step(&mut self, data: &TrainData) -> Result<StepMetrics> {
        let n = data.latents.dim(0)?;
        if n == 0 {
            bail!("no training examples")
        }
        let cfg = &self.config;
        let lcd_cfg = LcdConfig {
            timestep_scaling: cfg.timestep_scaling,
            w_embed_dim: Some(cfg.w_embed_dim),
            loss: cfg.huber_c.map_or(Loss::L2, |c| Loss::Huber { c }),
        };
        let vars: Vec<Var> = self.student_vars.all_vars();
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut loss_sum = 0.0;
        for micro in 0..cfg.grad_accum {
            let mut rng = self.rng(micro);
            let b = cfg.batch_size;
            let rows: Vec<u32> = (0..b).map(|_| rng.random_range(0..n as u32)).collect();
            let index: Vec<usize> = (0..b)
                .map(|_| rng.random_range(0..cfg.ddim_steps))
                .collect();
            let w: Vec<f64> = (0..b)
                .map(|_| rng.random_range(cfg.w_min..=cfg.w_max))
                .collect();
            let rows_t = Tensor::new(rows.as_slice(), &self.device)?;
            let z0 = data.latents.index_select(&rows_t, 0)?;
            let prompt = data.prompt_embeds.index_select(&rows_t, 0)?;
            let uncond = data.uncond_embeds.repeat((b, 1, 1))?;
            let mut noise_src = SeededNoise::new(rng.random());
            let noise = noise_src.sample(z0.shape(), &self.device)?;
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
                &self.student,
                self.teacher,
                &self.target,
                &batch,
                &lcd_cfg,
            )?;
            loss_sum += out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let g = (out.loss / cfg.grad_accum as f64)?.backward()?;
            grads = Some(match grads {
                None => g,
                Some(mut acc) => {
                    for v in &vars {
                        if let Some(new) = g.get(v.as_tensor()) {
                            let sum = match acc.get(v.as_tensor()) {
                                Some(old) => (old + new)?,
                                None => new.clone(),
                            };
                            acc.insert(v.as_tensor(), sum);
                        }
                    }
                    acc
                }
            });
        }
        let mut grads = grads.context("no gradients")?;
        let refs: Vec<&Var> = vars.iter().collect();
        let grad_norm = clip_grad_norm(&refs, &mut grads, self.config.max_grad_norm)?;
        let lr = warmup_lr(
            self.config.adamw.lr,
            self.config.warmup_steps,
            self.step + 1,
        );
        self.opt.step(&grads, lr)?;
        let student_map = self
            .student_vars
            .data()
            .lock()
            .expect("varmap lock")
            .clone();
        ema_update(&self.target_vars, &student_map, self.config.ema)?;
        self.step += 1;
        Ok(StepMetrics {
            step: self.step,
            loss: loss_sum / self.config.grad_accum as f64,
            lr,
            grad_norm,
        })
    }

    fn named(vars: &HashMap<String, Var>) -> HashMap<String, Tensor> {
        vars.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// Write a checkpoint (student, target, optimizer moments, step, config) under `run_dir`.
    pub fn save_checkpoint(&self, run_dir: &Path) -> Result<PathBuf> {
        let student = Self::named(&self.student_vars.data().lock().expect("varmap lock"));
        let target = Self::named(&self.target_vars);
        let opt = self.opt.state();
        let state =
            serde_json::json!({ "config": self.config, "student_unet_config": self.student_cfg });
        checkpoint::save(
            run_dir,
            self.step,
            &[
                ("student", &student),
                ("target", &target),
                ("optimizer", &opt),
            ],
            &state,
        )
    }

    /// Continue from a checkpoint folder written by [`save_checkpoint`](Self::save_checkpoint).
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        let ck = Checkpoint::open(dir)?;
        let saved: DistillConfig = serde_json::from_value(ck.state["config"].clone())
            .with_context(|| format!("{}: bad config", dir.display()))?;
        if serde_json::to_value(&saved)? != serde_json::to_value(&self.config)? {
            bail!(
                "--resume {}: the checkpoint was made with different settings",
                dir.display()
            )
        }
        let set = |vars: &HashMap<String, Var>, group: &str| -> Result<()> {
            let t = ck.group(group, &self.device)?;
            for (name, var) in vars {
                let v = t
                    .get(name)
                    .with_context(|| format!("{group} in {} lacks {name}", dir.display()))?;
                var.set(v)?;
            }
            Ok(())
        };
        set(
            &self.student_vars.data().lock().expect("varmap lock"),
            "student",
        )?;
        set(&self.target_vars, "target")?;
        self.opt
            .load_state(&ck.group("optimizer", &self.device)?, ck.step)?;
        self.step = ck.step;
        Ok(())
    }

    /// The student's weights, for export.
    pub fn student_weights(&self) -> HashMap<String, Tensor> {
        Self::named(&self.student_vars.data().lock().expect("varmap lock"))
    }
}
