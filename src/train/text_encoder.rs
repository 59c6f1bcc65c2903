//! `lcm pretrain text`: the text encoder trained as CLIP's text tower, contrastively against a
//! small image tower over the VAE's latents, before the teacher; `lcm pretrain unet
//! --text-encoder` then keeps it frozen, as Stable Diffusion keeps CLIP's.
//!
//! Why a stage of its own: trained jointly through the ε loss alone, the tiny text encoder learns
//! what moves many pixels (the background, then the colour) and barely the shape word, whose
//! pixels are few. A contrastive loss has no such bias: a batch is only told apart when every
//! attribute in the caption is read, so the pooled text feature must carry the shape too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::args::{StageSettings, TrainArgs, PRETRAIN};
use super::run::{Run, Task};
use super::start::{encode_stage_data, frozen_vae};
use super::state::{Metrics, TrainState};
use crate::data::encode::EncodedDataset;
use crate::data::random_rows;
use crate::files::save_safetensors;
use crate::model::config::ClipTextConfig;
use crate::model::contrastive::ContrastiveModel;
use crate::model::vae::AutoencoderKL;
use crate::sample::noise::{NoiseSource, SeededNoise};
use rand_chacha::ChaCha8Rng;

/// `lcm pretrain text`.
#[derive(clap::Args, Debug, Clone)]
pub struct TextArgs {
    /// Model folder giving the text encoder's sizes and vocabulary: text_encoder/config.json and
    /// tokenizer/.
    #[arg(long)]
    pub config: PathBuf,
    /// The trained VAE whose latents the image tower reads (the teacher's VAE).
    #[arg(long)]
    pub vae: PathBuf,
    /// Width of the shared text–image embedding.
    #[arg(long, default_value_t = 64)]
    pub embed_dim: usize,
    /// Fraction of each batch drawn as hard negatives: for other rows of the batch, examples
    /// whose caption differs in exactly one token ("a red circle …" beside "a red square …"). A
    /// random batch seldom holds such pairs, so the words that change few pixels (the shape)
    /// are otherwise learned last.
    #[arg(long, default_value_t = 0.0)]
    pub hard_negatives: f64,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct TextSettings {
    embed_dim: usize,
    hard_negatives: f64,
    #[serde(flatten)]
    stage: StageSettings,
}

/// Index of each row's first `eos` (the last index when a row has none).
pub fn pooled_positions(ids: &Tensor, eos: u32) -> Result<Vec<u32>> {
    Ok(ids
        .to_dtype(DType::U32)?
        .to_vec2::<u32>()?
        .iter()
        .map(|r| r.iter().position(|&t| t == eos).unwrap_or(r.len() - 1) as u32)
        .collect())
}

/// For each caption (token ids), the examples whose caption differs from it in exactly one token
/// (at most 64 each).
pub fn one_token_neighbours(ids: &[Vec<u32>], eos: u32) -> Vec<Vec<u32>> {
    use std::hash::{Hash, Hasher};
    let mut buckets: HashMap<(usize, u64), Vec<u32>> = HashMap::new();
    for (i, row) in ids.iter().enumerate() {
        // Up to and including the end of text, so a caption one word longer also counts.
        let end = row.iter().position(|&t| t == eos).unwrap_or(row.len() - 1);
        for p in 1..=end {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            row[..p].hash(&mut h);
            row[p + 1..].hash(&mut h);
            buckets.entry((p, h.finish())).or_default().push(i as u32);
        }
    }
    let mut out = vec![Vec::new(); ids.len()];
    for members in buckets.values().filter(|m| m.len() > 1) {
        for &i in members {
            for &j in members {
                let (a, b) = (&ids[i as usize], &ids[j as usize]);
                let differ = a.iter().zip(b).filter(|(x, y)| x != y).count();
                if differ == 1 && out[i as usize].len() < 64 {
                    out[i as usize].push(j);
                }
            }
        }
    }
    out
}

/// `b` rows: `b − hard` drawn uniformly, then `hard` one-token neighbours of the first rows
/// that have one (a uniform row where none has).
fn batch_with_neighbours(
    rng: &mut rand_chacha::ChaCha8Rng,
    neighbours: &[Vec<u32>],
    b: usize,
    hard: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let n = neighbours.len() as u32;
    let mut idx: Vec<u32> = (0..b - hard).map(|_| rng.random_range(0..n)).collect();
    let mut anchors = idx.clone().into_iter();
    while idx.len() < b {
        let pick = anchors
            .by_ref()
            .map(|a| &neighbours[a as usize])
            .find(|nb| !nb.is_empty())
            .map(|nb| nb[rng.random_range(0..nb.len())]);
        idx.push(pick.unwrap_or_else(|| rng.random_range(0..n)));
    }
    Ok(Tensor::new(idx.as_slice(), device)?)
}

struct TextTask<'a> {
    args: &'a TextArgs,
    settings: TextSettings,
    model: ContrastiveModel,
    vae: AutoencoderKL,
    data: EncodedDataset,
    neighbours: Vec<Vec<u32>>,
    hard: usize,
    eos: u32,
}

