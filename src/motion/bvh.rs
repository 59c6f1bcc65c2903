//! BVH (Biovision hierarchy) reading and writing, written here: the one BVH crate pulls in
//! dependencies with published soundness advisories, and the format is small.
//!
//! A joint's world transform is its parent's, then its OFFSET, then its channels in the order the
//! file declares them (`Zrotation Yrotation Xrotation` is R = Rz·Ry·Rx); position channels (the
//! root's) replace the offset. Angles are in degrees.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use nalgebra::{UnitQuaternion, Vector3};

/// One channel of a joint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Xposition,
    Yposition,
    Zposition,
    Xrotation,
    Yrotation,
    Zrotation,
}

impl Channel {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "xposition" => Self::Xposition,
            "yposition" => Self::Yposition,
            "zposition" => Self::Zposition,
            "xrotation" => Self::Xrotation,
            "yrotation" => Self::Yrotation,
            "zrotation" => Self::Zrotation,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Xposition => "Xposition",
            Self::Yposition => "Yposition",
            Self::Zposition => "Zposition",
            Self::Xrotation => "Xrotation",
            Self::Yrotation => "Yrotation",
            Self::Zrotation => "Zrotation",
        }
    }
}

/// A joint of the hierarchy (an End Site is kept as its parent's `end_site`).
#[derive(Debug, Clone, PartialEq)]
pub struct Joint {
    pub name: String,
    pub parent: Option<usize>,
    pub offset: Vector3<f64>,
    pub channels: Vec<Channel>,
    pub end_site: Option<Vector3<f64>>,
}

/// A BVH file: the hierarchy and one row of channel values per frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Bvh {
    /// In file order (parents before children).
    pub joints: Vec<Joint>,
    pub frame_time: f64,
    pub frames: Vec<Vec<f64>>,
}

/// Whitespace-separated tokens with their line numbers, for error messages.
struct Tokens<'a> {
    items: Vec<(usize, &'a str)>,
    at: usize,
}

impl<'a> Tokens<'a> {
    fn next(&mut self, what: &str) -> Result<(usize, &'a str)> {
        let t = self
            .items
            .get(self.at)
            .copied()
            .with_context(|| format!("the file ends where {what} was expected"))?;
        self.at += 1;
        Ok(t)
    }

    fn expect(&mut self, word: &str) -> Result<()> {
        let (line, t) = self.next(word)?;
        if !t.eq_ignore_ascii_case(word) {
            bail!("line {line}: expected {word}, found {t:?}")
        }
        Ok(())
    }

    fn number(&mut self, what: &str) -> Result<f64> {
        let (line, t) = self.next(what)?;
        t.parse()
            .with_context(|| format!("line {line}: {what} {t:?} is not a number"))
    }

    fn vector(&mut self, what: &str) -> Result<Vector3<f64>> {
        Ok(Vector3::new(
            self.number(what)?,
            self.number(what)?,
            self.number(what)?,
        ))
    }
}

