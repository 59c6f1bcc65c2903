//! `lcm pretrain vae`: an AutoencoderKL trained on the images alone (L1 reconstruction + a small
//! KL), exported as a diffusers `vae/` folder with a measured `scaling_factor`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::args::{StageSettings, TrainArgs, PRETRAIN};
use super::run::{Run, Task};
use super::start::{check_resolution, take_trained};
use super::state::{Metrics, TrainState};
use crate::data::random_rows;
use crate::model::config::VaeConfig;
use crate::model::folder::load_component;
use crate::model::vae::AutoencoderKL;
use crate::sample::noise::{NoiseSource, SeededNoise};

/// `lcm pretrain vae`.
#[derive(clap::Args, Debug, Clone)]
pub struct VaeArgs {
    /// The VAE's config.json (sizes come from it).
    #[arg(long)]
    pub config: PathBuf,
    /// Weight of the KL term (per latent element, against the per-pixel L1 loss).
    #[arg(long, default_value_t = 1e-5)]
    pub kl_weight: f64,
    /// Start from a trained VAE folder's weights (fresh optimizer) instead of a seeded init.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Train the decoder (and post_quant_conv) alone, with --init's encoder frozen: the latents,
    /// and so every U-Net trained on them, stay valid while the reconstructions sharpen. Keeps
    /// --init's scaling_factor.
    #[arg(long, requires = "init")]
    pub decoder_only: bool,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct VaeSettings {
    kl_weight: f64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    decoder_only: bool,
    #[serde(flatten)]
    stage: StageSettings,
}

/// One VAE training step's loss: L1 reconstruction + kl_weight · KL(q(z|x) ‖ N(0, I)), both per
/// element means. `decoder_only`: the latent sample is detached, so no gradient reaches the
/// encoder (nor its backward pass runs), and the loss is the reconstruction alone (the KL is
/// still reported). Returns (loss, L1, KL).
pub fn vae_loss(
    vae: &AutoencoderKL,
    images: &Tensor,
    noise: &Tensor,
    kl_weight: f64,
    decoder_only: bool,
) -> Result<(Tensor, f64, f64)> {
    let post = vae.encode(images)?;
    let mut z = post.sample_with(noise)?;
    if decoder_only {
        z = z.detach();
    }
    let recon = vae.decode(&z)?;
    let rec = (recon - images)?.abs()?.mean_all()?;
    let kl = ((post.mean.sqr()? + post.logvar.exp()?)? - 1.0)?
        .sub(&post.logvar)?
        .mean_all()?
        .affine(0.5, 0.0)?;
    let loss = if decoder_only {
        rec.clone()
    } else {
        (&rec + (&kl * kl_weight)?)?
    };
    let (r, k) = (
        rec.to_scalar::<f32>()? as f64,
        kl.to_scalar::<f32>()? as f64,
    );
    Ok((loss, r, k))
}

struct VaeTask<'a> {
    args: &'a VaeArgs,
    settings: VaeSettings,
    vae: AutoencoderKL,
    images: Tensor,
    /// Latent shape of one batch.
    latent_shape: (usize, usize, usize, usize),
    /// `--decoder-only`: the scaling factor of --init, kept.
    kept_scaling: Option<f64>,
}

