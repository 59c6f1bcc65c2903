//! The distillation trainer around [`crate::lcd::lcd_step`]: an online student (trainable
//! VarMap), its EMA target, a frozen teacher, AdamW with warm-up and clipping, gradient
//! accumulation, and checkpoints from which a resumed run continues bit-exactly.
//!
//! Every random draw of step s (example indices, solver indices, w, noise) comes from a generator
//! seeded with (seed, s, micro-batch), so resuming needs no generator state and reproduces the
//! uninterrupted run.

use std::borrow::Cow;
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
use crate::lcd::{lcd_step, DdimSolver, Denoiser, LcdBatch, LcdConfig, Loss};
use crate::optim::{clip_grad_norm, ema_update, scheduled_lr, AdamW, AdamWConfig};
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
    /// LCM-LoRA: the adapter rank (α = rank); None distils the whole U-Net with a w-embedding.
    #[serde(default)]
    pub lora_rank: Option<usize>,
    /// Offset noise on the forward noising (see [`crate::schedule::offset_noise`]); use the
    /// teacher's own training value. 0 = the reference script's plain ε.
    #[serde(default)]
    pub noise_offset: f64,
    /// Linear learning-rate decay (from step, to step) down to a tenth of the rate, as
    /// `lcm pretrain --decay-from`; None keeps it constant after the warm-up, as the reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay: Option<(u64, u64)>,
    /// The teacher's CFG only at solver start timesteps ≥ this (see [`LcdConfig::guidance_from`]);
    /// 0 = everywhere, as the reference.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub guidance_from: usize,
    /// Latents are the VAE posterior's means, not samples (as `lcm pretrain unet
    /// --posterior-mean`); the reference samples.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub posterior_mean: bool,
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