impl Bvh {
    /// Parse BVH text.
    pub fn parse(text: &str) -> Result<Self> {
        let items: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .flat_map(|(i, l)| l.split_whitespace().map(move |t| (i + 1, t)))
            .collect();
        let mut tok = Tokens { items, at: 0 };
        tok.expect("HIERARCHY")?;
        let mut joints: Vec<Joint> = Vec::new();
        // Open braces: Some(joint) for a joint, None for an End Site.
        let mut stack: Vec<Option<usize>> = Vec::new();
        loop {
            let (line, t) = tok.next("a joint")?;
            match t.to_ascii_uppercase().as_str() {
                "ROOT" | "JOINT" => {
                    let (_, name) = tok.next("a joint name")?;
                    let parent = stack.iter().rev().find_map(|s| *s);
                    if t.eq_ignore_ascii_case("ROOT") != stack.is_empty() {
                        bail!("line {line}: {t} {name} is not where a {t} can be")
                    }
                    tok.expect("{")?;
                    tok.expect("OFFSET")?;
                    let offset = tok.vector("OFFSET")?;
                    tok.expect("CHANNELS")?;
                    let n = tok.number("the channel count")? as usize;
                    let mut channels = Vec::with_capacity(n);
                    for _ in 0..n {
                        let (l, c) = tok.next("a channel")?;
                        channels.push(
                            Channel::parse(c)
                                .with_context(|| format!("line {l}: unknown channel {c:?}"))?,
                        );
                    }
                    joints.push(Joint {
                        name: name.to_string(),
                        parent,
                        offset,
                        channels,
                        end_site: None,
                    });
                    stack.push(Some(joints.len() - 1));
                }
                "END" => {
                    tok.expect("Site")?;
                    tok.expect("{")?;
                    tok.expect("OFFSET")?;
                    let offset = tok.vector("OFFSET")?;
                    tok.expect("}")?;
                    let Some(Some(owner)) = stack.last() else {
                        bail!("line {line}: End Site outside a joint")
                    };
                    joints[*owner].end_site = Some(offset);
                }
                "}" => {
                    stack
                        .pop()
                        .with_context(|| format!("line {line}: unbalanced }}"))?;
                    if stack.is_empty() {
                        break;
                    }
                }
                _ => bail!("line {line}: unexpected {t:?} in the hierarchy"),
            }
        }
        tok.expect("MOTION")?;
        tok.expect("Frames:")?;
        let n_frames = tok.number("the frame count")? as usize;
        tok.expect("Frame")?;
        tok.expect("Time:")?;
        let frame_time = tok.number("the frame time")?;
        if !(frame_time > 0.0 && frame_time.is_finite()) {
            bail!("Frame Time {frame_time} must be positive")
        }
        let width: usize = joints.iter().map(|j| j.channels.len()).sum();
        let mut frames = Vec::with_capacity(n_frames);
        for f in 0..n_frames {
            let row = (0..width)
                .map(|_| tok.number(&format!("frame {f}'s value")))
                .collect::<Result<Vec<f64>>>()?;
            frames.push(row);
        }
        Ok(Self {
            joints,
            frame_time,
            frames,
        })
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}: not a valid BVH file", path.display()))
    }

    /// The file's text (values with 6 decimals).
    pub fn to_text(&self) -> String {
        let mut s = String::from("HIERARCHY\n");
        let children = |p: usize| {
            self.joints
                .iter()
                .enumerate()
                .filter(move |(_, j)| j.parent == Some(p))
        };
        fn write_joint(
            bvh: &Bvh,
            s: &mut String,
            i: usize,
            depth: usize,
            children: &dyn Fn(usize) -> Vec<usize>,
        ) {
            let j = &bvh.joints[i];
            let pad = "\t".repeat(depth);
            let kind = if j.parent.is_none() { "ROOT" } else { "JOINT" };
            let _ = writeln!(s, "{pad}{kind} {}\n{pad}{{", j.name);
            let o = j.offset;
            let _ = writeln!(s, "{pad}\tOFFSET {:.6} {:.6} {:.6}", o.x, o.y, o.z);
            let names: Vec<&str> = j.channels.iter().map(|c| c.name()).collect();
            let _ = writeln!(s, "{pad}\tCHANNELS {} {}", names.len(), names.join(" "));
            for c in children(i) {
                write_joint(bvh, s, c, depth + 1, children);
            }
            if let Some(e) = j.end_site {
                let _ = writeln!(
                    s,
                    "{pad}\tEnd Site\n{pad}\t{{\n{pad}\t\tOFFSET {:.6} {:.6} {:.6}\n{pad}\t}}",
                    e.x, e.y, e.z
                );
            }
            let _ = writeln!(s, "{pad}}}");
        }
        let kids = |p: usize| children(p).map(|(i, _)| i).collect::<Vec<_>>();
        if let Some(root) = self.joints.iter().position(|j| j.parent.is_none()) {
            write_joint(self, &mut s, root, 0, &kids);
        }
        let _ = writeln!(
            s,
            "MOTION\nFrames: {}\nFrame Time: {:.7}",
            self.frames.len(),
            self.frame_time
        );
        for row in &self.frames {
            let vals: Vec<String> = row.iter().map(|v| format!("{v:.6}")).collect();
            s.push_str(&vals.join(" "));
            s.push('\n');
        }
        s
    }

    /// Write the file (atomically).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::files::write_atomic(path, self.to_text().as_bytes())
    }

    /// Every joint's world position and rotation in frame `f` (forward kinematics).
    pub fn world(&self, f: usize) -> Result<Vec<(Vector3<f64>, UnitQuaternion<f64>)>> {
        let row = self
            .frames
            .get(f)
            .with_context(|| format!("no frame {f} (of {})", self.frames.len()))?;
        let mut out: Vec<(Vector3<f64>, UnitQuaternion<f64>)> =
            Vec::with_capacity(self.joints.len());
        let mut at = 0;
        for j in &self.joints {
            let (mut local_pos, mut rot) = (j.offset, UnitQuaternion::identity());
            let mut moved = false;
            for c in &j.channels {
                let v = row[at];
                at += 1;
                let axis = |a: Vector3<f64>| {
                    UnitQuaternion::from_axis_angle(
                        &nalgebra::Unit::new_unchecked(a),
                        v.to_radians(),
                    )
                };
                match c {
                    Channel::Xposition | Channel::Yposition | Channel::Zposition => {
                        if !moved {
                            local_pos = Vector3::zeros();
                            moved = true;
                        }
                        let k = *c as usize;
                        local_pos[k] = v;
                    }
                    Channel::Xrotation => rot *= axis(Vector3::x()),
                    Channel::Yrotation => rot *= axis(Vector3::y()),
                    Channel::Zrotation => rot *= axis(Vector3::z()),
                }
            }
            out.push(match j.parent {
                None => (local_pos, rot),
                Some(p) => {
                    let (pp, pr) = out[p];
                    (pp + pr * local_pos, pr * rot)
                }
            });
        }
        Ok(out)
    }

    /// The index of the joint named `name` (ASCII case ignored).
    pub fn find(&self, name: &str) -> Option<usize> {
        self.joints
            .iter()
            .position(|j| j.name.eq_ignore_ascii_case(name))
    }
}

