//! The distillation trainer on the fixture teacher: finite losses, checkpoints, and a resumed run
//! that reproduces the uninterrupted one bit for bit.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lcm::config::{SchedulerConfig, UNetConfig};
use lcm::distill::{DistillConfig, TrainData, Trainer};
use lcm::pipeline::load_weights;
use lcm::schedule::NoiseSchedule;
use lcm::source::weight_file;
use lcm::unet::UNet2DConditionModel;

fn setup_teacher() -> (
    UNet2DConditionModel,
    std::collections::HashMap<String, Tensor>,
    NoiseSchedule,
) {
    let dir = fixtures().join("tiny-sd/unet");
    let cfg = UNetConfig::load(&dir.join("config.json")).unwrap();
    let files = weight_file(&dir).unwrap();
    let teacher = UNet2DConditionModel::new(
        &cfg,
        load_weights(&files, DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let weights = candle_core::safetensors::load(&files[0], &Device::Cpu).unwrap();
    let sched =
        SchedulerConfig::load(&fixtures().join("tiny-sd/scheduler/scheduler_config.json")).unwrap();
    (
        teacher,
        weights,
        NoiseSchedule::from_config(&sched).unwrap(),
    )
}

fn data() -> TrainData {
    TrainData {
        latents: g("lcd_z0"),
        prompt_embeds: g("lcd_prompt_embeds"),
        uncond_embeds: g("lcd_uncond_prompt_embeds").narrow(0, 0, 1).unwrap(),
    }
}

fn config() -> DistillConfig {
    DistillConfig {
        w_embed_dim: 32,
        batch_size: 2,
        grad_accum: 2,
        warmup_steps: 2,
        huber_c: Some(0.001),
        ..Default::default()
    }
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_losses() {
    setup();
    let (teacher, weights, schedule) = setup_teacher();
    let run = std::env::temp_dir().join(format!("lcm-distill-{}", std::process::id()));
    let data = data();

    let mut a = Trainer::new(&teacher, &weights, schedule.clone(), config(), &Device::Cpu).unwrap();
    let mut losses = vec![];
    for _ in 0..4 {
        let m = a.train_step(&data).unwrap();
        assert!(m.loss.is_finite() && m.grad_norm.is_finite(), "{m:?}");
        losses.push(m.loss);
        if m.step == 2 {
            a.save_checkpoint(&run).unwrap();
        }
    }
    assert!(
        losses.windows(2).any(|w| w[0] != w[1]),
        "losses never changed: {losses:?}"
    );

    let mut b = Trainer::new(&teacher, &weights, schedule.clone(), config(), &Device::Cpu).unwrap();
    let latest = lcm::checkpoint::latest(&run)
        .unwrap()
        .expect("checkpoint written");
    b.resume(&latest).unwrap();
    assert_eq!(b.step, 2);
    let resumed: Vec<f64> = (0..2).map(|_| b.train_step(&data).unwrap().loss).collect();
    assert_eq!(
        resumed,
        losses[2..],
        "resumed losses differ from the uninterrupted run"
    );

    // A checkpoint made with other settings is refused.
    let other = DistillConfig {
        ema: 0.5,
        ..config()
    };
    let mut c = Trainer::new(&teacher, &weights, schedule, other, &Device::Cpu).unwrap();
    assert!(c.resume(&latest).is_err());
    std::fs::remove_dir_all(run).ok();
}