impl DistillConfig {
    /// The settings' own bounds, named by their flags (checked before any data is encoded).
    pub fn check(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 {
            bail!("--batch-size and --grad-accum must be at least 1")
        }
        if self.w_min > self.w_max {
            bail!("--w-min {} exceeds --w-max {}", self.w_min, self.w_max)
        }
        if !(0.0..=1.0).contains(&self.noise_offset) {
            bail!("--noise-offset {} must be in [0, 1]", self.noise_offset)
        }
        if let Some((from, to)) = self.decay {
            if from >= to {
                bail!("--decay-from {from} must be below --max-steps {to}")
            }
        }
        Ok(())
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
            adamw: AdamWConfig::default(),
            warmup_steps: 500,
            max_grad_norm: 1.0,
            grad_accum: 1,
            batch_size: 8,
            seed: 0,
            timestep_scaling: 10.0,
            lora_rank: None,
            noise_offset: 0.0,
            decay: None,
            guidance_from: 0,
            posterior_mean: false,
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
    teacher: &'t dyn Denoiser,
    pub student_cfg: UNetConfig,
    /// The student's trainable variables by checkpoint name (the VarMap is only needed to build it).
    student_vars: HashMap<String, Var>,
    student: UNet2DConditionModel,
    target_vars: HashMap<String, Var>,
    target: UNet2DConditionModel,
    opt: AdamW,
    pub step: u64,
    device: Device,
    /// LCM-LoRA mode: the frozen base weights the adapters (`student_vars`) are merged into.
    lora_base: Option<HashMap<String, Tensor>>,
}

/// Student and target for LCM-LoRA: the frozen base U-Net with the adapters beside its layers
/// (computed on the activations, see [`crate::nn::Linear`]). The student sees the adapter Vars; the
/// target the same storage detached, so it follows every update without gradients. Built once.
fn lora_models(
    cfg: &UNetConfig,
    base: &HashMap<String, Tensor>,
    adapters: &HashMap<String, Var>,
    device: &Device,
) -> Result<(UNet2DConditionModel, UNet2DConditionModel)> {
    let build = |detach: bool| -> Result<UNet2DConditionModel> {
        let mut w = base.clone();
        for (k, v) in adapters {
            let t = if detach {
                v.as_tensor().detach()
            } else {
                v.as_tensor().clone()
            };
            w.insert(k.strip_prefix("unet.").unwrap_or(k).to_string(), t);
        }
        Ok(UNet2DConditionModel::new(
            cfg,
            VarBuilder::from_tensors(w, DType::F32, device),
        )?)
    };
    Ok((build(false)?, build(true)?))
}

impl<'t> Trainer<'t> {
    /// Student and target start from `student_init` (the reference script: the teacher's weights)
    /// plus a guidance-embedding projection (`time_embedding.cond_proj`, initialised from the seed).
    /// `base_cfg` is the student's U-Net config without the guidance embedding (normally the
    /// teacher's). The teacher may be any ε-predictor ([`Denoiser`]).
    pub fn new(
        teacher: &'t dyn Denoiser,
        base_cfg: &UNetConfig,
        student_init: &HashMap<String, Tensor>,
        schedule: NoiseSchedule,
        config: DistillConfig,
        device: &Device,
    ) -> Result<Self> {
        config.check()?;
        if let Some(rank) = config.lora_rank {
            let base: HashMap<String, Tensor> = student_init
                .iter()
                .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::F32)?.to_device(device)?)))
                .collect::<Result<_>>()?;
            let student_vars: HashMap<String, Var> =
                crate::lora::init(&base, rank, config.seed, device)?
                    .into_iter()
                    .map(|(k, t)| Ok((k, Var::from_tensor(&t)?)))
                    .collect::<Result<_>>()?;
            let (student, target) = lora_models(base_cfg, &base, &student_vars, device)?;
            let opt = AdamW::new(student_vars.clone(), config.adamw)?;
            let solver = DdimSolver::new(&schedule, config.ddim_steps)?;
            return Ok(Self {
                config,
                schedule,
                solver,
                teacher,
                student_cfg: base_cfg.clone(),
                student_vars,
                student,
                target_vars: HashMap::new(),
                target,
                opt,
                step: 0,
                device: device.clone(),
                lora_base: Some(base),
            });
        }
        let mut student_cfg = base_cfg.clone();
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
                match student_init.get(name) {
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
                    None => bail!("the student's initial weights lack {name}"),
                }
            }
        }
        let student_vars: HashMap<String, Var> =
            student_vars.data().lock().expect("varmap lock").clone();
        let target_vars: HashMap<String, Var> = student_vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
            .collect::<Result<_>>()?;
        let target = UNet2DConditionModel::new(
            &student_cfg,
            VarBuilder::from_tensors(frozen_view(&target_vars), DType::F32, device),
        )?;
        let opt = AdamW::new(student_vars.clone(), config.adamw)?;
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
            lora_base: None,
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
            // LCM-LoRA students take no guidance embedding.
            w_embed_dim: cfg.lora_rank.is_none().then_some(cfg.w_embed_dim),
            loss: cfg.huber_c.map_or(Loss::L2, |c| Loss::Huber { c }),
            guidance_from: cfg.guidance_from,
        };
        // Sorted by name: the gradient norm is a floating-point sum, and a resumed run must add
        // in the same order as the uninterrupted one (HashMap order differs per instance).
        let mut named: Vec<(&String, &Var)> = self.student_vars.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let vars: Vec<Var> = named.into_iter().map(|(_, v)| v.clone()).collect();
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
            let mut noise = noise_src.sample(z0.shape(), &self.device)?;
            if cfg.noise_offset > 0.0 {
                // Drawn only with an offset, so plain runs keep their random stream.
                let mut src = SeededNoise::new(rng.random());
                noise = crate::schedule::offset_noise(&noise, cfg.noise_offset, &mut src)?;
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
        let lr = scheduled_lr(
            self.config.adamw.lr,
            self.config.warmup_steps,
            self.config.decay,
            self.step + 1,
        );
        self.opt.step(&grads, lr)?;
        if self.lora_base.is_none() {
            ema_update(&self.target_vars, &self.student_vars, self.config.ema)?;
        }
        self.step += 1;
        Ok(StepMetrics {
            step: self.step,
            loss: loss_sum / self.config.grad_accum as f64,
            lr,
            grad_norm,
        })
    }

    /// Write a checkpoint (student, target, optimizer moments, step, config) under `run_dir`.
    pub fn save_checkpoint(&self, run_dir: &Path) -> Result<PathBuf> {
        let student = frozen_view(&self.student_vars);
        let target = frozen_view(&self.target_vars);
        let opt = self.opt.state();
        let state =
            serde_json::json!({ "config": self.config, "student_unet_config": self.student_cfg });
        let mut groups = vec![("student", &student), ("optimizer", &opt)];
        if !target.is_empty() {
            groups.push(("target", &target));
        }
        checkpoint::save(run_dir, self.step, &groups, &state)
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
            if vars.is_empty() {
                return Ok(()); // LCM-LoRA keeps no separate target
            }
            let t = ck.group(group, &self.device)?;
            for (name, var) in vars {
                let v = t
                    .get(name)
                    .with_context(|| format!("{group} in {} lacks {name}", dir.display()))?;
                var.set(v)?;
            }
            Ok(())
        };
        set(&self.student_vars, "student")?;
        set(&self.target_vars, "target")?;
        self.opt
            .load_state(&ck.group("optimizer", &self.device)?, ck.step)?;
        self.step = ck.step;
        Ok(())
    }

    /// The student's full U-Net weights (LCM-LoRA: the adapters merged into the base).
    pub fn student_weights(&self) -> Result<HashMap<String, Tensor>> {
        let Some(base) = &self.lora_base else {
            return Ok(frozen_view(&self.student_vars));
        };
        let pairs = crate::lora::parse(
            &self.adapter_weights(),
            &crate::lora::target_modules(base),
            "LoRA student",
        )?;
        crate::lora::merge(base, &pairs, 1.0, "LoRA student")
    }

    /// The trained variables: the whole student, or in LCM-LoRA mode its adapters (file layout).
    pub fn adapter_weights(&self) -> HashMap<String, Tensor> {
        frozen_view(&self.student_vars)
    }
}

