//! Layer building blocks shared by the text encoder, the VAE and the U-Net.
//!
//! Every layer is built from a `VarBuilder`, so the same code loads frozen weights (mmapped
//! safetensors, plain tensors) and trainable ones (a `VarMap`). candle 0.11's fused softmax and
//! layer-norm kernels have no backward pass and cut the autograd graph without an error, so the
//! helpers here take the fused kernel only when no gradient can flow through the inputs.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// A low-rank adapter found beside a layer's weight (`<layer>.lora.down.weight`,
/// `<layer>.lora.up.weight`, optional `<layer>.alpha`): the layer adds scale·(α/r)·up(down(x)).
/// Used while training LCM-LoRA, where the adapters are variables and the base weights frozen;
/// inference merges adapters into the weights instead ([`crate::nn::lora::merge`]).
fn lora_pair(vb: &VarBuilder) -> Result<Option<(Tensor, Tensor, f64)>> {
    let l = vb.pp("lora");
    if !l.contains_tensor("down.weight") {
        return Ok(None);
    }
    let down = l.get_unchecked("down.weight")?;
    let up = l.get_unchecked("up.weight")?;
    let r = down.dim(0)? as f64;
    let alpha = if vb.contains_tensor("alpha") {
        vb.get_unchecked("alpha")?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?[0]
    } else {
        r
    };
    Ok(Some((down, up, alpha / r)))
}

/// A linear layer, optionally with a LoRA branch beside it.
///
/// On the CPU a layer whose weight cannot change keeps it transposed, `[in, out]` and contiguous,
/// instead of `[out, in]`: the `gemm` crate multiplies by a transposed (column-major) right-hand
/// side up to 7× slower at the small row counts of batch-1 inference (CLIP-L's 77 tokens, the
/// motion denoiser's few dozen; benches/ops.rs) and never faster. The copy replaces the stored
/// weight, so memory is unchanged.
#[derive(Debug, Clone)]
pub struct Linear {
    weights: LinearWeights,
    lora: Option<(candle_nn::Linear, candle_nn::Linear, f64)>,
}

/// How a linear layer holds its weight.
#[derive(Debug, Clone)]
enum LinearWeights {
    /// candle's layer: trainable or live weights, other devices and dtypes.
    Candle(candle_nn::Linear),
    /// `[in, out]`, contiguous, with the bias: the f32 CPU inference path.
    Transposed(Tensor, Option<Tensor>),
    /// bf16, packed for [`crate::kernels::amx`] (inference under [`with_bf16_weights`]).
    Bf16(std::sync::Arc<crate::kernels::bf16::Bf16Linear>),
}

