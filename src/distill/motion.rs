//! `lcm distill --teacher <motion model>`: the motion side of a distillation — the teacher
//! denoiser, the data encoded through its VAE and sentence encoder, 1/2/4-step previews and the
//! model-folder export. The training is the shared [`super::task::LcdTask`] with a
//! [`MotionStudent`], the same step as for the image U-Net.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;

use super::cli::{lcm_scheduler, DistillArgs};
use super::student::MotionStudent;
use super::task::{distillation, TrainData};
use crate::model::motion_denoiser::{text_condition, MotionDenoiser};
use crate::model::sentence::SentenceEncoder;
use crate::pipeline::text2motion::{decode, sample_latents, MotionFolder, MotionOptions};
use crate::sample::sampler::SamplerKind;
use crate::sample::schedule::NoiseSchedule;
use crate::train::args::DISTILL;
use crate::train::motion_teacher::{encode_split, export_motion_model, PREVIEW_PROMPTS};

pub fn run(args: &DistillArgs, dir: &Path) -> Result<()> {
    let c = &args.train;
    if args.lora_rank.is_some() || args.noise_offset > 0.0 {
        bail!("--lora-rank and --noise-offset are for image teachers")
    }
    let (device, _) = c.runtime.resolve()?;
    let folder = MotionFolder::open(dir).with_context(|| format!("--teacher {}", dir.display()))?;
    if folder.denoiser.time_cond_proj_dim.is_some() {
        bail!(
            "--teacher {}: its denoiser already has a guidance embedding (an LCM); distil from a many-step teacher",
            dir.display()
        )
    }
    let data_dir = &c.motion_data()?;
    let config = args.config(folder.scheduler.timestep_scaling.unwrap_or(10.0))?;
    let plan = c.plan(&DISTILL)?;
    let teacher_weights = denoiser_f32(&folder, &device)?;
    let student_init = match &args.init {
        Some(spec) => lcm_start(spec, &teacher_weights, args.w_embed_dim, &device)
            .with_context(|| format!("--init {spec}"))?,
        None => teacher_weights.clone(),
    };
    let teacher = MotionDenoiser::new(
        &folder.denoiser,
        VarBuilder::from_tensors(teacher_weights.clone(), DType::F32, &device),
    )?;
    let vae_dir = dir.join("motion_vae");
    let (vae, norm) = crate::model::motion_vae::open(&vae_dir, &device)?;
    let encoder = SentenceEncoder::open(&folder.index.sentence_encoder, &device)?;
    let text_tokens = folder.denoiser.text_tokens;
    let enc = encode_split(
        data_dir,
        "train",
        &vae,
        &norm,
        &encoder,
        text_tokens,
        &device,
    )?;
    // One row per (clip variant, caption); the latent drawn once from the posterior (or its mean
    // with --posterior-mean), from a stream of its own.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c.seed ^ 0x0076_6165);
    let (mut rows, mut caps) = (Vec::new(), Vec::new());
    for (v, cs) in enc.captions_of.iter().enumerate() {
        for &cap in cs {
            rows.push(v as u32);
            caps.push(cap);
        }
    }
    let rows = Tensor::new(rows.as_slice(), &device)?;
    let latents = if args.posterior_mean {
        enc.mean.index_select(&rows, 0)?
    } else {
        enc.draw(&rows, &mut rng)?
    };
    let data = TrainData {
        latents: (latents * vae.config.scaling_factor)?,
        prompt_embeds: enc
            .text
            .index_select(&Tensor::new(caps.as_slice(), &device)?, 0)?,
        uncond_embeds: enc.uncond.clone(),
    };
    eprintln!(
        "{} training pairs (clip variant, caption)",
        data.latents.dim(0)?
    );
    let student = MotionStudent::new(
        &folder.denoiser,
        config.w_embed_dim,
        config.objective.flow_condition().is_some(),
    );
    let student_cfg = student.config.clone();
    let schedule = NoiseSchedule::from_config(&folder.scheduler)?;
    let export_config = config.clone();
    let mut run = distillation(
        &teacher,
        Box::new(student),
        &student_init,
        schedule,
        config,
        data,
        &device,
    )?;
    if let Some(r) = &c.resume {
        run.resume(r, &device)?;
    }
    if c.sample_every > 0 {
        let preview = text_condition(&encoder.encode(&PREVIEW_PROMPTS)?, text_tokens)?;
        let sched = folder.scheduler.clone();
        let student_cfg = student_cfg.clone();
        let (vae, norm, dev) = (&vae, &norm, device.clone());
        let uncond = enc.uncond.clone();
        run.task.preview = Some(Box::new(move |weights, path| {
            let net = MotionDenoiser::new(
                &student_cfg,
                VarBuilder::from_tensors(weights.clone(), DType::F32, &dev),
            )?;
            // One row per prompt and step count (1, 2, 4), the student's sampler, guidance 7.5.
            let mut clips = Vec::new();
            for steps in [1, 2, 4] {
                let o = MotionOptions {
                    frames: 80,
                    sampler: if student_cfg.end_time_embedding {
                        SamplerKind::FlowMap
                    } else {
                        SamplerKind::Lcm
                    },
                    steps,
                    guidance: 7.5,
                    gamma: None,
                    seed: 0,
                };
                let z = sample_latents(
                    &net,
                    (student_cfg.latent_tokens, student_cfg.latent_channels),
                    &sched,
                    &preview,
                    &uncond,
                    &o,
                )?;
                clips.extend(decode(vae, norm, &z, o.frames)?);
            }
            crate::motion::render::write_pairs(path, &clips, 8)
        }));
    }
    let teacher_sched = serde_json::to_value(&folder.scheduler)?;
    let sentence_encoder = folder.index.sentence_encoder.clone();
    let scaling = vae.config.scaling_factor;
    run.task.exporter = Some(Box::new(move |weights, out| {
        export_motion_model(
            out,
            &student_cfg,
            weights,
            &vae_dir,
            scaling,
            &lcm_scheduler(&teacher_sched, &export_config),
            &sentence_encoder,
        )
    }));
    run.train(&plan)?;
    println!(
        "distilled {} steps; wrote {}",
        run.state.step,
        c.output.display()
    );
    Ok(())
}

/// The f32 denoiser weights of the motion LCM `spec` (a folder or pipeline name) to start a
/// student from, checked against the teacher's as the image side checks a U-Net.
fn lcm_start(
    spec: &str,
    teacher: &HashMap<String, Tensor>,
    w_embed_dim: usize,
    device: &candle_core::Device,
) -> Result<HashMap<String, Tensor>> {
    let dir = crate::pipeline::source::local_dir(spec)?
        .filter(|d| crate::pipeline::text2motion::is_motion_folder(d))
        .with_context(|| format!("{spec} is not a motion model folder"))?;
    let folder = MotionFolder::open(&dir)?;
    let weights = denoiser_f32(&folder, device)?;
    super::cli::student_start(&folder.denoiser_weights(), weights, teacher, w_embed_dim)
}

/// A motion folder's denoiser weights in f32 (shipped folders are f16).
fn denoiser_f32(
    folder: &MotionFolder,
    device: &candle_core::Device,
) -> Result<HashMap<String, Tensor>> {
    crate::model::weights::tensors(&[folder.denoiser_weights()], device)?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect()
}
