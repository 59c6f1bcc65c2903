//! DeepMimic's humanoid motion clips (`humanoid3d_*.txt`, shipped in PyPI `pybullet`'s
//! `pybullet_data/data/motions/`): JSON `{"Loop": …, "Frames": [[44 numbers] …]}` of one frame
//! each — duration, root position (m), root rotation, then the local rotations of chest, neck,
//! right hip, knee, ankle, shoulder, elbow and the same on the left; spherical joints as
//! quaternions (w, x, y, z), knees and elbows as one angle about the joint's Z axis. Y is up and
//! the character faces +X (its right hip at +Z).
//!
//! [`joints`] runs the skeleton's forward kinematics (`pybullet_data/humanoid/humanoid.urdf`,
//! used at scale 0.25) and places the 22 SMPL joints on it: those the humanoid has (pelvis, hips,
//! knees, ankles, shoulders, elbows, wrists, neck) at its joints, the others from their
//! neighbours — spine1 halfway up the pelvis–chest segment, spine2 at the chest, spine3 a little
//! above it, the collars between the chest top and the shoulders, the head at the centre of the
//! head sphere's lower half, the toes at the front of the foot box.

use std::path::Path;

use anyhow::{bail, Context, Result};
use nalgebra::{Quaternion, UnitQuaternion, Vector3};

use super::skeleton::Pose;

/// URDF lengths are in units of 0.25 m (the scale pybullet loads the humanoid at).
const UNIT: f64 = 0.25;

/// Numbers per frame.
const FRAME_LEN: usize = 44;

/// A clip: the 22 joints per frame and the frame duration.
pub struct Clip {
    pub joints: Vec<Pose>,
    /// Seconds per frame (the file's first number, constant within a clip).
    pub dt: f64,
}

#[derive(serde::Deserialize)]
struct File {
    #[serde(rename = "Frames")]
    frames: Vec<Vec<f64>>,
}

fn v(x: f64, y: f64, z: f64) -> Vector3<f64> {
    Vector3::new(x, y, z) * UNIT
}

fn quat(f: &[f64]) -> UnitQuaternion<f64> {
    UnitQuaternion::from_quaternion(Quaternion::new(f[0], f[1], f[2], f[3]))
}

/// One frame's 22 joints.
fn frame_joints(f: &[f64]) -> Pose {
    let z_rot = |a: f64| UnitQuaternion::from_axis_angle(&Vector3::z_axis(), a);
    let root = Vector3::new(f[1], f[2], f[3]);
    let r_root = quat(&f[4..8]);
    let chest = root + r_root * v(0.0, 0.944_604, 0.0);
    let r_chest = r_root * quat(&f[8..12]);
    let neck = chest + r_chest * v(0.0, 0.895_576, 0.0);
    let r_neck = r_chest * quat(&f[12..16]);
    // One leg: hip rotation, knee angle, ankle rotation → hip, knee, ankle, toe.
    let leg = |side: f64, o: usize| -> [Vector3<f64>; 4] {
        let hip = root + r_root * v(0.0, 0.0, 0.339_548 * side);
        let r_hip = r_root * quat(&f[o..o + 4]);
        let knee = hip + r_hip * v(0.0, -1.686_184, 0.0);
        let r_knee = r_hip * z_rot(f[o + 4]);
        let ankle = knee + r_knee * v(0.0, -1.639_48, 0.0);
        let r_ankle = r_knee * quat(&f[o + 5..o + 9]);
        // The front of the foot box (centre 0.18, size 0.708 along X), near the sole.
        let toe = ankle + r_ankle * v(0.45, -0.16, 0.0);
        [hip, knee, ankle, toe]
    };
    // One arm: the shoulder on the chest, the collar between the chest top and it.
    let arm = |side: f64, o: usize| -> [Vector3<f64>; 4] {
        let shoulder = chest + r_chest * v(-0.0962, 0.974, 0.732_44 * side);
        let collar = chest + r_chest * v(-0.0962, 0.894, 0.28 * side);
        let r_sh = r_chest * quat(&f[o..o + 4]);
        let elbow = shoulder + r_sh * v(0.0, -1.099_152, 0.0);
        let r_elbow = r_sh * z_rot(f[o + 4]);
        let wrist = elbow + r_elbow * v(0.0, -1.035_788, 0.0);
        [collar, shoulder, elbow, wrist]
    };
    let [r_hip, r_knee, r_ankle, r_toe] = leg(1.0, 16);
    let [r_collar, r_shoulder, r_elbow, r_wrist] = arm(1.0, 25);
    let [l_hip, l_knee, l_ankle, l_toe] = leg(-1.0, 30);
    let [l_collar, l_shoulder, l_elbow, l_wrist] = arm(-1.0, 39);
    let spine1 = root + r_root * v(0.0, 0.472, 0.0);
    let spine3 = chest + r_chest * v(0.0, 0.24, 0.0);
    let head = neck + r_neck * v(0.0, 0.4, 0.0);
    [
        root, l_hip, r_hip, spine1, l_knee, r_knee, chest, l_ankle, r_ankle, spine3, l_toe, r_toe,
        neck, l_collar, r_collar, head, l_shoulder, r_shoulder, l_elbow, r_elbow, l_wrist, r_wrist,
    ]
}

/// Read a DeepMimic humanoid clip.
pub fn read(path: &Path) -> Result<Clip> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: File = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a DeepMimic motion file", path.display()))?;
    if file.frames.is_empty() {
        bail!("{}: no frames", path.display())
    }
    if let Some((i, f)) = file
        .frames
        .iter()
        .enumerate()
        .find(|(_, f)| f.len() != FRAME_LEN)
    {
        bail!(
            "{}: frame {i} has {} numbers, a humanoid frame has {FRAME_LEN} (is it another character?)",
            path.display(),
            f.len()
        )
    }
    let dt = file.frames[0][0];
    if !(dt.is_finite() && dt > 0.0) {
        bail!("{}: frame duration {dt} is not positive", path.display())
    }
    Ok(Clip {
        joints: file.frames.iter().map(|f| frame_joints(f)).collect(),
        dt,
    })
}
