//! TCD (no diffusers golden in the fixture set): its limits against LCM and its own formula.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lcm::model::config::SchedulerConfig;
use lcm::pipeline::source::Defaults;
use lcm::pipeline::{GenerateRequest, Pipeline};
use lcm::sample::noise::RecordedNoise;
use lcm::sample::sampler::{Sampler, SamplerKind, SamplerOptions};

fn lcm_sched() -> SchedulerConfig {
    SchedulerConfig::load(&fixtures().join("tiny-lcm/scheduler/scheduler_config.json")).unwrap()
}

fn run(
    pipe: &Pipeline,
    sampler: SamplerKind,
    gamma: f64,
    noise: Vec<Tensor>,
) -> anyhow::Result<Tensor> {
    let req = GenerateRequest {
        prompt: "a photo of a cat".into(),
        sampler: Some(sampler),
        steps: Some(4),
        guidance: Some(8.5),
        width: Some(32),
        height: Some(32),
        n: 1,
        tcd_gamma: Some(gamma),
        latents: Some(g("lcm4_init_latents")),
        ..Default::default()
    };
    let mut noise = RecordedNoise(noise.into());
    Ok(pipe
        .generate(&req, &Defaults::default(), &mut noise, &mut |_| {})?
        .latents)
}

#[test]
fn tcd_gamma_one_tracks_lcm_and_gamma_zero_is_deterministic() {
    setup();
    let pipe = Pipeline::load(&fixtures().join("tiny-lcm"), &Device::Cpu, DType::F32).unwrap();
    let noise: Vec<Tensor> = (0..3).map(|i| g(&format!("lcm4_noise_step{i}"))).collect();
    let lcm = run(&pipe, SamplerKind::Lcm, 0.0, noise.clone()).unwrap();
    let tcd1 = run(&pipe, SamplerKind::Tcd, 1.0, noise.clone()).unwrap();
    let tcd03 = run(&pipe, SamplerKind::Tcd, 0.3, noise.clone()).unwrap();
    let scale = max_abs(&lcm);
    let d1 = max_abs_diff(&lcm, &tcd1) / scale;
    let d03 = max_abs_diff(&lcm, &tcd03) / scale;
    eprintln!("relative difference to LCM: gamma 1 {d1:.2e}, gamma 0.3 {d03:.2e}");
    // gamma = 1 is LCM's multistep sampling except that diffusers' TCD re-noises from ᾱ_0 = 0.99915
    // instead of 1 and has no c_skip/c_out: a relative difference of order √(1−ᾱ_0) ≈ 0.03·|ε|/|x|.
    assert!(d1 < 5e-3, "TCD gamma 1 vs LCM: relative {d1:.2e}");
    assert!(
        d03 > 10.0 * d1,
        "gamma 0.3 should differ from LCM far more than gamma 1 ({d03:.2e} vs {d1:.2e})"
    );
    // gamma = 0 draws no noise at all: an empty noise source must suffice.
    let a = run(&pipe, SamplerKind::Tcd, 0.0, vec![]).unwrap();
    let b = run(&pipe, SamplerKind::Tcd, 0.0, vec![]).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // LCM with 4 steps needs exactly 3 draws.
    assert!(run(&pipe, SamplerKind::Lcm, 0.0, noise[..2].to_vec()).is_err());
}

#[test]
fn tcd_step_follows_the_published_update() {
    setup();
    let cfg = lcm_sched();
    let s = Sampler::new(
        SamplerKind::Tcd,
        &cfg,
        4,
        SamplerOptions {
            tcd_gamma: 0.3,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.timesteps, vec![999, 759, 499, 259]);
    let x = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &Device::Cpu).unwrap();
    let eps = Tensor::new(&[[0.1f32, 0.2], [-0.3, 0.4]], &Device::Cpu).unwrap();
    let z = Tensor::new(&[[1.0f32, -1.0], [0.5, 0.0]], &Device::Cpu).unwrap();
    let out = s
        .step(0, &eps, &x, &mut RecordedNoise(vec![z.clone()].into()))
        .unwrap();
    // Step 0: t = 999, next t = 759, s = floor(0.7·759) = 531.
    let ac = &s.schedule.alphas_cumprod;
    let (a_t, a_prev, a_s) = (ac[999], ac[759], ac[531]);
    let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let es: Vec<f32> = eps.flatten_all().unwrap().to_vec1().unwrap();
    let zs: Vec<f32> = z.flatten_all().unwrap().to_vec1().unwrap();
    let got: Vec<f32> = out.prev_sample.flatten_all().unwrap().to_vec1().unwrap();
    for i in 0..4 {
        let (x, e, z) = (xs[i] as f64, es[i] as f64, zs[i] as f64);
        let x0 = (x - (1.0 - a_t).sqrt() * e) / a_t.sqrt();
        let xs_ = a_s.sqrt() * x0 + (1.0 - a_s).sqrt() * e;
        let expect = (a_prev / a_s).sqrt() * xs_ + (1.0 - a_prev / a_s).sqrt() * z;
        assert!(
            (got[i] as f64 - expect).abs() < 1e-4 * expect.abs().max(1.0),
            "element {i}: {} vs {expect}",
            got[i]
        );
    }
}
