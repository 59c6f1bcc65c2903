//! The one training state every trainer uses: trainable and frozen variables by name, AdamW with
//! its warm-up/decay schedule and gradient clipping, gradient accumulation, an optional EMA of the
//! weights, the step counter and seed, and atomic checkpoints that a resumed run continues from
//! bit for bit.
//!
//! Every random draw of step s comes from a generator seeded with (seed, s, micro-batch)
//! ([`TrainState::rng`]), so resuming needs no generator state and reproduces the uninterrupted run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{self, Checkpoint};
use super::optim::{clip_grad_norm, ema_update, scheduled_lr, AdamW, AdamWConfig};

/// The optimisation settings of a run (all of them part of its checkpointed settings).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainOptions {
    pub adamw: AdamWConfig,
    pub warmup_steps: u64,
    /// Linear decay (from step, to step) to a tenth of the rate; `None`: constant after warm-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay: Option<(u64, u64)>,
    pub max_grad_norm: f64,
    /// Micro-batches whose gradients are summed into one optimizer step.
    pub grad_accum: usize,
    pub seed: u64,
}

/// How an exponential moving average of the weights follows them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EmaDecay {
    /// One decay at every step: the LCD target network (the reference script's `ema_decay`).
    Fixed(f64),
    /// diffusers' `EMAModel`: the warm-up (1 + n)/(10 + n) with n = step − 1, capped at the value,
    /// so early averages are not dominated by the starting weights.
    Warmup(f64),
}

