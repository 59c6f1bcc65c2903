//! bf16 inference on the CPU (`--dtype bf16`: weights packed as bf16 for the AMX kernels, f32
//! activations) against f32: one U-Net evaluation (fixtures, and SD1.5 size where the CPU has AMX
//! tiles), the VAE decoder on its own, and the shipped model's 4-step generation with one seed.
//! Where the CPU has no AMX the same packed weights run on the portable loop, so the layouts and
//! the model plumbing are checked on every machine; each test prints which path ran.
//!
//! Bounds (issue 25): relative L2 ≤ 2e-2 and cosine ≥ 0.999 per evaluation, ≥ 30 dB PSNR for a
//! generation. All of the error is bf16's 8-bit mantissa on the inputs of each product (sums
//! are f32): rounding one operand gives ≈ 2⁻⁹ relative error per product, ≈ 3e-3 after the
//! layers average it.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lcm::model::config::{UNetConfig, VaeConfig};
use lcm::model::folder::weight_files;
use lcm::model::unet::UNet2DConditionModel;
use lcm::model::vae::AutoencoderKL;
use lcm::model::weights::load_weights;
use lcm::pipeline::{GenerateRequest, Pipeline};
use lcm::sample::noise::SeededNoise;

fn path() -> String {
    lcm::kernels::cpu::path(DType::BF16)
}

/// (relative L2 error, cosine) of `got` against `want`.
fn compare(got: &Tensor, want: &Tensor) -> (f64, f64) {
    let a = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = want.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let dot = |x: &Tensor, y: &Tensor| {
        (x * y)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (ab, aa, bb) = (dot(&a, &b), dot(&a, &a), dot(&b, &b));
    let diff = (&a - &b).unwrap();
    ((dot(&diff, &diff) / bb).sqrt(), ab / (aa * bb).sqrt())
}

fn assert_parity(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}");
    let (rel, cos) = compare(got, want);
    println!(
        "{what}: bf16 vs f32 relative L2 {rel:.2e}, cosine {cos:.6} ({})",
        path()
    );
    assert!(
        rel <= 2e-2 && cos >= 0.999,
        "{what}: relative L2 {rel:.3e}, cosine {cos:.6}"
    );
}

fn unet_from(dir: &std::path::Path, bf16: bool) -> UNet2DConditionModel {
    let cfg = UNetConfig::load(&dir.join("config.json")).unwrap();
    let build = || {
        let vb = load_weights(&weight_files(dir).unwrap(), DType::F32, &Device::Cpu).unwrap();
        UNet2DConditionModel::new(&cfg, vb).unwrap()
    };
    if bf16 {
        lcm::nn::with_bf16_weights(build)
    } else {
        build()
    }
}

#[test]
fn fixture_unets_in_bf16_match_f32() {
    setup();
    let (sample, ts, ctx) = (
        g("unet_sample"),
        g("unet_timesteps"),
        g("unet_encoder_hidden_states"),
    );
    let wemb = lcm::nn::guidance_embedding(&g("unet_w"), 32).unwrap();
    for (model, w) in [("tiny-lcm", Some(&wemb)), ("tiny-sd", None)] {
        let dir = fixtures().join(model).join("unet");
        let want = unet_from(&dir, false)
            .forward(&sample, &ts, &ctx, w)
            .unwrap();
        let got = unet_from(&dir, true)
            .forward(&sample, &ts, &ctx, w)
            .unwrap();
        assert_parity(&format!("{model} U-Net"), &got, &want);
    }
}

#[test]
fn fixture_vae_decoder_in_bf16_matches_f32() {
    setup();
    let dir = fixtures().join("tiny-lcm/vae");
    let cfg = VaeConfig::load(&dir.join("config.json")).unwrap();
    let build = || {
        let vb = load_weights(&weight_files(&dir).unwrap(), DType::F32, &Device::Cpu).unwrap();
        AutoencoderKL::new(&cfg, vb).unwrap()
    };
    let z = Tensor::randn(0f32, 1.0, (2, cfg.latent_channels, 8, 8), &Device::Cpu).unwrap();
    let want = build().decode(&z).unwrap();
    let got = lcm::nn::with_bf16_weights(build).decode(&z).unwrap();
    assert_parity("tiny-lcm VAE decoder", &got, &want);
}

