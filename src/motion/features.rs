//! HumanML3D's 263 motion features (Guo et al. 2022) from joint positions, and joint positions back
//! from the features (the recover-from-root-relative-positions path every MLD/MotionLCM-style model
//! decodes through).
//!
//! Per frame t of a clip of T poses (T − 1 feature rows):
//! `[0]` root angular velocity about Y (half the angle turned from t to t+1, radians),
//! `[1..3]` root linear velocity in XZ (in the body's heading frame at t+1), `[3]` root height,
//! `[4..67]` the 21 non-root joints relative to the root's ground position, in the heading frame,
//! `[67..193]` the 21 joints' local rotations as 6D (the first two columns of the matrix),
//! `[193..259]` all 22 joints' velocities in the heading frame, `[259..263]` foot contacts (left
//! ankle, left toe, right ankle, right toe).
//!
//! Before the features, a clip is canonicalised: floor at y = 0, the first root at the XZ origin,
//! the first pose facing +Z. The heading rotation of frame t maps the pose's facing direction
//! (smoothed over time, σ = 20 frames, as HumanML3D) onto +Z; the first frame's is the identity.
//!
//! Deviation from HumanML3D's scripts: their inverse kinematics unpacks the face joints in another
//! order than their canonicalisation (hips swapped), so their heading is measured from a
//! half-cancelled across vector. Here both use the evident intent (right − left for hips and
//! shoulders). Positions recovered from the features do not depend on it.

use anyhow::{bail, Result};
use nalgebra::{UnitQuaternion, Vector3};

use super::skeleton::{facing, rest_direction, Pose, CHAINS, JOINTS, LEFT_FOOT, RIGHT_FOOT};

/// Numbers per frame.
pub const FEATURES: usize = 263;
/// Frames per second of the representation.
pub const FPS: f64 = 20.0;

const RIC: usize = 4;
const ROT: usize = RIC + (JOINTS - 1) * 3;
const VEL: usize = ROT + (JOINTS - 1) * 6;
const FEET: usize = VEL + JOINTS * 3;

type Quat = UnitQuaternion<f64>;

/// How features are computed.
#[derive(Debug, Clone, Copy)]
pub struct FeatureOptions {
    /// A foot is in contact when its squared displacement between frames is below this (m²;
    /// HumanML3D: 0.002).
    pub contact_threshold: f64,
    /// Smooth the heading over time (Gaussian, σ = 20 frames) as HumanML3D does.
    pub smooth_heading: bool,
}

impl Default for FeatureOptions {
    fn default() -> Self {
        Self {
            contact_threshold: 0.002,
            smooth_heading: true,
        }
    }
}

/// The rotation taking `from` onto `to` (the shortest one; a half turn about a perpendicular
/// axis when they are opposite).
pub fn between(from: &Vector3<f64>, to: &Vector3<f64>) -> Quat {
    UnitQuaternion::rotation_between(from, to).unwrap_or_else(|| {
        let axis = from.cross(&Vector3::x());
        let axis = if axis.norm() < 1e-9 {
            from.cross(&Vector3::y())
        } else {
            axis
        };
        UnitQuaternion::from_axis_angle(&nalgebra::Unit::new_normalize(axis), std::f64::consts::PI)
    })
}

/// The clip on the floor (lowest joint at y = 0), its first root at the XZ origin, its first pose
/// facing +Z: the frame HumanML3D's features are measured in.
pub fn canonicalise(joints: &[Pose]) -> Result<Vec<Pose>> {
    let Some(first) = joints.first() else {
        bail!("an empty clip has no features")
    };
    let floor = joints
        .iter()
        .flat_map(|p| p.iter().map(|j| j.y))
        .fold(f64::INFINITY, f64::min);
    let origin = Vector3::new(first[0].x, floor, first[0].z);
    let turn = between(&facing(first), &Vector3::z());
    Ok(joints
        .iter()
        .map(|p| std::array::from_fn(|j| turn * (p[j] - origin)))
        .collect())
}

/// The heading rotation of each frame: the (smoothed) facing direction onto +Z, the first frame's
/// the identity.
fn headings(joints: &[Pose], smooth: bool) -> Vec<Quat> {
    let mut dirs: Vec<Vector3<f64>> = joints.iter().map(facing).collect();
    if smooth {
        dirs = gaussian_smooth(&dirs, 20.0);
    }
    let mut out: Vec<Quat> = dirs
        .iter()
        .map(|d| between(&d.normalize(), &Vector3::z()))
        .collect();
    out[0] = Quat::identity();
    out
}

