//! The motion evaluator, as the T2M evaluators are built and used, with our own networks trained
//! on ground truth only (never on generated motion): a motion encoder (a per-frame projection,
//! two strided 1-D convolutions over time, a masked mean) and a caption encoder independent of
//! any generator's (its own token embeddings over MiniLM's WordPiece vocabulary, a position
//! embedding, a 1-D convolution over tokens, a masked mean), trained contrastively with CLIP's
//! symmetric loss; attribute heads (action, side, count, speed, turn) on the motion features
//! where a sample's program knows them.
//!
//! Deviation: T2M's encoders end in GRUs; these end in convolutions and a mean (v1, for CPU).

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv1d, Embedding, Linear, VarBuilder};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::data::motion::{Gesture, Program, Side, Speed, ALL_ACTIONS};
use crate::motion::FEATURES;

/// Sizes (`config.json` of an evaluator folder).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MotionEvalConfig {
    /// Embedding width.
    pub dim: usize,
    /// Hidden width of both encoders.
    pub hidden: usize,
    /// Frames a clip is padded to (a multiple of 4).
    pub max_frames: usize,
    /// Tokens a caption is cut at.
    pub max_tokens: usize,
    /// Size of the WordPiece vocabulary.
    pub vocab: usize,
}

impl Default for MotionEvalConfig {
    fn default() -> Self {
        Self {
            dim: 128,
            hidden: 192,
            max_frames: 200,
            max_tokens: 40,
            vocab: 30_522,
        }
    }
}

/// How many attribute heads there are.
pub const HEADS_N: usize = 6;

/// The attribute heads: name and number of classes. Labels come from [`attributes`].
pub const HEADS: [(&str, usize); HEADS_N] = [
    ("action", ALL_ACTIONS.len()),
    ("side", 3),
    ("count", 3),
    ("speed", 3),
    ("turn", 6),
    ("gesture", 4),
];

/// A single-step program's class per head (`None` for multi-step programs: their labels would
/// be ambiguous). Side and count are the gesture's where there is one (gestures ride on steps
/// that have neither).
pub fn attributes(p: &Program) -> Option<[u32; HEADS_N]> {
    let [s] = p.steps.as_slice() else {
        return None;
    };
    let action = ALL_ACTIONS.iter().position(|a| *a == s.action)? as u32;
    let o = p.overlay.as_ref();
    let gesture = match o.map(|o| o.gesture) {
        None => 0,
        Some(Gesture::Wave) => 1,
        Some(Gesture::Raise) => 2,
        Some(Gesture::Clap) => 3,
    };
    let count = o.map_or(s.count, |o| o.count);
    let side = match o.map_or(s.side, |o| o.side) {
        None => 0,
        Some(Side::Left) => 1,
        Some(Side::Right) => 2,
    };
    let speed = match s.speed {
        Speed::Slow => 0,
        Speed::Normal => 1,
        Speed::Fast => 2,
    };
    let turn = match s.turn {
        0 => 0,
        45 => 1,
        -45 => 2,
        90 => 3,
        -90 => 4,
        _ => 5,
    };
    Some([action, side, count.clamp(1, 3) - 1, speed, turn, gesture])
}

pub struct MotionEvaluator {
    pub cfg: MotionEvalConfig,
    frame_in: Linear,
    convs: [Conv1d; 2],
    motion_out: Linear,
    tokens: Embedding,
    positions: Embedding,
    text_conv: Conv1d,
    text_out: Linear,
    heads: Vec<Linear>,
    logit_scale: Tensor,
}

/// Mean over the time axis (1) of `x` `[b, t, c]` where `mask` `[b, t]` is 1.
fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(2)?;
    let sum = x.broadcast_mul(&m)?.sum(1)?;
    Ok(sum.broadcast_div(&m.sum(1)?.clamp(1.0, f64::MAX)?)?)
}

fn unit(x: &Tensor) -> Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-8, f64::MAX)?;
    Ok(x.broadcast_div(&n)?)
}

