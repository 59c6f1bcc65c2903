//! `lcm pretrain motion-vae`: the motion VAE ([`crate::model::motion_vae`]) on a HumanML3D-layout
//! folder's train split, as MLD trains it: reconstruction of the z-normalised features and of the
//! joints they decode to, plus a small KL. Clips are augmented on their joints each step
//! (mirror, ±10 % speed, crops: [`crate::data::augment`]). The export writes the VAE folder
//! (config, weights, the dataset's Mean/Std) and its reconstruction figures on the held-out splits.
//!
//! Deviation from MLD: pseudo-Huber (√(d² + c²) − c) in place of smooth-L1 — the same shape,
//! with a gradient that is smooth at the switch.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::augment::Augment;
use crate::data::humanml3d::{load, LoadOptions};
use crate::model::motion_vae::{masked_mean, MotionVae, MotionVaeConfig, Normaliser, WEIGHTS_FILE};
use crate::motion::{joints_from_features, Pose, FEATURES};
use crate::sample::noise::{NoiseSource, SeededNoise};
use crate::train::args::{StageSettings, TrainArgs, PRETRAIN};
use crate::train::run::{Run, Task};
use crate::train::state::{Metrics, TrainState};

#[derive(clap::Args, Debug, Clone)]
pub struct MotionVaeArgs {
    /// The VAE's sizes (a `motion_vae/config.json`).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny-motion/motion_vae/config.json"))]
    pub config: PathBuf,
    /// Weight of the KL term (MLD: 1e-4).
    #[arg(long, default_value_t = 1e-4)]
    pub kl_weight: f64,
    /// Weight of the loss on the decoded joints (metres), beside the features' (MLD: 1).
    #[arg(long, default_value_t = 1.0)]
    pub joint_weight: f64,
    /// Weight of a loss on the joints relative to the root (pelvis) in each frame: the body's
    /// pose without the root path, whose integrated error otherwise dominates the joint loss
    /// (default 0: off).
    #[arg(long, default_value_t = 0.0)]
    pub local_joint_weight: f64,
    /// What --local-joint-weight's joints are relative to: root (the pelvis, each frame: the pose
    /// alone) or ground (the pelvis's ground point: the pose and its height above the floor, so
    /// a jump's rise is in the loss too).
    #[arg(long, value_enum, default_value = "root")]
    pub local_frame: LocalFrame,
    /// Train on the clips as they are (no mirror, warp or crop).
    #[arg(long)]
    pub no_augment: bool,
    /// Reconstruction loss of the features and the root-relative joints: huber (pseudo-Huber,
    /// MLD's smooth-L1 shape) or l2 (d²/2c with the same widths c: equal to it for small errors,
    /// quadratic for large ones, so a rare large miss such as a raised arm counts more). The
    /// joints with the root's path (--joint-weight) stay pseudo-Huber: squared, the path's
    /// integrated drift (tens of centimetres) would swamp every other term.
    #[arg(long, value_enum, default_value = "huber")]
    pub recon_loss: ReconLoss,
    /// Start from a trained motion VAE folder's weights (fresh optimizer and schedule) instead of
    /// a seeded init: training on past the end of an earlier run's schedule.
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    pub config: MotionVaeConfig,
    pub kl_weight: f64,
    pub joint_weight: f64,
    /// Left out of the settings when 0, so runs made before it existed still resume.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub local_joint_weight: f64,
    /// Left out of the settings when root, so runs made before it existed still resume.
    #[serde(default, skip_serializing_if = "LocalFrame::is_root")]
    pub local_frame: LocalFrame,
    /// Left out of the settings when huber, so runs made before it existed still resume.
    #[serde(default, skip_serializing_if = "ReconLoss::is_huber")]
    pub recon_loss: ReconLoss,
    pub augment: Augment,
    #[serde(flatten)]
    pub stage: StageSettings,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// Training windows are this many frames or more (the length bounds of HumanML3D's loader)…
const MIN_WINDOW: usize = 40;
/// …and at most this many: most clips are shorter, and long windows would draw from few.
const MAX_WINDOW: usize = 140;

/// Pseudo-Huber widths: features in z-units, joints in metres.
const FEATURE_C: f64 = 1.0;
const JOINT_C: f64 = 0.01;

fn pseudo_huber(a: &Tensor, b: &Tensor, c: f64) -> Result<Tensor> {
    Ok((((a - b)?.sqr()? + c * c)?.sqrt()? - c)?)
}

/// The VAE's reconstruction loss per element.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ReconLoss {
    /// √(d² + c²) − c.
    #[default]
    Huber,
    /// d²/2c: pseudo-Huber's curvature at 0 without its linear tail.
    L2,
}

