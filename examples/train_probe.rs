//! Times distillation steps, beside scripts/bench_lcd_step_torch.py, and serves as a profiling
//! target for the training path:
//! - no arguments: full LCD on the fixture teacher (batch 8, Huber loss);
//! - `sd15-lora [RES]`: one LCM-LoRA step (rank 64) at SD1.5 size with random weights, batch 1,
//!   RES² images (default 256, i.e. 32×32 latents), f32;
//! - `--bf16` (with either): the frozen teacher's weights in bf16 on AMX tiles, as `lcm distill
//!   --dtype bf16` runs it; the student and its EMA target stay f32.
use candle_core::{DType, Device};
use lcm::distill::student::UNetStudent;
use lcm::distill::{distillation, DistillConfig, Distillation, TrainData};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    lcm::runtime::init_threads();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let bf16 = args.iter().any(|a| a == "--bf16");
    args.retain(|a| a != "--bf16");
    if bf16 && !lcm::kernels::amx::available() {
        anyhow::bail!(
            "--bf16 needs AMX tiles (this CPU: {})",
            lcm::kernels::cpu::path(DType::F32)
        )
    }
    let teacher_dtype = if bf16 { DType::BF16 } else { DType::F32 };
    println!("teacher: {}", lcm::kernels::cpu::path(teacher_dtype));
    if args.first().map(String::as_str) == Some("sd15-lora") {
        let res = args.get(1).map_or(Ok(256), |s| s.parse())?;
        return sd15_lora(res, teacher_dtype);
    }
    let fx = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = fx.join("tiny-sd/unet");
    let cfg = lcm::model::config::UNetConfig::load(&dir.join("config.json"))?;
    let files = lcm::model::folder::weight_files(&dir)?;
    let teacher = lcm::nn::build_for(&Device::Cpu, teacher_dtype, |dt| {
        let vb = lcm::model::weights::load_weights(&files, dt, &Device::Cpu)?;
        anyhow::Ok(lcm::model::unet::UNet2DConditionModel::new(&cfg, vb)?)
    })?;
    let weights = candle_core::safetensors::load(&files[0], &Device::Cpu)?;
    let sched = lcm::model::config::SchedulerConfig::load(
        &fx.join("tiny-sd/scheduler/scheduler_config.json"),
    )?;
    let g = candle_core::safetensors::load(fx.join("golden.safetensors"), &Device::Cpu)?;
    let data = TrainData {
        latents: g["lcd_z0"].clone(),
        prompt_embeds: g["lcd_prompt_embeds"].clone(),
        uncond_embeds: g["lcd_uncond_prompt_embeds"].narrow(0, 0, 1)?,
    };
    let c = DistillConfig {
        w_embed_dim: 32,
        batch_size: 8,
        options: Default::default(),
        huber_c: Some(0.001),
        ..Default::default()
    };
    let student = UNetStudent::new(&teacher.config, c.student_w_embed(), false);
    let mut t = distillation(
        &teacher,
        Box::new(student),
        &weights,
        lcm::sample::schedule::NoiseSchedule::from_config(&sched)?,
        c,
        data,
        &Device::Cpu,
    )?;
    let mut times = timed_steps(&mut t, 5)?;
    times.sort_by(f64::total_cmp);
    println!(
        "median {:.3} s per step (batch 8), peak RSS {:.0} MB",
        times[times.len() / 2],
        lcm::runtime::peak_rss_bytes() as f64 / 1e6
    );
    Ok(())
}

/// One warm-up and two timed LCM-LoRA steps at SD1.5 size (random weights: timing only).
fn sd15_lora(resolution: usize, teacher_dtype: DType) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let mut cfg: lcm::model::config::UNetConfig =
        serde_json::from_str(include_str!("../benches/sd15/unet.json"))?;
    cfg.time_cond_proj_dim = None; // the teacher: plain SD1.5
    let t0 = std::time::Instant::now();
    let weights = lcm::nn::init::init_weights(0, &dev, |vb| {
        lcm::model::unet::UNet2DConditionModel::new(&cfg, vb).map_err(candle_core::Error::wrap)
    })?;
    // As `lcm distill --lora-rank`: teacher, student and target share the base's transposed
    // linear weights (the teacher is built over the same tensors).
    let shared = lcm::nn::share_frozen();
    let teacher = lcm::nn::build_for(&dev, teacher_dtype, |dt| {
        lcm::model::unet::UNet2DConditionModel::new(
            &cfg,
            candle_nn::VarBuilder::from_tensors(weights.clone(), dt, &dev),
        )
    })?;
    eprintln!("random SD1.5 U-Net in {:.1}s", t0.elapsed().as_secs_f64());
    let lat = resolution / 8;
    let data = TrainData {
        latents: candle_core::Tensor::randn(0f32, 1.0, (4, 4, lat, lat), &dev)?,
        prompt_embeds: candle_core::Tensor::randn(0f32, 1.0, (4, 77, 768), &dev)?,
        uncond_embeds: candle_core::Tensor::randn(0f32, 1.0, (1, 77, 768), &dev)?,
    };
    // SD1.5's schedule (the defaults: 1000 steps, scaled-linear 0.00085 → 0.012).
    let sched: lcm::model::config::SchedulerConfig = serde_json::from_str("{}")?;
    let c = DistillConfig {
        batch_size: 1,
        options: Default::default(),
        huber_c: Some(0.001),
        lora_rank: Some(64),
        ..Default::default()
    };
    let student = UNetStudent::new(&cfg, c.student_w_embed(), false);
    let mut t = distillation(
        &teacher,
        Box::new(student),
        &weights,
        lcm::sample::schedule::NoiseSchedule::from_config(&sched)?,
        c,
        data,
        &dev,
    )?;
    drop(shared);
    let times = timed_steps(&mut t, 2)?;
    println!(
        "SD1.5 LCM-LoRA r64 at {resolution}²: mean {:.2} s per step (batch 1), peak RSS {:.0} MB",
        times.iter().sum::<f64>() / times.len() as f64,
        lcm::runtime::peak_rss_bytes() as f64 / 1e6
    );
    Ok(())
}

/// One warm-up step, then `n` timed ones; their durations in seconds.
fn timed_steps(t: &mut Distillation, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut times = vec![];
    for i in 0..=n {
        let s = std::time::Instant::now();
        let m = t.step()?;
        let dt = s.elapsed().as_secs_f64();
        eprintln!("step {} loss {:.5} {dt:.2}s", m.step, m.loss);
        if i > 0 {
            times.push(dt);
        }
    }
    Ok(times)
}