impl EmaDecay {
    /// The decay applied after optimizer step `step` (1-based).
    pub fn at(&self, step: u64) -> f64 {
        match *self {
            Self::Fixed(d) => d,
            Self::Warmup(max) => {
                let n = step.saturating_sub(1) as f64;
                if n == 0.0 {
                    return 0.0;
                }
                ((1.0 + n) / (10.0 + n)).min(max)
            }
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepMetrics {
    pub step: u64,
    /// The loss averaged over the micro-batches.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// The task's own figures (averaged over micro-batches where numeric).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Tensors of `vars` detached from the graph, sharing their storage (so a model built from them
/// records no autograd graph yet sees every in-place update), by name.
pub fn detached<'a>(vars: impl Iterator<Item = (&'a String, &'a Var)>) -> HashMap<String, Tensor> {
    vars.map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect()
}

pub struct TrainState {
    vars: HashMap<String, Var>,
    /// Weights the model reads but the optimizer leaves alone (saved and exported with the rest).
    frozen: HashMap<String, Var>,
    opt: AdamW,
    pub step: u64,
    pub options: TrainOptions,
    ema: Option<(EmaDecay, HashMap<String, Var>)>,
    /// Checkpoint group names of the weights and of their EMA (a distillation run calls them
    /// student and target).
    groups: (&'static str, &'static str),
}

impl TrainState {
    /// Every weight trainable.
    pub fn new(weights: HashMap<String, Tensor>, options: TrainOptions) -> Result<Self> {
        Self::with_trainable(weights, options, |_| true)
    }

    /// A fresh run of the network `build` makes: weights drawn from `seed`, all trainable; returns
    /// the state and the network over its live variables.
    pub fn fresh<M>(
        seed: u64,
        options: TrainOptions,
        device: &Device,
        build: impl Fn(VarBuilder) -> Result<M>,
    ) -> Result<(Self, M)> {
        let init = crate::nn::init::init_weights(seed, device, |vb| {
            build(vb).map_err(candle_core::Error::wrap)
        })?;
        let state = Self::new(init, options)?;
        let model = build(state.var_builder(device))?;
        Ok((state, model))
    }

    /// Only the weights `trainable` accepts by name are optimised; the others stay frozen.
    pub fn with_trainable(
        weights: HashMap<String, Tensor>,
        options: TrainOptions,
        trainable: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        options.check()?;
        let mut vars = HashMap::new();
        let mut frozen = HashMap::new();
        for (k, t) in weights {
            let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            if trainable(&k) {
                vars.insert(k, v);
            } else {
                frozen.insert(k, v);
            }
        }
        if vars.is_empty() {
            bail!("no trainable weights")
        }
        let opt = AdamW::new(vars.clone(), options.adamw)?;
        Ok(Self {
            vars,
            frozen,
            opt,
            step: 0,
            options,
            ema: None,
            groups: ("model", "ema"),
        })
    }

    /// Keep an EMA of the trainable weights, starting as a copy of them (`Warmup(0.0)`: none).
    /// Call before [`resume`](Self::resume), which then restores it too.
    pub fn with_ema(mut self, decay: EmaDecay) -> Result<Self> {
        let (EmaDecay::Fixed(d) | EmaDecay::Warmup(d)) = decay;
        if !(0.0..1.0).contains(&d) {
            bail!("--ema {d} must be in [0, 1)")
        }
        if decay != EmaDecay::Warmup(0.0) {
            let copies = self
                .vars
                .iter()
                .map(|(k, v)| Ok((k.clone(), Var::from_tensor(&v.as_tensor().detach())?)))
                .collect::<Result<_>>()?;
            self.ema = Some((decay, copies));
        }
        Ok(self)
    }

    /// Name the checkpoint groups of the weights and their EMA (default `model`, `ema`).
    pub fn with_groups(mut self, weights: &'static str, ema: &'static str) -> Self {
        self.groups = (weights, ema);
        self
    }

    /// A VarBuilder over the live variables (gradients flow into the trainable ones).
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        let map = candle_nn::VarMap::new();
        map.data().lock().expect("varmap lock").extend(
            self.vars
                .iter()
                .chain(&self.frozen)
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        VarBuilder::from_varmap(&map, DType::F32, device)
    }

    /// The trainable variables by name.
    pub fn trainable(&self) -> &HashMap<String, Var> {
        &self.vars
    }

    /// Detached views of the current weights, trainable and frozen.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        detached(self.vars.iter().chain(&self.frozen))
    }

    /// Detached views of the EMA weights with the frozen ones, if an EMA is kept. A model built
    /// from them follows every update without recording gradients (the LCD target network).
    pub fn ema_weights(&self) -> Option<HashMap<String, Tensor>> {
        self.ema
            .as_ref()
            .map(|(_, e)| detached(e.iter().chain(&self.frozen)))
    }

    /// What samples and exports read: the EMA where one is kept, otherwise the weights.
    pub fn export_weights(&self) -> HashMap<String, Tensor> {
        self.ema_weights().unwrap_or_else(|| self.weights())
    }

    /// The generator of micro-batch `micro` of the coming step: a function of (seed, step,
    /// micro) only.
    pub fn rng(&self, micro: usize) -> ChaCha8Rng {
        let s =
            self.options.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (self.step << 8) ^ micro as u64;
        ChaCha8Rng::seed_from_u64(s)
    }

    /// One optimizer step: `loss_of(rng, micro)` for each micro-batch, gradients summed (each
    /// loss divided by the micro-batch count), clipped by global norm, AdamW at the scheduled
    /// rate, then the EMA.
    pub fn step(
        &mut self,
        loss_of: &mut dyn FnMut(&mut ChaCha8Rng) -> Result<(Tensor, Metrics)>,
    ) -> Result<StepMetrics> {
        let accum = self.options.grad_accum;
        // Sorted by name: the gradient norm is a floating-point sum, and a resumed run must add
        // in the same order as the uninterrupted one (HashMap order differs per instance).
        let mut named: Vec<(&String, &Var)> = self.vars.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let vars: Vec<&Var> = named.into_iter().map(|(_, v)| v).collect();
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut loss_sum = 0.0;
        let mut extra = Metrics::new();
        for micro in 0..accum {
            let (loss, metrics) = loss_of(&mut self.rng(micro))?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            add_metrics(&mut extra, metrics, accum);
            let g = if accum == 1 {
                loss.backward()?
            } else {
                (loss / accum as f64)?.backward()?
            };
            grads = Some(match grads {
                None => g,
                Some(mut acc) => {
                    for v in &vars {
                        if let Some(new) = g.get(v.as_tensor()) {
                            let sum = match acc.get(v.as_tensor()) {
                                Some(old) => (old + new)?,
                                None => new.clone(),
                            };
                            acc.insert(v.as_tensor(), sum);
                        }
                    }
                    acc
                }
            });
        }
        let mut grads = grads.context("no gradients")?;
        let grad_norm = clip_grad_norm(&vars, &mut grads, self.options.max_grad_norm)?;
        let o = &self.options;
        let lr = scheduled_lr(o.adamw.lr, o.warmup_steps, o.decay, self.step + 1);
        self.opt.step(&grads, lr)?;
        self.step += 1;
        if let Some((decay, ema)) = &self.ema {
            ema_update(ema, &self.vars, decay.at(self.step))?;
        }
        Ok(StepMetrics {
            step: self.step,
            loss: loss_sum / accum as f64,
            lr,
            grad_norm,
            extra,
        })
    }

    /// Write a checkpoint of this step under `run_dir/checkpoints` with the run's `settings`
    /// (kept as is when one already exists, e.g. after resuming at the last step to export).
    pub fn save(&self, run_dir: &Path, settings: &serde_json::Value) -> Result<PathBuf> {
        let dir = run_dir.join("checkpoints");
        let existing = dir.join(checkpoint::folder_name(self.step));
        if existing.join(checkpoint::STATE_FILE).is_file() {
            return Ok(existing);
        }
        let (model, opt) = (self.weights(), self.opt.state());
        let ema = self.ema.as_ref().map(|(_, e)| detached(e.iter()));
        let mut groups = vec![(self.groups.0, &model), ("optimizer", &opt)];
        if let Some(e) = &ema {
            groups.push((self.groups.1, e));
        }
        let state = serde_json::json!({ "run": settings });
        checkpoint::save(&dir, self.step, &groups, &state)
    }

    /// `from` itself when it is a checkpoint, else the latest complete one of the run folder.
    pub fn checkpoint_dir(from: &Path) -> Result<PathBuf> {
        if from.join(checkpoint::STATE_FILE).is_file() {
            return Ok(from.to_path_buf());
        }
        checkpoint::latest(&from.join("checkpoints"))?
            .with_context(|| format!("--resume {}: no complete checkpoint found", from.display()))
    }

    /// Continue from `from` (a checkpoint or a run folder), refusing one made with other
    /// `settings`: compared before any tensor is read, so a mismatch is reported as one, not as a
    /// group (such as the EMA) the checkpoint lacks.
    pub fn resume(
        &mut self,
        from: &Path,
        device: &Device,
        settings: &serde_json::Value,
    ) -> Result<()> {
        let dir = Self::checkpoint_dir(from)?;
        let ck = Checkpoint::open(&dir)?;
        if ck.state.get("run") != Some(settings) {
            bail!(
                "--resume {}: the checkpoint was made with different settings",
                from.display()
            )
        }
        let set = |vars: &HashMap<String, Var>, group: &str| -> Result<()> {
            let saved = ck.group(group, device)?;
            for (name, var) in vars {
                let t = saved
                    .get(name)
                    .with_context(|| format!("{group} in {} lacks {name}", dir.display()))?;
                var.set(t)?;
            }
            Ok(())
        };
        let all: HashMap<String, Var> = self
            .vars
            .iter()
            .chain(&self.frozen)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        set(&all, self.groups.0)?;
        if let Some((_, ema)) = &self.ema {
            set(ema, self.groups.1)?;
        }
        self.opt
            .load_state(&ck.group("optimizer", device)?, ck.step)?;
        self.step = ck.step;
        eprintln!("resumed from {} at step {}", dir.display(), self.step);
        Ok(())
    }
}

/// Named figures a task reports for a step.
pub type Metrics = serde_json::Map<String, serde_json::Value>;

/// Add `m`'s numbers into `acc` as averages over `n` micro-batches (others: the last value).
fn add_metrics(acc: &mut Metrics, m: Metrics, n: usize) {
    for (k, v) in m {
        match (v.as_f64(), acc.get(&k).and_then(|a| a.as_f64())) {
            (Some(x), prev) if n > 1 => {
                acc.insert(k, (prev.unwrap_or(0.0) + x / n as f64).into());
            }
            _ => {
                acc.insert(k, v);
            }
        }
    }
}

impl TrainOptions {
    /// The settings' own bounds, named by their flags.
    pub fn check(&self) -> Result<()> {
        if self.grad_accum == 0 {
            bail!("--grad-accum must be at least 1")
        }
        if let Some((from, to)) = self.decay {
            if from >= to {
                bail!("--decay-from {from} must be below --max-steps {to}")
            }
        }
        Ok(())
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            adamw: AdamWConfig::default(),
            warmup_steps: 0,
            decay: None,
            max_grad_norm: 1.0,
            grad_accum: 1,
            seed: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(lr: f64) -> TrainOptions {
        TrainOptions {
            adamw: AdamWConfig {
                lr,
                ..Default::default()
            },
            warmup_steps: 100,
            ..Default::default()
        }
    }

    /// `--ema`: the average follows diffusers' EMAModel (a copy at the first step, then the
    /// warm-up decay), exports read it, and a resumed run restores it exactly.
    #[test]
    fn ema_averages_exports_and_resumes() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("lcm-ema-{}", std::process::id()));
        let dev = Device::Cpu;
        let settings = serde_json::json!({"x": 1});
        let start = || -> Result<TrainState> {
            let w = HashMap::from([("w".to_string(), Tensor::new(&[1f32, -2.0], &dev)?)]);
            TrainState::new(w, options(0.1))?.with_ema(EmaDecay::Warmup(0.9))
        };
        let step = |s: &mut TrainState| -> Result<Vec<f32>> {
            let w = s.trainable()["w"].clone();
            s.step(&mut |_| Ok((w.as_tensor().sqr()?.sum_all()?, Metrics::new())))?;
            Ok(w.as_tensor().to_vec1()?)
        };
        let mut s = start()?;
        let mut want = step(&mut s)?; // decay 0: the first average is the weights
        for k in 2..=4u64 {
            let d = EmaDecay::Warmup(0.9).at(k) as f32;
            let w = step(&mut s)?;
            want = want
                .iter()
                .zip(&w)
                .map(|(e, w)| d * e + (1.0 - d) * w)
                .collect();
        }
        assert_eq!(EmaDecay::Warmup(0.9).at(2), 2.0 / 11.0);
        assert_eq!(EmaDecay::Warmup(0.9).at(1000), 0.9);
        assert_eq!(EmaDecay::Fixed(0.95).at(1), 0.95);
        let got: Vec<f32> = s.export_weights()["w"].to_vec1()?;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} against {want:?}");
        }
        assert_ne!(
            got,
            s.weights()["w"].to_vec1::<f32>()?,
            "exports read the EMA"
        );
        s.save(&dir, &settings)?;
        step(&mut s)?;
        let mut r = start()?;
        r.resume(&dir, &dev, &settings)?;
        step(&mut r)?;
        let (a, b) = (s.export_weights(), r.export_weights());
        assert_eq!(a["w"].to_vec1::<f32>()?, b["w"].to_vec1::<f32>()?);
        // Other settings are refused before anything is read.
        let mut o = start()?;
        let e = o
            .resume(&dir, &dev, &serde_json::json!({"x": 2}))
            .unwrap_err();
        assert!(e.to_string().contains("different settings"), "{e}");
        assert!(TrainState::new(
            HashMap::from([("w".into(), Tensor::new(&[1f32], &dev)?)]),
            options(0.1)
        )?
        .with_ema(EmaDecay::Warmup(1.0))
        .is_err());
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    /// Two micro-batches of half the data give the gradient of the whole batch: the same step
    /// as one micro-batch over all of it (up to float rounding), and the loss is their mean.
    #[test]
    fn accumulated_micro_batches_equal_one_big_batch() -> Result<()> {
        let dev = Device::Cpu;
        let data = Tensor::new(&[1f32, 2.0, -3.0, 0.5], &dev)?;
        let run = |accum: usize| -> Result<(Vec<f32>, f64)> {
            let w = HashMap::from([("w".to_string(), Tensor::new(&[0.3f32], &dev)?)]);
            let mut s = TrainState::new(
                w,
                TrainOptions {
                    grad_accum: accum,
                    ..options(0.05)
                },
            )?;
            let var = s.trainable()["w"].clone();
            let mut micro = 0;
            let m = s.step(&mut |_| {
                let part = data.narrow(0, micro * 4 / accum, 4 / accum)?;
                micro += 1;
                let loss = part.broadcast_sub(var.as_tensor())?.sqr()?.mean_all()?;
                Ok((loss, Metrics::new()))
            })?;
            Ok((var.as_tensor().to_vec1()?, m.loss))
        };
        let (one, l1) = run(1)?;
        let (two, l2) = run(2)?;
        assert!((one[0] - two[0]).abs() < 1e-6, "{one:?} {two:?}");
        assert!((l1 - l2).abs() < 1e-6, "{l1} {l2}");
        Ok(())
    }
}
