//! `lcm pretrain evaluator`: the evaluator's classifier trained on real images only (the
//! procedural shapes and the emoji, never generated images), then exported with its held-out
//! accuracy, reference feature statistics and evaluation prompts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::classifier::{classify, Classifier, EvaluatorConfig, HEADS};
use super::metrics::{feature_stats, fid};
use crate::data::{random_rows, toy};
use crate::train::args::{StageSettings, TrainArgs, PRETRAIN};
use crate::train::run::{Run, Task};
use crate::train::state::{Metrics, TrainState};

/// One labelled image of a metadata.jsonl folder.
struct Row {
    image: PathBuf,
    text: String,
    labels: BTreeMap<String, String>,
}

fn read_rows(dir: &Path) -> Result<Vec<Row>> {
    let path = dir.join("metadata.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let file = field("file_name")
            .with_context(|| format!("{}:{}: no file_name", path.display(), i + 1))?;
        let mut labels = BTreeMap::new();
        if field("shape").is_some() {
            labels.insert("category".to_string(), "shape".to_string());
        } else if let Some(c) = field("category") {
            labels.insert("category".to_string(), c);
        }
        for head in &HEADS[1..] {
            if let Some(l) = field(head) {
                labels.insert(head.to_string(), l);
            }
        }
        rows.push(Row {
            image: dir.join(file),
            text: field("text").unwrap_or_default(),
            labels,
        });
    }
    Ok(rows)
}

/// Load the rows' images in parallel; unreadable ones are dropped with a count.
fn load_rows(rows: Vec<Row>, resolution: usize) -> Result<(Tensor, Vec<Row>)> {
    let loaded: Vec<(Row, Option<Tensor>)> = rows
        .into_par_iter()
        .map(|r| {
            let t = crate::data::load_image(&r.image, resolution, &Device::Cpu).ok();
            (r, t)
        })
        .collect();
    let skipped = loaded.iter().filter(|(_, t)| t.is_none()).count();
    if skipped > 0 {
        eprintln!("warning: {skipped} unreadable images skipped");
    }
    let (rows, tensors): (Vec<Row>, Vec<Tensor>) = loaded
        .into_iter()
        .filter_map(|(r, t)| t.map(|t| (r, t)))
        .unzip();
    if tensors.is_empty() {
        bail!("no readable images")
    }
    Ok((Tensor::stack(&tensors, 0)?, rows))
}

/// One-hot targets `[n, classes]` for `head`; all-zero rows where an image has no such label (its
/// loss term vanishes).
fn one_hot(rows: &[Row], head: &str, classes: &[String]) -> Result<Tensor> {
    let k = classes.len();
    let mut data = vec![0f32; rows.len() * k];
    for (i, r) in rows.iter().enumerate() {
        if let Some(j) = r
            .labels
            .get(head)
            .and_then(|l| classes.iter().position(|c| c == l))
        {
            data[i * k + j] = 1.0;
        }
    }
    Ok(Tensor::from_vec(data, (rows.len(), k), &Device::Cpu)?)
}

