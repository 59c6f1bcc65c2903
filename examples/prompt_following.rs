//! Measures how a model follows prompts naming a shape and a colour: the figures behind the
//! shipped models' shape test (tests/shipped.rs), for any model folder or pipeline name, e.g. a
//! training run's exported `model/` while it trains.
//!
//!   cargo run --release --example prompt_following -- MODEL [STEPS] [SEEDS] [GUIDANCE]
//!
//! STEPS defaults to the model's own (LCM 4, DDIM 25 as the test uses), GUIDANCE to the pipeline
//! definition's or the model's own, as `lcm generate`'s; SEEDS to 6. Environment:
//! PROMPTS="p1;p2;…" measures other prompts, SAMPLER (lcm, tcd, ddim) and GAMMA (TCD's) override
//! the model's sampler.
use anyhow::Context;
use candle_core::{DType, Device};
use lcm::eval::{prompt_following, Evaluator, SHAPE_COLOUR_PROMPTS};
use lcm::pipeline::{GenerateRequest, Pipeline};

fn main() -> anyhow::Result<()> {
    lcm::runtime::init_threads();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args
        .first()
        .context("usage: prompt_following MODEL [STEPS] [SEEDS] [GUIDANCE]")?;
    let arg = |i: usize, what: &str| -> anyhow::Result<Option<f64>> {
        args.get(i)
            .map(|s| s.parse().with_context(|| format!("{what} {s:?}")))
            .transpose()
    };
    let src = lcm::pipeline::source::resolve(model)?;
    let pipe = Pipeline::new(&src.folder, &Device::Cpu, DType::F32)?;
    let mut req = GenerateRequest {
        steps: arg(1, "STEPS")?.map(|s| s as usize),
        guidance: arg(3, "GUIDANCE")?,
        sampler: std::env::var("SAMPLER")
            .ok()
            .map(|s| s.parse())
            .transpose()?,
        tcd_gamma: std::env::var("GAMMA").ok().map(|s| s.parse()).transpose()?,
        ..Default::default()
    };
    if req.steps.is_none() && !pipe.unet.has_guidance_embedding() {
        req.steps = Some(25);
    }
    let seeds = arg(2, "SEEDS")?.map_or(6, |s| s as u64);
    let ev = Evaluator::load(&lcm::eval::default_evaluator())?;
    let custom = std::env::var("PROMPTS").ok();
    let custom: Vec<&str> = custom
        .as_deref()
        .map(|c| c.split(';').collect())
        .unwrap_or_default();
    let prompts: &[&str] = if custom.is_empty() {
        &SHAPE_COLOUR_PROMPTS
    } else {
        &custom
    };
    let got = prompt_following(&pipe, &ev, prompts, &req, &src.defaults, seeds)?;
    let mut passed = 0;
    for f in &got {
        passed += usize::from(f.by_most_seeds());
        println!(
            "{:45} shape {:.2} colour {:.2}  seen: {}",
            f.prompt,
            f.shape,
            f.color,
            f.seen.join(", ")
        );
    }
    println!("{passed}/{} prompts followed by most seeds", got.len());
    Ok(())
}