impl ReconLoss {
    fn is_huber(&self) -> bool {
        *self == Self::Huber
    }

    fn elementwise(self, a: &Tensor, b: &Tensor, c: f64) -> Result<Tensor> {
        match self {
            Self::Huber => pseudo_huber(a, b, c),
            Self::L2 => Ok(((a - b)?.sqr()? / (2.0 * c))?),
        }
    }
}

/// The frame the local joint loss measures joints in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LocalFrame {
    /// Relative to the root joint in each frame.
    #[default]
    Root,
    /// Relative to the root's point on the ground (x and z only): heights kept.
    Ground,
}

impl LocalFrame {
    fn is_root(&self) -> bool {
        *self == Self::Root
    }
}

/// A clip as the trainer keeps it: its joints (augmentation works on them).
struct Clip {
    joints: Vec<Pose>,
}

pub struct MotionVaeTask {
    pub settings: Settings,
    model: MotionVae,
    norm: Normaliser,
    train: Vec<Clip>,
    /// A few held-out clips (normalised features) for the samples.
    preview: Vec<Vec<f32>>,
    data_dir: PathBuf,
    device: Device,
}

/// Clips of normalised features padded to the longest: `[n, t, 263]` and `[n, t]` valid.
pub fn pad(clips: &[Vec<f32>], device: &Device) -> Result<(Tensor, Tensor)> {
    let t = clips.iter().map(|c| c.len() / FEATURES).max().unwrap_or(1);
    crate::eval::motion::pad_clips(
        &clips.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        t,
        device,
    )
}

/// What one training batch measures.
struct Losses {
    feat: Tensor,
    joints: Tensor,
    local_joints: Tensor,
    kl: Tensor,
    err: Tensor,
    local_err: Tensor,
}

impl MotionVaeTask {
    /// Losses of a batch of equal-length clips and the mean joint errors (m) with and without
    /// the root path.
    fn losses(&self, x: &Tensor, eps: &Tensor) -> Result<Losses> {
        let valid = None;
        let post = self.model.encode(x, valid)?;
        let z = post.sample(eps)?;
        let xr = self.model.decode(&z, x.dim(1)?, valid)?;
        let r = self.settings.recon_loss;
        let feat = masked_mean(&r.elementwise(&xr, x, FEATURE_C)?, valid)?;
        let jr = crate::motion::tensor::joints_from_features(&self.norm.denormalise(&xr)?)?;
        let jx = crate::motion::tensor::joints_from_features(&self.norm.denormalise(x)?)?;
        let joints = masked_mean(&pseudo_huber(&jr, &jx, JOINT_C)?, valid)?;
        let err = masked_mean(&(&jr - &jx)?.sqr()?.sum_keepdim(3)?.sqrt()?, valid)?;
        // [b, t, 22, 3] relative to joint 0, the root, in the same frame.
        let local = |j: &Tensor| j.broadcast_sub(&j.narrow(2, 0, 1)?);
        let (lr, lx) = (local(&jr)?, local(&jx)?);
        let local_joints = match self.settings.local_frame {
            LocalFrame::Root => masked_mean(&r.elementwise(&lr, &lx, JOINT_C)?, valid)?,
            LocalFrame::Ground => {
                let xz = Tensor::new(&[1f32, 0.0, 1.0], x.device())?;
                let ground = |j: &Tensor| -> Result<Tensor> {
                    Ok(j.broadcast_sub(&j.narrow(2, 0, 1)?.broadcast_mul(&xz)?)?)
                };
                masked_mean(
                    &r.elementwise(&ground(&jr)?, &ground(&jx)?, JOINT_C)?,
                    valid,
                )?
            }
        };
        let local_err = masked_mean(&(lr - lx)?.sqr()?.sum_keepdim(3)?.sqrt()?, valid)?;
        Ok(Losses {
            feat,
            joints,
            local_joints,
            kl: post.kl()?,
            err,
            local_err,
        })
    }
}

