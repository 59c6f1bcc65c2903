//! Micro-benchmark of the operations an SD1.5 U-Net step spends its time in, at the first level's
//! size (64×64 latent, 320 channels, 4096 tokens). `cargo bench --bench ops`; compare with
//! scripts/bench_ops_torch.py on the same machine.

use std::time::Instant;

use candle_core::{Device, Module, Tensor, D};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn time<F: FnMut() -> candle_core::Result<Tensor>>(name: &str, mut f: F) {
    f().unwrap();
    let reps = 3;
    let t = Instant::now();
    for _ in 0..reps {
        f().unwrap();
    }
    println!(
        "{name:<40} {:>9.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 320, 64, 64), &dev)?;
    let w3 = Tensor::randn(0f32, 0.02, (320, 320, 3, 3), &dev)?;
    let w1 = Tensor::randn(0f32, 0.02, (320, 320, 1, 1), &dev)?;
    time("conv3x3 320->320 @64x64", || x.conv2d(&w3, 1, 1, 1, 1));
    time("conv3x3 shifted-gemm (lcm::kernels::conv)", || {
        lcm::kernels::conv::conv2d_stride1(&x, &w3, 1)
    });
    let wk = lcm::kernels::conv::WinogradKernel::new(&w3)?;
    time("conv3x3 winograd (lcm::kernels::conv)", || {
        lcm::kernels::conv::conv3x3_winograd(&x, &wk, 1)
    });
    let xv = Tensor::randn(0f32, 1.0, (1, 128, 512, 512), &dev)?;
    let wv = Tensor::randn(0f32, 0.02, (128, 128, 3, 3), &dev)?;
    time("conv3x3 128->128 @512x512 shifted-gemm", || {
        lcm::kernels::conv::conv2d_stride1(&xv, &wv, 1)
    });
    let wvk = lcm::kernels::conv::WinogradKernel::new(&wv)?;
    time("conv3x3 128->128 @512x512 winograd", || {
        lcm::kernels::conv::conv3x3_winograd(&xv, &wvk, 1)
    });
    time("conv1x1 320->320 @64x64", || x.conv2d(&w1, 0, 1, 1, 1));
    let gn = candle_nn::GroupNorm::new(
        Tensor::ones(320, candle_core::DType::F32, &dev)?,
        Tensor::zeros(320, candle_core::DType::F32, &dev)?,
        320,
        32,
        1e-5,
    )?;
    time("group_norm 32 @320x64x64", || gn.forward(&x));
    time("silu @320x64x64", || x.silu());
    let tok = Tensor::randn(0f32, 1.0, (1, 4096, 320), &dev)?;
    let wl = Tensor::randn(0f32, 0.02, (320, 320), &dev)?;
    time("linear 4096x320 -> 320", || tok.broadcast_matmul(&wl.t()?));
    let wg = Tensor::randn(0f32, 0.02, (2560, 320), &dev)?;
    time("linear 4096x320 -> 2560 (geglu proj)", || {
        tok.broadcast_matmul(&wg.t()?)
    });
    let big = Tensor::randn(0f32, 1.0, (1, 4096, 1280), &dev)?;
    time("gelu_erf 4096x1280", || big.gelu_erf());
    let lnw = Tensor::ones(320, candle_core::DType::F32, &dev)?;
    let lnb = Tensor::zeros(320, candle_core::DType::F32, &dev)?;
    time("layer_norm 4096x320", || {
        candle_nn::ops::layer_norm(&tok, &lnw, &lnb, 1e-5)
    });
    let q = Tensor::randn(0f32, 1.0, (8, 4096, 40), &dev)?;
    time("attn scores q@k^T 8x4096x4096", || q.matmul(&q.t()?));
    let s = q.matmul(&q.t()?)?;
    time("softmax_last_dim 8x4096x4096", || {
        candle_nn::ops::softmax_last_dim(&s)
    });
    time("scale scores", || s.affine(0.15, 0.0));
    time("probs@v", || s.matmul(&q));
    time("fused attention (lcm::kernels::attention)", || {
        lcm::kernels::attention::fused_attention(&q, &q, &q, 0.158)
    });
    time("permute+contiguous 64x64x320", || {
        x.permute((0, 2, 3, 1))?.contiguous()
    });
    time("max over last dim (ref)", || s.max_keepdim(D::Minus1));
    Ok(())
}