/// Cross-entropy summed over heads, averaged over the batch (missing labels contribute nothing).
fn loss(model: &Classifier, images: &Tensor, targets: &[Tensor]) -> Result<Tensor> {
    let log_probs = model.log_probs(&model.features(images)?)?;
    let n = images.dim(0)? as f64;
    let mut total: Option<Tensor> = None;
    for (lp, y) in log_probs.iter().zip(targets) {
        let term = (lp * y)?.sum_all()?.affine(-1.0 / n, 0.0)?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    total.context("no heads")
}

/// `lcm pretrain evaluator`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvaluatorArgs {
    /// The evaluator's config.json (resolution, conv widths, feature width).
    #[arg(long)]
    pub config: PathBuf,
    /// Held-out folders (imagefolder layout with attributes): accuracy, FID reference statistics
    /// and the evaluation prompts come from them.
    #[arg(long, required = true, num_args = 1..)]
    pub heldout: Vec<PathBuf>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct EvaluatorSettings {
    #[serde(flatten)]
    stage: StageSettings,
}

struct EvaluatorTask {
    settings: EvaluatorSettings,
    model: Classifier,
    images: Tensor,
    targets: Vec<Tensor>,
    cfg: EvaluatorConfig,
    rows: Vec<Row>,
    heldout: Vec<Vec<Row>>,
}

impl Task for EvaluatorTask {
    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise")
    }

    fn loss(&self, rng: &mut ChaCha8Rng) -> Result<(Tensor, Metrics)> {
        let n = self.images.dim(0)?;
        let idx = random_rows(rng, n, self.settings.stage.batch_size, self.images.device())?;
        let batch = self.images.index_select(&idx, 0)?;
        let ys = self
            .targets
            .iter()
            .map(|t| Ok(t.index_select(&idx, 0)?))
            .collect::<Result<Vec<_>>>()?;
        Ok((loss(&self.model, &batch, &ys)?, Metrics::new()))
    }

    fn export(&mut self, state: &TrainState, run_dir: &Path) -> Result<()> {
        export(
            &self.cfg,
            &state.weights(),
            &self.images,
            &self.rows,
            std::mem::take(&mut self.heldout),
            &run_dir.join("evaluator"),
        )
    }
}

/// `lcm pretrain evaluator`: train the classifier on `--data`, then export it with held-out
/// accuracy, reference feature statistics and prompts to `OUTPUT/evaluator`.
pub fn run(args: &EvaluatorArgs) -> Result<()> {
    let c = &args.train;
    let (device, _) = c.runtime.resolve()?;
    let mut cfg: EvaluatorConfig = crate::model::config::read_json(&args.config)?;
    let resolution = c.resolution.unwrap_or(64);
    cfg.resolution = resolution;
    let stage = c.stage(resolution, &PRETRAIN)?;
    let plan = c.plan(&PRETRAIN)?;
    let options = c.options(&PRETRAIN)?;
    // Read the held-out lists first: a bad folder should fail before training, not after.
    let heldout = args
        .heldout
        .iter()
        .map(|d| read_rows(d))
        .collect::<Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    for d in &c.data {
        rows.extend(read_rows(d)?);
    }
    let mut categories: Vec<String> = rows
        .iter()
        .filter_map(|r| r.labels.get("category").cloned())
        .filter(|c| c != "shape")
        .collect();
    categories.sort();
    categories.dedup();
    categories.insert(0, "shape".into());
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let colors: Vec<&str> = toy::COLORS.iter().map(|c| c.0).collect();
    cfg.classes = BTreeMap::from([
        ("category".to_string(), categories),
        ("shape".to_string(), names(toy::SHAPES)),
        ("color".to_string(), names(&colors)),
        ("size".to_string(), names(toy::SIZES)),
        ("position".to_string(), names(toy::POSITIONS)),
        ("background".to_string(), names(&colors)),
    ]);
    let (images, rows) = load_rows(rows, resolution)?;
    let images = images.to_device(&device)?;
    eprintln!("{} training images at {resolution}²", images.dim(0)?);
    let targets = HEADS
        .iter()
        .map(|h| Ok(one_hot(&rows, h, cfg.classes(h)?)?.to_device(&device)?))
        .collect::<Result<Vec<_>>>()?;
    let (state, model) =
        TrainState::fresh(c.seed, options, &device, |vb| Classifier::new(&cfg, vb))?;
    let task = EvaluatorTask {
        settings: EvaluatorSettings { stage },
        model,
        images,
        targets,
        cfg,
        rows,
        heldout,
    };
    Run::new(state, task).resume_and_train(c.resume.as_deref(), &device, &plan)
}

