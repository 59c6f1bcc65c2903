//! Upper-body gestures laid over any motion (waving, raising a hand, clapping), made in joint
//! space: the shoulders stay where the body puts them, and the elbow and wrist are placed along
//! new bone directions at the bones' own lengths, so the skeleton keeps its proportions and the
//! features recomputed from the result stay consistent. Four minutes of capture hold no waves or
//! claps; these let captions speak of hands, sides and counts.

use nalgebra::Vector3;
use serde::{Deserialize, Serialize};

use super::skeleton::{facing, Side};
use super::{Pose, FPS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gesture {
    /// One hand up beside the head, the forearm swaying (no count).
    Wave,
    /// One straight arm lifted forward-up overhead and lowered, `count` times.
    Raise,
    /// Both hands meeting in front of the chest, `count` times (no side).
    Clap,
}

/// Frames over which the arm moves from its own motion into the gesture and back.
const BLEND: usize = 8;

/// One rep's length in seconds (a raise goes up and down; a clap opens and closes).
fn period(g: Gesture) -> f64 {
    match g {
        Gesture::Wave => 0.6,
        Gesture::Raise => 1.6,
        Gesture::Clap => 0.5,
    }
}

/// The body's frame at a pose: forward (horizontal), the body's left (horizontal), up.
fn body_frame(p: &Pose) -> (Vector3<f64>, Vector3<f64>, Vector3<f64>) {
    let f = facing(p);
    let up = Vector3::y();
    (f, up.cross(&f), up)
}

/// The frames `[start, end)` a gesture of `count` reps occupies in a clip of `n` frames: waves
/// take the whole clip, counted gestures the middle, at their natural pace where it fits.
pub fn span(g: Gesture, count: u32, n: usize) -> (usize, usize) {
    if g == Gesture::Wave {
        return (0, n);
    }
    let want = (period(g) * FPS * count.max(1) as f64).round() as usize + 2 * BLEND;
    let len = want.min(n);
    let start = (n - len) / 2;
    (start, start + len)
}

/// Two-bone inverse kinematics: the elbow for a shoulder `s`, a wrist target `t` and the bone
/// lengths, bent towards `pole`. The target is pulled within reach.
fn elbow_for(
    s: Vector3<f64>,
    t: Vector3<f64>,
    l1: f64,
    l2: f64,
    pole: Vector3<f64>,
) -> Vector3<f64> {
    let d = t - s;
    let dist = d.norm().clamp(1e-6, (l1 + l2) * 0.999);
    let axis = d.normalize();
    // Law of cosines: the elbow's distance along the axis and off it.
    let a = (l1 * l1 - l2 * l2 + dist * dist) / (2.0 * dist);
    let h = (l1 * l1 - a * a).max(0.0).sqrt();
    let bend = (pole - axis * pole.dot(&axis)).normalize();
    s + axis * a + bend * h
}

/// Unit upper-arm and forearm directions of the gesture for arm `side` at frame `i` of the span
/// (`phase` counts reps from 0 at the span's first gesture frame), given the pose's shoulders.
fn directions(
    g: Gesture,
    side: Side,
    p: &Pose,
    phase: f64,
    lengths: (f64, f64),
) -> (Vector3<f64>, Vector3<f64>) {
    let (f, left, up) = body_frame(p);
    let out = match side {
        Side::Left => left,
        Side::Right => -left,
    };
    let tau = std::f64::consts::TAU;
    match g {
        Gesture::Wave => {
            let upper = (out * 0.75 + up * 0.55 + f * 0.2).normalize();
            let fore = (up + out * 0.55 * (tau * phase).sin()).normalize();
            (upper, fore)
        }
        Gesture::Raise => {
            // Elevation 0 (hanging) → 160° (overhead) → 0, eased, within each rep.
            let x = phase.fract();
            let e = (1.0 - (tau * x).cos()) / 2.0;
            let a = 160f64.to_radians() * e;
            let ahead = (f + out * 0.35).normalize();
            let d = (-up * a.cos() + ahead * a.sin()).normalize();
            (d, d)
        }
        Gesture::Clap => {
            let (l1, l2) = lengths;
            let s = p[side.shoulder()];
            let mid = (p[Side::Left.shoulder()] + p[Side::Right.shoulder()]) / 2.0;
            // The hands meet at each rep's middle and are 45 cm apart between claps.
            let open = (1.0 + (tau * phase).cos()) / 2.0;
            let target = mid + f * 0.38 - up * 0.12 + out * (0.03 + 0.2 * open);
            let elbow = elbow_for(s, target, l1, l2, out - up * 0.5);
            let wrist_dir = target - elbow;
            ((elbow - s).normalize(), wrist_dir.normalize())
        }
    }
}

/// Lay `g` over `joints` for arm `side` (both arms for a clap), `count` reps (waves ignore it).
pub fn apply(joints: &[Pose], g: Gesture, side: Side, count: u32) -> Vec<Pose> {
    let n = joints.len();
    let (start, end) = span(g, count, n);
    let arms: &[Side] = match g {
        Gesture::Clap => &[Side::Left, Side::Right],
        _ => std::slice::from_ref(&side),
    };
    let reps = count.max(1) as f64;
    let active = (end - start).saturating_sub(2 * BLEND).max(1) as f64;
    let mut out = joints.to_vec();
    for (i, p) in out.iter_mut().enumerate().take(end).skip(start) {
        // The gesture's weight ramps in and out over BLEND frames at the span's ends (a wave
        // spanning the clip starts and ends in it).
        let k = i - start;
        let w = if g == Gesture::Wave {
            1.0
        } else {
            let ramp = |d: usize| ((d + 1) as f64 / (BLEND + 1) as f64).min(1.0);
            ramp(k).min(ramp(end - 1 - i))
        };
        let phase = match g {
            Gesture::Wave => i as f64 / (period(g) * FPS),
            _ => ((k as f64 - BLEND as f64) / active * reps).clamp(0.0, reps - 1e-9),
        };
        for &arm in arms {
            let (s, e, wr) = (arm.shoulder(), arm.elbow(), arm.wrist());
            let l1 = (p[e] - p[s]).norm();
            let l2 = (p[wr] - p[e]).norm();
            let (u, v) = directions(g, arm, p, phase, (l1, l2));
            // Blend each bone's direction (never opposite here: gestures lift the arm, own
            // motion hangs it) and renormalise, keeping the lengths.
            let mix = |own: Vector3<f64>, new: Vector3<f64>| {
                let m = own.normalize() * (1.0 - w) + new * w;
                if m.norm() < 1e-6 {
                    new
                } else {
                    m.normalize()
                }
            };
            let u = mix(p[e] - p[s], u);
            let v = mix(p[wr] - p[e], v);
            p[e] = p[s] + u * l1;
            p[wr] = p[e] + v * l2;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::motion::skeleton::{bone_lengths, reference_offsets, PARENTS};

    /// The reference skeleton standing still, feet on the floor, for `n` frames.
    fn standing(n: usize) -> Vec<Pose> {
        let off = reference_offsets();
        let mut p = [Vector3::zeros(); 22];
        for j in 1..22 {
            p[j] = p[PARENTS[j].expect("parent")] + off[j];
        }
        let floor = p.iter().map(|v| v.y).fold(f64::MAX, f64::min);
        vec![p.map(|v| v - Vector3::y() * floor); n]
    }

    #[test]
    fn gestures_keep_bones_and_move_the_stated_arm() {
        let still = standing(80);
        let before = bone_lengths(&still[0]);
        for (g, side) in [
            (Gesture::Wave, Side::Left),
            (Gesture::Raise, Side::Right),
            (Gesture::Clap, Side::Left),
        ] {
            let moved = apply(&still, g, side, 2);
            for p in &moved {
                let after = bone_lengths(p);
                for j in 0..22 {
                    assert!((after[j] - before[j]).abs() < 1e-9, "{g:?} bone {j}");
                }
            }
            let top = |s: Side| {
                moved
                    .iter()
                    .map(|p| p[s.wrist()].y - p[s.shoulder()].y)
                    .fold(f64::MIN, f64::max)
            };
            match g {
                Gesture::Clap => {
                    // The hands meet (closer than 10 cm) and part again.
                    let gap: Vec<f64> = moved.iter().map(|p| (p[20] - p[21]).norm()).collect();
                    let min = gap.iter().copied().fold(f64::MAX, f64::min);
                    assert!(min < 0.1, "hands never meet: {min}");
                }
                _ => {
                    assert!(top(side) > 0.2, "{g:?}: the {side:?} hand stays low");
                    assert!(top(side.other()) < 0.0, "{g:?}: the other hand rose");
                }
            }
        }
    }
}
