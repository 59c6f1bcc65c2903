//! `lcm pretrain motion-evaluator`: the motion evaluator ([`super::motion`]) trained on a
//! HumanML3D-layout folder's train split (ground truth only), then scored on its test splits:
//! R-precision (groups of 32), MM-Dist, attribute accuracy, and R-precision with the captions
//! shuffled (which must fall to chance).

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::metrics::{mean_interval, r_precision, to_matrix};

/// Draws of the grouping behind each reported R-precision (mean and 95 % interval).
const REPLICATIONS: usize = 10;
use super::motion::{
    attributes, pad_clips, CaptionTokenizer, MotionEvalConfig, MotionEvaluator, HEADS, HEADS_N,
};
use crate::data::humanml3d::{load, LoadOptions, MotionClip};
use crate::data::motion::Program;
use crate::train::args::{StageSettings, TrainArgs, PRETRAIN};
use crate::train::run::{Run, Task};
use crate::train::state::{Metrics, TrainState};

#[derive(clap::Args, Debug, Clone)]
pub struct MotionEvaluatorArgs {
    /// WordPiece tokenizer of the caption encoder (MiniLM's).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/weights/minilm/tokenizer.json"))]
    pub tokenizer: PathBuf,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct Settings {
    config: MotionEvalConfig,
    #[serde(flatten)]
    stage: StageSettings,
}

/// A split ready for the networks: clips, their captions (token ids and masks, one row per
/// caption), which clip each caption belongs to, and the clips' attributes.
pub struct Prepared {
    pub clips: Vec<MotionClip>,
    pub ids: Tensor,
    pub mask: Tensor,
    pub owner: Vec<usize>,
    pub attributes: Vec<Option<[u32; HEADS_N]>>,
}

/// Read a split of `dir` (with `programs/` beside it, when there is one).
pub fn prepare(
    dir: &Path,
    split: &str,
    tok: &CaptionTokenizer,
    device: &Device,
) -> Result<Prepared> {
    let d = load(dir, split, &LoadOptions::default())?;
    let (mut texts, mut owner) = (Vec::new(), Vec::new());
    let mut attrs = Vec::new();
    for (i, c) in d.clips.iter().enumerate() {
        for cap in &c.captions {
            texts.push(cap.text.clone());
            owner.push(i);
        }
        let prog: Option<Program> = std::fs::read(dir.join(format!("programs/{}.json", c.name)))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        attrs.push(prog.as_ref().and_then(attributes));
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (ids, mask) = tok.encode(&refs, device)?;
    Ok(Prepared {
        clips: d.clips,
        ids,
        mask,
        owner,
        attributes: attrs,
    })
}

struct MotionEvalTask {
    settings: Settings,
    model: MotionEvaluator,
    data: Prepared,
    /// The captions of each clip (rows of `data.ids`).
    captions_of: Vec<Vec<usize>>,
    tokenizer: PathBuf,
    dir: PathBuf,
}

/// Cross-entropy over the rows whose label is not `u32::MAX`.
fn masked_ce(logits: &Tensor, labels: &[u32]) -> Result<Option<Tensor>> {
    let keep: Vec<u32> = (0..labels.len() as u32)
        .filter(|&i| labels[i as usize] != u32::MAX)
        .collect();
    if keep.is_empty() {
        return Ok(None);
    }
    let idx = Tensor::new(keep.as_slice(), logits.device())?;
    let y: Vec<u32> = keep.iter().map(|&i| labels[i as usize]).collect();
    let y = Tensor::new(y.as_slice(), logits.device())?;
    Ok(Some(candle_nn::loss::cross_entropy(
        &logits.index_select(&idx, 0)?,
        &y,
    )?))
}

impl Task for MotionEvalTask {
    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise")
    }

    fn loss(&self, rng: &mut ChaCha8Rng) -> Result<(Tensor, Metrics)> {
        let b = self.settings.stage.batch_size;
        let n = self.data.clips.len();
        let rows: Vec<usize> = rand::seq::index::sample(rng, n, b.min(n)).into_vec();
        let clips: Vec<&[f32]> = rows
            .iter()
            .map(|&i| self.data.clips[i].features.as_slice())
            .collect();
        let device = self.data.ids.device();
        let (x, m) = pad_clips(&clips, self.model.cfg.max_frames, device)?;
        let caps: Vec<u32> = rows
            .iter()
            .map(|&i| {
                let c = &self.captions_of[i];
                c[rng.random_range(0..c.len())] as u32
            })
            .collect();
        let caps = Tensor::new(caps.as_slice(), device)?;
        let (ids, mask) = (
            self.data.ids.index_select(&caps, 0)?,
            self.data.mask.index_select(&caps, 0)?,
        );
        let feats = self.model.motion_features(&x, &m)?;
        let motion = self.model.motion_embed(&feats)?;
        let text = self.model.text_embed(&ids, &mask)?;
        let mut loss = self.model.contrastive_loss(&motion, &text)?;
        let mut metrics = Metrics::new();
        for (h, logits) in self.model.heads(&feats)?.iter().enumerate() {
            let labels: Vec<u32> = rows
                .iter()
                .map(|&i| self.data.attributes[i].map_or(u32::MAX, |a| a[h]))
                .collect();
            if let Some(ce) = masked_ce(logits, &labels)? {
                metrics.insert(format!("ce_{}", HEADS[h].0), ce.to_scalar::<f32>()?.into());
                loss = (loss + (ce * 0.2)?)?;
            }
        }
        Ok((loss, metrics))
    }

    fn export(&mut self, state: &TrainState, run_dir: &Path) -> Result<()> {
        let out = run_dir.join("motion-evaluator");
        std::fs::create_dir_all(&out)?;
        crate::files::write_atomic(
            &out.join("config.json"),
            &serde_json::to_vec_pretty(&self.settings.config)?,
        )?;
        crate::files::save_safetensors(&state.weights(), &out.join("model.safetensors"))?;
        let tok = CaptionTokenizer::load(&self.tokenizer, self.settings.config.max_tokens)?;
        let mut report = serde_json::Map::new();
        for split in ["train", "test", "test_compositional", "test_paraphrase"] {
            let Ok(data) = prepare(&self.dir, split, &tok, self.data.ids.device()) else {
                continue;
            };
            if data.clips.len() < 32 {
                // R-precision ranks within groups of 32.
                report.insert(split.into(), serde_json::json!({"clips": data.clips.len()}));
                continue;
            }
            let figures = score(&self.model, &data, self.settings.stage.seed)?;
            println!("{split}: {figures}");
            report.insert(split.to_string(), figures);
            if split == "test" {
                let nn =
                    nearest_neighbour(&self.model, &self.data, &data, self.settings.stage.seed)?;
                println!("test, nearest-neighbour baseline: {nn}");
                report.insert("test_nearest_neighbour".into(), nn);
            }
        }
        crate::files::write_atomic(
            &out.join("scores.json"),
            &serde_json::to_vec_pretty(&serde_json::Value::Object(report))?,
        )?;
        println!(
            "trained the motion evaluator for {} steps; wrote {}",
            state.step,
            out.display()
        );
        Ok(())
    }
}

/// The retrieval baseline: for each clip of `test`, the training clip whose caption is nearest
/// its first caption by MiniLM sentence embeddings, scored as if it were generated — R-precision
/// against the test captions and FID of its features against the real test clips'.
pub fn nearest_neighbour(
    model: &MotionEvaluator,
    train: &Prepared,
    test: &Prepared,
    seed: u64,
) -> Result<serde_json::Value> {
    use crate::model::sentence::{SentenceEncoder, DEFAULT_SENTENCE_ENCODER};
    let device = test.ids.device();
    let minilm = SentenceEncoder::open(DEFAULT_SENTENCE_ENCODER, device)?;
    let embed = |texts: Vec<&str>| -> Result<Tensor> {
        let parts = texts
            .chunks(128)
            .map(|c| Ok(minilm.encode(c)?.sentences))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    };
    let all_train: Vec<&str> = train
        .clips
        .iter()
        .flat_map(|c| c.captions.iter().map(|t| t.text.as_str()))
        .collect();
    let owners: Vec<usize> = train
        .clips
        .iter()
        .enumerate()
        .flat_map(|(i, c)| std::iter::repeat_n(i, c.captions.len()))
        .collect();
    let queries: Vec<&str> = test
        .clips
        .iter()
        .map(|c| c.captions[0].text.as_str())
        .collect();
    let sims = embed(queries)?.matmul(&embed(all_train)?.t()?)?;
    let best = sims.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let retrieved: Vec<&[f32]> = best
        .iter()
        .map(|&b| train.clips[owners[b as usize]].features.as_slice())
        .collect();
    let mut figures = score_motions(model, &retrieved, test, seed)?;
    let real: Vec<&[f32]> = test.clips.iter().map(|c| c.features.as_slice()).collect();
    let (a, b) = (
        motion_features(model, &retrieved, device)?,
        motion_features(model, &real, device)?,
    );
    let (mu1, s1) = super::metrics::feature_stats(&a)?;
    let (mu2, s2) = super::metrics::feature_stats(&b)?;
    figures["fid"] = super::metrics::fid(&mu1, &s1, &mu2, &s2)?.into();
    Ok(figures)
}

/// A split's figures: R@1..3 and MM-Dist (first caption of each clip, groups of 32; the mean and
/// 95 % interval over 10 random groupings), the same with the captions shuffled, and each head's
/// accuracy.
pub fn score(model: &MotionEvaluator, data: &Prepared, seed: u64) -> Result<serde_json::Value> {
    let clips: Vec<&[f32]> = data.clips.iter().map(|c| c.features.as_slice()).collect();
    score_motions(model, &clips, data, seed)
}

/// The evaluator's motion features `[n, hidden]` of normalised clips.
pub fn motion_features(
    model: &MotionEvaluator,
    clips: &[&[f32]],
    device: &Device,
) -> Result<Tensor> {
    let mut out = Vec::new();
    for chunk in clips.chunks(64) {
        let (x, m) = pad_clips(chunk, model.cfg.max_frames, device)?;
        out.push(model.motion_features(&x, &m)?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// [`score`] of `motions` (one per clip of `data`, e.g. a model's or a baseline's) against
/// `data`'s captions; the heads are judged against `data`'s programs.
pub fn score_motions(
    model: &MotionEvaluator,
    motions: &[&[f32]],
    data: &Prepared,
    seed: u64,
) -> Result<serde_json::Value> {
    let device = data.ids.device();
    let feats = motion_features(model, motions, device)?;
    let first: Vec<u32> = (0..data.clips.len())
        .map(|i| {
            data.owner
                .iter()
                .position(|&o| o == i)
                .expect("a caption per clip") as u32
        })
        .collect();
    let idx = Tensor::new(first.as_slice(), device)?;
    let text = model.text_embed(
        &data.ids.index_select(&idx, 0)?,
        &data.mask.index_select(&idx, 0)?,
    )?;
    let me = model.motion_embed(&feats)?;
    // Replications: the grouping into 32s depends on the order; T2M reports a mean and a 95 %
    // interval over repeated draws.
    let pick = |t: &Tensor, o: &[usize]| -> Result<Tensor> {
        let o: Vec<u32> = o.iter().map(|&i| i as u32).collect();
        Ok(t.index_select(&Tensor::new(o.as_slice(), device)?, 0)?)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let (mut r_all, mut mm_all, mut rs_all) =
        (vec![Vec::new(); 3], Vec::new(), vec![Vec::new(); 3]);
    for _ in 0..REPLICATIONS {
        let mut order: Vec<usize> = (0..data.clips.len()).collect();
        order.shuffle(&mut rng);
        let m_mat = to_matrix(&pick(&me, &order)?)?;
        let (r, mm) = r_precision(&m_mat, &to_matrix(&pick(&text, &order)?)?, 32, 3)?;
        let mut shuffled = order.clone();
        shuffled.shuffle(&mut rng);
        let (rs, _) = r_precision(&m_mat, &to_matrix(&pick(&text, &shuffled)?)?, 32, 3)?;
        for k in 0..3 {
            r_all[k].push(r[k]);
            rs_all[k].push(rs[k]);
        }
        mm_all.push(mm);
    }
    let mean = |v: &[f64]| mean_interval(v).0;
    let r: Vec<f64> = r_all.iter().map(|v| mean(v)).collect();
    let rs: Vec<f64> = rs_all.iter().map(|v| mean(v)).collect();
    let r_interval: Vec<f64> = r_all.iter().map(|v| mean_interval(v).1).collect();
    let (mm, mm_interval) = mean_interval(&mm_all);
    let mut heads = serde_json::Map::new();
    for (h, logits) in model.heads(&feats)?.iter().enumerate() {
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let (mut right, mut total) = (0, 0);
        for (i, a) in data.attributes.iter().enumerate() {
            if let Some(a) = a {
                total += 1;
                right += usize::from(pred[i] == a[h]);
            }
        }
        if total > 0 {
            heads.insert(HEADS[h].0.into(), (right as f64 / total as f64).into());
        }
    }
    Ok(serde_json::json!({
        "clips": data.clips.len(),
        "replications": REPLICATIONS,
        "r_precision": r, "r_precision_95": r_interval,
        "mm_dist": mm, "mm_dist_95": mm_interval,
        "r_precision_shuffled": rs,
        "head_accuracy": heads,
    }))
}

/// `lcm pretrain motion-evaluator`.
pub fn run(args: &MotionEvaluatorArgs) -> Result<()> {
    let c = &args.train;
    let (device, _) = c.runtime.resolve()?;
    let dir = c.motion_data()?.clone();
    let config = MotionEvalConfig::default();
    let stage = c.stage(config.max_frames, &PRETRAIN)?;
    let plan = c.plan(&PRETRAIN)?;
    let options = c.options(&PRETRAIN)?;
    let tok = CaptionTokenizer::load(&args.tokenizer, config.max_tokens)?;
    let data = prepare(&dir, "train", &tok, &device)?;
    eprintln!(
        "{} training clips, {} captions",
        data.clips.len(),
        data.owner.len()
    );
    let mut captions_of = vec![Vec::new(); data.clips.len()];
    for (row, &o) in data.owner.iter().enumerate() {
        captions_of[o].push(row);
    }
    let (state, model) = TrainState::fresh(c.seed, options, &device, |vb| {
        MotionEvaluator::new(&config, vb)
    })?;
    let task = MotionEvalTask {
        settings: Settings { config, stage },
        model,
        data,
        captions_of,
        tokenizer: args.tokenizer.clone(),
        dir,
    };
    Run::new(state, task).resume_and_train(c.resume.as_deref(), &device, &plan)
}
