//! Times distillation steps on the fixture teacher (batch 8, Huber loss; beside
//! scripts/bench_lcd_step_torch.py) and serves as a profiling target for the training path.
use candle_core::{DType, Device};
use lcm::distill::{DistillConfig, TrainData, Trainer};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    lcm::runtime::init_threads(true);
    let fx = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = fx.join("tiny-sd/unet");
    let cfg = lcm::config::UNetConfig::load(&dir.join("config.json"))?;
    let files = lcm::source::weight_file(&dir)?;
    let teacher = lcm::unet::UNet2DConditionModel::new(
        &cfg,
        lcm::pipeline::load_weights(&files, DType::F32, &Device::Cpu)?,
    )?;
    let weights = candle_core::safetensors::load(&files[0], &Device::Cpu)?;
    let sched =
        lcm::config::SchedulerConfig::load(&fx.join("tiny-sd/scheduler/scheduler_config.json"))?;
    let g = candle_core::safetensors::load(fx.join("golden.safetensors"), &Device::Cpu)?;
    let data = TrainData {
        latents: g["lcd_z0"].clone(),
        prompt_embeds: g["lcd_prompt_embeds"].clone(),
        uncond_embeds: g["lcd_uncond_prompt_embeds"].narrow(0, 0, 1)?,
    };
    let c = DistillConfig {
        w_embed_dim: 32,
        batch_size: 8,
        warmup_steps: 0,
        huber_c: Some(0.001),
        ..Default::default()
    };
    let mut t = Trainer::new(
        &teacher,
        &teacher.config,
        &weights,
        lcm::schedule::NoiseSchedule::from_config(&sched)?,
        c,
        &Device::Cpu,
    )?;
    // One warm-up step, then five timed (as scripts/bench_lcd_step_torch.py does).
    let mut times = vec![];
    for i in 0..6 {
        let s = std::time::Instant::now();
        let m = t.train_step(&data)?;
        let dt = s.elapsed().as_secs_f64();
        eprintln!("step {} loss {:.5} {dt:.2}s", m.step, m.loss);
        if i > 0 {
            times.push(dt);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "median {:.3} s per step (batch 8), peak RSS {:.0} MB",
        times[times.len() / 2],
        lcm::runtime::peak_rss_bytes() as f64 / 1e6
    );
    Ok(())
}
