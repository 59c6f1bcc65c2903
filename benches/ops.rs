//! Micro-benchmark of the operations an SD1.5 U-Net step spends its time in, at the first level's
//! size (64×64 latent, 320 channels, 4096 tokens). `cargo bench --bench ops`; compare with
//! scripts/bench_ops_torch.py on the same machine.

use std::time::Instant;

use candle_core::{Device, Module, Tensor, D};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn time<F: FnMut() -> candle_core::Result<Tensor>>(name: &str, mut f: F) {
    f().unwrap();
    // At least 3 calls and 0.3 s, so sub-millisecond ops are timed over many calls.
    let t = Instant::now();
    let mut reps = 0;
    while reps < 3 || t.elapsed().as_secs_f64() < 0.3 {
        f().unwrap();
        reps += 1;
    }
    println!(
        "{name:<40} {:>9.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
}

fn main() -> candle_core::Result<()> {
    lcm::runtime::init_threads();
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

    // CLIP-L at batch 1 (77 tokens, width 768, 12 heads of 64): small ops where per-call
    // overhead counts.
    let h = Tensor::randn(0f32, 1.0, (1, 77, 768), &dev)?;
    let w768 = Tensor::randn(0f32, 0.02, (768, 768), &dev)?;
    let w3072 = Tensor::randn(0f32, 0.02, (3072, 768), &dev)?;
    let w3072t = Tensor::randn(0f32, 0.02, (768, 3072), &dev)?;
    let h3072 = Tensor::randn(0f32, 1.0, (1, 77, 3072), &dev)?;
    let nn_linear = |w: &Tensor| {
        let (out, inp) = w.dims2()?;
        let map = std::collections::HashMap::from([("weight".to_string(), w.clone())]);
        let vb = candle_nn::VarBuilder::from_tensors(map, candle_core::DType::F32, &dev);
        lcm::nn::linear(inp, out, false, vb)
    };
    let (l768, l3072, l3072t) = (nn_linear(&w768)?, nn_linear(&w3072)?, nn_linear(&w3072t)?);
    time("linear 77x768 -> 768", || h.broadcast_matmul(&w768.t()?));
    time("  lcm::nn::Linear", || l768.forward(&h));
    time("linear 77x768 -> 3072", || h.broadcast_matmul(&w3072.t()?));
    time("  lcm::nn::Linear", || l3072.forward(&h));
    time("linear 77x3072 -> 768", || {
        h3072.broadcast_matmul(&w3072t.t()?)
    });
    time("  lcm::nn::Linear", || l3072t.forward(&h3072));
    let lnw = Tensor::ones(768, candle_core::DType::F32, &dev)?;
    let lnb = Tensor::zeros(768, candle_core::DType::F32, &dev)?;
    time("layer_norm 77x768", || {
        candle_nn::ops::layer_norm(&h, &lnw, &lnb, 1e-5)
    });
    time("quick_gelu 77x3072", || {
        h3072.clone() * candle_nn::ops::sigmoid(&(&h3072 * 1.702)?)?
    });
    time("  lcm::nn::quick_gelu", || lcm::nn::quick_gelu(&h3072));
    time("add 77x768", || &h + &h);
    let qh = Tensor::randn(0f32, 1.0, (12, 77, 64), &dev)?;
    let causal: Vec<f32> = (0..77 * 77)
        .map(|i| {
            if i % 77 > i / 77 {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let causal = Tensor::from_vec(causal, (77, 77), &dev)?;
    time("causal attention 12x77x64 (lcm::nn)", || {
        lcm::nn::attention(&qh, &qh, &qh, Some(&causal))
    });
    time("attention 12x77x64 (lcm::nn)", || {
        lcm::nn::attention(&qh, &qh, &qh, None)
    });
    Ok(())
}
