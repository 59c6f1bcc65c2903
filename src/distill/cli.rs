//! `lcm distill`: a text-to-image teacher folder in, an LCM (or LCM-LoRA adapter) folder out. The
//! image-specific parts of a distillation live here — the teacher pipeline, the encoded data, the
//! U-Net student, sample grids and the diffusers export; the training itself is the shared
//! [`super::task::LcdTask`] on the shared loop.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::student::UNetStudent;
use super::task::{distillation, DistillConfig, TrainData};
use crate::data::encode::{EncodeSpec, TextEncoderRef};
use crate::model::folder::ModelFolder;
use crate::model::unet::UNet2DConditionModel;
use crate::pipeline::source::resolve;
use crate::pipeline::{GenerateRequest, Pipeline};
use crate::sample::noise::SeededNoise;
use crate::sample::sampler::SamplerKind;
use crate::sample::schedule::NoiseSchedule;
use crate::train::args::{TrainArgs, DISTILL};
use crate::train::start::check_resolution;

/// `lcm distill`: flags as in the reference script (defaults equal to it unless noted).
#[derive(clap::Args, Debug, Clone)]
pub struct DistillArgs {
    /// Teacher: a diffusers-layout folder, a pipeline name or a hub id.
    #[arg(long)]
    pub teacher: String,
    /// A single-file teacher: a separate VAE file instead of the checkpoint's own.
    #[arg(long)]
    pub teacher_vae: Option<PathBuf>,
    /// A single-file teacher: a diffusers folder whose component configs replace the inferred.
    #[arg(long)]
    pub teacher_config: Option<PathBuf>,
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
    /// lcd (a consistency model, as LCM), flow-map (a flow map: any step count, no multi-step
    /// decay; docs/flow-map.md) or flow-map-semigroup (the same trained by the semigroup
    /// condition).
    #[arg(long, value_enum, default_value = "lcd")]
    pub objective: super::task::Objective,
    /// Flow maps: the end times' mix as weights clean:step:between — the data, the teacher step's
    /// own end, or uniform between. More weight on clean favours 1-step sampling.
    #[arg(long, default_value = "1:1:2")]
    pub end_mix: super::flowmap::EndMix,
    /// Flow maps: compare ε̂ with its target in ε (eps), in the clean estimate each implies
    /// (x0: errors weighted by √((1−ᾱ_s)/ᾱ_s), as LCD's loss weights them), or in the clean
    /// estimate's units for the jumps to the data only (clean-x0).
    #[arg(long, value_enum, default_value = "eps")]
    pub flow_loss: super::flowmap::LossUnits,
    #[arg(long, default_value_t = 0.95)]
    pub ema: f64,
    /// l2 or huber.
    #[arg(long, default_value = "l2")]
    pub loss: String,
    #[arg(long, default_value_t = 0.001)]
    pub huber_c: f64,
    #[arg(long, default_value_t = 50)]
    pub ddim_steps: usize,
    /// Start the student (and its EMA target) from an LCM distilled from this teacher (a model
    /// folder or pipeline name, image or motion) instead of from the teacher's own weights, with a
    /// fresh optimizer and schedule: a distillation continued past its planned steps, or a
    /// flow-map student started from the LCM (its end-time embedding starts at zero). Its network
    /// must be the teacher's layout plus a guidance embedding of --w-embed-dim.
    #[arg(long, conflicts_with = "lora_rank")]
    pub init: Option<String>,
    #[command(flatten)]
    pub train: TrainArgs,
}

