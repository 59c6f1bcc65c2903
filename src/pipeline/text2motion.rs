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
use crate::sample::denoiser::{denoise, Conditioning, Denoiser};
use crate::sample::noise::{NoiseSource, SeededNoise};
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
}

/// The latent sampling loop for any motion denoiser: `cond` `[n, text_tokens, dim]`, `uncond`
/// `[1, …]` (the empty caption, for CFG). Returns scaled latents `[n, tokens, channels]`.
pub fn sample_latents(
    net: &dyn Denoiser,
    shape: (usize, usize),
    scheduler: &SchedulerConfig,
    cond: &Tensor,
    uncond: &Tensor,
    o: &MotionOptions,
) -> Result<Tensor> {
    let n = cond.dim(0)?;
    let device = cond.device();
    let sampler = Sampler::new(o.sampler, scheduler, o.steps, SamplerOptions::default())?;
    let mut noise = SeededNoise::new(o.seed);
    let latents = noise.sample(&(n, shape.0, shape.1).into(), device)?;
    let conditioning = match net.guidance_embedding_dim() {
        Some(dim) => Conditioning {
            context: cond.clone(),
            cfg: None,
            w_embedding: Some(crate::nn::guidance_embedding(
                &Tensor::new(vec![(o.guidance - 1.0) as f32; n], device)?,
                dim,
            )?),
        },
        None if o.guidance > 1.0 => Conditioning {
            context: Tensor::cat(&[&uncond.repeat((n, 1, 1))?, cond], 0)?,
            cfg: Some((o.guidance, None)),
            w_embedding: None,
        },
        None => Conditioning {
            context: cond.clone(),
            cfg: None,
            w_embedding: None,
        },
    };
    denoise(
        net,
        &sampler,
        latents,
        &conditioning,
        &mut noise,
        &mut |_| {},
    )
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

    /// [`generate`](Self::generate) from a prepared condition. Lengths beyond the VAE's window
    /// are made by chaining windows (seeds `seed`, `seed + 1`, …) whose feature rows overlap by
    /// [`CHAIN_OVERLAP`] frames, cross-faded: each window continues from where the last ended,
    /// and repeats the prompt rather than going on with it.
    pub fn generate_checked(&self, cond: &Tensor, o: &MotionOptions) -> Result<Vec<Vec<Pose>>> {
        self.check_frames(o.frames)?;
        let max = self.vae.config.max_frames;
        if o.frames <= max {
            return self.generate_from(cond, o);
        }
        let window = max;
        let mut rows: Vec<Vec<f32>> = vec![Vec::new(); cond.dim(0)?];
        let mut k = 0u64;
        // Rows are one fewer than the frames they describe.
        while rows[0].len() / crate::motion::FEATURES + 1 < o.frames {
            let part = self.generate_from(
                cond,
                &MotionOptions {
                    frames: window,
                    seed: o.seed + k,
                    ..*o
                },
            )?;
            for (r, joints) in rows.iter_mut().zip(&part) {
                let f = crate::motion::features(joints, &Default::default())?;
                *r = if r.is_empty() {
                    f
                } else {
                    crate::motion::features::concat_rows(r, &f, CHAIN_OVERLAP)
                };
            }
            k += 1;
        }
        rows.iter()
            .map(|r| {
                let j = joints_from_features(r)?;
                Ok(j[..o.frames.min(j.len())].to_vec())
            })
            .collect()
    }

    /// At least two frames, and at most [`MAX_SECONDS`].
    fn check_frames(&self, frames: usize) -> Result<()> {
        let max = (MAX_SECONDS * 20.0) as usize;
        if frames < 2 || frames > max {
            bail!("motions are 2 to {max} frames ({MAX_SECONDS} s at 20 fps), asked for {frames}")
        }
        Ok(())
    }

    /// Motions from a prepared condition (so timings can leave the text encoding out).
    pub fn generate_from(&self, cond: &Tensor, o: &MotionOptions) -> Result<Vec<Vec<Pose>>> {
        decode(&self.vae, &self.norm, &self.latents(cond, o)?, o.frames)
    }

    fn latents(&self, cond: &Tensor, o: &MotionOptions) -> Result<Tensor> {
        let c = &self.folder.denoiser;
        sample_latents(
            &self.denoiser,
            (c.latent_tokens, c.latent_channels),
            &self.folder.scheduler,
            cond,
            &self.uncond,
            o,
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