/// `lcm distill`: flags as in the reference script (defaults equal to it unless noted).
#[derive(clap::Args, Debug, Clone)]
pub struct DistillArgs {
    /// Teacher: a diffusers-layout folder, a pipeline name or a hub id.
    #[arg(long)]
    pub teacher: String,
    /// Image–caption folders (metadata.jsonl, images with .txt captions, or .tar shards); several
    /// may be given.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Output: a diffusers-layout LCM pipeline folder (also holds checkpoints/ and metrics.jsonl).
    #[arg(long)]
    pub output: PathBuf,
    /// Training resolution (default: the teacher's native size).
    #[arg(long)]
    pub resolution: Option<usize>,
    #[arg(long, default_value_t = 1000)]
    pub max_steps: u64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 500)]
    pub warmup_steps: u64,
    /// From this step on, the learning rate falls linearly to a tenth of --lr at --max-steps
    /// (default: constant after the warm-up, as the reference script).
    #[arg(long)]
    pub decay_from: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 5.0)]
    pub w_min: f64,
    #[arg(long, default_value_t = 15.0)]
    pub w_max: f64,
    #[arg(long, default_value_t = 256)]
    pub w_embed_dim: usize,
    /// LCM-LoRA: train rank-R adapters (α = R) on the teacher's attention, projection, conv and
    /// time-embedding weights instead of the whole U-Net; no w-embedding; the target is the student
    /// without gradients. Writes `pytorch_lora_weights.safetensors` for `lcm generate --lora`.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// Offset noise when noising the data (as `lcm pretrain unet --noise-offset`): a student of a
    /// teacher trained with it should see the same, or it learns to take the image's overall
    /// colour from the initial noise. 0 = the reference script's plain ε.
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f64,
    /// Apply the teacher's guidance only where the solver starts at timestep ≥ T (a guidance
    /// interval): below it the teacher's conditional prediction alone, which keeps the fine shape
    /// that strong guidance erodes late in sampling. The student is still conditioned on w.
    /// 0 = guidance at every timestep, as the reference script.
    #[arg(long, default_value_t = 0)]
    pub guidance_from: usize,
    /// Encode the data as the VAE posterior's means rather than samples: for a teacher trained
    /// with `lcm pretrain unet --posterior-mean` (whitened latents).
    #[arg(long)]
    pub posterior_mean: bool,
    #[arg(long, default_value_t = 0.95)]
    pub ema: f64,
    /// l2 or huber.
    #[arg(long, default_value = "l2")]
    pub loss: String,
    #[arg(long, default_value_t = 0.001)]
    pub huber_c: f64,
    #[arg(long, default_value_t = 50)]
    pub ddim_steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 500)]
    pub save_every: u64,
    /// Every N steps write samples/step-N.png: 1-, 2- and 4-step LCM samples (columns) of up to four
    /// of the dataset's captions (rows), fixed seeds. 0 turns it off.
    #[arg(long, default_value_t = 500)]
    pub sample_every: u64,
    /// Continue from DIR: a checkpoint folder, or an output folder (its latest checkpoint).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start the student (and its EMA target) from an LCM distilled from this teacher (a
    /// diffusers-layout folder or pipeline name) instead of from the teacher's own weights, with a
    /// fresh optimizer and schedule: a distillation continued past its planned steps. Its U-Net
    /// must be the teacher's layout plus a guidance embedding of --w-embed-dim.
    #[arg(long, conflicts_with = "lora_rank")]
    pub init: Option<String>,
    #[command(flatten)]
    pub runtime: crate::runtime::RuntimeArgs,
}

