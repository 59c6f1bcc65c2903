//! `lcm pretrain unet`: the text-to-image teacher — an ε-prediction U-Net with a CLIP-architecture
//! text encoder (trained jointly, or a frozen one from `lcm pretrain text`) on the latents of a
//! trained VAE — exported as a diffusers StableDiffusionPipeline folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::args::{StageSettings, TrainArgs, PRETRAIN};
use super::run::{Run, Task};
use super::start::{component_weights, encode_stage_data, frozen_vae, take_trained};
use super::state::{EmaDecay, Metrics, TrainState};
use crate::data::encode::EncodedDataset;
use crate::data::random_rows;
use crate::model::clip::ClipTextModel;
use crate::model::config::{ClipTextConfig, SchedulerConfig, UNetConfig};
use crate::model::folder::load_component;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::sample::noise::{NoiseSource, SeededNoise};
use crate::sample::schedule::NoiseSchedule;

/// `lcm pretrain unet`: a text-to-image teacher (ε-prediction U-Net + CLIP-architecture text
/// encoder trained jointly from scratch) on latents of a trained VAE.
#[derive(clap::Args, Debug, Clone)]
pub struct TeacherArgs {
    /// Model folder giving the sizes and vocabulary: unet/config.json, text_encoder/config.json,
    /// tokenizer/ and scheduler/scheduler_config.json.
    #[arg(long)]
    pub config: PathBuf,
    /// The trained VAE: a folder with config.json and weights (e.g. `<vae run>/vae`).
    #[arg(long)]
    pub vae: PathBuf,
    /// Probability of training on the empty prompt instead of the caption (for CFG).
    #[arg(long, default_value_t = 0.1)]
    pub caption_dropout: f64,
    /// Offset noise (diffusers' `--noise_offset`): add s·N(0, 1) per sample and channel to the
    /// training noise, so the prompt rather than the seed decides an image's overall colour (small
    /// latents leave the mean of x_T readable under SD1.5's schedule). 0 = plain ε.
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f64,
    /// Min-SNR-γ loss weighting (diffusers' `--snr_gamma`; 5 is the paper's choice): weight each
    /// sample's ε loss by min(SNR_t, γ)/SNR_t. 0 = unweighted (the reference's default).
    #[arg(long, default_value_t = 0.0)]
    pub snr_gamma: f64,
    /// Start from a trained teacher folder's unet/ and text_encoder/ weights (fresh optimizer)
    /// instead of a seeded init, so that a stage can span sessions through its exported weights.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// With --init from a smaller U-Net of the same layout (e.g. one that had no attention at
    /// some level): tensors --init lacks start freshly drawn, the output projections of new
    /// attention blocks at zero, so the grown model starts as exactly --init's function.
    #[arg(long, requires = "init")]
    pub grow: bool,
    /// A trained text encoder folder (e.g. `<pretrain text run>/text_encoder`) to condition on,
    /// frozen, instead of training one jointly; replaces --init's. Its config.json must be
    /// --config's.
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// Keep an exponential moving average of the weights with this decay (diffusers'
    /// `--use_ema`, whose default is 0.9999; its warm-up too) and sample and export it rather
    /// than the last step's weights. 0 = off.
    #[arg(long, default_value_t = 0.0)]
    pub ema: f64,
    /// Train on the VAE posterior's mean instead of a sample from it (diffusers samples). For
    /// whitened latents (`lcm whiten`), whose weakest directions the posterior's own noise would
    /// otherwise fill: the U-Net would learn to draw that noise as coloured blotches.
    #[arg(long)]
    pub posterior_mean: bool,
    #[command(flatten)]
    pub train: TrainArgs,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

#[derive(Serialize, Deserialize, PartialEq)]
struct TeacherSettings {
    caption_dropout: f64,
    #[serde(default)]
    noise_offset: f64,
    #[serde(default)]
    snr_gamma: f64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    frozen_text: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    ema: f64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    posterior_mean: bool,
    #[serde(flatten)]
    stage: StageSettings,
}

/// The teacher being trained: U-Net and text encoder over one set of variables.
pub struct Teacher {
    pub unet: UNet2DConditionModel,
    pub text: ClipTextModel,
}

impl Teacher {
    /// Both halves under one VarBuilder (`unet.*`, `text_encoder.text_model.*`).
    pub fn new(
        unet_cfg: &UNetConfig,
        te_cfg: &ClipTextConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            unet: UNet2DConditionModel::new(unet_cfg, vb.pp("unet"))?,
            text: ClipTextModel::new(te_cfg, vb.pp("text_encoder").pp("text_model"))?,
        })
    }
}

