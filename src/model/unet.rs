//! UNet2DConditionModel (diffusers `unet_2d_condition.py`) with what LCM needs beyond
//! candle-transformers' version: a timestep per sample (training draws a different t for every
//! sample) and the optional guidance embedding (`time_cond_proj_dim`, added to the sinusoidal
//! timestep embedding through `time_embedding.cond_proj`). Block layout, channel widths, heads,
//! layers and norm groups all come from config.json.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::config::UNetConfig;
use crate::nn::blocks::{Downsample2D, ResnetBlock2D, ResnetSpec, Upsample2D};
use crate::nn::{self, Conv2d, GroupNorm, LayerNorm, Linear};

/// Multi-head attention; cross-attention when `context_dim` differs from the query width.
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn new(dim: usize, context_dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q: nn::linear(dim, dim, false, vb.pp("to_q"))?,
            k: nn::linear(context_dim, dim, false, vb.pp("to_k"))?,
            v: nn::linear(context_dim, dim, false, vb.pp("to_v"))?,
            out: nn::linear(dim, dim, true, vb.pp("to_out").pp(0))?,
            heads,
        })
    }

    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(xs);
        let q = nn::split_heads(&self.q.forward(xs)?, self.heads)?;
        let k = nn::split_heads(&self.k.forward(ctx)?, self.heads)?;
        let v = nn::split_heads(&self.v.forward(ctx)?, self.heads)?;
        let attn = nn::attention_in(self.q.is_bf16(), &q, &k, &v, None)?;
        self.out.forward(&nn::merge_heads(&attn, self.heads)?)
    }
}

/// GEGLU feed-forward: `proj` → (hidden, gate) → hidden·gelu(gate) → linear.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: nn::linear(dim, 2 * inner, true, vb.pp("net").pp(0).pp("proj"))?,
            out: nn::linear(inner, dim, true, vb.pp("net").pp(2))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.out.forward(&nn::geglu(&self.proj.forward(xs)?)?)
    }
}