use super::skeleton::{rest_direction, Pose, JOINTS, NAMES, PARENTS};

/// For each SMPL joint, the source joint names that stand for it, by preference (ours, then CMU's
/// conversions, then other common rigs). Joints no name matches are placed from their neighbours:
/// spine3 a third of the way from spine2 to the neck, each collar 40 % of the way from spine3 to
/// its shoulder (several rigs put their collar where spine2 or the neck is, which would leave a
/// bone of length zero).
const SOURCE_NAMES: [&[&str]; JOINTS] = [
    &["pelvis", "Hips", "Hip", "Root"],
    &["left_hip", "LeftUpLeg", "LeftHip", "LeftThigh", "LThigh"],
    &[
        "right_hip",
        "RightUpLeg",
        "RightHip",
        "RightThigh",
        "RThigh",
    ],
    &["spine1", "Spine", "Ab", "Abdomen", "LowerBack"],
    &["left_knee", "LeftLeg", "LeftKnee", "LeftShin", "LShin"],
    &["right_knee", "RightLeg", "RightKnee", "RightShin", "RShin"],
    &["spine2", "Spine1", "Chest"],
    &["left_ankle", "LeftFoot", "LeftAnkle", "LFoot"],
    &["right_ankle", "RightFoot", "RightAnkle", "RFoot"],
    &["spine3"],
    &["left_foot", "LeftToeBase", "LeftToes", "LeftToe"],
    &["right_foot", "RightToeBase", "RightToes", "RightToe"],
    &["neck", "Neck1", "Neck"],
    &["left_collar"],
    &["right_collar"],
    &["head", "Head"],
    &[
        "left_shoulder",
        "LeftArm",
        "LeftUpperArm",
        "LeftShoulder",
        "LShldr",
    ],
    &[
        "right_shoulder",
        "RightArm",
        "RightUpperArm",
        "RightShoulder",
        "RShldr",
    ],
    &[
        "left_elbow",
        "LeftForeArm",
        "LeftElbow",
        "LeftLowerArm",
        "LForeArm",
    ],
    &[
        "right_elbow",
        "RightForeArm",
        "RightElbow",
        "RightLowerArm",
        "RForeArm",
    ],
    &["left_wrist", "LeftHand", "LeftWrist", "LHand"],
    &["right_wrist", "RightHand", "RightWrist", "RHand"],
];

impl Bvh {
    /// The 22 SMPL joints in every frame (in the file's units and axes), and the frame rate.
    pub fn to_joints(&self) -> Result<(Vec<Pose>, f64)> {
        let mut source = [None; JOINTS];
        for (j, names) in SOURCE_NAMES.iter().enumerate() {
            source[j] = names.iter().find_map(|n| self.find(n));
            let derived = matches!(j, 9 | 13 | 14);
            if source[j].is_none() && !derived {
                bail!(
                    "no joint stands for {} (looked for {})",
                    NAMES[j],
                    names.join(", ")
                )
            }
        }
        let mut poses = Vec::with_capacity(self.frames.len());
        for f in 0..self.frames.len() {
            let world = self.world(f)?;
            let mut p: Pose =
                std::array::from_fn(|j| source[j].map_or(Vector3::zeros(), |s| world[s].0));
            if source[9].is_none() {
                p[9] = p[6] + (p[12] - p[6]) / 3.0;
            }
            for (collar, shoulder) in [(13, 16), (14, 17)] {
                if source[collar].is_none() {
                    p[collar] = p[9] + (p[shoulder] - p[9]) * 0.4;
                }
            }
            poses.push(p);
        }
        Ok((poses, 1.0 / self.frame_time))
    }

