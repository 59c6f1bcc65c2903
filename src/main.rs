//! The `lcm` command line: a thin shell that parses flags, calls the library and prints.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use lcm::pipeline::args::{ModelArgs, SamplingArgs};
use lcm::pipeline::source;
use lcm::pipeline::GenerateRequest;
use lcm::sample::noise::SeededNoise;

#[derive(Parser)]
#[command(
    name = "lcm",
    version,
    about = "Latent consistency models: few-step text-to-image on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a text prompt.
    Generate(GenerateArgs),
    /// Time the pipeline's components (text encoder, U-Net step, VAE decode, full run) and peak memory.
    Bench(lcm::tools::bench::BenchArgs),
    /// Distil a many-step teacher into a few-step LCM student (latent consistency distillation).
    Distill(lcm::distill::cli::DistillArgs),
    /// List the named pipelines (`--model NAME`).
    Models,
    /// Serve generation over HTTP (OpenAI images API, AUTOMATIC1111 txt2img, a browser page).
    Serve(lcm::serve::ServeArgs),
    /// Train a component from scratch (the project's own small model).
    #[command(subcommand)]
    Pretrain(PretrainCommand),
    /// Copy a diffusers-layout folder with its weights converted (e.g. to f16 for shipping); or
    /// convert a single-file SD1.x checkpoint (LDM layout) into a folder, or a folder into one.
    Convert {
        /// A diffusers folder, or a single-file checkpoint (.safetensors).
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Folder copies: f16 (default), bf16 or f32. Single-file conversions keep each
        /// tensor's stored dtype.
        #[arg(long)]
        dtype: Option<String>,
        /// `folder` (default) or `single-file` (one LDM-layout .safetensors from a folder).
        #[arg(long, default_value = "folder")]
        to: String,
        /// Single file in: a separate VAE file to use instead of the checkpoint's own.
        #[arg(long)]
        vae: Option<PathBuf>,
        /// Single file in: a diffusers folder whose component configs (and tokenizer) replace
        /// the inferred ones.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Generate images for the evaluation prompts and score them (FID, prompt accuracy, agreement).
    Eval(lcm::eval::run::EvalArgs),
    /// Whiten a VAE's latents (identity channel covariance, folded into its weights) and rewire a
    /// U-Net trained on the old latents as a starting point for fine-tuning.
    Whiten(lcm::tools::whiten::WhitenArgs),
    /// Write the project's own training data in the imagefolder layout.
    #[command(subcommand)]
    Data(DataCommand),
    /// Motion clips: render stick figures, convert between formats.
    #[command(subcommand)]
    Motion(lcm::tools::motion::MotionCommand),
}