impl Task for VaeTask<'_> {
    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise")
    }

    fn loss(&self, rng: &mut ChaCha8Rng) -> Result<(Tensor, Metrics)> {
        let (n, b) = (self.images.dim(0)?, self.settings.stage.batch_size);
        let dev = self.images.device();
        let batch = self.images.index_select(&random_rows(rng, n, b, dev)?, 0)?;
        let noise = SeededNoise::new(rng.random()).sample(&self.latent_shape.into(), dev)?;
        let a = self.args;
        let (loss, l1, kl) = vae_loss(&self.vae, &batch, &noise, a.kl_weight, a.decoder_only)?;
        let mut m = Metrics::new();
        m.insert("l1".into(), l1.into());
        m.insert("kl".into(), kl.into());
        Ok((loss, m))
    }

    /// Originals (top row) over reconstructions (bottom row) of the first eight images.
    fn sample(&mut self, _state: &TrainState, path: &Path) -> Result<()> {
        let x = self.images.narrow(0, 0, self.images.dim(0)?.min(8))?;
        let recon = self.vae.decode(&self.vae.encode(&x)?.mean)?.detach();
        let both = Tensor::cat(&[x.clone(), recon], 0)?;
        let io = crate::pipeline::image_io::to_unit_nhwc(&both)?;
        let grid =
            crate::pipeline::image_io::grid(&crate::pipeline::image_io::to_rgb8(&io)?, x.dim(0)?)?;
        crate::pipeline::image_io::save_png(&grid, path)
    }

    fn export(&mut self, state: &TrainState, run_dir: &Path) -> Result<()> {
        let scaling = match self.kept_scaling {
            Some(s) => s,
            None => latent_scaling(&self.vae, &self.images)?,
        };
        let out = run_dir.join("vae");
        export_vae(&self.args.config, &state.weights(), scaling, &out)?;
        println!(
            "trained the VAE for {} steps; latent std {:.4} → scaling_factor {scaling:.5}; wrote {}",
            state.step,
            1.0 / scaling,
            out.display()
        );
        Ok(())
    }
}

/// `lcm pretrain vae`.
pub fn run(args: &VaeArgs) -> Result<()> {
    let c = &args.train;
    let (device, _) = c.runtime.resolve()?;
    let cfg = VaeConfig::load(&args.config)?;
    let resolution = c.resolution.unwrap_or(64);
    let f = cfg.scale_factor();
    check_resolution(resolution, f)?;
    let stage = c.stage(resolution, &PRETRAIN)?;
    let batch_size = stage.batch_size;
    let plan = c.plan(&PRETRAIN)?;
    let options = c.options(&PRETRAIN)?;
    let (images, _) = crate::data::load_images(&c.data, resolution)?;
    let images = images.to_device(&device)?;
    eprintln!("{} training images at {resolution}²", images.dim(0)?);
    let mut init =
        crate::nn::init::init_weights(c.seed, &device, |vb| AutoencoderKL::new(&cfg, vb))?;
    let mut kept_scaling = None;
    if let Some(dir) = &args.init {
        take_trained(&mut init, &load_component(dir, &device)?, dir, false)?;
        if args.decoder_only {
            kept_scaling = Some(VaeConfig::load(&dir.join("config.json"))?.scaling_factor);
        }
    }
    let state = TrainState::with_trainable(init, options, |name| {
        !args.decoder_only || name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
    })?;
    let vae = AutoencoderKL::new(&cfg, state.var_builder(&device))?;
    let task = VaeTask {
        args,
        settings: VaeSettings {
            kl_weight: args.kl_weight,
            decoder_only: args.decoder_only,
            stage,
        },
        vae,
        images,
        latent_shape: (
            batch_size,
            cfg.latent_channels,
            resolution / f,
            resolution / f,
        ),
        kept_scaling,
    };
    Run::new(state, task).resume_and_train(c.resume.as_deref(), &device, &plan)
}

/// SD's recipe: scaling_factor = 1 / std of the latents' posterior means over (up to 512) images.
fn latent_scaling(vae: &AutoencoderKL, images: &Tensor) -> Result<f64> {
    let n = images.dim(0)?.min(512);
    let mut means = Vec::new();
    for start in (0..n).step_by(32) {
        let x = images.narrow(0, start, 32.min(n - start))?.detach();
        means.push(vae.encode(&x)?.mean.detach());
    }
    let all = Tensor::cat(&means, 0)?.flatten_all()?;
    let mean = all.mean_all()?.to_scalar::<f32>()? as f64;
    let var = all
        .affine(1.0, -mean)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()? as f64;
    Ok(1.0 / var.sqrt().max(1e-6))
}

/// `out/`: config.json (with the scaling factor) and the weights, a diffusers AutoencoderKL.
fn export_vae(
    config: &Path,
    weights: &HashMap<String, Tensor>,
    scaling: f64,
    out: &Path,
) -> Result<()> {
    let mut cfg: serde_json::Value = crate::model::config::read_json(config)?;
    cfg["scaling_factor"] = scaling.into();
    crate::files::write_atomic(&out.join("config.json"), &serde_json::to_vec_pretty(&cfg)?)?;
    crate::files::save_safetensors(weights, &out.join("diffusion_pytorch_model.safetensors"))
}
