//! The text-to-image model behind the batcher: validated jobs in, PNGs out; and the short-lived
//! in-memory store behind `response_format: "url"`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::pipeline::source::Defaults;
use crate::pipeline::{GenerateRequest, Pipeline};
use crate::sample::noise::{NoiseSource, SeededNoise};
use crate::sample::sampler::SamplerKind;

use super::batcher::{run_in_chunks, BatchModel};

/// What every job in one U-Net batch must share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageShape {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub sampler: SamplerKind,
    /// CFG doubles the batch with negative prompts; guidance itself may differ per image.
    pub cfg: bool,
    /// Image-to-image strength as `f64::to_bits` (`None`: text-to-image); it sets the timesteps.
    pub strength: Option<u64>,
}

/// One image to make (a request with n images is n items with seeds seed, seed+1, …).
#[derive(Debug, Clone)]
pub struct ImageItem {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub guidance: f64,
    pub seed: u64,
    /// Image-to-image: the init image `[1, 3, height, width]` in [−1, 1].
    pub init_image: Option<Arc<candle_core::Tensor>>,
}

#[derive(Debug, Clone)]
pub struct ImageJob {
    pub shape: ImageShape,
    pub items: Vec<ImageItem>,
}

pub struct GeneratedImage {
    pub png: Vec<u8>,
    pub seed: u64,
}

/// A loaded pipeline, shared by every request.
pub struct ImageModel {
    pub pipe: Arc<Pipeline>,
    /// The name clients see (`/v1/models`, OpenAI's `model`).
    pub id: String,
    /// Prompts the model can follow, for clients to offer.
    pub examples: Vec<String>,
    /// Most images per U-Net call: a job bigger than this runs in several calls.
    pub max_batch: usize,
}

impl ImageModel {
    /// Run items sharing `shape` as one U-Net batch; an item stops being made (`None`) once
    /// `wanted(item)` says no before a U-Net call.
    pub fn generate(
        &self,
        shape: &ImageShape,
        items: &[&ImageItem],
        wanted: &dyn Fn(usize) -> bool,
    ) -> anyhow::Result<Vec<Option<GeneratedImage>>> {
        let reqs: Vec<GenerateRequest> = items
            .iter()
            .map(|it| GenerateRequest {
                prompt: it.prompt.clone(),
                negative_prompt: it.negative_prompt.clone(),
                sampler: Some(shape.sampler),
                steps: Some(shape.steps),
                guidance: Some(it.guidance),
                width: Some(shape.width),
                height: Some(shape.height),
                n: 1,
                seed: it.seed,
                init_image: it.init_image.as_deref().cloned(),
                strength: shape.strength.map(f64::from_bits),
                ..Default::default()
            })
            .collect();
        let mut sources: Vec<SeededNoise> =
            items.iter().map(|it| SeededNoise::new(it.seed)).collect();
        let mut noises: Vec<&mut dyn NoiseSource> = sources
            .iter_mut()
            .map(|s| s as &mut dyn NoiseSource)
            .collect();
        let gens = self.pipe.generate_batch_until(
            &reqs,
            &Defaults::default(),
            &mut noises,
            &mut |_| {},
            wanted,
        )?;
        let mut out = Vec::with_capacity(items.len());
        for (g, it) in gens.iter().zip(items) {
            // One image per item (n = 1 above).
            out.push(match g.as_ref().and_then(|g| g.images.first()) {
                Some(img) => Some(GeneratedImage {
                    png: crate::pipeline::image_io::encode_png(img)?,
                    seed: it.seed,
                }),
                None => None,
            });
        }
        Ok(out)
    }
}

impl BatchModel for ImageModel {
    type Job = ImageJob;
    type Output = Vec<GeneratedImage>;
    type Key = ImageShape;

    fn kind(&self) -> &'static str {
        "image"
    }

    fn key(&self, job: &ImageJob) -> ImageShape {
        job.shape
    }

    fn units(&self, job: &ImageJob) -> usize {
        job.items.len()
    }

    fn cost(&self, job: &ImageJob) -> f64 {
        let s = &job.shape;
        let native =
            (self.pipe.unet.config.sample_size.unwrap_or(64) * self.pipe.vae_scale_factor()) as f64;
        // Image-to-image runs the last `strength` of the schedule.
        let strength = s.strength.map(f64::from_bits).unwrap_or(1.0);
        let evals = (s.steps as f64 * strength).ceil().max(1.0) * if s.cfg { 2.0 } else { 1.0 };
        job.items.len() as f64 * (s.width * s.height) as f64 / (native * native) * evals
    }

    fn cost_terms(&self) -> &'static str {
        "n × (width × height ÷ the model's native size²) × steps, twice with CFG"
    }

    fn run(
        &self,
        jobs: Vec<ImageJob>,
        wanted: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<anyhow::Result<Vec<GeneratedImage>>> {
        // All jobs share one shape (the batcher groups by key): their items run together, in
        // U-Net batches of at most `max_batch` images.
        let Some(shape) = jobs.first().map(|j| j.shape) else {
            return Vec::new();
        };
        let items: Vec<Vec<ImageItem>> = jobs.into_iter().map(|j| j.items).collect();
        run_in_chunks(&items, self.max_batch, wanted, |chunk, wanted| {
            self.generate(&shape, chunk, wanted)
        })
    }
}

/// PNGs served by URL for a limited time, bounded in count (oldest go first).
pub struct UrlStore {
    ttl: Duration,
    cap: usize,
    /// id → (expiry, PNG), and ids oldest first.
    inner: Mutex<(HashMap<String, Stored>, VecDeque<String>)>,
}

type Stored = (Instant, Arc<Vec<u8>>);

impl UrlStore {
    pub fn new(ttl: Duration, cap: usize) -> Self {
        Self {
            ttl,
            cap,
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// Keep `png` and return its id (random, unguessable).
    pub fn put(&self, png: Vec<u8>) -> String {
        let id = format!("{:032x}", rand::random::<u128>());
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *g;
        let now = Instant::now();
        while let Some(old) = order.front() {
            let expired = map.get(old).is_none_or(|(t, _)| *t <= now);
            if expired || map.len() >= self.cap {
                let old = order.pop_front().expect("front exists");
                map.remove(&old);
            } else {
                break;
            }
        }
        map.insert(id.clone(), (now + self.ttl, Arc::new(png)));
        order.push_back(id.clone());
        id
    }

    pub fn get(&self, id: &str) -> Option<Arc<Vec<u8>>> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match g.0.get(id) {
            Some((t, png)) if *t > Instant::now() => Some(png.clone()),
            _ => None,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}
