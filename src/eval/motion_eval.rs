//! `lcm eval` for a motion model: for each clip of a split of a HumanML3D-layout folder, one
//! motion from its first caption at its own length (as MLD/MotionLCM evaluate), scored by the
//! motion evaluator — R-precision, FID against the real clips, MM-Dist, Diversity, MultiModality,
//! the attribute heads — and from the joints alone: program adherence (travel direction, turn,
//! gesture hand, and the count of raises, claps and jumps), foot skating and jitter. Ground
//! truth and nearest-neighbour retrieval are scored beside the model, as the literature's tables
//! have them.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::metrics::{diversity, feature_stats, fid, multimodality, to_matrix};
use super::motion::{CaptionTokenizer, MotionEvaluator};
use super::motion_checks::{adheres, flights, gesture_adheres, measure, plausibility};
use super::motion_train::{motion_features, nearest_neighbour, prepare, score_motions, Prepared};
use crate::data::motion::{Action, Program};
use crate::model::motion_vae::Normaliser;
use crate::motion::{joints_from_features, Pose};
use crate::pipeline::text2motion::{MotionFolder, MotionOptions, MotionPipeline};

/// What a motion evaluation runs.
pub struct MotionEvalRun<'a> {
    pub model: &'a Path,
    pub label: &'a str,
    pub data: &'a Path,
    pub evaluator: &'a Path,
    pub splits: &'a [String],
    /// At most this many clips per split.
    pub samples: usize,
    pub options: MotionOptions,
    /// Captions given `multimodality_samples` motions each, for MultiModality (test split).
    pub multimodality_captions: usize,
    pub multimodality_samples: usize,
    pub baselines: bool,
    pub device: &'a Device,
}

/// Program adherence of generated joints, as fractions of the programs that state each fact.
#[derive(Default)]
struct Adherence {
    direction: (usize, usize),
    turn: (usize, usize),
    hand: (usize, usize),
    count: (usize, usize),
}

impl Adherence {
    fn add(&mut self, p: &Program, joints: &[Pose]) {
        let tally = |t: &mut (usize, usize), ok: bool| {
            t.0 += usize::from(ok);
            t.1 += 1;
        };
        if let [s] = p.steps.as_slice() {
            if s.action == Action::Jump {
                tally(&mut self.count, flights(joints) == s.count);
            }
            if matches!(s.action, Action::Walk | Action::Run) {
                let m = measure(joints);
                let forward = if s.backward {
                    m.forward < 0.0
                } else {
                    m.forward > 0.0
                };
                tally(&mut self.direction, forward);
                if s.turn != 0 {
                    // Turn alone: a loose 30° (the direction is counted above).
                    let straight = crate::data::motion::Step {
                        backward: m.forward < 0.0,
                        ..s.clone()
                    };
                    tally(&mut self.turn, adheres(&straight, &m, 30.0));
                }
            }
        }
        if let Some(o) = &p.overlay {
            if let Some(side) = o.side {
                tally(
                    &mut self.hand,
                    super::motion_checks::raised_hand(joints) == Some(side),
                );
            }
            if o.gesture != crate::data::motion::Gesture::Wave {
                tally(&mut self.count, gesture_adheres(o, joints));
            }
        }
    }

    fn json(&self) -> serde_json::Value {
        let f = |t: (usize, usize)| {
            if t.1 == 0 {
                serde_json::Value::Null
            } else {
                serde_json::json!({"rate": t.0 as f64 / t.1 as f64, "of": t.1})
            }
        };
        serde_json::json!({
            "direction": f(self.direction), "turn": f(self.turn),
            "hand": f(self.hand), "count": f(self.count),
        })
    }
}

/// Figures of one set of motions (one per clip of `data`).
fn figures(
    evaluator: &MotionEvaluator,
    motions: &[Vec<f32>],
    joints: &[Vec<Pose>],
    data: &Prepared,
    programs: &[Option<Program>],
    real: &(nalgebra::DVector<f64>, nalgebra::DMatrix<f64>),
    seed: u64,
) -> Result<serde_json::Value> {
    let device = data.ids.device();
    let refs: Vec<&[f32]> = motions.iter().map(Vec::as_slice).collect();
    let mut out = score_motions(evaluator, &refs, data, seed)?;
    let feats = motion_features(evaluator, &refs, device)?;
    let (mu, sigma) = feature_stats(&feats)?;
    out["fid"] = fid(&mu, &sigma, &real.0, &real.1)?.into();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pairs = 300.min(motions.len());
    out["diversity"] = diversity(&to_matrix(&feats)?, pairs, &mut rng)?.into();
    let mut adherence = Adherence::default();
    let (mut skate, mut jitter) = (0.0, 0.0);
    for (j, p) in joints.iter().zip(programs) {
        if let Some(p) = p {
            adherence.add(p, j);
        }
        let q = plausibility(j);
        skate += q.foot_skating;
        jitter += q.jitter;
    }
    out["adherence"] = adherence.json();
    out["foot_skating"] = (skate / joints.len() as f64).into();
    out["jitter"] = (jitter / joints.len() as f64).into();
    Ok(out)
}

