//! `lcm bench`: wall time and peak memory of the text encoder, one U-Net step, the VAE decode and a
//! full few-step generation, at a real model's size or at SD1.5 size with random weights (built from
//! SD1.5's own config.json files in benches/sd15/). Each component runs in its own subprocess so
//! its peak RSS is its own, as the diffusers peer script (shared/peer/bench_diffusers.py) does.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::model::clip::ClipTextModel;
use crate::model::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::pipeline::source::Defaults;
use crate::pipeline::{GenerateRequest, Pipeline};
use crate::runtime::{peak_rss_bytes, RuntimeArgs};
use crate::sample::noise::SeededNoise;
use crate::sample::sampler::SamplerKind;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A diffusers-layout folder or pipeline name to time with its real weights.
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<String>,
    /// `sd15`: SD1.5-sized components with random weights (U-Net with time_cond_proj_dim 256).
    #[arg(long)]
    pub preset: Option<String>,
    /// Image size (default: the model's native size; 512 for sd15).
    #[arg(long)]
    pub size: Option<usize>,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Steps of the full-pipeline run.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Comma-separated subset of text,unet,vae,pipeline.
    #[arg(long, default_value = "text,unet,vae,pipeline")]
    pub only: String,
    /// Run the components in this process instead of one subprocess each.
    #[arg(long)]
    pub in_process: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub component: String,
    pub median_s: f64,
    pub times_s: Vec<f64>,
    pub peak_rss_mb: f64,
    pub detail: String,
}

const COMPONENTS: &[&str] = &["text", "unet", "vae", "pipeline"];

pub fn run(args: &BenchArgs) -> Result<()> {
    let wanted: Vec<&str> = args
        .only
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for w in &wanted {
        if !COMPONENTS.contains(w) {
            bail!(
                "--only: unknown component {w:?} (expected {})",
                COMPONENTS.join(", ")
            )
        }
    }
    if args.model.is_none() && args.preset.is_none() {
        bail!("give --model DIR|NAME or --preset sd15")
    }
    // The compute threads (rayon's: gemm and our kernels); candle's element-wise pool is held to
    // one (runtime::init_threads).
    let threads = rayon::current_num_threads();
    let cpu_path = crate::kernels::cpu::path();
    let child = wanted.len() == 1 && !args.in_process;
    if !child {
        eprintln!("kernels: {cpu_path}");
    }
    let mut results = Vec::new();
    for c in &wanted {
        let m = if args.in_process || wanted.len() == 1 {
            measure(args, c)?
        } else {
            measure_in_subprocess(args, c)?
        };
        if !child {
            eprintln!(
                "{:<9} median {:>9.4} s  peak RSS {:>8.0} MB  {}",
                m.component, m.median_s, m.peak_rss_mb, m.detail
            );
        }
        results.push(m);
    }
    let summary = serde_json::json!({
        "model": args.model, "preset": args.preset, "size": args.size,
        "threads": threads, "dtype": args.runtime.dtype, "device": args.runtime.device,
        "kernels": cpu_path,
        "results": results,
    });
    if wanted.len() == 1 && !args.in_process {
        // Child mode (or a single component): machine-readable line for the parent.
        println!("{}", serde_json::to_string(&results[0])?);
    } else {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    if let Some(out) = &args.out {
        crate::files::write_atomic(out, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    }
    Ok(())
}

fn measure_in_subprocess(args: &BenchArgs, component: &str) -> Result<Measurement> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("bench").arg("--only").arg(component);
    if let Some(m) = &args.model {
        cmd.arg("--model").arg(m);
    }
    if let Some(p) = &args.preset {
        cmd.arg("--preset").arg(p);
    }
    if let Some(s) = args.size {
        cmd.arg("--size").arg(s.to_string());
    }
    cmd.args([
        "--repeats",
        &args.repeats.to_string(),
        "--warmup",
        &args.warmup.to_string(),
    ]);
    cmd.args(["--steps", &args.steps.to_string()]);
    cmd.args([
        "--device",
        &args.runtime.device,
        "--dtype",
        &args.runtime.dtype,
    ]);
    let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("benchmark of {component} failed")
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .last()
        .context("no output from the benchmark subprocess")?;
    Ok(serde_json::from_str(line)?)
}

/// Random plain tensors (no autograd) for any requested weight, honouring the init hints so norms
/// start at 1 and biases at 0: timing needs the right shapes, not trained values.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = match h {
            candle_nn::Init::Const(v) => (Tensor::ones(s, DType::F32, dev)? * v)?,
            _ => Tensor::randn(0f32, 0.02, s, dev)?,
        };
        t.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

fn random_vb(dtype: DType, dev: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, dev.clone())
}

struct Models {
    text: Option<ClipTextModel>,
    unet: Option<UNet2DConditionModel>,
    vae: Option<AutoencoderKL>,
    pipeline: Option<Pipeline>,
    size: usize,
}

fn sd15_config<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    Ok(serde_json::from_str(text)?)
}

