//! How far apart a VAE puts the shapes data's colours in the U-Net's latent space: the figures
//! behind docs/training-log.md's "latent geometry" (why green-on-purple shapes drown in noise first).
//!
//!   cargo run --release --example latent_contrast -- VAE_DIR [IMAGES]
//!
//! Prints the eigenvalues of the latents' channel covariance over IMAGES (default 1024) freshly
//! rendered shapes, then every colour pair's distance between the latents of two solid images
//! (the per-pixel channel means, after `scaling_factor`), closest first, beside the RGB distance.
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use lcm::data::toy::COLORS;
use lcm::tools::whiten::{channel_covariance, encode_scaled, symmetric_eigen};
use rand::SeedableRng;

fn main() -> Result<()> {
    lcm::runtime::init_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::path::PathBuf::from(
        args.first()
            .context("usage: latent_contrast VAE_DIR [IMAGES]")?,
    );
    let n: usize = args
        .get(1)
        .map_or(Ok(1024), |s| s.parse().context("IMAGES"))?;
    let dev = Device::Cpu;
    let (vae, _) = lcm::train::start::frozen_vae(&dir, 64, &dev)?;

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let shapes = (0..n)
        .map(|_| {
            let a = lcm::data::toy::random_attrs(&mut rng);
            lcm::data::image_tensor(lcm::data::toy::render(&a, 64, &mut rng), "shape", 64, &dev)
        })
        .collect::<Result<Vec<_>>>()?;
    let cov = channel_covariance(&encode_scaled(&vae, &Tensor::stack(&shapes, 0)?)?)?;
    let (mut lambda, _) = symmetric_eigen(&cov);
    lambda.sort_by(|a, b| b.total_cmp(a));
    println!("latent channel covariance over {n} shapes, eigenvalues: {lambda:.4?}");

    let solids = COLORS
        .iter()
        .map(|(name, rgb)| {
            let img = image::RgbImage::from_pixel(64, 64, image::Rgb(*rgb));
            lcm::data::image_tensor(img, name, 64, &dev)
        })
        .collect::<Result<Vec<_>>>()?;
    let means: Vec<Vec<f32>> = encode_scaled(&vae, &Tensor::stack(&solids, 0)?)?
        .mean((2, 3))?
        .to_vec2()?;
    let mut pairs = Vec::new();
    for i in 0..COLORS.len() {
        for j in i + 1..COLORS.len() {
            let d = |a: &[f32], b: &[f32]| -> f32 {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).powi(2))
                    .sum::<f32>()
                    .sqrt()
            };
            let rgb = |c: [u8; 3]| c.map(|v| v as f32 / 255.0);
            let latent = d(&means[i], &means[j]);
            let colour = d(&rgb(COLORS[i].1), &rgb(COLORS[j].1));
            pairs.push((latent, colour, COLORS[i].0, COLORS[j].0));
        }
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (latent, colour, a, b) in pairs {
        println!("{a:>7} / {b:<7} latent {latent:.2}   rgb {colour:.2}");
    }
    Ok(())
}
