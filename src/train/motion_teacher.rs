//! `lcm pretrain motion-teacher`: the latent motion denoiser ([`crate::model::motion_denoiser`])
//! learns ε-prediction on the SD schedule over a frozen motion VAE's latents, captions dropped 10 %
//! of the time for classifier-free guidance (MLD's teacher). Every training clip is encoded twice —
//! as it is and mirrored, with "left" and "right" swapped in its captions — through the VAE
//! (posterior mean and variance kept; a latent is drawn from them each step), and every caption
//! through the sentence encoder once. The latents are scaled to unit variance (the factor goes
//! into the exported VAE's config, as SD's `scaling_factor`). The export is a whole motion model
//! folder that `lcm generate` and `lcm distill --teacher` open.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::augment::mirror_caption;
use crate::data::humanml3d::{load, LoadOptions};
use crate::model::config::SchedulerConfig;
use crate::model::motion_denoiser::{text_condition, MotionDenoiser, MotionDenoiserConfig};
use crate::model::motion_vae::{MotionVae, Normaliser, WEIGHTS_FILE};
use crate::model::sentence::{SentenceEncoder, DEFAULT_SENTENCE_ENCODER};
use crate::motion::{features, joints_from_features, FEATURES};
use crate::pipeline::text2motion::{
    decode, sample_latents, MotionIndex, MotionOptions, MOTION_PIPELINE,
};
use crate::sample::noise::{NoiseSource, SeededNoise};
use crate::sample::sampler::SamplerKind;
use crate::sample::schedule::NoiseSchedule;
use crate::train::args::{StageSettings, TrainArgs, PRETRAIN};
use crate::train::run::{Run, Task};
use crate::train::state::{Metrics, TrainState};

#[derive(clap::Args, Debug, Clone)]
pub struct MotionTeacherArgs {
    /// The trained motion VAE folder (`RUN/motion_vae` of `lcm pretrain motion-vae`).
    #[arg(long)]
    pub vae: PathBuf,
    /// The denoiser's sizes (a `denoiser/config.json`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny-motion/denoiser/config.json"))]
    pub config: PathBuf,
    /// The noise schedule (a `scheduler_config.json`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny-motion/scheduler/scheduler_config.json"))]
    pub scheduler: PathBuf,
    /// The sentence encoder: `minilm` (shipped), a folder, or a hub id.
    #[arg(long, default_value = DEFAULT_SENTENCE_ENCODER)]
    pub sentence_encoder: String,
    /// Fraction of captions replaced by the empty one (for classifier-free guidance).
    #[arg(long, default_value_t = 0.1)]
    pub caption_dropout: f64,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    pub config: MotionDenoiserConfig,
    pub caption_dropout: f64,
    pub scaling_factor: f64,
    pub sentence_encoder: String,
    #[serde(flatten)]
    pub stage: StageSettings,
}

/// Encoded training data: per clip variant its posterior, per caption its text condition.
pub struct MotionLatents {
    /// `[n, tokens, channels]` posterior means and standard deviations (unscaled).
    pub mean: Tensor,
    pub std: Tensor,
    /// `[captions, text_tokens, dim]`.
    pub text: Tensor,
    /// The captions of each variant (rows of `text`).
    pub captions_of: Vec<Vec<u32>>,
    /// The empty caption's condition `[1, text_tokens, dim]`.
    pub uncond: Tensor,
    /// The frames of each variant.
    pub frames: Vec<usize>,
}