/// The U-Net weights of a previously distilled LCM (`--init`), checked against the teacher's: every
/// teacher tensor with its shape, plus the guidance embedding (`time_embedding.cond_proj`) taking
/// `w_embed_dim` inputs, and nothing else.
fn student_start(
    spec: &str,
    teacher: &HashMap<String, Tensor>,
    w_embed_dim: usize,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let dir = crate::source::resolve(spec)?.dir.join("unet");
    let weights = crate::pretrain::load_component(&dir, device)?;
    for (name, t) in teacher {
        match weights.get(name) {
            None => bail!("{} has no tensor {name}", dir.display()),
            Some(w) if w.dims() != t.dims() => bail!(
                "{}: {name} has shape {:?}, the teacher's is {:?}",
                dir.display(),
                w.dims(),
                t.dims()
            ),
            Some(_) => {}
        }
    }
    for (name, w) in weights.iter().filter(|(k, _)| !teacher.contains_key(*k)) {
        if !name.contains("cond_proj") {
            bail!("{}: {name} is not in the teacher's U-Net", dir.display())
        }
        if name.ends_with("weight") && w.dims().last() != Some(&w_embed_dim) {
            bail!(
                "{}: {name} takes a {}-dim guidance embedding, --w-embed-dim is {w_embed_dim}",
                dir.display(),
                w.dims().last().copied().unwrap_or(0)
            )
        }
    }
    if !weights.keys().any(|k| k.contains("cond_proj")) {
        bail!("{} has no guidance embedding: not an LCM", dir.display())
    }
    Ok(weights)
}

fn file_fingerprint(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!("{}:{}:{:?}", path.display(), m.len(), m.modified().ok()),
        Err(_) => format!("{}:missing", path.display()),
    }
}

/// What the cached encodings depend on: the teacher's weights, the dtype of its text embeddings,
/// the resolution, the data, and the seed the VAE posterior samples are drawn from (without it a
/// rerun with another `--seed` silently reused the first run's latents).
fn encodings_key(
    teacher_dir: &Path,
    dtype: DType,
    resolution: usize,
    seed: u64,
    posterior_mean: bool,
    examples: &[crate::data::Example],
) -> Result<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    resolution.hash(&mut h);
    seed.hash(&mut h);
    if posterior_mean {
        "posterior mean".hash(&mut h);
    }
    format!("{dtype:?}").hash(&mut h);
    for c in ["unet", "vae", "text_encoder"] {
        for f in crate::source::weight_file(&teacher_dir.join(c))? {
            file_fingerprint(&f).hash(&mut h);
        }
    }
    for ex in examples {
        ex.fingerprint().hash(&mut h);
    }
    Ok(h.finish())
}

