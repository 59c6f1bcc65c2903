//! `lcm motion render|convert`: motion files between the forms `lcm` reads and writes — joint
//! JSON, HumanML3D `.npy` (features `[T, 263]` or joints `[T, 22, 3]`), DeepMimic humanoid clips
//! and BVH (both retargeted onto the 22-joint chain at 20 fps; BVH written too) — and
//! stick-figure GIF/PNG renders.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::motion::bvh::Bvh;
use crate::motion::{self, deepmimic, npy, render, retarget, Pose, FPS, JOINTS};

#[derive(clap::Subcommand, Debug)]
pub enum MotionCommand {
    /// Draw clips as stick figures (front and side views): an animated GIF (several clips: a
    /// grid), or a PNG strip (several clips: one strip per clip, one above the other).
    Render {
        /// Clips: .json (joints), .npy (HumanML3D features or joints), .bvh (any skeleton with
        /// recognisable joint names), .txt (DeepMimic humanoid).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// OUT.gif (animated) or OUT.png (strips of --frames poses).
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = 8)]
        frames: usize,
        /// GIF: keep every Nth frame (at 20/N fps), for smaller files of long clips.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        every: u64,
        /// GIF of several clips: clips per row of the grid (default: all in one row).
        #[arg(long)]
        cols: Option<usize>,
    },
    /// A clip through a motion VAE (encoded to its posterior mean, decoded), written in the
    /// output's format, with the reconstruction error.
    Reconstruct {
        input: PathBuf,
        /// A motion VAE folder (config.json, weights, Mean.npy/Std.npy), e.g. a motion model's
        /// motion_vae/.
        #[arg(long)]
        vae: PathBuf,
        #[arg(long)]
        output: PathBuf,
    },
    /// A motion VAE's reconstruction report over a dataset's held-out splits (what its export
    /// writes as reconstruction.json: joint errors, root drift, raised hands and gesture counts
    /// kept), printed, and written as JSON with --output.
    VaeReport {
        /// A motion VAE folder, e.g. a motion model's motion_vae/.
        #[arg(long)]
        vae: PathBuf,
        /// The `lcm data motion` folder.
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Convert a clip: to .json (joints, metres, 20 fps), .npy (HumanML3D features) or .bvh (the
    /// 22-joint chain with local rotations).
    Convert {
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
    },
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default()
}

/// A clip's joints at 20 fps, whatever form it comes in.
pub fn read_clip(path: &Path) -> Result<Vec<Pose>> {
    match extension(path).as_str() {
        "json" => {
            let (joints, fps) = motion::io::read_json(path)?;
            if (fps - FPS).abs() < 1e-9 {
                Ok(joints)
            } else {
                retarget::resample(&joints, fps, FPS)
            }
        }
        "npy" => {
            let a = npy::read(path)?;
            match a.shape.as_slice() {
                [_, f] if *f == motion::FEATURES => motion::joints_from_features(&a.data),
                [t, j, 3] if *j == JOINTS => Ok((0..*t)
                    .map(|i| {
                        std::array::from_fn(|q| {
                            let o = (i * JOINTS + q) * 3;
                            let p = &a.data[o..o + 3];
                            nalgebra::Vector3::new(p[0] as f64, p[1] as f64, p[2] as f64)
                        })
                    })
                    .collect()),
                s => bail!(
                    "{}: shape {s:?} is neither features [T, {}] nor joints [T, {JOINTS}, 3]",
                    path.display(),
                    motion::FEATURES
                ),
            }
        }
        "txt" => {
            let clip = deepmimic::read(path)?;
            retargeted(&clip.joints, 1.0 / clip.dt)
        }
        "bvh" => {
            let (joints, fps) = Bvh::read(path)?
                .to_joints()
                .with_context(|| format!("{}", path.display()))?;
            retargeted(&joints, fps)
        }
        other => bail!(
            "{}: unknown motion format {other:?} (expected .json, .npy, .bvh or a DeepMimic .txt)",
            path.display()
        ),
    }
}

/// Write a clip (20 fps) in the form `path`'s extension names: `.json` (joints), `.npy`
/// (HumanML3D features), `.bvh` (the 22-joint chain with local rotations, on the reference
/// skeleton), `.gif` (animated stick
/// figure) or `.png` (a strip of 8 poses).
pub fn write_clip(path: &Path, joints: &[Pose]) -> Result<()> {
    let ext = extension(path);
    if ext == "png" {
        return render::write_strip(path, joints, 8);
    }
    let Some(format) = motion::io::MotionFormat::parse(&ext) else {
        bail!(
            "{}: unknown motion output {ext:?} (expected .bvh, .json, .npy, .gif or .png)",
            path.display()
        )
    };
    let bytes = format
        .encode(joints, FPS)
        .with_context(|| path.display().to_string())?;
    crate::files::write_atomic(path, &bytes)
}

/// `lcm generate` with a motion model: what to make and where.
pub struct GenerateMotion<'a> {
    pub label: &'a str,
    pub dir: &'a Path,
    pub prompt: &'a str,
    /// What CFG steers away from (a teacher; a student has no CFG and ignores it).
    pub negative_prompt: Option<&'a str>,
    pub sampler: Option<crate::sample::sampler::SamplerKind>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub seconds: f64,
    pub seed: u64,
    /// γ of the TCD and flow-map samplers (`--tcd-gamma`).
    pub gamma: Option<f64>,
    pub n: usize,
    pub output: &'a Path,
    pub device: &'a candle_core::Device,
}

