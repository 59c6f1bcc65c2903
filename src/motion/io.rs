//! Joint positions as JSON: `{"fps": 20, "joints": [frames][22][3]}` in metres, SMPL joint order,
//! Y up — what `lcm` writes for tools outside the HumanML3D ecosystem.

use std::path::Path;

use anyhow::{bail, Context, Result};
use nalgebra::Vector3;
use serde::{Deserialize, Serialize};

use super::skeleton::{Pose, JOINTS};

#[derive(Serialize, Deserialize)]
struct JointsFile {
    fps: f64,
    joints: Vec<Vec<[f64; 3]>>,
}

/// Write a clip's joints as JSON (atomically).
pub fn write_json(path: &Path, joints: &[Pose], fps: f64) -> Result<()> {
    let file = JointsFile {
        fps,
        joints: joints
            .iter()
            .map(|p| p.iter().map(|j| [j.x, j.y, j.z]).collect())
            .collect(),
    };
    crate::files::write_atomic(path, &serde_json::to_vec(&file)?)
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
