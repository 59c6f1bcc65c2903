//! Text → motion: a model folder (`model_index.json`, `denoiser/`, `motion_vae/`, `scheduler/`,
//! and the name of the sentence encoder its captions were embedded with), the sampling loop over
//! the latent tokens (the same [`denoise`] as images: CFG for a teacher, the guidance embedding
//! for a distilled student; LCM, TCD or DDIM) and the VAE's decoding to joints.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::config::SchedulerConfig;
use crate::model::motion_denoiser::{text_condition, MotionDenoiser, MotionDenoiserConfig};
use crate::model::motion_vae::{MotionVae, Normaliser};
use crate::model::sentence::SentenceEncoder;
use crate::motion::{joints_from_features, Pose};
use crate::sample::denoiser::{
    all_wanted, denoise_until, Conditioning, Denoised, Denoiser, Wanted,
};
use crate::sample::noise::{NoiseSource, SeededNoise, SplitNoise};
use crate::sample::sampler::{Sampler, SamplerKind, SamplerOptions};

/// `model_index.json` of a motion model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MotionIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// The sentence encoder the captions were embedded with (`minilm`, a folder or a hub id).
    pub sentence_encoder: String,
}

pub const MOTION_PIPELINE: &str = "MotionLatentConsistencyPipeline";

/// The component folders of a motion model.
pub const MOTION_COMPONENTS: [&str; 3] = ["denoiser", "motion_vae", "scheduler"];

/// Whether `dir` holds a motion model (rather than an image one).
pub fn is_motion_folder(dir: &Path) -> bool {
    dir.join("denoiser/config.json").is_file()
}

/// A motion model folder, read and checked once.
#[derive(Debug, Clone)]
pub struct MotionFolder {
    pub root: PathBuf,
    pub index: MotionIndex,
    pub denoiser: MotionDenoiserConfig,
    pub scheduler: SchedulerConfig,
}

impl MotionFolder {
    pub fn open(root: &Path) -> Result<Self> {
        let index: MotionIndex = crate::model::config::read_json(&root.join("model_index.json"))?;
        let denoiser = MotionDenoiserConfig::load(&root.join("denoiser/config.json"))?;
        let scheduler = SchedulerConfig::load(&root.join("scheduler/scheduler_config.json"))?;
        let vae =
            crate::model::motion_vae::MotionVaeConfig::load(&root.join("motion_vae/config.json"))?;
        if (vae.latent_tokens, vae.latent_channels)
            != (denoiser.latent_tokens, denoiser.latent_channels)
        {
            bail!(
                "{}: the denoiser works on {}×{} latents, the VAE makes {}×{}",
                root.display(),
                denoiser.latent_tokens,
                denoiser.latent_channels,
                vae.latent_tokens,
                vae.latent_channels
            )
        }
        Ok(Self {
            root: root.to_path_buf(),
            index,
            denoiser,
            scheduler,
        })
    }

    /// What the model samples with unless told otherwise: a distilled student LCM 4 steps (a
    /// flow-map student its own jumps), a teacher DDIM 50 steps with CFG; guidance 7.5, 4 s.
    pub fn class_defaults(&self) -> crate::pipeline::source::Defaults {
        let student = self.denoiser.time_cond_proj_dim.is_some();
        crate::pipeline::source::Defaults {
            sampler: Some(if self.denoiser.end_time_embedding {
                SamplerKind::FlowMap
            } else if student {
                SamplerKind::Lcm
            } else {
                SamplerKind::Ddim
            }),
            steps: Some(if student { 4 } else { 50 }),
            guidance: Some(7.5),
            seconds: Some(4.0),
            ..Default::default()
        }
    }

    pub fn denoiser_weights(&self) -> PathBuf {
        self.root
            .join("denoiser")
            .join(crate::model::motion_vae::WEIGHTS_FILE)
    }
}

/// How one batch of motions is sampled.
#[derive(Debug, Clone, Copy)]
pub struct MotionOptions {
    pub frames: usize,
    pub sampler: SamplerKind,
    pub steps: usize,
    /// CFG scale for a teacher; for a student, w = guidance − 1 goes to its embedding.
    pub guidance: f64,
    pub seed: u64,
    /// γ of the TCD and flow-map samplers (`None`: each one's default, 0.3 and 0).
    pub gamma: Option<f64>,
}

