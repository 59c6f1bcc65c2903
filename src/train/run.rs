//! The one training loop. A trainer is a [`Task`] (how a micro-batch becomes a loss, what a
//! sample shows, what the export writes) run over a [`TrainState`]; [`Run`] owns both and does
//! everything else once: resume with the settings check, the step loop with its metrics log and
//! progress bar, checkpoints and samples at their cadence, the final checkpoint and the export.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

use super::state::{Metrics, StepMetrics, TrainState};

/// What one trainer adds to the shared loop.
pub trait Task {
    /// Everything that determines the run beside the weights (saved in every checkpoint; a
    /// resume with other settings is refused).
    fn settings(&self) -> serde_json::Value;

    /// One micro-batch's loss, every random draw from `rng`; named figures to log beside it.
    fn loss(&self, rng: &mut ChaCha8Rng) -> Result<(Tensor, Metrics)>;

    /// Figures read after the optimizer step (e.g. a learned temperature).
    fn after_step(&self, _metrics: &mut Metrics) -> Result<()> {
        Ok(())
    }

    /// Write a sample of the current state to `path` (a PNG), at `--sample-every`.
    fn sample(&mut self, _state: &TrainState, _path: &Path) -> Result<()> {
        Ok(())
    }

    /// Called after each checkpoint (e.g. to export a component every save).
    fn on_checkpoint(&mut self, _state: &TrainState, _run_dir: &Path) -> Result<()> {
        Ok(())
    }

    /// The run's product, written into `run_dir` after the last step.
    fn export(&mut self, state: &TrainState, run_dir: &Path) -> Result<()>;
}

/// Where and how long a run goes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub run_dir: PathBuf,
    /// The run stops after this step (`--stop-at`, else `--max-steps`).
    pub last_step: u64,
    /// Checkpoint every N steps (0: only at the end).
    pub save_every: u64,
    /// Keep the newest N checkpoints (0: all).
    pub keep_checkpoints: usize,
    /// Samples every N steps (0: never).
    pub sample_every: u64,
}

/// A training run: the shared state and the task that gives it a loss.
pub struct Run<T: Task> {
    pub state: TrainState,
    pub task: T,
}

impl<T: Task> Run<T> {
    pub fn new(state: TrainState, task: T) -> Self {
        Self { state, task }
    }

    /// One optimizer step (over the configured micro-batches).
    pub fn step(&mut self) -> Result<StepMetrics> {
        let task = &self.task;
        let mut m = self.state.step(&mut |rng| task.loss(rng))?;
        task.after_step(&mut m.extra)?;
        Ok(m)
    }

    /// A checkpoint of the current step under `run_dir/checkpoints`.
    pub fn save(&self, run_dir: &Path) -> Result<PathBuf> {
        self.state.save(run_dir, &self.task.settings())
    }

    /// [`save`](Self::save), then only the newest `plan.keep_checkpoints` kept.
    fn save_and_prune(&self, plan: &Plan) -> Result<PathBuf> {
        let dir = self.save(&plan.run_dir)?;
        if plan.keep_checkpoints > 0 {
            crate::train::checkpoint::prune(
                &plan.run_dir.join("checkpoints"),
                plan.keep_checkpoints,
            )?;
        }
        Ok(dir)
    }

    /// Continue from a checkpoint or run folder made with the same settings.
    pub fn resume(&mut self, from: &Path, device: &Device) -> Result<()> {
        let settings = self.task.settings();
        self.state.resume(from, device, &settings)
    }

    /// Continue from `resume` when given (`--resume`), then [`train`](Self::train).
    pub fn resume_and_train(
        &mut self,
        resume: Option<&Path>,
        device: &Device,
        plan: &Plan,
    ) -> Result<()> {
        if let Some(r) = resume {
            self.resume(r, device)?;
        }
        self.train(plan)
    }

    /// Steps until `plan.last_step`, then the final checkpoint and the export.
    pub fn train(&mut self, plan: &Plan) -> Result<()> {
        let mut log = RunLog::new(&plan.run_dir, self.state.step, plan.last_step)?;
        while self.state.step < plan.last_step {
            let m = self.step()?;
            log.record(&m)?;
            let step = m.step;
            if plan.save_every > 0 && step.is_multiple_of(plan.save_every) {
                self.save_and_prune(plan)?;
                self.task.on_checkpoint(&self.state, &plan.run_dir)?;
            }
            if plan.sample_every > 0 && step.is_multiple_of(plan.sample_every) {
                let path = plan.run_dir.join(format!("samples/step-{step:08}.png"));
                self.task.sample(&self.state, &path)?;
            }
        }
        log.finish();
        self.save_and_prune(plan)?;
        self.task.export(&self.state, &plan.run_dir)
    }
}

/// Progress bar and `metrics.jsonl` of a run.
pub struct RunLog {
    bar: indicatif::ProgressBar,
    log: std::fs::File,
    start: std::time::Instant,
}

impl RunLog {
    pub fn new(run_dir: &Path, step: u64, last_step: u64) -> Result<Self> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let path = run_dir.join("metrics.jsonl");
        // A run resumed at `step` redoes the steps after it: their old lines go, so the log
        // holds each step once.
        if let Ok(text) = std::fs::read_to_string(&path) {
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            if kept.len() != text.len() {
                crate::files::write_atomic(&path, kept.as_bytes())?;
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let bar = indicatif::ProgressBar::new(last_step);
        bar.set_position(step);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "step {pos}/{len} [{elapsed_precise}] {per_sec} ETA {eta} {msg}",
            )
            .expect("valid template"),
        );
        Ok(Self {
            bar,
            log,
            start: std::time::Instant::now(),
        })
    }

    /// One line `{"step", "loss", "lr", "grad_norm", …task figures, "time_s"}`; a non-finite
    /// loss ends the run (after it is logged).
    pub fn record(&mut self, m: &StepMetrics) -> Result<()> {
        let mut line = serde_json::to_value(m)?;
        line["time_s"] = self.start.elapsed().as_secs_f64().into();
        writeln!(self.log, "{line}")?;
        if !m.loss.is_finite() {
            bail!("loss became {} at step {}", m.loss, m.step)
        }
        self.bar.set_message(format!("loss {:.5}", m.loss));
        self.bar.set_position(m.step);
        Ok(())
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