/// Encode the dataset with the teacher's VAE and text encoder once; reuse the cache while
/// `encodings_key` is unchanged.
fn encode_dataset(
    pipe: &crate::pipeline::Pipeline,
    teacher_dir: &Path,
    args: &DistillArgs,
    resolution: usize,
    cache_dir: &Path,
) -> Result<TrainData> {
    let mut examples = Vec::new();
    for d in &args.data {
        examples.extend(crate::data::scan(d)?);
    }
    let key = encodings_key(
        teacher_dir,
        pipe.dtype,
        resolution,
        args.seed,
        args.posterior_mean,
        &examples,
    )?;
    let cache = cache_dir.join(format!("data-{key:016x}.safetensors"));
    let dev = &pipe.device;
    if cache.is_file() {
        let t = candle_core::safetensors::load(&cache, dev)?;
        if let (Some(l), Some(p), Some(u)) = (
            t.get("latents"),
            t.get("prompt_embeds"),
            t.get("uncond_embeds"),
        ) {
            eprintln!("using cached encodings {}", cache.display());
            return Ok(TrainData {
                latents: l.clone(),
                prompt_embeds: p.clone(),
                uncond_embeds: u.clone(),
            });
        }
    }
    let (items, report) = crate::data::load_all(&examples, resolution, dev);
    if !report.skipped.is_empty() {
        eprintln!(
            "skipped {} unreadable image(s) of {}",
            report.skipped.len(),
            examples.len()
        );
    }
    if items.is_empty() {
        bail!("--data: no readable images")
    }
    let mut noise = SeededNoise::new(args.seed ^ 0x0076_6165);
    let mut latents = Vec::new();
    let mut embeds = Vec::new();
    let bar = indicatif::ProgressBar::new(items.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("encoding {pos}/{len} {per_sec} ETA {eta}")
            .expect("valid template"),
    );
    // Images in batches (the VAE is the cost); one noise draw per batch, in order.
    for chunk in items.chunks(32) {
        let imgs: Vec<Tensor> = chunk.iter().map(|(img, _)| img.clone()).collect();
        let post = pipe.vae.encode(&Tensor::stack(&imgs, 0)?)?;
        let eps = noise.sample(post.mean.shape(), dev)?;
        let z = if args.posterior_mean {
            post.mean
        } else {
            post.sample_with(&eps)?
        };
        latents.push(pipe.vae.scale(&z)?);
        for (_, caption) in chunk {
            embeds.push(pipe.encode_prompt(caption)?);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let data = TrainData {
        latents: Tensor::cat(&latents, 0)?,
        prompt_embeds: Tensor::cat(&embeds, 0)?,
        uncond_embeds: pipe.encode_prompt("")?,
    };
    std::fs::create_dir_all(cache_dir)?;
    let tensors = HashMap::from([
        ("latents".to_string(), data.latents.clone()),
        ("prompt_embeds".to_string(), data.prompt_embeds.clone()),
        ("uncond_embeds".to_string(), data.uncond_embeds.clone()),
    ]);
    let tmp = cache.with_extension("tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, &cache)?;
    eprintln!(
        "encoded {} examples at {resolution}² into {}",
        items.len(),
        cache.display()
    );
    Ok(data)
}

/// The adapter file an LCM-LoRA run writes into its output folder (diffusers' name).
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// Write the student as a diffusers LatentConsistencyModelPipeline folder beside the teacher's
/// VAE, text encoder and tokenizer.
fn export(trainer: &Trainer, teacher_dir: &Path, out: &Path) -> Result<()> {
    for c in ["vae", "text_encoder", "tokenizer"] {
        crate::source::copy_files(&teacher_dir.join(c), &out.join(c))?;
    }
    let mut unet_cfg: serde_json::Value =
        crate::config::read_json(&teacher_dir.join("unet/config.json"))?;
    unet_cfg["time_cond_proj_dim"] = trainer.config.w_embed_dim.into();
    std::fs::create_dir_all(out.join("unet"))?;
    crate::image_io::write_atomic(
        &out.join("unet/config.json"),
        &serde_json::to_vec_pretty(&unet_cfg)?,
    )?;
    let weights = out.join("unet/diffusion_pytorch_model.safetensors");
    let tmp = weights.with_extension("tmp");
    candle_core::safetensors::save(&trainer.student_weights()?, &tmp)?;
    std::fs::rename(&tmp, &weights)?;
    let t: serde_json::Value =
        crate::config::read_json(&teacher_dir.join("scheduler/scheduler_config.json"))?;
    let sched = serde_json::json!({
        "_class_name": "LCMScheduler",
        "num_train_timesteps": t.get("num_train_timesteps").cloned().unwrap_or(1000.into()),
        "beta_start": t.get("beta_start").cloned().unwrap_or(0.00085.into()),
        "beta_end": t.get("beta_end").cloned().unwrap_or(0.012.into()),
        "beta_schedule": t.get("beta_schedule").cloned().unwrap_or("scaled_linear".into()),
        "original_inference_steps": trainer.config.ddim_steps,
        "timestep_scaling": trainer.config.timestep_scaling,
        "set_alpha_to_one": true, "steps_offset": 1, "prediction_type": "epsilon",
        "timestep_spacing": "leading", "clip_sample": false, "thresholding": false,
        "rescale_betas_zero_snr": false,
    });
    std::fs::create_dir_all(out.join("scheduler"))?;
    crate::image_io::write_atomic(
        &out.join("scheduler/scheduler_config.json"),
        &serde_json::to_vec_pretty(&sched)?,
    )?;
    crate::source::write_model_index(out, "LatentConsistencyModelPipeline", "LCMScheduler")
}

/// A grid of the student's 1/2/4-step samples: one row per prompt, one column per step count.
fn write_sample_grid(
    sampler: &mut crate::pipeline::Pipeline,
    trainer: &Trainer,
    prompts: &[String],
    resolution: usize,
    path: &Path,
) -> Result<()> {
    sampler.unet = UNet2DConditionModel::new(
        &trainer.student_cfg,
        VarBuilder::from_tensors(trainer.student_weights()?, DType::F32, &sampler.device),
    )?;
    // LCM-LoRA students have no guidance embedding and sample without CFG.
    let guidance = if trainer.config.lora_rank.is_some() {
        1.0
    } else {
        8.5
    };
    let steps = [1usize, 2, 4];
    let r = resolution as u32;
    let mut grid = image::RgbImage::new(r * steps.len() as u32, r * prompts.len() as u32);
    for (row, prompt) in prompts.iter().enumerate() {
        for (col, &n) in steps.iter().enumerate() {
            let req = crate::pipeline::GenerateRequest {
                prompt: prompt.clone(),
                sampler: Some(crate::sampler::SamplerKind::Lcm),
                steps: Some(n),
                guidance: Some(guidance),
                width: Some(resolution),
                height: Some(resolution),
                n: 1,
                ..Default::default()
            };
            let mut noise = SeededNoise::new(row as u64);
            let generated = sampler.generate(&req, &Default::default(), &mut noise, &mut |_| {})?;
            image::imageops::replace(
                &mut grid,
                &generated.images[0],
                (col as u32 * r).into(),
                (row as u32 * r).into(),
            );
        }
    }
    crate::image_io::save_png(&grid, path)
}

/// The whole `lcm distill` run.
pub fn run(args: &DistillArgs) -> Result<()> {
    // --dtype sets the frozen teacher's precision (U-Net and text encoder; the VAE stays f32), as
    // the reference script's weight_dtype; the student and its EMA target keep f32 weights.
    let (device, teacher_dtype) = args.runtime.resolve()?;
    let teacher_src = crate::source::resolve(&args.teacher).context("--teacher")?;
    let pipe = crate::pipeline::Pipeline::load(&teacher_src.dir, &device, teacher_dtype)
        .with_context(|| format!("--teacher {}", teacher_src.dir.display()))?;
    let f = pipe.vae_scale_factor();
    let resolution = args
        .resolution
        .unwrap_or(pipe.unet.config.sample_size.unwrap_or(64) * f);
    if resolution == 0 || !resolution.is_multiple_of(f) {
        bail!("--resolution {resolution} must be a positive multiple of {f}")
    }
    let loss = match args.loss.as_str() {
        "l2" => None,
        "huber" => Some(args.huber_c),
        other => bail!("--loss {other:?}: expected l2 or huber"),
    };
    let config = DistillConfig {
        ddim_steps: args.ddim_steps,
        w_min: args.w_min,
        w_max: args.w_max,
        w_embed_dim: args.w_embed_dim,
        ema: args.ema,
        huber_c: loss,
        adamw: AdamWConfig {
            lr: args.lr,
            weight_decay: args.weight_decay,
            ..Default::default()
        },
        warmup_steps: args.warmup_steps,
        max_grad_norm: args.max_grad_norm,
        grad_accum: args.grad_accum,
        batch_size: args.batch_size,
        seed: args.seed,
        timestep_scaling: pipe.scheduler_config.timestep_scaling.unwrap_or(10.0),
        lora_rank: args.lora_rank,
        noise_offset: args.noise_offset,
        decay: args.decay_from.map(|from| (from, args.max_steps)),
        guidance_from: args.guidance_from,
        posterior_mean: args.posterior_mean,
    };
    config.check()?;
    if pipe.unet.config.time_cond_proj_dim.is_some() {
        bail!(
            "--teacher {}: its U-Net already has a guidance embedding (an LCM); distil from a many-step teacher",
            args.teacher
        )
    }
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("cannot create {}", args.output.display()))?;
    let data = encode_dataset(
        &pipe,
        &teacher_src.dir,
        args,
        resolution,
        &args.output.join("cache"),
    )?;
    let teacher_weights = crate::pretrain::load_component(&teacher_src.dir.join("unet"), &device)?;
    let student_init = match &args.init {
        Some(spec) => Cow::Owned(
            student_start(spec, &teacher_weights, args.w_embed_dim, &device)
                .with_context(|| format!("--init {spec}"))?,
        ),
        None => Cow::Borrowed(&teacher_weights),
    };
    let schedule = NoiseSchedule::from_config(&pipe.scheduler_config)?;
    let mut trainer = Trainer::new(
        &pipe.unet,
        &pipe.unet.config,
        &student_init,
        schedule,
        config,
        &device,
    )?;
    let ckpt_dir = args.output.join("checkpoints");
    if let Some(r) = &args.resume {
        let dir = if r.join(checkpoint::STATE_FILE).is_file() {
            r.clone()
        } else {
            checkpoint::latest(&r.join("checkpoints"))?.with_context(|| {
                format!("--resume {}: no complete checkpoint found", r.display())
            })?
        };
        trainer.resume(&dir)?;
        eprintln!("resumed from {} at step {}", dir.display(), trainer.step);
    }
    // A second copy of the teacher pipeline whose U-Net is swapped for the student when sampling.
    let mut sample_pipe = if args.sample_every > 0 {
        Some(crate::pipeline::Pipeline::load(
            &teacher_src.dir,
            &device,
            DType::F32,
        )?)
    } else {
        None
    };
    let sample_prompts: Vec<String> = crate::data::scan(&args.data[0])?
        .into_iter()
        .map(|e| e.caption)
        .take(4)
        .collect();
    let log_path = args.output.join("metrics.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let bar = indicatif::ProgressBar::new(args.max_steps);
    bar.set_position(trainer.step);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "step {pos}/{len} [{elapsed_precise}] {per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    let start = std::time::Instant::now();
    while trainer.step < args.max_steps {
        let m = trainer.train_step(&data)?;
        if !m.loss.is_finite() {
            bail!("loss became {} at step {}", m.loss, m.step)
        }
        let line = serde_json::json!({"step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm, "time_s": start.elapsed().as_secs_f64()});
        std::io::Write::write_all(&mut log, format!("{line}\n").as_bytes())?;
        bar.set_message(format!("loss {:.5}", m.loss));
        bar.inc(1);
        if args.save_every > 0 && m.step % args.save_every == 0 {
            trainer.save_checkpoint(&ckpt_dir)?;
        }
        if let Some(sp) = sample_pipe.as_mut() {
            if m.step % args.sample_every == 0 {
                let path = args.output.join(format!("samples/step-{:08}.png", m.step));
                write_sample_grid(sp, &trainer, &sample_prompts, resolution, &path)?;
            }
        }
    }
    bar.finish_and_clear();
    trainer.save_checkpoint(&ckpt_dir)?;
    if trainer.config.lora_rank.is_some() {
        let file = args.output.join(LORA_FILE);
        crate::pretrain::save_safetensors(&trainer.adapter_weights(), &file)?;
    } else {
        export(&trainer, &teacher_src.dir, &args.output)?;
    }
    println!(
        "distilled {} steps; wrote {}",
        trainer.step,
        args.output.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_encodings_are_keyed_by_seed_resolution_teacher_and_posterior() -> Result<()> {
        let teacher = crate::source::repo_root().join("weights/tiny-teacher");
        let key = |res, seed| encodings_key(&teacher, DType::F32, res, seed, false, &[]);
        assert_eq!(key(64, 0)?, key(64, 0)?);
        assert_ne!(key(64, 0)?, key(64, 1)?);
        assert_ne!(key(64, 0)?, key(32, 0)?);
        assert_ne!(
            key(64, 0)?,
            encodings_key(&teacher, DType::F16, 64, 0, false, &[])?
        );
        // Means and samples of the posterior are different data.
        assert_ne!(
            key(64, 0)?,
            encodings_key(&teacher, DType::F32, 64, 0, true, &[])?
        );
        let other = crate::source::repo_root().join("weights/tiny");
        assert_ne!(
            key(64, 0)?,
            encodings_key(&other, DType::F32, 64, 0, false, &[])?
        );
        Ok(())
    }
}