/// Write the evaluator folder: held-out accuracy, reference statistics, prompts.
fn export(
    cfg: &EvaluatorConfig,
    weights: &std::collections::HashMap<String, Tensor>,
    train_images: &Tensor,
    train_rows: &[Row],
    heldout: Vec<Vec<Row>>,
    out: &Path,
) -> Result<()> {
    let device = train_images.device().clone();
    let model = Classifier::new(
        cfg,
        VarBuilder::from_tensors(weights.clone(), DType::F32, &device),
    )?;
    let mut groups = Vec::new();
    let mut all_rows = Vec::new();
    let mut all_images = Vec::new();
    for rows in heldout {
        let (images, rows) = load_rows(rows, cfg.resolution)?;
        groups.push(
            rows.iter()
                .map(|r| (r.text.clone(), r.labels.get("category").cloned()))
                .collect::<Vec<_>>(),
        );
        all_images.push(images);
        all_rows.extend(rows);
    }
    let images = Tensor::cat(&all_images, 0)?.to_device(&device)?;
    let (features, log_probs) = classify(&model, &images)?;
    let mut cfg = cfg.clone();
    for (h, lp) in HEADS.iter().zip(&log_probs) {
        let classes = cfg.classes(h)?;
        let pred = lp.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let (mut right, mut total) = (0usize, 0usize);
        for (r, p) in all_rows.iter().zip(pred) {
            if let Some(l) = r.labels.get(*h) {
                total += 1;
                right += usize::from(classes[p as usize] == *l);
            }
        }
        if total > 0 {
            cfg.heldout_accuracy
                .insert(h.to_string(), right as f64 / total as f64);
        }
    }
    let (mu, sigma) = feature_stats(&features)?;
    // The floor: as many training images as held-out ones, in the held-out mix of shapes and
    // other pictures, spread evenly over the training set.
    let is_shape = |r: &Row| r.labels.get("category").is_some_and(|c| c == "shape");
    let mut picks = Vec::new();
    for want_shape in [true, false] {
        let want = all_rows
            .iter()
            .filter(|r| is_shape(r) == want_shape)
            .count();
        let pool: Vec<u32> = (0..train_rows.len())
            .filter(|&i| is_shape(&train_rows[i]) == want_shape)
            .map(|i| i as u32)
            .collect();
        let k = want.min(pool.len());
        picks.extend((0..k).map(|i| pool[i * pool.len() / k]));
    }
    let sample = train_images.index_select(&Tensor::new(picks.as_slice(), &device)?, 0)?;
    let (train_features, _) = classify(&model, &sample)?;
    let (mu_t, sigma_t) = feature_stats(&train_features)?;
    cfg.real_fid = Some(fid(&mu_t, &sigma_t, &mu, &sigma)?);

    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::files::write_atomic(&out.join("config.json"), &serde_json::to_vec_pretty(&cfg)?)?;
    crate::files::save_safetensors(weights, &out.join("model.safetensors"))?;
    let d = mu.len();
    let reference = std::collections::HashMap::from([
        (
            "mu".to_string(),
            Tensor::from_vec(mu.as_slice().to_vec(), d, &Device::Cpu)?,
        ),
        (
            "sigma".to_string(),
            Tensor::from_vec(sigma.as_slice().to_vec(), (d, d), &Device::Cpu)?,
        ),
    ]);
    crate::files::save_safetensors(&reference, &out.join("reference.safetensors"))?;
    let mut lines = Vec::new();
    for p in interleave(groups) {
        let mut v = serde_json::json!({"text": p.0});
        if let Some(c) = p.1 {
            v["category"] = c.into();
        }
        lines.push(v.to_string());
    }
    crate::files::write_atomic(
        &out.join("prompts.jsonl"),
        (lines.join("\n") + "\n").as_bytes(),
    )?;
    println!(
        "evaluator: held-out accuracy {} | real-data FID floor {:.3} | wrote {}",
        cfg.heldout_accuracy
            .iter()
            .map(|(h, a)| format!("{h} {:.3}", a))
            .collect::<Vec<_>>()
            .join(", "),
        cfg.real_fid.unwrap_or(f64::NAN),
        out.display()
    );
    Ok(())
}

