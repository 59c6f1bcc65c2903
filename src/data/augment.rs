//! Augmentation of motion clips where it keeps a caption true, done on joints (then features
//! again, so every augmented clip is a consistent HumanML3D row set): mirroring (with "left" and
//! "right" swapped in the caption), a time warp within a range, and crops of the ends.
//!
//! Rotation about Y is not among them: HumanML3D's features are canonical (the first frame faces
//! +Z and every row is heading-relative), so a rotated clip has the same features.

use anyhow::Result;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::motion::{features, retarget, Pose, FPS};

/// How clips are varied (each draw from the caller's generator).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Probability of mirroring a clip.
    pub mirror: f64,
    /// Playback-speed factors drawn uniformly from this range (1, 1: none).
    pub warp: (f64, f64),
    /// At most this fraction of the frames is cut, split at random between the two ends.
    pub crop: f64,
}

impl Augment {
    /// Nothing changes.
    pub const NONE: Self = Self {
        mirror: 0.0,
        warp: (1.0, 1.0),
        crop: 0.0,
    };

    /// Changes that keep the captions here true: a mirror (captions swapped too), ±10 % speed
    /// (within one speed class of the programs', which differ by 30 %), 10 % crops.
    pub const CAPTIONED: Self = Self {
        mirror: 0.5,
        warp: (0.9, 1.1),
        crop: 0.1,
    };

    /// A varied copy of `joints` (at least two frames), and whether it was mirrored.
    pub fn apply(&self, joints: &[Pose], rng: &mut ChaCha8Rng) -> Result<(Vec<Pose>, bool)> {
        let mirrored = self.mirror > 0.0 && rng.random_bool(self.mirror.min(1.0));
        let mut j = if mirrored {
            super::motion::mirror(joints)
        } else {
            joints.to_vec()
        };
        if self.warp.0 < self.warp.1 {
            let f = rng.random_range(self.warp.0..=self.warp.1);
            // Interpolated positions shorten the bones a little: put them back.
            j = retarget::uniform_skeleton(&retarget::resample(&j, FPS * f, FPS)?)?;
        }
        if self.crop > 0.0 && j.len() > 4 {
            let cut =
                ((j.len() as f64 * self.crop * rng.random::<f64>()) as usize).min(j.len() - 2);
            let front = rng.random_range(0..=cut);
            j = j[front..j.len() - (cut - front)].to_vec();
        }
        Ok((j, mirrored))
    }

    /// [`apply`](Self::apply), returning features (`frames − 1` rows).
    pub fn features(&self, joints: &[Pose], rng: &mut ChaCha8Rng) -> Result<(Vec<f32>, bool)> {
        let (j, m) = self.apply(joints, rng)?;
        Ok((features(&j, &Default::default())?, m))
    }
}

/// A caption with the sides swapped, for a mirrored clip ("left" ⇄ "right", whole words).
pub fn mirror_caption(caption: &str) -> String {
    let mut out = String::with_capacity(caption.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let swapped = match word.as_str() {
            "left" => "right",
            "right" => "left",
            "Left" => "Right",
            "Right" => "Left",
            w => w,
        };
        out.push_str(swapped);
        word.clear();
    };
    for ch in caption.chars() {
        if ch.is_alphabetic() {
            word.push(ch);
        } else {
            flush(&mut word, &mut out);
            out.push(ch);
        }
    }
    flush(&mut word, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn captions_swap_whole_words_only() {
        assert_eq!(
            mirror_caption("a person kicks with the left leg, then turns right-handed"),
            "a person kicks with the right leg, then turns left-handed"
        );
        assert_eq!(mirror_caption("bright lefty"), "bright lefty");
    }

    #[test]
    fn augmented_clips_keep_their_bones_and_stay_in_range() -> Result<()> {
        let clip = crate::motion::features::tests::synthetic_clip(60);
        let bones = crate::motion::skeleton::bone_lengths(&clip[0]);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let a = Augment::CAPTIONED;
        let mut mirrored = 0;
        for _ in 0..20 {
            let (j, m) = a.apply(&clip, &mut rng)?;
            mirrored += usize::from(m);
            // ±10 % speed then at most 10 % cut.
            assert!(j.len() >= 60 * 8 / 10 - 1 && j.len() <= 67, "{}", j.len());
            for p in &j {
                let b = crate::motion::skeleton::bone_lengths(p);
                for k in 0..22 {
                    assert!(
                        (b[k] - bones[k]).abs() < 1e-6,
                        "bone {k}: {} vs {}",
                        b[k],
                        bones[k]
                    );
                }
            }
        }
        assert!(mirrored > 3 && mirrored < 17, "{mirrored} of 20 mirrored");
        let (same, m) = Augment::NONE.apply(&clip, &mut rng)?;
        assert!(!m && same == clip);
        Ok(())
    }
}