impl Task for TextTask<'_> {
    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise")
    }

    fn loss(&self, rng: &mut ChaCha8Rng) -> Result<(Tensor, Metrics)> {
        let b = self.settings.stage.batch_size;
        let device = self.data.mean.device();
        let rows_t = if self.hard > 0 {
            batch_with_neighbours(rng, &self.neighbours, b, self.hard, device)?
        } else {
            random_rows(rng, self.data.rows()?, b, device)?
        };
        let eps = SeededNoise::new(rng.random()).sample(&self.data.batch_shape(b), device)?;
        let z = self.vae.scale(&self.data.posterior(&rows_t, Some(&eps))?)?;
        let ids = self.data.ids.index_select(&rows_t, 0)?;
        let pooled = pooled_positions(&ids, self.eos)?;
        let m = &self.model;
        let (loss, acc) = m.loss(&m.text_embeds(&ids, &pooled)?, &m.image_embeds(&z)?)?;
        let mut metrics = Metrics::new();
        metrics.insert("accuracy".into(), acc.into());
        Ok((loss, metrics))
    }

    /// The learned temperature, read after the update.
    fn after_step(&self, metrics: &mut Metrics) -> Result<()> {
        let scale = self.model.logit_scale()?;
        metrics.insert("logit_scale".into(), scale.into());
        Ok(())
    }

    fn on_checkpoint(&mut self, state: &TrainState, run_dir: &Path) -> Result<()> {
        export_text_encoder(&self.args.config, &state.weights(), run_dir)
    }

    fn export(&mut self, state: &TrainState, run_dir: &Path) -> Result<()> {
        export_text_encoder(&self.args.config, &state.weights(), run_dir)?;
        println!(
            "trained the text encoder for {} steps; wrote {}",
            state.step,
            run_dir.join("text_encoder").display()
        );
        Ok(())
    }
}

/// `lcm pretrain text`.
pub fn run(args: &TextArgs) -> Result<()> {
    let c = &args.train;
    let (device, _) = c.runtime.resolve()?;
    let te_cfg = ClipTextConfig::load(&args.config.join("text_encoder/config.json"))?;
    let tokenizer = crate::model::tokenizer::ClipTokenizer::from_dir(
        &args.config.join("tokenizer"),
        te_cfg.max_position_embeddings,
    )?;
    let resolution = c.resolution.unwrap_or(64);
    let (vae, vae_folder) = frozen_vae(&args.vae, resolution, &device)?;
    let vae_cfg = &vae_folder.config;
    let stage = c.stage(resolution, &PRETRAIN)?;
    let batch_size = stage.batch_size;
    if batch_size < 2 {
        bail!("--batch-size must be ≥ 2: the other captions of a batch are the negatives")
    }
    if args.embed_dim == 0 {
        bail!("--embed-dim must be ≥ 1")
    }
    if !(0.0..=0.5).contains(&args.hard_negatives) {
        bail!(
            "--hard-negatives {} must be in [0, 0.5]",
            args.hard_negatives
        )
    }
    let plan = c.plan(&PRETRAIN)?;
    let options = c.options(&PRETRAIN)?;
    let data = encode_stage_data(
        c,
        resolution,
        (&vae_folder, &vae),
        &args.config,
        &tokenizer,
        &device,
    )?;
    let n = data.rows()?;
    let latent = (vae_cfg.latent_channels, resolution / vae_cfg.scale_factor());
    let neighbours = if args.hard_negatives > 0.0 {
        let id_rows = data.ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let nb = one_token_neighbours(&id_rows, tokenizer.eos());
        let with = nb.iter().filter(|v| !v.is_empty()).count();
        eprintln!("{with} of {n} captions have a one-token neighbour (hard negatives)");
        nb
    } else {
        Vec::new()
    };
    let hard = (args.hard_negatives * batch_size as f64).round() as usize;
    let (state, model) = TrainState::fresh(c.seed, options, &device, |vb| {
        Ok(ContrastiveModel::new(&te_cfg, latent, args.embed_dim, vb)?)
    })?;
    let task = TextTask {
        args,
        settings: TextSettings {
            embed_dim: args.embed_dim,
            hard_negatives: args.hard_negatives,
            stage,
        },
        model,
        vae,
        data,
        neighbours,
        hard,
        eos: tokenizer.eos(),
    };
    Run::new(state, task).resume_and_train(c.resume.as_deref(), &device, &plan)
}