/// scipy's `gaussian_filter1d(x, sigma, mode='nearest')` (truncated at 4σ) over time.
fn gaussian_smooth(x: &[Vector3<f64>], sigma: f64) -> Vec<Vector3<f64>> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let weights: Vec<f64> = (-radius..=radius)
        .map(|k| (-0.5 * (k as f64 / sigma).powi(2)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let n = x.len() as i64;
    (0..n)
        .map(|i| {
            (-radius..=radius)
                .zip(&weights)
                .map(|(k, w)| x[(i + k).clamp(0, n - 1) as usize] * (w / total))
                .sum()
        })
        .collect()
}

/// Each joint's rotation as HumanML3D's inverse kinematics defines it: walking each chain from its
/// start (whose frame is the heading), the rotation of the bone ending at a joint is the shortest
/// one from its rest direction onto its direction, taken relative to the previous bone's. Index 0
/// holds the heading.
pub fn chain_rotations(pose: &Pose, heading: Quat) -> [Quat; JOINTS] {
    let mut out = [Quat::identity(); JOINTS];
    out[0] = heading;
    for chain in CHAINS {
        let mut parent = heading;
        for w in chain.windows(2) {
            let dir = (pose[w[1]] - pose[w[0]]).normalize();
            let global = between(&rest_direction(w[1]), &dir);
            out[w[1]] = parent.inverse() * global;
            parent = global;
        }
    }
    out
}

/// Joint positions from [`chain_rotations`], the bone lengths (by the joint each bone ends at) and
/// the root's position: HumanML3D's forward kinematics.
pub fn chain_positions(
    rotations: &[Quat; JOINTS],
    bones: &[f64; JOINTS],
    root: Vector3<f64>,
) -> Pose {
    let mut pose = [root; JOINTS];
    for chain in CHAINS {
        let mut r = rotations[0];
        for w in chain.windows(2) {
            r *= rotations[w[1]];
            pose[w[1]] = pose[w[0]] + r * (rest_direction(w[1]) * bones[w[1]]);
        }
    }
    pose
}

/// The 6D form of a rotation: the first two columns of its matrix.
pub fn to_6d(q: &Quat) -> [f64; 6] {
    let m = q.to_rotation_matrix();
    let m = m.matrix();
    [
        m[(0, 0)],
        m[(1, 0)],
        m[(2, 0)],
        m[(0, 1)],
        m[(1, 1)],
        m[(2, 1)],
    ]
}

/// HumanML3D features of a clip of at least two poses: `T − 1` rows of [`FEATURES`], row-major.
pub fn features(joints: &[Pose], opts: &FeatureOptions) -> Result<Vec<f32>> {
    if joints.len() < 2 {
        bail!(
            "a clip needs at least 2 frames for features, got {}",
            joints.len()
        )
    }
    let global = canonicalise(joints)?;
    let heads = headings(&global, opts.smooth_heading);
    let t_out = global.len() - 1;
    let mut out = vec![0f32; t_out * FEATURES];
    for (t, row) in out.chunks_mut(FEATURES).enumerate() {
        let (pose, next) = (&global[t], &global[t + 1]);
        let (h, h_next) = (heads[t], heads[t + 1]);
        // Turn from t to t+1 as a quaternion with w ≥ 0: its y is sin(half the angle).
        let turn = (h_next * h.inverse()).into_inner();
        let y = if turn.w < 0.0 { -turn.j } else { turn.j };
        row[0] = y.clamp(-1.0, 1.0).asin() as f32;
        let v = h_next * (next[0] - pose[0]);
        row[1] = v.x as f32;
        row[2] = v.z as f32;
        row[3] = pose[0].y as f32;
        let ground = Vector3::new(pose[0].x, 0.0, pose[0].z);
        for j in 1..JOINTS {
            let p = h * (pose[j] - ground);
            row[RIC + (j - 1) * 3..][..3].copy_from_slice(&[p.x as f32, p.y as f32, p.z as f32]);
        }
        let rots = chain_rotations(pose, h);
        for j in 1..JOINTS {
            let r6 = to_6d(&rots[j]).map(|x| x as f32);
            row[ROT + (j - 1) * 6..][..6].copy_from_slice(&r6);
        }
        for j in 0..JOINTS {
            let v = h * (next[j] - pose[j]);
            row[VEL + j * 3..][..3].copy_from_slice(&[v.x as f32, v.y as f32, v.z as f32]);
        }
        for (k, &j) in LEFT_FOOT.iter().chain(&RIGHT_FOOT).enumerate() {
            let still = (next[j] - pose[j]).norm_squared() < opts.contact_threshold;
            row[FEET + k] = f32::from(u8::from(still));
        }
    }
    Ok(out)
}

/// Joint positions from features (`frames × FEATURES`, row-major): the root integrated from its
/// velocities and heading changes, the other joints from their root-relative positions.
pub fn joints_from_features(features: &[f32]) -> Result<Vec<Pose>> {
    if features.is_empty() || !features.len().is_multiple_of(FEATURES) {
        bail!(
            "motion features must be rows of {FEATURES} numbers, got {} numbers",
            features.len()
        )
    }
    let rows: Vec<&[f32]> = features.chunks(FEATURES).collect();
    let mut out = Vec::with_capacity(rows.len());
    let (mut angle, mut root) = (0f64, Vector3::<f64>::zeros());
    for (t, row) in rows.iter().enumerate() {
        if t > 0 {
            let prev = rows[t - 1];
            angle += prev[0] as f64;
            let h = UnitQuaternion::from_axis_angle(&Vector3::y_axis(), 2.0 * angle);
            root += h.inverse() * Vector3::new(prev[1] as f64, 0.0, prev[2] as f64);
        }
        let h_inv = UnitQuaternion::from_axis_angle(&Vector3::y_axis(), -2.0 * angle);
        let mut pose = [Vector3::new(root.x, row[3] as f64, root.z); JOINTS];
        for (j, p) in pose.iter_mut().enumerate().skip(1) {
            let r = &row[RIC + (j - 1) * 3..][..3];
            let local = Vector3::new(r[0] as f64, r[1] as f64, r[2] as f64);
            *p = h_inv * local + Vector3::new(root.x, 0.0, root.z);
        }
        out.push(pose);
    }
    Ok(out)
}

/// Feature rows of `b` after those of `a`, the last `blend` rows of `a` cross-faded into `b`'s
/// first. The rows are heading-relative, so `b` continues from where `a` ended.
pub fn concat_rows(a: &[f32], b: &[f32], blend: usize) -> Vec<f32> {
    let (na, nb) = (a.len() / FEATURES, b.len() / FEATURES);
    let k = blend.min(na).min(nb);
    let mut out = a[..(na - k) * FEATURES].to_vec();
    for i in 0..k {
        let w = (i + 1) as f32 / (k + 1) as f32;
        let (ra, rb) = (
            &a[(na - k + i) * FEATURES..][..FEATURES],
            &b[i * FEATURES..][..FEATURES],
        );
        out.extend(ra.iter().zip(rb).map(|(x, y)| x * (1.0 - w) + y * w));
    }
    out.extend_from_slice(&b[k * FEATURES..]);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::motion::skeleton::{bone_lengths, reference_offsets, REFERENCE_BONES};

    /// A walking-like synthetic clip on the reference skeleton: the root travels along a curve and
    /// turns, the legs swing, the arms wave — every joint moves and the heading changes.
    pub(crate) fn synthetic_clip(frames: usize) -> Vec<Pose> {
        let off = reference_offsets();
        (0..frames)
            .map(|t| {
                let s = t as f64 / FPS;
                let heading = UnitQuaternion::from_axis_angle(&Vector3::y_axis(), 0.8 * s + 0.3);
                let swing = |phase: f64, amp: f64, axis: Vector3<f64>| {
                    UnitQuaternion::from_axis_angle(
                        &nalgebra::Unit::new_normalize(axis),
                        amp * (6.0 * s + phase).sin(),
                    )
                };
                let mut rot = [Quat::identity(); JOINTS];
                rot[0] = heading;
                rot[1] = swing(0.0, 0.5, Vector3::x());
                rot[2] = swing(std::f64::consts::PI, 0.5, Vector3::x());
                rot[4] = swing(1.0, 0.4, Vector3::x());
                rot[5] = swing(2.0, 0.4, Vector3::x());
                rot[13] = swing(0.5, 0.3, Vector3::z());
                rot[16] = swing(0.2, 0.9, Vector3::new(1.0, 0.0, 1.0));
                rot[17] = swing(1.2, 0.7, Vector3::new(0.0, 1.0, 1.0));
                rot[18] = swing(0.7, 0.6, Vector3::x());
                rot[6] = swing(0.1, 0.1, Vector3::z());
                let root =
                    Vector3::new(0.9 * s.sin() + 1.0, 0.95 + 0.03 * (12.0 * s).sin(), 1.2 * s);
                // A plain forward kinematics along the chains, bones of the reference skeleton.
                let mut pose = [root; JOINTS];
                let mut global = [Quat::identity(); JOINTS];
                global[0] = heading;
                for chain in CHAINS {
                    for w in chain.windows(2) {
                        let g = global[w[0]] * rot[w[1]];
                        global[w[1]] = g;
                        pose[w[1]] = pose[w[0]] + g * off[w[1]];
                    }
                }
                pose
            })
            .collect()
    }

    fn max_diff(a: &[Pose], b: &[Pose]) -> f64 {
        a.iter()
            .zip(b)
            .flat_map(|(p, q)| p.iter().zip(q).map(|(x, y)| (x - y).norm()))
            .fold(0.0, f64::max)
    }

    #[test]
    fn joints_round_trip_through_the_features() -> Result<()> {
        let clip = synthetic_clip(60);
        for smooth in [true, false] {
            let opts = FeatureOptions {
                smooth_heading: smooth,
                ..Default::default()
            };
            let f = features(&clip, &opts)?;
            assert_eq!(f.len(), 59 * FEATURES);
            let back = joints_from_features(&f)?;
            let canon = canonicalise(&clip)?;
            let d = max_diff(&back, &canon[..59]);
            assert!(
                d < 1e-4,
                "recovered joints differ by {d} m (smooth {smooth})"
            );
        }
        Ok(())
    }

    #[test]
    fn canonical_clips_stand_on_the_floor_at_the_origin_facing_forward() -> Result<()> {
        let canon = canonicalise(&synthetic_clip(30))?;
        let lowest = canon
            .iter()
            .flat_map(|p| p.iter().map(|j| j.y))
            .fold(f64::INFINITY, f64::min);
        assert!(lowest.abs() < 1e-12);
        assert!(canon[0][0].x.abs() < 1e-12 && canon[0][0].z.abs() < 1e-12);
        assert!((facing(&canon[0]) - Vector3::z()).norm() < 1e-9);
        // Rigid motions keep bone lengths.
        let b = bone_lengths(&canon[17]);
        for j in 1..JOINTS {
            assert!((b[j] - REFERENCE_BONES[j]).abs() < 1e-9);
        }
        Ok(())
    }

    #[test]
    fn chain_rotations_reproduce_the_pose() -> Result<()> {
        for pose in canonicalise(&synthetic_clip(40))? {
            let h = between(&facing(&pose), &Vector3::z());
            let rots = chain_rotations(&pose, h);
            let back = chain_positions(&rots, &bone_lengths(&pose), pose[0]);
            let d = max_diff(&[back], &[pose]);
            assert!(d < 1e-9, "{d}");
        }
        Ok(())
    }

    #[test]
    fn features_hold_what_the_layout_says() -> Result<()> {
        let clip = synthetic_clip(40);
        let f = features(&clip, &FeatureOptions::default())?;
        let canon = canonicalise(&clip)?;
        let row = &f[..FEATURES];
        // Root height, and the first frame's heading is the identity: positions are root-relative.
        assert!((row[3] as f64 - canon[0][0].y).abs() < 1e-6);
        let l_hip = canon[0][1] - Vector3::new(canon[0][0].x, 0.0, canon[0][0].z);
        assert!((row[RIC] as f64 - l_hip.x).abs() < 1e-6);
        // 6D rotations have unit columns; contacts are 0 or 1.
        let c0 = &row[ROT..ROT + 3];
        assert!((c0.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(row[FEET..].iter().all(|&c| c == 0.0 || c == 1.0));
        // Bad input is refused with a message.
        assert!(features(&clip[..1], &FeatureOptions::default()).is_err());
        assert!(joints_from_features(&f[..100]).is_err());
        Ok(())
    }

    #[test]
    fn gaussian_smoothing_is_scipys_truncated_kernel() {
        // σ = 1 truncates at 4: w_k = exp(−k²/2) / Σ_{|k|≤4} exp(−k²/2); an impulse gives w back,
        // and 'nearest' repeats the edge values.
        let x: Vec<Vector3<f64>> = [0.0, 0.0, 1.0, 0.0, 0.0, 2.0]
            .iter()
            .map(|&v| Vector3::new(v, 0.0, 0.0))
            .collect();
        let y = gaussian_smooth(&x, 1.0);
        let total: f64 = (-4i32..=4).map(|k| (-0.5 * (k * k) as f64).exp()).sum();
        let w = |k: i32| (-0.5 * (k * k) as f64).exp() / total;
        assert!(
            (y[2].x - (w(0) + 2.0 * (w(3) + w(4)))).abs() < 1e-12,
            "{}",
            y[2].x
        );
        // The last sample sees 2 at offsets 0..=4 (clamped): w0 + w1 + … + w4, and 1 at −3.
        let edge = (0..=4).map(w).sum::<f64>() * 2.0 + w(3);
        assert!((y[5].x - edge).abs() < 1e-12, "{}", y[5].x);
    }
}