thread_local! {
    /// Frozen weights transposed so far inside [`with_shared_frozen`], by the source tensor.
    static SHARED_TRANSPOSED: std::cell::RefCell<Option<std::collections::HashMap<candle_core::TensorId, Tensor>>> =
        const { std::cell::RefCell::new(None) };
    static LIVE_WEIGHTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static BF16_WEIGHTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Build a network over weights that change in place while it lives (LCD's EMA target, whose
/// tensors are the EMA variables' storage): its linear layers read the weights at every call
/// rather than keeping a transposed copy that would go stale.
pub fn with_live_weights<T>(build: impl FnOnce() -> T) -> T {
    let before = LIVE_WEIGHTS.with(|l| l.replace(true));
    let out = build();
    LIVE_WEIGHTS.with(|l| l.set(before));
    out
}

/// While alive, networks built on this thread over the same frozen tensors (LCM-LoRA's teacher,
/// student and target, all over the base U-Net) share one transposed copy of each frozen linear
/// weight instead of one per network: 1.2 GB a network at SD1.5 size. A nested scope joins the
/// outer one.
#[must_use = "sharing ends when the guard is dropped"]
pub struct SharedFrozen {
    owns: bool,
    /// The scope is the thread's: the guard stays on it.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Drop for SharedFrozen {
    fn drop(&mut self) {
        if self.owns {
            SHARED_TRANSPOSED.with(|s| *s.borrow_mut() = None);
        }
    }
}

/// Start (or join) a [`SharedFrozen`] scope.
pub fn share_frozen() -> SharedFrozen {
    let owns = SHARED_TRANSPOSED.with(|s| {
        let mut s = s.borrow_mut();
        let fresh = s.is_none();
        if fresh {
            *s = Some(Default::default());
        }
        fresh
    });
    SharedFrozen {
        owns,
        _thread: std::marker::PhantomData,
    }
}

/// `build` inside a [`SharedFrozen`] scope.
pub fn with_shared_frozen<T>(build: impl FnOnce() -> T) -> T {
    let _shared = share_frozen();
    build()
}

/// `weight` transposed (`[in, out]`, contiguous), or the copy already made for the same tensor
/// inside [`with_shared_frozen`].
fn transposed_frozen(weight: &Tensor) -> Result<Tensor> {
    let transposed = crate::kernels::transpose::transposed;
    SHARED_TRANSPOSED.with(|s| {
        let mut s = s.borrow_mut();
        let Some(shared) = s.as_mut() else {
            return transposed(weight);
        };
        if let Some(t) = shared.get(&weight.id()) {
            return Ok(t.clone());
        }
        let t = transposed(weight)?;
        shared.insert(weight.id(), t.clone());
        Ok(t)
    })
}

/// Build a network for bf16 inference on the CPU (`--dtype bf16`): the frozen f32 weights of its
/// linear layers and stride-1 convolutions are rounded to bf16 and packed for the AMX kernels
/// once, replacing the f32 copies (half the memory); activations, norms, attention and the
/// residual stream stay f32, so the network's dtype stays f32.
pub fn with_bf16_weights<T>(build: impl FnOnce() -> T) -> T {
    let before = BF16_WEIGHTS.with(|l| l.replace(true));
    let out = build();
    BF16_WEIGHTS.with(|l| l.set(before));
    out
}

/// `build(storage dtype)` for a network that runs in `dtype` on `device`: on the CPU, bf16 means
/// f32 storage with the weights packed as bf16 ([`with_bf16_weights`]); elsewhere the weights
/// are stored in `dtype` itself.
pub fn build_for<T>(
    device: &candle_core::Device,
    dtype: DType,
    build: impl FnOnce(DType) -> T,
) -> T {
    if device.is_cpu() && dtype == DType::BF16 {
        with_bf16_weights(|| build(DType::F32))
    } else {
        build(dtype)
    }
}

/// Whether a layer being built over `weight` packs it as bf16: a frozen f32 CPU weight under
/// [`with_bf16_weights`].
fn packs_bf16(weight: &Tensor) -> bool {
    BF16_WEIGHTS.with(|l| l.get())
        && !LIVE_WEIGHTS.with(|l| l.get())
        && !weight.track_op()
        && weight.device().is_cpu()
        && weight.dtype() == DType::F32
}

impl Linear {
    fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        // Trainable weights (variables) and weights that change in place keep their layout; so
        // does every other device (their BLAS takes a transposed operand at full speed) and
        // dtype (the kernel is f32).
        let frozen = !weight.track_op() && !LIVE_WEIGHTS.with(|l| l.get());
        let cpu_f32 = weight.device().is_cpu() && weight.dtype() == DType::F32;
        let weights = if packs_bf16(&weight) && weight.rank() == 2 {
            LinearWeights::Bf16(std::sync::Arc::new(crate::kernels::bf16::Bf16Linear::new(
                &weight,
                bias.as_ref(),
            )?))
        } else if frozen && cpu_f32 && weight.rank() == 2 {
            LinearWeights::Transposed(transposed_frozen(&weight)?, bias)
        } else {
            LinearWeights::Candle(candle_nn::Linear::new(weight, bias))
        };
        Ok(Self {
            weights,
            lora: None,
        })
    }

    /// Whether the weight is bf16, packed for the AMX kernels ([`with_bf16_weights`]).
    pub fn is_bf16(&self) -> bool {
        matches!(self.weights, LinearWeights::Bf16(_))
    }

    /// The dtype of the activations this layer takes (f32 for bf16-packed weights).
    pub fn dtype(&self) -> DType {
        match &self.weights {
            LinearWeights::Candle(l) => l.weight().dtype(),
            LinearWeights::Transposed(wt, _) => wt.dtype(),
            LinearWeights::Bf16(_) => DType::F32,
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let out = match &self.weights {
            LinearWeights::Transposed(wt, bias) if xs.dtype() == DType::F32 => {
                crate::kernels::linear::linear(xs, wt, bias.as_ref())?
            }
            LinearWeights::Transposed(wt, bias) => {
                candle_nn::Linear::new(wt.t()?, bias.clone()).forward(xs)?
            }
            LinearWeights::Bf16(l) => l.forward(xs)?,
            // Trainable or live f32 weights on the CPU: the kernel, whose backward sums the bias's
            // gradient row by row (candle's broadcast-add backward walks the strided dimension
            // one element at a time). The transposed view is copied per call (a column-major
            // right-hand side is gemm's slow case), which keeps live weights live and passes the
            // gradient back to `[out, in]`.
            LinearWeights::Candle(l)
                if xs.dtype() == DType::F32
                    && xs.device().is_cpu()
                    && l.weight().dtype() == DType::F32
                    && l.bias().is_none_or(|b| b.dtype() == DType::F32) =>
            {
                crate::kernels::linear::linear(xs, &l.weight().t()?, l.bias())?
            }
            LinearWeights::Candle(l) => l.forward(xs)?,
        };
        match &self.lora {
            None => Ok(out),
            Some((down, up, scale)) => out + (up.forward(&down.forward(xs)?)? * *scale)?,
        }
    }
}

/// 2-D convolution (square kernel, symmetric padding). Stride-1 f32 inference on the CPU takes the
/// im2col-free fast path in [`crate::kernels::conv`]; everything else (training, stride 2, other devices
/// and dtypes) goes through candle's differentiable conv2d.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
    /// The weight and bias as bf16 packed for the AMX kernels (under [`with_bf16_weights`];
    /// `weight` then holds an empty tensor, so the f32 copy is freed).
    bf16: Option<std::sync::Arc<crate::kernels::bf16::Bf16Conv>>,
    /// LoRA branch: down (same kernel, stride, padding as the layer), up (1×1), scale.
    lora: Option<Box<(Conv2d, Conv2d, f64)>>,
}

impl Conv2d {
    fn new(weight: Tensor, bias: Option<Tensor>, padding: usize, stride: usize) -> Result<Self> {
        let (bf16, weight) = if stride == 1 && packs_bf16(&weight) {
            let packed = crate::kernels::bf16::Bf16Conv::new(&weight, bias.as_ref(), padding)?;
            let empty = Tensor::zeros(0, DType::F32, weight.device())?;
            (Some(std::sync::Arc::new(packed)), empty)
        } else {
            (None, weight)
        };
        Ok(Self {
            weight,
            bias,
            padding,
            stride,
            bf16,
            lora: None,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let out = match &self.bf16 {
            Some(packed) => packed.forward(xs)?,
            None => self.forward_plain(xs)?,
        };
        match &self.lora {
            None => Ok(out),
            Some(l) => {
                let (down, up, scale) = l.as_ref();
                out + (up.forward(&down.forward(xs)?)? * *scale)?
            }
        }
    }
}

impl Conv2d {
    /// The f32 (or candle) paths, with the bias.
    fn forward_plain(&self, xs: &Tensor) -> Result<Tensor> {
        let tracked = xs.track_op() || self.weight.track_op();
        let k = self.weight.dim(3)?;
        let cpu_f32 = xs.device().is_cpu() && xs.dtype() == DType::F32;
        let fast = !tracked && self.stride == 1 && k > 1 && cpu_f32;
        // Training: our conv's backward, for stride 1 (candle's for the stride-2 downsamplers).
        let fast_bwd = tracked && self.stride == 1 && cpu_f32 && self.padding < k;
        let (_, c_in, h, w) = xs.dims4()?;
        let c_out = self.weight.dim(0)?;
        let out = if fast_bwd {
            crate::kernels::conv::conv2d_stride1(xs, &self.weight, self.padding)?
        } else if fast && k == 3 && crate::kernels::conv::prefer_winograd(c_in, c_out, h * w) {
            // The kernel transform is recomputed per call (a few ms at these sizes) rather than
            // cached: caching would add 16/9 of the weights' memory.
            let kernel = crate::kernels::conv::WinogradKernel::new(&self.weight)?;
            crate::kernels::conv::conv3x3_winograd(xs, &kernel, self.padding)?
        } else if fast {
            crate::kernels::conv::conv2d_stride1(xs, &self.weight, self.padding)?
        } else {
            xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
        };
        match &self.bias {
            Some(b) if cpu_f32 && b.dtype() == DType::F32 => {
                crate::kernels::conv::add_channel_bias(&out, b)
            }
            Some(b) => out.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(out),
        }
    }
}

/// Softmax over the last dimension: fused kernel for inference, differentiable ops for training.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

/// LayerNorm over the last dimension with an affine weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let tracked = xs.track_op() || self.weight.track_op() || self.bias.track_op();
        if !tracked && xs.is_contiguous() {
            return candle_nn::ops::layer_norm(xs, &self.weight, &self.bias, self.eps as f32);
        }
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if f32_cpu(xs) && f32_cpu(&self.weight) && f32_cpu(&self.bias) {
            // Training on the CPU: one op with its own backward (crate::kernels::norm).
            return crate::kernels::norm::layer_norm(xs, &self.weight, &self.bias, self.eps);
        }
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let lora = lora_pair(&vb)?.map(|(down, up, scale)| {
        (
            candle_nn::Linear::new(down, None),
            candle_nn::Linear::new(up, None),
            scale,
        )
    });
    // candle_nn's constructors, for their initialisation of fresh variables.
    let plain = if bias {
        candle_nn::linear(in_dim, out_dim, vb)?
    } else {
        candle_nn::linear_no_bias(in_dim, out_dim, vb)?
    };
    let mut layer = Linear::new(plain.weight().clone(), plain.bias().cloned())?;
    layer.lora = lora;
    Ok(layer)
}

pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let bound = 1.0 / ((in_c * kernel * kernel) as f64).sqrt();
    let weight = vb.get_with_hints(
        (out_c, in_c, kernel, kernel),
        "weight",
        candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let bias = vb.get_with_hints(
        out_c,
        "bias",
        candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let lora = lora_pair(&vb)?
        .map(|(down, up, scale)| -> Result<_> {
            Ok(Box::new((
                Conv2d::new(down, None, padding, stride)?,
                Conv2d::new(up, None, 0, 1)?,
                scale,
            )))
        })
        .transpose()?;
    let mut conv = Conv2d::new(weight, Some(bias), padding, stride)?;
    conv.lora = lora;
    Ok(conv)
}

/// GroupNorm with an affine weight and bias: the fused op in [`crate::kernels::norm`] for f32 on the CPU
/// (training included), candle-nn's composite elsewhere.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.device().is_cpu() && xs.dtype() == DType::F32 && self.weight.dtype() == DType::F32 {
            crate::kernels::norm::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps)
        } else {
            self.inner.forward(xs)
        }
    }
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!(
            "{}: {channels} channels cannot be split into {groups} norm groups",
            vb.prefix()
        )
    }
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
    let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm {
        inner,
        weight,
        bias,
        groups,
        eps,
    })
}

