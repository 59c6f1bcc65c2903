//! The latent motion denoiser (MLD's, with MotionLCM's guidance embedding for students): a skip
//! transformer over [time token; text tokens; latent tokens], predicting ε for the latent tokens.
//! The time token is the timestep's sinusoid through an MLP (diffusers' `TimestepEmbedding`); a
//! distilled student adds the guidance-scale embedding through `time_embedding.cond_proj` into
//! that sinusoid, exactly as the image U-Net's `time_cond_proj_dim`. The text tokens are the
//! MiniLM sentence vector and, optionally, MiniLM's first word states (a sentence vector alone
//! blurs "left"/"right" and counts).
//!
//! Deviation from MLD: pre-norm layers; text from MiniLM instead of CLIP's text encoder.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::model::sentence::Encoded;
use crate::nn::transformer::{positions, SkipTransformer, TransformerConfig};
use crate::nn::{linear, timestep_embedding, Linear};
use crate::sample::denoiser::Denoiser;

/// `denoiser/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MotionDenoiserConfig {
    #[serde(flatten)]
    pub transformer: TransformerConfig,
    pub latent_tokens: usize,
    pub latent_channels: usize,
    /// Width of the sentence encoder's vectors (MiniLM: 384).
    pub text_dim: usize,
    /// Text tokens: the sentence vector, then `text_tokens − 1` word states.
    pub text_tokens: usize,
    /// The student's guidance-embedding width (absent for a teacher).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_cond_proj_dim: Option<usize>,
    /// A flow-map student: the jump's end time enters through `time_embedding.end_proj`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub end_time_embedding: bool,
}

impl MotionDenoiserConfig {
    pub fn load(path: &Path) -> Result<Self> {
        crate::model::config::load_checked(path, Self::check)
    }

    pub fn check(&self) -> Result<()> {
        self.transformer.check("motion denoiser")?;
        if self.latent_tokens == 0 || self.latent_channels == 0 {
            bail!("latent_tokens and latent_channels must be positive")
        }
        if self.text_tokens == 0 || self.text_dim == 0 {
            bail!("text_tokens and text_dim must be positive")
        }
        Ok(())
    }
}

pub struct MotionDenoiser {
    pub config: MotionDenoiserConfig,
    cond_proj: Option<Linear>,
    end_proj: Option<Linear>,
    time1: Linear,
    time2: Linear,
    sentence_in: Linear,
    words_in: Option<Linear>,
    latent_in: Linear,
    transformer: SkipTransformer,
    latent_out: Linear,
}

impl MotionDenoiser {
    pub fn new(config: &MotionDenoiserConfig, vb: VarBuilder) -> Result<Self> {
        config.check()?;
        let d = config.transformer.width;
        let te = vb.pp("time_embedding");
        Ok(Self {
            cond_proj: config
                .time_cond_proj_dim
                .map(|w| linear(w, d, false, te.pp("cond_proj")))
                .transpose()?,
            end_proj: config
                .end_time_embedding
                .then(|| linear(d, d, false, te.pp("end_proj")))
                .transpose()?,
            time1: linear(d, d, true, te.pp("linear_1"))?,
            time2: linear(d, d, true, te.pp("linear_2"))?,
            sentence_in: linear(config.text_dim, d, true, vb.pp("sentence_in"))?,
            words_in: (config.text_tokens > 1)
                .then(|| linear(config.text_dim, d, true, vb.pp("words_in")))
                .transpose()?,
            latent_in: linear(config.latent_channels, d, true, vb.pp("latent_in"))?,
            transformer: SkipTransformer::new(&config.transformer, vb.pp("transformer"))?,
            latent_out: linear(d, config.latent_channels, true, vb.pp("latent_out"))?,
            config: config.clone(),
        })
    }

