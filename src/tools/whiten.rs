//! Latent whitening (`lcm whiten`): a linear map of the VAE's latent channels, folded into its
//! `quant_conv` and `post_quant_conv`, that gives the U-Net's latents identity channel covariance.
//!
//! Why: diffusion adds the same noise to every latent direction, so a difference the VAE encodes
//! along a low-variance direction drowns early. The project's tiny VAE puts green and purple
//! 0.93 apart where other colour pairs are 3–5 apart (docs/training-log.md), and the models draw
//! shapes in green on purple badly. SD's single `scaling_factor` evens out the overall scale
//! only; whitening evens out every direction. The folded VAE is a plain AutoencoderKL with
//! `scaling_factor` 1 and no shift, so diffusers loads it unchanged; its decoder reproduces the
//! original's images from the original's (mapped) latents exactly.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

use crate::model::vae::AutoencoderKL;

/// A small dense matrix, row-major.
pub type Mat = Vec<Vec<f64>>;

/// Eigenvalues and eigenvectors (columns of the returned matrix) of a symmetric matrix
/// (nalgebra's symmetric eigen-solver; the input is symmetrised first).
pub fn symmetric_eigen(a: &Mat) -> (Vec<f64>, Mat) {
    let n = a.len();
    let m = nalgebra::DMatrix::from_fn(n, n, |i, j| 0.5 * (a[i][j] + a[j][i]));
    let e = nalgebra::SymmetricEigen::new(m);
    let v = (0..n)
        .map(|i| (0..n).map(|k| e.eigenvectors[(i, k)]).collect())
        .collect();
    (e.eigenvalues.iter().copied().collect(), v)
}

/// The symmetric (ZCA) whitening of a covariance, with a ridge: `(W, W⁻¹)`, `W = g·(C + r·c̄·I)^(−½)`
/// where c̄ is the mean channel variance and g makes the whitened latents' total variance the
/// channel count (as `scaling_factor` makes it for SD). With r = 0, `W·C·Wᵀ = I`. The ridge
/// stops the weakest directions — here little more than the posterior's own noise — from being
/// blown up to unit variance. ZCA rather than PCA keeps each channel as close to its old
/// meaning as a whitening can.
pub fn zca(cov: &Mat, ridge: f64) -> Result<(Mat, Mat)> {
    let n = cov.len();
    let mean_var = (0..n).map(|i| cov[i][i]).sum::<f64>() / n as f64;
    let (lambda, v) = symmetric_eigen(cov);
    let top = lambda.iter().cloned().fold(0.0f64, f64::max);
    if let Some(l) = lambda.iter().find(|&&l| l <= top * 1e-8) {
        bail!("the latent channel covariance is singular (eigenvalue {l:e}): a latent channel carries nothing to whiten")
    }
    let shifted: Vec<f64> = lambda.iter().map(|l| l + ridge * mean_var).collect();
    // Total variance of the whitened latents before rescaling: Σ λ_k / (λ_k + r·c̄).
    let total: f64 = lambda.iter().zip(&shifted).map(|(l, s)| l / s).sum();
    let g = (n as f64 / total).sqrt();
    let build = |f: &dyn Fn(f64) -> f64| -> Mat {
        (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| (0..n).map(|k| v[i][k] * f(shifted[k]) * v[j][k]).sum())
                    .collect()
            })
            .collect()
    };
    Ok((build(&|l| g / l.sqrt()), build(&|l| l.sqrt() / g)))
}

/// Channel covariance of `[b, c, h, w]` latents, every pixel a sample.
pub fn channel_covariance(latents: &Tensor) -> Result<Mat> {
    let c = latents.dim(1)?;
    let x = latents
        .to_dtype(DType::F64)?
        .permute((0, 2, 3, 1))?
        .reshape(((), c))?;
    let n = x.dim(0)?;
    if n < 2 {
        bail!("need at least two latent pixels for a covariance")
    }
    let x = x.broadcast_sub(&x.mean_keepdim(0)?)?;
    Ok((x.t()?.matmul(&x)? / (n as f64 - 1.0))?.to_vec2::<f64>()?)
}