#[derive(Subcommand)]
enum PretrainCommand {
    /// An AutoencoderKL (L1 reconstruction + KL) on the images alone.
    Vae(lcm::train::vae::VaeArgs),
    /// A CLIP-architecture text encoder, contrastively against an image tower over VAE latents.
    Text(lcm::train::text_encoder::TextArgs),
    /// A text-to-image teacher: ε-prediction U-Net + CLIP-architecture text encoder (trained
    /// jointly, or a frozen one from `pretrain text`).
    Unet(lcm::train::teacher::TeacherArgs),
    /// The evaluator behind `lcm eval`: a small classifier on real images only.
    Evaluator(lcm::eval::train::EvaluatorArgs),
    /// The motion evaluator: motion and caption encoders trained contrastively on ground truth
    /// (a HumanML3D-layout folder, e.g. from `lcm data motion`), with attribute heads.
    MotionEvaluator(lcm::eval::motion_train::MotionEvaluatorArgs),
    /// The motion VAE: a transformer autoencoder of HumanML3D features to a few latent tokens.
    MotionVae(lcm::train::motion_vae::MotionVaeArgs),
    /// The latent motion teacher: a transformer denoiser over a frozen motion VAE's latents,
    /// conditioned on MiniLM sentence embeddings, with caption dropout for CFG.
    MotionTeacher(lcm::train::motion_teacher::MotionTeacherArgs),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Procedural coloured shapes with exact attributes and captions (deterministic per seed).
    Shapes {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 10000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        size: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Noto emoji from an unpacked `npm pack emoji-datasource-google` (its `package/` folder).
    Emoji {
        #[arg(long)]
        package: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 64)]
        size: u32,
        /// Every N-th emoji (by file name) goes to the held-out split.
        #[arg(long, default_value_t = 10)]
        heldout_every: usize,
    },
    /// Text-to-motion data in HumanML3D's layout: the real clips retargeted, and programs
    /// composed of them with captions (docs/motion.md).
    Motion {
        /// The real clips (a folder made by scripts/fetch_motion.sh).
        #[arg(long, default_value = "data/motion-src")]
        source: PathBuf,
        /// Fetch the clips into --source first (pip download, apt-get download).
        #[arg(long)]
        fetch: bool,
        #[arg(long)]
        out: PathBuf,
        /// Procedural samples to write.
        #[arg(long, default_value_t = 3000)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Random seed; a random one is drawn (and printed) when absent.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Initial latents: a safetensors file with a tensor `latents` of shape [n, c, h/f, w/f].
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Image-to-image: the image to start from (PNG or JPEG), resized to --width/--height if
    /// given (else kept at its size, rounded down to the VAE's cell).
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// Image-to-image: how much of the schedule runs, in (0, 1]; higher changes more (default 0.8).
    #[arg(long)]
    strength: Option<f64>,
    /// Image-to-image: start from the VAE posterior's mean rather than a sample of it.
    #[arg(long)]
    init_mean: bool,
    /// Motion models: the motion's length in seconds (up to the model's window).
    #[arg(long)]
    seconds: Option<f64>,
    /// Images: .png. Motion: .bvh, .json (joints), .npy (HumanML3D features), .gif or .png.
    #[arg(long, default_value = "out.png")]
    output: PathBuf,
    #[command(flatten)]
    runtime: lcm::runtime::RuntimeArgs,
}

// Large tensors are allocated and freed every layer; glibc returns them to the OS and page-faults
// them back in (≈30% of CPU time measured). mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, but with what clap lists below its first line (e.g. the missing
            // flags); the usage block and the --help hint are dropped.
            let text = e.to_string();
            let line: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("{}", line.join(" "));
            return ExitCode::from(2);
        }
    };
    lcm::runtime::init_threads();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Bench(args) => lcm::tools::bench::run(&args),
        Command::Distill(args) => lcm::distill::cli::run(&args),
        Command::Models => models(),
        Command::Serve(args) => lcm::serve::run_cli(&args),
        Command::Convert {
            input,
            output,
            dtype,
            to,
            vae,
            config,
        } => convert(
            &input,
            &output,
            dtype.as_deref(),
            &to,
            vae.as_deref(),
            config.as_deref(),
        ),
        Command::Pretrain(PretrainCommand::Vae(args)) => lcm::train::vae::run(&args),
        Command::Pretrain(PretrainCommand::Text(args)) => lcm::train::text_encoder::run(&args),
        Command::Pretrain(PretrainCommand::Unet(args)) => lcm::train::teacher::run(&args),
        Command::Pretrain(PretrainCommand::Evaluator(args)) => lcm::eval::train::run(&args),
        Command::Pretrain(PretrainCommand::MotionVae(args)) => lcm::train::motion_vae::run(&args),
        Command::Pretrain(PretrainCommand::MotionTeacher(args)) => {
            lcm::train::motion_teacher::run(&args)
        }
        Command::Pretrain(PretrainCommand::MotionEvaluator(args)) => {
            lcm::eval::motion_train::run(&args)
        }
        Command::Eval(args) => lcm::eval::run::run(&args),
        Command::Whiten(args) => lcm::tools::whiten::run(&args),
        Command::Motion(cmd) => lcm::tools::motion::run(&cmd),
        Command::Data(DataCommand::Shapes {
            out,
            count,
            size,
            seed,
        }) => lcm::data::toy::write_shapes(&out, count, size, seed),
        Command::Data(DataCommand::Emoji {
            package,
            out,
            size,
            heldout_every,
        }) => lcm::data::toy::write_emoji(&package, &out, size, heldout_every),
        Command::Data(DataCommand::Motion {
            source,
            fetch,
            out,
            count,
            seed,
        }) => lcm::data::motion::run_cli(&source, fetch, &out, count, seed),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error chain on one line. candle appends a backtrace to its messages when RUST_BACKTRACE is
