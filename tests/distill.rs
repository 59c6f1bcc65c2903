//! The distillation trainer on the fixture teacher: finite losses, checkpoints, and a resumed run
//! that reproduces the uninterrupted one bit for bit.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use image::GenericImageView;
use lcm::distill::student::{Student, UNetStudent};
use lcm::distill::{distillation, DistillConfig, Distillation, TrainData};
use lcm::model::config::{SchedulerConfig, UNetConfig};
use lcm::model::folder::weight_files;
use lcm::model::unet::UNet2DConditionModel;
use lcm::model::weights::load_weights;
use lcm::sample::schedule::NoiseSchedule;
use lcm::train::run::Task;
use lcm::train::state::TrainOptions;

fn setup_teacher() -> (
    UNet2DConditionModel,
    std::collections::HashMap<String, Tensor>,
    NoiseSchedule,
) {
    let dir = fixtures().join("tiny-sd/unet");
    let cfg = UNetConfig::load(&dir.join("config.json")).unwrap();
    let files = weight_files(&dir).unwrap();
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

/// A distillation of the fixture teacher into a U-Net student with `config`, on the golden data.
fn trainer<'t>(
    teacher: &'t UNet2DConditionModel,
    weights: &std::collections::HashMap<String, Tensor>,
    schedule: NoiseSchedule,
    config: DistillConfig,
) -> Result<Distillation<'t>, anyhow::Error> {
    let student = UNetStudent::new(
        &teacher.config,
        config.student_w_embed(),
        config.objective.flow_condition().is_some(),
    );
    distillation(
        teacher,
        Box::new(student),
        weights,
        schedule,
        config,
        data(),
        &Device::Cpu,
    )
}

fn config() -> DistillConfig {
    DistillConfig {
        w_embed_dim: 32,
        batch_size: 2,
        options: TrainOptions {
            grad_accum: 2,
            warmup_steps: 2,
            ..Default::default()
        },
        huber_c: Some(0.001),
        ..Default::default()
    }
}

#[test]
fn resumed_run_reproduces_the_uninterrupted_losses() {
    setup();
    let (teacher, weights, schedule) = setup_teacher();
    let run = std::env::temp_dir().join(format!("lcm-distill-{}", std::process::id()));

    let mut a = trainer(&teacher, &weights, schedule.clone(), config()).unwrap();
    let mut losses = vec![];
    for _ in 0..4 {
        let m = a.step().unwrap();
        assert!(m.loss.is_finite() && m.grad_norm.is_finite(), "{m:?}");
        losses.push(m.loss);
        if m.step == 2 {
            a.save(&run).unwrap();
        }
    }
    assert!(
        losses.windows(2).any(|w| w[0] != w[1]),
        "losses never changed: {losses:?}"
    );

    let mut b = trainer(&teacher, &weights, schedule.clone(), config()).unwrap();
    let latest = lcm::train::checkpoint::latest(&run.join("checkpoints"))
        .unwrap()
        .expect("checkpoint written");
    b.resume(&latest, &Device::Cpu).unwrap();
    assert_eq!(b.state.step, 2);
    let resumed: Vec<f64> = (0..2).map(|_| b.step().unwrap().loss).collect();
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
    let mut c = trainer(&teacher, &weights, schedule.clone(), other).unwrap();
    assert!(c.resume(&latest, &Device::Cpu).is_err());

    // Offset noise changes what the first step sees (same seed, same rows, solver indices and
    // w), and still trains.
    let offset = DistillConfig {
        noise_offset: 0.2,
        ..config()
    };
    let mut d = trainer(&teacher, &weights, schedule.clone(), offset).unwrap();
    let m = d.step().unwrap();
    assert!(
        m.loss.is_finite() && m.loss != losses[0],
        "{m:?} vs {losses:?}"
    );

    // --decay-from: past the warm-up the rate falls linearly to a tenth at the last step, and a
    // checkpoint made without it is refused (the settings differ).
    let decayed = DistillConfig {
        options: TrainOptions {
            decay: Some((2, 4)),
            ..config().options
        },
        ..config()
    };
    let mut e = trainer(&teacher, &weights, schedule, decayed.clone()).unwrap();
    assert!(e.resume(&latest, &Device::Cpu).is_err());
    let lrs: Vec<f64> = (0..4).map(|_| e.step().unwrap().lr).collect();
    let lr = decayed.options.adamw.lr;
    let want = [lr * 0.5, lr, lr * 0.55, lr * 0.1];
    for (got, want) in lrs.iter().zip(want) {
        assert!(
            (got - want).abs() < 1e-15 * lr.max(1.0),
            "{lrs:?} vs {want}"
        );
    }
    assert!(DistillConfig {
        options: TrainOptions {
            decay: Some((4, 4)),
            ..config().options
        },
        ..config()
    }
    .check()
    .is_err());
    // The flow-map knobs are refused for an LCM, whose every jump goes to the data.
    let lcd_with = |c: DistillConfig| c.check().unwrap_err().to_string();
    let mix = lcd_with(DistillConfig {
        end_mix: "2:1:1".parse().unwrap(),
        ..config()
    });
    assert!(mix.contains("--end-mix 2:1:1"), "{mix}");
    let units = lcd_with(DistillConfig {
        flow_loss: lcm::distill::flowmap::LossUnits::X0,
        ..config()
    });
    assert!(units.contains("--flow-loss"), "{units}");
    std::fs::remove_dir_all(run).ok();
}