struct TeacherTask<'a> {
    args: &'a TeacherArgs,
    settings: TeacherSettings,
    model: Teacher,
    vae: AutoencoderKL,
    data: EncodedDataset,
    uncond_ids: Tensor,
    schedule: NoiseSchedule,
    sample_prompts: Vec<String>,
}

impl Task for TeacherTask<'_> {
    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise")
    }

    fn loss(&self, rng: &mut ChaCha8Rng) -> Result<(Tensor, Metrics)> {
        let (a, s) = (self.args, &self.settings);
        let b = s.stage.batch_size;
        let device = self.data.mean.device();
        let rows_t = random_rows(rng, self.data.rows()?, b, device)?;
        let shape = self.data.batch_shape(b);
        // Drawn either way, so that both choices see the same data order and noise.
        let eps_vae = SeededNoise::new(rng.random()).sample(&shape, device)?;
        let z = self
            .data
            .posterior(&rows_t, (!a.posterior_mean).then_some(&eps_vae))?;
        let z0 = self.vae.scale(&z)?;
        let drop: Vec<bool> = (0..b)
            .map(|_| rng.random::<f64>() < a.caption_dropout)
            .collect();
        let ids = self.data.ids.index_select(&rows_t, 0)?;
        let ids = if drop.iter().any(|&d| d) {
            let rows: Vec<Tensor> = (0..b)
                .map(|i| {
                    if drop[i] {
                        Ok(self.uncond_ids.clone())
                    } else {
                        ids.narrow(0, i, 1)
                    }
                })
                .collect::<candle_core::Result<_>>()?;
            Tensor::cat(&rows, 0)?
        } else {
            ids
        };
        let num_t = self.schedule.num_train_timesteps();
        let t: Vec<usize> = (0..b).map(|_| rng.random_range(0..num_t)).collect();
        let mut noise = SeededNoise::new(rng.random()).sample(&shape, device)?;
        if a.noise_offset > 0.0 {
            // Drawn only with an offset, so plain runs keep their random stream (and resumes).
            let mut src = SeededNoise::new(rng.random());
            noise = crate::sample::schedule::offset_noise(&noise, a.noise_offset, &mut src)?;
        }
        let x_t = self.schedule.add_noise(&z0, &noise, &t)?;
        let mut ctx = self.model.text.forward(&ids)?;
        if s.frozen_text {
            // No gradient is wanted through a frozen encoder; detaching skips its backward.
            ctx = ctx.detach();
        }
        let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        let pred =
            self.model
                .unet
                .forward(&x_t, &Tensor::new(tf.as_slice(), device)?, &ctx, None)?;
        let sq = (pred - &noise)?.sqr()?;
        let loss = if a.snr_gamma > 0.0 {
            let w = crate::sample::schedule::min_snr_weights(&self.schedule, &t, a.snr_gamma);
            sq.broadcast_mul(&crate::sample::schedule::per_sample(&w, &sq)?)?
                .mean_all()?
        } else {
            sq.mean_all()?
        };
        Ok((loss, Metrics::new()))
    }

    /// One row per prompt: DDIM 25 steps at guidance 7.5 for two seeds, from the exported folder.
    fn sample(&mut self, state: &TrainState, path: &Path) -> Result<()> {
        let out = self.args.train.output.join("model");
        export_teacher(self.args, &state.export_weights(), &out)?;
        let pipe = crate::pipeline::Pipeline::load(&out, self.data.mean.device(), DType::F32)?;
        let mut tiles = Vec::new();
        for prompt in &self.sample_prompts {
            for seed in 0..2u64 {
                let req = crate::pipeline::GenerateRequest {
                    prompt: prompt.clone(),
                    steps: Some(25),
                    n: 1,
                    ..Default::default()
                };
                let g = pipe.generate(
                    &req,
                    &Default::default(),
                    &mut SeededNoise::new(seed),
                    &mut |_| {},
                )?;
                tiles.push(g.images[0].clone());
            }
        }
        let grid = crate::pipeline::image_io::grid(&tiles, 2)?;
        crate::pipeline::image_io::save_png(&grid, path)
    }

    fn export(&mut self, state: &TrainState, run_dir: &Path) -> Result<()> {
        let out = run_dir.join("model");
        export_teacher(self.args, &state.export_weights(), &out)?;
        println!(
            "trained the teacher for {} steps; wrote {}",
            state.step,
            out.display()
        );
        Ok(())
    }
}

