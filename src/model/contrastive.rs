//! A CLIP-style contrastive pair over a latent model's data: a CLIP-architecture text tower and a
//! small image tower over VAE latents, with CLIP's symmetric InfoNCE loss. `lcm pretrain text`
//! trains it (`crate::train::text_encoder`) so that the text encoder reads every word of a caption.

use candle_core::{Module, Tensor, D};
use candle_nn::{Conv2d, Linear, VarBuilder};

use super::clip::ClipTextModel;
use super::config::ClipTextConfig;

/// A small CNN over `[b, c, s, s]` latents: three 3×3 convs (the last two stride 2), SiLU, then
/// one linear layer to the embedding.
struct ImageTower {
    convs: Vec<Conv2d>,
    fc: Linear,
}

impl ImageTower {
    const WIDTHS: [usize; 3] = [32, 64, 128];

    fn new(channels: usize, side: usize, out: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let mut convs = Vec::new();
        let mut c_in = channels;
        for (i, &w) in Self::WIDTHS.iter().enumerate() {
            let cfg = candle_nn::Conv2dConfig {
                padding: 1,
                stride: if i == 0 { 1 } else { 2 },
                ..Default::default()
            };
            convs.push(candle_nn::conv2d(c_in, w, 3, cfg, vb.pp("convs").pp(i))?);
            c_in = w;
        }
        let s = side.div_ceil(4);
        let fc = candle_nn::linear(c_in * s * s, out, vb.pp("fc"))?;
        Ok(Self { convs, fc })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = z.clone();
        for c in &self.convs {
            x = candle_nn::ops::silu(&c.forward(&x)?)?;
        }
        self.fc.forward(&x.flatten_from(1)?)
    }
}

/// The two towers and the learned temperature, named as transformers' `CLIPModel` names its
/// text half (`text_model.*`, `text_projection`, `logit_scale`).
pub struct ContrastiveModel {
    pub text: ClipTextModel,
    text_projection: Linear,
    image: ImageTower,
    logit_scale: Tensor,
}

/// CLIP's initial temperature, 1/0.07, as a log.
const LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_778_3;
/// CLIP's cap on the logit scale: ln 100.
const LOGIT_SCALE_MAX: f64 = 2.0 * std::f64::consts::LN_10;

impl ContrastiveModel {
    pub fn new(
        te_cfg: &ClipTextConfig,
        latent: (usize, usize),
        embed_dim: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let text = ClipTextModel::new(te_cfg, vb.pp("text_model"))?;
        let text_projection =
            candle_nn::linear_no_bias(te_cfg.hidden_size, embed_dim, vb.pp("text_projection"))?;
        let image = ImageTower::new(latent.0, latent.1, embed_dim, vb.pp("image_model"))?;
        let logit_scale =
            vb.get_with_hints((), "logit_scale", candle_nn::Init::Const(LOGIT_SCALE_INIT))?;
        Ok(Self {
            text,
            text_projection,
            image,
            logit_scale,
        })
    }

    /// Unit text embeddings `[b, e]`: the last hidden state at `pooled[i]` (the first end-of-text
    /// token of row i), projected.
    pub fn text_embeds(&self, ids: &Tensor, pooled: &[u32]) -> candle_core::Result<Tensor> {
        // Causal attention: the tokens after the last pooled one cannot change it, so they are
        // not computed (captions fill a fraction of the 77 positions).
        let used = pooled.iter().max().map_or(0, |&p| p as usize + 1);
        let h = self
            .text
            .forward(&ids.narrow(1, 0, used.min(ids.dim(1)?))?)?;
        let (b, n, d) = h.dims3()?;
        let idx: Vec<u32> = pooled
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * n) as u32 + p)
            .collect();
        let idx = Tensor::new(idx.as_slice(), h.device())?;
        let pooled = h.reshape((b * n, d))?.index_select(&idx, 0)?;
        unit(&self.text_projection.forward(&pooled)?)
    }

    /// Unit image embeddings `[b, e]` of scaled latents.
    /// The learned temperature, exp(logit_scale) (before the cap).
    pub fn logit_scale(&self) -> candle_core::Result<f32> {
        Ok(self.logit_scale.to_scalar::<f32>()?.exp())
    }

    pub fn image_embeds(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        unit(&self.image.forward(z)?)
    }

    /// CLIP's symmetric cross-entropy over the batch's text–image similarities, and the fraction
    /// of captions whose own image scores highest among the batch.
    pub fn loss(&self, text: &Tensor, image: &Tensor) -> candle_core::Result<(Tensor, f64)> {
        let b = text.dim(0)?;
        let scale = self.logit_scale.clamp(0.0, LOGIT_SCALE_MAX)?.exp()?;
        let logits = text.matmul(&image.t()?)?.broadcast_mul(&scale)?;
        let labels = Tensor::arange(0, b as u32, text.device())?;
        let t2i = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let i2t = candle_nn::loss::cross_entropy(&logits.t()?, &labels)?;
        let loss = ((t2i + i2t)? * 0.5)?;
        let hits = logits
            .argmax(D::Minus1)?
            .to_vec1::<u32>()?
            .iter()
            .enumerate()
            .filter(|(i, &j)| *i as u32 == j)
            .count();
        Ok((loss, hits as f64 / b as f64))
    }
}

fn unit(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    x.broadcast_div(&(norm + 1e-8)?)
}