/// `out/text_encoder/`: the text tower as a transformers `CLIPTextModel` (config.json copied
/// from the model folder, weights under `text_model.`), ready for `--text-encoder`.
fn export_text_encoder(config: &Path, weights: &HashMap<String, Tensor>, out: &Path) -> Result<()> {
    let dir = out.join("text_encoder");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cfg = std::fs::read(config.join("text_encoder/config.json"))?;
    crate::files::write_atomic(&dir.join("config.json"), &cfg)?;
    let text: HashMap<String, Tensor> = weights
        .iter()
        .filter(|(k, _)| k.starts_with("text_model."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    save_safetensors(&text, &dir.join("model.safetensors"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every weight of both towers, the temperature included, gets a gradient (candle cuts the
    /// graph silently at ops without a backward), and the pooled position is the first eos.
    #[test]
    fn every_contrastive_weight_gets_a_gradient() -> Result<()> {
        let (te_cfg, tok) = crate::train::tiny_text_config()?;
        let dev = Device::Cpu;
        let build = |vb: candle_nn::VarBuilder| ContrastiveModel::new(&te_cfg, (4, 8), 16, vb);
        let (vars, model) = crate::nn::init::live_vars(0, &dev, build)?;
        let prompts = [
            "a red circle",
            "a blue square on a yellow background",
            "a cat",
        ];
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|p| tok.encode(p).unwrap().ids)
            .collect();
        let ids = Tensor::from_vec(ids, (3, te_cfg.max_position_embeddings), &dev)?;
        let pooled = pooled_positions(&ids, tok.eos())?;
        let lens: Vec<u32> = prompts
            .iter()
            .map(|p| tok.raw_ids(p).unwrap().len() as u32 + 1)
            .collect();
        assert_eq!(pooled, lens);
        let z = Tensor::randn(0f32, 1.0, (3, 4, 8, 8), &dev)?;
        let (loss, acc) =
            model.loss(&model.text_embeds(&ids, &pooled)?, &model.image_embeds(&z)?)?;
        assert!((0.0..=1.0).contains(&acc));
        let grads = loss.backward()?;
        // Token embeddings of ids absent from the batch and positions past the longest caption
        // legitimately get none.
        let missing =
            crate::nn::init::without_gradient(&vars, &grads, |name| name.contains("embedding"))?;
        assert!(missing.is_empty(), "no gradient for {missing:?}");
        Ok(())
    }

    /// Neighbours differ in exactly one token: not zero (a duplicate caption), not two.
    #[test]
    fn one_token_neighbours_differ_in_one_caption_token() {
        let eos = 9;
        let ids = vec![
            vec![0, 1, 2, 3, eos, eos],
            vec![0, 1, 5, 3, eos, eos],   // one token from row 0
            vec![0, 6, 5, 3, eos, eos],   // one from row 1, two from row 0
            vec![0, 1, 2, 3, eos, eos],   // row 0 again: not a neighbour of it
            vec![0, 1, 2, eos, eos, eos], // shorter: differs from row 0 at the eos
        ];
        let nb = one_token_neighbours(&ids, eos);
        let sorted = |i: usize| {
            let mut v = nb[i].clone();
            v.sort();
            v
        };
        assert_eq!(sorted(0), vec![1, 4]);
        assert_eq!(sorted(1), vec![0, 2, 3]);
        assert_eq!(sorted(2), vec![1]);
        assert_eq!(sorted(3), vec![1, 4]);
        assert_eq!(sorted(4), vec![0, 3]);
    }
}
