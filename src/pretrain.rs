//! Training components from scratch (`lcm pretrain vae|unet`), for the project's own small model:
//! the same run layout as `lcm distill` (checkpoints/, metrics.jsonl, samples/, progress bar,
//! `--resume` bit-exact on CPU) around a seeded initialisation and AdamW.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Checkpoint};
use crate::config::VaeConfig;
use crate::optim::{clip_grad_norm, scheduled_lr, AdamW, AdamWConfig};
use crate::sampler::{NoiseSource, SeededNoise};
use crate::vae::AutoencoderKL;

/// Flags every pretraining run shares.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Image–caption folders (imagefolder layout); several may be given.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Run folder: checkpoints/, metrics.jsonl, samples/ and the trained component(s).
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub resolution: usize,
    #[arg(long, default_value_t = 2000)]
    pub max_steps: u64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: u64,
    /// From this step on, the learning rate falls linearly to a tenth of --lr at --max-steps
    /// (default: constant after the warm-up). A run can be resumed with it to finish a stage.
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
    /// Every N steps write samples/step-N.png (0: never).
    #[arg(long, default_value_t = 500)]
    pub sample_every: u64,
    /// Continue from DIR: a checkpoint folder, or a run folder (its latest checkpoint).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: crate::runtime::RuntimeArgs,
}

impl CommonArgs {
    /// The step the run ends at: --stop-at, else --max-steps.
    pub fn last_step(&self) -> Result<u64> {
        match self.stop_at {
            Some(n) if n > self.max_steps || n == 0 => bail!(
                "--stop-at {n} must be in 1..=--max-steps ({})",
                self.max_steps
            ),
            Some(n) => Ok(n),
            None => Ok(self.max_steps),
        }
    }
}

/// `lcm pretrain vae`: an AutoencoderKL trained on the images alone.
#[derive(clap::Args, Debug, Clone)]
pub struct VaeArgs {
    /// The VAE's config.json (sizes come from it).
    #[arg(long)]
    pub config: PathBuf,
    /// Weight of the KL term (per latent element, against the per-pixel L1 loss).
    #[arg(long, default_value_t = 1e-5)]
    pub kl_weight: f64,
    /// Start from a trained VAE folder's weights (fresh optimizer) instead of a seeded init.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Train the decoder (and post_quant_conv) alone, with --init's encoder frozen: the latents,
    /// and so every U-Net trained on them, stay valid while the reconstructions sharpen. Keeps
    /// --init's scaling_factor.
    #[arg(long, requires = "init")]
    pub decoder_only: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Every image of the given folders as one `[n, 3, r, r]` tensor in [−1, 1], plus the captions.
pub fn load_images(dirs: &[PathBuf], resolution: usize) -> Result<(Tensor, Vec<String>)> {
    let mut images = Vec::new();
    let mut captions = Vec::new();
    let mut skipped = 0;
    for dir in dirs {
        let examples = crate::data::scan(dir)?;
        let (loaded, report) = crate::data::load_all(&examples, resolution, &Device::Cpu);
        skipped += report.skipped.len();
        for (t, c) in loaded {
            images.push(t);
            captions.push(c);
        }
    }
    if images.is_empty() {
        bail!("--data: no readable images")
    }
    if skipped > 0 {
        eprintln!("warning: {skipped} unreadable images skipped");
    }
    Ok((Tensor::stack(&images, 0)?, captions))
}

/// Tensors of `vars` detached from the graph (sharing storage), by name.
fn detached<'a>(vars: impl Iterator<Item = (&'a String, &'a Var)>) -> HashMap<String, Tensor> {
    vars.map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect()
}

/// Trainable variables by name, with AdamW, a step counter and the seed: what a checkpoint holds.
pub struct TrainState {
    pub vars: HashMap<String, Var>,
    /// Weights the model reads but the optimizer leaves alone (saved and exported with the rest).
    frozen: HashMap<String, Var>,
    opt: AdamW,
    pub step: u64,
    seed: u64,
    warmup: u64,
    lr: f64,
    decay: Option<(u64, u64)>,
    max_grad_norm: f64,
    /// An exponential moving average of the trainable weights and its decay (`--ema`): what
    /// samples and exports read when it is on.
    ema: Option<(f64, HashMap<String, Var>)>,
}

impl TrainState {
    pub fn new(weights: HashMap<String, Tensor>, args: &CommonArgs) -> Result<Self> {
        Self::with_trainable(weights, args, |_| true)
    }

    /// Only the weights `trainable` accepts by name are optimised; the others stay frozen.
    pub fn with_trainable(
        weights: HashMap<String, Tensor>,
        args: &CommonArgs,
        trainable: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let mut vars = HashMap::new();
        let mut frozen = HashMap::new();
        for (k, t) in weights {
            let v = Var::from_tensor(&t)?;
            if trainable(&k) {
                vars.insert(k, v);
            } else {
                frozen.insert(k, v);
            }
        }
        if vars.is_empty() {
            bail!("no trainable weights")
        }
        let opt = AdamW::new(
            vars.clone(),
            AdamWConfig {
                lr: args.lr,
                weight_decay: args.weight_decay,
                ..Default::default()
            },
        )?;
        Ok(Self {
            vars,
            frozen,
            opt,
            step: 0,
            seed: args.seed,
            warmup: args.warmup_steps,
            lr: args.lr,
            decay: args.decay_from.map(|from| (from, args.max_steps)),
            max_grad_norm: args.max_grad_norm,
            ema: None,
        })
    }