/// Encode a split's clips (and their mirror images) and captions for the latent stages
/// (the teacher, and distillation).
pub fn encode_split(
    dir: &Path,
    split: &str,
    vae: &MotionVae,
    norm: &Normaliser,
    encoder: &SentenceEncoder,
    text_tokens: usize,
    device: &Device,
) -> Result<MotionLatents> {
    let opts = LoadOptions {
        min_frames: 2,
        max_frames: vae.config.max_frames + 1,
    };
    let data = load(dir, split, &opts)?;
    if data.clips.is_empty() {
        bail!("{}: the {split} split has no clips", dir.display())
    }
    let mut clips: Vec<Vec<f32>> = Vec::new();
    let mut captions: Vec<String> = Vec::new();
    let mut captions_of = Vec::new();
    for c in &data.clips {
        let max = vae.config.max_frames * FEATURES;
        let rows = &c.features[..c.features.len().min(max)];
        let joints = joints_from_features(&data.denormalise(rows))?;
        let mirrored = features(&crate::data::motion::mirror(&joints), &Default::default())?;
        for (f, flip) in [
            (rows.to_vec(), false),
            (norm.normalise_rows(&mirrored), true),
        ] {
            let start = captions.len() as u32;
            for cap in &c.captions {
                captions.push(if flip {
                    mirror_caption(&cap.text)
                } else {
                    cap.text.clone()
                });
            }
            captions_of.push((start..captions.len() as u32).collect());
            clips.push(f);
        }
    }
    let bar = indicatif::ProgressBar::new((clips.len() + captions.len()) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("encoding {pos}/{len} {per_sec} ETA {eta}")
            .expect("valid template"),
    );
    let (mut means, mut stds) = (Vec::new(), Vec::new());
    for chunk in clips.chunks(32) {
        let (x, valid) = crate::train::motion_vae::pad(chunk, device)?;
        let post = vae.encode(&x, Some(&valid))?;
        means.push(post.mean);
        stds.push((post.logvar * 0.5)?.exp()?);
        bar.inc(chunk.len() as u64);
    }
    let mut texts = Vec::new();
    for chunk in captions.chunks(128) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        texts.push(text_condition(&encoder.encode(&refs)?, text_tokens)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(MotionLatents {
        mean: Tensor::cat(&means, 0)?,
        std: Tensor::cat(&stds, 0)?,
        text: Tensor::cat(&texts, 0)?,
        captions_of,
        uncond: text_condition(&encoder.encode(&[""])?, text_tokens)?,
        frames: clips.iter().map(|c| c.len() / FEATURES).collect(),
    })
}

impl MotionLatents {
    /// One latent draw per row of `rows` from its posterior (unscaled).
    pub fn draw(&self, rows: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let mean = self.mean.index_select(rows, 0)?;
        let eps = SeededNoise::new(rng.random()).sample(mean.shape(), mean.device())?;
        Ok((mean + self.std.index_select(rows, 0)?.mul(&eps)?)?)
    }

    /// For each row, one of its captions' conditions, or the empty one with probability `drop`:
    /// one gather from the caption table, the dropped rows then swapped for the empty caption.
    pub fn captions(&self, rows: &[u32], drop: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let (mut pick, mut dropped) = (Vec::with_capacity(rows.len()), Vec::new());
        for &r in rows {
            if drop > 0.0 && rng.random_bool(drop) {
                dropped.push(1u8);
                pick.push(0u32);
            } else {
                let c = &self.captions_of[r as usize];
                dropped.push(0);
                pick.push(c[rng.random_range(0..c.len())]);
            }
        }
        let device = self.text.device();
        let text = self
            .text
            .index_select(&Tensor::new(pick.as_slice(), device)?, 0)?;
        if !dropped.contains(&1) {
            return Ok(text);
        }
        let mask =
            Tensor::from_vec(dropped, (rows.len(), 1, 1), device)?.broadcast_as(text.shape())?;
        Ok(mask.where_cond(&self.uncond.broadcast_as(text.shape())?, &text)?)
    }
}

/// The prompts of the training previews.
pub const PREVIEW_PROMPTS: [&str; 4] = [
    "a person walks forward and turns left",
    "a person stands still and waves with the right hand",
    "a person jumps twice",
    "someone kicks with the left leg",
];

struct MotionTeacherTask {
    settings: Settings,
    model: MotionDenoiser,
    vae: MotionVae,
    norm: Normaliser,
    schedule: NoiseSchedule,
    scheduler: SchedulerConfig,
    data: MotionLatents,
    preview: Tensor,
    args: MotionTeacherArgs,
}

impl Task for MotionTeacherTask {
    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise")
    }

    fn loss(&self, rng: &mut ChaCha8Rng) -> Result<(Tensor, Metrics)> {
        let s = &self.settings;
        let b = s.stage.batch_size;
        let n = self.data.frames.len() as u32;
        let rows: Vec<u32> = (0..b).map(|_| rng.random_range(0..n)).collect();
        let idx = Tensor::new(rows.as_slice(), self.data.mean.device())?;
        let z0 = (self.data.draw(&idx, rng)? * s.scaling_factor)?;
        let cond = self.data.captions(&rows, s.caption_dropout, rng)?;
        let t: Vec<usize> = (0..b)
            .map(|_| rng.random_range(0..self.schedule.num_train_timesteps()))
            .collect();
        let noise = SeededNoise::new(rng.random()).sample(z0.shape(), z0.device())?;
        let x_t = self.schedule.add_noise(&z0, &noise, &t)?;
        let tt: Vec<f32> = t.iter().map(|&t| t as f32).collect();
        let eps =
            self.model
                .forward(&x_t, &Tensor::new(tt.as_slice(), z0.device())?, &cond, None)?;
        let loss = (eps - noise)?.sqr()?.mean_all()?;
        Ok((loss, Metrics::new()))
    }

    fn sample(&mut self, _state: &TrainState, path: &Path) -> Result<()> {
        let o = MotionOptions {
            frames: 80,
            sampler: SamplerKind::Ddim,
            steps: 50,
            guidance: 7.5,
            seed: 0,
            gamma: None,
        };
        let c = &self.settings.config;
        let z = sample_latents(
            &self.model,
            (c.latent_tokens, c.latent_channels),
            &self.scheduler,
            &self.preview.detach(),
            &self.data.uncond,
            &o,
        )?
        .detach();
        let clips = decode(&self.vae, &self.norm, &z, o.frames)?;
        crate::motion::render::write_pairs(path, &clips, 8)
    }

    fn export(&mut self, state: &TrainState, run_dir: &Path) -> Result<()> {
        let out = run_dir.join("model");
        export_motion_model(
            &out,
            &self.settings.config,
            &state.export_weights(),
            &self.args.vae,
            self.settings.scaling_factor,
            &crate::model::config::read_json(&self.args.scheduler)?,
            &self.settings.sentence_encoder,
        )?;
        println!(
            "trained the motion teacher for {} steps; wrote {}",
            state.step,
            out.display()
        );
        Ok(())
    }
}

