//! A HumanML3D folder as users have it (Guo et al. 2022): `new_joint_vecs/<id>.npy` (frames × 263
//! features), `texts/<id>.txt` (one `caption#tokens#start#end` line per caption; start and end in
//! seconds, both 0 for the whole clip), `Mean.npy` and `Std.npy` (263 each), and the split lists
//! `train.txt`, `val.txt`, `test.txt` (one id per line).
//!
//! Clips are read as the T2M evaluators' loader reads them: a caption with a time span makes a clip
//! of its own (frames `⌊start·20⌋..⌊end·20⌋`); clips shorter than `min_frames` or not shorter than
//! `max_frames` are left out; features are z-normalised with the folder's Mean/Std.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::motion::{npy, FEATURES, FPS};

/// A caption and its part-of-speech-tagged tokens (`word/TAG`).
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub text: String,
    pub tokens: Vec<String>,
}

/// One training clip: normalised features (`frames × 263`, row-major) and its captions.
#[derive(Debug, Clone)]
pub struct MotionClip {
    /// The id, with `#start#end` for a captioned span of a longer clip.
    pub name: String,
    pub features: Vec<f32>,
    pub frames: usize,
    pub captions: Vec<Caption>,
}

/// Which clips to keep (the T2M loader's bounds: 40 ≤ frames < 200).
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub min_frames: usize,
    pub max_frames: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            min_frames: 40,
            max_frames: 200,
        }
    }
}

/// A split of a HumanML3D folder.
#[derive(Debug, Clone)]
pub struct HumanMl3d {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub clips: Vec<MotionClip>,
    /// Ids of the split whose files were missing or unreadable.
    pub unreadable: Vec<String>,
    /// Clips (or captioned spans) outside the length bounds.
    pub out_of_bounds: usize,
}

/// One line of a `texts/<id>.txt` file.
fn parse_caption_line(line: &str, file: &Path, n: usize) -> Result<(Caption, f64, f64)> {
    let parts: Vec<&str> = line.split('#').collect();
    if parts.len() < 4 {
        bail!(
            "{} line {n}: expected caption#tokens#start#end, got {line:?}",
            file.display()
        )
    }
    // HumanML3D writes NaN for "no span", which means the whole clip as 0 does.
    let time = |s: &str| -> Result<f64> {
        let v: f64 = s
            .trim()
            .parse()
            .with_context(|| format!("{} line {n}: bad time {s:?}", file.display()))?;
        Ok(if v.is_nan() { 0.0 } else { v })
    };
    let caption = Caption {
        text: parts[0].trim().to_string(),
        tokens: parts[1].split_whitespace().map(str::to_string).collect(),
    };
    Ok((caption, time(parts[2])?, time(parts[3])?))
}

/// A 263-wide statistics file (`Mean.npy`, `Std.npy`).
fn read_stats(path: &Path) -> Result<Vec<f32>> {
    let a = npy::read(path)?;
    if a.data.len() != FEATURES {
        bail!(
            "{}: {} numbers, expected {FEATURES}",
            path.display(),
            a.data.len()
        )
    }
    Ok(a.data)
}

/// Read `split` (`train`, `val`, `test` or any `<split>.txt` in the folder) of the HumanML3D folder
/// `root`.
pub fn load(root: &Path, split: &str, opts: &LoadOptions) -> Result<HumanMl3d> {
    let mean = read_stats(&root.join("Mean.npy"))?;
    let std = read_stats(&root.join("Std.npy"))?;
    if let Some(i) = std.iter().position(|&s| s.is_nan() || s <= 0.0) {
        bail!(
            "{}: entry {i} is {}, not positive",
            root.join("Std.npy").display(),
            std[i]
        )
    }
    let list = root.join(format!("{split}.txt"));
    let ids = std::fs::read_to_string(&list)
        .with_context(|| format!("cannot read the split list {}", list.display()))?;
    let mut out = HumanMl3d {
        mean,
        std,
        clips: Vec::new(),
        unreadable: Vec::new(),
        out_of_bounds: 0,
    };
    let in_bounds = |frames: usize| frames >= opts.min_frames && frames < opts.max_frames;
    for id in ids.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Ok(motion) = npy::read(&root.join("new_joint_vecs").join(format!("{id}.npy"))) else {
            out.unreadable.push(id.to_string());
            continue;
        };
        if motion.shape.len() != 2 || motion.shape[1] != FEATURES {
            bail!(
                "{}: shape {:?}, expected [frames, {FEATURES}]",
                root.join("new_joint_vecs")
                    .join(format!("{id}.npy"))
                    .display(),
                motion.shape
            )
        }
        let text_file = root.join("texts").join(format!("{id}.txt"));
        let Ok(text) = std::fs::read_to_string(&text_file) else {
            out.unreadable.push(id.to_string());
            continue;
        };
        let frames = motion.shape[0];
        let mut whole = Vec::new();
        // Spans keyed by their frame range, in file order of first appearance.
        let mut spans: BTreeMap<(usize, usize), (String, Vec<Caption>)> = BTreeMap::new();
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let (caption, start, end) = parse_caption_line(line, &text_file, n + 1)?;
            if start == 0.0 && end == 0.0 {
                whole.push(caption);
                continue;
            }
            let (a, b) = ((start * FPS) as usize, ((end * FPS) as usize).min(frames));
            let name = format!("{id}#{start}#{end}");
            spans
                .entry((a, b))
                .or_insert_with(|| (name, Vec::new()))
                .1
                .push(caption);
        }
        let mut push = |name: String, a: usize, b: usize, captions: Vec<Caption>| {
            if b <= a || !in_bounds(b - a) {
                out.out_of_bounds += 1;
                return;
            }
            let features = motion.data[a * FEATURES..b * FEATURES]
                .chunks(FEATURES)
                .flat_map(|row| {
                    row.iter()
                        .zip(out.mean.iter().zip(&out.std))
                        .map(|(x, (m, s))| (x - m) / s)
                })
                .collect();
            out.clips.push(MotionClip {
                name,
                features,
                frames: b - a,
                captions,
            });
        };
        if !whole.is_empty() {
            push(id.to_string(), 0, frames, whole);
        }
        for ((a, b), (name, captions)) in spans {
            push(name, a, b, captions);
        }
    }
    if out.clips.is_empty() {
        bail!(
            "{}: no clip of split {split:?} could be read within {}..{} frames",
            root.display(),
            opts.min_frames,
            opts.max_frames
        )
    }
    Ok(out)
}

impl HumanMl3d {
    /// Features back in the folder's units (undo the z-normalisation).
    pub fn denormalise(&self, features: &[f32]) -> Vec<f32> {
        features
            .chunks(FEATURES)
            .flat_map(|row| {
                row.iter()
                    .zip(self.mean.iter().zip(&self.std))
                    .map(|(x, (m, s))| x * s + m)
            })
            .collect()
    }
}
