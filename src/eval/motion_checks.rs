//! What can be measured of a motion from its joints alone (metres, Y up, 20 fps): physical
//! plausibility — foot skating, jitter, floor penetration, as the motion-generation literature
//! reports them — and the program-level facts a caption states (how far it turned and to which
//! side, whether it travelled forwards or backwards, how fast), to check adherence.

use crate::data::motion::{Gesture, Overlay, Step};
use crate::motion::skeleton::{facing, Side, LEFT_FOOT, RIGHT_FOOT};
use crate::motion::{Pose, FPS};

/// A foot counts as on the ground below this height (m).
const CONTACT_HEIGHT: f64 = 0.05;
/// A grounded foot skates when it moves more than this horizontally in one frame (m; GMD's 2.5 cm).
const SKATE_STEP: f64 = 0.025;

/// The figures of one clip.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Plausibility {
    /// Fraction of frame pairs in which a foot on the ground slides more than 2.5 cm.
    pub foot_skating: f64,
    /// Mean magnitude of the joints' jerk (third derivative of position), m/s³.
    pub jitter: f64,
    /// Mean depth of the feet below the floor (y < 0), m.
    pub penetration: f64,
}

/// Plausibility of `joints` (at least four frames for the jerk; fewer give 0 jitter).
pub fn plausibility(joints: &[Pose]) -> Plausibility {
    let feet: Vec<usize> = LEFT_FOOT.iter().chain(&RIGHT_FOOT).copied().collect();
    let (mut skating, mut pairs) = (0usize, 0usize);
    for w in joints.windows(2) {
        pairs += 1;
        let skid = feet.iter().any(|&j| {
            let (a, b) = (w[0][j], w[1][j]);
            let grounded = a.y.min(b.y) < CONTACT_HEIGHT;
            grounded && (b.xz() - a.xz()).norm() > SKATE_STEP
        });
        skating += usize::from(skid);
    }
    let mut jerk = 0.0;
    let mut n_jerk = 0usize;
    for w in joints.windows(4) {
        for (((a, b), c), d) in w[0].iter().zip(&w[1]).zip(&w[2]).zip(&w[3]) {
            let d3 = d - c * 3.0 + b * 3.0 - a;
            jerk += d3.norm() * FPS.powi(3);
            n_jerk += 1;
        }
    }
    let depth: f64 = joints
        .iter()
        .flat_map(|p| feet.iter().map(move |&j| (-p[j].y).max(0.0)))
        .sum();
    let n_feet = (joints.len() * feet.len()).max(1) as f64;
    Plausibility {
        foot_skating: if pairs == 0 {
            0.0
        } else {
            skating as f64 / pairs as f64
        },
        jitter: if n_jerk == 0 {
            0.0
        } else {
            jerk / n_jerk as f64
        },
        penetration: depth / n_feet,
    }
}

/// A reconstruction `b` of clip `a` (same length, same frame): the mean per-joint position error
/// and the root's distance at the last frame (drift), both in metres.
pub fn reconstruction_error(a: &[Pose], b: &[Pose]) -> (f64, f64) {
    let n = a.len().min(b.len());
    if n == 0 {
        return (0.0, 0.0);
    }
    let per_joint: f64 = a
        .iter()
        .zip(b)
        .map(|(p, q)| p.iter().zip(q).map(|(u, v)| (u - v).norm()).sum::<f64>() / p.len() as f64)
        .sum();
    (per_joint / n as f64, (a[n - 1][0] - b[n - 1][0]).norm())
}

/// Facts of a clip's root path and heading.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Measured {
    /// Heading change from the first to the last frames, degrees, left positive (each end
    /// averaged over 5 frames, so the gait's sway cancels).
    pub turn: f64,
    /// Root travel along the first heading, m (negative: backwards).
    pub forward: f64,
    /// Mean horizontal root speed, m/s.
    pub speed: f64,
}

