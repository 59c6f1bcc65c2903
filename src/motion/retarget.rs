//! From a source's 22 joints to the representation's: resampled to 20 fps, then moved onto the
//! reference skeleton — each bone keeps its direction and takes the reference length, the root's
//! path scaled by the ratio of leg lengths (HumanML3D's `uniform_skeleton`), so bone lengths are
//! constant over every frame whatever the source's were.

use anyhow::{bail, Result};
use nalgebra::Vector3;

use super::features::{between, chain_positions, chain_rotations};
use super::skeleton::{facing, Pose, REFERENCE_BONES};

/// Linear interpolation of joint positions from `from_fps` to `to_fps`, over the source's span
/// (the last output frame at or before the last source frame).
pub fn resample(joints: &[Pose], from_fps: f64, to_fps: f64) -> Result<Vec<Pose>> {
    if joints.is_empty() || !(from_fps > 0.0 && to_fps > 0.0) {
        bail!("resampling needs frames and positive rates (from {from_fps}, to {to_fps})")
    }
    let span = (joints.len() - 1) as f64 / from_fps;
    let n = (span * to_fps + 1e-9).floor() as usize + 1;
    Ok((0..n)
        .map(|k| {
            let s = k as f64 / to_fps * from_fps;
            let i = (s.floor() as usize).min(joints.len() - 1);
            let j = (i + 1).min(joints.len() - 1);
            let a = s - i as f64;
            std::array::from_fn(|q| joints[i][q] * (1.0 - a) + joints[j][q] * a)
        })
        .collect())
}

/// The clip on the reference skeleton (see the module docs).
pub fn uniform_skeleton(joints: &[Pose]) -> Result<Vec<Pose>> {
    let Some(first) = joints.first() else {
        bail!("an empty clip cannot be retargeted")
    };
    // Leg length: the right thigh and shin (HumanML3D measures the same two bones).
    let leg = |p: &Pose| (p[5] - p[2]).norm() + (p[8] - p[5]).norm();
    let scale = (REFERENCE_BONES[5] + REFERENCE_BONES[8]) / leg(first);
    let mut out = Vec::with_capacity(joints.len());
    for (t, pose) in joints.iter().enumerate() {
        if pose.iter().any(|j| !j.iter().all(|x| x.is_finite())) {
            bail!("frame {t} has a joint that is not a finite position")
        }
        let heading = between(&facing(pose), &Vector3::z());
        let rotations = chain_rotations(pose, heading);
        out.push(chain_positions(
            &rotations,
            &REFERENCE_BONES,
            pose[0] * scale,
        ));
    }
    Ok(out)
}
