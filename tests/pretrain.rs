//! `lcm data shapes` and `lcm pretrain vae` end to end on a tiny config: metrics, checkpoints,
//! sample grids, an exported VAE folder that loads, a bit-exact resume, and error paths.

mod common;

use std::path::Path;

use common::*;

#[test]
fn pretrain_vae_trains_checkpoints_resumes_and_exports() {
    setup();
    let root = std::env::temp_dir().join(format!("lcm-pretrain-{}", std::process::id()));
    let data = root.join("shapes");
    let d = data.to_str().unwrap();
    ok(lcm_bin(&[
        "data", "shapes", "--out", d, "--count", "12", "--size", "32", "--seed", "3",
    ]));
    assert_eq!(
        std::fs::read_to_string(data.join("metadata.jsonl"))
            .unwrap()
            .lines()
            .count(),
        12
    );

    let config = fixtures().join("tiny-sd/vae/config.json");
    let c = config.to_str().unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let o = out.to_str().unwrap();
        let mut args = vec![
            "pretrain",
            "vae",
            "--config",
            c,
            "--data",
            d,
            "--output",
            o,
            "--resolution",
            "32",
            "--max-steps",
            "4",
            "--batch-size",
            "3",
            "--save-every",
            "2",
            "--sample-every",
            "2",
            "--warmup-steps",
            "1",
            "--decay-from",
            "2",
        ];
        args.extend_from_slice(extra);
        lcm_bin(&args)
    };
    let a = root.join("a");
    ok(run(&a, &[]));
    let full = losses(&a.join("metrics.jsonl"));
    // --decay-from 2 with --max-steps 4: lr 1e-3 until step 2, then down linearly to a tenth.
    let lrs: Vec<f64> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["lr"]
                .as_f64()
                .unwrap()
        })
        .collect();
    for (got, want) in lrs.iter().zip([1e-3, 1e-3, 5.5e-4, 1e-4]) {
        assert!((got - want).abs() < 1e-12, "{lrs:?}");
    }
    assert_eq!(full.iter().map(|l| l.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(
        full.iter().all(|l| l.1.is_finite() && l.1 > 0.0),
        "{full:?}"
    );
    for p in [
        "checkpoints/checkpoint-00000002",
        "checkpoints/checkpoint-00000004",
        "samples/step-00000002.png",
    ] {
        assert!(a.join(p).exists(), "missing {p}");
    }
    // The exported VAE loads, with a scaling factor measured from the data.
    let vae_cfg = lcm::model::config::VaeConfig::load(&a.join("vae/config.json")).unwrap();
    assert!(vae_cfg.scaling_factor.is_finite() && vae_cfg.scaling_factor > 0.0);
    let files = lcm::model::folder::weight_files(&a.join("vae")).unwrap();
    let vb = lcm::model::weights::load_weights(
        &files,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    lcm::model::vae::AutoencoderKL::new(&vae_cfg, vb).unwrap();

    // Resuming from step 2 reproduces steps 3 and 4 exactly.
    let b = root.join("b");
    let ck = a.join("checkpoints/checkpoint-00000002");
    ok(run(&b, &["--resume", ck.to_str().unwrap()]));
    assert_eq!(losses(&b.join("metrics.jsonl")), full[2..]);

    // --stop-at 3 ends the same schedule early: the first three steps exactly, then the export.
    let s = root.join("s");
    ok(run(&s, &["--stop-at", "3"]));
    assert_eq!(losses(&s.join("metrics.jsonl")), full[..3]);
    assert!(s.join("vae/config.json").exists());
    let e = run(&root.join("t"), &["--stop-at", "5"]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && err.contains("--stop-at"), "{err}");

    // Training can continue from an exported VAE (fresh optimizer); a folder of another model
    // is refused naming --init.
    let vae_dir = a.join("vae");
    ok(run(&root.join("e"), &["--init", vae_dir.to_str().unwrap()]));
    let wrong = fixtures().join("tiny-sd/unet");
    let e = run(&root.join("f"), &["--init", wrong.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && err.contains("--init"), "{err}");

    // --decoder-only: the encoder (and quant_conv) come out bit-identical, so latents and every
    // U-Net trained on them stay valid; the decoder moves; the scaling factor is --init's.
    let g = root.join("g");
    ok(run(
        &g,
        &["--init", vae_dir.to_str().unwrap(), "--decoder-only"],
    ));
    let load = |dir: &Path| {
        candle_core::safetensors::load(
            dir.join("diffusion_pytorch_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (before, after) = (load(&vae_dir), load(&g.join("vae")));
    let mut moved = 0;
    for (name, w) in &before {
        let diff = (w - &after[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            moved += usize::from(diff > 0.0);
        } else {
            assert_eq!(diff, 0.0, "{name} changed under --decoder-only");
        }
    }
    assert!(moved > 0, "--decoder-only trained nothing");
    let kept = lcm::model::config::VaeConfig::load(&g.join("vae/config.json")).unwrap();
    assert_eq!(kept.scaling_factor, vae_cfg.scaling_factor);
    // It needs the trained encoder it keeps: one line that names the missing flag.
    let e = run(&root.join("h"), &["--decoder-only"]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("--init") && err.lines().count() == 1,
        "{err}"
    );

    // Different settings are refused; bad flags fail with one line naming them.
    let e = run(
        &root.join("c"),
        &["--resume", ck.to_str().unwrap(), "--kl-weight", "0.5"],
    );
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("different settings"));
    let e = run(&root.join("d"), &["--resolution", "33"]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("--resolution") && err.lines().count() == 1,
        "{err}"
    );
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn pretrain_unet_trains_resumes_and_exports_a_generating_teacher() {
    setup();
    let root = std::env::temp_dir().join(format!("lcm-pretrain-unet-{}", std::process::id()));
    let data = root.join("shapes");
    let d = data.to_str().unwrap();
    ok(lcm_bin(&[
        "data", "shapes", "--out", d, "--count", "10", "--size", "32", "--seed", "4",
    ]));
    // The fixture teacher's folder gives the sizes, tokenizer and schedule; its VAE encodes.
    let cfg = fixtures().join("tiny-sd");
    let vae = cfg.join("vae");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "pretrain",
            "unet",
            "--config",
            cfg.to_str().unwrap(),
            "--vae",
            vae.to_str().unwrap(),
            "--data",
            d,
            "--output",
            out.to_str().unwrap(),
            "--resolution",
            "32",
            "--max-steps",
            "4",
            "--batch-size",
            "3",
            "--save-every",
            "2",
            "--sample-every",
            "4",
            "--caption-dropout",
            "0.3",
        ];
        args.extend_from_slice(extra);
        lcm_bin(&args)
    };
    let a = root.join("a");
    ok(run(&a, &[]));
    let full = losses(&a.join("metrics.jsonl"));
    assert_eq!(full.len(), 4);
    assert!(
        full.iter().all(|l| l.1.is_finite() && l.1 > 0.0),
        "{full:?}"
    );
    assert!(a.join("samples/step-00000004.png").is_file());
    // The cache is reused by the resumed run, which reproduces steps 3 and 4.
    let b = root.join("b");
    std::fs::create_dir_all(&b).unwrap();
    let ck = a.join("checkpoints/checkpoint-00000002");
    ok(run(&b, &["--resume", ck.to_str().unwrap()]));
    assert_eq!(losses(&b.join("metrics.jsonl")), full[2..]);
    // The EMA is part of a run's settings: a checkpoint made without one is not resumed with one.
    let h = run(
        &root.join("h"),
        &["--resume", ck.to_str().unwrap(), "--ema", "0.9"],
    );
    let err = String::from_utf8_lossy(&h.stderr);
    assert!(
        !h.status.success() && err.contains("different settings"),
        "{err}"
    );
    // --posterior-mean trains on the posterior's means: the same seed, data order and noise,
    // other inputs, so other losses; and a checkpoint made with samples is not resumed with it.
    let m = root.join("m");
    ok(run(&m, &["--posterior-mean", "--stop-at", "1"]));
    let on_means = losses(&m.join("metrics.jsonl"));
    assert_eq!(on_means.len(), 1);
    assert!(
        on_means[0].1.is_finite() && on_means[0].1 != full[0].1,
        "{on_means:?} vs {full:?}"
    );
    let h = run(
        &root.join("pm"),
        &["--resume", ck.to_str().unwrap(), "--posterior-mean"],
    );
    let err = String::from_utf8_lossy(&h.stderr);
    assert!(
        !h.status.success() && err.contains("different settings"),
        "{err}"
    );
    // The exported teacher is a Stable Diffusion folder that `lcm generate` runs.
    let model = a.join("model");
    let png = root.join("gen.png");
    ok(lcm_bin(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--steps",
        "3",
        "--seed",
        "1",
        "--output",
        png.to_str().unwrap(),
    ]));
    assert_eq!(image::open(&png).unwrap().width(), 32);

    // --init continues from the exported teacher (fresh optimizer): at lr 0 the weights it
    // exports are the ones it loaded, unet and text encoder alike.
    let e = root.join("e");
    ok(run(
        &e,
        &[
            "--init",
            model.to_str().unwrap(),
            "--lr",
            "0",
            "--noise-offset",
            "0.1",
        ],
    ));
    for (part, file) in [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        let load = |dir: &Path| {
            candle_core::safetensors::load(dir.join(part).join(file), &candle_core::Device::Cpu)
                .unwrap()
        };
        let (want, got) = (load(&model), load(&e.join("model")));
        assert_eq!(want.len(), got.len(), "{part}");
        for (name, w) in &want {
            let diff = (w - &got[name]).unwrap().abs().unwrap();
            let max = diff.flatten_all().unwrap().max(0).unwrap();
            assert_eq!(max.to_scalar::<f32>().unwrap(), 0.0, "{part}.{name}");
        }
    }
    // A folder without the teacher's parts is refused, naming --init.
    let e = run(&root.join("f"), &["--init", vae.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && err.contains("--init"), "{err}");
    let e = run(&root.join("g"), &["--noise-offset", "2"]);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("--noise-offset"),
        "{err}"
    );
    std::fs::remove_dir_all(root).ok();
}

/// `lcm pretrain text` learns to tell a batch's captions apart (the in-batch retrieval accuracy
/// rises, the loss falls), resumes bit-exactly, and `lcm pretrain unet --text-encoder` trains a
/// teacher around that encoder without changing it.
#[test]
fn pretrain_text_learns_and_the_teacher_keeps_it_frozen() {
    setup();
    let root = std::env::temp_dir().join(format!("lcm-pretrain-text-{}", std::process::id()));
    let data = root.join("shapes");
    let d = data.to_str().unwrap();
    ok(lcm_bin(&[
        "data", "shapes", "--out", d, "--count", "64", "--size", "32", "--seed", "6",
    ]));
    let cfg = fixtures().join("tiny-sd");
    let vae = cfg.join("vae");
    let text = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "pretrain",
            "text",
            "--config",
            cfg.to_str().unwrap(),
            "--vae",
            vae.to_str().unwrap(),
            "--data",
            d,
            "--output",
            out.to_str().unwrap(),
            "--resolution",
            "32",
            "--max-steps",
            "120",
            "--batch-size",
            "16",
            "--lr",
            "3e-3",
            "--warmup-steps",
            "5",
            "--save-every",
            "60",
            "--embed-dim",
            "16",
        ];
        args.extend_from_slice(extra);
        lcm_bin(&args)
    };
    let a = root.join("a");
    ok(text(&a, &[]));
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 120);
    let mean = |key: &str, r: std::ops::Range<usize>| {
        metrics[r.clone()]
            .iter()
            .map(|m| m[key].as_f64().unwrap())
            .sum::<f64>()
            / r.len() as f64
    };
    // Chance is 1/16 and ln 16 = 2.77 at the start.
    let (acc0, acc1) = (mean("accuracy", 0..10), mean("accuracy", 110..120));
    let (loss0, loss1) = (mean("loss", 0..10), mean("loss", 110..120));
    // Measured: accuracy 0.07 -> 0.46, loss 2.97 -> 1.4.
    assert!(acc1 > 0.3 && acc1 > 3.0 * acc0, "accuracy {acc0} -> {acc1}");
    assert!(loss1 < 0.7 * loss0, "loss {loss0} -> {loss1}");
    let b = root.join("b");
    ok(text(
        &b,
        &[
            "--resume",
            a.join("checkpoints/checkpoint-00000060").to_str().unwrap(),
        ],
    ));
    assert_eq!(
        losses(&b.join("metrics.jsonl")),
        losses(&a.join("metrics.jsonl"))[60..]
    );

    let te = a.join("text_encoder");
    let unet = |out: &Path, te: &Path| {
        lcm_bin(&[
            "pretrain",
            "unet",
            "--config",
            cfg.to_str().unwrap(),
            "--vae",
            vae.to_str().unwrap(),
            "--data",
            d,
            "--output",
            out.to_str().unwrap(),
            "--resolution",
            "32",
            "--max-steps",
            "2",
            "--batch-size",
            "3",
            "--save-every",
            "0",
            "--sample-every",
            "0",
            "--text-encoder",
            te.to_str().unwrap(),
        ])
    };
    let t = root.join("t");
    ok(unet(&t, &te));
    let load = |f: &Path| candle_core::safetensors::load(f, &candle_core::Device::Cpu).unwrap();
    let (want, got) = (
        load(&te.join("model.safetensors")),
        load(&t.join("model/text_encoder/model.safetensors")),
    );
    assert_eq!(want.len(), got.len());
    for (name, w) in &want {
        let diff = (w - &got[name])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(
            diff.max(0).unwrap().to_scalar::<f32>().unwrap(),
            0.0,
            "{name}"
        );
    }
    // An encoder of other sizes is refused, naming the flag.
    let other = lcm::pipeline::source::repo_root().join("weights/tiny/text_encoder");
    let e = unet(&root.join("u"), &other);
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("--text-encoder"),
        "{err}"
    );
    std::fs::remove_dir_all(root).ok();
}

