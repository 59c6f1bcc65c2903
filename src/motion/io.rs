//! The forms a clip is written in: joint positions as JSON (`{"fps": 20, "joints":
//! [frames][22][3]}` in metres, SMPL joint order, Y up — for tools outside the HumanML3D
//! ecosystem), HumanML3D feature rows as `.npy`, BVH on the reference skeleton, an animated GIF.

use std::path::Path;

use anyhow::{bail, Context, Result};
use nalgebra::Vector3;
use serde::{Deserialize, Serialize};

use super::skeleton::{Pose, JOINTS};

/// A clip's joints as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JointsFile {
    pub fps: f64,
    /// `[frames][22][3]`, metres.
    pub joints: Vec<Vec<[f64; 3]>>,
}

impl JointsFile {
    pub fn new(joints: &[Pose], fps: f64) -> Self {
        Self {
            fps,
            joints: joints
                .iter()
                .map(|p| p.iter().map(|j| [j.x, j.y, j.z]).collect())
                .collect(),
        }
    }
}

/// Write a clip's joints as JSON (atomically).
pub fn write_json(path: &Path, joints: &[Pose], fps: f64) -> Result<()> {
    crate::files::write_atomic(path, &serde_json::to_vec(&JointsFile::new(joints, fps))?)
}

/// The forms a generated clip is delivered in (file extension or API `format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MotionFormat {
    Json,
    Npy,
    Bvh,
    Gif,
}

impl MotionFormat {
    pub const ALL: [MotionFormat; 4] = [Self::Json, Self::Npy, Self::Bvh, Self::Gif];

    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Npy => "npy",
            Self::Bvh => "bvh",
            Self::Gif => "gif",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == s)
    }

    /// Whether the bytes are text (JSON, BVH) rather than binary (npy, GIF).
    pub fn is_text(self) -> bool {
        matches!(self, Self::Json | Self::Bvh)
    }

    /// The clip (at `fps`) in this form. A BVH holds rotations of fixed bones, so the clip goes
    /// onto the reference skeleton first (generated joints are not exactly rigid; JSON keeps
    /// them as made).
    pub fn encode(self, joints: &[Pose], fps: f64) -> Result<Vec<u8>> {
        match self {
            Self::Json => Ok(serde_json::to_vec(&JointsFile::new(joints, fps))?),
            Self::Npy => {
                let f = super::features(joints, &Default::default())?;
                super::npy::to_bytes(&f, &[f.len() / super::FEATURES, super::FEATURES])
            }
            Self::Bvh => Ok(super::bvh::Bvh::from_joints(
                &super::retarget::uniform_skeleton(joints)?,
                fps,
            )?
            .to_text()
            .into_bytes()),
            Self::Gif => super::render::gif_grid_bytes(&[joints], 1, fps),
        }
    }
}

/// Read a clip written by [`write_json`]: its joints and frame rate.
pub fn read_json(path: &Path) -> Result<(Vec<Pose>, f64)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: JointsFile = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a joints JSON file", path.display()))?;
    if !(file.fps.is_finite() && file.fps > 0.0) {
        bail!("{}: fps must be a positive number", path.display())
    }
    let mut poses = Vec::with_capacity(file.joints.len());
    for (t, frame) in file.joints.iter().enumerate() {
        if frame.len() != JOINTS {
            bail!(
                "{}: frame {t} has {} joints, expected {JOINTS}",
                path.display(),
                frame.len()
            )
        }
        poses.push(std::array::from_fn(|j| Vector3::from(frame[j])));
    }
    Ok((poses, file.fps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joints_json_round_trips_and_bad_frames_are_named() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lcm-joints-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join("clip.json");
        let clip: Vec<Pose> = (0..3)
            .map(|t| std::array::from_fn(|j| Vector3::new(t as f64, j as f64 * 0.1, -0.5)))
            .collect();
        write_json(&p, &clip, 20.0)?;
        let (back, fps) = read_json(&p)?;
        assert_eq!((back.len(), fps), (3, 20.0));
        // serde_json's float parsing is within an ulp or so, not always exact.
        for (a, b) in back.iter().flatten().zip(clip.iter().flatten()) {
            assert!((a - b).norm() < 1e-12, "{a:?} vs {b:?}");
        }
        std::fs::write(&p, r#"{"fps": 20, "joints": [[[0, 0, 0]]]}"#)?;
        let e = read_json(&p).unwrap_err().to_string();
        assert!(e.contains("frame 0 has 1 joints"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