/// The shipped default model's 4-step generation (its defaults: LCM, guidance 7.5 through the
/// w-embedding) with one seed, bf16 against f32.
#[test]
fn shipped_four_step_image_in_bf16_is_within_30_db() {
    setup();
    let make = |dtype| {
        let (_, pipe) = Pipeline::open(None, None, &Device::Cpu, dtype).unwrap();
        let req = GenerateRequest {
            prompt: "a large red circle in the center on a blue background".into(),
            n: 2,
            seed: 7,
            ..Default::default()
        };
        let mut noise = SeededNoise::new(7);
        pipe.generate(&req, &Default::default(), &mut noise, &mut |_| {})
            .unwrap()
    };
    let (want, got) = (make(DType::F32), make(DType::BF16));
    assert_eq!(got.settings.steps, 4);
    for (i, (a, b)) in got.images.iter().zip(&want.images).enumerate() {
        let db = psnr(a, b);
        println!(
            "shipped 4-step image {i}: bf16 vs f32 PSNR {db:.1} dB ({})",
            path()
        );
        assert!(db >= 30.0, "image {i}: PSNR {db:.1} dB");
    }
}

/// One SD1.5-size U-Net evaluation (random weights, 64² latent, batch 1): only where the CPU has
/// AMX tiles (the portable loop would take minutes at 0.8 TFLOP).
#[test]
fn sd15_size_unet_in_bf16_matches_f32() {
    setup();
    if !lcm::kernels::amx::available() {
        println!(
            "not run: no AMX tiles in use here (a CPU without them, or LCM_NO_AMX set): {}",
            lcm::kernels::cpu::path(DType::BF16)
        );
        return;
    }
    let cfg: UNetConfig = serde_json::from_str(include_str!("../benches/sd15/unet.json")).unwrap();
    let dev = Device::Cpu;
    // The same weights twice: the random backend seeds each tensor by its name.
    let seeded = |bf16: bool| {
        let build = || {
            UNet2DConditionModel::new(&cfg, lcm::tools::bench::random_vb(DType::F32, &dev)).unwrap()
        };
        if bf16 {
            lcm::nn::with_bf16_weights(build)
        } else {
            build()
        }
    };
    let x = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (1, 77, cfg.cross_attention_dim), &dev).unwrap();
    let t = Tensor::new(&[499f32], &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (1, 256), &dev).unwrap();
    let want = seeded(false).forward(&x, &t, &ctx, Some(&w)).unwrap();
    let got = seeded(true).forward(&x, &t, &ctx, Some(&w)).unwrap();
    assert_parity("SD1.5-size U-Net", &got, &want);
}

/// `lcm generate --dtype bf16`: refused in one line naming the flag and AMX where no tiles are in
/// use (forced here with LCM_NO_AMX); where the CPU has them, it runs and prints that path.
/// Without `--dtype` (auto) it runs either way: bf16 on the tiles where they are in use, f32
/// where not.
#[test]
fn the_cli_runs_bf16_on_amx_and_refuses_it_without() {
    let out = std::env::temp_dir().join(format!("lcm-bf16-cli-{}.png", std::process::id()));
    let run = |no_amx: bool, dtype: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_lcm"));
        c.args(["generate", "--prompt", "a red circle", "--steps", "2"]);
        if let Some(d) = dtype {
            c.args(["--dtype", d]);
        }
        c.arg("--output").arg(&out).env("CANDLE_NUM_THREADS", "1");
        if no_amx {
            c.env("LCM_NO_AMX", "1");
        }
        c.output().unwrap()
    };
    let o = run(true, Some("bf16"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!o.status.success(), "bf16 without tiles ran");
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("--dtype bf16") && lines[0].contains("AMX"),
        "{stderr}"
    );
    // The default without tiles: f32.
    let o = run(true, None);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("kernels: ") && !stdout.contains("AMX bf16 tiles"),
        "{stdout}"
    );
    if !lcm::kernels::amx::available() {
        println!("the AMX runs are not checked: no AMX tiles in use here");
        return;
    }
    for dtype in [Some("bf16"), None] {
        let o = run(false, dtype);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            stdout.contains("kernels: AMX bf16 tiles"),
            "{dtype:?}: {stdout}"
        );
    }
    std::fs::remove_file(&out).ok();
}
