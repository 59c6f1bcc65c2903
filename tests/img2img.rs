//! Image-to-image against diffusers (tests/fixtures/img2img, made by
//! scripts/make_img2img_golden.py): LCM img2img on tiny-lcm (strength 0.5, 4 steps) and SD
//! img2img with DDIM on tiny-sd (strength 0.75, 10 steps → 7 run, CFG with a negative prompt),
//! from the same init image with diffusers' normal draws replayed in order. Every step's latents
//! and the image within the tolerances of tests/parity.rs.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, setup};
use lcm::pipeline::source::Defaults;
use lcm::pipeline::{GenerateRequest, Pipeline};
use lcm::sample::noise::RecordedNoise;
use lcm::sample::sampler::SamplerKind;

fn golden() -> &'static HashMap<String, Tensor> {
    static G: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    G.get_or_init(|| {
        candle_core::safetensors::load(fixtures().join("img2img/golden.safetensors"), &Device::Cpu)
            .unwrap()
    })
}

fn g(name: &str) -> Tensor {
    golden()
        .get(name)
        .unwrap_or_else(|| panic!("golden {name} missing"))
        .clone()
}

/// The init image as diffusers' image processor hands it to the VAE: [1, 3, H, W] in [−1, 1].
fn init_image() -> Tensor {
    let img = image::open(fixtures().join("img2img/init.png"))
        .unwrap()
        .to_rgb8();
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Tensor::from_vec(data, (1, h as usize, w as usize, 3), &Device::Cpu)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
        .affine(2.0, -1.0)
        .unwrap()
}

fn check(run: &str, pipe: &Pipeline, req: GenerateRequest) {
    let draws: Vec<Tensor> = (0..)
        .map_while(|k| golden().get(&format!("noise_{run}_{k}")).cloned())
        .collect();
    let mut noise = RecordedNoise(draws.into());
    let mut steps = 0;
    let gen = pipe
        .generate(&req, &Defaults::default(), &mut noise, &mut |ev| {
            let i = ev.index;
            assert_close(
                &format!("{run} latents step {i}"),
                &ev.output.prev_sample,
                &g(&format!("{run}_step_{i}")),
                1e-4,
                1e-5,
            );
            steps += 1;
        })
        .unwrap();
    assert!(noise.0.is_empty(), "{} draws left unused", noise.0.len());
    assert!(golden().contains_key(&format!("{run}_step_{}", steps - 1)));
    assert!(!golden().contains_key(&format!("{run}_step_{steps}")));
    assert_close(
        &format!("{run} image"),
        &gen.images_unit,
        &g(&format!("{run}_image")),
        1e-4,
        0.0,
    );
}

#[test]
fn lcm_img2img_matches_diffusers() {
    setup();
    let pipe = Pipeline::load(&fixtures().join("tiny-lcm"), &Device::Cpu, DType::F32).unwrap();
    let req = GenerateRequest {
        prompt: "a photo of a cat".into(),
        sampler: Some(SamplerKind::Lcm),
        steps: Some(4),
        guidance: Some(8.5),
        width: Some(32),
        height: Some(32),
        n: 1,
        init_image: Some(init_image()),
        strength: Some(0.5),
        ..Default::default()
    };
    check("lcm", &pipe, req);
}

#[test]
fn sd_img2img_with_ddim_cfg_and_negative_prompt_matches_diffusers() {
    setup();
    let pipe = Pipeline::load(&fixtures().join("tiny-sd"), &Device::Cpu, DType::F32).unwrap();
    let req = GenerateRequest {
        prompt: "a photo of a cat".into(),
        negative_prompt: Some("blurry".into()),
        sampler: Some(SamplerKind::Ddim),
        steps: Some(10),
        guidance: Some(7.5),
        width: Some(32),
        height: Some(32),
        n: 1,
        init_image: Some(init_image()),
        strength: Some(0.75),
        ..Default::default()
    };
    check("sd", &pipe, req);
}

/// `lcm generate --init-image`: runs and writes an image at the init image's size; strength at
/// its ends behaves as diffusers' (1: the whole grid from t = 999, where the image still weighs
/// √ᾱ ≈ 0.07, so the output differs from text-to-image; a strength leaving fewer distillation
/// timesteps than steps is refused); bad inputs are one-line errors naming the flag.
#[test]
fn cli_img2img_runs_and_refuses_bad_input() {
    let dir = std::env::temp_dir().join(format!("lcm-img2img-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let init = fixtures().join("img2img/init.png");
    let model = fixtures().join("tiny-lcm");
    let run = |extra: &[&str], out: &str| {
        let out = dir.join(out);
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--seed",
            "3",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = common::lcm_bin(&args);
        (o, out)
    };
    let (o, out) = run(
        &["--init-image", init.to_str().unwrap(), "--strength", "0.5"],
        "a.png",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = image::open(&out).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), (32, 32));
    let (o, out) = run(
        &["--init-image", init.to_str().unwrap(), "--strength", "1"],
        "full.png",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let full = image::open(&out).unwrap().to_rgb8();
    let (o, out) = run(&[], "t2i.png");
    assert!(o.status.success());
    let t2i = image::open(&out).unwrap().to_rgb8();
    assert_ne!(full.as_raw(), t2i.as_raw());
    assert_ne!(full.as_raw(), a.as_raw());
    // Resized to a requested size.
    let (o, out) = run(
        &[
            "--init-image",
            init.to_str().unwrap(),
            "--width",
            "16",
            "--height",
            "16",
        ],
        "small.png",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (16, 16));
    let not_image = dir.join("x.png");
    std::fs::write(&not_image, b"not a png").unwrap();
    for (extra, needle) in [
        (
            vec!["--strength", "0.5"],
            "--strength needs an --init-image",
        ),
        (
            vec!["--init-image", init.to_str().unwrap(), "--strength", "0.05"],
            "--strength 0.05",
        ),
        (
            vec!["--init-image", init.to_str().unwrap(), "--strength", "1.5"],
            "strength must be in (0, 1]",
        ),
        (
            vec!["--init-image", not_image.to_str().unwrap()],
            "--init-image",
        ),
        (vec!["--init-image", "/nonexistent.png"], "--init-image"),
    ] {
        let (o, _) = run(&extra, "bad.png");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(e.contains(needle), "{extra:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