/// The denoiser weights of a previously distilled LCM (`--init`), from `dir`, checked against the
/// teacher's: every teacher tensor with its shape, plus the guidance embedding
/// (`time_embedding.cond_proj`) taking `w_embed_dim` inputs, and nothing else. Image and motion
/// students start the same way.
pub(super) fn student_start(
    dir: &Path,
    weights: HashMap<String, Tensor>,
    teacher: &HashMap<String, Tensor>,
    w_embed_dim: usize,
) -> Result<HashMap<String, Tensor>> {
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
            bail!("{}: {name} is not in the teacher's network", dir.display())
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

impl DistillArgs {
    /// The run's settings from the flags, with the teacher's boundary-condition scaling.
    pub fn config(&self, timestep_scaling: f64) -> Result<DistillConfig> {
        let c = &self.train;
        let loss = match self.loss.as_str() {
            "l2" => None,
            "huber" => Some(self.huber_c),
            other => bail!("--loss {other:?}: expected l2 or huber"),
        };
        let config = DistillConfig {
            ddim_steps: self.ddim_steps,
            w_min: self.w_min,
            w_max: self.w_max,
            w_embed_dim: self.w_embed_dim,
            ema: self.ema,
            huber_c: loss,
            options: c.options(&DISTILL)?,
            batch_size: c.batch_size(&DISTILL)?,
            timestep_scaling,
            lora_rank: self.lora_rank,
            noise_offset: self.noise_offset,
            guidance_from: self.guidance_from,
            posterior_mean: self.posterior_mean,
            objective: self.objective,
            end_mix: self.end_mix,
            flow_loss: self.flow_loss,
        };
        config.check()?;
        Ok(config)
    }
}

/// The whole `lcm distill` run: a motion teacher's folder goes to the motion side
/// ([`super::motion`]); everything else is a text-to-image teacher.
pub fn run(args: &DistillArgs) -> Result<()> {
    let spec = crate::pipeline::single_file::model_spec(
        &args.teacher,
        args.teacher_vae.as_deref(),
        args.teacher_config.as_deref(),
        "teacher-",
    )?;
    if let Some(dir) = crate::pipeline::source::local_dir(&spec)? {
        if crate::pipeline::text2motion::is_motion_folder(&dir) {
            return super::motion::run(args, &dir);
        }
    }
    let c = &args.train;
    // --dtype sets the frozen teacher's precision (U-Net and text encoder; the VAE stays f32), as
    // the reference script's weight_dtype; the student and its EMA target keep f32 weights.
    let (device, teacher_dtype) = c.runtime.resolve()?;
    let teacher = resolve(&spec).context("--teacher")?.folder;
    // The teacher's U-Net tensors, loaded once: the student starts from them and an f32 teacher
    // is built over them. Until the run is set up, frozen networks share their transposed
    // weights, so an LCM-LoRA teacher, student and target (all over these tensors) hold one copy.
    let teacher_weights = teacher.unet.tensors(&device)?;
    let shared = crate::nn::share_frozen();
    let pipe =
        Pipeline::with_unet_tensors(&teacher, &device, teacher_dtype, Some(&teacher_weights))
            .with_context(|| format!("--teacher {}", teacher.root.display()))?;
    let f = pipe.vae_scale_factor();
    let resolution = c
        .resolution
        .unwrap_or(pipe.unet.config.sample_size.unwrap_or(64) * f);
    check_resolution(resolution, f)?;
    let plan = c.plan(&DISTILL)?;
    let config = args.config(pipe.scheduler_config.timestep_scaling.unwrap_or(10.0))?;
    if pipe.unet.config.time_cond_proj_dim.is_some() {
        bail!(
            "--teacher {}: its U-Net already has a guidance embedding (an LCM); distil from a many-step teacher",
            args.teacher
        )
    }
    std::fs::create_dir_all(&c.output)
        .with_context(|| format!("cannot create {}", c.output.display()))?;
    let encoded = crate::data::encode::encode(
        &EncodeSpec {
            data: &c.data,
            resolution,
            vae: (&teacher.vae, &pipe.vae),
            tokenizer_dir: &teacher.tokenizer,
            tokenizer: &pipe.tokenizer,
            text_encoder: Some(TextEncoderRef {
                component: &teacher.text_encoder,
                model: &pipe.text_encoder,
                dtype: pipe.dtype,
            }),
            cache_dir: &c.output.join("cache"),
        },
        &device,
    )?;
    // The latents: posterior means, or one sample each from a stream of their own.
    let mut noise = SeededNoise::new(c.seed ^ 0x0076_6165);
    let latents = encoded.latents(&pipe.vae, args.posterior_mean, &mut noise)?;
    let (prompt_embeds, uncond_embeds) = encoded
        .prompt_embeds
        .clone()
        .context("the encoded dataset has no prompt embeddings")?;
    let data = TrainData {
        latents,
        prompt_embeds,
        uncond_embeds,
    };
    let student_init = match &args.init {
        Some(spec) => {
            let unet = resolve(spec)
                .with_context(|| format!("--init {spec}"))?
                .folder
                .unet;
            let weights = unet.tensors(&device)?;
            Cow::Owned(
                student_start(&unet.dir, weights, &teacher_weights, args.w_embed_dim)
                    .with_context(|| format!("--init {spec}"))?,
            )
        }
        None => Cow::Borrowed(&teacher_weights),
    };
    let student = UNetStudent::new(
        &pipe.unet.config,
        config.student_w_embed(),
        config.objective.flow_condition().is_some(),
    );
    let student_cfg = student.config.clone();
    let schedule = NoiseSchedule::from_config(&pipe.scheduler_config)?;
    let lora = config.lora_rank.is_some();
    let export_config = config.clone();
    let mut run = distillation(
        &pipe.unet,
        Box::new(student),
        &student_init,
        schedule,
        config,
        data,
        &device,
    )?;
    // Previews build a network per sample grid: a cache kept open would keep each one's copies.
    drop(shared);
    if let Some(r) = &c.resume {
        run.resume(r, &device)?;
    }
    if c.sample_every > 0 {
        // A second copy of the teacher pipeline whose U-Net is swapped for the student.
        let mut sampler = Pipeline::new(&teacher, &device, DType::F32)?;
        let prompts: Vec<String> = encoded.captions.iter().take(4).cloned().collect();
        run.task.preview = Some(Box::new(move |weights, path| {
            sampler.unet = UNet2DConditionModel::new(
                &student_cfg,
                VarBuilder::from_tensors(weights.clone(), DType::F32, &sampler.device),
            )?;
            write_sample_grid(&sampler, lora, &prompts, resolution, path)
        }));
    }
    run.task.exporter = Some(Box::new(move |weights, out| {
        export(weights, &export_config, &teacher, out)
    }));
    run.train(&plan)?;
    println!(
        "distilled {} steps; wrote {}",
        run.state.step,
        c.output.display()
    );
    Ok(())
}

/// Write the student as a diffusers LatentConsistencyModelPipeline folder beside the teacher's
/// VAE, text encoder and tokenizer.
fn export(
    weights: &HashMap<String, Tensor>,
    config: &DistillConfig,
    teacher: &ModelFolder,
    out: &Path,
) -> Result<()> {
    for (dir, name) in [
        (&teacher.vae.dir, "vae"),
        (&teacher.text_encoder.dir, "text_encoder"),
        (&teacher.tokenizer, "tokenizer"),
    ] {
        crate::files::copy_files(dir, &out.join(name))?;
    }
    let mut unet_cfg = teacher.unet.config_json.clone();
    unet_cfg["time_cond_proj_dim"] = config.w_embed_dim.into();
    if config.objective.flow_condition().is_some() {
        unet_cfg["end_time_embedding"] = true.into();
    }
    crate::files::write_atomic(
        &out.join("unet/config.json"),
        &serde_json::to_vec_pretty(&unet_cfg)?,
    )?;
    crate::files::save_safetensors(
        weights,
        &out.join("unet/diffusion_pytorch_model.safetensors"),
    )?;
    crate::files::write_atomic(
        &out.join("scheduler/scheduler_config.json"),
        &serde_json::to_vec_pretty(&lcm_scheduler(&teacher.scheduler_json, config))?,
    )?;
    crate::pipeline::source::write_model_index(
        out,
        "LatentConsistencyModelPipeline",
        "LCMScheduler",
    )
}

/// The student's `LCMScheduler` config: the teacher's noise schedule, the distillation's solver
/// grid and boundary scaling.
pub fn lcm_scheduler(teacher: &serde_json::Value, config: &DistillConfig) -> serde_json::Value {
    let t = teacher;
    serde_json::json!({
        "_class_name": "LCMScheduler",
        "num_train_timesteps": t.get("num_train_timesteps").cloned().unwrap_or(1000.into()),
        "beta_start": t.get("beta_start").cloned().unwrap_or(0.00085.into()),
        "beta_end": t.get("beta_end").cloned().unwrap_or(0.012.into()),
        "beta_schedule": t.get("beta_schedule").cloned().unwrap_or("scaled_linear".into()),
        "original_inference_steps": config.ddim_steps,
        "timestep_scaling": config.timestep_scaling,
        "set_alpha_to_one": true, "steps_offset": 1, "prediction_type": "epsilon",
        "timestep_spacing": "leading", "clip_sample": false, "thresholding": false,
        "rescale_betas_zero_snr": false,
    })
}

/// A grid of the student's 1/2/4-step samples: one row per prompt, one column per step count.
fn write_sample_grid(
    sampler: &Pipeline,
    lora: bool,
    prompts: &[String],
    resolution: usize,
    path: &Path,
) -> Result<()> {
    // LCM-LoRA students have no guidance embedding and sample without CFG.
    let guidance = if lora { 1.0 } else { 8.5 };
    let steps = [1usize, 2, 4];
    let mut tiles = Vec::new();
    for (row, prompt) in prompts.iter().enumerate() {
        for &n in &steps {
            let req = GenerateRequest {
                prompt: prompt.clone(),
                // The student's sampler: LCM, or a flow map's own jumps.
                sampler: Some(if sampler.unet.config.end_time_embedding {
                    SamplerKind::FlowMap
                } else {
                    SamplerKind::Lcm
                }),
                steps: Some(n),
                guidance: Some(guidance),
                width: Some(resolution),
                height: Some(resolution),
                n: 1,
                ..Default::default()
            };
            let mut noise = SeededNoise::new(row as u64);
            let generated = sampler.generate(&req, &Default::default(), &mut noise, &mut |_| {})?;
            tiles.push(generated.images[0].clone());
        }
    }
    let grid = crate::pipeline::image_io::grid(&tiles, steps.len())?;
    crate::pipeline::image_io::save_png(&grid, path)
}
