//! The `lcm` binary end to end: fixture runs reproduce diffusers' PNGs, and bad input exits
//! non-zero with one line naming the problem (never a panic).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixtures;
use serde_json::{json, Value};

fn lcm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lcm"))
        .args(args)
        .env("CANDLE_NUM_THREADS", "1")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run lcm")
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lcm-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fx(p: &str) -> String {
    fixtures().join(p).to_string_lossy().into_owned()
}

fn pixels(p: &Path) -> Vec<u8> {
    image::open(p).unwrap().to_rgb8().into_raw()
}

fn max_pixel_diff(a: &Path, b: &Path) -> u8 {
    let (a, b) = (pixels(a), pixels(b));
    assert_eq!(a.len(), b.len(), "image sizes differ");
    a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

#[test]
fn lcm_one_step_reproduces_the_diffusers_png() {
    let dir = tmp_dir("lcm1");
    let out = dir.join("cat.png");
    let o = lcm(&[
        "generate",
        // diffusers computed the golden in f32 (on an AMX CPU the default would be bf16).
        "--dtype",
        "f32",
        "--model",
        &fx("tiny-lcm"),
        "--prompt",
        "a photo of a cat",
        "--latents",
        &fx("lcm1_latents.safetensors"),
        "--steps",
        "1",
        "--guidance",
        "8.5",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for word in [
        "sampler lcm",
        "steps 1",
        "seed",
        "text encode",
        "denoise",
        "decode",
    ] {
        assert!(stdout.contains(word), "summary lacks {word:?}: {stdout}");
    }
    assert!(max_pixel_diff(&out, &fixtures().join("lcm1_image.png")) <= 2);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn ddim_ten_steps_with_negative_prompt_reproduces_the_diffusers_png() {
    let dir = tmp_dir("ddim");
    let out = dir.join("cat.png");
    let o = lcm(&[
        "generate",
        // diffusers computed the golden in f32 (on an AMX CPU the default would be bf16).
        "--dtype",
        "f32",
        "--model",
        &fx("tiny-sd"),
        "--prompt",
        "a photo of a cat",
        "--negative-prompt",
        "blurry",
        "--sampler",
        "ddim",
        "--steps",
        "10",
        "--guidance",
        "7.5",
        "--latents",
        &fx("sd_ddim10_latents.safetensors"),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(max_pixel_diff(&out, &fixtures().join("sd_ddim10_image.png")) <= 2);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn several_images_get_numbered_files_and_a_seed_is_reproducible() {
    let dir = tmp_dir("multi");
    let run = |name: &str| {
        let out = dir.join(name);
        let o = lcm(&[
            "generate",
            "--model",
            &fx("tiny-lcm"),
            "--prompt",
            "a red circle",
            "--n",
            "2",
            "--seed",
            "7",
            "--steps",
            "2",
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run("a.png");
    run("b.png");
    for i in 0..2 {
        let (a, b) = (
            dir.join(format!("a-{i}.png")),
            dir.join(format!("b-{i}.png")),
        );
        assert_eq!(pixels(&a), pixels(&b), "same seed, different image {i}");
    }
    assert_ne!(
        pixels(&dir.join("a-0.png")),
        pixels(&dir.join("a-1.png")),
        "the two images of a batch are identical"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Run with bad input; expect failure with a single `error:` line containing every `needle`.
fn expect_error(args: &[&str], needles: &[&str]) {
    let o = lcm(args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let err_line = lines.last().copied().unwrap_or_default();
    for n in needles {
        assert!(
            err_line.contains(n),
            "{args:?}: error {err_line:?} does not name {n:?}"
        );
    }
}

#[test]
fn bad_input_fails_with_one_line_naming_the_problem() {
    let lcm_dir = fx("tiny-lcm");
    // --output on a FIFO: refused in one line, the FIFO left a FIFO (the atomic rename would
    // have turned it into a regular file).
    {
        use std::os::unix::fs::FileTypeExt;
        let fifo = std::env::temp_dir().join(format!("lcm-cli-fifo-{}.png", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        expect_error(
            &[
                "generate",
                "--model",
                lcm_dir.as_str(),
                "--prompt",
                "x",
                "--steps",
                "1",
                "--output",
                fifo.to_str().unwrap(),
            ],
            &["refusing to write", "not a regular file"],
        );
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
        std::fs::remove_file(&fifo).ok();
    }
    let base = [
        "generate",
        "--model",
        lcm_dir.as_str(),
        "--prompt",
        "x",
        "--output",
        "/tmp/lcm-never-written.png",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |extra: &[&str], needles: &[&str]| {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(&args, needles);
    };
    run(&["--width", "33"], &["--width", "33", "multiple of 2"]);
    run(&["--steps", "0"], &["--steps"]);
    run(&["--sampler", "euler"], &["euler"]);
    run(
        &["--latents", "/nonexistent/l.safetensors"],
        &["--latents", "/nonexistent/l.safetensors"],
    );
    run(
        &["--n", "2", "--latents", &fx("lcm1_latents.safetensors")],
        &["latents", "[1, 4, 16, 16]"],
    );
    run(
        &["--latents", &fx("golden.json")],
        &["--latents", "golden.json"],
    );
    run(&["--steps", "60"], &["60", "original_inference_steps"]);
    run(&["--device", "tpu"], &["--device", "tpu"]);
    // Sizes whose buffers cannot fit are refused before anything is allocated (an allocation
    // failure would abort the process).
    run(
        &["--width", "65536", "--height", "65536"],
        &["65536x65536", "GiB", "memory available"],
    );
    run(&["--n", "10000000"], &["--n 10000000", "GiB"]);
    assert!(!Path::new("/tmp/lcm-never-written.png").exists());

    // The same for the shipped motion model: each bad flag is named, nothing is written.
    let motion_out = "/tmp/lcm-never-written.npy";
    let motion = |extra: &[&str], needles: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            "tiny-motion",
            "--prompt",
            "a person walks",
        ];
        args.extend_from_slice(extra);
        if !extra.contains(&"--output") {
            args.extend_from_slice(&["--output", motion_out]);
        }
        expect_error(&args, needles);
    };
    motion(&["--guidance", "nan"], &["--guidance", "NaN"]);
    motion(&["--guidance=-1"], &["--guidance", "-1"]);
    motion(&["--seconds", "0"], &["--seconds"]);
    motion(&["--seconds", "100"], &["frames", "2000"]);
    motion(&["--n", "0"], &["--n"]);
    motion(&["--tcd-gamma", "2"], &["gamma", "2"]);
    motion(&["--steps", "80"], &["80", "original_inference_steps"]);
    motion(&["--sampler", "flowmap"], &["flowmap", "not a flow map"]);
    motion(&["--width", "64"], &["--width", "image models"]);
    motion(&["--output", "/tmp/lcm-m.xyz"], &["xyz", ".bvh"]);
    assert!(!Path::new(motion_out).exists());

    // A safetensors file without a `latents` tensor.
    expect_error(
        &[
            "generate",
            "--model",
            &lcm_dir,
            "--prompt",
            "x",
            "--latents",
            &fx("golden.safetensors"),
        ],
        &["no tensor named `latents`"],
    );
    // No such model.
    expect_error(
        &["generate", "--model", "/nonexistent/model", "--prompt", "x"],
        &["/nonexistent/model"],
    );
    // A hub id that is not cached, offline.
    expect_error(
        &[
            "generate",
            "--model",
            "nobody/no-such-model",
            "--prompt",
            "x",
        ],
        &["nobody/no-such-model", "HF_HUB_OFFLINE", "--model DIR"],
    );
}

#[test]
fn broken_model_folders_are_named_in_the_error() {
    let dir = tmp_dir("broken");
    let copy = |dst: &Path| {
        for entry in walk(&fixtures().join("tiny-lcm")) {
            let rel = entry.strip_prefix(fixtures().join("tiny-lcm")).unwrap();
            let to = dst.join(rel);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&entry, &to).unwrap();
        }
    };
    // Unreadable config.
    let m1 = dir.join("badconfig");
    copy(&m1);
    std::fs::write(m1.join("unet/config.json"), "{ not json").unwrap();
    expect_error(
        &["generate", "--model", m1.to_str().unwrap(), "--prompt", "x"],
        &["unet/config.json"],
    );
    // Truncated weights.
    let m2 = dir.join("badweights");
    copy(&m2);
    std::fs::write(
        m2.join("vae/diffusion_pytorch_model.safetensors"),
        b"\x10\x00",
    )
    .unwrap();
    expect_error(
        &["generate", "--model", m2.to_str().unwrap(), "--prompt", "x"],
        &["vae/diffusion_pytorch_model.safetensors"],
    );
    // A config whose sizes disagree with the weights.
    let m3 = dir.join("badshape");
    copy(&m3);
    let cfg = std::fs::read_to_string(m3.join("unet/config.json")).unwrap();
    std::fs::write(
        m3.join("unet/config.json"),
        cfg.replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 48"),
    )
    .unwrap();
    expect_error(
        &["generate", "--model", m3.to_str().unwrap(), "--prompt", "x"],
        &["U-Net", "shape"],
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Model files that once crashed or hung `lcm` (issue 28): absurd config values, non-finite
/// weights, a shard index pointing outside the folder. Each is refused before any work, in one
/// line naming the file and the field or tensor.
#[test]
fn absurd_configs_non_finite_weights_and_escaping_shards_are_refused() {
    let dir = tmp_dir("absurd");
    let src = fixtures().join("tiny-lcm");
    let copy = |name: &str| -> PathBuf {
        let dst = dir.join(name);
        for entry in walk(&src) {
            let to = dst.join(entry.strip_prefix(&src).unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&entry, &to).unwrap();
        }
        dst
    };
    let generate = |m: &Path, needles: &[&str]| {
        expect_error(
            &[
                "generate",
                "--model",
                m.to_str().unwrap(),
                "--prompt",
                "x",
                "--steps",
                "1",
            ],
            needles,
        );
    };
    let cases: &[(&str, &str, Value, &[&str])] = &[
        (
            "unet/config.json",
            "sample_size",
            json!(1_000_000),
            &["unet/config.json", "sample_size"],
        ),
        (
            "unet/config.json",
            "attention_head_dim",
            json!(0),
            &["unet/config.json", "attention heads"],
        ),
        (
            "unet/config.json",
            "block_out_channels",
            json!([32, 64, 1_000_000_000]),
            &["block_out_channels"],
        ),
        (
            "scheduler/scheduler_config.json",
            "num_train_timesteps",
            json!(1_000_000_000),
            &["scheduler_config.json", "num_train_timesteps"],
        ),
        (
            "scheduler/scheduler_config.json",
            "beta_end",
            json!(2.0),
            &["scheduler_config.json", "beta_start/beta_end"],
        ),
        (
            "text_encoder/config.json",
            "vocab_size",
            json!(0),
            &["text_encoder/config.json", "vocab_size"],
        ),
        (
            "vae/config.json",
            "scaling_factor",
            json!(0.0),
            &["vae/config.json", "scaling_factor"],
        ),
    ];
    for (i, (file, key, value, needles)) in cases.iter().enumerate() {
        let m = copy(&format!("c{i}"));
        let path = m.join(file);
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg[*key] = value.clone();
        std::fs::write(&path, cfg.to_string()).unwrap();
        generate(&m, needles);
    }
    // A NaN in one weight tensor (it would make black images without an error).
    let m = copy("nan");
    let file = m.join("unet/diffusion_pytorch_model.safetensors");
    let mut ts = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let name = ts
        .keys()
        .find(|k| k.contains("conv_in.weight"))
        .unwrap()
        .clone();
    let t = &ts[&name];
    let nan = candle_core::Tensor::full(f32::NAN, t.shape(), &candle_core::Device::Cpu)
        .unwrap()
        .to_dtype(t.dtype())
        .unwrap();
    ts.insert(name.clone(), nan);
    candle_core::safetensors::save(&ts, &file).unwrap();
    generate(
        &m,
        &["unet/diffusion_pytorch_model.safetensors", &name, "NaN"],
    );
    // A shard index whose file name leaves the component folder.
    let m = copy("shards");
    std::fs::remove_file(m.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(
        m.join("unet/diffusion_pytorch_model.safetensors.index.json"),
        json!({"weight_map": {"conv_in.weight": "../vae/diffusion_pytorch_model.safetensors"}})
            .to_string(),
    )
    .unwrap();
    generate(&m, &["index.json", "not a file name in the model folder"]);
    // A relative path that does not exist is a path, not a hub id to download.
    expect_error(
        &["generate", "--model", "../no-such-model", "--prompt", "x"],
        &["../no-such-model", "neither a folder"],
    );
    std::fs::remove_dir_all(dir).ok();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn hub_ids_resolve_from_a_local_hf_hub_cache() {
    // The layout hf-hub and huggingface_hub write: models--org--name/{refs/main, snapshots/<rev>/...}.
    let home = tmp_dir("hfhome");
    let repo = home.join("hub/models--test-org--tiny-lcm");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    let snap = repo.join("snapshots").join(rev);
    for entry in walk(&fixtures().join("tiny-lcm")) {
        let rel = entry.strip_prefix(fixtures().join("tiny-lcm")).unwrap();
        std::fs::create_dir_all(snap.join(rel).parent().unwrap()).unwrap();
        std::fs::copy(&entry, snap.join(rel)).unwrap();
    }
    let out = home.join("cat.png");
    let o = Command::new(env!("CARGO_BIN_EXE_lcm"))
        .args([
            "generate",
            "--model",
            "test-org/tiny-lcm",
            "--prompt",
            "a photo of a cat",
            "--dtype",
            "f32",
        ])
        .args([
            "--latents",
            &fx("lcm1_latents.safetensors"),
            "--steps",
            "1",
            "--guidance",
            "8.5",
        ])
        .args(["--output", out.to_str().unwrap()])
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .env("CANDLE_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(max_pixel_diff(&out, &fixtures().join("lcm1_image.png")) <= 2);

    // A cached snapshot that lacks a weight file is not used; offline, the error says what to do.
    std::fs::remove_file(snap.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_lcm"))
        .args(["generate", "--model", "test-org/tiny-lcm", "--prompt", "x"])
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("test-org/tiny-lcm") && err.contains("--model DIR"),
        "{err}"
    );
    std::fs::remove_dir_all(home).ok();
}

#[test]
fn convert_changes_the_weight_dtype_and_keeps_the_images() {
    let dir = tmp_dir("convert");
    let f32_dir = dir.join("tiny-lcm-f32");
    let out = lcm(&[
        "convert",
        "--input",
        &fx("tiny-lcm"),
        "--output",
        f32_dir.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unet = |d: &Path| {
        candle_core::safetensors::load(
            d.join("unet/diffusion_pytorch_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    assert!(unet(&f32_dir)
        .values()
        .all(|t| t.dtype() == candle_core::DType::F32));
    // The fixture is stored in f16, so widening is lossless: the same seed gives the same PNG.
    let (a, b) = (dir.join("a.png"), dir.join("b.png"));
    for (model, png) in [
        (fx("tiny-lcm"), &a),
        (f32_dir.to_str().unwrap().to_string(), &b),
    ] {
        let o = lcm(&[
            "generate",
            "--model",
            &model,
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--seed",
            "3",
            "--output",
            png.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(pixels(&a), pixels(&b));
    // A training run's leftovers beside the pipeline are not shipped.
    std::fs::create_dir_all(f32_dir.join("checkpoints/checkpoint-00000002")).unwrap();
    std::fs::write(
        f32_dir.join("checkpoints/checkpoint-00000002/state.json"),
        "{}",
    )
    .unwrap();
    std::fs::write(f32_dir.join("metrics.jsonl"), "").unwrap();
    let shipped = dir.join("shipped");
    let out = lcm(&[
        "convert",
        "--input",
        f32_dir.to_str().unwrap(),
        "--output",
        shipped.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!shipped.join("checkpoints").exists() && !shipped.join("metrics.jsonl").exists());
    for c in [
        "model_index.json",
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
    ] {
        assert!(shipped.join(c).exists(), "{c} missing");
    }
    expect_error(
        &[
            "convert",
            "--input",
            "/nonexistent",
            "--output",
            dir.join("x").to_str().unwrap(),
        ],
        &["--input", "/nonexistent"],
    );
    expect_error(
        &[
            "convert",
            "--input",
            &fx("tiny-lcm"),
            "--output",
            dir.join("y").to_str().unwrap(),
            "--dtype",
            "f8",
        ],
        &["--dtype"],
    );
    std::fs::remove_dir_all(dir).ok();
}
