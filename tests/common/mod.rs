//! Helpers shared by the integration tests: fixture paths, golden tensors, tolerance checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

/// Tests run in parallel on 2 cores: candle's spin-waiting thread pool must not oversubscribe.
pub fn setup() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(lcm::runtime::init_threads);
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn golden() -> &'static HashMap<String, Tensor> {
    static G: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    G.get_or_init(|| {
        candle_core::safetensors::load(fixtures().join("golden.safetensors"), &Device::Cpu)
            .expect("tests/fixtures/golden.safetensors")
    })
}

pub fn g(name: &str) -> Tensor {
    golden()
        .get(name)
        .unwrap_or_else(|| panic!("golden tensor {name} missing"))
        .clone()
}

pub fn golden_json() -> &'static serde_json::Value {
    static J: OnceLock<serde_json::Value> = OnceLock::new();
    J.get_or_init(|| {
        let text = std::fs::read_to_string(fixtures().join("golden.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

/// Largest |a − b| after casting both to f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Assert |actual − expected| ≤ atol + rtol·max|expected| everywhere (the fixture README's rule).
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) {
    let diff = max_abs_diff(actual, expected);
    let bound = atol + rtol * max_abs(expected);
    if std::env::var("LCM_TEST_VERBOSE").is_ok() {
        eprintln!(
            "{name}: max abs diff {diff:.3e} (bound {bound:.3e}, max ref {:.3})",
            max_abs(expected)
        );
    }
    assert!(
        diff <= bound,
        "{name}: max abs diff {diff:.3e} exceeds {bound:.3e}"
    );
}

/// A fixture U-Net (`tiny-lcm` or `tiny-sd`) with frozen f32 weights.
pub fn fixture_unet(model: &str) -> lcm::model::unet::UNet2DConditionModel {
    load_unet(&fixtures().join(model).join("unet"))
}

/// A U-Net folder (config.json + weights) in f32 on the CPU.
pub fn load_unet(dir: &std::path::Path) -> lcm::model::unet::UNet2DConditionModel {
    let cfg = lcm::model::config::UNetConfig::load(&dir.join("config.json")).unwrap();
    let files = lcm::model::folder::weight_files(dir).unwrap();
    let vb = lcm::model::weights::load_weights(&files, DType::F32, &Device::Cpu).unwrap();
    lcm::model::unet::UNet2DConditionModel::new(&cfg, vb).unwrap()
}

/// Run the `lcm` binary (one candle element-wise thread, as in the other tests).
pub fn lcm_bin(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lcm"))
        .args(args)
        .env("CANDLE_NUM_THREADS", "1")
        .output()
        .unwrap()
}

/// (step, loss) of every line of a run's metrics.jsonl.
pub fn losses(metrics: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// The figures `lcm eval` wrote to `path`, without the timing (which varies run to run).
pub fn eval_figures(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("ms_per_image");
    v
}

/// `lcm eval` figures against those stored in tests/fixtures/`stored` (PROVENANCE.md there): the
/// scores to 1e-4 relative (the sums run in another order on other CPUs), the rest exactly.
pub fn assert_figures_match(got: &serde_json::Value, stored: &str) {
    let text = std::fs::read_to_string(fixtures().join(stored)).unwrap();
    let want: serde_json::Value = serde_json::from_str(&text).unwrap();
    for k in ["fid", "agreement", "prompt_accuracy"] {
        let (g, w) = (got[k].as_f64().unwrap(), want[k].as_f64().unwrap());
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1e-3),
            "{k}: {g} vs stored {w} ({stored})"
        );
    }
    for k in [
        "attribute_accuracy",
        "shape_prompts",
        "samples",
        "steps",
        "sampler",
    ] {
        assert_eq!(got[k], want[k], "{k} ({stored})");
    }
}

/// Rendered shapes with full captions (from a seed the training and held-out sets never used).
pub fn rendered(n: usize, seed: u64) -> (Vec<lcm::eval::EvalPrompt>, Vec<image::RgbImage>) {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let a = lcm::data::toy::random_attrs(&mut rng);
            let img = lcm::data::toy::render(&a, 64, &mut rng);
            let p = lcm::eval::EvalPrompt {
                text: lcm::data::toy::caption(&a, 0),
                category: Some("shape".into()),
            };
            (p, img)
        })
        .unzip()
}

/// `out` of an `lcm` run that must have succeeded (its stderr shown when it did not).
pub fn ok(out: std::process::Output) -> std::process::Output {
    assert!(
        out.status.success(),
        "lcm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Peak signal-to-noise ratio of two 8-bit images, in dB (∞ when equal).
pub fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.as_raw().len() as f64;
    10.0 * (255f64.powi(2) / mse).log10()
}
