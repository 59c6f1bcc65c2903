//! The bf16 products of `--dtype bf16` on the CPU (`lcm::kernels::amx`): GFLOP/s of the bare
//! product and of whole layers (with their conversions) at SD1.5's shapes, beside the f32
//! shifted-GEMM convolution. `cargo bench --bench amx`; prints which path ran.

use std::time::Instant;

use candle_core::{Device, Tensor};
use lcm::kernels::amx::{self, PackedA, PackedB};
use lcm::kernels::bf16::Bf16Conv;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Seconds per call: at least 3 calls and 0.5 s.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    let mut reps = 0;
    while reps < 3 || t.elapsed().as_secs_f64() < 0.5 {
        f();
        reps += 1;
    }
    t.elapsed().as_secs_f64() / reps as f64
}

fn main() -> candle_core::Result<()> {
    lcm::runtime::init_threads();
    println!(
        "path: {}; {} threads",
        lcm::kernels::cpu::path(candle_core::DType::BF16),
        rayon::current_num_threads()
    );
    for (m, k, n) in [
        (1024, 1024, 1024),
        (4096, 320, 320),
        (4096, 320, 2560),
        (77, 768, 3072),
    ] {
        let mut a = PackedA::new();
        a.reset(m, k, 0)
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = amx::to_bf16((i % 7) as f32 * 0.1));
        let b = PackedB::pack(1, k, n, |_, r, c| ((r + c) % 5) as f32 * 0.1);
        let mut c = Vec::new();
        let s = time(|| amx::matmul(&a, &[0], &b, &mut c));
        println!(
            "matmul {m}x{k}x{n:<24} {:>8.3} ms {:>7.0} GFLOP/s",
            s * 1e3,
            2.0 * (m * k * n) as f64 / s / 1e9
        );
    }
    let dev = Device::Cpu;
    for (c_in, c_out, hw, k) in [
        (320, 320, 64, 3),
        (640, 640, 32, 3),
        (1280, 1280, 16, 3),
        (2560, 1280, 8, 3),
        (320, 320, 64, 1),
        (512, 512, 64, 3),
        (128, 128, 512, 3),
    ] {
        let x = Tensor::randn(0f32, 1.0, (1, c_in, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (c_out, c_in, k, k), &dev)?;
        let p = k / 2;
        let conv = Bf16Conv::new(&w, None, p)?;
        let flop = 2.0 * (c_in * c_out * k * k * hw * hw) as f64;
        let bf = time(|| {
            conv.forward(&x).unwrap();
        });
        let f32s = if k > 1 {
            time(|| {
                lcm::kernels::conv::conv2d_stride1(&x, &w, p).unwrap();
            })
        } else {
            f64::NAN
        };
        println!(
            "conv {k}x{k} {c_in}->{c_out} @{hw}x{hw:<14} bf16 {:>8.2} ms {:>6.0} GFLOP/s | f32 shifted-gemm {:>8.2} ms",
            bf * 1e3,
            flop / bf / 1e9,
            f32s * 1e3
        );
    }
    for (nq, nk) in [(4096, 4096), (1024, 1024), (4096, 77)] {
        let q = Tensor::randn(0f32, 1.0, (8, nq, 40), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (8, nk, 40), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (8, nk, 40), &dev)?;
        let scale = 1.0 / 40f32.sqrt();
        let bf = time(|| {
            lcm::kernels::attention::fused_attention_bf16(&q, &k, &v, scale).unwrap();
        });
        let f = time(|| {
            lcm::kernels::attention::fused_attention(&q, &k, &v, scale).unwrap();
        });
        println!(
            "attention 8 heads x {nq} x {nk} x 40         bf16 {:>8.2} ms | f32 fused {:>8.2} ms",
            bf * 1e3,
            f * 1e3
        );
    }
    Ok(())
}
