//! The motion VAE (MLD, Chen et al. 2023; MotionLCM V2's token layout): a skip transformer over a
//! clip's z-normalised HumanML3D features, with learned distribution tokens whose outputs give μ
//! and log σ² of a latent of `latent_tokens × latent_channels`; the decoder runs a second skip
//! transformer over [latent tokens; one query per frame] and reads the features off the frame
//! queries. Clips of any length up to `max_frames` go through with key-padding masks.
//!
//! Deviation from MLD: pre-norm layers (MLD: post-norm), and the decoder is encoder-only over
//! the joined tokens (MLD's own "encoder-only" variant) rather than cross-attention.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::motion::FEATURES;
use crate::nn::transformer::{positions, SkipTransformer, TransformerConfig};
use crate::nn::{linear, Linear};

/// `motion_vae/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MotionVaeConfig {
    #[serde(default = "features")]
    pub features: usize,
    #[serde(flatten)]
    pub transformer: TransformerConfig,
    pub latent_tokens: usize,
    pub latent_channels: usize,
    /// The longest clip, in frames (20 fps).
    pub max_frames: usize,
    /// Frames per transformer token: 1 (MLD: a token per frame), or 2 or 4 — strided 1-D
    /// convolutions before the encoder's transformer, nearest upsampling and convolutions after
    /// the decoder's.
    #[serde(default = "one_usize", skip_serializing_if = "is_one_usize")]
    pub downsample: usize,
    /// Latents are multiplied by this before diffusion (SD's `scaling_factor`): measured by the
    /// teacher's trainer as 1 / std of the training latents, so they are about unit-variance.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub scaling_factor: f64,
}

fn features() -> usize {
    FEATURES
}

fn one() -> f64 {
    1.0
}

fn one_usize() -> usize {
    1
}