    /// Keep an EMA of the trainable weights with `decay` (0 = off), starting from the current
    /// weights; call before [`resume`](Self::resume), which then restores it too.
    pub fn with_ema(mut self, decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            bail!("--ema {decay} must be in [0, 1)")
        }
        if decay > 0.0 {
            let copies = self
                .vars
                .iter()
                .map(|(k, v)| Ok((k.clone(), Var::from_tensor(&v.as_tensor().detach())?)))
                .collect::<Result<_>>()?;
            self.ema = Some((decay, copies));
        }
        Ok(self)
    }

    /// The EMA decay used after optimizer step `step` (1-based), as diffusers' `EMAModel`: the
    /// warm-up (1 + n)/(10 + n) with n = step − 1 caps it, so early averages are not dominated
    /// by the starting weights.
    pub fn ema_decay(max: f64, step: u64) -> f64 {
        let n = step.saturating_sub(1) as f64;
        if n == 0.0 {
            return 0.0;
        }
        ((1.0 + n) / (10.0 + n)).min(max)
    }

    /// A VarBuilder over the live variables (gradients flow into them).
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

    /// Detached copies of the current weights.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        detached(self.vars.iter().chain(&self.frozen))
    }

    /// This step's random stream: a function of (seed, step) only, so a resumed run draws the
    /// same batches and noise.
    pub fn rng(&self) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (self.step << 8))
    }

    /// Backpropagate `loss`, clip, step AdamW. Returns (lr, grad norm).
    pub fn apply(&mut self, loss: &Tensor) -> Result<(f64, f64)> {
        let mut grads = loss.backward()?;
        let mut named: Vec<(&String, &Var)> = self.vars.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let refs: Vec<&Var> = named.into_iter().map(|(_, v)| v).collect();
        let norm = clip_grad_norm(&refs, &mut grads, self.max_grad_norm)?;
        let lr = scheduled_lr(self.lr, self.warmup, self.decay, self.step + 1);
        self.opt.step(&grads, lr)?;
        self.step += 1;
        if let Some((max, ema)) = &self.ema {
            crate::optim::ema_update(ema, &self.vars, Self::ema_decay(*max, self.step))?;
        }
        Ok((lr, norm))
    }

    /// What samples and exports read: the EMA of the trainable weights where `--ema` is on (with
    /// the frozen ones), otherwise [`weights`](Self::weights).
    pub fn export_weights(&self) -> HashMap<String, Tensor> {
        match &self.ema {
            Some((_, ema)) => detached(ema.iter().chain(&self.frozen)),
            None => self.weights(),
        }
    }

    /// Write a checkpoint of this step (kept as is when one already exists, e.g. after resuming
    /// at `--max-steps` to export).
    pub fn save(&self, run_dir: &Path, state: serde_json::Value) -> Result<PathBuf> {
        let existing = run_dir
            .join("checkpoints")
            .join(format!("checkpoint-{:08}", self.step));
        if existing.join(checkpoint::STATE_FILE).is_file() {
            return Ok(existing);
        }
        let (model, opt) = (self.weights(), self.opt.state());
        let ema = self.ema.as_ref().map(|(_, e)| detached(e.iter()));
        let mut groups = vec![("model", &model), ("optimizer", &opt)];
        if let Some(e) = &ema {
            groups.push(("ema", e));
        }
        checkpoint::save(&run_dir.join("checkpoints"), self.step, &groups, &state)
    }

    /// [`resume`](Self::resume), refusing a checkpoint whose run settings differ from `run`.
    pub fn resume_matching(
        &mut self,
        from: &Path,
        device: &Device,
        run: &impl Serialize,
    ) -> Result<()> {
        // Compared before any tensor is read, so a mismatch is reported as one, not as a group
        // (such as the EMA) the checkpoint lacks.
        let saved = Checkpoint::open(&Self::checkpoint_dir(from)?)?.state;
        if serde_json::to_value(run)? != saved["run"] {
            bail!(
                "--resume {}: the checkpoint was made with different settings",
                from.display()
            )
        }
        self.resume(from, device)?;
        Ok(())
    }

    /// `from` itself when it is a checkpoint, else the latest complete one under it.
    fn checkpoint_dir(from: &Path) -> Result<PathBuf> {
        if from.join(checkpoint::STATE_FILE).is_file() {
            return Ok(from.to_path_buf());
        }
        checkpoint::latest(&from.join("checkpoints"))?
            .with_context(|| format!("--resume {}: no complete checkpoint found", from.display()))
    }

    /// Load the latest checkpoint of `from` (a checkpoint or a run folder); returns its state.
    pub fn resume(&mut self, from: &Path, device: &Device) -> Result<serde_json::Value> {
        let dir = Self::checkpoint_dir(from)?;
        let ck = Checkpoint::open(&dir)?;
        let model = ck.group("model", device)?;
        for (name, var) in self.vars.iter().chain(&self.frozen) {
            let t = model
                .get(name)
                .with_context(|| format!("checkpoint {} lacks {name}", dir.display()))?;
            var.set(t)?;
        }
        self.opt
            .load_state(&ck.group("optimizer", device)?, ck.step)?;
        if let Some((_, ema)) = &self.ema {
            let saved = ck.group("ema", device)?;
            for (name, var) in ema {
                let t = saved
                    .get(name)
                    .with_context(|| format!("checkpoint {} lacks EMA {name}", dir.display()))?;
                var.set(t)?;
            }
        }
        self.step = ck.step;
        eprintln!("resumed from {} at step {}", dir.display(), self.step);
        Ok(ck.state)
    }
}

/// Progress bar and metrics log of a run.
pub struct RunLog {
    bar: indicatif::ProgressBar,
    log: std::fs::File,
    start: std::time::Instant,
}

impl RunLog {
    pub fn new(run_dir: &Path, step: u64, max_steps: u64) -> Result<Self> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let path = run_dir.join("metrics.jsonl");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let bar = indicatif::ProgressBar::new(max_steps);
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