fn to_tensor(m: &Mat, device: &Device) -> Result<Tensor> {
    let n = m.len();
    let flat: Vec<f32> = m.iter().flatten().map(|&v| v as f32).collect();
    Ok(Tensor::from_vec(flat, (n, n), device)?)
}

/// Every float tensor in f32: the folded weights are written in f32 whatever they were read in
/// (an f16 round trip would blur the exact fold), `lcm convert` makes the shipping copy.
fn all_f32(weights: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    weights
        .iter()
        .map(|(k, t)| {
            let t = if t.dtype().is_float() {
                t.to_dtype(DType::F32)?
            } else {
                t.clone()
            };
            Ok((k.clone(), t))
        })
        .collect()
}

fn get<'a>(w: &'a HashMap<String, Tensor>, name: &str, what: &str) -> Result<&'a Tensor> {
    w.get(name)
        .with_context(|| format!("{what} has no tensor {name}"))
}

/// The VAE's weights with `z' = M·(z − shift)` folded in, `M = scaling_factor·W`: the encoder's
/// posterior mean comes out whitened, the decoder takes whitened latents. The posterior's
/// log-variance can only be mapped approximately by a 1×1 convolution (the exact covariance
/// M·diag(σ²)·Mᵀ is neither diagonal nor linear in log σ²): channel i gets the M²-weighted mean
/// of the old log-variances plus log Σ_j M²_ij, exact when the σ_j are equal. The project trains
/// on posterior samples whose σ is ~0.05 of the latent spread, so this is immaterial there.
pub fn fold_into_vae(
    weights: &HashMap<String, Tensor>,
    w: &Mat,
    w_inv: &Mat,
    scaling_factor: f64,
    shift: f64,
) -> Result<HashMap<String, Tensor>> {
    let l = w.len();
    let qw = get(weights, "quant_conv.weight", "the VAE")?;
    let dev = qw.device().clone();
    let qw = qw.to_dtype(DType::F32)?;
    let qb = get(weights, "quant_conv.bias", "the VAE")?.to_dtype(DType::F32)?;
    let pw = get(weights, "post_quant_conv.weight", "the VAE")?.to_dtype(DType::F32)?;
    let pb = get(weights, "post_quant_conv.bias", "the VAE")?.to_dtype(DType::F32)?;
    if qw.dims() != [2 * l, 2 * l, 1, 1] || pw.dims() != [l, l, 1, 1] {
        bail!(
            "the VAE's quant_conv {:?} / post_quant_conv {:?} do not match {l} latent channels",
            qw.dims(),
            pw.dims()
        )
    }
    let m: Mat = w
        .iter()
        .map(|r| r.iter().map(|v| v * scaling_factor).collect())
        .collect();
    let mt = to_tensor(&m, &dev)?;
    // Encoder: mean rows → M·(mean − shift).
    let q2 = qw.reshape((2 * l, 2 * l))?;
    let mean_w = mt.matmul(&q2.narrow(0, 0, l)?)?;
    let shift_col = (Tensor::ones((l, 1), DType::F32, &dev)? * shift)?;
    let mean_b = mt.matmul(&(qb.narrow(0, 0, l)?.unsqueeze(1)? - &shift_col)?)?;
    // Log-variance rows: M²-weighted mean of the old ones + log Σ_j M²_ij.
    let m2: Mat = m
        .iter()
        .map(|r| r.iter().map(|v| v * v).collect())
        .collect();
    let row_sums: Vec<f64> = m2.iter().map(|r| r.iter().sum()).collect();
    let a: Mat = m2
        .iter()
        .zip(&row_sums)
        .map(|(r, s)| r.iter().map(|v| v / s).collect())
        .collect();
    let at = to_tensor(&a, &dev)?;
    let lv_w = at.matmul(&q2.narrow(0, l, l)?)?;
    let log_sums: Vec<f32> = row_sums.iter().map(|s| s.ln() as f32).collect();
    let lv_b = (at.matmul(&qb.narrow(0, l, l)?.unsqueeze(1)?)?
        + Tensor::from_vec(log_sums, (l, 1), &dev)?)?;
    let new_qw = Tensor::cat(&[mean_w, lv_w], 0)?.reshape((2 * l, 2 * l, 1, 1))?;
    let new_qb = Tensor::cat(&[mean_b, lv_b], 0)?.flatten_all()?;
    // Decoder: post_quant_conv(z) with z = W⁻¹·z'/s + shift.
    let back: Mat = w_inv
        .iter()
        .map(|r| r.iter().map(|v| v / scaling_factor).collect())
        .collect();
    let p2 = pw.reshape((l, l))?;
    let new_pw = p2.matmul(&to_tensor(&back, &dev)?)?.reshape((l, l, 1, 1))?;
    let new_pb = (&pb + p2.matmul(&shift_col)?.flatten_all()?)?;
    let mut out = all_f32(weights)?;
    for (k, t) in [
        ("quant_conv.weight", new_qw),
        ("quant_conv.bias", new_qb),
        ("post_quant_conv.weight", new_pw),
        ("post_quant_conv.bias", new_pb),
    ] {
        out.insert(k.to_string(), t);
    }
    Ok(out)
}

