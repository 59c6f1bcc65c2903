//! The motion networks on tiny configs: the VAE's masks, `lcm pretrain motion-vae` and
//! `motion-teacher`, and `lcm distill` of a motion teacher, end to end (learning, checkpoints,
//! bit-exact resumes, exported folders that load back and generate).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::*;
use lcm::model::motion_vae::{MotionVae, MotionVaeConfig};

fn tiny_vae_config() -> MotionVaeConfig {
    serde_json::from_value(serde_json::json!({
        "width": 32, "heads": 2, "ff": 64, "layers": 3,
        "latent_tokens": 2, "latent_channels": 8, "max_frames": 200
    }))
    .unwrap()
}

/// A small motion dataset built from the mocap excerpts in the fixtures.
fn motion_data(root: &Path) -> PathBuf {
    let out = root.join("data");
    lcm::data::motion::build(
        &fixtures().join("mocap"),
        &out,
        &lcm::data::motion::BuildOptions {
            count: 400,
            seed: 5,
        },
    )
    .unwrap();
    out
}

/// A clip decoded alone equals the same clip decoded beside a longer one (its padding masked),
/// with a token per frame and with frames pooled 4 to a token (30 frames: not a whole number of
/// tokens).
#[test]
fn padding_is_invisible_to_the_motion_vae() -> anyhow::Result<()> {
    for downsample in [1, 4] {
        let mut cfg = tiny_vae_config();
        cfg.downsample = downsample;
        padding_is_invisible(&cfg)?;
    }
    Ok(())
}

fn padding_is_invisible(cfg: &MotionVaeConfig) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg = cfg.clone();
    let w = lcm::nn::init::init_weights(2, &dev, |vb| {
        MotionVae::new(&cfg, vb).map_err(candle_core::Error::wrap)
    })?;
    let vae = MotionVae::new(&cfg, VarBuilder::from_tensors(w, DType::F32, &dev))?;
    let short = Tensor::randn(0f32, 1.0, (1, 30, 263), &dev)?;
    let long = Tensor::randn(0f32, 1.0, (1, 50, 263), &dev)?;
    let padded = Tensor::cat(&[short.pad_with_zeros(1, 0, 20)?, long], 0)?;
    let mut valid = vec![0f32; 100];
    valid[..30].fill(1.0);
    valid[50..].fill(1.0);
    let valid = Tensor::from_vec(valid, (2, 50), &dev)?;

    let alone = vae.encode(&short, None)?.mean;
    let batch = vae.encode(&padded, Some(&valid))?.mean;
    assert!(max_abs_diff(&alone, &batch.narrow(0, 0, 1)?) < 1e-5);
    let z = Tensor::randn(0f32, 1.0, (2, 2, 8), &dev)?;
    let a = vae.decode(&z.narrow(0, 0, 1)?, 30, None)?;
    let b = vae
        .decode(&z, 50, Some(&valid))?
        .narrow(0, 0, 1)?
        .narrow(1, 0, 30)?;
    assert!(max_abs_diff(&a, &b) < 1e-5);
    // Lengths beyond the config are refused with the bound named.
    let Err(e) = vae.decode(&z, 201, None) else {
        panic!("201 frames were accepted")
    };
    assert!(e.to_string().contains("1 to 200 frames"), "{e}");
    Ok(())
}