impl Task for MotionVaeTask {
    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise")
    }

    fn loss(&self, rng: &mut ChaCha8Rng) -> Result<(Tensor, Metrics)> {
        // One window length per batch, the windows cut at random from clips at least that long:
        // no padding, so attention needs no mask and takes the fused kernel (twice as fast here).
        let s = &self.settings;
        let b = s.stage.batch_size;
        // The length follows the data's: that of a clip drawn first (within the bounds).
        let anchor = self.train[rng.random_range(0..self.train.len())]
            .joints
            .len()
            - 1;
        let t = anchor.clamp(MIN_WINDOW.min(anchor), s.config.max_frames.min(MAX_WINDOW));
        let mut t = t;
        let mut rows = Vec::with_capacity(b * t * FEATURES);
        let mut tries = 0;
        while rows.len() < b * t * FEATURES {
            tries += 1;
            if tries > 20 * b {
                // Too few clips this long survive the augmentation: shorter windows, afresh.
                if t <= MIN_WINDOW {
                    bail!("fewer than {b} training clips have {t} frames")
                }
                t = (t * 4 / 5).max(MIN_WINDOW);
                rows.clear();
                tries = 0;
            }
            let c = &self.train[rng.random_range(0..self.train.len())];
            if c.joints.len() < t + 1 {
                continue;
            }
            // Augmentation may shorten a clip below the window: then the next clip is drawn.
            let (f, _) = s.augment.features(&c.joints, rng)?;
            let n = f.len() / FEATURES;
            if n < t {
                continue;
            }
            let start = rng.random_range(0..=n - t);
            rows.extend(
                self.norm
                    .normalise_rows(&f[start * FEATURES..(start + t) * FEATURES]),
            );
        }
        let x = Tensor::from_vec(rows, (b, t, FEATURES), &self.device)?;
        let shape = (b, s.config.latent_tokens, s.config.latent_channels);
        let eps = SeededNoise::new(rng.random()).sample(&shape.into(), &self.device)?;
        let l = self.losses(&x, &eps)?;
        let mut loss = ((&l.feat + (&l.joints * s.joint_weight)?)? + (&l.kl * s.kl_weight)?)?;
        if s.local_joint_weight > 0.0 {
            loss = (loss + (&l.local_joints * s.local_joint_weight)?)?;
        }
        let mut m = Metrics::new();
        m.insert("features".into(), l.feat.to_scalar::<f32>()?.into());
        m.insert(
            "joint_error_cm".into(),
            (l.err.to_scalar::<f32>()? * 100.0).into(),
        );
        m.insert(
            "local_joint_error_cm".into(),
            (l.local_err.to_scalar::<f32>()? * 100.0).into(),
        );
        m.insert("kl".into(), l.kl.to_scalar::<f32>()?.into());
        Ok((loss, m))
    }

    fn sample(&mut self, _state: &TrainState, path: &Path) -> Result<()> {
        if self.preview.is_empty() {
            return Ok(());
        }
        let (x, valid) = pad(&self.preview, &self.device)?;
        let z = self.model.encode(&x, Some(&valid))?.mean;
        let xr = self
            .norm
            .denormalise(&self.model.decode(&z, x.dim(1)?, Some(&valid))?)?;
        let x = self.norm.denormalise(&x)?;
        let mut pairs = Vec::new();
        for (i, c) in self.preview.iter().enumerate() {
            let t = c.len() / FEATURES;
            for src in [&x, &xr] {
                let rows = src
                    .get(i)?
                    .narrow(0, 0, t)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                pairs.push(joints_from_features(&rows)?);
            }
        }
        crate::motion::render::write_pairs(path, &pairs, 8)
    }

    fn export(&mut self, state: &TrainState, run_dir: &Path) -> Result<()> {
        let out = run_dir.join("motion_vae");
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        crate::files::write_atomic(
            &out.join("config.json"),
            &serde_json::to_vec_pretty(&self.settings.config)?,
        )?;
        crate::files::save_safetensors(&state.weights(), &out.join(WEIGHTS_FILE))?;
        self.norm.save(&out)?;
        let report = reconstruction_report(&self.model, &self.norm, &self.data_dir, &self.device)?;
        crate::files::write_atomic(
            &out.join("reconstruction.json"),
            &serde_json::to_vec_pretty(&serde_json::Value::Object(report))?,
        )?;
        println!(
            "trained the motion VAE for {} steps; wrote {}",
            state.step,
            out.display()
        );
        Ok(())
    }
}

