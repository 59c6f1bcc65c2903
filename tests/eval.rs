//! The evaluator: the shipped classifier recognises freshly rendered real shapes (so its figures
//! on generated images mean something), `lcm eval` is deterministic and names bad input, and
//! `lcm pretrain evaluator` trains and exports a usable evaluator folder.

mod common;

use std::path::PathBuf;

use anyhow::Result;
use lcm::data::toy;
use lcm::eval::Evaluator;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use common::{assert_figures_match, eval_figures as figures, fixtures, lcm_bin, rendered};

fn shipped() -> PathBuf {
    lcm::eval::default_evaluator()
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lcm-eval-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn shipped_evaluator_recognises_real_shapes_and_separates_noise() -> Result<()> {
    common::setup();
    let ev = Evaluator::load(&shipped())?;
    let (prompts, images) = rendered(64, 12345);
    let real = ev.score(&prompts, &images)?;
    // Thresholds well under the held-out accuracy recorded in the evaluator's config.json.
    assert!(real.prompt_accuracy.unwrap() >= 0.85, "{real:?}");
    assert!(real.agreement >= 0.75, "{real:?}");
    assert_eq!(real.shape_prompts, 64);
    // The same prompts answered with the images shuffled: right kind of picture, wrong content.
    let mut shuffled = images.clone();
    shuffled.rotate_left(1);
    let wrong = ev.score(&prompts, &shuffled)?;
    assert!(wrong.prompt_accuracy.unwrap() <= 0.2, "{wrong:?}");
    assert!(wrong.agreement < 0.5 * real.agreement, "{wrong:?}");
    // Uniform noise lies far from the real distribution (measured: FID 6858 against 1433 for the
    // 64 rendered shapes, whose mix lacks the reference's emoji).
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let noise: Vec<image::RgbImage> = (0..64)
        .map(|_| {
            image::RgbImage::from_fn(64, 64, |_, _| {
                image::Rgb(std::array::from_fn(|_| rand::Rng::random(&mut rng)))
            })
        })
        .collect();
    let noisy = ev.score(&prompts, &noise)?;
    println!("real {real:?}\nshuffled {wrong:?}\nnoise {noisy:?}");
    assert!(
        real.fid < 0.25 * noisy.fid,
        "real {} noise {}",
        real.fid,
        noisy.fid
    );
    Ok(())
}

#[test]
fn eval_is_deterministic_and_names_bad_input() {
    common::setup();
    let dir = tmp("cli");
    let model = fixtures().join("tiny-lcm");
    let model = model.to_str().unwrap();
    let run = |out: &str| {
        let out = dir.join(out);
        let o = lcm_bin(&[
            "eval",
            "--model",
            model,
            "--samples",
            "6",
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let (a, b) = (run("a.json"), run("b.json"));
    let fa = figures(&a);
    assert_eq!(fa, figures(&b));
    assert!(fa["fid"].as_f64().unwrap() > 0.0);
    assert_eq!(fa["samples"], 6);
    assert_eq!(fa["steps"], 1);
    // The stored figures (tests/fixtures/PROVENANCE.md says how they were made).
    assert_figures_match(&fa, "eval-tiny-lcm.json");
    let md = std::fs::read_to_string(a.with_extension("md")).unwrap();
    assert!(
        md.contains("| FID ↓ |") && md.contains("| lcm | 1 |"),
        "{md}"
    );

    let bad: &[(&[&str], &str)] = &[
        (&["--samples", "1"], "--samples"),
        (&["--samples", "1000000"], "--samples"),
        (
            &["--evaluator", "/nonexistent/evaluator"],
            "/nonexistent/evaluator",
        ),
        (&["--batch-size", "0"], "--batch-size"),
        (&["--sampler", "euler-x"], "euler-x"),
    ];
    for (extra, needle) in bad {
        let mut args = vec!["eval", "--model", model, "--steps", "1"];
        args.extend_from_slice(extra);
        let o = lcm_bin(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && !err.contains("panicked"),
            "{args:?}: {err}"
        );
        let last = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        assert!(last.contains(needle), "{args:?}: {last}");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn pretrain_evaluator_exports_a_folder_that_eval_loads() -> Result<()> {
    common::setup();
    let dir = tmp("train");
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    toy::write_shapes(&dir.join("train"), 48, 32, 3)?;
    toy::write_shapes(&dir.join("heldout"), 12, 32, 4)?;
    std::fs::write(
        dir.join("config.json"),
        r#"{"resolution": 32, "channels": [4, 8], "feature_dim": 8}"#,
    )?;
    let train = |heldout: &str, out: &str, steps: &str| {
        lcm_bin(&[
            "pretrain",
            "evaluator",
            "--config",
            &s(dir.join("config.json")),
            "--data",
            &s(dir.join("train")),
            "--heldout",
            &s(dir.join(heldout)),
            "--output",
            &s(dir.join(out)),
            "--resolution",
            "32",
            "--max-steps",
            steps,
            "--batch-size",
            "8",
            "--save-every",
            "2",
        ])
    };
    let o = train("heldout", "run", "4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let losses = common::losses(&dir.join("run/metrics.jsonl"));
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|(_, l)| l.is_finite()));
    assert!(dir.join("run/checkpoints/checkpoint-00000002").is_dir());
    let ev = Evaluator::load(&dir.join("run/evaluator"))?;
    assert_eq!(ev.prompts.len(), 12);
    assert_eq!(ev.config.classes["shape"].len(), toy::SHAPES.len());
    assert!(ev.config.heldout_accuracy.contains_key("color"));
    assert!(ev.config.real_fid.unwrap().is_finite());
    // A missing held-out folder is named.
    let o = train("missing", "run2", "1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("missing"), "{err}");
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}
