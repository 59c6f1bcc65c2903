//! `lcm eval`: generate images for the evaluator's held-out prompts and score them (JSON and a
//! markdown row).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::evaluator::{default_evaluator, Evaluator};

/// `lcm eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: crate::pipeline::args::ModelArgs,
    #[command(flatten)]
    pub sampling: crate::pipeline::args::SamplingArgs,
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
    /// Motion models: the HumanML3D-layout folder whose splits are scored (its clips' first
    /// captions and lengths drive the generation).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Motion models: the splits to score.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "test,test_compositional,test_paraphrase"
    )]
    pub splits: Vec<String>,
    /// Motion models: also score the ground truth and nearest-neighbour retrieval.
    #[arg(long)]
    pub baselines: bool,
    /// Motion models: MultiModality from this many test captions × samples each.
    #[arg(long, value_delimiter = ',', default_value = "20,10")]
    pub multimodality: Vec<usize>,
    #[command(flatten)]
    pub runtime: crate::runtime::RuntimeArgs,
}

/// `lcm eval`: generate `--samples` images for the evaluation prompts and score them.
pub fn run(args: &EvalArgs) -> Result<()> {
    use crate::pipeline::GenerateRequest;
    use crate::sample::noise::{NoiseSource, SeededNoise};

    let spec = args.model.spec()?;
    if let Some(dir) = crate::pipeline::source::local_dir(&spec)? {
        if crate::pipeline::text2motion::is_motion_folder(&dir) {
            return run_motion(args, &spec, &dir);
        }
    }
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
    let (device, dtype) = args.runtime.resolve()?;
    let (resolved, pipe) = args.model.open(&device, dtype)?;
    let prompts = &evaluator.prompts[..args.samples];
    let reqs: Vec<GenerateRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| args.sampling.request(&p.text, args.seed + i as u64))
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
    crate::files::write_atomic(&args.output, &serde_json::to_vec_pretty(&report)?)?;
    let md_path = args.output.with_extension("md");
    crate::files::write_atomic(&md_path, md.as_bytes())?;
    if let Some(grid) = &args.grid {
        let g = crate::pipeline::image_io::grid(&images[..images.len().min(16)], 4)?;
        crate::pipeline::image_io::save_png(&g, grid)?;
    }
    print!("{md}");
    println!("wrote {} and {}", args.output.display(), md_path.display());
    Ok(())
}

/// `lcm eval` with a motion model: the motion evaluator's figures and program adherence on the
/// data folder's splits.
fn run_motion(args: &EvalArgs, spec: &str, dir: &std::path::Path) -> Result<()> {
    use crate::sample::sampler::SamplerKind;
    let data = args
        .data
        .as_deref()
        .context("--data: a motion model is scored on a HumanML3D-layout folder")?;
    let evaluator = args
        .evaluator
        .as_deref()
        .context("--evaluator: a motion evaluator folder (lcm pretrain motion-evaluator)")?;
    let folder = crate::pipeline::text2motion::MotionFolder::open(dir)?;
    // A named pipeline's defaults, then the folder's class (a flow map samples with its jumps).
    let defaults = crate::pipeline::source::find_pipeline(spec)?
        .map(|d| d.defaults)
        .unwrap_or_default()
        .or(&folder.class_defaults());
    let s = &args.sampling;
    let options = crate::pipeline::text2motion::MotionOptions {
        frames: 0,
        sampler: s.sampler.or(defaults.sampler).unwrap_or(SamplerKind::Lcm),
        steps: s.steps.or(defaults.steps).unwrap_or(4),
        guidance: s.guidance.or(defaults.guidance).unwrap_or(7.5),
        seed: args.seed,
        gamma: s.tcd_gamma.or(defaults.tcd_gamma),
    };
    let (device, _) = args.runtime.resolve()?;
    let [captions, samples] = args.multimodality[..] else {
        bail!("--multimodality takes CAPTIONS,SAMPLES")
    };
    let report = super::motion_eval::run(&super::motion_eval::MotionEvalRun {
        model: dir,
        label: spec,
        data,
        evaluator,
        splits: &args.splits,
        samples: args.samples,
        options,
        multimodality_captions: captions,
        multimodality_samples: samples,
        baselines: args.baselines,
        device: &device,
    })?;
    let md = super::motion_eval::markdown(&report);
    crate::files::write_atomic(&args.output, &serde_json::to_vec_pretty(&report)?)?;
    let md_path = args.output.with_extension("md");
    crate::files::write_atomic(&md_path, md.as_bytes())?;
    print!("{md}");
    println!("wrote {} and {}", args.output.display(), md_path.display());
    Ok(())
}