    /// ε for latents `x` `[b, latent_tokens, latent_channels]` at timesteps `t` `[b]` (f32), text
    /// `cond` `[b, text_tokens, text_dim]`, and the student's guidance embedding `[b, w]`.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        cond: &Tensor,
        w_embedding: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_to(x, t, None, cond, w_embedding)
    }

    /// [`forward`](Self::forward) of a flow-map student: the ε of the jump from `t` to `end`
    /// `[b]` (default: `t`, a jump of length zero).
    pub fn forward_to(
        &self,
        x: &Tensor,
        t: &Tensor,
        end: Option<&Tensor>,
        cond: &Tensor,
        w_embedding: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, l, ch) = x.dims3()?;
        if (l, ch) != (c.latent_tokens, c.latent_channels) {
            bail!(
                "the motion denoiser takes latents [b, {}, {}], got {:?}",
                c.latent_tokens,
                c.latent_channels,
                x.dims()
            )
        }
        let (bc, n_text, dim) = cond.dims3()?;
        if bc != b || n_text != c.text_tokens || dim != c.text_dim {
            bail!(
                "the motion denoiser takes text [{b}, {}, {}], got {:?}",
                c.text_tokens,
                c.text_dim,
                cond.dims()
            )
        }
        let d = c.transformer.width;
        let mut temb = timestep_embedding(t, d, true, 0.0)?;
        match (&self.cond_proj, w_embedding) {
            (Some(p), Some(w)) => temb = (temb + p.forward(w)?)?,
            (Some(_), None) => bail!("this motion student needs a guidance embedding"),
            (None, Some(_)) => bail!("this motion denoiser takes no guidance embedding"),
            (None, None) => {}
        }
        match (&self.end_proj, end) {
            (Some(p), end) => {
                temb = (temb + p.forward(&timestep_embedding(end.unwrap_or(t), d, true, 0.0)?)?)?
            }
            (None, Some(_)) => {
                bail!("this motion denoiser is not a flow map (it has no end-time embedding)")
            }
            (None, None) => {}
        }
        let temb = self
            .time2
            .forward(&crate::nn::silu(&self.time1.forward(&temb)?)?)?;
        let mut tokens = vec![
            temb.unsqueeze(1)?,
            self.sentence_in.forward(&cond.narrow(1, 0, 1)?)?,
        ];
        if let Some(w) = &self.words_in {
            tokens.push(w.forward(&cond.narrow(1, 1, n_text - 1)?)?);
        }
        tokens.push(self.latent_in.forward(x)?);
        let h = Tensor::cat(&tokens, 1)?;
        let n = h.dim(1)?;
        let h = h.broadcast_add(&positions(n, d, x.device())?.unsqueeze(0)?)?;
        let h = self.transformer.forward(&h, None)?;
        Ok(self.latent_out.forward(&h.narrow(1, n - l, l)?)?)
    }
}

impl Denoiser for MotionDenoiser {
    fn predict_eps(
        &self,
        x: &Tensor,
        timesteps: &[usize],
        cond: &Tensor,
        w_embedding: Option<&Tensor>,
    ) -> Result<Tensor> {
        crate::sample::flowmap::motion_eps(self, x, timesteps, None, cond, w_embedding)
    }

    fn predict_jump_eps(
        &self,
        x: &Tensor,
        timesteps: &[usize],
        end: &[crate::sample::flowmap::EndTime],
        cond: &Tensor,
        w_embedding: Option<&Tensor>,
    ) -> Result<Tensor> {
        crate::sample::flowmap::motion_eps(self, x, timesteps, Some(end), cond, w_embedding)
    }

    fn is_flow_map(&self) -> bool {
        self.config.end_time_embedding
    }

    fn guidance_embedding_dim(&self) -> Option<usize> {
        self.config.time_cond_proj_dim
    }
}

/// The denoiser's text input `[n, text_tokens, text_dim]` from encoded sentences: the sentence
/// vector, then the first word states (after `[CLS]`), zero past each sentence's end.
pub fn text_condition(e: &Encoded, text_tokens: usize) -> Result<Tensor> {
    let sentence = e.sentences.unsqueeze(1)?;
    if text_tokens == 1 {
        return Ok(sentence);
    }
    let words = text_tokens - 1;
    let (n, len, dim) = e.tokens.dims3()?;
    let states = e.tokens.broadcast_mul(&e.mask.unsqueeze(2)?)?;
    // Skip [CLS]; pad or cut to `words`.
    let avail = len.saturating_sub(1).min(words);
    let mut parts = vec![sentence];
    if avail > 0 {
        parts.push(states.narrow(1, 1, avail)?);
    }
    if avail < words {
        parts.push(Tensor::zeros(
            (n, words - avail, dim),
            DType::F32,
            e.tokens.device(),
        )?);
    }
    Ok(Tensor::cat(&parts, 1)?.contiguous()?)
}