/// Write a motion model folder: the denoiser (config, weights), the VAE (copied, with the latent
/// scaling factor), the scheduler and the index naming the sentence encoder.
pub fn export_motion_model(
    out: &Path,
    config: &MotionDenoiserConfig,
    weights: &std::collections::HashMap<String, Tensor>,
    vae_dir: &Path,
    scaling_factor: f64,
    scheduler: &serde_json::Value,
    sentence_encoder: &str,
) -> Result<()> {
    let den = out.join("denoiser");
    std::fs::create_dir_all(&den).with_context(|| format!("cannot create {}", den.display()))?;
    crate::files::write_atomic(
        &den.join("config.json"),
        &serde_json::to_vec_pretty(config)?,
    )?;
    crate::files::save_safetensors(weights, &den.join(WEIGHTS_FILE))?;
    let vae_out = out.join("motion_vae");
    if vae_out != vae_dir {
        crate::files::copy_files(vae_dir, &vae_out)?;
    }
    let mut vae_cfg =
        crate::model::motion_vae::MotionVaeConfig::load(&vae_out.join("config.json"))?;
    vae_cfg.scaling_factor = scaling_factor;
    crate::files::write_atomic(
        &vae_out.join("config.json"),
        &serde_json::to_vec_pretty(&vae_cfg)?,
    )?;
    let sched = out.join("scheduler");
    std::fs::create_dir_all(&sched)?;
    crate::files::write_atomic(
        &sched.join("scheduler_config.json"),
        &serde_json::to_vec_pretty(scheduler)?,
    )?;
    let index = MotionIndex {
        class_name: MOTION_PIPELINE.into(),
        sentence_encoder: sentence_encoder.into(),
    };
    crate::files::write_atomic(
        &out.join("model_index.json"),
        &serde_json::to_vec_pretty(&index)?,
    )
}

/// `lcm pretrain motion-teacher`.
pub fn run(args: &MotionTeacherArgs) -> Result<()> {
    let c = &args.train;
    let (device, _) = c.runtime.resolve()?;
    let dir = c.motion_data()?.clone();
    if !(0.0..=1.0).contains(&args.caption_dropout) {
        bail!("--caption-dropout must be in [0, 1]")
    }
    let config = MotionDenoiserConfig::load(&args.config)?;
    let scheduler = SchedulerConfig::load(&args.scheduler)?;
    let (vae, norm) = crate::model::motion_vae::open(&args.vae, &device)?;
    if (vae.config.latent_tokens, vae.config.latent_channels)
        != (config.latent_tokens, config.latent_channels)
    {
        bail!(
            "{}: the denoiser works on {}×{} latents, the VAE at {} makes {}×{}",
            args.config.display(),
            config.latent_tokens,
            config.latent_channels,
            args.vae.display(),
            vae.config.latent_tokens,
            vae.config.latent_channels
        )
    }
    let encoder = SentenceEncoder::open(&args.sentence_encoder, &device)?;
    if encoder.dim != config.text_dim {
        bail!(
            "{}: text_dim {} but the sentence encoder {:?} gives {}",
            args.config.display(),
            config.text_dim,
            args.sentence_encoder,
            encoder.dim
        )
    }
    let data = encode_split(
        &dir,
        "train",
        &vae,
        &norm,
        &encoder,
        config.text_tokens,
        &device,
    )?;
    let var = data.mean.sqr()?.mean_all()?.to_scalar::<f32>()? as f64
        - data.mean.mean_all()?.to_scalar::<f32>()?.powi(2) as f64;
    // Rounded, so that a resume on another machine measures the same factor.
    let scaling_factor = ((1.0 / var.sqrt()) * 1e4).round() / 1e4;
    eprintln!(
        "{} clip variants, {} captions; latent scaling factor {scaling_factor}",
        data.frames.len(),
        data.text.dim(0)?
    );
    let preview = text_condition(&encoder.encode(&PREVIEW_PROMPTS)?, config.text_tokens)?;
    let settings = Settings {
        config: config.clone(),
        caption_dropout: args.caption_dropout,
        scaling_factor,
        sentence_encoder: args.sentence_encoder.clone(),
        stage: c.stage(vae.config.max_frames, &PRETRAIN)?,
    };
    let (state, model) = TrainState::fresh(c.seed, c.options(&PRETRAIN)?, &device, |vb| {
        MotionDenoiser::new(&config, vb)
    })?;
    let task = MotionTeacherTask {
        settings,
        model,
        vae,
        norm,
        schedule: NoiseSchedule::from_config(&scheduler)?,
        scheduler,
        data,
        preview,
        args: args.clone(),
    };
    Run::new(state, task).resume_and_train(c.resume.as_deref(), &device, &c.plan(&PRETRAIN)?)
}