/// A U-Net trained on the old latents, rewired for whitened ones as a starting point for
/// fine-tuning: `conv_in` reads `W⁻¹·x'` (clean latents give the old features exactly) and
/// `conv_out` writes `W·ε`. The noise is isotropic in the new space, so the U-Net still has to
/// adapt; this only spares it relearning the colour mapping.
pub fn rewire_unet(
    weights: &HashMap<String, Tensor>,
    w: &Mat,
    w_inv: &Mat,
) -> Result<HashMap<String, Tensor>> {
    let l = w.len();
    let ci = get(weights, "conv_in.weight", "the U-Net")?;
    let co = get(weights, "conv_out.weight", "the U-Net")?;
    let cb = get(weights, "conv_out.bias", "the U-Net")?;
    if ci.dim(1)? != l || co.dim(0)? != l {
        bail!(
            "the U-Net's conv_in {:?} / conv_out {:?} do not match {l} latent channels",
            ci.dims(),
            co.dims()
        )
    }
    let dev = ci.device().clone();
    // conv_in: new[:, j] = Σ_i old[:, i]·W⁻¹_ij.
    let new_ci = ci
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .broadcast_matmul(&to_tensor(w_inv, &dev)?)?
        .permute((0, 3, 1, 2))?
        .contiguous()?;
    // conv_out: new[i] = Σ_j W_ij·old[j].
    let dims = co.dims().to_vec();
    let wt = to_tensor(w, &dev)?;
    let new_co = wt
        .matmul(&co.to_dtype(DType::F32)?.reshape((l, ()))?)?
        .reshape(dims)?;
    let new_cb = wt
        .matmul(&cb.to_dtype(DType::F32)?.unsqueeze(1)?)?
        .squeeze(D::Minus1)?;
    let mut out = all_f32(weights)?;
    for (k, t) in [
        ("conv_in.weight", new_ci),
        ("conv_out.weight", new_co),
        ("conv_out.bias", new_cb),
    ] {
        out.insert(k.to_string(), t);
    }
    Ok(out)
}

