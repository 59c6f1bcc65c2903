//! A loaded evaluator folder and what it measures in generated images:
//! - FID on its penultimate features, generated images against the held-out real images whose
//!   captions prompted them (reference statistics shipped with the evaluator);
//! - prompt accuracy on shapes prompts: the predicted shape, colour and (where the prompt names
//!   it) position all match what the prompt says ([`crate::eval::prompts::parse_prompt`]);
//! - agreement: the classifier's probability of what the prompt names (geometric mean over the
//!   named attributes; the emoji category for emoji prompts), averaged over images.
//!
//! An evaluator folder holds `config.json` (sizes, class names, held-out accuracy),
//! `model.safetensors`, `reference.safetensors` (`mu`, `sigma` of the held-out features) and
//! `prompts.jsonl` (held-out captions, interleaved so any prefix keeps the mix of the sets).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use image::RgbImage;
use nalgebra::{DMatrix, DVector};
use serde::{Deserialize, Serialize};

use super::classifier::{classify, Classifier, EvaluatorConfig, HEADS, PROMPT_HEADS};
use super::metrics::{feature_stats, fid};

/// The shipped evaluator's folder.
pub fn default_evaluator() -> PathBuf {
    crate::pipeline::source::repo_root().join("weights/tiny-eval")
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
    pub category: Option<String>,
}

impl Evaluator {
    pub fn load(dir: &Path) -> Result<Self> {
        let config: EvaluatorConfig = crate::model::config::read_json(&dir.join("config.json"))?;
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
                let a = crate::eval::prompts::parse_prompt(&p.text);
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
    defaults: &crate::pipeline::source::Defaults,
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
            let mut noise = crate::sample::noise::SeededNoise::new(seed);
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