/// Measure a clip (at least two frames).
pub fn measure(joints: &[Pose]) -> Measured {
    let n = joints.len();
    let k = 5.min(n);
    let mean_facing = |ps: &[Pose]| {
        ps.iter()
            .map(facing)
            .fold(nalgebra::Vector3::zeros(), |a, f| a + f)
            .normalize()
    };
    let (f0, f1) = (mean_facing(&joints[..k]), mean_facing(&joints[n - k..]));
    // Left is +X when facing +Z: the yaw measured from +Z towards +X.
    let yaw = |f: nalgebra::Vector3<f64>| f.x.atan2(f.z).to_degrees();
    let mut turn = yaw(f1) - yaw(f0);
    turn -= 360.0 * (turn / 360.0).round();
    let travel = joints[n - 1][0] - joints[0][0];
    let path: f64 = joints
        .windows(2)
        .map(|w| (w[1][0].xz() - w[0][0].xz()).norm())
        .sum();
    Measured {
        turn,
        forward: travel.dot(&f0),
        speed: path / ((n.max(2) - 1) as f64 / FPS),
    }
}

/// Whether a locomotion step's clip did what the step says: turned to its side by its angle
/// (within `tolerance` degrees; a half turn either way) and travelled in its direction.
pub fn adheres(step: &Step, m: &Measured, tolerance: f64) -> bool {
    let turn_ok = if step.turn.abs() >= 150 {
        m.turn.abs() > 180.0 - tolerance
    } else {
        (m.turn - step.turn as f64).abs() <= tolerance
    };
    let direction_ok = if step.backward {
        m.forward < 0.0
    } else {
        m.forward > 0.0
    };
    turn_ok && direction_ok
}

/// How high a wrist must rise above its shoulder to count as raised (m), and how far below that
/// it must fall again before the next raise counts (hysteresis).
const RAISED: f64 = 0.1;
const LOWERED: f64 = -0.15;
/// Hands closer than this have met (m); they must part beyond `APART` before the next clap.
const MET: f64 = 0.12;
const APART: f64 = 0.25;

/// Rising crossings of `signal` above `high`, each counted once until it falls below `low`.
fn crossings(signal: impl Iterator<Item = f64>, high: f64, low: f64, rising: bool) -> u32 {
    let (mut armed, mut n) = (true, 0);
    for v in signal {
        let v = if rising { v } else { -v };
        let (high, low) = if rising { (high, low) } else { (-high, -low) };
        if armed && v > high {
            n += 1;
            armed = false;
        } else if !armed && v < low {
            armed = true;
        }
    }
    n
}

/// The hand raised highest above its shoulder, if either rises above it by 10 cm.
pub fn raised_hand(joints: &[Pose]) -> Option<Side> {
    let top = |s: Side| {
        joints
            .iter()
            .map(|p| p[s.wrist()].y - p[s.shoulder()].y)
            .fold(f64::MIN, f64::max)
    };
    let (l, r) = (top(Side::Left), top(Side::Right));
    (l.max(r) > RAISED).then_some(if l >= r { Side::Left } else { Side::Right })
}

/// How many times the `side` hand goes up above the shoulder.
pub fn raises(joints: &[Pose], side: Side) -> u32 {
    let h = joints
        .iter()
        .map(|p| p[side.wrist()].y - p[side.shoulder()].y);
    crossings(h, RAISED, LOWERED, true)
}

/// How many times the hands meet.
pub fn claps(joints: &[Pose]) -> u32 {
    let gap = joints.iter().map(|p| (p[20] - p[21]).norm());
    crossings(gap, MET, APART, false)
}

/// Every count a gesture check reads: the left hand's and the right hand's rises above the
/// shoulder, and the claps. Two clips with equal counts pass the same count checks.
pub fn gesture_counts(joints: &[Pose]) -> (u32, u32, u32) {
    (
        raises(joints, Side::Left),
        raises(joints, Side::Right),
        claps(joints),
    )
}

/// How high the lower foot must be above the clip's lowest foot point for the body to count as
/// airborne (m), and how close it must come back to it before the next flight counts. On the
/// data's jumps (DeepMimic's, ≈ 22 cm of toe clearance) this counts the jumps of all 142
/// single-step jump clips of every split exactly; runs have a flight each stride, cartwheels and
/// flips one.
const AIRBORNE: f64 = 0.12;
const LANDED: f64 = 0.05;