/// [`reconstruction`] on each held-out split of a dataset that has clips (val, test,
/// test_compositional, real), printed as it goes: `reconstruction.json`'s content.
pub fn reconstruction_report(
    vae: &MotionVae,
    norm: &Normaliser,
    data_dir: &Path,
    device: &Device,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut report = serde_json::Map::new();
    for split in ["val", "test", "test_compositional", "real"] {
        let Ok(d) = load(data_dir, split, &LoadOptions::default()) else {
            continue;
        };
        if d.clips.is_empty() {
            continue;
        }
        let clips: Vec<Vec<f32>> = d.clips.iter().map(|c| c.features.clone()).collect();
        let r = reconstruction(vae, norm, &clips, device)?;
        println!("{split}: {r}");
        report.insert(split.into(), r);
    }
    Ok(report)
}

/// Reconstruction through the posterior mean of normalised clips: mean per-joint position error
/// (cm; also with each frame's root aligned, the pose alone), root drift at the last frame (cm),
/// the features' mean absolute error (z-units), of the clips that raise a hand above the
/// shoulder the share whose reconstruction raises the same one (what the arms keep), and of the
/// clips with a gesture the share whose reconstruction has as many (each hand's rises above the
/// shoulder and the claps: what a count in a caption needs), and of the clips that leave the
/// ground the share whose reconstruction does so as many times (jumps, run strides, flips).
pub fn reconstruction(
    vae: &MotionVae,
    norm: &Normaliser,
    clips: &[Vec<f32>],
    device: &Device,
) -> Result<serde_json::Value> {
    let (mut mpjpe, mut drift, mut feat, mut frames) = (0.0, 0.0, 0.0, 0usize);
    let mut local = 0.0;
    let (mut raised, mut raised_kept) = (0usize, 0usize);
    let (mut gestures, mut gestures_kept) = (0usize, 0usize);
    let (mut airborne, mut flights_kept) = (0usize, 0usize);
    for chunk in clips.chunks(32) {
        let (x, valid) = pad(chunk, device)?;
        let z = vae.encode(&x, Some(&valid))?.mean;
        let xr = vae.decode(&z, x.dim(1)?, Some(&valid))?;
        for (i, c) in chunk.iter().enumerate() {
            let t = c.len() / FEATURES;
            let a = x.get(i)?.narrow(0, 0, t)?;
            let b = xr.get(i)?.narrow(0, 0, t)?;
            feat += (&a - &b)?.abs()?.sum_all()?.to_scalar::<f32>()? as f64 / FEATURES as f64;
            let ja = joints_from_features(
                &norm
                    .denormalise(&a.unsqueeze(0)?)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            )?;
            let jb = joints_from_features(
                &norm
                    .denormalise(&b.unsqueeze(0)?)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            )?;
            let (e, d) = crate::eval::motion_checks::reconstruction_error(&ja, &jb);
            mpjpe += e * t as f64;
            drift += d;
            let rooted = |j: &[crate::motion::Pose]| -> Vec<crate::motion::Pose> {
                j.iter().map(|p| p.map(|q| q - p[0])).collect()
            };
            let (e, _) =
                crate::eval::motion_checks::reconstruction_error(&rooted(&ja), &rooted(&jb));
            local += e * t as f64;
            frames += t;
            if let Some(side) = crate::eval::motion_checks::raised_hand(&ja) {
                raised += 1;
                raised_kept +=
                    usize::from(crate::eval::motion_checks::raised_hand(&jb) == Some(side));
            }
            let want = crate::eval::motion_checks::gesture_counts(&ja);
            if want != (0, 0, 0) {
                gestures += 1;
                gestures_kept +=
                    usize::from(crate::eval::motion_checks::gesture_counts(&jb) == want);
            }
            let want = crate::eval::motion_checks::flights(&ja);
            if want > 0 {
                airborne += 1;
                flights_kept += usize::from(crate::eval::motion_checks::flights(&jb) == want);
            }
        }
    }
    let n = clips.len().max(1) as f64;
    Ok(serde_json::json!({
        "clips": clips.len(),
        "mpjpe_cm": 100.0 * mpjpe / frames.max(1) as f64,
        "mpjpe_root_aligned_cm": 100.0 * local / frames.max(1) as f64,
        "root_drift_cm": 100.0 * drift / n,
        "feature_mae": feat / frames.max(1) as f64,
        "raised_hand_clips": raised,
        "raised_hand_kept": if raised > 0 { Some(raised_kept as f64 / raised as f64) } else { None },
        "gesture_clips": gestures,
        "gesture_counts_kept": if gestures > 0 { Some(gestures_kept as f64 / gestures as f64) } else { None },
        "airborne_clips": airborne,
        "flights_kept": if airborne > 0 { Some(flights_kept as f64 / airborne as f64) } else { None },
    }))
}