/// `lcm pretrain unet`.
pub fn run(args: &TeacherArgs) -> Result<()> {
    let c = &args.train;
    let (device, _) = c.runtime.resolve()?;
    let dir = &args.config;
    let unet_cfg = UNetConfig::load(&dir.join("unet/config.json"))?;
    let te_cfg = ClipTextConfig::load(&dir.join("text_encoder/config.json"))?;
    let sched_cfg = SchedulerConfig::load(&dir.join("scheduler/scheduler_config.json"))?;
    let tokenizer =
        ClipTokenizer::from_dir(&dir.join("tokenizer"), te_cfg.max_position_embeddings)?;
    let resolution = c.resolution.unwrap_or(64);
    let (vae, vae_folder) = frozen_vae(&args.vae, resolution, &device)?;
    let vae_cfg = &vae_folder.config;
    if unet_cfg.in_channels != vae_cfg.latent_channels {
        bail!(
            "the U-Net takes {} channels but the VAE makes {}",
            unet_cfg.in_channels,
            vae_cfg.latent_channels
        )
    }
    let stage = c.stage(resolution, &PRETRAIN)?;
    if !(0.0..=1.0).contains(&args.caption_dropout) {
        bail!("--caption-dropout must be in [0, 1]")
    }
    let plan = c.plan(&PRETRAIN)?;
    let options = c.options(&PRETRAIN)?;
    if !(0.0..=1.0).contains(&args.noise_offset) {
        bail!("--noise-offset {} must be in [0, 1]", args.noise_offset)
    }
    if args.snr_gamma.is_nan() || args.snr_gamma < 0.0 {
        bail!("--snr-gamma {} must be ≥ 0", args.snr_gamma)
    }
    if let Some(te) = &args.text_encoder {
        if ClipTextConfig::load(&te.join("config.json"))? != te_cfg {
            bail!(
                "--text-encoder {}: its config.json differs from --config's text_encoder/config.json",
                te.display()
            )
        }
    }
    let data = encode_stage_data(c, resolution, (&vae_folder, &vae), dir, &tokenizer, &device)?;
    let uncond_ids = Tensor::new(tokenizer.encode("")?.ids.as_slice(), &device)?.unsqueeze(0)?;
    let schedule = NoiseSchedule::from_config(&sched_cfg)?;

    let build = |vb: VarBuilder| Teacher::new(&unet_cfg, &te_cfg, vb);
    let mut init = crate::nn::init::init_weights(c.seed, &device, build)?;
    let text_encoder_from = |te: &Path, init: &HashMap<String, Tensor>| {
        component_weights(te, "text_encoder.", init, "--text-encoder", &device)
    };
    if let Some(dir) = &args.init {
        let mut trained = HashMap::new();
        for part in ["unet", "text_encoder"] {
            let weights = load_component(&dir.join(part), &device)
                .with_context(|| format!("--init {}", dir.display()))?;
            trained.extend(weights.into_iter().map(|(k, v)| (format!("{part}.{k}"), v)));
        }
        if let Some(te) = &args.text_encoder {
            trained.retain(|k, _| !k.starts_with("text_encoder."));
            trained.extend(text_encoder_from(te, &init)?);
        }
        let fresh = take_trained(&mut init, &trained, dir, args.grow)?;
        if args.grow {
            eprintln!("--grow: {fresh} parameters new to --init (attention outputs zeroed)");
        }
    } else if let Some(te) = &args.text_encoder {
        let weights = text_encoder_from(te, &init)?;
        init.extend(weights);
    }
    let frozen_text = args.text_encoder.is_some();
    let state = TrainState::with_trainable(init, options, |k| {
        !(frozen_text && k.starts_with("text_encoder."))
    })?
    .with_ema(EmaDecay::Warmup(args.ema))?;
    let model = build(state.var_builder(&device))?;
    let sample_prompts = data.captions.iter().take(4).cloned().collect();
    let task = TeacherTask {
        args,
        settings: TeacherSettings {
            caption_dropout: args.caption_dropout,
            noise_offset: args.noise_offset,
            snr_gamma: args.snr_gamma,
            frozen_text,
            ema: args.ema,
            posterior_mean: args.posterior_mean,
            stage,
        },
        model,
        vae,
        data,
        uncond_ids,
        schedule,
        sample_prompts,
    };
    Run::new(state, task).resume_and_train(c.resume.as_deref(), &device, &plan)
}