fn is_one_usize(x: &usize) -> bool {
    *x == 1
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

impl MotionVaeConfig {
    pub fn load(path: &Path) -> Result<Self> {
        crate::model::config::load_checked(path, Self::check)
    }

    pub fn check(&self) -> Result<()> {
        self.transformer.check("motion VAE")?;
        if self.features != FEATURES {
            bail!(
                "features must be {FEATURES} (HumanML3D's), got {}",
                self.features
            )
        }
        if self.latent_tokens == 0 || self.latent_channels == 0 || self.max_frames < 2 {
            bail!("latent_tokens, latent_channels and max_frames must be positive")
        }
        if ![1, 2, 4].contains(&self.downsample) {
            bail!("downsample must be 1, 2 or 4, got {}", self.downsample)
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            bail!(
                "scaling_factor must be positive, got {}",
                self.scaling_factor
            )
        }
        Ok(())
    }
}

pub struct MotionVae {
    pub config: MotionVaeConfig,
    frame_in: Linear,
    /// Strided convolutions (one per halving) before the encoder, and the convolutions after
    /// each doubling of the decoder.
    down: Vec<candle_nn::Conv1d>,
    up: Vec<candle_nn::Conv1d>,
    /// μ tokens then log σ² tokens, `[2·latent_tokens, width]`.
    dist_tokens: Tensor,
    encoder: SkipTransformer,
    mu: Linear,
    logvar: Linear,
    latent_in: Linear,
    decoder: SkipTransformer,
    frame_out: Linear,
}

/// The posterior of a batch: `[b, latent_tokens, latent_channels]` each.
pub struct Posterior {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl Posterior {
    /// z = μ + σ·ε.
    pub fn sample(&self, eps: &Tensor) -> Result<Tensor> {
        Ok((&self.mean + (self.logvar.clone() * 0.5)?.exp()?.mul(eps)?)?)
    }

    /// KL(q ‖ N(0, I)) averaged over the latent's numbers.
    pub fn kl(&self) -> Result<Tensor> {
        let t = ((self.logvar.ones_like()? + &self.logvar)? - self.mean.sqr()?)?
            .sub(&self.logvar.exp()?)?;
        Ok((t.mean_all()? * -0.5)?)
    }
}

impl MotionVae {
    pub fn new(config: &MotionVaeConfig, vb: VarBuilder) -> Result<Self> {
        config.check()?;
        let d = config.transformer.width;
        let (l, c) = (config.latent_tokens, config.latent_channels);
        let halvings = config.downsample.trailing_zeros() as usize;
        let strided = candle_nn::Conv1dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let same = candle_nn::Conv1dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            down: (0..halvings)
                .map(|i| candle_nn::conv1d(d, d, 4, strided, vb.pp(format!("down.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            up: (0..halvings)
                .map(|i| candle_nn::conv1d(d, d, 3, same, vb.pp(format!("up.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            frame_in: linear(config.features, d, true, vb.pp("frame_in"))?,
            dist_tokens: vb.get_with_hints(
                (2 * l, d),
                "dist_tokens",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            encoder: SkipTransformer::new(&config.transformer, vb.pp("encoder"))?,
            mu: linear(d, c, true, vb.pp("mu"))?,
            logvar: linear(d, c, true, vb.pp("logvar"))?,
            latent_in: linear(c, d, true, vb.pp("latent_in"))?,
            decoder: SkipTransformer::new(&config.transformer, vb.pp("decoder"))?,
            frame_out: linear(d, config.features, true, vb.pp("frame_out"))?,
            config: config.clone(),
        })
    }

    fn check_frames(&self, t: usize) -> Result<()> {
        if t == 0 || t > self.config.max_frames {
            bail!(
                "the motion VAE takes 1 to {} frames, got {t}",
                self.config.max_frames
            )
        }
        Ok(())
    }

    /// `valid` `[b, t]` with `l` always-valid tokens in front (`None`: every token valid, which
    /// takes the fused attention kernel).
    fn with_tokens(valid: Option<&Tensor>, l: usize) -> Result<Option<Tensor>> {
        let Some(valid) = valid else {
            return Ok(None);
        };
        let b = valid.dim(0)?;
        let ones = Tensor::ones((b, l), valid.dtype(), valid.device())?;
        Ok(Some(Tensor::cat(&[&ones, valid], 1)?))
    }

    /// Tokens of `t` frames: `t` divided by `downsample`, rounded up.
    fn tokens(&self, t: usize) -> usize {
        t.div_ceil(self.config.downsample)
    }

    /// Frames padded (zeros, invalid) to a whole number of tokens.
    fn pad_frames(&self, x: &Tensor, valid: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let t = x.dim(1)?;
        let extra = self.tokens(t) * self.config.downsample - t;
        if extra == 0 {
            return Ok((x.clone(), valid.cloned()));
        }
        let x = x.pad_with_zeros(1, 0, extra)?;
        let v = match valid {
            Some(v) => v.pad_with_zeros(1, 0, extra)?,
            None => {
                Tensor::ones((x.dim(0)?, t), DType::F32, x.device())?.pad_with_zeros(1, 0, extra)?
            }
        };
        Ok((x, Some(v)))
    }

    /// The mask at `1/factor` of the frame rate: a slot is valid where any of its frames is.
    fn pool(valid: Option<&Tensor>, factor: usize) -> Result<Option<Tensor>> {
        Ok(match valid {
            Some(v) if factor > 1 => {
                let (b, t) = v.dims2()?;
                Some(v.reshape((b, t / factor, factor))?.max(2)?)
            }
            other => other.cloned(),
        })
    }

    /// `h` `[b, d, n]` with the slots `mask` `[b, n]` hides set to zero (so convolutions see
    /// zeros past a clip's end whatever shares its batch).
    fn hide(h: Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        Ok(match mask {
            Some(m) => h.broadcast_mul(&m.unsqueeze(1)?)?,
            None => h,
        })
    }

    /// The posterior of z-normalised clips `x` `[b, t, 263]` whose frames are `valid` `[b, t]`
    /// (`None`: all of them).
    pub fn encode(&self, x: &Tensor, valid: Option<&Tensor>) -> Result<Posterior> {
        self.check_frames(x.dim(1)?)?;
        let (x, frame_valid) = self.pad_frames(x, valid)?;
        let (b, t, _) = x.dims3()?;
        let t = t / self.config.downsample;
        let (l, d) = (self.config.latent_tokens, self.config.transformer.width);
        let mut frames = self.frame_in.forward(&x)?;
        if !self.down.is_empty() {
            let mut h = frames.transpose(1, 2)?;
            for (i, c) in self.down.iter().enumerate() {
                let m = Self::pool(frame_valid.as_ref(), 2 << i)?;
                h = Self::hide(crate::nn::silu(&c.forward(&h)?)?, m.as_ref())?;
            }
            frames = h.transpose(1, 2)?;
        }
        let valid = Self::pool(frame_valid.as_ref(), self.config.downsample)?;
        let valid = valid.as_ref();
        let tokens = self.dist_tokens.unsqueeze(0)?.broadcast_as((b, 2 * l, d))?;
        let h = Tensor::cat(&[&tokens, &frames], 1)?;
        let h = h.broadcast_add(&positions(2 * l + t, d, x.device())?.unsqueeze(0)?)?;
        let h = self
            .encoder
            .forward(&h, Self::with_tokens(valid, 2 * l)?.as_ref())?;
        Ok(Posterior {
            mean: self.mu.forward(&h.narrow(1, 0, l)?)?,
            logvar: self
                .logvar
                .forward(&h.narrow(1, l, l)?)?
                .clamp(-30.0, 20.0)?,
        })
    }

    /// z-normalised features `[b, frames, 263]` of latents `z` `[b, latent_tokens,
    /// latent_channels]`; `valid` `[b, frames]` marks each clip's own frames (`None`: all).
    pub fn decode(&self, z: &Tensor, frames: usize, valid: Option<&Tensor>) -> Result<Tensor> {
        self.check_frames(frames)?;
        let b = z.dim(0)?;
        let k = self.config.downsample;
        let t = self.tokens(frames);
        // The frame mask over whole tokens: the frames past `frames` are hidden too.
        let frame_valid = match valid {
            Some(v) if t * k != frames => Some(v.pad_with_zeros(1, 0, t * k - frames)?),
            None if t * k != frames => Some(
                Tensor::ones((b, frames), DType::F32, z.device())?.pad_with_zeros(
                    1,
                    0,
                    t * k - frames,
                )?,
            ),
            other => other.cloned(),
        };
        let valid = Self::pool(frame_valid.as_ref(), k)?;
        let valid = valid.as_ref();
        let (l, d) = (self.config.latent_tokens, self.config.transformer.width);
        let lat = self.latent_in.forward(z)?;
        let queries = positions(t, d, z.device())?
            .unsqueeze(0)?
            .broadcast_as((b, t, d))?;
        let h = Tensor::cat(&[&lat, &queries], 1)?;
        let h = self
            .decoder
            .forward(&h, Self::with_tokens(valid, l)?.as_ref())?;
        let mut h = h.narrow(1, l, t)?;
        if !self.up.is_empty() {
            let mut u = Self::hide(h.transpose(1, 2)?, valid)?;
            for (i, c) in self.up.iter().enumerate() {
                let (bb, dd, n) = u.dims3()?;
                // Nearest doubling, then a convolution that smooths across the copies.
                u = u
                    .unsqueeze(3)?
                    .broadcast_as((bb, dd, n, 2))?
                    .reshape((bb, dd, 2 * n))?;
                let m = Self::pool(frame_valid.as_ref(), k >> (i + 1))?;
                u = Self::hide(crate::nn::silu(&c.forward(&u)?)?, m.as_ref())?;
            }
            h = u.transpose(1, 2)?;
        }
        Ok(self.frame_out.forward(&h.narrow(1, 0, frames)?)?)
    }
}

/// The weights file of a motion VAE folder (diffusers' name).
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// A motion VAE folder (`config.json`, weights, `Mean.npy`/`Std.npy`): the network and its
/// normaliser.
pub fn open(dir: &Path, device: &Device) -> Result<(MotionVae, Normaliser)> {
    let config = MotionVaeConfig::load(&dir.join("config.json"))?;
    let vb = super::weights::load_weights(&[dir.join(WEIGHTS_FILE)], DType::F32, device)?;
    Ok((MotionVae::new(&config, vb)?, Normaliser::load(dir)?))
}

/// The dataset statistics a motion model's features are z-normalised with (HumanML3D's
/// `Mean.npy`/`Std.npy`, kept in the VAE's folder).
#[derive(Debug, Clone)]
pub struct Normaliser {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normaliser {
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Vec<f32>> {
            let a = crate::motion::npy::read(&dir.join(name))?;
            if a.data.len() != FEATURES {
                bail!(
                    "{}: {} numbers, want {FEATURES}",
                    dir.join(name).display(),
                    a.data.len()
                )
            }
            Ok(a.data)
        };
        Ok(Self {
            mean: read("Mean.npy")?,
            std: read("Std.npy")?,
        })
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::motion::npy::write(&dir.join("Mean.npy"), &self.mean, &[FEATURES])?;
        crate::motion::npy::write(&dir.join("Std.npy"), &self.std, &[FEATURES])
    }

    /// z-normalised copies of feature rows (`frames × 263`).
    pub fn normalise_rows(&self, rows: &[f32]) -> Vec<f32> {
        rows.chunks(FEATURES)
            .flat_map(|r| {
                r.iter()
                    .zip(self.mean.iter().zip(&self.std))
                    .map(|(x, (m, s))| (x - m) / s)
            })
            .collect()
    }

    /// `[1, 1, 263]` tensors (mean, std).
    pub fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let t = |v: &[f32]| Tensor::from_slice(v, (1, 1, FEATURES), device);
        Ok((t(&self.mean)?, t(&self.std)?))
    }

    /// Features in their own units from z-normalised `x` `[b, t, 263]`.
    pub fn denormalise(&self, x: &Tensor) -> Result<Tensor> {
        let (m, s) = self.tensors(x.device())?;
        Ok(x.to_dtype(DType::F32)?
            .broadcast_mul(&s)?
            .broadcast_add(&m)?)
    }
}

/// Mean of a per-element loss `[b, t, …]` over the frames `valid` `[b, t]` (`None`: all).
pub fn masked_mean(loss: &Tensor, valid: Option<&Tensor>) -> Result<Tensor> {
    let per_frame = loss.flatten_from(2)?.mean(D::Minus1)?;
    let Some(valid) = valid else {
        return Ok(per_frame.mean_all()?);
    };
    let total = per_frame.mul(valid)?.sum_all()?;
    Ok(total.broadcast_div(&valid.sum_all()?.clamp(1.0, f64::MAX)?)?)
}
