//! The evaluator behind `lcm eval`: a small CNN trained on real images only (the procedural
//! shapes and the emoji, never generated images), and the figures computed with it:
//! - FID on its penultimate features, generated images against the held-out real images whose
//!   captions prompted them (reference statistics shipped with the evaluator);
//! - prompt accuracy on shapes prompts: the predicted shape, colour and (where the prompt names
//!   it) position all match what the prompt says ([`crate::toydata::parse_prompt`]);
//! - agreement: the classifier's probability of what the prompt names (geometric mean over the
//!   named attributes; the emoji category for emoji prompts), averaged over images.
//!
//! An evaluator folder holds `config.json` (sizes, class names, held-out accuracy),
//! `model.safetensors`, `reference.safetensors` (`mu`, `sigma` of the held-out features) and
//! `prompts.jsonl` (held-out captions, interleaved so any prefix keeps the mix of the sets).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use image::RgbImage;
use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::nn::{conv2d, linear, Conv2d, Linear};
use crate::pretrain::{save_safetensors, CommonArgs, RunLog, TrainState};
use crate::toydata;

/// The label heads, in order. `category` is "shape" for a shapes image or the emoji category;
/// the others are the shape attributes (absent for emoji).
pub const HEADS: [&str; 6] = [
    "category",
    "shape",
    "color",
    "size",
    "position",
    "background",
];
/// The heads a shapes prompt is judged on for prompt accuracy.
pub const PROMPT_HEADS: [&str; 3] = ["shape", "color", "position"];

/// An evaluator's `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluatorConfig {
    pub resolution: usize,
    /// Conv widths; each 3×3 conv is followed by SiLU and a 2× average pool.
    pub channels: Vec<usize>,
    /// Width of the feature layer (the FID features).
    pub feature_dim: usize,
    /// Class names per head (filled from the data when training).
    #[serde(default)]
    pub classes: BTreeMap<String, Vec<String>>,
    /// Accuracy per head on the held-out real images (written when training).
    #[serde(default)]
    pub heldout_accuracy: BTreeMap<String, f64>,
    /// FID between the held-out features and the same number of training images' features: the
    /// floor a perfect generator would reach at that sample size.
    #[serde(default)]
    pub real_fid: Option<f64>,
}

impl EvaluatorConfig {
    fn classes(&self, head: &str) -> Result<&[String]> {
        self.classes
            .get(head)
            .map(|v| v.as_slice())
            .with_context(|| format!("evaluator config: no classes for head {head:?}"))
    }
}

/// The CNN: convs → flatten → SiLU feature layer → one linear head per label.
pub struct Classifier {
    convs: Vec<Conv2d>,
    fc: Linear,
    heads: Vec<Linear>,
}

impl Classifier {
    pub fn new(cfg: &EvaluatorConfig, vb: VarBuilder) -> Result<Self> {
        let levels = cfg.channels.len();
        if cfg.resolution == 0 || !cfg.resolution.is_multiple_of(1 << levels) {
            bail!(
                "evaluator config: resolution {} must be a multiple of 2^{levels}",
                cfg.resolution
            )
        }
        let mut convs = Vec::new();
        let mut c_in = 3;
        for (i, &c) in cfg.channels.iter().enumerate() {
            convs.push(conv2d(c_in, c, 3, 1, 1, vb.pp(format!("conv{i}")))?);
            c_in = c;
        }
        let side = cfg.resolution >> levels;
        let fc = linear(c_in * side * side, cfg.feature_dim, true, vb.pp("fc"))?;
        let heads = HEADS
            .iter()
            .map(|h| {
                let k = cfg.classes(h)?.len();
                Ok(linear(
                    cfg.feature_dim,
                    k,
                    true,
                    vb.pp(format!("head_{h}")),
                )?)
            })
            .collect::<Result<_>>()?;
        Ok(Self { convs, fc, heads })
    }