/// `lcm pretrain motion-vae`.
pub fn run(args: &MotionVaeArgs) -> Result<()> {
    let c = &args.train;
    let (device, _) = c.runtime.resolve()?;
    let dir = c.motion_data()?.clone();
    let config = MotionVaeConfig::load(&args.config)?;
    // --init is read before the data, so a wrong folder fails at once.
    let mut init = crate::nn::init::init_weights(c.seed, &device, |vb| {
        MotionVae::new(&config, vb).map_err(candle_core::Error::wrap)
    })?;
    if let Some(dir) = &args.init {
        let trained = crate::model::folder::load_component(dir, &device)
            .with_context(|| format!("--init {}", dir.display()))?;
        crate::train::start::take_trained(&mut init, &trained, dir, false)?;
    }
    let opts = LoadOptions {
        min_frames: 2,
        max_frames: usize::MAX,
    };
    let train = load(&dir, "train", &opts)?;
    if train.clips.is_empty() {
        bail!("{}: the train split has no clips", dir.display())
    }
    let norm = Normaliser {
        mean: train.mean.clone(),
        std: train.std.clone(),
    };
    let clips = train
        .clips
        .iter()
        .map(|m| {
            Ok(Clip {
                joints: joints_from_features(&train.denormalise(&m.features))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let preview: Vec<Vec<f32>> = load(&dir, "val", &opts)
        .map(|v| {
            v.clips
                .iter()
                .take(3)
                .map(|c| c.features[..c.features.len().min(config.max_frames * FEATURES)].to_vec())
                .collect()
        })
        .unwrap_or_default();
    eprintln!("{} training clips", clips.len());
    let settings = Settings {
        config: config.clone(),
        kl_weight: args.kl_weight,
        joint_weight: args.joint_weight,
        local_joint_weight: args.local_joint_weight,
        local_frame: args.local_frame,
        recon_loss: args.recon_loss,
        augment: if args.no_augment {
            Augment::NONE
        } else {
            Augment::CAPTIONED
        },
        stage: c.stage(config.max_frames, &PRETRAIN)?,
    };
    let state = TrainState::new(init, c.options(&PRETRAIN)?)?;
    let model = MotionVae::new(&config, state.var_builder(&device))?;
    let task = MotionVaeTask {
        settings,
        model,
        norm,
        train: clips,
        preview,
        data_dir: dir,
        device: device.clone(),
    };
    Run::new(state, task).resume_and_train(c.resume.as_deref(), &device, &c.plan(&PRETRAIN)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both losses agree for small errors (the curvature 1/c at 0); beyond c the quadratic one
    /// grows with d², pseudo-Huber with |d|.
    #[test]
    fn the_quadratic_loss_keeps_huber_curvature_without_its_linear_tail() -> Result<()> {
        let dev = Device::Cpu;
        let zero = Tensor::zeros(4, candle_core::DType::F64, &dev)?;
        let d = Tensor::new(&[1e-4f64, -1e-3, 0.5, 3.0], &dev)?;
        let c = 0.01;
        let h = ReconLoss::Huber
            .elementwise(&d, &zero, c)?
            .to_vec1::<f64>()?;
        let q = ReconLoss::L2.elementwise(&d, &zero, c)?.to_vec1::<f64>()?;
        for (i, (&h, &q)) in h.iter().zip(&q).enumerate() {
            let di = d.to_vec1::<f64>()?[i];
            assert!((q - di * di / (2.0 * c)).abs() <= 1e-12 * q.max(1.0));
            assert!(q >= h, "d = {di}: l2 {q} < huber {h}");
            if di.abs() < 0.1 * c {
                assert!((q - h).abs() <= 0.01 * q, "d = {di}: {q} vs {h}");
            }
        }
        // A 3 m miss: 450 against pseudo-Huber's 2.99.
        assert!(q[3] > 100.0 * h[3]);
        Ok(())
    }
}
