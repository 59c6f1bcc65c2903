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

// ---------------------------------------------------------------- real motion capture

mod common;

use lcm::motion::features::{between, canonicalise, chain_positions, chain_rotations};
use lcm::motion::skeleton::{bone_lengths, facing, Pose, REFERENCE_BONES};
use lcm::motion::{deepmimic, retarget};

/// DeepMimic clips copied from PyPI pybullet 3.2.7 (tests/fixtures/PROVENANCE.md): name, frames,
/// seconds per frame.
const DEEPMIMIC: [(&str, usize, f64); 4] = [
    ("humanoid3d_walk.txt", 39, 1.0 / 30.0),
    ("humanoid3d_backflip.txt", 29, 1.0 / 16.0),
    ("humanoid3d_run.txt", 25, 1.0 / 30.0),
    ("walker_turn_left0.txt", 38, 1.0 / 30.0),
];

fn deepmimic_dir() -> PathBuf {
    mini().parent().unwrap().join("mocap/deepmimic")
}

fn max_dist(a: &[Pose], b: &[Pose]) -> f64 {
    a.iter()
        .zip(b)
        .flat_map(|(p, q)| p.iter().zip(q).map(|(x, y)| (x - y).norm()))
        .fold(0.0, f64::max)
}

/// Parse with the real frame counts; retarget to 20 fps on the reference skeleton; then the round
/// trips the representation promises, on real motion.
#[test]
fn real_clips_parse_retarget_and_round_trip() {
    for (name, frames, dt) in DEEPMIMIC {
        let clip = deepmimic::read(&deepmimic_dir().join(name)).unwrap();
        assert_eq!(clip.joints.len(), frames, "{name}");
        assert!((clip.dt - dt).abs() < 1e-4, "{name}: dt {}", clip.dt);
        let at20 = retarget::resample(&clip.joints, 1.0 / clip.dt, 20.0).unwrap();
        let want = ((frames - 1) as f64 * clip.dt * 20.0 + 1e-9).floor() as usize + 1;
        assert_eq!(at20.len(), want, "{name}");
        let joints = canonicalise(&retarget::uniform_skeleton(&at20).unwrap()).unwrap();

        // Bone lengths are the reference skeleton's on every frame.
        let mut worst = 0f64;
        for pose in &joints {
            let b = bone_lengths(pose);
            for j in 1..22 {
                worst = worst.max((b[j] - REFERENCE_BONES[j]).abs());
            }
        }
        assert!(worst < 1e-9, "{name}: bone length off by {worst} m");

        // Rotations → forward kinematics → the same positions (within 1 mm; in fact ~1e-15).
        let fk: Vec<Pose> = joints
            .iter()
            .map(|p| {
                let r = chain_rotations(p, between(&facing(p), &nalgebra::Vector3::z()));
                chain_positions(&r, &REFERENCE_BONES, p[0])
            })
            .collect();
        let d = max_dist(&fk, &joints);
        assert!(d < 1e-3, "{name}: FK differs by {d} m");

        // Joints → features → joints within 1e-4 m.
        let f = lcm::motion::features(&joints, &Default::default()).unwrap();
        let back = lcm::motion::joints_from_features(&f).unwrap();
        let d = max_dist(&back, &joints[..joints.len() - 1]);
        assert!(d < 1e-4, "{name}: features round trip differs by {d} m");
        println!(
            "{name}: {frames} frames at {:.0} fps → {} at 20 fps; FK {:.1e} m, features {d:.1e} m",
            1.0 / dt,
            joints.len(),
            max_dist(&fk, &joints)
        );
    }
}