/// diffusers `BasicTransformerBlock`: self-attention, cross-attention, feed-forward, each pre-norm
/// with a residual.
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(dim: usize, context_dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(dim, dim, heads, vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(dim, context_dim, heads, vb.pp("attn2"))?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + &xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// 1×1 conv (SD1.x) or linear (SD2.x, `use_linear_projection`) projection into/out of the tokens.
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers `Transformer2DModel`: GroupNorm (eps 1e-6) → proj_in → transformer blocks over the
/// h·w tokens → proj_out → + residual.
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    fn new(
        channels: usize,
        heads: usize,
        layers: usize,
        cfg: &UNetConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Projection> {
            if cfg.use_linear_projection {
                Ok(Projection::Linear(nn::linear(
                    channels,
                    channels,
                    true,
                    vb.pp(name),
                )?))
            } else {
                Ok(Projection::Conv(nn::conv2d(
                    channels,
                    channels,
                    1,
                    1,
                    0,
                    vb.pp(name),
                )?))
            }
        };
        let blocks = (0..layers)
            .map(|i| {
                TransformerBlock::new(
                    channels,
                    cfg.cross_attention_dim,
                    heads,
                    vb.pp("transformer_blocks").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: nn::group_norm(cfg.norm_num_groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(p) => to_tokens(&p.forward(&normed)?)?,
            Projection::Linear(p) => p.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let from_tokens =
            |t: &Tensor| -> Result<Tensor> { t.reshape((b, h, w, c))?.permute((0, 3, 1, 2)) };
        let out = match &self.proj_out {
            Projection::Conv(p) => p.forward(&from_tokens(&tokens)?.contiguous()?)?,
            Projection::Linear(p) => from_tokens(&p.forward(&tokens)?)?,
        };
        out + xs
    }
}

/// One resolution level: resnets, each optionally followed by a spatial transformer.
struct Level {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
}

impl Level {
    /// `n` resnets (the j-th taking `c_in(j)` channels, all giving `out_c`), each followed by a
    /// transformer with `attn` = (heads, layers) when the level has cross-attention.
    #[allow(clippy::too_many_arguments)]
    fn new(
        n: usize,
        c_in: impl Fn(usize) -> usize,
        out_c: usize,
        attn: Option<(usize, usize)>,
        spec: &dyn Fn(usize, usize, f64) -> ResnetSpec,
        cfg: &UNetConfig,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let mut level = Level {
            resnets: vec![],
            attentions: vec![],
        };
        for j in 0..n {
            let r = ResnetBlock2D::new(&spec(c_in(j), out_c, 1.0), vb.pp("resnets").pp(j))?;
            level.resnets.push(r);
            if let Some((heads, layers)) = attn {
                let vb_a = vb.pp("attentions").pp(j);
                let a = SpatialTransformer::new(out_c, heads, layers, cfg, vb_a)?;
                level.attentions.push(a);
            }
        }
        Ok(level)
    }

    fn step(&self, j: usize, xs: &Tensor, temb: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let xs = self.resnets[j].forward(xs, Some(temb))?;
        match self.attentions.get(j) {
            Some(a) => a.forward(&xs, ctx),
            None => Ok(xs),
        }
    }
}

struct DownBlock {
    level: Level,
    downsample: Option<Downsample2D>,
}

struct UpBlock {
    level: Level,
    upsample: Option<Upsample2D>,
}

struct MidBlock {
    res1: ResnetBlock2D,
    attn: SpatialTransformer,
    res2: ResnetBlock2D,
}

pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    cond_proj: Option<Linear>,
    /// A flow-map student's end-time embedding.
    end_proj: Option<Linear>,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: UNetConfig,
}

impl UNet2DConditionModel {
    pub fn new(cfg: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let heads = map_err(cfg.heads())?;
        let layers = map_err(cfg.layers())?;
        let t_layers = map_err(cfg.transformer_layers())?;
        let temb_dim = cfg.time_embed_dim();
        let spec = |i: usize, o: usize, scale: f64| ResnetSpec {
            in_channels: i,
            out_channels: o,
            temb_channels: Some(temb_dim),
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            output_scale: scale,
        };

        let vb_t = vb.pp("time_embedding");
        let cond_proj = match cfg.time_cond_proj_dim {
            Some(d) => Some(nn::linear(d, ch[0], false, vb_t.pp("cond_proj"))?),
            None => None,
        };
        let end_proj = cfg
            .end_time_embedding
            .then(|| nn::linear(ch[0], ch[0], false, vb_t.pp("end_proj")))
            .transpose()?;
        let time_linear_1 = nn::linear(ch[0], temb_dim, true, vb_t.pp("linear_1"))?;
        let time_linear_2 = nn::linear(temb_dim, temb_dim, true, vb_t.pp("linear_2"))?;

        let mut down = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for i in 0..n {
            let in_c = out_c;
            out_c = ch[i];
            let vb_b = vb.pp("down_blocks").pp(i);
            let cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D";
            let attn = cross.then_some((heads[i], t_layers[i]));
            let c_in = |j: usize| if j == 0 { in_c } else { out_c };
            let level = Level::new(layers[i], c_in, out_c, attn, &spec, cfg, &vb_b)?;
            let downsample = if i + 1 < n {
                let p = cfg.downsample_padding;
                Some(Downsample2D::new(out_c, p, vb_b.pp("downsamplers").pp(0))?)
            } else {
                None
            };
            down.push(DownBlock { level, downsample });
        }

        let last = ch[n - 1];
        let mid = {
            let vb_m = vb.pp("mid_block");
            let s = cfg.mid_block_scale_factor;
            MidBlock {
                res1: ResnetBlock2D::new(&spec(last, last, s), vb_m.pp("resnets").pp(0))?,
                attn: SpatialTransformer::new(
                    last,
                    heads[n - 1],
                    t_layers[n - 1],
                    cfg,
                    vb_m.pp("attentions").pp(0),
                )?,
                res2: ResnetBlock2D::new(&spec(last, last, s), vb_m.pp("resnets").pp(1))?,
            }
        };

        let rev_ch: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = layers.iter().rev().copied().collect();
        let rev_t_layers: Vec<usize> = t_layers.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_c = rev_ch[0];
        for i in 0..n {
            let prev_c = out_c;
            out_c = rev_ch[i];
            let in_c = rev_ch[(i + 1).min(n - 1)];
            let vb_b = vb.pp("up_blocks").pp(i);
            let cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D";
            let num = rev_layers[i] + 1;
            let attn = cross.then_some((rev_heads[i], rev_t_layers[i]));
            // Each resnet also takes a skip connection: the last one the level's input.
            let c_in = |j: usize| {
                let skip_c = if j == num - 1 { in_c } else { out_c };
                (if j == 0 { prev_c } else { out_c }) + skip_c
            };
            let level = Level::new(num, c_in, out_c, attn, &spec, cfg, &vb_b)?;
            let upsample = if i + 1 < n {
                Some(Upsample2D::new(out_c, vb_b.pp("upsamplers").pp(0))?)
            } else {
                None
            };
            up.push(UpBlock { level, upsample });
        }

        let k_in = cfg.conv_in_kernel;
        let k_out = cfg.conv_out_kernel;
        Ok(Self {
            conv_in: nn::conv2d(
                cfg.in_channels,
                ch[0],
                k_in,
                1,
                (k_in - 1) / 2,
                vb.pp("conv_in"),
            )?,
            time_linear_1,
            time_linear_2,
            cond_proj,
            end_proj,
            down,
            mid,
            up,
            norm_out: nn::group_norm(
                cfg.norm_num_groups,
                ch[0],
                cfg.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: nn::conv2d(
                ch[0],
                cfg.out_channels,
                k_out,
                1,
                (k_out - 1) / 2,
                vb.pp("conv_out"),
            )?,
            config: cfg.clone(),
        })
    }

    /// The dtype its inputs must have (f32 for bf16-packed weights on the CPU).
    pub fn dtype(&self) -> candle_core::DType {
        self.time_linear_1.dtype()
    }

    /// Whether this U-Net takes the LCM guidance embedding.
    pub fn has_guidance_embedding(&self) -> bool {
        self.cond_proj.is_some()
    }

    /// The `[b, time_embed_dim]` embedding of per-sample timesteps `[b]` plus, for an LCM U-Net, the
    /// guidance embedding `[b, time_cond_proj_dim]`, and for a flow-map student the end times
    /// `[b]` (default: the timesteps themselves, a jump of length zero).
    pub fn time_embedding(
        &self,
        timesteps: &Tensor,
        end: Option<&Tensor>,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let sinusoid = |t: &Tensor| {
            nn::timestep_embedding(
                t,
                cfg.block_out_channels[0],
                cfg.flip_sin_to_cos,
                cfg.freq_shift,
            )?
            .to_dtype(self.time_linear_1.dtype())
        };
        let mut t_emb = sinusoid(timesteps)?;
        match (&self.end_proj, end) {
            (Some(p), end) => t_emb = (p.forward(&sinusoid(end.unwrap_or(timesteps))?)? + t_emb)?,
            (None, Some(_)) => {
                candle_core::bail!("this U-Net is not a flow map (it has no end-time embedding)")
            }
            (None, None) => {}
        }
        let t_emb = match (&self.cond_proj, timestep_cond) {
            (Some(p), Some(c)) => (p.forward(&c.to_dtype(t_emb.dtype())?)? + t_emb)?,
            (Some(_), None) => candle_core::bail!(
                "this U-Net has a guidance embedding (time_cond_proj_dim) but no timestep_cond was given"
            ),
            (None, Some(_)) => candle_core::bail!(
                "timestep_cond was given but this U-Net has no time_cond_proj_dim"
            ),
            (None, None) => t_emb,
        };
        self.time_linear_2
            .forward(&nn::silu(&self.time_linear_1.forward(&t_emb)?)?)
    }

    /// Predict noise. `sample`: `[b, c, h, w]`; `timesteps`: `[b]` (any numeric dtype, one per
    /// sample); `context`: `[b, tokens, cross_attention_dim]`; `timestep_cond`: `[b, d]` guidance
    /// embedding for an LCM U-Net.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_to(sample, timesteps, None, context, timestep_cond)
    }

    /// [`forward`](Self::forward) of a flow-map student: the ε of the jump from `timesteps` to
    /// `end` `[b]`.
    pub fn forward_to(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        end: Option<&Tensor>,
        context: &Tensor,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = sample.dim(0)?;
        let timesteps = match timesteps.rank() {
            0 => timesteps.broadcast_as(b)?.contiguous()?,
            _ => timesteps.clone(),
        };
        if timesteps.dim(0)? != b || context.dim(0)? != b {
            candle_core::bail!(
                "U-Net batch mismatch: sample {b}, timesteps {}, context {}",
                timesteps.dim(0)?,
                context.dim(0)?
            )
        }
        let temb = self.time_embedding(&timesteps, end, timestep_cond)?;

        let mut xs = self.conv_in.forward(sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            for j in 0..block.level.resnets.len() {
                xs = block.level.step(j, &xs, &temb, context)?;
                skips.push(xs.clone());
            }
            if let Some(d) = &block.downsample {
                xs = d.forward(&xs)?;
                skips.push(xs.clone());
            }
        }
        xs = self.mid.res1.forward(&xs, Some(&temb))?;
        xs = self.mid.attn.forward(&xs, context)?;
        xs = self.mid.res2.forward(&xs, Some(&temb))?;
        for block in &self.up {
            for j in 0..block.level.resnets.len() {
                let skip = skips.pop().expect("one skip per up-block resnet");
                xs = Tensor::cat(&[&xs, &skip], 1)?;
                xs = block.level.step(j, &xs, &temb, context)?;
            }
            if let Some(u) = &block.upsample {
                let size = skips.last().map(|s| (s.dim(2), s.dim(3)));
                let size = match size {
                    Some((Ok(h), Ok(w))) => Some((h, w)),
                    _ => None,
                };
                xs = u.forward(&xs, size)?;
            }
        }
        self.conv_out
            .forward(&nn::silu(&self.norm_out.forward(&xs)?)?)
    }
}

fn map_err<T>(r: anyhow::Result<T>) -> Result<T> {
    r.map_err(|e| candle_core::Error::Msg(e.to_string()))
}
