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
    /// Draw a clip as a stick figure (front and side views): an animated GIF, or a PNG strip.
    Render {
        /// A clip: .json (joints), .npy (HumanML3D features or joints), .bvh (any skeleton with
        /// recognisable joint names), .txt (DeepMimic humanoid).
        input: PathBuf,
        /// OUT.gif (animated) or OUT.png (a strip of --frames poses).
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value_t = 8)]
        frames: usize,
        /// GIF: keep every Nth frame (at 20/N fps), for smaller files of long clips.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        every: u64,
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

/// A source's joints moved onto the 22-joint chain: 20 fps, the reference skeleton, canonical.
fn retargeted(joints: &[Pose], fps: f64) -> Result<Vec<Pose>> {
    let at20 = retarget::resample(joints, fps, FPS)?;
    motion::features::canonicalise(&retarget::uniform_skeleton(&at20)?)
}

pub fn run(cmd: &MotionCommand) -> Result<()> {
    match cmd {
        MotionCommand::Render {
            input,
            output,
            frames,
            every,
        } => {
            let joints = read_clip(input)?;
            match extension(output).as_str() {
                "gif" => {
                    let kept: Vec<Pose> = joints.iter().step_by(*every as usize).copied().collect();
                    render::write_gif(output, &kept, FPS / *every as f64)?
                }
                "png" => render::write_strip(output, &joints, *frames)?,
                other => bail!("--output {}: .gif or .png, not {other:?}", output.display()),
            }
            println!(
                "{} frames ({:.1} s) → {}",
                joints.len(),
                joints.len() as f64 / FPS,
                output.display()
            );
        }
        MotionCommand::Convert { input, output } => {
            let joints = read_clip(input)?;
            match extension(output).as_str() {
                "json" => motion::io::write_json(output, &joints, FPS)?,
                "npy" => {
                    let f = motion::features(&joints, &Default::default())?;
                    npy::write(output, &f, &[f.len() / motion::FEATURES, motion::FEATURES])?
                }
                other => bail!(
                    "--output {}: .json or .npy, not {other:?}",
                    output.display()
                ),
            }
            println!("{} frames → {}", joints.len(), output.display());
        }
    }
    Ok(())
}