/// The teacher's ε-loss gradient is the true one along the whole text path (token embeddings,
/// every text-encoder layer, the U-Net's cross-attention): for each variable, the directional
/// derivative along its gradient, by central differences, equals the gradient's norm. Candle
/// drops gradients silently (candle-0.11 notes); a present but wrong gradient would pass the
/// "every weight gets a gradient" check and still keep the prompt from ever being learned.
#[test]
fn teacher_loss_gradients_through_the_text_path_match_finite_differences() -> anyhow::Result<()> {
    use candle_core::{DType, Device, Tensor, Var};
    use std::collections::HashMap;
    setup();
    let dir = fixtures().join("tiny-sd");
    let dev = Device::Cpu;
    let load = |p: &str| -> anyhow::Result<HashMap<String, Var>> {
        candle_core::safetensors::load(dir.join(p), &dev)?
            .into_iter()
            .map(|(k, v)| Ok((k, Var::from_tensor(&v.to_dtype(DType::F64)?)?)))
            .collect()
    };
    let uv = load("unet/diffusion_pytorch_model.safetensors")?;
    let tv = load("text_encoder/model.safetensors")?;
    let vb = |m: &HashMap<String, Var>| {
        let t = m.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone()));
        candle_nn::VarBuilder::from_tensors(t.collect(), DType::F64, &dev)
    };
    let ucfg = lcm::model::config::UNetConfig::load(&dir.join("unet/config.json"))?;
    let tcfg = lcm::model::config::ClipTextConfig::load(&dir.join("text_encoder/config.json"))?;
    let unet = lcm::model::unet::UNet2DConditionModel::new(&ucfg, vb(&uv))?;
    let text = lcm::model::clip::ClipTextModel::new(&tcfg, vb(&tv))?;
    let tok = lcm::model::tokenizer::ClipTokenizer::from_dir(
        &dir.join("tokenizer"),
        tcfg.max_position_embeddings,
    )?;
    let ids = Tensor::new(
        tok.encode("a green circle on a red background")?
            .ids
            .as_slice(),
        &dev,
    )?
    .unsqueeze(0)?
    .repeat((2, 1))?;
    let size = ucfg.sample_size.unwrap_or(8);
    let shape = (2, ucfg.in_channels, size, size);
    let x_t = Tensor::randn(0f64, 1.0, shape, &dev)?;
    let noise = Tensor::randn(0f64, 1.0, shape, &dev)?;
    let t = Tensor::new(&[500f64, 800.0], &dev)?;
    let loss = || -> anyhow::Result<Tensor> {
        let pred = unet.forward(&x_t, &t, &text.forward(&ids)?, None)?;
        Ok((pred - &noise)?.sqr()?.mean_all()?)
    };
    let grads = loss()?.backward()?;
    let mut checked: Vec<(String, &Var)> = tv.iter().map(|(k, v)| (k.clone(), v)).collect();
    checked.extend(
        uv.iter()
            .filter(|(k, _)| k.contains("attn2"))
            .map(|(k, v)| (k.clone(), v)),
    );
    checked.sort_by(|a, b| a.0.cmp(&b.0));
    let mut compared = 0;
    for (name, var) in checked {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
        if norm < 1e-9 {
            // k_proj biases: softmax is invariant to them, so their true gradient is zero.
            assert!(name.ends_with("k_proj.bias"), "{name}: zero gradient");
            continue;
        }
        let step = (g / norm)?.affine(1e-4, 0.0)?;
        let orig = var.as_tensor().copy()?;
        var.set(&(&orig + &step)?)?;
        let plus = loss()?.to_scalar::<f64>()?;
        var.set(&(&orig - &step)?)?;
        let minus = loss()?.to_scalar::<f64>()?;
        var.set(&orig)?;
        let fd = (plus - minus) / 2e-4;
        // f64 throughout (so attention takes the composite path; the fused f32 kernel's backward
        // is checked against it in src/attention.rs): central differences agree to ~1e-6
        // relative; 1e-3 leaves room.
        assert!(
            (fd - norm).abs() <= 1e-3 * norm,
            "{name}: finite difference {fd:e} vs gradient norm {norm:e}"
        );
        compared += 1;
    }
    assert!(compared > 20, "only {compared} variables compared");
    Ok(())
}