/// The EMA target network reads the EMA's current weights: after a few steps it predicts what a
/// network built afresh from them predicts, and not what it predicted at the start (a layer
/// that kept a copy of its weights, such as a transposed one for speed, would go stale).
#[test]
fn the_target_network_follows_the_ema() {
    setup();
    let (teacher, weights, schedule) = setup_teacher();
    let mut a = trainer(&teacher, &weights, schedule, config()).unwrap();
    let d = data();
    let x = d.latents.narrow(0, 0, 1).unwrap();
    let cond = d.prompt_embeds.narrow(0, 0, 1).unwrap();
    let w = Tensor::randn(0f32, 1.0, (1, config().w_embed_dim), &Device::Cpu).unwrap();
    let eps = |net: &dyn lcm::sample::denoiser::Denoiser| {
        net.predict_eps(&x, &[499], &cond, Some(&w)).unwrap()
    };
    let before = eps(a.task.target());
    for _ in 0..3 {
        a.step().unwrap();
    }
    let student = UNetStudent::new(&teacher.config, config().student_w_embed(), false);
    let ema = a.state.ema_weights().unwrap();
    let fresh = student
        .build(candle_nn::VarBuilder::from_tensors(
            ema,
            DType::F32,
            &Device::Cpu,
        ))
        .unwrap();
    let after = eps(a.task.target());
    assert!(
        max_abs(&(&after - &before).unwrap()) > 1e-6,
        "the EMA never moved"
    );
    let gap = max_abs(&(&after - eps(fresh.as_ref())).unwrap());
    assert!(gap < 1e-6, "target vs a fresh build from the EMA: {gap}");
}

