//! The distillation trainer on the fixture teacher: finite losses, checkpoints, and a resumed run
//! that reproduces the uninterrupted one bit for bit.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use image::GenericImageView;
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

    let mut a = Trainer::new(
        &teacher,
        &teacher.config,
        &weights,
        schedule.clone(),
        config(),
        &Device::Cpu,
    )
    .unwrap();
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

    let mut b = Trainer::new(
        &teacher,
        &teacher.config,
        &weights,
        schedule.clone(),
        config(),
        &Device::Cpu,
    )
    .unwrap();
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
    let mut c = Trainer::new(
        &teacher,
        &teacher.config,
        &weights,
        schedule,
        other,
        &Device::Cpu,
    )
    .unwrap();
    assert!(c.resume(&latest).is_err());
    std::fs::remove_dir_all(run).ok();
}

#[test]
fn distill_cli_trains_checkpoints_resumes_and_exports_a_generating_pipeline() {
    let root = std::env::temp_dir().join(format!("lcm-distill-cli-{}", std::process::id()));
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut meta = String::new();
    for (i, (name, rgb)) in [
        ("red", [220u8, 30, 30]),
        ("green", [30, 200, 40]),
        ("blue", [20, 40, 230]),
        ("yellow", [230, 220, 20]),
    ]
    .iter()
    .enumerate()
    {
        let mut img = image::RgbImage::from_pixel(40, 32, image::Rgb([250, 250, 250]));
        for y in 8..24 {
            for x in (8 + 4 * i as u32)..(24 + 4 * i as u32) {
                img.put_pixel(x, y, image::Rgb(*rgb));
            }
        }
        img.save(data.join(format!("{name}.png"))).unwrap();
        meta += &format!("{{\"file_name\": \"{name}.png\", \"text\": \"a {name} square\"}}\n");
    }
    std::fs::write(data.join("corrupt.png"), b"\x89PNG broken").unwrap();
    meta += "{\"file_name\": \"corrupt.png\", \"text\": \"broken\"}\n";
    std::fs::write(data.join("metadata.jsonl"), meta).unwrap();

    let teacher = fixtures().join("tiny-sd");
    let run = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "distill",
            "--teacher",
            teacher.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--save-every",
            "2",
            "--w-embed-dim",
            "32",
            "--warmup-steps",
            "1",
            "--loss",
            "huber",
        ];
        args.extend_from_slice(extra);
        let o = lcm_bin(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let full = root.join("full");
    let stderr = run(&full, &[]);
    assert!(
        stderr.contains("corrupt.png") && stderr.contains("skipped 1"),
        "corrupt image not reported: {stderr}"
    );
    let l = losses(&full.join("metrics.jsonl"));
    assert_eq!(l.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(l.iter().all(|x| x.1.is_finite()));
    assert!(lcm::checkpoint::latest(&full.join("checkpoints"))
        .unwrap()
        .is_some());

    // Resume a copy of the run from its step-2 checkpoint: step 3 must match exactly.
    let resumed = root.join("resumed");
    let ck2 = full.join("checkpoints/checkpoint-00000002");
    let stderr = run(&resumed, &["--resume", ck2.to_str().unwrap()]);
    assert!(stderr.contains("step 2"), "{stderr}");
    assert_eq!(losses(&resumed.join("metrics.jsonl")), vec![l[2]]);

    // The output folder is an LCM pipeline that `lcm generate` runs with 4 steps.
    let png = root.join("out.png");
    let o = lcm_bin(&[
        "generate",
        "--model",
        full.to_str().unwrap(),
        "--prompt",
        "a red square",
        "--steps",
        "4",
        "--seed",
        "1",
        "--output",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("sampler lcm"));
    assert_eq!(image::open(&png).unwrap().dimensions(), (32, 32));
    std::fs::remove_dir_all(root).ok();
}