/// Nearest-neighbour ×2 upsampling by broadcast + reshape: identical output to
/// `upsample_nearest2d`, much faster on CPU and differentiable.
pub fn upsample_nearest_2x(xs: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    xs.unsqueeze(3)?
        .unsqueeze(5)?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, h * 2, w * 2))
}

/// Scaled dot-product attention over `[batch·heads, tokens, head_dim]` tensors, with an optional
/// additive mask broadcastable to `[batch·heads, q_tokens, k_tokens]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    attention_in(false, q, k, v, mask)
}

/// [`attention`]; `bf16` (a network built under [`with_bf16_weights`], see [`Linear::is_bf16`])
/// runs its products on bf16 tiles where it can (CPU f32, no mask).
pub fn attention_in(
    bf16: bool,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    if mask.is_none() && q.device().is_cpu() && q.dtype() == DType::F32 {
        if bf16 && !q.track_op() && !k.track_op() && !v.track_op() {
            return crate::kernels::attention::fused_attention_bf16(q, k, v, scale as f32);
        }
        return crate::kernels::attention::fused_attention(q, k, v, scale as f32);
    }
    // Scaling q (n·d values) is cheaper than scaling the n² scores.
    let scores = (q * scale)?.matmul(&k.t()?)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    softmax_last_dim(&scores)?.matmul(v)
}