/// U-Net-space latents (posterior means × scaling_factor, shift removed) of `images`.
pub fn encode_scaled(vae: &AutoencoderKL, images: &Tensor) -> Result<Tensor> {
    let mut out = Vec::new();
    for start in (0..images.dim(0)?).step_by(32) {
        let x = images.narrow(0, start, 32.min(images.dim(0)? - start))?;
        out.push(vae.scale(&vae.encode(&x)?.mean)?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// `lcm whiten`.
#[derive(clap::Args, Debug, Clone)]
pub struct WhitenArgs {
    /// The VAE folder (diffusers layout: config.json + weights).
    #[arg(long)]
    pub vae: PathBuf,
    /// Imagefolder datasets whose latents define the covariance (--samples images at an even
    /// stride over all of them; list a dataset twice to weight it as training does).
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Where the whitened VAE goes.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 1024)]
    pub samples: usize,
    #[arg(long, default_value_t = 64)]
    pub resolution: usize,
    /// Ridge added to the covariance's eigenvalues, as a fraction of the mean channel variance
    /// (0 = full whitening).
    #[arg(long, default_value_t = 0.01)]
    pub ridge: f64,
    /// A U-Net folder trained on the old latents, rewired for the new ones (`--unet-output`).
    #[arg(long, requires = "unet_output")]
    pub unet: Option<PathBuf>,
    #[arg(long, requires = "unet")]
    pub unet_output: Option<PathBuf>,
}

pub fn run(args: &WhitenArgs) -> Result<()> {
    let device = Device::Cpu;
    let (vae, folder) = crate::train::start::frozen_vae(&args.vae, args.resolution, &device)?;
    let cfg = &folder.config;
    if !(cfg.use_quant_conv && cfg.use_post_quant_conv) {
        bail!(
            "--vae {}: whitening is folded into quant_conv and post_quant_conv, which this VAE does not use",
            args.vae.display()
        )
    }
    if args.samples < 2 {
        bail!("--samples must be at least 2")
    }
    let mut examples = Vec::new();
    for d in &args.data {
        examples.extend(crate::data::scan(d)?);
    }
    // An even stride over all datasets keeps their proportions (as training sees them).
    let stride = examples.len().div_ceil(args.samples).max(1);
    let examples: Vec<_> = examples.into_iter().step_by(stride).collect();
    let (loaded, report) = crate::data::load_all(&examples, args.resolution, &device);
    if loaded.len() < 2 {
        bail!(
            "--data: only {} readable images ({} skipped)",
            loaded.len(),
            report.skipped.len()
        )
    }
    let images = Tensor::stack(
        &loaded.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
        0,
    )?;
    let latents = encode_scaled(&vae, &images)?;
    let cov = channel_covariance(&latents)?;
    if !(args.ridge.is_finite() && args.ridge >= 0.0) {
        bail!("--ridge must be a finite number ≥ 0, got {}", args.ridge)
    }
    let (w, w_inv) = zca(&cov, args.ridge)?;
    let (lambda, _) = symmetric_eigen(&cov);
    eprintln!(
        "{} images; latent channel covariance eigenvalues {:?}",
        loaded.len(),
        lambda.iter().map(|l| format!("{l:.4}")).collect::<Vec<_>>()
    );
    let weights = crate::model::folder::load_component(&args.vae, &device)?;
    let folded = fold_into_vae(
        &weights,
        &w,
        &w_inv,
        cfg.scaling_factor,
        cfg.shift_factor.unwrap_or(0.0),
    )?;
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("--output: cannot create {}", args.output.display()))?;
    let mut json: serde_json::Value =
        crate::model::config::read_json(&args.vae.join("config.json"))?;
    json["scaling_factor"] = 1.0.into();
    json["shift_factor"] = serde_json::Value::Null;
    crate::files::write_atomic(
        &args.output.join("config.json"),
        &serde_json::to_vec_pretty(&json)?,
    )?;
    crate::files::save_safetensors(
        &folded,
        &args.output.join("diffusion_pytorch_model.safetensors"),
    )?;
    eprintln!("wrote {}", args.output.display());
    if let (Some(unet), Some(out)) = (&args.unet, &args.unet_output) {
        let rewired = rewire_unet(
            &crate::model::folder::load_component(unet, &device)?,
            &w,
            &w_inv,
        )?;
        std::fs::create_dir_all(out)
            .with_context(|| format!("--unet-output: cannot create {}", out.display()))?;
        let config = std::fs::read(unet.join("config.json")).with_context(|| {
            format!("--unet: cannot read {}", unet.join("config.json").display())
        })?;
        crate::files::write_atomic(&out.join("config.json"), &config)?;
        crate::files::save_safetensors(&rewired, &out.join("diffusion_pytorch_model.safetensors"))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