#[test]
fn motion_vae_teacher_and_student_train_resume_and_export() {
    setup();
    let root = std::env::temp_dir().join(format!("lcm-motion-vae-{}", std::process::id()));
    let data = motion_data(&root);
    std::fs::create_dir_all(&root).unwrap();
    let config = root.join("config.json");
    std::fs::write(&config, serde_json::to_vec(&tiny_vae_config()).unwrap()).unwrap();
    let run = |out: &Path, steps: &str, extra: &[&str]| {
        let mut args = vec![
            "pretrain",
            "motion-vae",
            "--config",
            config.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-steps",
            steps,
            "--batch-size",
            "4",
            "--warmup-steps",
            "1",
        ];
        args.extend_from_slice(extra);
        lcm_bin(&args)
    };
    let cadence = ["--save-every", "2", "--sample-every", "2"];
    let a = root.join("a");
    ok(run(&a, "4", &cadence));
    let full = losses(&a.join("metrics.jsonl"));
    assert_eq!(full.len(), 4);
    for p in [
        "checkpoints/checkpoint-00000002",
        "samples/step-00000002.png",
        "motion_vae/config.json",
        "motion_vae/diffusion_pytorch_model.safetensors",
        "motion_vae/Mean.npy",
        "motion_vae/Std.npy",
        "motion_vae/reconstruction.json",
    ] {
        assert!(a.join(p).exists(), "missing {p}");
    }
    // Resuming from step 2 reproduces steps 3 and 4 exactly (augmentation draws included).
    let b = root.join("b");
    let ck = a.join("checkpoints/checkpoint-00000002");
    let mut resume = cadence.to_vec();
    resume.extend(["--resume", ck.to_str().unwrap()]);
    ok(run(&b, "4", &resume));
    assert_eq!(losses(&b.join("metrics.jsonl")), full[2..]);
    // Resumed into its own folder (as after a crash), a run's log holds each step once.
    let mut again = cadence.to_vec();
    again.extend(["--resume", ck.to_str().unwrap()]);
    ok(run(&a, "4", &again));
    assert_eq!(losses(&a.join("metrics.jsonl")), full);
    // The root-relative joint loss is a setting of its own: a checkpoint made without it is
    // refused by a run with it, and it changes the loss from the same draws.
    let c = root.join("c");
    let mut local = resume.clone();
    local.extend(["--local-joint-weight", "1"]);
    let e = run(&c, "4", &local);
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("different settings"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
    ok(run(
        &c,
        "2",
        &["--local-joint-weight", "1", "--save-every", "2"],
    ));
    let with_local = losses(&c.join("metrics.jsonl"));
    assert!(with_local[0].1 > full[0].1, "{with_local:?} vs {full:?}");
    // The ground frame (heights kept) is a setting too: refused against the root frame's
    // checkpoint, and from the same draws its loss differs (the heights are in it).
    let c2 = c.join("checkpoints/checkpoint-00000002");
    let e = run(
        &root.join("g"),
        "4",
        &[
            "--local-joint-weight",
            "1",
            "--local-frame",
            "ground",
            "--resume",
            c2.to_str().unwrap(),
        ],
    );
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("different settings"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
    ok(run(
        &root.join("g"),
        "2",
        &["--local-joint-weight", "1", "--local-frame", "ground"],
    ));
    let ground = losses(&root.join("g").join("metrics.jsonl"));
    assert_ne!(ground[0].1, with_local[0].1, "the frame changed nothing");
    // So is the quadratic reconstruction loss: d²/2c ≥ √(d² + c²) − c for every error, so from
    // the same draws and weights its first loss is the larger.
    let l2 = root.join("l2");
    ok(run(&l2, "1", &["--recon-loss", "l2"]));
    let with_l2 = losses(&l2.join("metrics.jsonl"));
    assert!(with_l2[0].1 > full[0].1, "{with_l2:?} vs {full:?}");
    // Training can go on from an exported VAE (fresh optimizer and schedule): from the same
    // seed its first batch is run a's first, which a's trained weights fit better than a seeded
    // init. A folder whose tensors do not fit is refused in one line naming --init.
    let i = root.join("init");
    let exported = a.join("motion_vae");
    ok(run(&i, "1", &["--init", exported.to_str().unwrap()]));
    let from_init = losses(&i.join("metrics.jsonl"));
    assert!(from_init[0].1 < full[0].1, "{from_init:?} vs {full:?}");
    let e = run(
        &root.join("init-bad"),
        "1",
        &["--init", data.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("--init") && err.lines().count() == 1,
        "{err}"
    );
    // `--keep-checkpoints 2` keeps the newest two; a half-written checkpoint a killed run left
    // behind is removed at the next save.
    let d = root.join("d");
    std::fs::create_dir_all(d.join("checkpoints/.checkpoint-00000001.tmp99")).unwrap();
    ok(run(
        &d,
        "4",
        &["--save-every", "1", "--keep-checkpoints", "2"],
    ));
    let mut kept: Vec<String> = std::fs::read_dir(d.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["checkpoint-00000003", "checkpoint-00000004"]);
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(a.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(
        line["local_joint_error_cm"].as_f64().unwrap() > 0.0,
        "{line}"
    );

    // The exported folder loads and reconstructs a held-out clip as the report says.
    let (vae, norm) = lcm::model::motion_vae::open(&a.join("motion_vae"), &Device::Cpu).unwrap();
    assert_eq!(vae.config, tiny_vae_config());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("motion_vae/reconstruction.json")).unwrap())
            .unwrap();
    let test = lcm::data::humanml3d::load(&data, "test", &Default::default()).unwrap();
    let clips: Vec<Vec<f32>> = test.clips.iter().map(|c| c.features.clone()).collect();
    let again = lcm::train::motion_vae::reconstruction(&vae, &norm, &clips, &Device::Cpu).unwrap();
    let (x, y) = (
        again["mpjpe_cm"].as_f64().unwrap(),
        report["test"]["mpjpe_cm"].as_f64().unwrap(),
    );
    assert!((x - y).abs() < 1e-3 * y.max(1.0), "{x} vs {y}");
    assert!(report["test"]["mpjpe_root_aligned_cm"].as_f64().unwrap() > 0.0);
    // Gesture counts: the share is over the clips that have a gesture (none: no share); flights
    // over the clips that leave the ground.
    for (clips, kept) in [
        ("gesture_clips", "gesture_counts_kept"),
        ("airborne_clips", "flights_kept"),
    ] {
        let n = again[clips].as_u64().unwrap();
        match again[kept].as_f64() {
            Some(k) => assert!(n > 0 && (0.0..=1.0).contains(&k), "{kept}: {again}"),
            None => assert_eq!(n, 0, "{kept}: {again}"),
        }
    }
    // `lcm motion vae-report` re-computes the export's report from the folder.
    let rep = root.join("report.json");
    ok(lcm_bin(&[
        "motion",
        "vae-report",
        "--vae",
        a.join("motion_vae").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        rep.to_str().unwrap(),
    ]));
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
    let (x, y) = (
        rep["test"]["mpjpe_cm"].as_f64().unwrap(),
        report["test"]["mpjpe_cm"].as_f64().unwrap(),
    );
    assert!((x - y).abs() < 1e-3 * y.max(1.0), "{x} vs {y}");
    assert_eq!(
        rep["test"]["gesture_clips"],
        report["test"]["gesture_clips"]
    );
    let empty = root.join("no-data");
    std::fs::create_dir_all(&empty).unwrap();
    let o = lcm_bin(&[
        "motion",
        "vae-report",
        "--vae",
        a.join("motion_vae").to_str().unwrap(),
        "--data",
        empty.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--data") && err.lines().count() <= 2, "{err}");
    // `lcm motion reconstruct` of one test clip reports the error the library measures for it.
    let clip = data.join(format!("new_joint_vecs/{}.npy", test.clips[0].name));
    let rec = root.join("rec.json");
    let o = ok(lcm_bin(&[
        "motion",
        "reconstruct",
        clip.to_str().unwrap(),
        "--vae",
        a.join("motion_vae").to_str().unwrap(),
        "--output",
        rec.to_str().unwrap(),
    ]));
    let text = String::from_utf8_lossy(&o.stdout);
    let printed: f64 = text
        .split("mean per-joint error ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    let one = lcm::train::motion_vae::reconstruction(&vae, &norm, &clips[..1], &Device::Cpu)
        .unwrap()["mpjpe_cm"]
        .as_f64()
        .unwrap();
    assert!((printed - one).abs() < 0.1, "{printed} vs {one}");
    let (rec_joints, _) = lcm::motion::io::read_json(&rec).unwrap();
    assert_eq!(rec_joints.len(), clips[0].len() / lcm::motion::FEATURES);

    // The teacher on the exported VAE: trains, resumes bit-exactly, exports a model folder the
    // motion pipeline opens and generates from.
    let den_config = root.join("denoiser.json");
    std::fs::write(
        &den_config,
        serde_json::to_vec(&serde_json::json!({
            "width": 32, "heads": 2, "ff": 64, "layers": 3, "latent_tokens": 2,
            "latent_channels": 8, "text_dim": 384, "text_tokens": 3
        }))
        .unwrap(),
    )
    .unwrap();
    let vae_dir = a.join("motion_vae");
    let teach = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "pretrain",
            "motion-teacher",
            "--vae",
            vae_dir.to_str().unwrap(),
            "--config",
            den_config.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-steps",
            "4",
            "--batch-size",
            "8",
            "--warmup-steps",
            "1",
            "--save-every",
            "2",
            "--sample-every",
            "4",
        ];
        args.extend_from_slice(extra);
        lcm_bin(&args)
    };
    let t = root.join("t");
    ok(teach(&t, &[]));
    let full = losses(&t.join("metrics.jsonl"));
    assert!(t.join("samples/step-00000004.png").exists());
    let t2 = root.join("t2");
    let ck = t.join("checkpoints/checkpoint-00000002");
    ok(teach(&t2, &["--resume", ck.to_str().unwrap()]));
    assert_eq!(losses(&t2.join("metrics.jsonl")), full[2..]);
    let folder = lcm::pipeline::text2motion::MotionFolder::open(&t.join("model")).unwrap();
    let p = lcm::pipeline::text2motion::MotionPipeline::open(folder, &Device::Cpu).unwrap();
    assert!(p.vae.config.scaling_factor > 0.0 && p.vae.config.scaling_factor != 1.0);
    let o = lcm::pipeline::text2motion::MotionOptions {
        frames: 40,
        sampler: lcm::sample::sampler::SamplerKind::Ddim,
        steps: 5,
        guidance: 3.0,
        seed: 1,
        gamma: None,
    };
    let motions = p
        .generate(&["a person walks forward", "a person jumps"], &o)
        .unwrap();
    assert_eq!(motions.len(), 2);
    assert!(motions.iter().all(|m| m.len() == 40));
    assert!(motions[0] != motions[1], "two prompts gave one motion");
    let again = p
        .generate(&["a person walks forward", "a person jumps"], &o)
        .unwrap();
    assert_eq!(motions, again, "the same seed must give the same motions");
    // Longer than the VAE's 200-frame window: chained windows, continuous where they meet
    // (no step between frames much larger than within a window).
    let long = p
        .generate(
            &["a person walks forward"],
            &lcm::pipeline::text2motion::MotionOptions { frames: 450, ..o },
        )
        .unwrap()
        .remove(0);
    assert_eq!(long.len(), 450);
    let steps: Vec<f64> = long
        .windows(2)
        .map(|w| (w[1][0] - w[0][0]).norm())
        .collect();
    let within = steps[..150].iter().copied().fold(0.0, f64::max);
    for seam in [190, 380] {
        let at = steps[seam - 5..seam + 5]
            .iter()
            .copied()
            .fold(0.0, f64::max);
        assert!(
            at < 3.0 * within + 0.05,
            "a jump of {at} m at the seam near frame {seam} (within: {within})"
        );
    }
    let Err(e) = p.generate(
        &["x"],
        &lcm::pipeline::text2motion::MotionOptions { frames: 1300, ..o },
    ) else {
        panic!("1300 frames were accepted")
    };
    assert!(e.to_string().contains("2 to 1200 frames"), "{e}");

    // Distillation of that teacher through the shared LCD task: resumes bit-exactly, exports a
    // student folder whose guidance embedding the pipeline uses for 1-step LCM sampling.
    let distil = |out: &Path, extra: &[&str]| {
        let teacher = t.join("model");
        let mut args = vec![
            "distill",
            "--teacher",
            teacher.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-steps",
            "4",
            "--batch-size",
            "8",
            "--ddim-steps",
            "10",
            "--w-embed-dim",
            "16",
            "--save-every",
            "2",
            "--sample-every",
            "4",
        ];
        args.extend_from_slice(extra);
        lcm_bin(&args)
    };
    let d = root.join("d");
    ok(distil(&d, &[]));
    let full = losses(&d.join("metrics.jsonl"));
    assert!(full.iter().all(|l| l.1.is_finite()), "{full:?}");
    assert!(d.join("samples/step-00000004.png").exists());
    let d2 = root.join("d2");
    let ck = d.join("checkpoints/checkpoint-00000002");
    ok(distil(&d2, &["--resume", ck.to_str().unwrap()]));
    assert_eq!(losses(&d2.join("metrics.jsonl")), full[2..]);
    let folder = lcm::pipeline::text2motion::MotionFolder::open(&d).unwrap();
    assert_eq!(folder.denoiser.time_cond_proj_dim, Some(16));
    assert_eq!(folder.scheduler.original_inference_steps, Some(10));
    let student = lcm::pipeline::text2motion::MotionPipeline::open(folder, &Device::Cpu).unwrap();
    let one = lcm::pipeline::text2motion::MotionOptions {
        sampler: lcm::sample::sampler::SamplerKind::Lcm,
        steps: 1,
        ..o
    };
    let m = student.generate(&["a person walks forward"], &one).unwrap();
    assert_eq!(m[0].len(), 40);
    // `lcm convert --dtype f16` (how models are shipped) keeps the whole motion folder, and the
    // f16 copy generates within f16's rounding of the f32 one.
    let half = root.join("d-f16");
    ok(lcm_bin(&[
        "convert",
        "--input",
        d.to_str().unwrap(),
        "--output",
        half.to_str().unwrap(),
        "--dtype",
        "f16",
    ]));
    let half_pipe = lcm::pipeline::text2motion::MotionPipeline::open(
        lcm::pipeline::text2motion::MotionFolder::open(&half).unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let mh = half_pipe
        .generate(&["a person walks forward"], &one)
        .unwrap();
    let worst = m[0]
        .iter()
        .zip(&mh[0])
        .flat_map(|(p, q)| p.iter().zip(q).map(|(a, b)| (a - b).norm()))
        .fold(0f64, f64::max);
    assert!(worst < 0.05, "f16 copy moved a joint by {worst} m");
    assert!(!half.join("checkpoints").exists() && !half.join("samples").exists());
    // `lcm generate` with the student folder writes every motion format.
    for ext in ["bvh", "json", "npy", "gif"] {
        let out = root.join(format!("gen.{ext}"));
        let o = ok(lcm_bin(&[
            "generate",
            "--model",
            d.to_str().unwrap(),
            "--prompt",
            "a person jumps",
            "--seconds",
            "3",
            "--steps",
            "1",
            "--seed",
            "4",
            "--output",
            out.to_str().unwrap(),
        ]));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            stdout.contains("sampler lcm | steps 1") && stdout.contains("60 frames"),
            "{stdout}"
        );
        assert!(out.exists(), "{ext}");
    }
    let (json, _) = lcm::motion::io::read_json(&root.join("gen.json")).unwrap();
    let (bvh, fps) = lcm::motion::bvh::Bvh::read(&root.join("gen.bvh"))
        .unwrap()
        .to_joints()
        .unwrap();
    assert_eq!((bvh.len(), fps), (60, 20.0));
    // The root path is the JSON's, the skeleton rigid. (Joint positions match only
    // as far as the motion is rigid: an untrained model's is not; real clips round-trip within
    // 1 mm in tests/motion.rs.)
    let json = lcm::motion::retarget::uniform_skeleton(&json).unwrap();
    let root_gap = json
        .iter()
        .zip(&bvh)
        .map(|(a, b)| (a[0] - b[0]).norm())
        .fold(0.0, f64::max);
    assert!(root_gap < 1e-3, "the BVH's root is {root_gap} m off");
    // A rigid skeleton: every frame has the first frame's bones.
    let first = lcm::motion::skeleton::bone_lengths(&bvh[0]);
    for p in &bvh {
        for (j, (b, f)) in lcm::motion::skeleton::bone_lengths(p)
            .iter()
            .zip(first)
            .enumerate()
        {
            assert!((b - f).abs() < 1e-6, "bone {j}: {b} vs {f}");
        }
    }
    let e = lcm_bin(&[
        "generate",
        "--model",
        d.to_str().unwrap(),
        "--prompt",
        "x",
        "--width",
        "64",
    ]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("--width is for image models"),
        "{err}"
    );

    // `--init` starts a flow-map student from that LCM: with no steps to take, the export holds
    // the LCM's denoiser tensor for tensor, plus the end-time embedding at zero. The teacher
    // itself (no guidance embedding) is refused with a line naming the flag.
    let denoiser = |dir: &Path| {
        candle_core::safetensors::load(
            dir.join("denoiser")
                .join(lcm::model::motion_vae::WEIGHTS_FILE),
            &Device::Cpu,
        )
        .unwrap()
    };
    let fm = root.join("fm");
    ok(lcm_bin(&[
        "distill",
        "--teacher",
        t.join("model").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        fm.to_str().unwrap(),
        "--max-steps",
        "0",
        "--w-embed-dim",
        "16",
        "--ddim-steps",
        "10",
        "--init",
        d.to_str().unwrap(),
        "--objective",
        "flow-map",
    ]));
    let (lcm_w, fm_w) = (denoiser(&d), denoiser(&fm));
    assert_eq!(fm_w.len(), lcm_w.len() + 1);
    for (name, t) in &lcm_w {
        assert_eq!(max_abs_diff(t, &fm_w[name]), 0.0, "{name} moved");
    }
    let end = fm_w
        .iter()
        .find(|(k, _)| k.contains("end_proj"))
        .expect("no end-time embedding")
        .1;
    assert_eq!(max_abs_diff(end, &end.zeros_like().unwrap()), 0.0);
    assert!(
        lcm::pipeline::text2motion::MotionFolder::open(&fm)
            .unwrap()
            .denoiser
            .end_time_embedding
    );
    // The flow map samples with its own jumps by default; `--tcd-gamma` (the flow map's γ, as
    // for images) re-noises between them: γ = 0 is the default, γ = 0.5 another motion.
    let gen_fm = |name: &str, extra: &[&str]| {
        let out = root.join(name);
        let mut args = vec!["generate", "--model", fm.to_str().unwrap()];
        args.extend_from_slice(&[
            "--prompt",
            "a person walks",
            "--seed",
            "3",
            "--seconds",
            "2",
        ]);
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--output", out.to_str().unwrap()]);
        let o = ok(lcm_bin(&args));
        (
            String::from_utf8_lossy(&o.stdout).to_string(),
            std::fs::read(out).unwrap(),
        )
    };
    let (stdout, plain) = gen_fm("fm.npy", &[]);
    assert!(stdout.contains("sampler flowmap | steps 4"), "{stdout}");
    assert_eq!(gen_fm("fm-g0.npy", &["--tcd-gamma", "0"]).1, plain);
    assert_ne!(gen_fm("fm-g5.npy", &["--tcd-gamma", "0.5"]).1, plain);
    let e = distil(
        &root.join("fm-refused"),
        &["--init", t.join("model").to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("--init") && err.contains("not an LCM"),
        "{err}"
    );

    // A distilled student cannot be distilled again.
    let e = lcm_bin(&[
        "distill",
        "--teacher",
        d.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        root.join("e").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("already has a guidance embedding"),
        "{err}"
    );

    // `lcm eval` of the student against a briefly trained evaluator: the ground truth passes
    // every joint check and ranks its own captions well above chance (shuffled captions); the
    // report has every column of the quality table.
    let ev = root.join("ev");
    ok(lcm_bin(&[
        "pretrain",
        "motion-evaluator",
        "--data",
        data.to_str().unwrap(),
        "--output",
        ev.to_str().unwrap(),
        "--max-steps",
        "40",
        "--batch-size",
        "32",
        "--warmup-steps",
        "5",
        "--save-every",
        "0",
        "--sample-every",
        "0",
    ]));
    let report = root.join("eval.json");
    ok(lcm_bin(&[
        "eval",
        "--model",
        d.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--evaluator",
        ev.join("motion-evaluator").to_str().unwrap(),
        "--splits",
        "test",
        "--baselines",
        "--steps",
        "1",
        "--multimodality",
        "3,3",
        "--output",
        report.to_str().unwrap(),
    ]));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let test = &r["splits"]["test"];
    let gt = &test["ground truth"];
    let (r3, shuffled) = (
        gt["r_precision"][2].as_f64().unwrap(),
        gt["r_precision_shuffled"][2].as_f64().unwrap(),
    );
    assert!(
        r3 > 2.0 * shuffled && r3 > 0.2,
        "R@3 {r3}, shuffled {shuffled}"
    );
    for check in ["direction", "hand", "count"] {
        if gt["adherence"][check].is_object() {
            assert_eq!(
                gt["adherence"][check]["rate"].as_f64(),
                Some(1.0),
                "{check}: {gt}"
            );
        }
    }
    let model = &test[d.to_str().unwrap()];
    for key in [
        "fid",
        "mm_dist",
        "diversity",
        "multimodality",
        "foot_skating",
        "jitter",
        "ms_per_motion",
        "ms_per_motion_with_text",
    ] {
        assert!(
            model[key].as_f64().is_some_and(f64::is_finite),
            "{key}: {model}"
        );
    }
    assert!(test["nearest neighbour"]["fid"].as_f64().is_some());
    let md = std::fs::read_to_string(root.join("eval.md")).unwrap();
    assert!(md.contains("| test | ground truth |"), "{md}");

    // Learning: over 60 steps without augmentation the loss falls well below its start.
    let c = root.join("c");
    ok(run(
        &c,
        "60",
        &["--no-augment", "--lr", "2e-3", "--save-every", "0"],
    ));
    let l = losses(&c.join("metrics.jsonl"));
    let mean = |s: &[(u64, f64)]| s.iter().map(|x| x.1).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&l[..5]), mean(&l[55..]));
    println!("motion VAE loss: first 5 steps {first:.4}, last 5 {last:.4}");
    assert!(last < 0.7 * first, "{first} → {last}");
    std::fs::remove_dir_all(&root).ok();
}