/// set: keep only the first line of each cause.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        let first = msg.lines().next().unwrap_or("").trim().to_string();
        if !first.is_empty() && !parts.iter().any(|p| p.contains(&first)) {
            parts.push(first);
        }
    }
    parts.join(": ")
}

fn models() -> Result<()> {
    for def in source::builtin_pipelines()? {
        let from = def.repo.or(def.path).unwrap_or_default();
        println!("{:<12} {:<40} {}", def.name, from, def.description);
    }
    Ok(())
}

/// `lcm convert`: folder to folder (dtype), single file to folder, folder to single file.
fn convert(
    input: &std::path::Path,
    output: &std::path::Path,
    dtype: Option<&str>,
    to: &str,
    vae: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
) -> Result<()> {
    use lcm::pipeline::single_file;
    if !input.exists() {
        anyhow::bail!("--input {}: no such file or folder", input.display())
    }
    let single_in = !input.is_dir();
    let single_out = match to {
        "folder" => false,
        "single-file" => true,
        other => anyhow::bail!("--to {other:?}: folder or single-file"),
    };
    if (single_in || single_out) && dtype.is_some() {
        anyhow::bail!("--dtype: single-file conversions keep each tensor's stored dtype")
    }
    if !single_in && (vae.is_some() || config.is_some()) {
        anyhow::bail!("--vae and --config are for converting a single-file checkpoint")
    }
    match (single_in, single_out) {
        (false, false) => {
            let dt = lcm::runtime::parse_dtype(dtype.unwrap_or("f16"))?;
            source::convert_folder(input, output, dt)
        }
        (true, false) => {
            let s = single_file::to_folder(input, output, single_file::Options { vae, config })?;
            println!(
                "{} tensors{} → {} ({})",
                s.tensors,
                if s.ignored > 0 {
                    format!(" ({} others, e.g. EMA copies, left out)", s.ignored)
                } else {
                    String::new()
                },
                output.display(),
                if s.lcm { "an LCM" } else { "Stable Diffusion" }
            );
            Ok(())
        }
        (false, true) => {
            let n = single_file::from_folder(input, output)?;
            println!("{n} tensors → {}", output.display());
            Ok(())
        }
        (true, true) => anyhow::bail!("--input {} is already a single file", input.display()),
    }
}

/// `lcm generate` with a motion model.
fn generate_motion(args: &GenerateArgs, spec: &str, dir: &std::path::Path) -> Result<()> {
    let unused = [
        ("--width", args.width.is_some()),
        ("--height", args.height.is_some()),
        ("--latents", args.latents.is_some()),
        ("--lora", args.model.lora.is_some()),
    ];
    if let Some((flag, _)) = unused.iter().find(|u| u.1) {
        anyhow::bail!("{flag} is for image models; {spec} makes motion")
    }
    let (device, _) = args.runtime.resolve()?;
    let defaults = source::find_pipeline(spec)?
        .map(|d| d.defaults)
        .unwrap_or_default();
    lcm::tools::motion::generate(&lcm::tools::motion::GenerateMotion {
        label: spec,
        dir,
        prompt: &args.prompt,
        negative_prompt: args.negative_prompt.as_deref(),
        sampler: args.sampling.sampler.or(defaults.sampler),
        steps: args.sampling.steps.or(defaults.steps),
        guidance: args.sampling.guidance.or(defaults.guidance),
        seconds: args.seconds.or(defaults.seconds).unwrap_or(4.0),
        seed: args.seed.unwrap_or_else(rand::random),
        gamma: args.sampling.tcd_gamma.or(defaults.tcd_gamma),
        n: args.n,
        output: &args.output,
        device: &device,
    })
}