    /// A clip as a BVH of the 22-joint chain (joint names SMPL's, metres, Y up), rotations Z·Y·X
    /// per joint. A joint with one child turns the child's rest direction onto the bone by the
    /// shortest rotation; the pelvis and spine3 align their middle child (spine1, neck) and their
    /// left–right axis. Offsets are each joint's mean position in its parent's frame, so a clip on
    /// a rigid skeleton (everything this project retargets) comes back exactly; others come back
    /// with their mean proportions.
    pub fn from_joints(joints: &[Pose], fps: f64) -> Result<Self> {
        if joints.is_empty() || !(fps.is_finite() && fps > 0.0) {
            bail!("a BVH needs frames and a positive frame rate")
        }
        let children = |j: usize| (0..JOINTS).filter(move |&c| PARENTS[c] == Some(j));
        let globals: Vec<[UnitQuaternion<f64>; JOINTS]> = joints
            .iter()
            .map(|pose| global_rotations(pose, &children))
            .collect();
        // Each joint's offset in its parent's frame, averaged over the clip (constant when the
        // clip's skeleton is rigid, as everything retargeted here is).
        let mut offsets = [Vector3::zeros(); JOINTS];
        for (pose, g) in joints.iter().zip(&globals) {
            for (c, o) in offsets.iter_mut().enumerate() {
                if let Some(p) = PARENTS[c] {
                    *o += g[p].inverse() * (pose[c] - pose[p]) / joints.len() as f64;
                }
            }
        }
        let end = |j: usize| -> Option<Vector3<f64>> {
            // Leaves: the head's top, the toes' tips, the hands' fingertips.
            let d = match NAMES[j] {
                "head" => Vector3::new(0.0, 0.1, 0.0),
                "left_foot" | "right_foot" => Vector3::new(0.0, 0.0, 0.05),
                "left_wrist" => Vector3::new(0.08, 0.0, 0.0),
                "right_wrist" => Vector3::new(-0.08, 0.0, 0.0),
                _ => return None,
            };
            Some(d)
        };
        // File order: depth first, children by index (the order to_text writes and parse reads).
        let mut order = Vec::with_capacity(JOINTS);
        let mut todo = vec![0usize];
        while let Some(j) = todo.pop() {
            order.push(j);
            todo.extend(children(j).collect::<Vec<_>>().into_iter().rev());
        }
        let position = |j: usize| order.iter().position(|&o| o == j);
        let rot_channels = vec![Channel::Zrotation, Channel::Yrotation, Channel::Xrotation];
        let bvh_joints: Vec<Joint> = order
            .iter()
            .map(|&j| Joint {
                name: NAMES[j].to_string(),
                parent: PARENTS[j].and_then(position),
                offset: offsets[j],
                channels: if j == 0 {
                    [
                        vec![Channel::Xposition, Channel::Yposition, Channel::Zposition],
                        rot_channels.clone(),
                    ]
                    .concat()
                } else {
                    rot_channels.clone()
                },
                end_site: end(j),
            })
            .collect();
        let frames = joints
            .iter()
            .zip(&globals)
            .map(|(pose, globals)| {
                let mut row = vec![pose[0].x, pose[0].y, pose[0].z];
                for &j in &order {
                    let local = match PARENTS[j] {
                        None => globals[0],
                        Some(p) => globals[p].inverse() * globals[j],
                    };
                    let (x, y, z) = local.euler_angles();
                    row.extend([z.to_degrees(), y.to_degrees(), x.to_degrees()]);
                }
                row
            })
            .collect();
        Ok(Self {
            joints: bvh_joints,
            frame_time: 1.0 / fps,
            frames,
        })
    }
}

/// Each joint's world rotation for [`Bvh::from_joints`].
fn global_rotations<I: Iterator<Item = usize>>(
    pose: &Pose,
    children: &dyn Fn(usize) -> I,
) -> [UnitQuaternion<f64>; JOINTS] {
    let dir = |c: usize| (pose[c] - pose[PARENTS[c].expect("a child")]).normalize();
    // The rotation taking the rest frame (primary, secondary) onto the posed one.
    let frame = |primary: usize, left: usize, right: usize| {
        let basis = |a: Vector3<f64>, b: Vector3<f64>| {
            let e1 = a.normalize();
            let e2 = (b - e1 * b.dot(&e1)).normalize();
            nalgebra::Rotation3::from_basis_unchecked(&[e1, e2, e1.cross(&e2)])
        };
        let rest = basis(
            rest_direction(primary),
            rest_direction(left) - rest_direction(right),
        );
        let posed = basis(dir(primary), pose[left] - pose[right]);
        UnitQuaternion::from_rotation_matrix(&(posed * rest.inverse()))
    };
    let mut g = [UnitQuaternion::identity(); JOINTS];
    for j in 0..JOINTS {
        let kids: Vec<usize> = children(j).collect();
        g[j] = match (j, kids.as_slice()) {
            (0, _) => frame(3, 1, 2),
            (9, _) => frame(12, 13, 14),
            (_, [c]) => super::features::between(&rest_direction(*c), &dir(*c)),
            (_, _) => g[PARENTS[j].expect("a leaf has a parent")],
        };
    }
    g
}
