//! The 22-joint SMPL body chain HumanML3D uses: joint order, parents, the kinematic chains and the
//! rest directions its inverse kinematics measures rotations from, and its reference bone vectors.

use nalgebra::Vector3;

/// Joints per pose.
pub const JOINTS: usize = 22;

/// One pose: every joint's position in metres (Y up).
pub type Pose = [Vector3<f64>; JOINTS];

/// SMPL's joint names in order (left is the body's left: +X when facing +Z).
pub const NAMES: [&str; JOINTS] = [
    "pelvis",
    "left_hip",
    "right_hip",
    "spine1",
    "left_knee",
    "right_knee",
    "spine2",
    "left_ankle",
    "right_ankle",
    "spine3",
    "left_foot",
    "right_foot",
    "neck",
    "left_collar",
    "right_collar",
    "head",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
];

/// Each joint's parent (`None` for the pelvis, the root).
pub const PARENTS: [Option<usize>; JOINTS] = [
    None,
    Some(0),
    Some(0),
    Some(0),
    Some(1),
    Some(2),
    Some(3),
    Some(4),
    Some(5),
    Some(6),
    Some(7),
    Some(8),
    Some(9),
    Some(9),
    Some(9),
    Some(12),
    Some(13),
    Some(14),
    Some(16),
    Some(17),
    Some(18),
    Some(19),
];

/// HumanML3D's kinematic chains (right leg, left leg, spine to head, right arm, left arm), in the
/// order its inverse kinematics walks them. Each arm chain starts at spine3 but takes its rotations
/// relative to the root, as HumanML3D's do.
pub const CHAINS: [&[usize]; 5] = [
    &[0, 2, 5, 8, 11],
    &[0, 1, 4, 7, 10],
    &[0, 3, 6, 9, 12, 15],
    &[9, 14, 17, 19, 21],
    &[9, 13, 16, 18, 20],
];

/// Rest direction of the bone that ends at each joint (HumanML3D's `t2m_raw_offsets`).
pub const REST_DIRECTIONS: [[f64; 3]; JOINTS] = [
    [0.0, 0.0, 0.0],
    [1.0, 0.0, 0.0],
    [-1.0, 0.0, 0.0],
    [0.0, 1.0, 0.0],
    [0.0, -1.0, 0.0],
    [0.0, -1.0, 0.0],
    [0.0, 1.0, 0.0],
    [0.0, -1.0, 0.0],
    [0.0, -1.0, 0.0],
    [0.0, 1.0, 0.0],
    [0.0, 0.0, 1.0],
    [0.0, 0.0, 1.0],
    [0.0, 1.0, 0.0],
    [1.0, 0.0, 0.0],
    [-1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0],
    [0.0, -1.0, 0.0],
    [0.0, -1.0, 0.0],
    [0.0, -1.0, 0.0],
    [0.0, -1.0, 0.0],
    [0.0, -1.0, 0.0],
    [0.0, -1.0, 0.0],
];

/// Bone lengths in metres of HumanML3D's reference skeleton (its subject 000021, to which its
/// preprocessing rescales every clip), by the joint each bone ends at. Our retargeted data uses
/// them too, so that features made here share HumanML3D's proportions.
pub const REFERENCE_BONES: [f64; JOINTS] = [
    0.0,
    0.103_073_95,
    0.109_883_35,
    0.131_568_25,
    0.393_623_14,
    0.390_188_13,
    0.143_190_26,
    0.432_432_98,
    0.425_643_32,
    0.057_364_706,
    0.143_381_74,
    0.149_418_67,
    0.219_36,
    0.137_486_83,
    0.143_382_83,
    0.103_039_27,
    0.131_613_98,
    0.122_984_3,
    0.256_839_84,
    0.263_091_86,
    0.266_011_86,
    0.269_876_3,
];

/// A side of the body (the person's own left and right).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Left,
    Right,
}

impl Side {
    pub fn other(self) -> Self {
        match self {
            Self::Left => Self::Right,
            Self::Right => Self::Left,
        }
    }

    pub fn shoulder(self) -> usize {
        self.pick(16, 17)
    }

    pub fn elbow(self) -> usize {
        self.pick(18, 19)
    }

    pub fn wrist(self) -> usize {
        self.pick(20, 21)
    }

    pub fn name(self) -> &'static str {
        self.pick("left", "right")
    }

    fn pick<T>(self, left: T, right: T) -> T {
        match self {
            Self::Left => left,
            Self::Right => right,
        }
    }
}

/// Face direction joints: right hip, left hip, right shoulder, left shoulder.
pub const FACE_JOINTS: [usize; 4] = [2, 1, 17, 16];
/// Foot joints (ankle, toe) whose contacts the features record.
pub const LEFT_FOOT: [usize; 2] = [7, 10];
pub const RIGHT_FOOT: [usize; 2] = [8, 11];

/// The rest direction of the bone ending at `joint`.
pub fn rest_direction(joint: usize) -> Vector3<f64> {
    Vector3::from(REST_DIRECTIONS[joint])
}

/// The bone vectors of the reference skeleton in its rest pose (HumanML3D's target offsets).
pub fn reference_offsets() -> Pose {
    std::array::from_fn(|j| rest_direction(j) * REFERENCE_BONES[j])
}

/// Each bone's length in `pose` (0 for the root).
pub fn bone_lengths(pose: &Pose) -> [f64; JOINTS] {
    std::array::from_fn(|j| PARENTS[j].map_or(0.0, |p| (pose[j] - pose[p]).norm()))
}

/// The horizontal direction a pose faces: up × (right hip − left hip + right shoulder − left
/// shoulder), normalised (the body's left is +X when it faces +Z).
pub fn facing(pose: &Pose) -> Vector3<f64> {
    let [r_hip, l_hip, r_sh, l_sh] = FACE_JOINTS;
    let across = (pose[r_hip] - pose[l_hip]) + (pose[r_sh] - pose[l_sh]);
    Vector3::y().cross(&across.normalize()).normalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_agree_with_parents_and_cover_every_joint() {
        let mut seen = [false; JOINTS];
        seen[0] = true;
        for chain in CHAINS {
            for w in chain.windows(2) {
                assert_eq!(PARENTS[w[1]], Some(w[0]), "{}", NAMES[w[1]]);
                seen[w[1]] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn the_reference_skeleton_faces_forward() {
        // Place the reference bones along the chains: the rest pose faces +Z.
        let off = reference_offsets();
        let mut pose = [Vector3::zeros(); JOINTS];
        for chain in CHAINS {
            for w in chain.windows(2) {
                pose[w[1]] = pose[w[0]] + off[w[1]];
            }
        }
        let f = facing(&pose);
        assert!((f - Vector3::z()).norm() < 1e-12, "{f:?}");
        let lengths = bone_lengths(&pose);
        for j in 1..JOINTS {
            assert!((lengths[j] - REFERENCE_BONES[j]).abs() < 1e-12);
        }
    }
}