fn generate(args: GenerateArgs) -> Result<()> {
    let spec = args.model.spec()?;
    if let Some(dir) = source::local_dir(&spec)? {
        if lcm::pipeline::text2motion::is_motion_folder(&dir) {
            return generate_motion(&args, &spec, &dir);
        }
    }
    if args.seconds.is_some() {
        anyhow::bail!("--seconds is for motion models; {spec} makes images")
    }
    let (device, dtype) = args.runtime.resolve_for_inference()?;
    let t_load = Instant::now();
    let (resolved, pipe) = args.model.open(&device, dtype)?;
    let defaults = &resolved.defaults;
    let load_time = t_load.elapsed();
    let latents = match &args.latents {
        Some(p) => Some(lcm::pipeline::read_latents(p, &device)?),
        None => None,
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    let init_image = match &args.init_image {
        Some(p) => {
            let bytes =
                std::fs::read(p).with_context(|| format!("--init-image {}", p.display()))?;
            let img = lcm::pipeline::image_io::decode_rgb(
                &bytes,
                &format!("--init-image {}", p.display()),
            )?;
            Some(lcm::pipeline::image_io::init_image_tensor(
                &img,
                args.width,
                args.height,
                pipe.vae_scale_factor(),
            )?)
        }
        None => None,
    };
    if init_image.is_none() && args.init_mean {
        anyhow::bail!("--init-mean needs an --init-image")
    }
    // The init image fixes the size when --width/--height are not given.
    let (width, height) = match &init_image {
        Some(t) => (Some(t.dim(3)?), Some(t.dim(2)?)),
        None => (args.width, args.height),
    };
    let req = GenerateRequest {
        negative_prompt: args.negative_prompt.clone(),
        width,
        height,
        n: args.n,
        latents,
        init_image,
        strength: args.strength,
        init_mean: args.init_mean,
        ..args.sampling.request(&args.prompt, seed)
    };
    let settings = pipe.resolve(&req, defaults)?;
    let paths = lcm::pipeline::image_io::numbered_paths(&args.output, args.n);
    // Before the work, not after it.
    for p in &paths {
        lcm::files::check_output(p)?;
    }

    let bar = ProgressBar::new(settings.timesteps.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{elapsed_precise}] {per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    let mut noise = SeededNoise::new(seed);
    let gen = pipe.generate(&req, defaults, &mut noise, &mut |ev| {
        bar.set_message(format!("t={}", ev.timestep));
        bar.inc(1);
    })?;
    bar.finish_and_clear();

    for (img, path) in gen.images.iter().zip(&paths) {
        lcm::pipeline::image_io::save_png(img, path)?;
    }
    let s = &gen.settings;
    let t = &gen.timings;
    println!(
        "model {} | sampler {} | steps {} | guidance {} | seed {} | {}x{} | n {}",
        resolved.label, s.sampler, s.steps, s.guidance, seed, s.width, s.height, args.n
    );
    if device.is_cpu() {
        println!("kernels: {}", lcm::kernels::cpu::path(dtype));
    }
    println!(
        "time: load {:.3}s, text encode {:.3}s, denoise {:.3}s ({:.3}s/step), decode {:.3}s, total {:.3}s",
        load_time.as_secs_f64(),
        t.text_encode.as_secs_f64(),
        t.denoise.as_secs_f64(),
        t.denoise.as_secs_f64() / s.timesteps.len() as f64,
        t.decode.as_secs_f64(),
        t.total.as_secs_f64()
    );
    for p in &paths {
        println!("wrote {}", p.display());
    }
    Ok(())
}