    /// `[n, feature_dim]` features of `[n, 3, r, r]` images in [−1, 1].
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = images.clone();
        for conv in &self.convs {
            x = conv.forward(&x)?.silu()?.avg_pool2d(2)?;
        }
        Ok(self.fc.forward(&x.flatten_from(1)?)?.silu()?)
    }

    /// Log-probabilities per head, in [`HEADS`] order.
    pub fn log_probs(&self, features: &Tensor) -> Result<Vec<Tensor>> {
        self.heads
            .iter()
            .map(|h| log_softmax(&h.forward(features)?))
            .collect()
    }
}

/// Log-softmax over the last dimension. The max is a constant shift (detached: it changes no
/// gradient) that keeps `exp` finite.
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

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
    pub common: CommonArgs,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct EvaluatorRunState {
    resolution: usize,
    batch_size: usize,
    seed: u64,
}

/// `lcm pretrain evaluator`: train the classifier on `--data`, then export it with held-out
/// accuracy, reference feature statistics and prompts to `OUTPUT/evaluator`.
pub fn run_pretrain(args: &EvaluatorArgs) -> Result<()> {
    let c = &args.common;
    let (device, _) = c.runtime.resolve()?;
    let mut cfg: EvaluatorConfig = crate::config::read_json(&args.config)?;
    cfg.resolution = c.resolution;
    if c.batch_size == 0 {
        bail!("--batch-size must be at least 1")
    }
    let last = c.last_step()?;
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
    let colors: Vec<&str> = toydata::COLORS.iter().map(|c| c.0).collect();
    cfg.classes = BTreeMap::from([
        ("category".to_string(), categories),
        ("shape".to_string(), names(toydata::SHAPES)),
        ("color".to_string(), names(&colors)),
        ("size".to_string(), names(toydata::SIZES)),
        ("position".to_string(), names(toydata::POSITIONS)),
        ("background".to_string(), names(&colors)),
    ]);
    let (images, rows) = load_rows(rows, c.resolution)?;
    let images = images.to_device(&device)?;
    let n = images.dim(0)?;
    eprintln!("{n} training images at {}²", c.resolution);
    let targets = HEADS
        .iter()
        .map(|h| Ok(one_hot(&rows, h, cfg.classes(h)?)?.to_device(&device)?))
        .collect::<Result<Vec<_>>>()?;

    let init = crate::init::init_weights(c.seed, &device, |vb| {
        Classifier::new(&cfg, vb).map_err(candle_core::Error::wrap)
    })?;
    let mut state = TrainState::new(init, c)?;
    let run_state = EvaluatorRunState {
        resolution: c.resolution,
        batch_size: c.batch_size,
        seed: c.seed,
    };
    if let Some(r) = &c.resume {
        state.resume_matching(r, &device, &run_state)?;
    }
    let model = Classifier::new(&cfg, state.var_builder(&device))?;
    let mut log = RunLog::new(&c.output, state.step, last)?;
    while state.step < last {
        let mut rng = state.rng();
        let idx = crate::pretrain::rows(&mut rng, n, c.batch_size, &device)?;
        let batch = images.index_select(&idx, 0)?;
        let ys = targets
            .iter()
            .map(|t| Ok(t.index_select(&idx, 0)?))
            .collect::<Result<Vec<_>>>()?;
        let l = loss(&model, &batch, &ys)?;
        let lv = l.to_scalar::<f32>()? as f64;
        let (lr, gn) = state.apply(&l)?;
        log.record(
            state.step,
            serde_json::json!({"loss": lv, "lr": lr, "grad_norm": gn}),
        )?;
        if c.save_every > 0 && state.step % c.save_every == 0 {
            state.save(
                &c.output,
                serde_json::json!({"step": state.step, "run": run_state}),
            )?;
        }
    }
    log.finish();
    state.save(
        &c.output,
        serde_json::json!({"step": state.step, "run": run_state}),
    )?;
    let weights = state.weights();
    export(
        &cfg,
        &weights,
        &images,
        &rows,
        heldout,
        &c.output.join("evaluator"),
    )
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
    crate::image_io::write_atomic(&out.join("config.json"), &serde_json::to_vec_pretty(&cfg)?)?;
    save_safetensors(weights, &out.join("model.safetensors"))?;
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
    save_safetensors(&reference, &out.join("reference.safetensors"))?;
    let mut lines = Vec::new();
    for p in interleave(groups) {
        let mut v = serde_json::json!({"text": p.0});
        if let Some(c) = p.1 {
            v["category"] = c.into();
        }
        lines.push(v.to_string());
    }
    crate::image_io::write_atomic(
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

/// Features and per-head log-probabilities, in batches (no graph is recorded: plain tensors).
fn classify(model: &Classifier, images: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
    let n = images.dim(0)?;
    let mut feats = Vec::new();
    let mut lps: Vec<Vec<Tensor>> = vec![Vec::new(); HEADS.len()];
    for start in (0..n).step_by(128) {
        let x = images.narrow(0, start, 128.min(n - start))?;
        let f = model.features(&x)?;
        for (acc, lp) in lps.iter_mut().zip(model.log_probs(&f)?) {
            acc.push(lp);
        }
        feats.push(f);
    }
    let lps = lps
        .iter()
        .map(|v| Ok(Tensor::cat(v, 0)?))
        .collect::<Result<Vec<_>>>()?;
    Ok((Tensor::cat(&feats, 0)?, lps))
}

/// Mean and (unbiased) covariance of `[n, d]` features, in f64.
pub fn feature_stats(features: &Tensor) -> Result<(DVector<f64>, DMatrix<f64>)> {
    let (n, d) = features.dims2()?;
    if n < 2 {
        bail!("feature statistics need at least 2 images, got {n}")
    }
    let data = features
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let x = DMatrix::from_row_slice(n, d, &data);
    let mu = DVector::from_iterator(d, x.column_iter().map(|c| c.mean()));
    let mut centred = x;
    for mut row in centred.row_iter_mut() {
        row -= mu.transpose();
    }
    let sigma = centred.transpose() * &centred / (n as f64 - 1.0);
    Ok((mu, sigma))
}

/// Fréchet distance between N(mu1, s1) and N(mu2, s2):
/// |mu1 − mu2|² + tr(s1 + s2 − 2 (s1^½ s2 s1^½)^½). The symmetric form needs only symmetric
/// eigendecompositions (tr √(s1 s2) = tr √(s1^½ s2 s1^½)).
pub fn fid(
    mu1: &DVector<f64>,
    s1: &DMatrix<f64>,
    mu2: &DVector<f64>,
    s2: &DMatrix<f64>,
) -> Result<f64> {
    if mu1.len() != mu2.len() || s1.shape() != s2.shape() || s1.nrows() != mu1.len() {
        bail!("FID: feature sizes differ ({} vs {})", mu1.len(), mu2.len())
    }
    let sqrt_psd = |m: &DMatrix<f64>| {
        let e = SymmetricEigen::new((m + m.transpose()) * 0.5);
        let roots = e.eigenvalues.map(|v| v.max(0.0).sqrt());
        &e.eigenvectors * DMatrix::from_diagonal(&roots) * e.eigenvectors.transpose()
    };
    let r1 = sqrt_psd(s1);
    let m = &r1 * s2 * &r1;
    let e = SymmetricEigen::new((&m + m.transpose()) * 0.5);
    let tr_sqrt: f64 = e.eigenvalues.iter().map(|v| v.max(0.0).sqrt()).sum();
    Ok((mu1 - mu2).norm_squared() + s1.trace() + s2.trace() - 2.0 * tr_sqrt)
}

/// A loaded evaluator folder.
pub struct Evaluator {
    pub config: EvaluatorConfig,
    model: Classifier,
    mu: DVector<f64>,
    sigma: DMatrix<f64>,
    pub prompts: Vec<EvalPrompt>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EvalPrompt {
    pub text: String,
    /// The image category the prompt came from ("shape" for the shapes set, whose attributes are
    /// read from the text; an emoji category otherwise).
    #[serde(default)]
    pub category: Option<String>,
}

impl Evaluator {
    pub fn load(dir: &Path) -> Result<Self> {
        let config: EvaluatorConfig = crate::config::read_json(&dir.join("config.json"))?;
        let device = Device::Cpu;
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &device)
            .with_context(|| format!("cannot read {}", dir.join("model.safetensors").display()))?;
        let model = Classifier::new(
            &config,
            VarBuilder::from_tensors(weights, DType::F32, &device),
        )
        .with_context(|| format!("evaluator {}", dir.display()))?;
        let ref_path = dir.join("reference.safetensors");
        let reference = candle_core::safetensors::load(&ref_path, &device)
            .with_context(|| format!("cannot read {}", ref_path.display()))?;
        let get = |k: &str| {
            reference
                .get(k)
                .with_context(|| format!("{}: no tensor {k}", ref_path.display()))?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()
                .map_err(anyhow::Error::from)
        };
        let d = config.feature_dim;
        let (mu, sigma) = (get("mu")?, get("sigma")?);
        if mu.len() != d || sigma.len() != d * d {
            bail!(
                "{}: reference statistics do not match feature_dim {d}",
                ref_path.display()
            )
        }
        let prompts_path = dir.join("prompts.jsonl");
        let text = std::fs::read_to_string(&prompts_path)
            .with_context(|| format!("cannot read {}", prompts_path.display()))?;
        let prompts = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).with_context(|| {
                    format!("{}:{}: bad prompt line", prompts_path.display(), i + 1)
                })
            })
            .collect::<Result<Vec<EvalPrompt>>>()?;
        Ok(Self {
            config,
            model,
            mu: DVector::from_vec(mu),
            sigma: DMatrix::from_row_slice(d, d, &sigma),
            prompts,
        })
    }

    /// Features and per-head log-probabilities of generated images.
    fn read(&self, images: &[RgbImage]) -> Result<(Tensor, Vec<Tensor>)> {
        let r = self.config.resolution;
        let tensors = images
            .iter()
            .map(|img| crate::data::image_tensor(img.clone(), "generated image", r, &Device::Cpu))
            .collect::<Result<Vec<_>>>()?;
        classify(&self.model, &Tensor::stack(&tensors, 0)?)
    }

    /// What the evaluator reads in each image: one `head -> class` map per image.
    pub fn predict(&self, images: &[RgbImage]) -> Result<Vec<BTreeMap<String, String>>> {
        let (_, log_probs) = self.read(images)?;
        let mut out = vec![BTreeMap::new(); images.len()];
        for (h, lp) in HEADS.iter().zip(&log_probs) {
            let classes = self.config.classes(h)?;
            for (o, j) in out.iter_mut().zip(lp.argmax(D::Minus1)?.to_vec1::<u32>()?) {
                let class = classes.get(j as usize).cloned().unwrap_or_default();
                o.insert(h.to_string(), class);
            }
        }
        Ok(out)
    }

    /// Score generated images against the prompts that made them.
    pub fn score(&self, prompts: &[EvalPrompt], images: &[RgbImage]) -> Result<Scores> {
        if prompts.len() != images.len() {
            bail!("{} prompts for {} images", prompts.len(), images.len())
        }
        let (features, log_probs) = self.read(images)?;
        let probs = log_probs
            .iter()
            .map(|lp| Ok(lp.exp()?.to_vec2::<f32>()?))
            .collect::<Result<Vec<_>>>()?;
        let preds = log_probs
            .iter()
            .map(|lp| Ok(lp.argmax(D::Minus1)?.to_vec1::<u32>()?))
            .collect::<Result<Vec<_>>>()?;
        let head = |h: &str| HEADS.iter().position(|x| *x == h).expect("known head");

        let mut shape_prompts = 0usize;
        let mut all_right = 0usize;
        let mut per_head: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut agreement = 0f64;
        for (i, p) in prompts.iter().enumerate() {
            // What the prompt names, as (head, class).
            let mut named: Vec<(&str, String)> = Vec::new();
            if let Some(c) = &p.category {
                named.push(("category", c.clone()));
            }
            if p.category.as_deref().is_none_or(|c| c == "shape") {
                let a = toydata::parse_prompt(&p.text);
                named.extend(
                    [
                        ("shape", a.shape),
                        ("color", a.color),
                        ("size", a.size),
                        ("position", a.position),
                        ("background", a.background),
                    ]
                    .into_iter()
                    .filter_map(|(h, v)| v.map(|v| (h, v))),
                );
            }
            let mut log_sum = 0f64;
            let mut counted = 0usize;
            let mut right = true;
            for (h, want) in &named {
                let k = head(h);
                let classes = self.config.classes(h)?;
                let Some(j) = classes.iter().position(|c| c == want) else {
                    continue;
                };
                log_sum += (probs[k][i][j] as f64).max(1e-12).ln();
                counted += 1;
                if PROMPT_HEADS.contains(h) {
                    let ok = preds[k][i] as usize == j;
                    right &= ok;
                    let e = per_head.entry(h.to_string()).or_default();
                    e.0 += usize::from(ok);
                    e.1 += 1;
                }
            }
            if counted > 0 {
                agreement += (log_sum / counted as f64).exp();
            }
            if named.iter().any(|(h, _)| *h == "shape") {
                shape_prompts += 1;
                all_right += usize::from(right);
            }
        }
        let (mu, sigma) = feature_stats(&features)?;
        Ok(Scores {
            fid: fid(&mu, &sigma, &self.mu, &self.sigma)?,
            prompt_accuracy: (shape_prompts > 0).then(|| all_right as f64 / shape_prompts as f64),
            attribute_accuracy: per_head
                .into_iter()
                .map(|(h, (r, t))| (h, r as f64 / t as f64))
                .collect(),
            agreement: agreement / prompts.len() as f64,
            shape_prompts,
            images: images.len(),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub fid: f64,
    /// Fraction of shapes prompts whose shape, colour and named position all match.
    pub prompt_accuracy: Option<f64>,
    pub attribute_accuracy: BTreeMap<String, f64>,
    pub agreement: f64,
    pub shape_prompts: usize,
    pub images: usize,
}

/// Prompts naming a shape and a colour (and a background) that the shipped models are held to
/// (tests/shipped.rs; `cargo run --release --example prompt_following` measures any model).
pub const SHAPE_COLOUR_PROMPTS: [&str; 5] = [
    "a red circle on a white background",
    "a blue square on a yellow background",
    "a green triangle on a purple background",
    "a yellow star on a black background",
    "a white cross on a red background",
];

/// How one prompt was followed over seeds `0..seeds` (one image per seed).
#[derive(Debug, Clone)]
pub struct Followed {
    pub prompt: String,
    pub shape: f64,
    pub color: f64,
    /// The evaluator's reading of each seed's image, as "colour shape".
    pub seen: Vec<String>,
}

impl Followed {
    /// "Most seeds": both the named shape and the named colour in more than half the images.
    pub fn by_most_seeds(&self) -> bool {
        self.shape > 0.5 && self.color > 0.5
    }
}

/// Generate each prompt from seeds `0..seeds` with `req`'s settings (its gaps filled from
/// `defaults`, e.g. the pipeline definition's, then the model's own) and read the images' shape
/// and colour with the evaluator.
pub fn prompt_following(
    pipe: &crate::pipeline::Pipeline,
    ev: &Evaluator,
    prompts: &[&str],
    req: &crate::pipeline::GenerateRequest,
    defaults: &crate::source::Defaults,
    seeds: u64,
) -> Result<Vec<Followed>> {
    let mut out = Vec::new();
    for text in prompts {
        let mut images = Vec::new();
        for seed in 0..seeds {
            let r = crate::pipeline::GenerateRequest {
                prompt: text.to_string(),
                seed,
                n: 1,
                ..req.clone()
            };
            let mut noise = crate::sampler::SeededNoise::new(seed);
            images.extend(pipe.generate(&r, defaults, &mut noise, &mut |_| {})?.images);
        }
        let p = EvalPrompt {
            text: text.to_string(),
            category: Some("shape".into()),
        };
        let s = ev.score(&vec![p; images.len()], &images)?;
        let seen = ev
            .predict(&images)?
            .iter()
            .map(|p| format!("{} {}", p["color"], p["shape"]))
            .collect();
        out.push(Followed {
            prompt: text.to_string(),
            shape: s.attribute_accuracy["shape"],
            color: s.attribute_accuracy["color"],
            seen,
        });
    }
    Ok(out)
}

/// `lcm eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// A pipeline name, folder or hub id (default: the shipped model).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, value_parser = crate::sampler::parse_flag)]
    pub sampler: Option<crate::sampler::SamplerKind>,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub guidance: Option<f64>,
    #[arg(long)]
    pub tcd_gamma: Option<f64>,
    /// Number of images: the first K evaluation prompts, one seed each (seed + i).
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Requests run together as one U-Net batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Evaluator folder (default: the shipped weights/tiny-eval).
    #[arg(long)]
    pub evaluator: Option<PathBuf>,
    /// Where the figures go: FILE.json and FILE.md beside it.
    #[arg(long, default_value = "eval.json")]
    pub output: PathBuf,
    /// Also write the first images as a grid PNG here.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: crate::runtime::RuntimeArgs,
}

/// The shipped evaluator's folder.
pub fn default_evaluator() -> PathBuf {
    crate::source::repo_root().join("weights/tiny-eval")
}

/// `lcm eval`: generate `--samples` images for the evaluation prompts and score them.
pub fn run(args: &EvalArgs) -> Result<()> {
    use crate::pipeline::{GenerateRequest, Pipeline};
    use crate::sampler::{NoiseSource, SeededNoise};

    if args.samples < 2 {
        bail!("--samples must be at least 2 (FID needs a covariance)")
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1")
    }
    let eval_dir = args.evaluator.clone().unwrap_or_else(default_evaluator);
    let evaluator = Evaluator::load(&eval_dir)?;
    if args.samples > evaluator.prompts.len() {
        bail!(
            "--samples {}: the evaluator has {} prompts",
            args.samples,
            evaluator.prompts.len()
        )
    }
    let model_name = args
        .model
        .clone()
        .unwrap_or_else(|| crate::source::DEFAULT_MODEL.to_string());
    let (device, dtype) = args.runtime.resolve()?;
    let resolved = crate::source::resolve(&model_name)?;
    let pipe = Pipeline::load(&resolved.dir, &device, dtype)
        .with_context(|| format!("cannot load model {}", resolved.dir.display()))?;
    let prompts = &evaluator.prompts[..args.samples];
    let reqs: Vec<GenerateRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerateRequest {
            prompt: p.text.clone(),
            sampler: args.sampler,
            steps: args.steps,
            guidance: args.guidance,
            tcd_gamma: args.tcd_gamma,
            n: 1,
            seed: args.seed + i as u64,
            ..Default::default()
        })
        .collect();
    let settings = pipe.resolve(&reqs[0], &resolved.defaults)?;
    let bar = indicatif::ProgressBar::new(reqs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "image {pos}/{len} [{elapsed_precise}] {per_sec} ETA {eta}",
        )
        .expect("valid template"),
    );
    let mut images = Vec::with_capacity(reqs.len());
    let start = Instant::now();
    for chunk in reqs.chunks(args.batch_size) {
        let mut noises: Vec<SeededNoise> = chunk.iter().map(|r| SeededNoise::new(r.seed)).collect();
        let mut refs: Vec<&mut dyn NoiseSource> = noises
            .iter_mut()
            .map(|n| n as &mut dyn NoiseSource)
            .collect();
        let gens = pipe.generate_batch(chunk, &resolved.defaults, &mut refs, &mut |_| {})?;
        for g in gens {
            images.extend(g.images);
        }
        bar.inc(chunk.len() as u64);
    }
    let ms_per_image = start.elapsed().as_secs_f64() * 1000.0 / images.len() as f64;
    bar.finish_and_clear();
    let scores = evaluator.score(prompts, &images)?;

    let report = serde_json::json!({
        "model": resolved.label,
        "sampler": settings.sampler.to_string(),
        "steps": settings.steps,
        "guidance": settings.guidance,
        "samples": args.samples,
        "seed": args.seed,
        "resolution": settings.width,
        "evaluator": eval_dir.display().to_string(),
        "fid": scores.fid,
        "real_fid_floor": evaluator.config.real_fid,
        "prompt_accuracy": scores.prompt_accuracy,
        "attribute_accuracy": scores.attribute_accuracy,
        "agreement": scores.agreement,
        "shape_prompts": scores.shape_prompts,
        "ms_per_image": ms_per_image,
        "device": format!("{device:?}"),
    });
    let pct = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{:.1} %", 100.0 * v));
    let row = format!(
        "| {} | {} | {} | {} | {:.2} | {} | {:.3} | {:.0} |",
        resolved.label,
        settings.sampler,
        settings.steps,
        settings.guidance,
        scores.fid,
        pct(scores.prompt_accuracy),
        scores.agreement,
        ms_per_image
    );
    let md = format!(
        "| model | sampler | steps | guidance | FID ↓ | prompt accuracy ↑ | agreement ↑ | ms/image |\n\
         |---|---|---|---|---|---|---|---|\n{row}\n\n\
         {} images ({} shapes prompts), seeds {}..{}, evaluator {} (real held-out images against \
         as many training images: FID {})\n",
        args.samples,
        scores.shape_prompts,
        args.seed,
        args.seed + args.samples as u64 - 1,
        eval_dir.display(),
        evaluator
            .config
            .real_fid
            .map_or("–".to_string(), |f| format!("{f:.1}"))
    );
    crate::image_io::write_atomic(&args.output, &serde_json::to_vec_pretty(&report)?)?;
    let md_path = args.output.with_extension("md");
    crate::image_io::write_atomic(&md_path, md.as_bytes())?;
    if let Some(grid) = &args.grid {
        let g = crate::image_io::grid(&images[..images.len().min(16)], 4)?;
        crate::image_io::save_png(&g, grid)?;
    }
    print!("{md}");
    println!("wrote {} and {}", args.output.display(), md_path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag(v: &[f64]) -> DMatrix<f64> {
        DMatrix::from_diagonal(&DVector::from_row_slice(v))
    }

    #[test]
    fn fid_matches_closed_forms() -> Result<()> {
        let mu = DVector::from_row_slice(&[1.0, -2.0, 0.5]);
        let s = DMatrix::from_row_slice(3, 3, &[2.0, 0.3, 0.1, 0.3, 1.0, 0.2, 0.1, 0.2, 0.5]);
        assert!(fid(&mu, &s, &mu, &s)?.abs() < 1e-9);
        // Commuting (diagonal) covariances: Σ (√a − √b)² plus the mean term.
        let (a, b) = ([4.0, 1.0, 9.0], [1.0, 1.0, 4.0]);
        let mu2 = DVector::from_row_slice(&[0.0, -2.0, 0.5]);
        let want = 1.0 + (2.0f64 - 1.0).powi(2) + 0.0 + (3.0f64 - 2.0).powi(2);
        assert!((fid(&mu, &diag(&a), &mu2, &diag(&b))? - want).abs() < 1e-9);
        // Symmetric in its arguments even when the covariances do not commute.
        let s2 = DMatrix::from_row_slice(3, 3, &[1.0, -0.4, 0.0, -0.4, 2.0, 0.5, 0.0, 0.5, 1.5]);
        let (x, y) = (fid(&mu, &s, &mu2, &s2)?, fid(&mu2, &s2, &mu, &s)?);
        assert!((x - y).abs() < 1e-9 && x > 0.0, "{x} {y}");
        Ok(())
    }

    #[test]
    fn feature_stats_are_mean_and_unbiased_covariance() -> Result<()> {
        let f = Tensor::new(&[[1f32, 2.0], [3.0, 2.0], [5.0, 8.0]], &Device::Cpu)?;
        let (mu, s) = feature_stats(&f)?;
        assert_eq!(mu.as_slice(), &[3.0, 4.0]);
        // x: 1,3,5 (var 4); y: 2,2,8 (var 12); cov = ((−2)(−2) + 0 + 2·4)/2 = 6.
        assert_eq!(s.as_slice(), &[4.0, 6.0, 6.0, 12.0]);
        Ok(())
    }

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
        let init = crate::init::init_weights(3, &Device::Cpu, |vb| {
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
        let mut opt = crate::optim::AdamW::new(
            vars.clone(),
            crate::optim::AdamWConfig {
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
