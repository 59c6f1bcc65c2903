//! The text-to-image pipeline, top to bottom: check the request → tokenize and encode the prompt →
//! prepare the initial latents → loop over the sampler's timesteps (U-Net, then sampler step) →
//! decode with the VAE → 8-bit images.
//!
//! Guidance follows diffusers: a U-Net with a guidance embedding (LCM, `time_cond_proj_dim`) gets
//! w = guidance − 1 through the embedding and runs once per step; any other U-Net runs
//! classifier-free guidance (batch [negative, positive], ε = ε_u + g·(ε_c − ε_u)) when guidance > 1.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use crate::model::clip::ClipTextModel;
use crate::model::config::{ModelIndex, SchedulerConfig, VaeConfig};
use crate::model::folder::ModelFolder;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::pipeline::image_io;
use crate::pipeline::source::{self, Defaults};
use crate::sample::denoiser::StepEvent;
use crate::sample::denoiser::{denoise_until, Conditioning};
use crate::sample::noise::{NoiseSource, SplitNoise};
use crate::sample::sampler::{Sampler, SamplerKind, SamplerOptions};

pub struct Pipeline {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    /// Defaults from the folder's own pipeline class (LCM: lcm/4 steps/8.5; SD: ddim/50/7.5).
    pub defaults: Defaults,
    pub device: Device,
    pub dtype: DType,
}

/// One generation request. `None`s take the pipeline's defaults.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub sampler: Option<SamplerKind>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub n: usize,
    pub seed: u64,
    pub tcd_gamma: Option<f64>,
    /// Initial latents `[n, c, h/f, w/f]` (e.g. from `--latents`); drawn from `seed` when absent.
    /// With an init image they are the noise added to its latents.
    pub latents: Option<Tensor>,
    /// Image-to-image: the init image `[1 or n, 3, height, width]` in [−1, 1], already at the
    /// request's size.
    pub init_image: Option<Tensor>,
    /// Image-to-image: the share of the schedule to run, in (0, 1] (default 0.8, as diffusers').
    pub strength: Option<f64>,
    /// Image-to-image: start from the posterior's mean instead of a sample of it.
    pub init_mean: bool,
}

/// The settings a request resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub sampler: SamplerKind,
    pub steps: usize,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    pub tcd_gamma: f64,
    pub timesteps: Vec<usize>,
    pub cfg: bool,
    /// Image-to-image strength (1 for text-to-image).
    pub strength: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub text_encode: Duration,
    pub denoise: Duration,
    pub decode: Duration,
    pub total: Duration,
}

pub struct Generation {
    pub images: Vec<RgbImage>,
    /// `[n, H, W, 3]` f32 in [0, 1] (diffusers' `output_type="np"`).
    pub images_unit: Tensor,
    /// The latents that were decoded (U-Net space).
    pub latents: Tensor,
    pub settings: Resolved,
    pub timings: Timings,
}