/// Flow-map distillation through the same trainer: the student's end-time embedding starts at
/// zero (so at step 0 the end time changes nothing), losses are finite and move, a resumed run
/// reproduces the uninterrupted one, the settings name the objective, and LoRA is refused.
#[test]
fn flow_map_distillation_starts_at_its_source_and_resumes_exactly() {
    use lcm::distill::Objective;
    use lcm::sample::denoiser::Denoiser;
    use lcm::sample::flowmap::CLEAN;
    setup();
    let (teacher, weights, schedule) = setup_teacher();
    let run = std::env::temp_dir().join(format!("lcm-distill-flow-{}", std::process::id()));
    let flow = || DistillConfig {
        objective: Objective::FlowMap,
        ..config()
    };
    let mut a = trainer(&teacher, &weights, schedule.clone(), flow()).unwrap();
    assert_eq!(a.task.settings()["config"]["objective"], "flow-map");
    assert_eq!(a.task.settings()["student"]["end_time_embedding"], true);
    let w = a.state.weights();
    let end = &w["time_embedding.end_proj.weight"];
    assert_eq!(
        end.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    let mut cfg = teacher.config.clone();
    cfg.time_cond_proj_dim = Some(32);
    cfg.end_time_embedding = true;
    let student = UNet2DConditionModel::new(
        &cfg,
        candle_nn::VarBuilder::from_tensors(w, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let x = g("lcd_z0").narrow(0, 0, 2).unwrap();
    let c = g("lcd_prompt_embeds").narrow(0, 0, 2).unwrap();
    let wemb =
        lcm::nn::guidance_embedding(&Tensor::new(&[3f32, 7.0], &Device::Cpu).unwrap(), 32).unwrap();
    let to = |e| {
        student
            .predict_jump_eps(&x, &[999, 500], &[e, e], &c, Some(&wemb))
            .unwrap()
    };
    assert_eq!(max_abs(&(to(CLEAN) - to(400)).unwrap()), 0.0);

    let mut losses = vec![];
    for _ in 0..4 {
        let m = a.step().unwrap();
        assert!(m.loss.is_finite() && m.grad_norm.is_finite(), "{m:?}");
        losses.push(m.loss);
        if m.step == 2 {
            a.save(&run).unwrap();
        }
    }
    assert!(losses.windows(2).any(|w| w[0] != w[1]), "{losses:?}");
    let mut b = trainer(&teacher, &weights, schedule.clone(), flow()).unwrap();
    let latest = lcm::train::checkpoint::latest(&run.join("checkpoints"))
        .unwrap()
        .expect("checkpoint written");
    b.resume(&latest, &Device::Cpu).unwrap();
    let resumed: Vec<f64> = (0..2).map(|_| b.step().unwrap().loss).collect();
    assert_eq!(resumed, losses[2..]);
    // An LCD run cannot resume a flow-map checkpoint (the settings differ).
    let mut lcd = trainer(&teacher, &weights, schedule, config()).unwrap();
    assert!(lcd.resume(&latest, &Device::Cpu).is_err());
    let lora = DistillConfig {
        lora_rank: Some(4),
        ..flow()
    };
    assert!(lora.check().is_err());
    std::fs::remove_dir_all(run).ok();
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Four coloured squares with captions plus one corrupt PNG, as an imagefolder under `root/data`.
fn write_squares(root: &std::path::Path) -> std::path::PathBuf {
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

    data
}

#[test]
fn distill_cli_trains_checkpoints_resumes_and_exports_a_generating_pipeline() {
    let root = std::env::temp_dir().join(format!("lcm-distill-cli-{}", std::process::id()));
    let data = write_squares(&root);
    let teacher = fixtures().join("tiny-sd");
    let distill = |out: &std::path::Path, steps: &str, w_dim: &str, extra: &[&str]| {
        let mut args = vec![
            "distill",
            "--teacher",
            teacher.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-steps",
            steps,
            "--batch-size",
            "2",
            "--save-every",
            "2",
            "--w-embed-dim",
            w_dim,
            "--warmup-steps",
            "1",
            "--loss",
            "huber",
        ];
        args.extend_from_slice(extra);
        lcm_bin(&args)
    };
    let run = |out: &std::path::Path, steps: &str, extra: &[&str]| {
        let o = distill(out, steps, "32", extra);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let full = root.join("full");
    let stderr = run(&full, "3", &[]);
    assert!(
        stderr.contains("corrupt.png") && stderr.contains("skipped 1"),
        "corrupt image not reported: {stderr}"
    );
    let l = losses(&full.join("metrics.jsonl"));
    assert_eq!(l.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(l.iter().all(|x| x.1.is_finite()));
    assert!(lcm::train::checkpoint::latest(&full.join("checkpoints"))
        .unwrap()
        .is_some());

    // Resume a copy of the run from its step-2 checkpoint: step 3 must match exactly.
    let resumed = root.join("resumed");
    let ck2 = full.join("checkpoints/checkpoint-00000002");
    let stderr = run(&resumed, "3", &["--resume", ck2.to_str().unwrap()]);
    assert!(stderr.contains("step 2"), "{stderr}");
    assert_eq!(losses(&resumed.join("metrics.jsonl")), vec![l[2]]);

    // --init starts the student from the finished run's LCM: with no steps to take, the export is
    // that LCM's U-Net, guidance embedding included, tensor for tensor.
    let unet_file = |dir: &std::path::Path| {
        candle_core::safetensors::load(
            dir.join("unet/diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
    };
    let continued = root.join("continued");
    run(&continued, "0", &["--init", full.to_str().unwrap()]);
    let (before, after) = (unet_file(&full), unet_file(&continued));
    assert_eq!(before.len(), after.len());
    assert!(before.keys().any(|k| k.contains("cond_proj")));
    for (name, t) in &before {
        let diff = max_abs_diff(t, &after[name]);
        assert_eq!(diff, 0.0, "{name} moved by {diff}");
    }
    // An init whose guidance embedding has another width, or a many-step U-Net, is refused with
    // a line naming the flag.
    for (init, dim, want) in [
        (&full, "16", "--w-embed-dim is 16"),
        (&teacher, "32", "not an LCM"),
    ] {
        let o = distill(
            &root.join("refused"),
            "1",
            dim,
            &["--init", init.to_str().unwrap()],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("--init") && err.contains(want),
            "{err}"
        );
    }

    // --dtype f16 runs the frozen teacher (U-Net, text encoder) in f16; the student stays f32, so
    // the first loss moves only by the teacher's rounding.
    let half = root.join("half");
    run(&half, "1", &["--sample-every", "0", "--dtype", "f16"]);
    let h = losses(&half.join("metrics.jsonl"))[0].1;
    println!("first loss: f32 teacher {}, f16 teacher {h}", l[0].1);
    // Measured: 0.070553 (f32) against 0.070500 (f16), 0.08 % apart.
    assert!(
        (h - l[0].1).abs() <= 0.01 * l[0].1,
        "f16 teacher loss {h} vs f32 {}",
        l[0].1
    );

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

    // --objective flow-map: the export says so in its config, and `lcm generate` samples it with
    // its own jumps by default, at any step count. An LCM has no jumps to take.
    let flow = root.join("flow");
    run(
        &flow,
        "2",
        &["--objective", "flow-map", "--sample-every", "0"],
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(flow.join("unet/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["end_time_embedding"], true);
    let generate = |model: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red square",
            "--seed",
            "1",
            "--output",
            png.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        lcm_bin(&args)
    };
    for steps in ["1", "4", "8"] {
        let o = generate(&flow, &["--steps", steps]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("sampler flowmap"));
    }
    // --tcd-gamma re-noises between the jumps: the same seed gives another image.
    let deterministic = image::open(&png).unwrap().to_rgb8();
    let o = generate(&flow, &["--steps", "8", "--tcd-gamma", "0.5"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(image::open(&png).unwrap().to_rgb8(), deterministic);
    let o = generate(&flow, &["--tcd-gamma", "1.5"]);
    assert!(!o.status.success());
    let o = generate(&full, &["--sampler", "flowmap"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a flow map"),
        "{err}"
    );
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn lora_mode_trains_only_adapters_and_resumes_exactly() {
    setup();
    let (teacher, weights, schedule) = setup_teacher();
    let run = std::env::temp_dir().join(format!("lcm-distill-lora-{}", std::process::id()));
    let cfg = || DistillConfig {
        lora_rank: Some(4),
        options: TrainOptions {
            adamw: lcm::train::optim::AdamWConfig {
                lr: 1e-3,
                ..Default::default()
            },
            ..config().options
        },
        ..config()
    };
    let new = || trainer(&teacher, &weights, schedule.clone(), cfg()).unwrap();
    let mut a = new();
    // No guidance embedding: the student has the teacher's own architecture.
    assert_eq!(
        a.task.settings()["student"]["time_cond_proj_dim"],
        serde_json::Value::Null
    );
    let modules = lcm::nn::lora::target_modules(&weights);
    let adapters = a.state.weights();
    assert_eq!(adapters.len(), 2 * modules.len());
    assert!(modules.iter().any(|m| m.ends_with("attn1.to_q")));
    assert!(modules.iter().any(|m| m.ends_with("resnets.0.conv1")));
    let mut losses = vec![];
    for _ in 0..4 {
        let m = a.step().unwrap();
        assert!(m.loss.is_finite(), "{m:?}");
        losses.push(m.loss);
        if m.step == 2 {
            a.save(&run).unwrap();
        }
    }
    // Only adapted weights moved; everything else is the teacher's, bit for bit.
    let student = a.task.student_weights(&a.state).unwrap();
    let mut moved = 0;
    for (k, w) in &weights {
        let same = max_abs_diff(&student[k], w) == 0.0;
        let adapted = modules.iter().any(|m| *k == format!("{m}.weight"));
        assert!(same || adapted, "{k} changed");
        moved += usize::from(!same);
    }
    assert_eq!(moved, modules.len(), "every adapted weight should move");

    let mut b = new();
    let latest = lcm::train::checkpoint::latest(&run.join("checkpoints"))
        .unwrap()
        .unwrap();
    b.resume(&latest, &Device::Cpu).unwrap();
    let resumed: Vec<f64> = (0..2).map(|_| b.step().unwrap().loss).collect();
    assert_eq!(resumed, losses[2..]);
    std::fs::remove_dir_all(run).ok();
}

#[test]
fn lora_cli_exports_an_adapter_that_generate_merges() {
    let root = std::env::temp_dir().join(format!("lcm-distill-lora-cli-{}", std::process::id()));
    let data = write_squares(&root);
    let teacher = fixtures().join("tiny-sd");
    let teacher = teacher.to_str().unwrap();
    let out = root.join("lora");
    let o = lcm_bin(&[
        "distill",
        "--teacher",
        teacher,
        // Two folders (here the same one twice): --data takes several.
        "--data",
        data.to_str().unwrap(),
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--lora-rank",
        "4",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--warmup-steps",
        "1",
        "--lr",
        "1e-2",
        "--sample-every",
        "0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = out.join(lcm::distill::LORA_FILE);
    let adapter = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    assert!(adapter
        .keys()
        .all(|k| k.starts_with("unet.") && k.contains(".lora.")));

    let generate = |name: &str, extra: &[&str]| -> (std::path::PathBuf, String) {
        let png = root.join(name);
        let mut args = vec![
            "generate",
            "--model",
            teacher,
            "--prompt",
            "a red square",
            "--seed",
            "3",
            "--output",
            png.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = lcm_bin(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (png, String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let f = file.to_str().unwrap();
    let (with, stdout) = generate("lora.png", &["--lora", f]);
    // LCM-LoRA sampling defaults: lcm, 4 steps, no CFG.
    assert!(
        stdout.contains("sampler lcm | steps 4 | guidance 1 "),
        "{stdout}"
    );
    let (zero, _) = generate("zero.png", &["--lora", f, "--lora-scale", "0"]);
    let (plain, _) = generate(
        "plain.png",
        &["--sampler", "lcm", "--steps", "4", "--guidance", "1"],
    );
    let px = |p: &std::path::Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(
        px(&zero),
        px(&plain),
        "scale 0 must leave the model as it was"
    );
    assert_ne!(px(&with), px(&plain), "the trained adapter changed nothing");

    // A file that is not an adapter is named.
    let o = lcm_bin(&[
        "generate",
        "--model",
        teacher,
        "--prompt",
        "x",
        "--lora",
        data.join("metadata.jsonl").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("metadata.jsonl"),
        "{err}"
    );
    std::fs::remove_dir_all(root).ok();
}
