//! The text-to-motion model behind the batcher, and its wire format
//! (`POST /v1/motions/generations`): validated jobs in, joints out, encoded per request.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api::{check_prompt_bytes, random_seed, ApiError, MAX_GUIDANCE, MAX_IMAGES, MAX_STEPS};
use super::batcher::{run_in_chunks, BatchModel};
use crate::motion::io::{JointsFile, MotionFormat};
use crate::motion::{Pose, FPS};
use crate::pipeline::source::Defaults;
use crate::pipeline::text2motion::{
    MotionItem, MotionPipeline, MotionShape, CHAIN_OVERLAP, MAX_SECONDS,
};
pub use crate::pipeline::text2motion::{MAX_FRAMES, MIN_FRAMES};
use crate::sample::sampler::SamplerKind;

/// What every motion of one denoiser batch shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MotionKey {
    pub shape: MotionShape,
    /// A teacher with guidance > 1 runs CFG (twice the rows); it never shares a batch with one
    /// that does not.
    pub cfg: bool,
}

#[derive(Debug, Clone)]
pub struct MotionJob {
    pub key: MotionKey,
    pub items: Vec<MotionItem>,
}

pub struct GeneratedMotion {
    pub joints: Vec<Pose>,
    pub seed: u64,
}

/// A loaded motion pipeline, shared by every request.
pub struct MotionModel {
    pub pipe: Arc<MotionPipeline>,
    /// The name clients see (`/v1/models`, the request's `model`).
    pub id: String,
    /// The pipeline definition's defaults over the class's (student: LCM 4; teacher: DDIM 50).
    pub defaults: Defaults,
    /// Prompts this model can follow, for clients to offer.
    pub examples: Vec<String>,
    /// Most motions per denoiser call.
    pub max_batch: usize,
}

impl MotionModel {
    pub fn new(
        pipe: Arc<MotionPipeline>,
        id: String,
        defaults: &Defaults,
        examples: Vec<String>,
        max_batch: usize,
    ) -> Self {
        let defaults = defaults.or(&pipe.class_defaults());
        Self {
            pipe,
            id,
            defaults,
            examples,
            max_batch,
        }
    }

    fn is_student(&self) -> bool {
        self.pipe.folder.denoiser.time_cond_proj_dim.is_some()
    }
}

impl BatchModel for MotionModel {
    type Job = MotionJob;
    type Output = Vec<GeneratedMotion>;
    type Key = MotionKey;

    fn kind(&self) -> &'static str {
        "motion"
    }

    fn key(&self, job: &MotionJob) -> MotionKey {
        job.key
    }

    fn units(&self, job: &MotionJob) -> usize {
        job.items.len()
    }

    fn cost(&self, job: &MotionJob) -> f64 {
        let k = &job.key;
        let window = self.pipe.vae.config.max_frames;
        // Beyond one window, each further window adds window − overlap frames.
        let windows = if k.shape.frames <= window {
            1
        } else {
            1 + (k.shape.frames - window).div_ceil(window - CHAIN_OVERLAP)
        };
        let evals = k.shape.steps as f64 * if k.cfg { 2.0 } else { 1.0 };
        job.items.len() as f64 * windows as f64 * evals
    }

    fn cost_terms(&self) -> &'static str {
        "n × windows of the model's length × steps, twice with CFG"
    }

    fn run(
        &self,
        jobs: Vec<MotionJob>,
        wanted: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<anyhow::Result<Vec<GeneratedMotion>>> {
        let Some(key) = jobs.first().map(|j| j.key) else {
            return Vec::new();
        };
        let items: Vec<Vec<MotionItem>> = jobs.into_iter().map(|j| j.items).collect();
        run_in_chunks(&items, self.max_batch, wanted, |chunk, wanted| {
            let chunk: Vec<MotionItem> = chunk.iter().map(|&it| it.clone()).collect();
            let motions = self.pipe.generate_items(&chunk, &key.shape, wanted)?;
            Ok(motions
                .into_iter()
                .zip(&chunk)
                .map(|(joints, it)| {
                    joints.map(|joints| GeneratedMotion {
                        joints,
                        seed: it.seed,
                    })
                })
                .collect())
        })
    }
}

/// `POST /v1/motions/generations`: the images API's shape, for motion.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MotionRequest {
    /// What the person does, e.g. "a person walks forward".
    pub prompt: String,
    /// The served motion model's id (optional).
    pub model: Option<String>,
    /// What CFG steers away from (teacher models; a distilled student ignores it).
    pub negative_prompt: Option<String>,
    /// Length in seconds (20 fps); or give `frames`. Default: the model's.
    pub seconds: Option<f64>,
    /// Length in frames at 20 fps (instead of `seconds`).
    pub frames: Option<usize>,
    /// Motions to make, 1–10; motion i uses seed + i.
    pub n: Option<usize>,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub seed: Option<u64>,
    /// `lcm`, `tcd` or `ddim`.
    pub sampler: Option<String>,
    /// `json` (default), `npy`, `bvh` or `gif`.
    pub format: Option<String>,
}

/// The response: one entry per motion.
#[derive(Debug, Serialize, ToSchema)]
pub struct MotionResponse {
    pub created: u64,
    pub data: Vec<MotionData>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MotionData {
    pub seed: u64,
    /// `json`, `npy`, `bvh` or `gif`.
    pub format: String,
    /// `json`: `{fps, joints: [frames][22][3]}` (metres, SMPL joint order, Y up); `bvh`: the file
    /// as text.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub motion: Option<serde_json::Value>,
    /// `npy` (HumanML3D feature rows, f4) and `gif`: the file, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64: Option<String>,
}

impl MotionRequest {
    pub fn format(&self) -> Result<MotionFormat, ApiError> {
        match self.format.as_deref() {
            None => Ok(MotionFormat::Json),
            Some(f) => MotionFormat::parse(f).ok_or_else(|| {
                ApiError::invalid(
                    "format",
                    format!("format must be json, npy, bvh or gif, got {f:?}"),
                )
            }),
        }
    }