/// How many times both feet leave the ground: the jumps of a jumping clip. The floor is the
/// clip's lowest foot point, so a motion that floats or sinks as a whole still counts.
pub fn flights(joints: &[Pose]) -> u32 {
    let lower = |p: &Pose| {
        LEFT_FOOT
            .iter()
            .chain(&RIGHT_FOOT)
            .map(|&j| p[j].y)
            .fold(f64::MAX, f64::min)
    };
    let floor = joints.iter().map(lower).fold(f64::MAX, f64::min);
    crossings(
        joints.iter().map(|p| lower(p) - floor),
        AIRBORNE,
        LANDED,
        true,
    )
}

/// Whether a clip shows the gesture: its hand for waves and raises, its count for raises and
/// claps.
pub fn gesture_adheres(o: &Overlay, joints: &[Pose]) -> bool {
    match o.gesture {
        Gesture::Wave => o.side.is_some() && raised_hand(joints) == o.side,
        Gesture::Raise => o
            .side
            .is_some_and(|s| raised_hand(joints) == Some(s) && raises(joints, s) == o.count),
        Gesture::Clap => claps(joints) == o.count && raised_hand(joints).is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nalgebra::Vector3;

    fn standing(y_feet: f64) -> Pose {
        let mut p = [Vector3::new(0.0, 1.0, 0.0); 22];
        for j in LEFT_FOOT.iter().chain(&RIGHT_FOOT) {
            p[*j] = Vector3::new(0.0, y_feet, 0.0);
        }
        p
    }

    #[test]
    fn the_figures_have_their_closed_forms() {
        // Standing still on the floor: nothing skates, shakes or sinks.
        let still = vec![standing(0.0); 10];
        assert_eq!(
            plausibility(&still),
            Plausibility {
                foot_skating: 0.0,
                jitter: 0.0,
                penetration: 0.0
            }
        );
        // Sliding the whole body along the floor at 5 cm a frame: every pair skates; constant
        // velocity has no jerk.
        let slide: Vec<Pose> = (0..10)
            .map(|t| standing(0.0).map(|j| j + Vector3::new(0.05 * t as f64, 0.0, 0.0)))
            .collect();
        let s = plausibility(&slide);
        assert_eq!(s.foot_skating, 1.0);
        assert!(s.jitter < 1e-9, "{}", s.jitter);
        // The same slide in the air does not skate.
        let fly: Vec<Pose> = slide
            .iter()
            .map(|p| p.map(|j| j + Vector3::new(0.0, 0.5, 0.0)))
            .collect();
        assert_eq!(plausibility(&fly).foot_skating, 0.0);
        // Feet 2 cm under the floor.
        assert!((plausibility(&vec![standing(-0.02); 3]).penetration - 0.02).abs() < 1e-12);
        // One joint jumping 1 cm at one frame: jerk of the known size in the windows that see it.
        let mut shaky = still.clone();
        shaky[5][0].y += 0.01;
        let j = plausibility(&shaky).jitter;
        assert!(j > 0.0, "{j}");
    }

    #[test]
    fn gestures_are_measured_from_the_joints() {
        use crate::motion::gesture::apply;
        // The standing figure of the tests, arms hanging.
        let mut still = standing(0.0);
        for (s, x) in [(Side::Left, 0.2), (Side::Right, -0.2)] {
            still[s.shoulder()] = Vector3::new(x, 1.4, 0.0);
            still[s.elbow()] = Vector3::new(x, 1.14, 0.0);
            still[s.wrist()] = Vector3::new(x, 0.88, 0.0);
        }
        still[1] = Vector3::new(0.1, 1.0, 0.0);
        still[2] = Vector3::new(-0.1, 1.0, 0.0);
        let still = vec![still; 100];
        assert_eq!(raised_hand(&still), None);
        assert_eq!(claps(&still), 0);
        for count in 1..=3 {
            for side in [Side::Left, Side::Right] {
                let raise = Overlay {
                    gesture: Gesture::Raise,
                    side: Some(side),
                    count,
                };
                let clip = apply(&still, Gesture::Raise, side, count);
                assert_eq!(raises(&clip, side), count, "{side:?} ×{count}");
                assert!(gesture_adheres(&raise, &clip));
                let other = Overlay {
                    side: Some(side.other()),
                    ..raise.clone()
                };
                assert!(!gesture_adheres(&other, &clip), "the other hand passed");
                let wave = apply(&still, Gesture::Wave, side, 1);
                assert_eq!(raised_hand(&wave), Some(side));
            }
            let clap = apply(&still, Gesture::Clap, Side::Left, count);
            assert_eq!(claps(&clap), count, "claps ×{count}");
            assert_eq!(gesture_counts(&clap), (0, 0, count));
            let raise = apply(&still, Gesture::Raise, Side::Right, count);
            assert_eq!(gesture_counts(&raise), (0, count, 0));
        }
    }

    #[test]
    fn flights_count_the_jumps() {
        // Standing 2 s, then `n` hops of 30 cm (a parabola over 0.5 s), 0.5 s apart: n flights,
        // whatever the height the whole figure stands at.
        let hops = |n: usize, base: f64| -> Vec<Pose> {
            let mut clip = vec![standing(base); 40];
            for _ in 0..n {
                for t in 0..10 {
                    let u = t as f64 / 9.0;
                    let h = 0.3 * 4.0 * u * (1.0 - u);
                    clip.push(standing(base).map(|j| j + Vector3::new(0.0, h, 0.0)));
                }
                clip.extend(vec![standing(base); 10]);
            }
            clip
        };
        for n in 0..=3 {
            assert_eq!(flights(&hops(n, 0.0)), n as u32, "{n} hops");
            assert_eq!(flights(&hops(n, -0.3)), n as u32, "{n} hops, sunk");
        }
        // A crouch (the feet stay down) and a hop below the threshold are not jumps.
        let low: Vec<Pose> = (0..20)
            .map(|t| {
                let h = if (5..10).contains(&t) { 0.1 } else { 0.0 };
                standing(0.0).map(|j| j + Vector3::new(0.0, h, 0.0))
            })
            .collect();
        assert_eq!(flights(&low), 0);
        // One foot up (a kick) is not a flight: the other stays down.
        let mut kick = vec![standing(0.0); 20];
        for p in &mut kick[5..10] {
            for j in LEFT_FOOT {
                p[j].y = 0.5;
            }
        }
        assert_eq!(flights(&kick), 0);
    }

    #[test]
    fn programs_are_measured_from_the_joints() {
        use crate::data::motion::{Action, Speed, Step};
        // Walking a quarter circle to the left at 1 m/s: +90°, forwards, speed 1.
        let r = 40.0 / std::f64::consts::PI; // the radius of a 20 m quarter circle
        let frames = 200;
        let arc: Vec<Pose> = (0..frames)
            .map(|t| {
                let a = std::f64::consts::FRAC_PI_2 * t as f64 / (frames - 1) as f64;
                // Centre at (r, 0): starts at the origin facing +Z, curves towards +X (left).
                let root = Vector3::new(r - r * a.cos(), 1.0, r * a.sin());
                let f = Vector3::new(a.sin(), 0.0, a.cos());
                let across = Vector3::y().cross(&f); // the body's left
                let mut p = [root; 22];
                // Hips and shoulders: left at +across.
                p[1] = root + across * 0.1;
                p[2] = root - across * 0.1;
                p[16] = root + across * 0.2 + Vector3::y() * 0.5;
                p[17] = root - across * 0.2 + Vector3::y() * 0.5;
                p
            })
            .collect();
        let m = measure(&arc);
        // Each end's facing is a 5-frame mean: the first at frame 2, the last at frame n − 3.
        let expected_turn = 90.0 * (frames - 5) as f64 / (frames - 1) as f64;
        assert!((m.turn - expected_turn).abs() < 1e-6, "{m:?}");
        assert!(m.forward > 0.0);
        let expected_speed = r * std::f64::consts::FRAC_PI_2 / ((frames - 1) as f64 / FPS);
        assert!(
            (m.speed - expected_speed).abs() / expected_speed < 1e-3,
            "{m:?}"
        );
        let step = Step {
            action: Action::Walk,
            backward: false,
            side: None,
            speed: Speed::Normal,
            turn: 90,
            count: 1,
        };
        assert!(adheres(&step, &m, 20.0));
        assert!(!adheres(
            &Step {
                turn: -90,
                ..step.clone()
            },
            &m,
            20.0
        ));
        assert!(!adheres(
            &Step {
                backward: true,
                ..step
            },
            &m,
            20.0
        ));
    }
}