/// The first `rows` feature rows of a generated motion, normalised with the dataset's statistics.
fn normalised(features: &[f32], rows: usize, norm: &Normaliser) -> Vec<f32> {
    let n = rows.min(features.len() / crate::motion::FEATURES);
    norm.normalise_rows(&features[..n * crate::motion::FEATURES])
}

pub fn run(r: &MotionEvalRun) -> Result<serde_json::Value> {
    let evaluator = MotionEvaluator::open(r.evaluator, r.device)
        .with_context(|| format!("--evaluator {}", r.evaluator.display()))?;
    let tok_path = crate::pipeline::source::repo_root().join("weights/minilm/tokenizer.json");
    let tok = CaptionTokenizer::load(&tok_path, evaluator.cfg.max_tokens)?;
    let pipe = MotionPipeline::open(MotionFolder::open(r.model)?, r.device)?;
    let stats = crate::data::humanml3d::load(r.data, "train", &Default::default())
        .context("the data folder's train split (its Mean/Std normalise the generated motions)")?;
    let norm = Normaliser {
        mean: stats.mean.clone(),
        std: stats.std.clone(),
    };
    let train = if r.baselines {
        Some(prepare(r.data, "train", &tok, r.device)?)
    } else {
        None
    };
    let mut report = serde_json::Map::new();
    for split in r.splits {
        let mut data = prepare(r.data, split, &tok, r.device)
            .with_context(|| format!("split {split} of {}", r.data.display()))?;
        if data.clips.len() > r.samples {
            truncate(&mut data, r.samples)?;
        }
        if data.clips.len() < 32 {
            bail!(
                "split {split}: {} clips, R-precision needs groups of 32",
                data.clips.len()
            )
        }
        let programs: Vec<Option<Program>> = data
            .clips
            .iter()
            .map(|c| {
                std::fs::read(r.data.join(format!("programs/{}.json", c.name)))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
            })
            .collect();
        let real_refs: Vec<&[f32]> = data.clips.iter().map(|c| c.features.as_slice()).collect();
        let real = feature_stats(&motion_features(&evaluator, &real_refs, r.device)?)?;
        let mut rows = serde_json::Map::new();
        if r.baselines {
            let gt_joints = data
                .clips
                .iter()
                .map(|c| joints_from_features(&stats.denormalise(&c.features)))
                .collect::<Result<Vec<_>>>()?;
            let gt: Vec<Vec<f32>> = data.clips.iter().map(|c| c.features.clone()).collect();
            rows.insert(
                "ground truth".into(),
                figures(&evaluator, &gt, &gt_joints, &data, &programs, &real, 0)?,
            );
            if let Some(train) = &train {
                let nn = nearest_neighbour(&evaluator, train, &data, 0)?;
                rows.insert("nearest neighbour".into(), nn);
            }
        }
        // The model: one motion per clip from its first caption, at the clip's length.
        let bar = indicatif::ProgressBar::new(data.clips.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} motion {pos}/{len} [{elapsed_precise}] ETA {eta}",
            )
            .expect("valid template"),
        );
        bar.set_message(split.clone());
        let (mut joints, mut motions) = (Vec::new(), Vec::new());
        let (mut text_s, mut gen_s) = (0.0, 0.0);
        for (i, c) in data.clips.iter().enumerate() {
            let frames = (c.frames + 1).min(pipe.vae.config.max_frames);
            let t0 = Instant::now();
            let cond = pipe.condition(&[c.captions[0].text.as_str()])?;
            text_s += t0.elapsed().as_secs_f64();
            let o = MotionOptions {
                frames,
                seed: r.options.seed + i as u64,
                ..r.options
            };
            let t1 = Instant::now();
            // The evaluator reads the decoder's own feature rows, as MLD's evaluation does; the
            // joints (for the program checks) are recovered from them. Features recomputed from
            // the joints would add the inverse kinematics' rotations, which for joints the data
            // holds nearly still (std 0.01) land dozens of standard deviations off.
            let (rows, m) = pipe.generate_features(&cond, &o)?.remove(0);
            gen_s += t1.elapsed().as_secs_f64();
            motions.push(normalised(&rows, c.frames, &norm));
            joints.push(m);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let n = data.clips.len() as f64;
        let mut model = figures(&evaluator, &motions, &joints, &data, &programs, &real, 0)?;
        model["ms_per_motion"] = (1e3 * gen_s / n).into();
        model["ms_per_motion_with_text"] = (1e3 * (gen_s + text_s) / n).into();
        if split == "test" && r.multimodality_captions > 1 && r.multimodality_samples > 1 {
            let k = r.multimodality_captions.min(data.clips.len());
            let mut per = Vec::with_capacity(k);
            for (i, c) in data.clips.iter().take(k).enumerate() {
                let cond =
                    pipe.condition(&vec![c.captions[0].text.as_str(); r.multimodality_samples])?;
                let o = MotionOptions {
                    frames: (c.frames + 1).min(pipe.vae.config.max_frames),
                    seed: r.options.seed + 1_000_000 + i as u64,
                    ..r.options
                };
                let f: Vec<Vec<f32>> = pipe
                    .generate_features(&cond, &o)?
                    .into_iter()
                    .map(|(rows, _)| {
                        rows[..c.frames.min(o.frames) * crate::motion::FEATURES].to_vec()
                    })
                    .collect();
                let refs: Vec<&[f32]> = f.iter().map(Vec::as_slice).collect();
                per.push(to_matrix(&motion_features(&evaluator, &refs, r.device)?)?);
            }
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            let pairs = (r.multimodality_samples / 2).max(1);
            model["multimodality"] = multimodality(&per, pairs, &mut rng)?.into();
        }
        rows.insert(r.label.to_string(), model);
        report.insert(split.clone(), serde_json::Value::Object(rows));
    }
    Ok(serde_json::json!({
        "model": r.label,
        "sampler": r.options.sampler.to_string(),
        "steps": r.options.steps,
        "guidance": r.options.guidance,
        "gamma": r.options.gamma,
        "evaluator": r.evaluator.display().to_string(),
        "splits": report,
    }))
}

