//! The evaluator's network: a small CNN over images in [−1, 1] — convs → flatten → a SiLU
//! feature layer (the FID features) → one linear head per label.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::nn::{conv2d, linear, Conv2d, Linear};

/// The label heads, in order. `category` is "shape" for a shapes image or the emoji category;
/// the others are the shape attributes (absent for emoji).
pub const HEADS: [&str; 6] = [
    "category",
    "shape",
    "color",
    "size",
    "position",
    "background",
];
/// The heads a shapes prompt is judged on for prompt accuracy.
pub const PROMPT_HEADS: [&str; 3] = ["shape", "color", "position"];

/// An evaluator's `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluatorConfig {
    pub resolution: usize,
    /// Conv widths; each 3×3 conv is followed by SiLU and a 2× average pool.
    pub channels: Vec<usize>,
    /// Width of the feature layer (the FID features).
    pub feature_dim: usize,
    /// Class names per head (filled from the data when training).
    #[serde(default)]
    pub classes: BTreeMap<String, Vec<String>>,
    /// Accuracy per head on the held-out real images (written when training).
    #[serde(default)]
    pub heldout_accuracy: BTreeMap<String, f64>,
    /// FID between the held-out features and the same number of training images' features: the
    /// floor a perfect generator would reach at that sample size.
    pub real_fid: Option<f64>,
}

impl EvaluatorConfig {
    pub fn classes(&self, head: &str) -> Result<&[String]> {
        self.classes
            .get(head)
            .map(|v| v.as_slice())
            .with_context(|| format!("evaluator config: no classes for head {head:?}"))
    }
}

/// The CNN: convs → flatten → SiLU feature layer → one linear head per label.
pub struct Classifier {
    convs: Vec<Conv2d>,
    fc: Linear,
    heads: Vec<Linear>,
}

impl Classifier {
    pub fn new(cfg: &EvaluatorConfig, vb: VarBuilder) -> Result<Self> {
        let levels = cfg.channels.len();
        if cfg.resolution == 0 || !cfg.resolution.is_multiple_of(1 << levels) {
            bail!(
                "evaluator config: resolution {} must be a multiple of 2^{levels}",
                cfg.resolution
            )
        }
        let mut convs = Vec::new();
        let mut c_in = 3;
        for (i, &c) in cfg.channels.iter().enumerate() {
            convs.push(conv2d(c_in, c, 3, 1, 1, vb.pp(format!("conv{i}")))?);
            c_in = c;
        }
        let side = cfg.resolution >> levels;
        let fc = linear(c_in * side * side, cfg.feature_dim, true, vb.pp("fc"))?;
        let heads = HEADS
            .iter()
            .map(|h| {
                let k = cfg.classes(h)?.len();
                Ok(linear(
                    cfg.feature_dim,
                    k,
                    true,
                    vb.pp(format!("head_{h}")),
                )?)
            })
            .collect::<Result<_>>()?;
        Ok(Self { convs, fc, heads })
    }

    /// `[n, feature_dim]` features of `[n, 3, r, r]` images in [−1, 1].
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = images.clone();
        for conv in &self.convs {
            x = conv.forward(&x)?.silu()?.avg_pool2d(2)?;
        }
        Ok(self.fc.forward(&x.flatten_from(1)?)?.silu()?)
    }

    /// Log-probabilities per head, in [`HEADS`] order.
    pub fn log_probs(&self, features: &Tensor) -> Result<Vec<Tensor>> {
        self.heads
            .iter()
            .map(|h| log_softmax(&h.forward(features)?))
            .collect()
    }
}

/// Log-softmax over the last dimension. The max is a constant shift (detached: it changes no
/// gradient) that keeps `exp` finite.
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Features and per-head log-probabilities, in batches (no graph is recorded: plain tensors).
pub fn classify(model: &Classifier, images: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
    let n = images.dim(0)?;
    let mut feats = Vec::new();
    let mut lps: Vec<Vec<Tensor>> = vec![Vec::new(); HEADS.len()];
    for start in (0..n).step_by(128) {
        let x = images.narrow(0, start, 128.min(n - start))?;
        let f = model.features(&x)?;
        for (acc, lp) in lps.iter_mut().zip(model.log_probs(&f)?) {
            acc.push(lp);
        }
        feats.push(f);
    }
    let lps = lps
        .iter()
        .map(|v| Ok(Tensor::cat(v, 0)?))
        .collect::<Result<Vec<_>>>()?;
    Ok((Tensor::cat(&feats, 0)?, lps))
}
