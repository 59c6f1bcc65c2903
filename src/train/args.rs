//! The flags every training command shares (`lcm pretrain …`, `lcm distill`), parsed once.
//! Where the stages want other defaults (a from-scratch stage trains at a higher rate than a
//! distillation), the flag is optional here and each command supplies its [`StageDefaults`].

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::optim::AdamWConfig;
use super::run::Plan;
use super::state::TrainOptions;

#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Image–caption folders (metadata.jsonl, images with .txt captions, or .tar shards); several
    /// may be given.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Run folder: checkpoints/, metrics.jsonl, samples/, cache/ and what the run exports.
    #[arg(long)]
    pub output: PathBuf,
    /// Training resolution in pixels (pretrain default 64; distill: the teacher's native size).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Optimizer steps (pretrain default 2000, distill 1000).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Examples per micro-batch (pretrain default 16, distill 8).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step (their gradients are summed).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// AdamW learning rate (pretrain default 1e-3, distill 1e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Linear warm-up steps (pretrain default 100, distill 500).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// From this step on, the learning rate falls linearly to a tenth of --lr at --max-steps
    /// (default: constant after the warm-up, as the reference scripts).
    #[arg(long)]
    pub decay_from: Option<u64>,
    /// End the run at this step of the --max-steps schedule (the learning rate falls as if it ran
    /// on): how a stage that was stopped early, e.g. for time, is reproduced.
    #[arg(long)]
    pub stop_at: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 500)]
    pub save_every: u64,
    /// Keep only the newest N checkpoints (0: keep all, as diffusers' checkpoints_total_limit
    /// unset).
    #[arg(long, default_value_t = 0)]
    pub keep_checkpoints: usize,
    /// Every N steps write samples/step-N.png (0: never).
    #[arg(long, default_value_t = 500)]
    pub sample_every: u64,
    /// Continue from DIR: a checkpoint folder, or a run folder (its latest checkpoint).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: crate::runtime::RuntimeArgs,
}

/// What every stage's checkpoint records beside its own settings (flattened into them).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageSettings {
    pub resolution: usize,
    pub batch_size: usize,
    pub seed: u64,
}

/// A stage's defaults for the optional shared flags.
#[derive(Debug, Clone, Copy)]
pub struct StageDefaults {
    pub max_steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: u64,
}

/// `lcm pretrain …`: training from scratch.
pub const PRETRAIN: StageDefaults = StageDefaults {
    max_steps: 2000,
    batch_size: 16,
    lr: 1e-3,
    warmup_steps: 100,
};

/// `lcm distill`: the LCM distillation script's defaults (batch size aside).
pub const DISTILL: StageDefaults = StageDefaults {
    max_steps: 1000,
    batch_size: 8,
    lr: 1e-4,
    warmup_steps: 500,
};

impl TrainArgs {
    pub fn max_steps(&self, d: &StageDefaults) -> u64 {
        self.max_steps.unwrap_or(d.max_steps)
    }

    /// The batch size, at least 1.
    pub fn batch_size(&self, d: &StageDefaults) -> Result<usize> {
        match self.batch_size.unwrap_or(d.batch_size) {
            0 => bail!("--batch-size must be at least 1"),
            b => Ok(b),
        }
    }

    /// The step the run ends at: --stop-at, else --max-steps.
    pub fn last_step(&self, d: &StageDefaults) -> Result<u64> {
        let max = self.max_steps(d);
        match self.stop_at {
            Some(n) if n > max || n == 0 => {
                bail!("--stop-at {n} must be in 1..=--max-steps ({max})")
            }
            Some(n) => Ok(n),
            None => Ok(max),
        }
    }

    /// The optimisation settings these flags give.
    pub fn options(&self, d: &StageDefaults) -> Result<TrainOptions> {
        let max = self.max_steps(d);
        let options = TrainOptions {
            adamw: AdamWConfig {
                lr: self.lr.unwrap_or(d.lr),
                weight_decay: self.weight_decay,
                ..Default::default()
            },
            warmup_steps: self.warmup_steps.unwrap_or(d.warmup_steps),
            decay: self.decay_from.map(|from| (from, max)),
            max_grad_norm: self.max_grad_norm,
            grad_accum: self.grad_accum,
            seed: self.seed,
        };
        options.check()?;
        Ok(options)
    }

    /// The stage settings these flags give at `resolution`.
    pub fn stage(&self, resolution: usize, d: &StageDefaults) -> Result<StageSettings> {
        Ok(StageSettings {
            resolution,
            batch_size: self.batch_size(d)?,
            seed: self.seed,
        })
    }

    /// The one HumanML3D-layout folder a motion stage reads (`--data`); more are refused.
    pub fn motion_data(&self) -> Result<PathBuf> {
        match self.data.as_slice() {
            [one] => Ok(one.clone()),
            _ => bail!(
                "--data: give one HumanML3D-layout folder, got {}",
                self.data.len()
            ),
        }
    }

    /// The loop's plan: run folder, last step, cadences.
    pub fn plan(&self, d: &StageDefaults) -> Result<Plan> {
        Ok(Plan {
            run_dir: self.output.clone(),
            last_step: self.last_step(d)?,
            save_every: self.save_every,
            keep_checkpoints: self.keep_checkpoints,
            sample_every: self.sample_every,
        })
    }
}