    pub fn record(&mut self, step: u64, values: serde_json::Value) -> Result<()> {
        let mut line = values;
        line["step"] = step.into();
        line["time_s"] = self.start.elapsed().as_secs_f64().into();
        writeln!(self.log, "{line}")?;
        if let Some(l) = line["loss"].as_f64() {
            if !l.is_finite() {
                bail!("loss became {l} at step {step}")
            }
            self.bar.set_message(format!("loss {l:.5}"));
        }
        self.bar.set_position(step);
        Ok(())
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[derive(Serialize, Deserialize, PartialEq)]
struct VaeRunState {
    kl_weight: f64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    decoder_only: bool,
    resolution: usize,
    batch_size: usize,
    seed: u64,
}

/// One VAE training step's loss: L1 reconstruction + kl_weight · KL(q(z|x) ‖ N(0, I)), both per
/// element means. `decoder_only`: the latent sample is detached, so no gradient reaches the
/// encoder (nor its backward pass runs), and the loss is the reconstruction alone (the KL is
/// still reported).
pub fn vae_loss(
    vae: &AutoencoderKL,
    images: &Tensor,
    noise: &Tensor,
    kl_weight: f64,
    decoder_only: bool,
) -> Result<(Tensor, f64, f64)> {
    let post = vae.encode(images)?;
    let mut z = post.sample_with(noise)?;
    if decoder_only {
        z = z.detach();
    }
    let recon = vae.decode(&z)?;
    let rec = (recon - images)?.abs()?.mean_all()?;
    let kl = ((post.mean.sqr()? + post.logvar.exp()?)? - 1.0)?
        .sub(&post.logvar)?
        .mean_all()?
        .affine(0.5, 0.0)?;
    let loss = if decoder_only {
        rec.clone()
    } else {
        (&rec + (&kl * kl_weight)?)?
    };
    let (r, k) = (
        rec.to_scalar::<f32>()? as f64,
        kl.to_scalar::<f32>()? as f64,
    );
    Ok((loss, r, k))
}

/// `b` row indices drawn uniformly from `0..n`.
pub fn rows(rng: &mut ChaCha8Rng, n: usize, b: usize, device: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = (0..b).map(|_| rng.random_range(0..n as u32)).collect();
    Ok(Tensor::new(idx.as_slice(), device)?)
}

/// `lcm pretrain vae`.
pub fn run_vae(args: &VaeArgs) -> Result<()> {
    let c = &args.common;
    let (device, _) = c.runtime.resolve()?;
    let cfg = VaeConfig::load(&args.config)?;
    let f = cfg.scale_factor();
    if c.resolution == 0 || !c.resolution.is_multiple_of(f) {
        bail!(
            "--resolution {} must be a positive multiple of {f}",
            c.resolution
        )
    }
    if c.batch_size == 0 {
        bail!("--batch-size must be at least 1")
    }
    let last = c.last_step()?;
    let (images, _) = load_images(&c.data, c.resolution)?;
    let images = images.to_device(&device)?;
    let n = images.dim(0)?;
    eprintln!("{n} training images at {}²", c.resolution);
    let mut init = crate::init::init_weights(c.seed, &device, |vb| AutoencoderKL::new(&cfg, vb))?;
    let mut kept_scaling = None;
    if let Some(dir) = &args.init {
        take_trained(&mut init, &load_component(dir, &device)?, dir, false)?;
        if args.decoder_only {
            kept_scaling = Some(VaeConfig::load(&dir.join("config.json"))?.scaling_factor);
        }
    }
    let mut state = TrainState::with_trainable(init, c, |name| {
        !args.decoder_only || name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
    })?;
    let run_state = VaeRunState {
        kl_weight: args.kl_weight,
        decoder_only: args.decoder_only,
        resolution: c.resolution,
        batch_size: c.batch_size,
        seed: c.seed,
    };
    if let Some(r) = &c.resume {
        state.resume_matching(r, &device, &run_state)?;
    }
    let vae = AutoencoderKL::new(&cfg, state.var_builder(&device))?;
    let fixed = images.narrow(0, 0, n.min(8))?;
    let mut log = RunLog::new(&c.output, state.step, last)?;
    let lat_shape = (
        c.batch_size,
        cfg.latent_channels,
        c.resolution / f,
        c.resolution / f,
    );
    while state.step < last {
        let mut rng = state.rng();
        let batch = images.index_select(&rows(&mut rng, n, c.batch_size, &device)?, 0)?;
        let noise = SeededNoise::new(rng.random()).sample(&lat_shape.into(), &device)?;
        let (loss, rec, kl) = vae_loss(&vae, &batch, &noise, args.kl_weight, args.decoder_only)?;
        let l = loss.to_scalar::<f32>()? as f64;
        let (lr, gn) = state.apply(&loss)?;
        log.record(
            state.step,
            serde_json::json!({"loss": l, "l1": rec, "kl": kl, "lr": lr, "grad_norm": gn}),
        )?;
        let step = state.step;
        if c.save_every > 0 && step % c.save_every == 0 {
            state.save(
                &c.output,
                serde_json::json!({"step": step, "run": run_state}),
            )?;
        }
        if c.sample_every > 0 && step % c.sample_every == 0 {
            write_reconstructions(
                &vae,
                &fixed,
                &c.output.join(format!("samples/step-{step:08}.png")),
            )?;
        }
    }
    log.finish();
    state.save(
        &c.output,
        serde_json::json!({"step": state.step, "run": run_state}),
    )?;
    let scaling = match kept_scaling {
        Some(s) => s,
        None => latent_scaling(&vae, &images)?,
    };
    export_vae(
        &args.config,
        &state.weights(),
        scaling,
        &c.output.join("vae"),
    )?;
    println!(
        "trained the VAE for {} steps; latent std {:.4} → scaling_factor {scaling:.5}; wrote {}",
        state.step,
        1.0 / scaling,
        c.output.join("vae").display()
    );
    Ok(())
}

/// Replace every freshly initialised tensor by the trained one of the same name (`--init`), shapes
/// equal. Without `grow` the trained folder must hold every tensor; with it (`--init --grow`) the
/// ones it lacks keep their fresh values, the output projections among them zeroed so that each new
/// attention block (a residual branch) starts as the identity. Returns the number of new
/// parameters.
fn take_trained(
    init: &mut HashMap<String, Tensor>,
    trained: &HashMap<String, Tensor>,
    dir: &Path,
    grow: bool,
) -> Result<usize> {
    let mut fresh = 0;
    for (name, t) in init.iter_mut() {
        match trained.get(name) {
            Some(w) if w.dims() == t.dims() => *t = w.to_dtype(DType::F32)?,
            Some(w) => bail!(
                "--init {}: {name} has shape {:?}, the config wants {:?}",
                dir.display(),
                w.dims(),
                t.dims()
            ),
            None if !grow => bail!("--init {}: no tensor {name}", dir.display()),
            None => {
                fresh += t.elem_count();
                if name.contains(".proj_out.") {
                    *t = t.zeros_like()?;
                }
            }
        }
    }
    if grow && fresh == 0 {
        bail!(
            "--grow: the config adds nothing to --init {}; drop --grow",
            dir.display()
        )
    }
    Ok(fresh)
}

/// The trained VAE in `dir` (`--vae`), frozen, for a stage that trains on its latents; refuses a
/// `--resolution` it cannot encode.
pub fn frozen_vae(
    dir: &Path,
    resolution: usize,
    device: &Device,
) -> Result<(AutoencoderKL, VaeConfig)> {
    let cfg = VaeConfig::load(&dir.join("config.json"))?;
    let weights =
        crate::pipeline::load_weights(&crate::source::weight_file(dir)?, DType::F32, device)?;
    let vae =
        AutoencoderKL::new(&cfg, weights).with_context(|| format!("--vae {}", dir.display()))?;
    let f = cfg.scale_factor();
    if resolution == 0 || !resolution.is_multiple_of(f) {
        bail!("--resolution {resolution} must be a positive multiple of {f}")
    }
    Ok((vae, cfg))
}

/// `--text-encoder DIR`'s weights under the teacher's `text_encoder.` names, checked against the
/// shapes the config gives (`init`).
fn text_encoder_weights(
    dir: &Path,
    init: &HashMap<String, Tensor>,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let flag = || format!("--text-encoder {}", dir.display());
    let weights = load_component(dir, device).with_context(flag)?;
    let mut out = HashMap::new();
    for (name, want) in init.iter().filter(|(k, _)| k.starts_with("text_encoder.")) {
        let key = name.trim_start_matches("text_encoder.");
        let w = weights
            .get(key)
            .with_context(|| format!("{}: no tensor {key}", flag()))?;
        if w.dims() != want.dims() {
            bail!(
                "{}: {key} has shape {:?}, --config wants {:?}",
                flag(),
                w.dims(),
                want.dims()
            )
        }
        out.insert(name.clone(), w.to_dtype(DType::F32)?);
    }
    Ok(out)
}

/// Every tensor of a component folder's safetensors files.
pub fn load_component(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in crate::source::weight_file(dir)? {
        all.extend(
            candle_core::safetensors::load(&f, device)
                .with_context(|| format!("cannot read {}", f.display()))?,
        );
    }
    Ok(all)
}

/// SD's recipe: scaling_factor = 1 / std of the latents' posterior means over (up to 512) images.
fn latent_scaling(vae: &AutoencoderKL, images: &Tensor) -> Result<f64> {
    let n = images.dim(0)?.min(512);
    let mut means = Vec::new();
    for start in (0..n).step_by(32) {
        let x = images.narrow(0, start, 32.min(n - start))?.detach();
        means.push(vae.encode(&x)?.mean.detach());
    }
    let all = Tensor::cat(&means, 0)?.flatten_all()?;
    let mean = all.mean_all()?.to_scalar::<f32>()? as f64;
    let var = all
        .affine(1.0, -mean)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()? as f64;
    Ok(1.0 / var.sqrt().max(1e-6))
}

fn export_vae(
    config: &Path,
    weights: &HashMap<String, Tensor>,
    scaling: f64,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut cfg: serde_json::Value = crate::config::read_json(config)?;
    cfg["scaling_factor"] = scaling.into();
    crate::image_io::write_atomic(&out.join("config.json"), &serde_json::to_vec_pretty(&cfg)?)?;
    save_safetensors(weights, &out.join("diffusion_pytorch_model.safetensors"))
}

/// safetensors written to a temporary name and renamed into place.
pub fn save_safetensors(weights: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(weights, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Originals (top row) over reconstructions (bottom row).
fn write_reconstructions(vae: &AutoencoderKL, images: &Tensor, path: &Path) -> Result<()> {
    let x = images.detach();
    let recon = vae.decode(&vae.encode(&x)?.mean)?.detach();
    let both = Tensor::cat(&[x, recon], 0)?;
    let tiles = crate::image_io::to_rgb8(&crate::image_io::to_unit_nhwc(&both)?)?;
    let grid = crate::image_io::grid(&tiles, images.dim(0)?)?;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    crate::image_io::save_png(&grid, path)
}

/// `lcm pretrain unet`: a text-to-image teacher (ε-prediction U-Net + CLIP-architecture text
/// encoder trained jointly from scratch) on latents of a trained VAE.
#[derive(clap::Args, Debug, Clone)]
pub struct UnetArgs {
    /// Model folder giving the sizes and vocabulary: unet/config.json, text_encoder/config.json,
    /// tokenizer/ and scheduler/scheduler_config.json.
    #[arg(long)]
    pub config: PathBuf,
    /// The trained VAE: a folder with config.json and weights (e.g. `<vae run>/vae`).
    #[arg(long)]
    pub vae: PathBuf,
    /// Probability of training on the empty prompt instead of the caption (for CFG).
    #[arg(long, default_value_t = 0.1)]
    pub caption_dropout: f64,
    /// Offset noise (diffusers' `--noise_offset`): add s·N(0, 1) per sample and channel to the
    /// training noise, so the prompt rather than the seed decides an image's overall colour (small
    /// latents leave the mean of x_T readable under SD1.5's schedule). 0 = plain ε.
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f64,
    /// Min-SNR-γ loss weighting (diffusers' `--snr_gamma`; 5 is the paper's choice): weight each
    /// sample's ε loss by min(SNR_t, γ)/SNR_t. 0 = unweighted (the reference's default).
    #[arg(long, default_value_t = 0.0)]
    pub snr_gamma: f64,
    /// Start from a trained teacher folder's unet/ and text_encoder/ weights (fresh optimizer)
    /// instead of a seeded init, so that a stage can span sessions through its exported weights.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// With --init from a smaller U-Net of the same layout (e.g. one that had no attention at
    /// some level): tensors --init lacks start freshly drawn, the output projections of new
    /// attention blocks at zero, so the grown model starts as exactly --init's function.
    #[arg(long, requires = "init")]
    pub grow: bool,
    /// A trained text encoder folder (e.g. `<pretrain text run>/text_encoder`) to condition on,
    /// frozen, instead of training one jointly; replaces --init's. Its config.json must be
    /// --config's.
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// Keep an exponential moving average of the weights with this decay (diffusers'
    /// `--use_ema`, whose default is 0.9999; its warm-up too) and sample and export it rather
    /// than the last step's weights. 0 = off.
    #[arg(long, default_value_t = 0.0)]
    pub ema: f64,
    /// Train on the VAE posterior's mean instead of a sample from it (diffusers samples). For
    /// whitened latents (`lcm whiten`), whose weakest directions the posterior's own noise would
    /// otherwise fill: the U-Net would learn to draw that noise as coloured blotches.
    #[arg(long)]
    pub posterior_mean: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

#[derive(Serialize, Deserialize, PartialEq)]
struct UnetRunState {
    caption_dropout: f64,
    #[serde(default)]
    noise_offset: f64,
    #[serde(default)]
    snr_gamma: f64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    frozen_text: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    ema: f64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    posterior_mean: bool,
    resolution: usize,
    batch_size: usize,
    seed: u64,
}

/// The dataset in the teacher's terms: the VAE posterior (mean, std) of every image in VAE space,
/// and every caption's token ids.
pub struct EncodedData {
    pub mean: Tensor,
    pub std: Tensor,
    pub ids: Tensor,
    pub captions: Vec<String>,
}

/// [`EncodedData`] of `c.data` under the VAE in `vae_dir`, cached in `c.output/cache` by a hash of
/// the resolution, the VAE's weight files and the images.
pub fn encode_dataset(
    c: &CommonArgs,
    vae_dir: &Path,
    vae: &AutoencoderKL,
    tokenizer: &crate::tokenizer::ClipTokenizer,
    device: &Device,
) -> Result<EncodedData> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    c.resolution.hash(&mut h);
    for f in crate::source::weight_file(vae_dir)? {
        let m = std::fs::metadata(&f)?;
        (f.display().to_string(), m.len(), m.modified().ok()).hash(&mut h);
    }
    for d in &c.data {
        for ex in crate::data::scan(d)? {
            ex.fingerprint().hash(&mut h);
        }
    }
    let cache = c
        .output
        .join(format!("cache/latents-{:016x}.safetensors", h.finish()));
    let captions_file = cache.with_extension("captions.json");
    if cache.is_file() && captions_file.is_file() {
        let t = candle_core::safetensors::load(&cache, device)?;
        let captions: Vec<String> = crate::config::read_json(&captions_file)?;
        if let (Some(mean), Some(std), Some(ids)) = (t.get("mean"), t.get("std"), t.get("ids")) {
            eprintln!("using the encoded dataset in {}", cache.display());
            return Ok(EncodedData {
                mean: mean.clone(),
                std: std.clone(),
                ids: ids.clone(),
                captions,
            });
        }
    }
    let (images, captions) = load_images(&c.data, c.resolution)?;
    let n = images.dim(0)?;
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("encoding {pos}/{len} {per_sec} ETA {eta}")
            .expect("valid template"),
    );
    let (mut means, mut stds) = (Vec::new(), Vec::new());
    for start in (0..n).step_by(64) {
        let x = images
            .narrow(0, start, 64.min(n - start))?
            .to_device(device)?;
        let post = vae.encode(&x)?;
        means.push(post.mean.contiguous()?);
        stds.push(post.logvar.affine(0.5, 0.0)?.exp()?.contiguous()?);
        bar.inc(x.dim(0)? as u64);
    }
    bar.finish_and_clear();
    let mut ids = Vec::with_capacity(n * tokenizer.max_len());
    let mut truncated = 0;
    for cap in &captions {
        let t = tokenizer.encode(cap)?;
        truncated += usize::from(t.dropped > 0);
        ids.extend(t.ids);
    }
    if truncated > 0 {
        eprintln!("warning: {truncated} captions were truncated to the text encoder's length");
    }
    let data = EncodedData {
        mean: Tensor::cat(&means, 0)?,
        std: Tensor::cat(&stds, 0)?,
        ids: Tensor::from_vec(ids, (n, tokenizer.max_len()), device)?,
        captions,
    };
    std::fs::create_dir_all(cache.parent().expect("cache folder"))?;
    save_safetensors(
        &HashMap::from([
            ("mean".to_string(), data.mean.clone()),
            ("std".to_string(), data.std.clone()),
            ("ids".to_string(), data.ids.clone()),
        ]),
        &cache,
    )?;
    crate::image_io::write_atomic(&captions_file, &serde_json::to_vec(&data.captions)?)?;
    Ok(data)
}

/// The teacher being trained: U-Net and text encoder over one set of variables.
struct Teacher {
    unet: crate::unet::UNet2DConditionModel,
    text: crate::clip::ClipTextModel,
}

impl Teacher {
    /// Both halves under one VarBuilder (`unet.*`, `text_encoder.text_model.*`).
    fn new(
        unet_cfg: &crate::config::UNetConfig,
        te_cfg: &crate::config::ClipTextConfig,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            unet: crate::unet::UNet2DConditionModel::new(unet_cfg, vb.pp("unet"))?,
            text: crate::clip::ClipTextModel::new(te_cfg, vb.pp("text_encoder").pp("text_model"))?,
        })
    }
}

/// `lcm pretrain unet`.
pub fn run_unet(args: &UnetArgs) -> Result<()> {
    use crate::config::{ClipTextConfig, SchedulerConfig, UNetConfig};
    let c = &args.common;
    let (device, _) = c.runtime.resolve()?;
    let dir = &args.config;
    let unet_cfg = UNetConfig::load(&dir.join("unet/config.json"))?;
    let te_cfg = ClipTextConfig::load(&dir.join("text_encoder/config.json"))?;
    let sched_cfg = SchedulerConfig::load(&dir.join("scheduler/scheduler_config.json"))?;
    let tokenizer = crate::tokenizer::ClipTokenizer::from_dir(
        &dir.join("tokenizer"),
        te_cfg.max_position_embeddings,
    )?;
    let (vae, vae_cfg) = frozen_vae(&args.vae, c.resolution, &device)?;
    if unet_cfg.in_channels != vae_cfg.latent_channels {
        bail!(
            "the U-Net takes {} channels but the VAE makes {}",
            unet_cfg.in_channels,
            vae_cfg.latent_channels
        )
    }
    if c.batch_size == 0 || !(0.0..=1.0).contains(&args.caption_dropout) {
        bail!("--batch-size must be ≥ 1 and --caption-dropout in [0, 1]")
    }
    let last = c.last_step()?;
    if !(0.0..=1.0).contains(&args.noise_offset) {
        bail!("--noise-offset {} must be in [0, 1]", args.noise_offset)
    }
    if args.snr_gamma.is_nan() || args.snr_gamma < 0.0 {
        bail!("--snr-gamma {} must be ≥ 0", args.snr_gamma)
    }
    if let Some(te) = &args.text_encoder {
        if ClipTextConfig::load(&te.join("config.json"))? != te_cfg {
            bail!(
                "--text-encoder {}: its config.json differs from --config's text_encoder/config.json",
                te.display()
            )
        }
    }
    let data = encode_dataset(c, &args.vae, &vae, &tokenizer, &device)?;
    let n = data.mean.dim(0)?;
    eprintln!("{n} training examples, latents {:?}", data.mean.dims());
    let uncond_ids = Tensor::new(tokenizer.encode("")?.ids.as_slice(), &device)?.unsqueeze(0)?;
    let schedule = crate::schedule::NoiseSchedule::from_config(&sched_cfg)?;

    let build = |vb: VarBuilder| Teacher::new(&unet_cfg, &te_cfg, vb);
    let mut init = crate::init::init_weights(c.seed, &device, build)?;
    if let Some(dir) = &args.init {
        let mut trained = HashMap::new();
        for part in ["unet", "text_encoder"] {
            let weights = load_component(&dir.join(part), &device)
                .with_context(|| format!("--init {}", dir.display()))?;
            trained.extend(weights.into_iter().map(|(k, v)| (format!("{part}.{k}"), v)));
        }
        if let Some(te) = &args.text_encoder {
            trained.retain(|k, _| !k.starts_with("text_encoder."));
            trained.extend(text_encoder_weights(te, &init, &device)?);
        }
        let fresh = take_trained(&mut init, &trained, dir, args.grow)?;
        if args.grow {
            eprintln!("--grow: {fresh} parameters new to --init (attention outputs zeroed)");
        }
    } else if let Some(te) = &args.text_encoder {
        init.extend(text_encoder_weights(te, &init, &device)?);
    }
    let frozen_text = args.text_encoder.is_some();
    let mut state = TrainState::with_trainable(init, c, |k| {
        !(frozen_text && k.starts_with("text_encoder."))
    })?
    .with_ema(args.ema)?;
    let run_state = UnetRunState {
        caption_dropout: args.caption_dropout,
        noise_offset: args.noise_offset,
        snr_gamma: args.snr_gamma,
        frozen_text,
        ema: args.ema,
        posterior_mean: args.posterior_mean,
        resolution: c.resolution,
        batch_size: c.batch_size,
        seed: c.seed,
    };
    if let Some(r) = &c.resume {
        state.resume_matching(r, &device, &run_state)?;
    }
    let model = build(state.var_builder(&device))?;
    let mut log = RunLog::new(&c.output, state.step, last)?;
    let num_t = schedule.num_train_timesteps();
    let b = c.batch_size;
    let sample_prompts: Vec<String> = data.captions.iter().take(4).cloned().collect();
    while state.step < last {
        let mut rng = state.rng();
        let rows_t = rows(&mut rng, n, b, &device)?;
        let shape = data.mean.index_select(&rows_t, 0)?.shape().clone();
        // Drawn either way, so that both choices see the same data order and noise.
        let eps_vae = SeededNoise::new(rng.random()).sample(&shape, &device)?;
        let mean = data.mean.index_select(&rows_t, 0)?;
        let z = if args.posterior_mean {
            mean
        } else {
            (mean + (data.std.index_select(&rows_t, 0)? * eps_vae)?)?
        };
        let z0 = vae.scale(&z)?;
        let drop: Vec<bool> = (0..b)
            .map(|_| rng.random::<f64>() < args.caption_dropout)
            .collect();
        let ids = data.ids.index_select(&rows_t, 0)?;
        let ids = if drop.iter().any(|&d| d) {
            let rows: Vec<Tensor> = (0..b)
                .map(|i| {
                    if drop[i] {
                        Ok(uncond_ids.clone())
                    } else {
                        ids.narrow(0, i, 1)
                    }
                })
                .collect::<candle_core::Result<_>>()?;
            Tensor::cat(&rows, 0)?
        } else {
            ids
        };
        let t: Vec<usize> = (0..b).map(|_| rng.random_range(0..num_t)).collect();
        let mut noise = SeededNoise::new(rng.random()).sample(&shape, &device)?;
        if args.noise_offset > 0.0 {
            // Drawn only with an offset, so plain runs keep their random stream (and resumes).
            let mut src = SeededNoise::new(rng.random());
            noise = crate::schedule::offset_noise(&noise, args.noise_offset, &mut src)?;
        }
        let x_t = schedule.add_noise(&z0, &noise, &t)?;
        let mut ctx = model.text.forward(&ids)?;
        if frozen_text {
            // No gradient is wanted through a frozen encoder; detaching skips its backward.
            ctx = ctx.detach();
        }
        let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        let pred = model
            .unet
            .forward(&x_t, &Tensor::new(tf.as_slice(), &device)?, &ctx, None)?;
        let sq = (pred - &noise)?.sqr()?;
        let loss = if args.snr_gamma > 0.0 {
            let w = crate::schedule::min_snr_weights(&schedule, &t, args.snr_gamma);
            sq.broadcast_mul(&crate::schedule::per_sample(&w, &sq)?)?
                .mean_all()?
        } else {
            sq.mean_all()?
        };
        let l = loss.to_scalar::<f32>()? as f64;
        let (lr, gn) = state.apply(&loss)?;
        log.record(
            state.step,
            serde_json::json!({"loss": l, "lr": lr, "grad_norm": gn}),
        )?;
        let step = state.step;
        if c.save_every > 0 && step % c.save_every == 0 {
            state.save(
                &c.output,
                serde_json::json!({"step": step, "run": run_state}),
            )?;
        }
        if c.sample_every > 0 && step % c.sample_every == 0 {
            let out = c.output.join("model");
            export_teacher(args, &state.export_weights(), &out)?;
            let pipe = crate::pipeline::Pipeline::load(&out, &device, DType::F32)?;
            let path = c.output.join(format!("samples/step-{step:08}.png"));
            write_teacher_samples(&pipe, &sample_prompts, &path)?;
        }
    }
    log.finish();
    state.save(
        &c.output,
        serde_json::json!({"step": state.step, "run": run_state}),
    )?;
    let out = c.output.join("model");
    export_teacher(args, &state.export_weights(), &out)?;
    println!(
        "trained the teacher for {} steps; wrote {}",
        state.step,
        out.display()
    );
    Ok(())
}

/// Write a diffusers StableDiffusionPipeline folder: the trained U-Net and text encoder, the VAE,
/// tokenizer and scheduler.
fn export_teacher(args: &UnetArgs, weights: &HashMap<String, Tensor>, out: &Path) -> Result<()> {
    let part = |prefix: &str| -> HashMap<String, Tensor> {
        weights
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
            .collect()
    };
    for (name, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        std::fs::create_dir_all(out.join(name))?;
        let cfg = std::fs::read(args.config.join(name).join("config.json"))?;
        crate::image_io::write_atomic(&out.join(name).join("config.json"), &cfg)?;
        save_safetensors(&part(&format!("{name}.")), &out.join(name).join(file))?;
    }
    crate::source::copy_files(&args.vae, &out.join("vae"))?;
    crate::source::copy_files(&args.config.join("tokenizer"), &out.join("tokenizer"))?;
    crate::source::copy_files(&args.config.join("scheduler"), &out.join("scheduler"))?;
    crate::source::write_model_index(out, "StableDiffusionPipeline", "DDIMScheduler")
}

/// One row per prompt: DDIM 25 steps at guidance 7.5 for two seeds.
fn write_teacher_samples(
    pipe: &crate::pipeline::Pipeline,
    prompts: &[String],
    path: &Path,
) -> Result<()> {
    let mut tiles = Vec::new();
    for prompt in prompts {
        for seed in 0..2u64 {
            let req = crate::pipeline::GenerateRequest {
                prompt: prompt.clone(),
                steps: Some(25),
                n: 1,
                ..Default::default()
            };
            let g = pipe.generate(
                &req,
                &Default::default(),
                &mut SeededNoise::new(seed),
                &mut |_| {},
            )?;
            tiles.push(g.images[0].clone());
        }
    }
    let (w, h) = (tiles[0].width(), tiles[0].height());
    let mut grid = image::RgbImage::new(w * 2, h * prompts.len() as u32);
    for (i, t) in tiles.iter().enumerate() {
        let i = i as u32;
        image::imageops::replace(&mut grid, t, ((i % 2) * w).into(), ((i / 2) * h).into());
    }
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    crate::image_io::save_png(&grid, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The jointly trained teacher must train every weight: candle ops without a backward cut the
    /// graph silently (e.g. its fused softmax and layer norm).
    #[test]
    fn every_teacher_weight_gets_a_gradient() -> Result<()> {
        use crate::config::{ClipTextConfig, UNetConfig};
        let root = crate::source::repo_root().join("configs/tiny");
        let unet_cfg = UNetConfig::load(&root.join("unet/config.json"))?;
        let te_cfg = ClipTextConfig::load(&root.join("text_encoder/config.json"))?;
        let tok = crate::tokenizer::ClipTokenizer::from_dir(
            &root.join("tokenizer"),
            te_cfg.max_position_embeddings,
        )?;
        let dev = Device::Cpu;
        let build = |vb: VarBuilder| Teacher::new(&unet_cfg, &te_cfg, vb);
        let (vars, model) = crate::init::live_vars(0, &dev, build)?;
        let ids: Vec<u32> = ["a red circle on blue", "an emoji of a cat"]
            .iter()
            .flat_map(|p| tok.encode(p).unwrap().ids)
            .collect();
        let ids = Tensor::from_vec(ids, (2, te_cfg.max_position_embeddings), &dev)?;
        let s = unet_cfg.sample_size.unwrap_or(16);
        let x = Tensor::randn(0f32, 1.0, (2, unet_cfg.in_channels, s, s), &dev)?;
        let noise = Tensor::randn(0f32, 1.0, x.shape(), &dev)?;
        let ctx = model.text.forward(&ids)?;
        let t = Tensor::new(&[10f32, 700.0], &dev)?;
        let loss = (model.unet.forward(&x, &t, &ctx, None)? - noise)?
            .sqr()?
            .mean_all()?;
        let grads = loss.backward()?;
        // Token embeddings of ids absent from the batch legitimately get zero gradient.
        let mut missing = crate::init::without_gradient(&vars, &grads, |name| {
            name.ends_with("token_embedding.weight")
        })?;
        missing.sort();
        assert!(missing.is_empty(), "no gradient for {missing:?}");
        assert!(vars.keys().any(|k| k.starts_with("text_encoder.")));
        Ok(())
    }

    /// `--ema`: the average follows diffusers' EMAModel (a copy at the first step, then the
    /// warm-up decay), exports read it, and a resumed run restores it exactly.
    #[test]
    fn ema_averages_exports_and_resumes() -> Result<()> {
        #[derive(clap::Parser)]
        struct W {
            #[command(flatten)]
            c: CommonArgs,
        }
        use clap::Parser;
        let dir = std::env::temp_dir().join(format!("lcm-ema-{}", std::process::id()));
        let out = dir.to_str().unwrap();
        let args = W::parse_from(["x", "--data", "d", "--output", out, "--lr", "0.1"]).c;
        let dev = Device::Cpu;
        let start = || -> Result<TrainState> {
            let w = HashMap::from([("w".to_string(), Tensor::new(&[1f32, -2.0], &dev)?)]);
            TrainState::new(w, &args)?.with_ema(0.9)
        };
        let step = |s: &mut TrainState| -> Result<Vec<f32>> {
            let loss = s.vars["w"].as_tensor().sqr()?.sum_all()?;
            s.apply(&loss)?;
            Ok(s.vars["w"].as_tensor().to_vec1()?)
        };
        let mut s = start()?;
        let mut want = step(&mut s)?; // decay 0: the first average is the weights
        for k in 2..=4u64 {
            let d = TrainState::ema_decay(0.9, k) as f32;
            let w = step(&mut s)?;
            want = want
                .iter()
                .zip(&w)
                .map(|(e, w)| d * e + (1.0 - d) * w)
                .collect();
        }
        assert_eq!(TrainState::ema_decay(0.9, 2), 2.0 / 11.0);
        assert_eq!(TrainState::ema_decay(0.9, 1000), 0.9);
        let got: Vec<f32> = s.export_weights()["w"].to_vec1()?;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} against {want:?}");
        }
        assert_ne!(
            got,
            s.weights()["w"].to_vec1::<f32>()?,
            "exports read the EMA"
        );
        s.save(&dir, serde_json::json!({}))?;
        step(&mut s)?;
        let mut r = start()?;
        r.resume(&dir, &dev)?;
        step(&mut r)?;
        let (a, b) = (s.export_weights(), r.export_weights());
        assert_eq!(a["w"].to_vec1::<f32>()?, b["w"].to_vec1::<f32>()?);
        assert!(TrainState::new(
            HashMap::from([("w".into(), Tensor::new(&[1f32], &dev)?)]),
            &args
        )?
        .with_ema(1.0)
        .is_err());
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    /// `--grow` from the tiny teacher to the one with attention at full latent resolution: the
    /// grown model starts as the same function (new attention blocks are identities), has new
    /// parameters, and a shape clash is refused.
    #[test]
    fn a_grown_unet_starts_as_its_init() -> Result<()> {
        use crate::config::UNetConfig;
        let root = crate::source::repo_root().join("configs");
        let small = UNetConfig::load(&root.join("tiny/unet/config.json"))?;
        let big = UNetConfig::load(&root.join("tiny-xattn/unet/config.json"))?;
        let dev = Device::Cpu;
        let unet = |cfg: &UNetConfig, vb: VarBuilder| {
            crate::unet::UNet2DConditionModel::new(cfg, vb.pp("unet"))
        };
        let trained = crate::init::init_weights(1, &dev, |vb| unet(&small, vb))?;
        let mut grown = crate::init::init_weights(2, &dev, |vb| unet(&big, vb))?;
        let fresh = take_trained(&mut grown, &trained, Path::new("small"), true)?;
        assert!(fresh > 0 && grown.len() > trained.len());
        let s = small.sample_size.unwrap_or(16);
        let x = Tensor::randn(0f32, 1.0, (2, small.in_channels, s, s), &dev)?;
        let ctx = Tensor::randn(0f32, 1.0, (2, 8, small.cross_attention_dim), &dev)?;
        let t = Tensor::new(&[10f32, 700.0], &dev)?;
        let run = |w: &HashMap<String, Tensor>, cfg: &UNetConfig| -> Result<Tensor> {
            let m = unet(cfg, VarBuilder::from_tensors(w.clone(), DType::F32, &dev))?;
            Ok(m.forward(&x, &t, &ctx, None)?)
        };
        let d = (run(&grown, &big)? - run(&trained, &small)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "the grown U-Net must start as its --init");
        // Growing into a config with a different width is a reshape, not a growth.
        let mut wider = big.clone();
        wider.cross_attention_dim *= 2;
        let mut bad = crate::init::init_weights(3, &dev, |vb| unet(&wider, vb))?;
        let e = take_trained(&mut bad, &trained, Path::new("small"), true).unwrap_err();
        assert!(e.to_string().contains("has shape"), "{e}");
        // And a config that adds nothing needs no --grow.
        let mut same = crate::init::init_weights(4, &dev, |vb| unet(&small, vb))?;
        let e = take_trained(&mut same, &trained, Path::new("small"), true).unwrap_err();
        assert!(e.to_string().contains("adds nothing"), "{e}");
        Ok(())
    }
}