impl MotionOptions {
    pub fn shape(&self) -> MotionShape {
        MotionShape {
            frames: self.frames,
            sampler: self.sampler,
            steps: self.steps,
            gamma: self.gamma,
        }
    }
}

/// What every motion of one batch shares: length and sampling schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MotionShape {
    pub frames: usize,
    pub sampler: SamplerKind,
    pub steps: usize,
    pub gamma: Option<f64>,
}

/// One motion of a batch whose prompt, guidance and noise are its own.
#[derive(Debug, Clone)]
pub struct MotionItem {
    pub prompt: String,
    /// What CFG steers away from (a teacher only; the empty caption when `None`).
    pub negative_prompt: Option<String>,
    pub guidance: f64,
    /// Seeds this motion's own noise stream.
    pub seed: u64,
}

/// [`MotionItem`]s with their text encoded.
pub struct PreparedItems {
    pub cond: Tensor,
    pub uncond: Tensor,
    pub guidance: Vec<f64>,
    pub seeds: Vec<u64>,
}

/// The text steering each of n samples: prompt rows `[n, text_tokens, dim]`, the rows CFG steers
/// away from (`[n, …]`, or `[1, …]` shared), and each sample's guidance scale.
pub struct MotionCondition<'a> {
    pub cond: &'a Tensor,
    pub uncond: &'a Tensor,
    pub guidance: &'a [f64],
}

/// The latent sampling loop for any motion denoiser with one guidance scale and one noise stream
/// (`o.seed`) for the batch. Returns scaled latents `[n, tokens, channels]`.
pub fn sample_latents(
    net: &dyn Denoiser,
    shape: (usize, usize),
    scheduler: &SchedulerConfig,
    cond: &Tensor,
    uncond: &Tensor,
    o: &MotionOptions,
) -> Result<Tensor> {
    let guidance = vec![o.guidance; cond.dim(0)?];
    let c = MotionCondition {
        cond,
        uncond,
        guidance: &guidance,
    };
    Ok(sample_latents_with(
        net,
        shape,
        scheduler,
        &c,
        &o.shape(),
        &mut SeededNoise::new(o.seed),
        &all_wanted,
    )?
    .latents)
}

/// The latent sampling loop: CFG for a teacher when any guidance exceeds 1 (one scale per
/// sample), the guidance embedding (w = guidance − 1) for a distilled student; initial noise and
/// re-noising drawn from `noise`; rows leave the batch once `wanted` says so (see
/// [`denoise_until`]).
pub fn sample_latents_with(
    net: &dyn Denoiser,
    shape: (usize, usize),
    scheduler: &SchedulerConfig,
    c: &MotionCondition,
    s: &MotionShape,
    noise: &mut dyn NoiseSource,
    wanted: &Wanted,
) -> Result<Denoised> {
    let n = c.cond.dim(0)?;
    if s.sampler == SamplerKind::FlowMap && !net.is_flow_map() {
        bail!("--sampler flowmap: this model is not a flow map (distil one with `lcm distill --objective flow-map`)")
    }
    if c.guidance.len() != n {
        bail!("{} guidance scales for {n} motions", c.guidance.len())
    }
    if let Some(g) = c.guidance.iter().find(|g| !(g.is_finite() && **g >= 0.0)) {
        bail!("--guidance must be a finite number ≥ 0, got {g}")
    }
    let device = c.cond.device();
    let sampler = Sampler::new(
        s.sampler,
        scheduler,
        s.steps,
        SamplerOptions::with_gamma(s.gamma),
    )?;
    let latents = noise.sample(&(n, shape.0, shape.1).into(), device)?;
    let conditioning = match net.guidance_embedding_dim() {
        Some(dim) => {
            let w: Vec<f32> = c.guidance.iter().map(|g| (g - 1.0) as f32).collect();
            Conditioning {
                context: c.cond.clone(),
                cfg: None,
                w_embedding: Some(crate::nn::guidance_embedding(
                    &Tensor::from_vec(w, n, device)?,
                    dim,
                )?),
            }
        }
        None if c.guidance.iter().any(|&g| g > 1.0) => {
            let uncond = if c.uncond.dim(0)? == n {
                c.uncond.clone()
            } else {
                c.uncond.repeat((n, 1, 1))?
            };
            let g0 = c.guidance[0];
            // One scalar when all agree keeps the single-request arithmetic exact.
            let per_sample = if c.guidance.iter().all(|&g| g == g0) {
                None
            } else {
                let g: Vec<f32> = c.guidance.iter().map(|&g| g as f32).collect();
                Some(Tensor::from_vec(g, (n, 1, 1), device)?)
            };
            Conditioning {
                context: Tensor::cat(&[&uncond, c.cond], 0)?,
                cfg: Some((g0, per_sample)),
                w_embedding: None,
            }
        }
        None => Conditioning {
            context: c.cond.clone(),
            cfg: None,
            w_embedding: None,
        },
    };
    denoise_until(
        net,
        &sampler,
        latents,
        &conditioning,
        noise,
        &mut |_| {},
        wanted,
    )
}