/// Merge lists so that every prefix holds each list in proportion to its length (item j of a
/// list of n sits at (j + ½)/n).
fn interleave<T>(groups: Vec<Vec<T>>) -> Vec<T> {
    let mut keyed: Vec<(f64, usize, T)> = Vec::new();
    for (g, items) in groups.into_iter().enumerate() {
        let n = items.len() as f64;
        keyed.extend(
            items
                .into_iter()
                .enumerate()
                .map(|(j, t)| ((j as f64 + 0.5) / n, g, t)),
        );
    }
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    keyed.into_iter().map(|k| k.2).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaving_keeps_proportions_in_every_prefix() {
        let a: Vec<u32> = (0..10).collect();
        let b: Vec<u32> = (100..102).collect();
        let merged = interleave(vec![a, b]);
        assert_eq!(merged.len(), 12);
        let first_b = merged.iter().position(|&x| x >= 100).unwrap();
        assert!((2..=4).contains(&first_b), "{merged:?}");
        assert_eq!(merged.iter().filter(|&&x| x >= 100).count(), 2);
    }

    #[test]
    fn classifier_learns_and_every_weight_gets_a_gradient() -> Result<()> {
        let cfg = EvaluatorConfig {
            resolution: 16,
            channels: vec![4, 8],
            feature_dim: 16,
            classes: HEADS
                .iter()
                .map(|h| (h.to_string(), vec!["a".to_string(), "b".to_string()]))
                .collect(),
            heldout_accuracy: BTreeMap::new(),
            real_fid: None,
        };
        // Two classes told apart by which half of the image is bright; every head sees the
        // same label, except that the second half of the batch has no `shape` label.
        let n = 16;
        let mut px = vec![-1f32; n * 3 * 16 * 16];
        let mut rows = Vec::new();
        for i in 0..n {
            let class = i % 2;
            for c in 0..3 {
                for y in 0..16 {
                    for x in (class * 8)..(class * 8 + 8) {
                        px[((i * 3 + c) * 16 + y) * 16 + x] = 1.0;
                    }
                }
            }
            let mut labels: BTreeMap<String, String> = HEADS
                .iter()
                .map(|h| (h.to_string(), ["a", "b"][class].to_string()))
                .collect();
            if i >= n / 2 {
                labels.remove("shape");
            }
            rows.push(Row {
                image: PathBuf::new(),
                text: String::new(),
                labels,
            });
        }
        let images = Tensor::from_vec(px, (n, 3, 16, 16), &Device::Cpu)?;
        let targets = HEADS
            .iter()
            .map(|h| one_hot(&rows, h, cfg.classes(h)?))
            .collect::<Result<Vec<_>>>()?;
        let init = crate::nn::init::init_weights(3, &Device::Cpu, |vb| {
            Classifier::new(&cfg, vb).map_err(candle_core::Error::wrap)
        })?;
        let vars: std::collections::HashMap<String, candle_core::Var> = init
            .into_iter()
            .map(|(k, t)| Ok((k, candle_core::Var::from_tensor(&t)?)))
            .collect::<Result<_>>()?;
        let map = candle_nn::VarMap::new();
        map.data().lock().unwrap().extend(vars.clone());
        let model = Classifier::new(
            &cfg,
            VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
        )?;
        let l0 = loss(&model, &images, &targets)?;
        let grads = l0.backward()?;
        for (name, v) in &vars {
            let g = grads
                .get(v)
                .with_context(|| format!("no gradient for {name}"))?;
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm > 0.0, "zero gradient for {name}");
        }
        let mut opt = crate::train::optim::AdamW::new(
            vars.clone(),
            crate::train::optim::AdamWConfig {
                lr: 1e-2,
                ..Default::default()
            },
        )?;
        let first = l0.to_scalar::<f32>()?;
        let mut last = first;
        for _ in 0..60 {
            let l = loss(&model, &images, &targets)?;
            last = l.to_scalar::<f32>()?;
            opt.step(&l.backward()?, 1e-2)?;
        }
        assert!(last < 0.05 * first, "loss {first} → {last}");
        Ok(())
    }
}
