//! The convolutional pieces the VAE and the U-Net share (diffusers `resnet.py`): ResNet block with
//! an optional time-embedding projection, stride-2 downsampler and nearest ×2 upsampler.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{self, Conv2d, GroupNorm, Linear};

/// diffusers `ResnetBlock2D` with `time_embedding_norm = "default"` and SiLU.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale: f64,
}

pub struct ResnetSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding; `None` for the VAE's blocks.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale: f64,
}

impl ResnetBlock2D {
    pub fn new(s: &ResnetSpec, vb: VarBuilder) -> Result<Self> {
        let (i, o) = (s.in_channels, s.out_channels);
        let time_emb_proj = match s.temb_channels {
            Some(t) => Some(nn::linear(t, o, true, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let shortcut = if i != o {
            Some(nn::conv2d(i, o, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: nn::group_norm(s.groups, i, s.eps, vb.pp("norm1"))?,
            conv1: nn::conv2d(i, o, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: nn::group_norm(s.groups, o, s.eps, vb.pp("norm2"))?,
            conv2: nn::conv2d(o, o, 3, 1, 1, vb.pp("conv2"))?,
            shortcut,
            output_scale: s.output_scale,
        })
    }

    /// `temb`: the already-computed `[b, temb_channels]` time embedding (SiLU is applied here).
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self
            .conv1
            .forward(&super::silu(&self.norm1.forward(xs)?)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&super::silu(t)?)?.unsqueeze(2)?.unsqueeze(3)?;
                h.broadcast_add(&t)?
            }
            _ => h,
        };
        let h = self
            .conv2
            .forward(&super::silu(&self.norm2.forward(&h)?)?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale
        }
    }
}

/// Stride-2 3×3 convolution. With `padding = 0` (the VAE encoder) the input is first padded by one
/// on the right and bottom only, as diffusers' `Downsample2D` does.
pub struct Downsample2D {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: nn::conv2d(channels, channels, 3, 2, padding, vb.pp("conv"))?,
            asymmetric_pad: padding == 0,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let xs = xs.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest ×2 upsampling followed by a 3×3 convolution.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: nn::conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    /// Upsample to `size` (h, w); ×2 when `None`. The U-Net passes its skip connection's size so
    /// that latents whose sides are not multiples of 2^blocks still line up, as diffusers does.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let up = match size {
            Some((th, tw)) if (th, tw) != (2 * h, 2 * w) => xs.upsample_nearest2d(th, tw)?,
            _ => nn::upsample_nearest_2x(xs)?,
        };
        self.conv.forward(&up)
    }
}
