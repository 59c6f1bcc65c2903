//! Motion data: the HumanML3D-layout loader on a miniature written by NumPy in exactly the
//! dataset's layout (tests/fixtures/humanml3d-mini, made by scripts/make_humanml3d_mini.py).

use std::path::PathBuf;

use lcm::data::humanml3d::{load, LoadOptions};
use lcm::motion::FEATURES;

fn mini() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/humanml3d-mini")
}

/// The fixture's raw value at frame t, feature k, and its normalised form.
fn raw(t: usize, k: usize) -> f32 {
    (t as f64 + k as f64 / 1000.0) as f32
}
fn normalised(t: usize, k: usize) -> f32 {
    let (mean, std) = ((0.01 * k as f64) as f32, (1.0 + 0.001 * k as f64) as f32);
    (raw(t, k) - mean) / std
}

#[test]
fn the_loader_reads_clips_spans_and_captions_and_normalises() {
    let d = load(&mini(), "train", &LoadOptions::default()).unwrap();
    let names: Vec<&str> = d.clips.iter().map(|c| c.name.as_str()).collect();
    // 000002 has only an 18-frame span (< 40); 000004 is listed but has no files.
    assert_eq!(names, ["000001", "000003", "000003#1#3.5"]);
    assert_eq!(d.out_of_bounds, 1);
    assert_eq!(d.unreadable, ["000004"]);

    let walk = &d.clips[0];
    assert_eq!(walk.frames, 60);
    assert_eq!(walk.features.len(), 60 * FEATURES);
    // A NaN span means the whole clip, as 0#0 does.
    let texts: Vec<&str> = walk.captions.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(texts, ["a person walks forward.", "someone strolls ahead"]);
    assert_eq!(
        walk.captions[1].tokens,
        ["someone/PRON", "stroll/VERB", "ahead/ADV"]
    );
    for (t, k) in [(0, 0), (5, 7), (59, 262)] {
        let got = walk.features[t * FEATURES + k];
        assert!((got - normalised(t, k)).abs() < 1e-6, "({t}, {k}): {got}");
    }

    // A captioned span of 1.0–3.5 s is frames 20..70 of an f8 file.
    let span = &d.clips[2];
    assert_eq!(span.frames, 50);
    assert_eq!(span.captions.len(), 2);
    assert!((span.features[3] - normalised(20, 3)).abs() < 1e-6);

    // Denormalising gives the file's numbers back.
    let back = d.denormalise(&walk.features);
    assert!((back[5 * FEATURES + 7] - raw(5, 7)).abs() < 1e-5);

    let test = load(&mini(), "test", &LoadOptions::default()).unwrap();
    assert_eq!(test.clips.len(), 2);
}

#[test]
fn the_loader_names_what_is_missing() {
    let e = load(&mini(), "nosuchsplit", &LoadOptions::default()).unwrap_err();
    assert!(format!("{e:#}").contains("nosuchsplit.txt"), "{e:#}");
    let e = load(&mini().join("texts"), "train", &LoadOptions::default()).unwrap_err();
    assert!(format!("{e:#}").contains("Mean.npy"), "{e:#}");
    // Bounds that leave nothing are an error, not an empty dataset.
    let none = LoadOptions {
        min_frames: 1000,
        max_frames: 2000,
    };
    assert!(load(&mini(), "train", &none).is_err());
}