    /// Check every value and resolve defaults from the model; nothing here runs the model.
    pub fn to_job(&self, model: &MotionModel) -> Result<MotionJob, ApiError> {
        if let Some(m) = &self.model {
            if m != &model.id {
                return Err(ApiError::invalid(
                    "model",
                    format!(
                        "model {m:?} is not served here; the motion model is {:?}",
                        model.id
                    ),
                ));
            }
        }
        check_prompt(model, "prompt", &self.prompt)?;
        if self.prompt.trim().is_empty() {
            return Err(ApiError::invalid("prompt", "prompt must not be empty"));
        }
        if let Some(neg) = &self.negative_prompt {
            check_prompt(model, "negative_prompt", neg)?;
        }
        self.format()?;
        let frames = match (self.seconds, self.frames) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "frames",
                    "give seconds or frames, not both",
                ))
            }
            (None, Some(f)) => f,
            (s, None) => {
                let s = s.or(model.defaults.seconds).unwrap_or(4.0);
                if !(s.is_finite() && s > 0.0) {
                    return Err(ApiError::invalid(
                        "seconds",
                        format!("seconds must be a positive number, got {s}"),
                    ));
                }
                (s * FPS).round().min(1e9) as usize
            }
        };
        if !(MIN_FRAMES..=MAX_FRAMES).contains(&frames) {
            let param = if self.frames.is_some() {
                "frames"
            } else {
                "seconds"
            };
            return Err(ApiError::invalid(
                param,
                format!(
                    "motions are {MIN_FRAMES} to {MAX_FRAMES} frames ({} to {MAX_SECONDS} s at \
                     {FPS} fps), asked for {frames}",
                    MIN_FRAMES as f64 / FPS
                ),
            ));
        }
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_IMAGES).contains(&n) {
            return Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {MAX_IMAGES}, got {n}"),
            ));
        }
        let steps = self.steps.or(model.defaults.steps).unwrap_or(4);
        if !(1..=MAX_STEPS).contains(&steps) {
            return Err(ApiError::invalid(
                "steps",
                format!("steps must be between 1 and {MAX_STEPS}, got {steps}"),
            ));
        }
        let guidance = self
            .guidance_scale
            .or(model.defaults.guidance)
            .unwrap_or(7.5);
        if !(0.0..=MAX_GUIDANCE).contains(&guidance) {
            return Err(ApiError::invalid(
                "guidance_scale",
                format!("guidance_scale must be between 0 and {MAX_GUIDANCE}, got {guidance}"),
            ));
        }
        let sampler = match &self.sampler {
            Some(s) => s
                .parse::<SamplerKind>()
                .map_err(|e| ApiError::invalid("sampler", e.to_string()))?,
            None => model.defaults.sampler.unwrap_or(SamplerKind::Lcm),
        };
        if sampler == SamplerKind::FlowMap && !model.pipe.folder.denoiser.end_time_embedding {
            return Err(ApiError::invalid(
                "sampler",
                "sampler flowmap: this model is not a flow map".to_string(),
            ));
        }
        // The sampler's own limits (e.g. LCM needs steps ≤ the distillation's solver steps).
        crate::sample::sampler::Sampler::new(
            sampler,
            &model.pipe.folder.scheduler,
            steps,
            Default::default(),
        )
        .map_err(|e| ApiError::invalid("steps", format!("{e:#}").replace("--", "")))?;
        let seed = self.seed.unwrap_or_else(random_seed);
        let items = (0..n as u64)
            .map(|i| MotionItem {
                prompt: self.prompt.clone(),
                negative_prompt: self.negative_prompt.clone(),
                guidance,
                seed: seed.wrapping_add(i),
            })
            .collect();
        Ok(MotionJob {
            key: MotionKey {
                shape: MotionShape {
                    frames,
                    sampler,
                    steps,
                    gamma: None,
                },
                cfg: !model.is_student() && guidance > 1.0,
            },
            items,
        })
    }
}

fn check_prompt(model: &MotionModel, param: &str, prompt: &str) -> Result<(), ApiError> {
    check_prompt_bytes(param, prompt)?;
    let enc = &model.pipe.encoder;
    let cut = enc
        .truncates(prompt)
        .map_err(|e| ApiError::invalid(param, format!("{e:#}")))?;
    if cut {
        return Err(ApiError::invalid(
            param,
            format!(
                "{param} is longer than the {} tokens the sentence encoder takes",
                enc.max_len
            ),
        ));
    }
    Ok(())
}

/// One motion in the asked format, as the response carries it.
pub fn encode(m: &GeneratedMotion, format: MotionFormat) -> anyhow::Result<MotionData> {
    let (motion, b64) = match format {
        // Straight to a JSON value: no text in between.
        MotionFormat::Json => (
            Some(serde_json::to_value(JointsFile::new(&m.joints, FPS))?),
            None,
        ),
        MotionFormat::Bvh => (
            Some(String::from_utf8(format.encode(&m.joints, FPS)?)?.into()),
            None,
        ),
        MotionFormat::Npy | MotionFormat::Gif => {
            (None, Some(super::b64(&format.encode(&m.joints, FPS)?)))
        }
    };
    Ok(MotionData {
        seed: m.seed,
        format: format.name().to_string(),
        motion,
        b64,
    })
}