impl Pipeline {
    /// Load a diffusers-layout folder (see [`Pipeline::new`]).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::new(&ModelFolder::open(dir)?, device, dtype)
    }

    /// Build the pipeline of a model folder. Weights are converted to `dtype` (the VAE runs in
    /// f32, as diffusers' `force_upcast` does for SD VAEs); bf16 on the CPU packs the weights of
    /// all three networks (the VAE's too) for the AMX kernels and keeps f32 activations
    /// ([`crate::nn::build_for`]).
    pub fn new(folder: &ModelFolder, device: &Device, dtype: DType) -> Result<Self> {
        Self::with_unet_tensors(folder, device, dtype, None)
    }

    /// [`Pipeline::new`] with the U-Net built over `unet` (the folder's U-Net tensors, loaded
    /// already) instead of reading them again: a distillation holds them for the student's start,
    /// and an f32 teacher then shares their storage rather than keeping a second copy.
    pub fn with_unet_tensors(
        folder: &ModelFolder,
        device: &Device,
        dtype: DType,
        unet: Option<&std::collections::HashMap<String, candle_core::Tensor>>,
    ) -> Result<Self> {
        let te = &folder.text_encoder;
        let tokenizer =
            ClipTokenizer::from_dir(&folder.tokenizer, te.config.max_position_embeddings)?;
        let text_encoder = crate::nn::build_for(device, dtype, |dt| {
            ClipTextModel::new(&te.config, te.var_builder(dt, device)?)
                .with_context(|| format!("text encoder in {}", te.dir.display()))
        })?;
        let u = &folder.unet;
        let unet = crate::nn::build_for(device, dtype, |dt| {
            let vb = match unet {
                Some(t) => candle_nn::VarBuilder::from_tensors(t.clone(), dt, device),
                None => u.var_builder(dt, device)?,
            };
            UNet2DConditionModel::new(&u.config, vb)
                .with_context(|| format!("U-Net in {}", u.dir.display()))
        })?;
        let v = &folder.vae;
        let vae = crate::nn::build_for(device, Self::vae_dtype(device, dtype), |dt| {
            AutoencoderKL::new(&v.config, v.var_builder(dt, device)?)
                .with_context(|| format!("VAE in {}", v.dir.display()))
        })?;
        let defaults = class_defaults(&folder.index, &folder.scheduler, &unet, &v.config);
        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config: folder.scheduler.clone(),
            defaults,
            device: device.clone(),
            dtype,
        })
    }

    /// The dtype the VAE is built in for a pipeline in `dtype`: f32, except bf16 on the CPU (its
    /// weights packed, activations still f32), as diffusers runs a bf16 pipeline's VAE in bf16
    /// (it upcasts only fp16 VAEs).
    pub fn vae_dtype(device: &Device, dtype: DType) -> DType {
        if device.is_cpu() && dtype == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        }
    }

    /// `--model` (a pipeline name, folder or hub id; `None`: the shipped default) resolved and
    /// loaded, with a LoRA adapter file (e.g. an LCM-LoRA) merged at a scale when one is given:
    /// what generate, eval and serve start from. The pipeline's defaults are then the adapter's,
    /// then the pipeline definition's, then the folder's own.
    pub fn open(
        model: Option<&str>,
        lora: Option<(&Path, f64)>,
        device: &Device,
        dtype: DType,
    ) -> Result<(source::ResolvedModel, Self)> {
        let mut resolved = source::resolve(model.unwrap_or(source::DEFAULT_MODEL))?;
        let mut pipe = Self::new(&resolved.folder, device, dtype)
            .with_context(|| format!("cannot load model {}", resolved.folder.root.display()))?;
        if let Some((file, scale)) = lora {
            resolved.defaults = pipe
                .apply_lora(&resolved.folder, file, scale)?
                .or(&resolved.defaults);
        }
        // Whoever samples from the pipeline gets the definition's defaults (the server passes none).
        pipe.defaults = resolved.defaults.or(&pipe.defaults);
        Ok((resolved, pipe))
    }

    /// Merge a LoRA adapter file into the U-Net of `folder` at `scale`; the U-Net is rebuilt from
    /// the merged weights. Returns the defaults an LCM-LoRA samples with (LCM, 4 steps, guidance
    /// 1: no CFG), for the caller's flags to override.
    pub fn apply_lora(
        &mut self,
        folder: &ModelFolder,
        file: &Path,
        scale: f64,
    ) -> Result<Defaults> {
        let base = folder.unet.tensors(&self.device)?;
        let pairs = crate::nn::lora::load(file, &base, &self.device)?;
        let merged =
            crate::nn::lora::merge(&base, &pairs, scale, &format!("--lora {}", file.display()))?;
        self.unet = crate::nn::build_for(&self.device, self.dtype, |dt| {
            UNet2DConditionModel::new(
                &self.unet.config,
                VarBuilder::from_tensors(merged, dt, &self.device),
            )
        })?;
        Ok(Defaults {
            sampler: Some(SamplerKind::Lcm),
            steps: Some(4),
            guidance: Some(1.0),
            ..Default::default()
        })
    }

    /// Pixels per latent cell.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config.scale_factor()
    }

    /// Fill a request's gaps from `extra` (e.g. a pipeline definition), then the model's own
    /// defaults, and check every value.
    pub fn resolve(&self, req: &GenerateRequest, extra: &Defaults) -> Result<Resolved> {
        let d = extra.or(&self.defaults);
        let sampler = req.sampler.or(d.sampler).unwrap_or(SamplerKind::Lcm);
        if sampler == SamplerKind::FlowMap && !self.unet.config.end_time_embedding {
            bail!("--sampler flowmap: this model is not a flow map (distil one with `lcm distill --objective flow-map`)")
        }
        let steps = req.steps.or(d.steps).unwrap_or(4);
        let guidance = req.guidance.or(d.guidance).unwrap_or(1.0);
        let f = self.vae_scale_factor();
        let native = self.unet.config.sample_size.unwrap_or(64) * f;
        let width = req.width.or(d.width).unwrap_or(native);
        let height = req.height.or(d.height).unwrap_or(native);
        let tcd_gamma = req
            .tcd_gamma
            .or(d.tcd_gamma)
            .unwrap_or_else(|| SamplerOptions::default().gamma(sampler));
        let strength = match (&req.init_image, req.strength) {
            (Some(_), s) => s.unwrap_or(0.8),
            (None, None) => 1.0,
            (None, Some(_)) => bail!("--strength needs an --init-image"),
        };
        if steps == 0 {
            bail!("--steps must be at least 1")
        }
        if !guidance.is_finite() || guidance < 0.0 {
            bail!("--guidance must be a finite number ≥ 0, got {guidance}")
        }
        for (flag, v) in [("--width", width), ("--height", height)] {
            if v == 0 || v % f != 0 {
                bail!(
                    "{flag} {v} must be a positive multiple of {f} (the VAE's downscaling factor)"
                )
            }
        }
        if req.n == 0 {
            bail!("--n must be at least 1")
        }
        // One γ flag for both stochastic samplers; each reads its own.
        let opts = SamplerOptions {
            strength,
            ..SamplerOptions::with_gamma(Some(tcd_gamma))
        };
        let plan =
            Sampler::new(sampler, &self.scheduler_config, steps, opts).with_context(|| {
                if req.init_image.is_some() {
                    format!("--steps {steps} with --sampler {sampler} at --strength {strength}")
                } else {
                    format!("--steps {steps} with --sampler {sampler}")
                }
            })?;
        if let Some(img) = &req.init_image {
            let d = img.dims();
            if d.len() != 4
                || d[1] != 3
                || d[2] != height
                || d[3] != width
                || !(d[0] == 1 || d[0] == req.n)
            {
                bail!(
                    "--init-image: shape {d:?}, expected [1 or {}, 3, {height}, {width}]",
                    req.n
                )
            }
        }
        let cfg = !self.unet.has_guidance_embedding() && guidance > 1.0;
        self.check_memory(req.n, width, height, cfg)?;
        Ok(Resolved {
            sampler,
            steps,
            guidance,
            width,
            height,
            tcd_gamma,
            timesteps: plan.timesteps,
            cfg,
            strength,
        })
    }

    /// Refuse, before allocating anything, a request whose activations cannot fit in memory (an
    /// allocation failure aborts the process instead of erroring). A rough upper estimate: a few
    /// full-resolution maps of the VAE decoder's widest level per image, and the U-Net's kept
    /// skip tensors per latent (twice with CFG), against what the OS says is available.
    fn check_memory(&self, n: usize, width: usize, height: usize, cfg: bool) -> Result<()> {
        let Some(avail) = crate::runtime::available_memory_bytes() else {
            return Ok(());
        };
        let pixels = (width as f64) * (height as f64);
        let f = self.vae_scale_factor() as f64;
        let latent = pixels / (f * f);
        let vae_c = self
            .vae
            .config
            .block_out_channels
            .iter()
            .max()
            .copied()
            .unwrap_or(128);
        let unet: f64 = (self.unet.config.block_out_channels.iter())
            .enumerate()
            .map(|(l, &c)| c as f64 * latent / 4f64.powi(l as i32))
            .sum();
        let per_image =
            4.0 * (4.0 * vae_c as f64 * pixels + 4.0 * unet * if cfg { 2.0 } else { 1.0 });
        let need = n as f64 * per_image;
        if need > avail as f64 {
            bail!(
                "--n {n} at {width}x{height} needs about {:.1} GiB, more than the {:.1} GiB of memory available: ask for fewer or smaller images",
                need / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            )
        }
        Ok(())
    }

    /// An init image's latents in U-Net space, one row per image of the request: the VAE
    /// posterior sampled with `noise` (or its mean with `init_mean`), times the scaling factor.
    fn init_latents(
        &self,
        img: &Tensor,
        r: &GenerateRequest,
        shape: &candle_core::Shape,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let img = img.to_device(&self.device)?.to_dtype(DType::F32)?;
        let post = self.vae.encode(&img)?;
        // One image for n outputs is encoded and sampled once, then repeated (diffusers).
        let z = if r.init_mean {
            post.mean.clone()
        } else {
            post.sample_with(&noise.sample(post.mean.shape(), &self.device)?)?
        };
        let z = z.broadcast_as(shape)?.contiguous()?;
        Ok(self.vae.scale(&z)?)
    }

    /// `[1, tokens, hidden]` embedding of one prompt.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode_warn(prompt)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(self.text_encoder.forward(&ids)?)
    }

    /// Generate images; `noise` supplies the initial latents (unless given) and any re-noising.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        extra: &Defaults,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(StepEvent),
    ) -> Result<Generation> {
        let s = self.resolve(req, extra)?;
        if !s.cfg
            && req
                .negative_prompt
                .as_deref()
                .is_some_and(|p| !p.is_empty())
        {
            eprintln!("warning: the negative prompt is ignored without classifier-free guidance (guidance ≤ 1 or an LCM U-Net)");
        }
        let mut gens =
            self.generate_batch(std::slice::from_ref(req), extra, &mut [noise], on_step)?;
        Ok(gens.remove(0))
    }

    /// Run several requests as one U-Net batch. They must agree on size, steps, sampler (and
    /// TCD gamma) and on whether CFG runs; prompts, negative prompts, n, guidance and noise are
    /// per request. Each request draws its noise from its own source, so its images equal those of
    /// the same request run alone (up to float reassociation inside batched kernels).
    pub fn generate_batch(
        &self,
        reqs: &[GenerateRequest],
        extra: &Defaults,
        noises: &mut [&mut dyn NoiseSource],
        on_step: &mut dyn FnMut(StepEvent),
    ) -> Result<Vec<Generation>> {
        // Every request is wanted throughout, so every one has its generation.
        Ok(self
            .generate_batch_until(reqs, extra, noises, on_step, &|_| true)?
            .into_iter()
            .flatten()
            .collect())
    }

    /// [`generate_batch`](Self::generate_batch) asking `wanted(request)` before every U-Net call:
    /// a request no longer wanted leaves the batch (`None` in its place, its images never made)
    /// and the others go on; once none is wanted it stops with
    /// [`Cancelled`](crate::sample::denoiser::Cancelled).
    pub fn generate_batch_until(
        &self,
        reqs: &[GenerateRequest],
        extra: &Defaults,
        noises: &mut [&mut dyn NoiseSource],
        on_step: &mut dyn FnMut(StepEvent),
        wanted: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Option<Generation>>> {
        let start = Instant::now();
        if reqs.is_empty() || reqs.len() != noises.len() {
            bail!(
                "generate_batch: {} requests with {} noise sources",
                reqs.len(),
                noises.len()
            )
        }
        let settings = reqs
            .iter()
            .map(|r| self.resolve(r, extra))
            .collect::<Result<Vec<_>>>()?;
        let s = settings[0].clone();
        for o in &settings[1..] {
            let same = (o.width, o.height, o.steps, o.sampler, o.cfg, &o.timesteps)
                == (s.width, s.height, s.steps, s.sampler, s.cfg, &s.timesteps)
                && o.tcd_gamma == s.tcd_gamma
                && o.strength == s.strength;
            if !same {
                bail!("generate_batch: requests differ in size, steps, sampler or CFG")
            }
        }
        let counts: Vec<usize> = reqs.iter().map(|r| r.n).collect();
        let n: usize = counts.iter().sum();
        let f = self.vae_scale_factor();
        let latent_shape = (n, self.unet.config.in_channels, s.height / f, s.width / f);

        let t0 = Instant::now();
        let mut conds = Vec::with_capacity(reqs.len());
        let mut unconds = Vec::with_capacity(reqs.len());
        for r in reqs {
            conds.push(self.encode_prompt(&r.prompt)?.repeat((r.n, 1, 1))?);
            if s.cfg {
                let neg = r.negative_prompt.as_deref().unwrap_or("");
                unconds.push(self.encode_prompt(neg)?.repeat((r.n, 1, 1))?);
            }
        }
        let cond = Tensor::cat(&conds, 0)?;
        let context = if s.cfg {
            Tensor::cat(&[Tensor::cat(&unconds, 0)?, cond], 0)?
        } else {
            cond
        };
        let text_encode = t0.elapsed();

        let mut initial = Vec::with_capacity(reqs.len());
        for (r, noise) in reqs.iter().zip(noises.iter_mut()) {
            let shape = (r.n, latent_shape.1, latent_shape.2, latent_shape.3);
            // Image-to-image draws the posterior sample first, then the noise, as diffusers.
            let init = match &r.init_image {
                Some(img) => Some(self.init_latents(img, r, &shape.into(), &mut **noise)?),
                None => None,
            };
            let x = match &r.latents {
                Some(l) => {
                    if l.dims() != [shape.0, shape.1, shape.2, shape.3] {
                        bail!(
                            "--latents: the initial latents have shape {:?}, expected {:?} for n={} at {}x{}",
                            l.dims(),
                            shape,
                            r.n,
                            s.width,
                            s.height
                        )
                    }
                    l.to_device(&self.device)?.to_dtype(DType::F32)?
                }
                None => noise.sample(&shape.into(), &self.device)?,
            };
            initial.push(match init {
                Some(z0) => {
                    let schedule = crate::sample::schedule::NoiseSchedule::from_config(
                        &self.scheduler_config,
                    )?;
                    schedule.add_noise(&z0, &x, &vec![s.timesteps[0]; r.n])?
                }
                None => x,
            });
        }
        let latents = Tensor::cat(&initial, 0)?;
        let mut noise = SplitNoise {
            counts: counts.clone(),
            sources: noises
                .iter_mut()
                .map(|n| &mut **n as &mut dyn NoiseSource)
                .collect(),
        };
        // The request each latent row belongs to.
        let owner: Vec<usize> = counts
            .iter()
            .enumerate()
            .flat_map(|(r, &k)| std::iter::repeat_n(r, k))
            .collect();

        let t1 = Instant::now();
        let sampler = Sampler::new(
            s.sampler,
            &self.scheduler_config,
            s.steps,
            SamplerOptions {
                strength: s.strength,
                ..SamplerOptions::with_gamma(Some(s.tcd_gamma))
            },
        )?;
        // Per-sample guidance, one value per image.
        let per_image: Vec<f64> = settings
            .iter()
            .zip(&counts)
            .flat_map(|(o, &k)| std::iter::repeat_n(o.guidance, k))
            .collect();
        let uniform = per_image.iter().all(|&g| g == s.guidance);
        let w_embedding = match self.unet.config.time_cond_proj_dim {
            Some(dim) => {
                let w: Vec<f32> = per_image.iter().map(|g| (g - 1.0) as f32).collect();
                let w = Tensor::from_vec(w, n, &self.device)?;
                Some(crate::nn::guidance_embedding(&w, dim)?.to_dtype(self.unet.dtype())?)
            }
            None => None,
        };
        let cfg = if s.cfg {
            let per_sample = if uniform {
                None
            } else {
                let g: Vec<f32> = per_image.iter().map(|&g| g as f32).collect();
                Some(Tensor::from_vec(g, (n, 1, 1, 1), &self.device)?)
            };
            Some((s.guidance, per_sample))
        } else {
            None
        };
        let cond = Conditioning {
            context,
            cfg,
            w_embedding,
        };
        let done = denoise_until(
            &self.unet,
            &sampler,
            latents,
            &cond,
            &mut noise,
            on_step,
            // Each request is asked once per step, so its rows leave together.
            &|rows: &[usize]| {
                let live: Vec<bool> = (0..reqs.len()).map(wanted).collect();
                rows.iter().map(|&row| live[owner[row]]).collect()
            },
        )?;
        let latents = done.latents;
        let denoise_time = t1.elapsed();

        let t2 = Instant::now();
        let decoded = self.vae.decode(&self.vae.unscale(&latents)?)?;
        let images_unit = image_io::to_unit_nhwc(&decoded)?;
        let mut images = image_io::to_rgb8(&images_unit)?;
        let decode = t2.elapsed();
        let timings = Timings {
            text_encode,
            denoise: denoise_time,
            decode,
            total: start.elapsed(),
        };
        let mut out = Vec::with_capacity(reqs.len());
        let mut offset = 0;
        for (r, (k, settings)) in counts.iter().zip(settings).enumerate() {
            // A request's rows leave together, so they are all there or none is.
            let here = done.rows.iter().filter(|&&row| owner[row] == r).count();
            if here == 0 {
                out.push(None);
                continue;
            }
            debug_assert_eq!(here, *k);
            out.push(Some(Generation {
                images: images.drain(..*k).collect(),
                images_unit: images_unit.narrow(0, offset, *k)?,
                latents: latents.narrow(0, offset, *k)?,
                settings,
                timings: timings.clone(),
            }));
            offset += k;
        }
        Ok(out)
    }
}