/// Split `[b, n, heads·d]` into `[b·heads, n, d]`.
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = xs.dims3()?;
    xs.reshape((b, n, heads, c / heads))?
        .transpose(1, 2)?
        .reshape((b * heads, n, c / heads))?
        .contiguous()
}

/// Inverse of [`split_heads`].
pub fn merge_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (bh, n, d) = xs.dims3()?;
    xs.reshape((bh / heads, heads, n, d))?
        .transpose(1, 2)?
        .reshape((bh / heads, n, heads * d))
}

/// Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' `get_timestep_embedding`:
/// frequencies `exp(-ln(max_period)·k/(half − shift))`, output `[sin | cos]`, or `[cos | sin]` when
/// `flip_sin_to_cos`. `timesteps` is `[b]`; the result is `[b, dim]` in f32.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (-(10000f64.ln()) * k as f64 / (half as f64 - freq_shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// The LCM guidance-scale embedding (`get_guidance_scale_embedding` in diffusers): `w' = 1000·w`,
/// frequencies `exp(−k·ln(10000)/(half − 1))`, output `[sin | cos]`. `w` is `[b]`; returns `[b, dim]`.
pub fn guidance_embedding(w: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (-(10000f64.ln()) * k as f64 / (half as f64 - 1.0)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), w.device())?;
    let args = (w.to_dtype(DType::F32)? * 1000.0)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let emb = Tensor::cat(&[args.sin()?, args.cos()?], 1)?;
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// Whether `x` runs on the project's own f32 CPU kernels.
fn own_kernels(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// GELU (erf form): one vectorised pass on CPU f32, candle's op elsewhere.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if own_kernels(x) {
        crate::kernels::activation::gelu_erf(x)
    } else {
        x.gelu_erf()
    }
}