/// Write a diffusers StableDiffusionPipeline folder: the trained U-Net and text encoder, the VAE,
/// tokenizer and scheduler.
fn export_teacher(args: &TeacherArgs, weights: &HashMap<String, Tensor>, out: &Path) -> Result<()> {
    let part = |prefix: &str| -> HashMap<String, Tensor> {
        weights
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
            .collect()
    };
    for (name, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        let cfg = std::fs::read(args.config.join(name).join("config.json"))?;
        crate::files::write_atomic(&out.join(name).join("config.json"), &cfg)?;
        crate::files::save_safetensors(&part(&format!("{name}.")), &out.join(name).join(file))?;
    }
    crate::files::copy_files(&args.vae, &out.join("vae"))?;
    crate::files::copy_files(&args.config.join("tokenizer"), &out.join("tokenizer"))?;
    crate::files::copy_files(&args.config.join("scheduler"), &out.join("scheduler"))?;
    crate::pipeline::source::write_model_index(out, "StableDiffusionPipeline", "DDIMScheduler")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The jointly trained teacher must train every weight: candle ops without a backward cut the
    /// graph silently (e.g. its fused softmax and layer norm).
    #[test]
    fn every_teacher_weight_gets_a_gradient() -> Result<()> {
        let unet_cfg = crate::train::unet_config("tiny")?;
        let (te_cfg, tok) = crate::train::tiny_text_config()?;
        let dev = Device::Cpu;
        let build = |vb: VarBuilder| Teacher::new(&unet_cfg, &te_cfg, vb);
        let (vars, model) = crate::nn::init::live_vars(0, &dev, build)?;
        let ids: Vec<u32> = ["a red circle on blue", "an emoji of a cat"]
            .iter()
            .flat_map(|p| tok.encode(p).unwrap().ids)
            .collect();
        let ids = Tensor::from_vec(ids, (2, te_cfg.max_position_embeddings), &dev)?;
        let s = unet_cfg.sample_size.unwrap_or(16);
        let x = Tensor::randn(0f32, 1.0, (2, unet_cfg.in_channels, s, s), &dev)?;
        let noise = Tensor::randn(0f32, 1.0, x.shape(), &dev)?;
        let ctx = model.text.forward(&ids)?;
        let t = Tensor::new(&[10f32, 700.0], &dev)?;
        let loss = (model.unet.forward(&x, &t, &ctx, None)? - noise)?
            .sqr()?
            .mean_all()?;
        let grads = loss.backward()?;
        // Token embeddings of ids absent from the batch legitimately get zero gradient.
        let mut missing = crate::nn::init::without_gradient(&vars, &grads, |name| {
            name.ends_with("token_embedding.weight")
        })?;
        missing.sort();
        assert!(missing.is_empty(), "no gradient for {missing:?}");
        assert!(vars.keys().any(|k| k.starts_with("text_encoder.")));
        Ok(())
    }
}