/// Defaults implied by the folder itself, as the matching diffusers pipeline class would use.
fn class_defaults(
    index: &ModelIndex,
    sched: &SchedulerConfig,
    unet: &UNet2DConditionModel,
    vae: &VaeConfig,
) -> Defaults {
    let scheduler_class = sched.class_name.as_deref().unwrap_or("");
    let lcm_like = index.class_name == "LatentConsistencyModelPipeline"
        || scheduler_class == "LCMScheduler"
        || unet.has_guidance_embedding();
    let size = unet.config.sample_size.map(|s| s * vae.scale_factor());
    let (sampler, steps, guidance) = if unet.config.end_time_embedding {
        // A flow-map student (`lcm distill --objective flow-map`) samples with its own jumps.
        (SamplerKind::FlowMap, 4, 8.5)
    } else if scheduler_class == "TCDScheduler" {
        (SamplerKind::Tcd, 4, 1.0)
    } else if lcm_like {
        (SamplerKind::Lcm, 4, 8.5)
    } else {
        (SamplerKind::Ddim, 50, 7.5)
    };
    Defaults {
        sampler: Some(sampler),
        steps: Some(steps),
        guidance: Some(guidance),
        width: size,
        height: size,
        tcd_gamma: None,
        seconds: None,
    }
}

/// The `latents` tensor of a safetensors file (`--latents`), as f32; [`Pipeline::generate`] checks
/// its shape against the request.
pub fn read_latents(path: &Path, device: &Device) -> Result<Tensor> {
    if !path.is_file() {
        bail!("--latents: {} does not exist", path.display())
    }
    let mut tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("--latents: cannot read {} as safetensors", path.display()))?;
    let t = tensors.remove("latents").with_context(|| {
        format!(
            "--latents: {} has no tensor named `latents`",
            path.display()
        )
    })?;
    Ok(t.to_dtype(DType::F32)?)
}
