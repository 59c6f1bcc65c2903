//! The flags that pick a model and how it samples, shared by `generate`, `eval` and `serve`.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device};

use super::source::ResolvedModel;
use super::text2image::{GenerateRequest, Pipeline};
use crate::sample::sampler::{parse_flag, SamplerKind};

/// Which model, and an adapter merged into it.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A pipeline name (see `lcm models`), a diffusers-layout folder or a hub id (org/name);
    /// default: the shipped model.
    #[arg(long)]
    pub model: Option<String>,
    /// A LoRA adapter file (e.g. from `lcm distill --lora-rank`) merged into the U-Net at load
    /// time. Without --sampler/--steps/--guidance it samples as LCM-LoRA: lcm, 4 steps, guidance 1.
    #[arg(long)]
    pub lora: Option<PathBuf>,
    #[arg(long, default_value_t = 1.0)]
    pub lora_scale: f64,
    /// With a single-file checkpoint: a separate VAE file instead of the checkpoint's own.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// With a single-file checkpoint: a diffusers folder whose component configs (and tokenizer)
    /// replace what the tensors and SD1.5's conventions give.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl ModelArgs {
    /// What `--model` names, as the rest of the program takes it: a single-file checkpoint is
    /// replaced by its converted folder (converted on first use); no `--model`, the default.
    pub fn spec(&self) -> Result<String> {
        let model = self
            .model
            .as_deref()
            .unwrap_or(super::source::DEFAULT_MODEL);
        super::single_file::model_spec(model, self.vae.as_deref(), self.config.as_deref(), "")
    }

    /// The model resolved, loaded and (with `--lora`) merged.
    pub fn open(&self, device: &Device, dtype: DType) -> Result<(ResolvedModel, Pipeline)> {
        let lora = self.lora.as_deref().map(|f| (f, self.lora_scale));
        Pipeline::open(Some(&self.spec()?), lora, device, dtype)
    }
}

/// How to sample; each flag left out takes the model's default.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    #[arg(long, value_parser = parse_flag)]
    pub sampler: Option<SamplerKind>,
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale (LCM: fed as w = guidance − 1 to the guidance embedding; otherwise CFG).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// TCD's gamma (stochasticity), 0..1 (default 0.3); with `--sampler flowmap` the flow map's
    /// re-noising, the same way (default 0: deterministic jumps).
    #[arg(long)]
    pub tcd_gamma: Option<f64>,
}

impl SamplingArgs {
    /// One image of `prompt` from `seed`, sampled as the flags say.
    pub fn request(&self, prompt: &str, seed: u64) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.to_string(),
            sampler: self.sampler,
            steps: self.steps,
            guidance: self.guidance,
            tcd_gamma: self.tcd_gamma,
            n: 1,
            seed,
            ..Default::default()
        }
    }
}
