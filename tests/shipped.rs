//! The models shipped in weights/ (weights/README.md): they load by their pipeline names, a
//! fixed-seed generation matches its stored PNG, and prompts naming a shape and a colour give
//! images the shipped evaluator classifies accordingly for most seeds.

mod common;

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device};
use lcm::eval::{prompt_following, Evaluator, SHAPE_COLOUR_PROMPTS};
use lcm::pipeline::{GenerateRequest, Pipeline};

use common::{assert_figures_match, eval_figures, fixtures, lcm_bin, psnr};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lcm-shipped-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `lcm generate --model NAME` with a fixed prompt and seed, compared with the PNG stored when
/// the weights were committed (tests/fixtures/PROVENANCE.md). The bound is PSNR, not equality:
/// the same binary gives identical pixels, but another CPU's kernels sum in another order and many
/// sampling steps carry that into the last bit of a few pixels. 40 dB is an RMS error of 2.5 of
/// 255, far above what a change to the weights gives (two exports of the teacher's run 500
/// steps apart score 7 dB against each other).
fn assert_stable(model: Option<&str>, steps: &str, stored: &str) {
    common::setup();
    let dir = tmp(model.unwrap_or("default"));
    let out = dir.join("out.png");
    let mut args = vec!["generate"];
    if let Some(m) = model {
        args.extend(["--model", m]);
    }
    args.extend([
        "--prompt",
        "a large red circle in the center on a blue background",
        "--steps",
        steps,
        "--seed",
        "7",
        "--output",
        out.to_str().unwrap(),
    ]);
    let o = lcm_bin(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = image::open(&out).unwrap().to_rgb8();
    let want = image::open(fixtures().join(stored)).unwrap().to_rgb8();
    assert_eq!(got.dimensions(), (64, 64), "the shipped models are 64²");
    let p = psnr(&got, &want);
    assert!(p >= 40.0, "{model:?}: PSNR {p:.1} dB against {stored}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn shipped_teacher_reproduces_its_stored_image() {
    assert_stable(Some("tiny-teacher"), "20", "shipped/tiny-teacher-seed7.png");
}

/// `lcm generate` without `--model` runs the shipped LCM (`tiny`).
#[test]
fn default_model_reproduces_its_stored_image() {
    assert_stable(None, "4", "shipped/tiny-seed7.png");
}

/// `lcm eval` on a fixed small sample reproduces the figures stored with the weights.
fn assert_eval_reproduced(model: &str, steps: &str, stored: &str) {
    common::setup();
    let dir = tmp(&format!("eval-{model}"));
    let out = dir.join("eval.json");
    let o = lcm_bin(&[
        "eval",
        "--model",
        model,
        "--samples",
        "8",
        "--steps",
        steps,
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_figures_match(&eval_figures(&out), stored);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn shipped_teacher_reproduces_its_stored_eval_figures() {
    assert_eval_reproduced("tiny-teacher", "10", "shipped/eval-tiny-teacher.json");
}

#[test]
fn shipped_lcm_reproduces_its_stored_eval_figures() {
    assert_eval_reproduced("tiny", "4", "shipped/eval-tiny.json");
}

/// Seeds per prompt in the shape tests: enough that the bar ("more than half") sits several seeds
/// below every measured rate, so a last-bit change on another CPU cannot flip a prompt.
const SEEDS: u64 = 24;

/// Every prompt of `SHAPE_COLOUR_PROMPTS`, generated from `seeds` seeds as `lcm generate --model
/// NAME` would (`req`'s settings over the pipeline definition's defaults): the evaluator must find
/// the named shape and colour in most of each prompt's images.
fn assert_prompts_followed(name: &str, req: GenerateRequest, seeds: u64) -> Result<()> {
    common::setup();
    let src = lcm::pipeline::source::resolve(name)?;
    let pipe = Pipeline::new(&src.folder, &Device::Cpu, DType::F32)?;
    let ev = Evaluator::load(&lcm::eval::default_evaluator())?;
    let got = prompt_following(
        &pipe,
        &ev,
        &SHAPE_COLOUR_PROMPTS,
        &req,
        &src.defaults,
        seeds,
    )?;
    for f in &got {
        let seen = f.seen.join(", ");
        println!(
            "{}: shape {:.2} colour {:.2} ({seen})",
            f.prompt, f.shape, f.color
        );
    }
    let failed: Vec<_> = got.iter().filter(|f| !f.by_most_seeds()).collect();
    assert!(failed.is_empty(), "not followed: {failed:#?}");
    Ok(())
}

#[test]
// Measured 2026-12-06 over 24 seeds for the committed teacher (part 11, on whitened latents;
// shape / colour): circle, square 1.00 / 1.00; triangle, star, cross 0.96 / 1.00. Before the
// whitening (part 8) the green triangle on purple was 0.50 over 6 seeds.
fn shipped_teacher_follows_shape_and_colour() -> Result<()> {
    let req = GenerateRequest {
        steps: Some(25),
        ..Default::default()
    };
    assert_prompts_followed("tiny-teacher", req, SEEDS)
}

/// Must-show 2: the default model (`lcm generate` with no `--model`, at its own defaults: LCM,
/// 4 steps) draws the shape and colour a prompt names for most seeds.
// Measured 2026-12-06 over 24 seeds for the committed LCM (distilled from the part-11 teacher
// on whitened latents) at its pipeline's defaults (guidance 7.5; shape / colour): circle
// 0.92 / 1.00, square 1.00 / 0.96, triangle 0.71 / 1.00, star 0.71 / 0.92, cross 0.75 / 1.00:
// the weakest prompt is 4 seeds above the bar of 13 of 24. (The LCM before the whitening: the
// green triangle 0.17.)
#[test]
fn default_model_follows_shape_and_colour() -> Result<()> {
    assert_prompts_followed(
        lcm::pipeline::source::DEFAULT_MODEL,
        GenerateRequest::default(),
        SEEDS,
    )
}

/// The shipped VAE keeps what the evaluator reads: freshly rendered shapes (a seed no training
/// set used), encoded to the posterior mean and decoded, are still classified as their captions
/// say. This is the ceiling of every generated image's prompt accuracy.
#[test]
fn shipped_vae_reconstructions_keep_shape_colour_and_position() -> Result<()> {
    common::setup();
    let dir = lcm::pipeline::source::repo_root().join("weights/tiny-vae");
    let cfg = lcm::model::config::VaeConfig::load(&dir.join("config.json"))?;
    let vb = lcm::model::weights::load_weights(
        &lcm::model::folder::weight_files(&dir)?,
        DType::F32,
        &Device::Cpu,
    )?;
    let vae = lcm::model::vae::AutoencoderKL::new(&cfg, vb)?;
    let ev = Evaluator::load(&lcm::eval::default_evaluator())?;
    let (prompts, images) = common::rendered(48, 2024);
    let x = images
        .iter()
        .map(|i| lcm::data::image_tensor(i.clone(), "rendered", 64, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let x = candle_core::Tensor::stack(&x, 0)?;
    let decoded = vae.decode(&vae.encode(&x)?.mean)?;
    let recon =
        lcm::pipeline::image_io::to_rgb8(&lcm::pipeline::image_io::to_unit_nhwc(&decoded)?)?;
    let (real, rec) = (ev.score(&prompts, &images)?, ev.score(&prompts, &recon)?);
    println!("rendered {real:?}\nreconstructed {rec:?}");
    // Measured for the committed VAE (docs/training-log.md, stage 1, after two decoder fine-tunes):
    // the rendered images score 1.00 / 1.00 / 1.00, their reconstructions shape 0.94, colour
    // 0.94, position 1.00, all three 0.875 (after the first fine-tune: 0.92, 0.96, 1.00, 0.875;
    // before it: 0.81, 0.83, 0.96, 0.69). The bounds sit two to four images below that, so a
    // worse VAE fails.
    assert!(rec.attribute_accuracy["shape"] >= 0.85, "{rec:?}");
    assert!(rec.attribute_accuracy["color"] >= 0.9, "{rec:?}");
    assert!(rec.prompt_accuracy.unwrap() >= 0.8, "{rec:?}");
    assert!(real.prompt_accuracy.unwrap() >= 0.95, "{real:?}");
    Ok(())
}

/// Whoever samples from an opened pipeline — the server passes no defaults of its own — gets the
/// pipeline definition's (`pipelines/tiny.toml`: guidance 7.5), not only the folder's class
/// defaults (an LCM folder alone says 8.5); `--lora` defaults come first.
#[test]
fn an_opened_pipeline_samples_with_its_definitions_defaults() -> Result<()> {
    let (resolved, pipe) = Pipeline::open(Some("tiny"), None, &Device::Cpu, DType::F32)?;
    assert_eq!(resolved.defaults.guidance, Some(7.5));
    let req = GenerateRequest {
        prompt: "a red circle".into(),
        n: 1,
        ..Default::default()
    };
    let settings = pipe.resolve(&req, &Default::default())?;
    assert_eq!((settings.guidance, settings.steps), (7.5, 4));
    Ok(())
}
