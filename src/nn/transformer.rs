//! The transformer the motion networks share: pre-norm encoder layers (self-attention with an
//! optional key-padding mask, a GELU feed-forward) arranged as MLD's skip transformer — the first
//! half's outputs are concatenated into the mirrored layers of the second half (as a U-Net's long
//! skips), which MLD found to train faster and better than a plain stack.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::layers::{attention, linear, merge_heads, split_heads, LayerNorm, Linear};

/// Sizes of a skip transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransformerConfig {
    pub width: usize,
    pub heads: usize,
    /// Hidden width of the feed-forward blocks.
    pub ff: usize,
    /// Layers in all; odd (k in, one middle, k out), as MLD's skip transformer.
    pub layers: usize,
}

impl TransformerConfig {
    pub fn check(&self, what: &str) -> anyhow::Result<()> {
        if self.layers.is_multiple_of(2) {
            anyhow::bail!(
                "{what}: layers must be odd (k in, 1 middle, k out), got {}",
                self.layers
            )
        }
        if self.heads == 0 || !self.width.is_multiple_of(self.heads) {
            anyhow::bail!(
                "{what}: width {} must be a multiple of heads {}",
                self.width,
                self.heads
            )
        }
        Ok(())
    }
}

pub struct EncoderLayer {
    norm1: LayerNorm,
    qkv: Linear,
    out: Linear,
    norm2: LayerNorm,
    ff1: Linear,
    ff2: Linear,
    heads: usize,
}

impl EncoderLayer {
    pub fn new(c: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.width;
        Ok(Self {
            norm1: LayerNorm::new(d, 1e-5, vb.pp("norm1"))?,
            qkv: linear(d, 3 * d, true, vb.pp("attn.qkv"))?,
            out: linear(d, d, true, vb.pp("attn.out"))?,
            norm2: LayerNorm::new(d, 1e-5, vb.pp("norm2"))?,
            ff1: linear(d, c.ff, true, vb.pp("ff.0"))?,
            ff2: linear(c.ff, d, true, vb.pp("ff.2"))?,
            heads: c.heads,
        })
    }

    /// `x` `[b, n, d]`; `mask` additive `[b·heads, 1, n]` (see [`key_mask`]).
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let qkv = self.qkv.forward(&h)?;
        let d = x.dim(D::Minus1)?;
        let part = |i: usize| split_heads(&qkv.narrow(D::Minus1, i * d, d)?, self.heads);
        let a = attention(&part(0)?, &part(1)?, &part(2)?, mask)?;
        let x = (x + self.out.forward(&merge_heads(&a, self.heads)?)?)?;
        let h = super::layers::gelu_tanh(&self.ff1.forward(&self.norm2.forward(&x)?)?)?;
        x + self.ff2.forward(&h)?
    }
}

/// The additive attention mask `[b·heads, 1, n]` hiding the keys where `valid` `[b, n]` is 0.
pub fn key_mask(valid: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n) = valid.dims2()?;
    let m = ((valid.ones_like()? - valid)? * -1e9)?;
    m.reshape((b, 1, 1, n))?
        .broadcast_as((b, heads, 1, n))?
        .reshape((b * heads, 1, n))
}

/// Sinusoidal position codes `[n, width]` (fixed, as the original transformer's).
pub fn positions(n: usize, width: usize, device: &candle_core::Device) -> Result<Tensor> {
    let t = Tensor::arange(0u32, n as u32, device)?.to_dtype(candle_core::DType::F32)?;
    super::layers::timestep_embedding(&t, width, false, 0.0)
}

pub struct SkipTransformer {
    input: Vec<EncoderLayer>,
    middle: EncoderLayer,
    output: Vec<(Linear, EncoderLayer)>,
    norm: LayerNorm,
    heads: usize,
}

impl SkipTransformer {
    pub fn new(c: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        let k = c.layers / 2;
        Ok(Self {
            input: (0..k)
                .map(|i| EncoderLayer::new(c, vb.pp(format!("input.{i}"))))
                .collect::<Result<_>>()?,
            middle: EncoderLayer::new(c, vb.pp("middle"))?,
            output: (0..k)
                .map(|i| {
                    Ok((
                        linear(2 * c.width, c.width, true, vb.pp(format!("skip.{i}")))?,
                        EncoderLayer::new(c, vb.pp(format!("output.{i}")))?,
                    ))
                })
                .collect::<Result<_>>()?,
            norm: LayerNorm::new(c.width, 1e-5, vb.pp("norm"))?,
            heads: c.heads,
        })
    }

    /// `x` `[b, n, d]`, `valid` `[b, n]` (1 for tokens attended to) or `None` for all.
    pub fn forward(&self, x: &Tensor, valid: Option<&Tensor>) -> Result<Tensor> {
        let mask = valid.map(|v| key_mask(v, self.heads)).transpose()?;
        let mask = mask.as_ref();
        let mut x = x.clone();
        let mut skips = Vec::with_capacity(self.input.len());
        for l in &self.input {
            x = l.forward(&x, mask)?;
            skips.push(x.clone());
        }
        x = self.middle.forward(&x, mask)?;
        for (proj, l) in &self.output {
            let s = skips.pop().expect("one skip per output layer");
            x = l.forward(&proj.forward(&Tensor::cat(&[&x, &s], D::Minus1)?)?, mask)?;
        }
        self.norm.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Padding is invisible: a sequence's outputs do not change with what fills its masked tail.
    #[test]
    fn masked_keys_do_not_leak() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let c = TransformerConfig {
            width: 16,
            heads: 4,
            ff: 32,
            layers: 3,
        };
        let w = crate::nn::init::init_weights(1, &dev, |vb| SkipTransformer::new(&c, vb))?;
        let net = SkipTransformer::new(&c, VarBuilder::from_tensors(w, DType::F32, &dev))?;
        let x = Tensor::randn(0f32, 1.0, (1, 6, 16), &dev)?;
        let valid = Tensor::new(&[[1f32, 1., 1., 1., 0., 0.]], &dev)?;
        let other = Tensor::cat(
            &[
                x.narrow(1, 0, 4)?,
                Tensor::randn(0f32, 5.0, (1, 2, 16), &dev)?,
            ],
            1,
        )?;
        let a = net.forward(&x, Some(&valid))?.narrow(1, 0, 4)?;
        let b = net.forward(&other, Some(&valid))?.narrow(1, 0, 4)?;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "the masked tail changed the outputs by {d}");
        Ok(())
    }
}