/// The prompt rows, the rows CFG steers from (when given per motion) and the guidance of the
/// motions `keep` (ascending) out of `n`.
fn subset(c: &MotionCondition, keep: &[usize], n: usize) -> Result<(Tensor, Tensor, Vec<f64>)> {
    let idx = Tensor::from_vec(
        keep.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        keep.len(),
        c.cond.device(),
    )?;
    let uncond = if c.uncond.dim(0)? == n && n > 1 {
        c.uncond.index_select(&idx, 0)?
    } else {
        c.uncond.clone()
    };
    Ok((
        c.cond.index_select(&idx, 0)?,
        uncond,
        keep.iter().map(|&r| c.guidance[r]).collect(),
    ))
}

/// Joints of `frames` frames from scaled latents.
pub fn decode(
    vae: &MotionVae,
    norm: &Normaliser,
    z: &Tensor,
    frames: usize,
) -> Result<Vec<Vec<Pose>>> {
    decode_rows(vae, norm, z, frames)?
        .iter()
        .map(|rows| joints_from_features(rows))
        .collect()
}

/// The decoder's feature rows (`frames` × 263, in the data's units) of each scaled latent.
pub fn decode_rows(
    vae: &MotionVae,
    norm: &Normaliser,
    z: &Tensor,
    frames: usize,
) -> Result<Vec<Vec<f32>>> {
    let z = (z.to_dtype(DType::F32)? / vae.config.scaling_factor)?;
    let x = norm.denormalise(&vae.decode(&z, frames, None)?)?;
    (0..x.dim(0)?)
        .map(|i| Ok(x.get(i)?.flatten_all()?.to_vec1::<f32>()?))
        .collect()
}

/// Frames by which chained windows overlap (cross-faded).
pub const CHAIN_OVERLAP: usize = 10;
/// The longest motion made (by chaining windows).
pub const MAX_SECONDS: f64 = 60.0;
/// The shortest motion made, frames.
pub const MIN_FRAMES: usize = 2;
/// The longest motion made, frames.
pub const MAX_FRAMES: usize = (MAX_SECONDS * crate::motion::FPS) as usize;

/// A loaded motion model.
pub struct MotionPipeline {
    pub folder: MotionFolder,
    pub denoiser: MotionDenoiser,
    pub vae: MotionVae,
    pub norm: Normaliser,
    pub encoder: SentenceEncoder,
    uncond: Tensor,
}

impl MotionPipeline {
    pub fn open(folder: MotionFolder, device: &Device) -> Result<Self> {
        let vb =
            crate::model::weights::load_weights(&[folder.denoiser_weights()], DType::F32, device)?;
        let denoiser = MotionDenoiser::new(&folder.denoiser, vb)
            .with_context(|| format!("{}", folder.root.join("denoiser").display()))?;
        let (vae, norm) = crate::model::motion_vae::open(&folder.root.join("motion_vae"), device)?;
        let encoder = SentenceEncoder::open(&folder.index.sentence_encoder, device)?;
        let uncond = text_condition(&encoder.encode(&[""])?, folder.denoiser.text_tokens)?;
        Ok(Self {
            folder,
            denoiser,
            vae,
            norm,
            encoder,
            uncond,
        })
    }

    /// What the model samples with unless told otherwise ([`MotionFolder::class_defaults`]).
    pub fn class_defaults(&self) -> crate::pipeline::source::Defaults {
        self.folder.class_defaults()
    }