/// Keep the first `n` clips of a prepared split (and their captions).
fn truncate(data: &mut Prepared, n: usize) -> Result<()> {
    let keep: Vec<u32> = (0..data.owner.len() as u32)
        .filter(|&r| data.owner[r as usize] < n)
        .collect();
    let idx = Tensor::new(keep.as_slice(), data.ids.device())?;
    data.ids = data.ids.index_select(&idx, 0)?;
    data.mask = data.mask.index_select(&idx, 0)?;
    data.owner.retain(|&o| o < n);
    data.clips.truncate(n);
    data.attributes.truncate(n);
    Ok(())
}

/// The markdown table of a report: one row per (split, row).
pub fn markdown(report: &serde_json::Value) -> String {
    let mut md = String::from(
        "| split | row | R@1 | R@2 | R@3 | FID ↓ | MM-Dist ↓ | Diversity | MModality | direction | turn | hand | count | speed | action | foot skating | jitter | ms/motion (with text) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let num = |v: &serde_json::Value, d: usize| {
        v.as_f64()
            .map_or("–".to_string(), |x| format!("{x:.d$}", d = d))
    };
    let rate = |v: &serde_json::Value| {
        v.get("rate")
            .and_then(|r| r.as_f64())
            .map_or("–".to_string(), |x| format!("{:.0} %", 100.0 * x))
    };
    if let Some(splits) = report["splits"].as_object() {
        for (split, rows) in splits {
            for (name, f) in rows.as_object().into_iter().flatten() {
                let r = &f["r_precision"];
                let a = &f["adherence"];
                let ms = match (
                    f["ms_per_motion"].as_f64(),
                    f["ms_per_motion_with_text"].as_f64(),
                ) {
                    (Some(a), Some(b)) => format!("{a:.1} ({b:.1})"),
                    _ => "–".into(),
                };
                md.push_str(&format!(
                    "| {split} | {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {ms} |\n",
                    num(&r[0], 3),
                    num(&r[1], 3),
                    num(&r[2], 3),
                    num(&f["fid"], 2),
                    num(&f["mm_dist"], 3),
                    num(&f["diversity"], 3),
                    num(&f["multimodality"], 3),
                    rate(&a["direction"]),
                    rate(&a["turn"]),
                    rate(&a["hand"]),
                    rate(&a["count"]),
                    num(&f["head_accuracy"]["speed"], 2),
                    num(&f["head_accuracy"]["action"], 2),
                    num(&f["foot_skating"], 3),
                    num(&f["jitter"], 1),
                ));
            }
        }
    }
    md
}
