//! AutoencoderKL (diffusers `autoencoder_kl.py`): images in [−1, 1] ⇄ latents. The encoder returns
//! the diagonal-Gaussian posterior; `scaling_factor` (from config.json) maps VAE latents to the
//! U-Net's latent space and is applied by the pipeline, not here, exactly as in diffusers.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::config::VaeConfig;
use crate::nn::blocks::{Downsample2D, ResnetBlock2D, ResnetSpec, Upsample2D};
use crate::nn::{self, Conv2d, GroupNorm, Linear};

const VAE_EPS: f64 = 1e-6;

/// Single-head self-attention over the spatial positions with a residual connection (the VAE's
/// mid-block attention). Accepts both current (`to_q`) and legacy (`query`) key names.
struct SpatialSelfAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SpatialSelfAttention {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        let lin = |name: &str| nn::linear(channels, channels, true, vb.pp(name));
        Ok(Self {
            norm: nn::group_norm(groups, channels, VAE_EPS, vb.pp("group_norm"))?,
            q: lin(names[0])?,
            k: lin(names[1])?,
            v: lin(names[2])?,
            out: lin(names[3])?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.q.forward(&tokens)?;
        let k = self.k.forward(&tokens)?;
        let v = self.v.forward(&tokens)?;
        let attn = nn::attention_in(self.q.is_bf16(), &q, &k, &v, None)?;
        let out = self
            .out
            .forward(&attn)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + xs
    }
}

/// resnet → attention → resnet at the lowest resolution.
struct MidBlock {
    res1: ResnetBlock2D,
    attn: Option<SpatialSelfAttention>,
    res2: ResnetBlock2D,
}

impl MidBlock {
    fn new(channels: usize, groups: usize, attention: bool, vb: VarBuilder) -> Result<Self> {
        let spec = ResnetSpec {
            in_channels: channels,
            out_channels: channels,
            temb_channels: None,
            groups,
            eps: VAE_EPS,
            output_scale: 1.0,
        };
        let attn = if attention {
            Some(SpatialSelfAttention::new(
                channels,
                groups,
                vb.pp("attentions").pp(0),
            )?)
        } else {
            None
        };
        Ok(Self {
            res1: ResnetBlock2D::new(&spec, vb.pp("resnets").pp(0))?,
            attn,
            res2: ResnetBlock2D::new(&spec, vb.pp("resnets").pp(1))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.res1.forward(xs, None)?;
        if let Some(a) = &self.attn {
            xs = a.forward(&xs)?;
        }
        self.res2.forward(&xs, None)
    }
}

fn resnet(i: usize, o: usize, groups: usize, vb: VarBuilder) -> Result<ResnetBlock2D> {
    let spec = ResnetSpec {
        in_channels: i,
        out_channels: o,
        temb_channels: None,
        groups,
        eps: VAE_EPS,
        output_scale: 1.0,
    };
    ResnetBlock2D::new(&spec, vb)
}

/// A block's `n` resnets: the first takes `in_c` channels, all give `out_c`.
fn resnets(
    n: usize,
    in_c: usize,
    out_c: usize,
    groups: usize,
    vb: VarBuilder,
) -> Result<Vec<ResnetBlock2D>> {
    (0..n)
        .map(|j| resnet(if j == 0 { in_c } else { out_c }, out_c, groups, vb.pp(j)))
        .collect()
}

struct Encoder {
    conv_in: Conv2d,
    down: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut down = Vec::new();
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let vb_b = vb.pp("down_blocks").pp(i);
            let resnets = resnets(cfg.layers_per_block, in_c, out_c, g, vb_b.pp("resnets"))?;
            let ds = if i + 1 < ch.len() {
                Some(Downsample2D::new(out_c, 0, vb_b.pp("downsamplers").pp(0))?)
            } else {
                None
            };
            down.push((resnets, ds));
        }
        let last = *ch.last().expect("validated non-empty");
        Ok(Self {
            conv_in: nn::conv2d(cfg.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?,
            down,
            mid: MidBlock::new(last, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            norm_out: nn::group_norm(g, last, VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: nn::conv2d(last, 2 * cfg.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for (resnets, ds) in &self.down {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(d) = ds {
                xs = d.forward(&xs)?;
            }
        }
        let xs = self.mid.forward(&xs)?;
        self.conv_out
            .forward(&nn::silu(&self.norm_out.forward(&xs)?)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up = Vec::new();
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev = out_c;
            out_c = c;
            let vb_b = vb.pp("up_blocks").pp(i);
            let resnets = resnets(cfg.layers_per_block + 1, prev, out_c, g, vb_b.pp("resnets"))?;
            let us = if i + 1 < rev.len() {
                Some(Upsample2D::new(out_c, vb_b.pp("upsamplers").pp(0))?)
            } else {
                None
            };
            up.push((resnets, us));
        }
        let first = *rev.last().expect("validated non-empty");
        Ok(Self {
            conv_in: nn::conv2d(cfg.latent_channels, rev[0], 3, 1, 1, vb.pp("conv_in"))?,
            mid: MidBlock::new(rev[0], g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            up,
            norm_out: nn::group_norm(g, first, VAE_EPS, vb.pp("conv_norm_out"))?,
            conv_out: nn::conv2d(first, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut xs = self.mid.forward(&self.conv_in.forward(z)?)?;
        for (resnets, us) in &self.up {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(u) = us {
                xs = u.forward(&xs, None)?;
            }
        }
        self.conv_out
            .forward(&nn::silu(&self.norm_out.forward(&xs)?)?)
    }
}

/// The posterior q(z|x) = N(mean, exp(logvar)).
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// mean + std·noise, with `noise` drawn by the caller (so runs are reproducible).
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean
            .add(&(self.logvar.affine(0.5, 0.0)?.exp()? * noise)?)
    }
}

pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    pub config: VaeConfig,
}

impl AutoencoderKL {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let l = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(nn::conv2d(2 * l, 2 * l, 1, 1, 0, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(nn::conv2d(l, l, 1, 1, 0, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
        })
    }

    /// Images `[b, 3, H, W]` in [−1, 1] → posterior over `[b, latent_channels, H/f, W/f]`
    /// (VAE space: not multiplied by `scaling_factor`).
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let mut moments = self.encoder.forward(images)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        Ok(DiagonalGaussian {
            mean: moments.narrow(1, 0, l)?,
            logvar: moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?,
        })
    }

    /// VAE-space latents → images in roughly [−1, 1] (not clamped).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// U-Net-space latents → VAE space: `z / scaling_factor + shift`.
    pub fn unscale(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents / self.config.scaling_factor)?;
        match self.config.shift_factor {
            Some(s) => z + s,
            None => Ok(z),
        }
    }

    /// VAE-space latents → U-Net space: `(z − shift)·scaling_factor`.
    pub fn scale(&self, z: &Tensor) -> Result<Tensor> {
        let z = match self.config.shift_factor {
            Some(s) => (z - s)?,
            None => z.clone(),
        };
        z * self.config.scaling_factor
    }
}