fn load(args: &BenchArgs, component: &str) -> Result<Models> {
    let (dev, dtype) = args.runtime.resolve()?;
    if let Some(m) = &args.model {
        let resolved = crate::pipeline::source::resolve(m)?;
        let p = Pipeline::new(&resolved.folder, &dev, dtype)?;
        let size = args
            .size
            .unwrap_or(p.unet.config.sample_size.unwrap_or(64) * p.vae_scale_factor());
        return Ok(Models {
            text: None,
            unet: None,
            vae: None,
            pipeline: Some(p),
            size,
        });
    }
    match args.preset.as_deref() {
        Some("sd15") => {}
        Some(other) => bail!("--preset {other:?}: only sd15 is known"),
        None => unreachable!("checked in run"),
    }
    let size = args.size.unwrap_or(512);
    let vb = random_vb(dtype, &dev);
    let need = |c: &str| component == c;
    Ok(Models {
        text: if need("text") {
            let cfg: ClipTextConfig =
                sd15_config(include_str!("../../benches/sd15/text_encoder.json"))?;
            Some(ClipTextModel::new(&cfg, vb.clone())?)
        } else {
            None
        },
        unet: if need("unet") {
            let cfg: UNetConfig = sd15_config(include_str!("../../benches/sd15/unet.json"))?;
            Some(UNet2DConditionModel::new(&cfg, vb.clone())?)
        } else {
            None
        },
        vae: if need("vae") {
            let cfg: VaeConfig = sd15_config(include_str!("../../benches/sd15/vae.json"))?;
            Some(AutoencoderKL::new(&cfg, random_vb(DType::F32, &dev))?)
        } else {
            None
        },
        pipeline: None,
        size,
    })
}

fn time_it(args: &BenchArgs, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..args.warmup {
        f()?;
    }
    (0..args.repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f()?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect()
}

fn measure(args: &BenchArgs, component: &str) -> Result<Measurement> {
    let m = load(args, component)?;
    let (dev, _) = args.runtime.resolve()?;
    let text = m
        .text
        .as_ref()
        .or(m.pipeline.as_ref().map(|p| &p.text_encoder));
    let unet = m.unet.as_ref().or(m.pipeline.as_ref().map(|p| &p.unet));
    let vae = m.vae.as_ref().or(m.pipeline.as_ref().map(|p| &p.vae));
    let sync = |t: &Tensor| -> Result<()> {
        // Force completion on asynchronous devices.
        t.flatten_all()?
            .narrow(0, 0, 1)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        Ok(())
    };
    let (times, detail) = match component {
        "text" => {
            let te = text.context("no text encoder")?;
            let n = te.config.max_position_embeddings;
            let ids = Tensor::new((0..n as u32).collect::<Vec<_>>(), &dev)?.unsqueeze(0)?;
            (
                time_it(args, || sync(&te.forward(&ids)?))?,
                format!("{n} tokens"),
            )
        }
        "unet" => {
            let u = unet.context("no U-Net")?;
            let f = vae.map(|v| v.config.scale_factor()).unwrap_or(8);
            let hw = m.size / f;
            let dtype = u.dtype();
            let x = Tensor::randn(0f32, 1.0, (1, u.config.in_channels, hw, hw), &dev)?
                .to_dtype(dtype)?;
            let ctx = Tensor::randn(0f32, 1.0, (1, 77, u.config.cross_attention_dim), &dev)?
                .to_dtype(dtype)?;
            let t = Tensor::new(&[999f32], &dev)?;
            let cond = match u.config.time_cond_proj_dim {
                Some(d) => Some(
                    crate::nn::guidance_embedding(&Tensor::new(&[7.5f32], &dev)?, d)?
                        .to_dtype(dtype)?,
                ),
                None => None,
            };
            let times = time_it(args, || sync(&u.forward(&x, &t, &ctx, cond.as_ref())?))?;
            (times, format!("latent {hw}x{hw}, batch 1"))
        }
        "vae" => {
            let v = vae.context("no VAE")?;
            let hw = m.size / v.config.scale_factor();
            let z = Tensor::randn(0f32, 1.0, (1, v.config.latent_channels, hw, hw), &dev)?;
            (
                time_it(args, || sync(&v.decode(&z)?))?,
                format!("decode {hw}x{hw} → {0}x{0}", m.size),
            )
        }
        "pipeline" => {
            let p = m
                .pipeline
                .as_ref()
                .context("the full-pipeline timing needs --model")?;
            let req = GenerateRequest {
                prompt: "a photo of a cat".into(),
                sampler: Some(SamplerKind::Lcm),
                steps: Some(args.steps),
                width: Some(m.size),
                height: Some(m.size),
                n: 1,
                ..Default::default()
            };
            let times = time_it(args, || {
                let mut noise = SeededNoise::new(0);
                p.generate(&req, &Defaults::default(), &mut noise, &mut |_| {})?;
                Ok(())
            })?;
            (
                times,
                format!("text + {} LCM steps + decode at {}²", args.steps, m.size),
            )
        }
        other => bail!("unknown component {other}"),
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Measurement {
        component: component.to_string(),
        median_s: sorted[sorted.len() / 2],
        times_s: times,
        peak_rss_mb: peak_rss_bytes() as f64 / 1e6,
        detail,
    })
}