#[test]
fn deepmimic_files_of_another_character_are_refused() {
    let dir = std::env::temp_dir().join(format!("lcm-dm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("dog.txt");
    std::fs::write(&p, r#"{"Loop": "wrap", "Frames": [[0.06, 1, 2, 3]]}"#).unwrap();
    let e = deepmimic::read(&p).err().unwrap().to_string();
    assert!(e.contains("frame 0 has 4 numbers"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `lcm motion convert` and `render` on a real clip: JSON, HumanML3D .npy and BVH out, read back
/// to the same joints; a GIF and a PNG strip; an unknown format named.
#[test]
fn motion_cli_converts_and_renders() {
    let dir = std::env::temp_dir().join(format!("lcm-motion-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = deepmimic_dir().join("humanoid3d_walk.txt");
    let s = src.to_str().unwrap();
    let out = |f: &str| dir.join(f).to_str().unwrap().to_string();
    for target in ["walk.json", "walk.npy", "walk.bvh", "walk.gif", "walk.png"] {
        let verb = if [".json", ".npy", ".bvh"]
            .iter()
            .any(|e| target.ends_with(e))
        {
            "convert"
        } else {
            "render"
        };
        let o = common::lcm_bin(&["motion", verb, s, "--output", &out(target)]);
        assert!(
            o.status.success(),
            "{target}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let (json, fps) = lcm::motion::io::read_json(&dir.join("walk.json")).unwrap();
    assert_eq!((json.len(), fps), (26, 20.0));
    let f = lcm::motion::npy::read(&dir.join("walk.npy")).unwrap();
    assert_eq!(f.shape, [25, 263]);
    let back = lcm::motion::joints_from_features(&f.data).unwrap();
    assert!(max_dist(&back, &json[..25]) < 1e-4);
    // The BVH converts back to the same joints (our writer, our reader, the 22-joint chain).
    let o = common::lcm_bin(&[
        "motion",
        "convert",
        &out("walk.bvh"),
        "--output",
        &out("back.json"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (bvh_back, _) = lcm::motion::io::read_json(&dir.join("back.json")).unwrap();
    assert_eq!(bvh_back.len(), json.len());
    assert!(
        max_dist(&bvh_back, &json) < 1e-3,
        "{}",
        max_dist(&bvh_back, &json)
    );
    let gif = std::fs::read(dir.join("walk.gif")).unwrap();
    assert_eq!(&gif[..6], b"GIF89a");
    let png = image::open(dir.join("walk.png")).unwrap();
    assert_eq!(png.height(), 192);
    // Two clips in one GIF, one per row: each frame holds both, the shorter holding its last pose.
    let o = common::lcm_bin(&[
        "motion",
        "render",
        &out("walk.json"),
        &out("walk.npy"),
        "--cols",
        "1",
        "--output",
        &out("grid.gif"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dec = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
        std::fs::File::open(dir.join("grid.gif")).unwrap(),
    ))
    .unwrap();
    let frames = image::AnimationDecoder::into_frames(dec)
        .collect_frames()
        .unwrap();
    assert_eq!(frames.len(), 26);
    assert_eq!(frames[0].buffer().dimensions(), (384, 384));
    let o = common::lcm_bin(&["motion", "render", s, "--output", &out("walk.bmp")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(".gif or .png"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------- BVH

use lcm::motion::bvh::Bvh;

fn bvh_dir() -> PathBuf {
    mini().parent().unwrap().join("mocap/bvh")
}

/// Excerpts of the CMU and boxing BVH files of Debian's assimp-testmodels: hierarchy, channel
/// orders and frame rates as the files declare them.
#[test]
fn bvh_sources_parse_and_retarget() {
    for (name, joints, frames, fps) in [
        ("01_01_excerpt.bvh", 31, 240, 120.0),
        ("Boxing_Toes_excerpt.bvh", 21, 200, 100.0),
    ] {
        let bvh = Bvh::read(&bvh_dir().join(name)).unwrap();
        assert_eq!(bvh.joints.len(), joints, "{name}");
        assert_eq!(bvh.frames.len(), frames, "{name}");
        assert!((1.0 / bvh.frame_time - fps).abs() < 0.01, "{name}");
        let (src, src_fps) = bvh.to_joints().unwrap();
        let at20 = retarget::resample(&src, src_fps, 20.0).unwrap();
        let ours = canonicalise(&retarget::uniform_skeleton(&at20).unwrap()).unwrap();
        for pose in &ours {
            let b = bone_lengths(pose);
            for j in 1..22 {
                assert!((b[j] - REFERENCE_BONES[j]).abs() < 1e-9, "{name}");
            }
        }
        // The root stays above the floor and the clip starts facing +Z.
        assert!(ours.iter().all(|p| p[0].y > 0.3), "{name}");
        assert!((facing(&ours[0]) - nalgebra::Vector3::z()).norm() < 1e-9);
    }
}

/// Our BVH export: the 22-joint chain with local rotations. Written → read by our reader → the
/// same file; its forward kinematics gives back the clip it was made from.
#[test]
fn bvh_export_round_trips() {
    let clip = deepmimic::read(&deepmimic_dir().join("humanoid3d_walk.txt")).unwrap();
    let at20 = retarget::resample(&clip.joints, 1.0 / clip.dt, 20.0).unwrap();
    let ours = canonicalise(&retarget::uniform_skeleton(&at20).unwrap()).unwrap();
    let bvh = Bvh::from_joints(&ours, 20.0).unwrap();
    let dir = std::env::temp_dir().join(format!("lcm-bvh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("walk.bvh");
    bvh.write(&path).unwrap();
    let back = Bvh::read(&path).unwrap();
    assert_eq!(back.joints.len(), 22);
    for (a, b) in back.joints.iter().zip(&bvh.joints) {
        assert_eq!(
            (&a.name, a.parent, &a.channels),
            (&b.name, b.parent, &b.channels)
        );
        assert!((a.offset - b.offset).norm() < 1e-6);
    }
    assert_eq!(back.frames.len(), bvh.frames.len());
    for (ra, rb) in back.frames.iter().zip(&bvh.frames) {
        for (a, b) in ra.iter().zip(rb) {
            assert!((a - b).abs() <= 5e-7, "{a} vs {b}");
        }
    }
    let (fk, fps) = back.to_joints().unwrap();
    assert_eq!(fps, 20.0);
    let d = max_dist(&fk, &ours);
    println!("BVH export → read → FK: max {d:.2e} m from the clip");
    assert!(d < 1e-3, "exported BVH reproduces the clip within {d} m");
    // And a CMU clip, whose pelvis is not rigid: the spine exact, the hips nearly.
    let bvh = Bvh::read(&bvh_dir().join("01_01_excerpt.bvh")).unwrap();
    let (src, fps) = bvh.to_joints().unwrap();
    let at20 = retarget::resample(&src, fps, 20.0).unwrap();
    let cmu = canonicalise(&retarget::uniform_skeleton(&at20).unwrap()).unwrap();
    let (fk, _) = Bvh::from_joints(&cmu, 20.0).unwrap().to_joints().unwrap();
    let d = max_dist(&fk, &cmu);
    println!("CMU 01_01 through our BVH: max {d:.2e} m");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn broken_bvh_files_are_named_with_the_line() {
    let e = Bvh::parse("HIERARCHY\nROOT Hips\n{\n OFFSET 0 0 x\n").unwrap_err();
    assert!(e.to_string().contains("line 4"), "{e}");
    let e =
        Bvh::parse("HIERARCHY\nROOT Hips\n{\nOFFSET 0 0 0\nCHANNELS 1 Wrotation\n}\n").unwrap_err();
    assert!(e.to_string().contains("unknown channel"), "{e}");
}

// ---------------------------------------------------------------- the project's motion data

use lcm::data::motion as mdata;
use rand::SeedableRng;

fn fixture_sources() -> Vec<mdata::Source> {
    mdata::load_sources(&mini().parent().unwrap().join("mocap")).unwrap()
}

fn step(action: mdata::Action) -> mdata::Step {
    mdata::Step {
        action,
        backward: false,
        side: None,
        speed: mdata::Speed::Normal,
        turn: 0,
        count: 1,
    }
}

fn one(s: mdata::Step) -> mdata::Program {
    mdata::Program {
        steps: vec![s],
        overlay: None,
    }
}

fn yaw_of(p: &Pose) -> f64 {
    let f = facing(p);
    f.x.atan2(f.z).to_degrees()
}

/// Programs do what their captions will say: turns turn by their angle to their side, backward
/// walks go backwards, fast walks cover more ground than slow ones, mirroring swaps the sides.
#[test]
fn programs_synthesise_what_they_say() {
    let sources = fixture_sources();
    let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"walk") && names.contains(&"01_01_excerpt"),
        "{names:?}"
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut walk = |s: mdata::Step| mdata::synthesise(&one(s), &sources, &mut rng).unwrap();

    let straight = yaw_of(walk(step(mdata::Action::Walk)).last().unwrap());
    println!("a straight walk ends facing {straight:.1}°");
    assert!(
        straight.abs() < 15.0,
        "a straight walk drifts to {straight}°"
    );
    for (turn, sign) in [(90, 1.0), (-90, -1.0)] {
        let st = mdata::Step {
            turn,
            ..step(mdata::Action::Walk)
        };
        let j = walk(st.clone());
        // The evaluator's own measure agrees: turned to its side by its angle, forwards.
        let m = lcm::eval::motion_checks::measure(&j);
        assert!(
            lcm::eval::motion_checks::adheres(&st, &m, 15.0),
            "{st:?}: {m:?}"
        );
        println!("turn {turn}: ends facing {:.1}°", yaw_of(j.last().unwrap()));
        // Turning left (+) rotates the facing from +Z towards +X, the body's left.
        let yaw = yaw_of(j.last().unwrap());
        assert!(
            (yaw - 90.0 * sign).abs() < 20.0,
            "turn {turn}: ended facing {yaw}°"
        );
    }
    let back = walk(mdata::Step {
        backward: true,
        ..step(mdata::Action::Walk)
    });
    let travel = back.last().unwrap()[0] - back[0][0];
    assert!(
        travel.z < -0.5,
        "a backward walk goes backwards: {travel:?}"
    );
    let speed = |j: &[Pose]| (j.last().unwrap()[0] - j[0][0]).norm() / (j.len() as f64 / 20.0);
    let slow = walk(mdata::Step {
        speed: mdata::Speed::Slow,
        ..step(mdata::Action::Walk)
    });
    let fast = walk(mdata::Step {
        speed: mdata::Speed::Fast,
        ..step(mdata::Action::Walk)
    });
    assert!(
        speed(&fast) > 1.5 * speed(&slow),
        "{} vs {}",
        speed(&fast),
        speed(&slow)
    );

    let clip = &sources.iter().find(|s| s.name == "walk").unwrap().joints;
    let m = mdata::mirror(clip);
    assert!(max_dist(&mdata::mirror(&m), clip) < 1e-12);
    let (l, r) = (m[5][20], clip[5][21]);
    assert!((l.x + r.x).abs() < 1e-12 && (l.y - r.y).abs() < 1e-12);
}

/// Gestures over standing and walking: the caption names the hand and count, and the joints
/// show them (the evaluator's checks pass on the synthesised clip and fail with the other hand).
#[test]
fn gesture_programs_show_their_hand_and_count() {
    use lcm::eval::motion_checks::gesture_adheres;
    let sources = fixture_sources();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for (action, gesture, side, count) in [
        (
            mdata::Action::Stand,
            mdata::Gesture::Wave,
            Some(mdata::Side::Left),
            1,
        ),
        (
            mdata::Action::Stand,
            mdata::Gesture::Raise,
            Some(mdata::Side::Right),
            3,
        ),
        (
            mdata::Action::Walk,
            mdata::Gesture::Raise,
            Some(mdata::Side::Left),
            2,
        ),
        (mdata::Action::Stand, mdata::Gesture::Clap, None, 2),
    ] {
        let overlay = mdata::Overlay {
            gesture,
            side,
            count,
        };
        let p = mdata::Program {
            steps: vec![step(action)],
            overlay: Some(overlay.clone()),
        };
        let joints = mdata::synthesise(&p, &sources, &mut rng).unwrap();
        assert!(gesture_adheres(&overlay, &joints), "{p:?}");
        if let Some(s) = side {
            let swapped = mdata::Overlay {
                side: Some(s.other()),
                ..overlay.clone()
            };
            assert!(
                !gesture_adheres(&swapped, &joints),
                "{p:?} with the other hand"
            );
        }
        let captions = mdata::captions(&p, false, &mut rng);
        for c in &captions {
            if let Some(s) = side {
                assert!(c.contains(s.name()), "{c}");
            }
            if count == 2 {
                assert!(c.contains("twice"), "{c}");
            }
        }
        println!("{:?}: {}", gesture, captions[0]);
    }
}

#[test]
fn captions_name_the_program_and_hold_out_phrasings() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let kick = one(mdata::Step {
        side: Some(mdata::Side::Left),
        count: 2,
        ..step(mdata::Action::Kick)
    });
    let train = mdata::captions(&kick, false, &mut rng);
    assert_eq!(train.len(), 3);
    assert!(
        train
            .iter()
            .all(|c| c.contains("left") && c.contains("twice")),
        "{train:?}"
    );
    let held = mdata::captions(&kick, true, &mut rng);
    assert!(
        held.iter().all(|c| c.contains("left-footed kick twice")),
        "{held:?}"
    );
    assert!(
        train.iter().all(|c| !c.contains("left-footed")),
        "{train:?}"
    );
    assert!(mdata::is_compositional_holdout(&kick));
}

/// `build` writes a HumanML3D folder our loader reads, with programs beside the captions and the
/// held-out combinations only in their split.
#[test]
fn the_built_dataset_loads_as_humanml3d() {
    let out = std::env::temp_dir().join(format!("lcm-motion-data-{}", std::process::id()));
    let stats = mdata::build(
        &mini().parent().unwrap().join("mocap"),
        &out,
        &mdata::BuildOptions { count: 60, seed: 3 },
    )
    .unwrap();
    let train = load(&out, "train", &LoadOptions::default()).unwrap();
    assert_eq!(
        train.clips.len() as u64,
        stats["samples"]["train"].as_u64().unwrap()
    );
    assert!(train.clips.iter().all(|c| c.captions.len() == 3));
    for (split, held) in [("train", false), ("test_compositional", true)] {
        let Ok(ids) = std::fs::read_to_string(out.join(format!("{split}.txt"))) else {
            continue;
        };
        for id in ids.lines() {
            let p: mdata::Program = serde_json::from_slice(
                &std::fs::read(out.join(format!("programs/{id}.json"))).unwrap(),
            )
            .unwrap();
            assert_eq!(
                mdata::is_compositional_holdout(&p),
                held,
                "{split} {id}: {p:?}"
            );
        }
    }
    std::fs::remove_dir_all(&out).ok();
}

/// `lcm pretrain motion-evaluator` on a small built dataset: it trains (the loss falls), exports
/// its folder, and scores the splits it can, the nearest-neighbour baseline included.
#[test]
fn the_motion_evaluator_learns() {
    let data = std::env::temp_dir().join(format!("lcm-meval-data-{}", std::process::id()));
    let run = std::env::temp_dir().join(format!("lcm-meval-run-{}", std::process::id()));
    mdata::build(
        &mini().parent().unwrap().join("mocap"),
        &data,
        &mdata::BuildOptions {
            count: 400,
            seed: 5,
        },
    )
    .unwrap();
    let o = common::lcm_bin(&[
        "pretrain",
        "motion-evaluator",
        "--data",
        data.to_str().unwrap(),
        "--output",
        run.to_str().unwrap(),
        "--max-steps",
        "40",
        "--batch-size",
        "32",
        "--lr",
        "2e-3",
        "--warmup-steps",
        "5",
        "--save-every",
        "0",
        "--sample-every",
        "0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let losses: Vec<f64> = common::losses(&run.join("metrics.jsonl"))
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    let (first, last) = (
        losses[..5].iter().sum::<f64>() / 5.0,
        losses[35..].iter().sum::<f64>() / 5.0,
    );
    println!("contrastive + head loss: {first:.3} → {last:.3}");
    assert!(last < 0.8 * first, "{first} → {last}");
    let scores: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("motion-evaluator/scores.json")).unwrap())
            .unwrap();
    let train = &scores["train"];
    let r3 = train["r_precision"][2].as_f64().unwrap();
    let shuffled = train["r_precision_shuffled"][2].as_f64().unwrap();
    println!("train R@3 {r3:.3}, shuffled {shuffled:.3}");
    assert!(r3 > shuffled, "{r3} vs shuffled {shuffled}");
    // The nearest-neighbour retrieval baseline is scored on the test split (≥ 32 clips here).
    let nn = &scores["test_nearest_neighbour"];
    assert!(nn["fid"].as_f64().unwrap().is_finite(), "{nn}");
    assert_eq!(nn["clips"], scores["test"]["clips"]);
    assert!(run.join("motion-evaluator/model.safetensors").is_file());
    std::fs::remove_dir_all(&data).ok();
    std::fs::remove_dir_all(&run).ok();
}
