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
    /// Seconds to load (or, for a preset, draw) the component's weights and build it.
    #[serde(default)]
    pub load_s: f64,
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
    let (_, dtype) = args.runtime.resolve()?;
    let cpu_path = crate::kernels::cpu::path(dtype);
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
                "{:<9} median {:>9.4} s  peak RSS {:>8.0} MB  load {:>6.3} s  {}",
                m.component, m.median_s, m.peak_rss_mb, m.load_s, m.detail
            );
        }
        results.push(m);
    }
    let summary = serde_json::json!({
        "model": args.model, "preset": args.preset, "size": args.size,
        "threads": threads, "dtype": format!("{dtype:?}").to_lowercase(), "device": args.runtime.device,
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
/// start at 1 and biases at 0: timing needs the right shapes, not trained values. The values are
/// uniform with standard deviation 0.02, drawn from a generator seeded by the tensor's name, so
/// two builds of one config get the same weights (parity tests compare a network with itself).
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = match h {
            candle_nn::Init::Const(v) => (Tensor::ones(s, DType::F32, dev)? * v)?,
            _ => {
                // FNV-1a of the name, then splitmix64 (fast: SD1.5 has 10⁹ weights).
                let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
                });
                let half_width = 0.02 * 3f32.sqrt();
                let values: Vec<f32> = (0..s.elem_count())
                    .map(|_| {
                        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                        let mut z = state;
                        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                        z ^= z >> 31;
                        ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * half_width
                    })
                    .collect();
                Tensor::from_vec(values, s, dev)?
            }
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

/// A `VarBuilder` of [`RandomWeights`]: networks of any config for timing and self-parity.
pub fn random_vb(dtype: DType, dev: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, dev.clone())
}

struct Models {
    /// A text-to-motion model (`--model` naming one): its components take the image ones' names
    /// (text = the sentence encoder, unet = one denoiser call, vae = the motion decoder).
    motion: Option<crate::pipeline::text2motion::MotionPipeline>,
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
        use crate::pipeline::text2motion::{is_motion_folder, MotionFolder, MotionPipeline};
        if let Some(dir) = crate::pipeline::source::local_dir(m)?.filter(|d| is_motion_folder(d)) {
            return Ok(Models {
                motion: Some(MotionPipeline::open(MotionFolder::open(&dir)?, &dev)?),
                text: None,
                unet: None,
                vae: None,
                pipeline: None,
                size: 0,
            });
        }
        let resolved = crate::pipeline::source::resolve(m)?;
        let p = Pipeline::new(&resolved.folder, &dev, dtype)?;
        let size = args
            .size
            .unwrap_or(p.unet.config.sample_size.unwrap_or(64) * p.vae_scale_factor());
        return Ok(Models {
            motion: None,
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
    let need = |c: &str| component == c;
    Ok(Models {
        motion: None,
        text: if need("text") {
            let cfg: ClipTextConfig =
                sd15_config(include_str!("../../benches/sd15/text_encoder.json"))?;
            Some(crate::nn::build_for(&dev, dtype, |dt| {
                ClipTextModel::new(&cfg, random_vb(dt, &dev))
            })?)
        } else {
            None
        },
        unet: if need("unet") {
            let cfg: UNetConfig = sd15_config(include_str!("../../benches/sd15/unet.json"))?;
            Some(crate::nn::build_for(&dev, dtype, |dt| {
                UNet2DConditionModel::new(&cfg, random_vb(dt, &dev))
            })?)
        } else {
            None
        },
        vae: if need("vae") {
            let cfg: VaeConfig = sd15_config(include_str!("../../benches/sd15/vae.json"))?;
            let dtype = Pipeline::vae_dtype(&dev, dtype);
            Some(crate::nn::build_for(&dev, dtype, |dt| {
                AutoencoderKL::new(&cfg, random_vb(dt, &dev))
            })?)
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
    let start = Instant::now();
    let m = load(args, component)?;
    let load_s = start.elapsed().as_secs_f64();
    if let Some(p) = &m.motion {
        let (times, detail) = measure_motion(args, p, component)?;
        return Ok(measurement(component, times, detail, load_s));
    }
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
    Ok(measurement(component, times, detail, load_s))
}

fn measurement(component: &str, times: Vec<f64>, detail: String, load_s: f64) -> Measurement {
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Measurement {
        component: component.to_string(),
        median_s: sorted[sorted.len() / 2],
        times_s: times,
        peak_rss_mb: peak_rss_bytes() as f64 / 1e6,
        detail,
        load_s,
    }
}

/// A motion model's components at batch 1, a 4-second clip (what `lcm generate` makes by
/// default), guidance 7.5.
fn measure_motion(
    args: &BenchArgs,
    p: &crate::pipeline::text2motion::MotionPipeline,
    component: &str,
) -> Result<(Vec<f64>, String)> {
    use crate::pipeline::text2motion::{decode, MotionOptions};
    use crate::sample::denoiser::Denoiser;
    let prompt = "a person walks forward and waves with the left hand";
    let frames = (4.0 * crate::motion::FPS).round() as usize;
    let d = &p.folder.denoiser;
    let (dev, _) = args.runtime.resolve()?;
    let z = Tensor::randn(0f32, 1.0, (1, d.latent_tokens, d.latent_channels), &dev)?;
    Ok(match component {
        "text" => (
            time_it(args, || p.condition(&[prompt]).map(drop))?,
            "sentence encoder, one prompt".into(),
        ),
        "unet" => {
            let cond = p.condition(&[prompt])?;
            let w = d
                .time_cond_proj_dim
                // A student's embedding takes w = guidance − 1 (as generation gives it).
                .map(|dim| crate::nn::guidance_embedding(&Tensor::new(&[6.5f32], &dev)?, dim))
                .transpose()?;
            let times = time_it(args, || {
                p.denoiser
                    .predict_eps(&z, &[999], &cond, w.as_ref())
                    .map(drop)
            })?;
            (times, "one denoiser call, batch 1".into())
        }
        "vae" => (
            time_it(args, || decode(&p.vae, &p.norm, &z, frames).map(drop))?,
            format!("decode {frames} frames to joints"),
        ),
        "pipeline" => {
            let defaults = p.class_defaults();
            let o = MotionOptions {
                steps: args.steps,
                guidance: 7.5,
                frames,
                seed: 0,
                sampler: defaults.sampler.unwrap_or(SamplerKind::Lcm),
                gamma: None,
            };
            let times = time_it(args, || p.generate(&[prompt], &o).map(drop))?;
            (
                times,
                format!("text + {} steps + decode, {frames} frames", args.steps),
            )
        }
        other => bail!("unknown component {other}"),
    })
}