    /// The denoiser's text input for `prompts`.
    pub fn condition(&self, prompts: &[&str]) -> Result<Tensor> {
        text_condition(
            &self.encoder.encode(prompts)?,
            self.folder.denoiser.text_tokens,
        )
    }

    /// One motion per prompt, `frames` long.
    pub fn generate(&self, prompts: &[&str], o: &MotionOptions) -> Result<Vec<Vec<Pose>>> {
        self.check_frames(o.frames)?;
        let cond = self.condition(prompts)?;
        self.generate_checked(&cond, o)
    }

    /// [`generate`](Self::generate) from a prepared condition (so timings can leave the text
    /// encoding out), one noise stream (`o.seed`) for the batch.
    pub fn generate_checked(&self, cond: &Tensor, o: &MotionOptions) -> Result<Vec<Vec<Pose>>> {
        let guidance = vec![o.guidance; cond.dim(0)?];
        let c = MotionCondition {
            cond,
            uncond: &self.uncond,
            guidance: &guidance,
        };
        Ok(self
            .generate_with(&c, &o.shape(), &mut SeededNoise::new(o.seed), &all_wanted)?
            .into_iter()
            .flatten()
            .collect())
    }

    /// One motion per item, each drawn from its own noise stream (`SeededNoise(item.seed)`) with
    /// its own prompt, negative prompt and guidance: a motion is the same batched or alone (up
    /// to float reassociation in batched kernels). Items must share `shape`. Before each
    /// denoiser call, an item that `wanted(item)` says no to leaves the batch (`None`); the
    /// others go on.
    pub fn generate_items(
        &self,
        items: &[MotionItem],
        s: &MotionShape,
        wanted: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Option<Vec<Pose>>>> {
        self.generate_prepared(&self.prepare(items)?, s, wanted)
    }

    /// The text encoding of [`generate_items`](Self::generate_items), apart so it can be timed.
    pub fn prepare(&self, items: &[MotionItem]) -> Result<PreparedItems> {
        if items.is_empty() {
            bail!("no motions to make")
        }
        let prompts: Vec<&str> = items.iter().map(|i| i.prompt.as_str()).collect();
        let cond = self.condition(&prompts)?;
        let guidance: Vec<f64> = items.iter().map(|i| i.guidance).collect();
        let teacher_cfg =
            self.denoiser.guidance_embedding_dim().is_none() && guidance.iter().any(|&g| g > 1.0);
        let uncond = if teacher_cfg && items.iter().any(|i| i.negative_prompt.is_some()) {
            let negs: Vec<&str> = items
                .iter()
                .map(|i| i.negative_prompt.as_deref().unwrap_or(""))
                .collect();
            self.condition(&negs)?
        } else {
            self.uncond.clone()
        };
        Ok(PreparedItems {
            cond,
            uncond,
            guidance,
            seeds: items.iter().map(|i| i.seed).collect(),
        })
    }

    /// Motions of prepared items, as [`generate_items`](Self::generate_items).
    pub fn generate_prepared(
        &self,
        p: &PreparedItems,
        s: &MotionShape,
        wanted: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Option<Vec<Pose>>>> {
        let mut sources: Vec<SeededNoise> = p.seeds.iter().map(|&s| SeededNoise::new(s)).collect();
        let mut noise = SplitNoise {
            counts: vec![1; p.seeds.len()],
            sources: sources
                .iter_mut()
                .map(|s| s as &mut dyn NoiseSource)
                .collect(),
        };
        let c = MotionCondition {
            cond: &p.cond,
            uncond: &p.uncond,
            guidance: &p.guidance,
        };
        self.generate_with(&c, s, &mut noise, &|rows: &[usize]| {
            rows.iter().map(|&r| wanted(r)).collect()
        })
    }

    /// Motions of `s.frames` frames, `None` for a row `wanted` let go. Lengths beyond the VAE's
    /// window are made by chaining windows, each drawing on from `noise`, whose feature rows
    /// overlap by [`CHAIN_OVERLAP`] frames, cross-faded: each window continues from where the last
    /// ended, and repeats the prompt rather than going on with it.
    pub fn generate_with(
        &self,
        c: &MotionCondition,
        s: &MotionShape,
        noise: &mut dyn NoiseSource,
        wanted: &Wanted,
    ) -> Result<Vec<Option<Vec<Pose>>>> {
        self.check_frames(s.frames)?;
        let n = c.cond.dim(0)?;
        let max = self.vae.config.max_frames;
        let mut out: Vec<Option<Vec<Pose>>> = vec![None; n];
        if s.frames <= max {
            let d = self.latents_with(c, s, noise, wanted)?;
            let joints = decode(&self.vae, &self.norm, &d.latents, s.frames)?;
            for (r, j) in d.rows.into_iter().zip(joints) {
                out[r] = Some(j);
            }
            return Ok(out);
        }
        let window = MotionShape { frames: max, ..*s };
        // The rows still made (indices into the batch as it began) and their features so far.
        let mut alive: Vec<usize> = (0..n).collect();
        let mut rows: Vec<Vec<f32>> = vec![Vec::new(); n];
        // Rows are one fewer than the frames they describe.
        while rows[alive[0]].len() / crate::motion::FEATURES + 1 < s.frames {
            let part_cond = subset(c, &alive, n)?;
            let part = MotionCondition {
                cond: &part_cond.0,
                uncond: &part_cond.1,
                guidance: &part_cond.2,
            };
            let d = self.latents_with(&part, &window, noise, &|local: &[usize]| {
                let ids: Vec<usize> = local.iter().map(|&k| alive[k]).collect();
                wanted(&ids)
            })?;
            let joints = decode(&self.vae, &self.norm, &d.latents, max)?;
            alive = d.rows.iter().map(|&k| alive[k]).collect();
            for (&r, joints) in alive.iter().zip(&joints) {
                let f = crate::motion::features(joints, &Default::default())?;
                rows[r] = if rows[r].is_empty() {
                    f
                } else {
                    crate::motion::features::concat_rows(&rows[r], &f, CHAIN_OVERLAP)
                };
            }
        }
        for &r in &alive {
            let j = joints_from_features(&rows[r])?;
            out[r] = Some(j[..s.frames.min(j.len())].to_vec());
        }
        Ok(out)
    }

    /// [`MIN_FRAMES`] to [`MAX_FRAMES`].
    fn check_frames(&self, frames: usize) -> Result<()> {
        if !(MIN_FRAMES..=MAX_FRAMES).contains(&frames) {
            bail!(
                "motions are {MIN_FRAMES} to {MAX_FRAMES} frames ({MAX_SECONDS} s at {} fps), asked for {frames}",
                crate::motion::FPS
            )
        }
        Ok(())
    }

    fn latents(&self, cond: &Tensor, o: &MotionOptions) -> Result<Tensor> {
        let guidance = vec![o.guidance; cond.dim(0)?];
        let c = MotionCondition {
            cond,
            uncond: &self.uncond,
            guidance: &guidance,
        };
        Ok(self
            .latents_with(&c, &o.shape(), &mut SeededNoise::new(o.seed), &all_wanted)?
            .latents)
    }

    fn latents_with(
        &self,
        c: &MotionCondition,
        s: &MotionShape,
        noise: &mut dyn NoiseSource,
        wanted: &Wanted,
    ) -> Result<Denoised> {
        let d = &self.folder.denoiser;
        sample_latents_with(
            &self.denoiser,
            (d.latent_tokens, d.latent_channels),
            &self.folder.scheduler,
            c,
            s,
            noise,
            wanted,
        )
    }

    /// Motions within the VAE's window as the decoder gives them: its feature rows (in the
    /// data's units, denormalised; what MLD's evaluator reads) and the joints recovered from them.
    pub fn generate_features(
        &self,
        cond: &Tensor,
        o: &MotionOptions,
    ) -> Result<Vec<(Vec<f32>, Vec<Pose>)>> {
        self.check_frames(o.frames)?;
        if o.frames > self.vae.config.max_frames {
            bail!(
                "feature rows come from one window of at most {} frames",
                self.vae.config.max_frames
            )
        }
        decode_rows(&self.vae, &self.norm, &self.latents(cond, o)?, o.frames)?
            .into_iter()
            .map(|rows| {
                let joints = joints_from_features(&rows)?;
                Ok((rows, joints))
            })
            .collect()
    }
}
