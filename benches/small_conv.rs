//! 3×3 stride-1 convolutions both ways — shifted GEMMs (`conv2d_stride1`) and Winograd, with and
//! without its per-call kernel transform — at the sizes the layer's choice
//! (`kernels::conv::prefer_winograd`) is decided on. `cargo bench --bench small_conv [CxOxS ...]`
//! (c_in x c_out x side; default: the shipped tiny models' and SD1.5's sizes).

use std::time::Instant;

use candle_core::{Device, Tensor};
use lcm::kernels::conv::{conv2d_stride1, conv3x3_winograd, WinogradKernel};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn time<F: FnMut() -> candle_core::Result<Tensor>>(name: &str, reps: usize, mut f: F) {
    for _ in 0..2 {
        f().unwrap();
    }
    let t = Instant::now();
    for _ in 0..reps {
        f().unwrap();
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    println!("{name:<40} {ms:>9.3} ms");
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut sizes: Vec<(usize, usize, usize)> = std::env::args()
        .skip(1)
        .filter_map(|a| {
            let v: Vec<usize> = a.split('x').filter_map(|t| t.parse().ok()).collect();
            (v.len() == 3).then(|| (v[0], v[1], v[2]))
        })
        .collect();
    if sizes.is_empty() {
        sizes = vec![
            (32, 32, 64),
            (64, 64, 32),
            (64, 64, 16),
            (96, 96, 16),
            (192, 192, 64),
            (256, 256, 64),
            (320, 320, 64),
            (320, 320, 32),
            (640, 640, 32),
            (1280, 1280, 16),
        ];
    }
    for (ci, co, s) in sizes {
        let flops = 2.0 * (ci * co * 9 * s * s) as f64;
        let reps = ((4e9 / flops) as usize).clamp(3, 300);
        let x = Tensor::randn(0f32, 1.0, (1, ci, s, s), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (co, ci, 3, 3), &dev)?;
        time(&format!("shifted {ci}->{co} @{s}"), reps, || {
            conv2d_stride1(&x, &w, 1)
        });
        time(&format!("winograd+transform {ci}->{co} @{s}"), reps, || {
            conv3x3_winograd(&x, &WinogradKernel::new(&w)?, 1)
        });
        let k = WinogradKernel::new(&w)?;
        time(&format!("winograd {ci}->{co} @{s}"), reps, || {
            conv3x3_winograd(&x, &k, 1)
        });
    }
    Ok(())
}
