//! Times a few distillation steps on the fixture teacher (for profiling the training path).
use candle_core::{DType, Device};
use lcm::distill::{DistillConfig, TrainData, Trainer};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
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
        ..Default::default()
    };
    let mut t = Trainer::new(
        &teacher,
        &weights,
        lcm::schedule::NoiseSchedule::from_config(&sched)?,
        c,
        &Device::Cpu,
    )?;
    for _ in 0..3 {
        let s = std::time::Instant::now();
        let m = t.train_step(&data)?;
        eprintln!(
            "step {} loss {:.5} {:.2}s",
            m.step,
            m.loss,
            s.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