/// GELU, tanh form (candle's `gelu`): one vectorised pass on CPU f32, candle's op elsewhere.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if own_kernels(x) {
        crate::kernels::activation::gelu_tanh_f32(x)
    } else {
        x.gelu()
    }
}

/// CLIP's quick GELU x·σ(1.702x): one vectorised pass on CPU f32, candle's ops elsewhere.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if own_kernels(x) {
        crate::kernels::activation::quick_gelu_f32(x)
    } else {
        x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
    }
}

/// SiLU: one vectorised pass on CPU f32, candle's op elsewhere.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if own_kernels(x) {
        crate::kernels::activation::silu_f32(x)
    } else {
        x.silu()
    }
}

/// GEGLU's `hidden · gelu(gate)` of `h = [hidden, gate]` (last dimension).
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if own_kernels(h) {
        crate::kernels::activation::geglu(h)
    } else {
        let half = h.dim(candle_core::D::Minus1)? / 2;
        let hidden = h.narrow(candle_core::D::Minus1, 0, half)?;
        let gate = h.narrow(candle_core::D::Minus1, half, half)?;
        hidden * gate.gelu_erf()?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Inside `with_shared_frozen` two layers over one frozen weight hold one transposed copy
    /// (the same storage); outside, each makes its own; the outputs agree either way.
    #[test]
    fn shared_frozen_weights_are_transposed_once() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (3, 5), &dev)?;
        let transposed = |l: &Linear| match &l.weights {
            LinearWeights::Transposed(t, _) => t.clone(),
            other => panic!("a frozen f32 CPU weight is held transposed, not {other:?}"),
        };
        let (a, b) = with_shared_frozen(|| -> Result<_> {
            Ok((Linear::new(w.clone(), None)?, Linear::new(w.clone(), None)?))
        })?;
        assert_eq!(transposed(&a).id(), transposed(&b).id(), "not shared");
        let c = Linear::new(w.clone(), None)?;
        assert_ne!(
            transposed(&a).id(),
            transposed(&c).id(),
            "shared outside the scope"
        );
        // A nested scope joins the outer one and leaves it open when it ends.
        let outer = share_frozen();
        let d = Linear::new(w.clone(), None)?;
        let e = with_shared_frozen(|| Linear::new(w.clone(), None))?;
        let f = Linear::new(w.clone(), None)?;
        drop(outer);
        assert_eq!(
            transposed(&d).id(),
            transposed(&e).id(),
            "nested: not shared"
        );
        assert_eq!(
            transposed(&d).id(),
            transposed(&f).id(),
            "inner scope closed outer"
        );
        let g = Linear::new(w.clone(), None)?;
        assert_ne!(
            transposed(&d).id(),
            transposed(&g).id(),
            "scope outlived its guard"
        );
        let want = x.matmul(&w.t()?)?;
        for l in [&a, &b, &c, &d, &e, &g] {
            assert!(crate::kernels::max_abs_diff(&l.forward(&x)?, &want)? < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn layer_norm_is_differentiable_and_matches_fused_kernel() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, 8, &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, 8, &dev)?)?;
        let ln = LayerNorm {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            eps: 1e-5,
        };
        let slow = ln.forward(&x)?;
        let fused =
            candle_nn::ops::layer_norm(&x, &w.as_tensor().detach(), &b.as_tensor().detach(), 1e-5)?;
        let diff = (slow.clone() - fused)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "slow and fused layer norm differ by {diff}");
        let grads = slow.sqr()?.sum_all()?.backward()?;
        assert!(
            grads.get(w.as_tensor()).is_some(),
            "no gradient for the weight"
        );
        assert!(
            grads.get(b.as_tensor()).is_some(),
            "no gradient for the bias"
        );
        Ok(())
    }

    #[test]
    fn softmax_keeps_the_graph_when_tracking() -> Result<()> {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5), &Device::Cpu)?)?;
        let y = softmax_last_dim(x.as_tensor())?;
        let target = Tensor::new(
            &[[1f32, 0., 0., 0., 0.], [0., 1., 0., 0., 0.]],
            &Device::Cpu,
        )?;
        let grads = (y * target)?.sum_all()?.backward()?;
        let g = grads
            .get(x.as_tensor())
            .expect("softmax dropped the gradient");
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    #[test]
    fn upsample_matches_candle() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &Device::Cpu)?;
        let a = upsample_nearest_2x(&x)?;
        let b = x.upsample_nearest2d(8, 10)?;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }
}