impl MotionEvaluator {
    pub fn new(cfg: &MotionEvalConfig, vb: VarBuilder) -> Result<Self> {
        if !cfg.max_frames.is_multiple_of(4) {
            bail!("max_frames {} must be a multiple of 4", cfg.max_frames)
        }
        let h = cfg.hidden;
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
            frame_in: candle_nn::linear(FEATURES, h, vb.pp("frame_in"))?,
            convs: [
                candle_nn::conv1d(h, h, 4, strided, vb.pp("conv0"))?,
                candle_nn::conv1d(h, h, 4, strided, vb.pp("conv1"))?,
            ],
            motion_out: candle_nn::linear(h, cfg.dim, vb.pp("motion_out"))?,
            tokens: candle_nn::embedding(cfg.vocab, h, vb.pp("tokens"))?,
            positions: candle_nn::embedding(cfg.max_tokens, h, vb.pp("positions"))?,
            text_conv: candle_nn::conv1d(h, h, 3, same, vb.pp("text_conv"))?,
            text_out: candle_nn::linear(h, cfg.dim, vb.pp("text_out"))?,
            heads: HEADS
                .iter()
                .map(|(n, k)| candle_nn::linear(h, *k, vb.pp(format!("head_{n}"))))
                .collect::<candle_core::Result<_>>()?,
            logit_scale: vb.get_with_hints((), "logit_scale", candle_nn::Init::Const(2.659))?,
            cfg: cfg.clone(),
        })
    }

    /// A trained evaluator folder (`config.json`, `model.safetensors`, as
    /// `lcm pretrain motion-evaluator` exports it).
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let cfg: MotionEvalConfig = crate::model::config::read_json(&dir.join("config.json"))?;
        let vb = crate::model::weights::load_weights(
            &[dir.join("model.safetensors")],
            DType::F32,
            device,
        )?;
        Self::new(&cfg, vb).map_err(|e| anyhow!("{}: {e}", dir.display()))
    }

    /// Motion features `[b, hidden]` of normalised clips `[b, max_frames, 263]` with their frame
    /// mask `[b, max_frames]`.
    pub fn motion_features(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let mut h = self.frame_in.forward(x)?.silu()?.transpose(1, 2)?; // [b, h, t]
        for c in &self.convs {
            h = c.forward(&h)?.silu()?;
        }
        // The mask at a quarter of the rate: a slot is valid where any of its frames is.
        let m = mask.reshape((b, t / 4, 4))?.max(2)?;
        masked_mean(&h.transpose(1, 2)?, &m)
    }

    pub fn motion_embed(&self, features: &Tensor) -> Result<Tensor> {
        unit(&self.motion_out.forward(features)?)
    }

    /// Caption embeddings of token ids `[b, max_tokens]` (u32) with their mask (f32).
    pub fn text_embed(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let l = ids.dim(1)?;
        let pos = Tensor::arange(0u32, l as u32, ids.device())?;
        let h = self
            .tokens
            .forward(ids)?
            .broadcast_add(&self.positions.forward(&pos)?.unsqueeze(0)?)?;
        let h = self
            .text_conv
            .forward(&h.transpose(1, 2)?)?
            .silu()?
            .transpose(1, 2)?;
        unit(&self.text_out.forward(&masked_mean(&h, mask)?)?)
    }

    /// Logits of every head.
    pub fn heads(&self, features: &Tensor) -> Result<Vec<Tensor>> {
        self.heads
            .iter()
            .map(|h| Ok(h.forward(features)?))
            .collect()
    }

    /// CLIP's symmetric contrastive loss of paired embeddings, with the learned temperature.
    pub fn contrastive_loss(&self, motion: &Tensor, text: &Tensor) -> Result<Tensor> {
        let b = motion.dim(0)?;
        let scale = self.logit_scale.clamp(0.0, 4.6052)?.exp()?;
        let logits = motion.matmul(&text.t()?)?.broadcast_mul(&scale)?;
        let labels = Tensor::arange(0u32, b as u32, motion.device())?;
        let a = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let c = candle_nn::loss::cross_entropy(&logits.t()?, &labels)?;
        Ok(((a + c)? * 0.5)?)
    }
}

/// Captions as padded token ids (u32) and masks (f32), `[n, max_tokens]`, by MiniLM's WordPiece
/// tokenizer (`weights/minilm/tokenizer.json`).
pub struct CaptionTokenizer {
    tokenizer: Tokenizer,
    max_tokens: usize,
}

impl CaptionTokenizer {
    pub fn load(path: &Path, max_tokens: usize) -> Result<Self> {
        let tokenizer =
            Tokenizer::from_file(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(Self {
            tokenizer,
            max_tokens,
        })
    }

    pub fn encode(&self, captions: &[&str], device: &Device) -> Result<(Tensor, Tensor)> {
        let n = captions.len();
        let (mut ids, mut mask) = (
            vec![0u32; n * self.max_tokens],
            vec![0f32; n * self.max_tokens],
        );
        for (i, c) in captions.iter().enumerate() {
            let e = self
                .tokenizer
                .encode(*c, true)
                .map_err(|e| anyhow!("tokenizing {c:?}: {e}"))?;
            for (k, &t) in e.get_ids().iter().take(self.max_tokens).enumerate() {
                ids[i * self.max_tokens + k] = t;
                mask[i * self.max_tokens + k] = 1.0;
            }
        }
        Ok((
            Tensor::from_vec(ids, (n, self.max_tokens), device)?,
            Tensor::from_vec(mask, (n, self.max_tokens), device)?,
        ))
    }
}

/// Clips (normalised features, `frames × 263` each) padded to `max_frames`: `[n, max_frames, 263]`
/// and the frame mask `[n, max_frames]`.
pub fn pad_clips(clips: &[&[f32]], max_frames: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let n = clips.len();
    let mut x = vec![0f32; n * max_frames * FEATURES];
    let mut m = vec![0f32; n * max_frames];
    for (i, c) in clips.iter().enumerate() {
        let frames = (c.len() / FEATURES).min(max_frames);
        x[i * max_frames * FEATURES..][..frames * FEATURES]
            .copy_from_slice(&c[..frames * FEATURES]);
        m[i * max_frames..][..frames]
            .iter_mut()
            .for_each(|v| *v = 1.0);
    }
    Ok((
        Tensor::from_vec(x, (n, max_frames, FEATURES), device)?,
        Tensor::from_vec(m, (n, max_frames), device)?.to_dtype(DType::F32)?,
    ))
}