/// Generate `n` motions of a prompt and write them in the output's format, with timings; what
/// is not given takes the model's class defaults.
pub fn generate(g: &GenerateMotion) -> Result<()> {
    use crate::pipeline::text2motion::{MotionFolder, MotionItem, MotionOptions, MotionPipeline};
    use crate::sample::sampler::SamplerKind;
    use std::time::Instant;
    if g.n == 0 {
        bail!("--n must be at least 1")
    }
    if !(g.seconds.is_finite() && g.seconds > 0.0) {
        bail!("--seconds must be positive, got {}", g.seconds)
    }
    let t0 = Instant::now();
    let folder = MotionFolder::open(g.dir)?;
    let student = folder.denoiser.time_cond_proj_dim.is_some();
    let pipe = MotionPipeline::open(folder, g.device)?;
    let load = t0.elapsed();
    let d = pipe.class_defaults();
    let o = MotionOptions {
        frames: (g.seconds * FPS).round() as usize,
        sampler: g.sampler.or(d.sampler).unwrap_or(SamplerKind::Lcm),
        steps: g.steps.or(d.steps).unwrap_or(4),
        guidance: g.guidance.or(d.guidance).unwrap_or(7.5),
        seed: g.seed,
        gamma: g.gamma.or(d.tcd_gamma),
    };
    if student && g.negative_prompt.is_some_and(|p| !p.is_empty()) {
        eprintln!("warning: the negative prompt is ignored by a distilled student (no CFG)");
    }
    let paths = crate::pipeline::image_io::numbered_paths(g.output, g.n);
    for p in &paths {
        crate::files::check_output(p)?;
    }
    // Motion i uses seed + i, as over HTTP: any one can be made again alone.
    let items: Vec<MotionItem> = (0..g.n as u64)
        .map(|i| MotionItem {
            prompt: g.prompt.to_string(),
            negative_prompt: g.negative_prompt.map(str::to_string),
            guidance: o.guidance,
            seed: g.seed.wrapping_add(i),
        })
        .collect();
    let t1 = Instant::now();
    let prepared = pipe.prepare(&items)?;
    let text = t1.elapsed();
    let t2 = Instant::now();
    // Every motion is wanted throughout, so each is there.
    let motions: Vec<_> = pipe
        .generate_prepared(&prepared, &o.shape(), &|_| true)?
        .into_iter()
        .flatten()
        .collect();
    let gen = t2.elapsed();
    for (m, p) in motions.iter().zip(&paths) {
        write_clip(p, m)?;
    }
    println!(
        "model {} | sampler {} | steps {} | guidance {} | seed {} | {:.1} s ({} frames) | n {}",
        g.label,
        o.sampler,
        o.steps,
        o.guidance,
        g.seed,
        o.frames as f64 / FPS,
        o.frames,
        g.n
    );
    if g.device.is_cpu() {
        println!(
            "kernels: {}",
            crate::kernels::cpu::path(candle_core::DType::F32)
        );
    }
    println!(
        "time: load {:.3}s, text encode {:.3}s, denoise + decode {:.3}s ({:.1} ms per motion), total {:.3}s",
        load.as_secs_f64(),
        text.as_secs_f64(),
        gen.as_secs_f64(),
        1e3 * gen.as_secs_f64() / g.n as f64,
        t0.elapsed().as_secs_f64()
    );
    for p in &paths {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// A source's joints moved onto the 22-joint chain: 20 fps, the reference skeleton, canonical.
/// A clip's HumanML3D feature rows: a features `.npy` as stored (no round trip through joints,
/// which drops a frame), any other clip's joints converted.
pub fn clip_features(path: &Path) -> Result<Vec<f32>> {
    if extension(path) == "npy" {
        let a = npy::read(path)?;
        if matches!(a.shape.as_slice(), [_, f] if *f == motion::FEATURES) {
            return Ok(a.data);
        }
    }
    motion::features(&read_clip(path)?, &Default::default())
}

/// Feature rows through the motion VAE in `dir`: normalised, encoded to the posterior mean,
/// decoded at the clip's length. Returns the joints of the input rows (the reconstruction's
/// reference, in the features' canonical frame) and of the reconstruction.
pub fn reconstruct(dir: &Path, rows: &[f32]) -> Result<(Vec<Pose>, Vec<Pose>)> {
    let device = candle_core::Device::Cpu;
    let (vae, norm) = crate::model::motion_vae::open(dir, &device)
        .with_context(|| format!("--vae {}", dir.display()))?;
    let t = rows.len() / motion::FEATURES;
    if t < 2 || t > vae.config.max_frames {
        bail!(
            "the clip has {t} feature rows; the motion VAE takes 2 to {}",
            vae.config.max_frames
        )
    }
    let x = candle_core::Tensor::from_vec(
        norm.normalise_rows(rows),
        (1, t, motion::FEATURES),
        &device,
    )?;
    let z = vae.encode(&x, None)?.mean;
    let xr = norm.denormalise(&vae.decode(&z, t, None)?)?;
    Ok((
        motion::joints_from_features(rows)?,
        motion::joints_from_features(&xr.flatten_all()?.to_vec1::<f32>()?)?,
    ))
}

fn retargeted(joints: &[Pose], fps: f64) -> Result<Vec<Pose>> {
    let at20 = retarget::resample(joints, fps, FPS)?;
    motion::features::canonicalise(&retarget::uniform_skeleton(&at20)?)
}

pub fn run(cmd: &MotionCommand) -> Result<()> {
    match cmd {
        MotionCommand::Render {
            inputs,
            output,
            frames,
            every,
            cols,
        } => {
            let clips = inputs
                .iter()
                .map(|p| read_clip(p))
                .collect::<Result<Vec<_>>>()?;
            match extension(output).as_str() {
                "gif" => {
                    let kept: Vec<Vec<Pose>> = clips
                        .iter()
                        .map(|c| c.iter().step_by(*every as usize).copied().collect())
                        .collect();
                    let cols = cols.unwrap_or(kept.len());
                    render::write_gif_grid(output, &kept, cols, FPS / *every as f64)?
                }
                "png" if clips.len() == 1 => render::write_strip(output, &clips[0], *frames)?,
                "png" => render::write_pairs(output, &clips, *frames)?,
                other => bail!("--output {}: .gif or .png, not {other:?}", output.display()),
            }
            let longest = clips.iter().map(Vec::len).max().unwrap_or(0);
            println!(
                "{} clip(s), up to {longest} frames ({:.1} s) → {}",
                clips.len(),
                longest as f64 / FPS,
                output.display()
            );
        }
        MotionCommand::Reconstruct { input, vae, output } => {
            let (orig, rec) = reconstruct(vae, &clip_features(input)?)?;
            write_clip(output, &rec)?;
            let (mpjpe, drift) = crate::eval::motion_checks::reconstruction_error(&orig, &rec);
            println!(
                "{} frames; mean per-joint error {:.1} cm, root drift {:.1} cm → {}",
                orig.len(),
                100.0 * mpjpe,
                100.0 * drift,
                output.display()
            );
        }
        MotionCommand::VaeReport { vae, data, output } => {
            let device = candle_core::Device::Cpu;
            let (model, norm) = crate::model::motion_vae::open(vae, &device)
                .with_context(|| format!("--vae {}", vae.display()))?;
            let report =
                crate::train::motion_vae::reconstruction_report(&model, &norm, data, &device)?;
            if report.is_empty() {
                bail!("--data {}: no held-out split with clips", data.display())
            }
            if let Some(out) = output {
                crate::files::write_atomic(
                    out,
                    &serde_json::to_vec_pretty(&serde_json::Value::Object(report))?,
                )?;
                println!("→ {}", out.display());
            }
        }
        MotionCommand::Convert { input, output } => {
            let joints = read_clip(input)?;
            if matches!(extension(output).as_str(), "gif" | "png") {
                bail!(
                    "--output {}: renders are made by `lcm motion render`",
                    output.display()
                )
            }
            write_clip(output, &joints)?;
            println!("{} frames → {}", joints.len(), output.display());
        }
    }
    Ok(())
}
