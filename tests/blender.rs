//! Our BVH files through Blender's own BVH importer (Blender 3.4, headless): every joint's world
//! position in every frame within 1 mm of our reader's forward kinematics. Needs `blender` on
//! PATH; without it the test says so and passes, unless LCM_REQUIRE_BLENDER=1 (set by .ci/run,
//! which installs Blender).

use std::path::{Path, PathBuf};
use std::process::Command;

use lcm::motion::bvh::Bvh;
use lcm::motion::features::canonicalise;
use lcm::motion::{deepmimic, retarget};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mocap")
}

fn blender() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("blender"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let required = std::env::var("LCM_REQUIRE_BLENDER").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "LCM_REQUIRE_BLENDER=1 but blender is not on PATH"
        );
        println!("SKIPPED: blender is not installed; the Blender BVH check did not run");
    }
    found
}

/// Blender's joint positions of `bvh_path` compared with ours; returns the largest distance.
fn compare(blender: &Path, bvh_path: &Path, out: &Path) -> f64 {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/blender_bvh_joints.py");
    let o = Command::new(blender)
        .args(["-b", "--factory-startup", "--python"])
        .arg(&script)
        .arg("--")
        .args([bvh_path, out])
        .output()
        .unwrap();
    assert!(
        o.status.success() && out.is_file(),
        "blender failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
    let bvh = Bvh::read(bvh_path).unwrap();
    let names: Vec<String> = serde_json::from_value(theirs["joints"].clone()).unwrap();
    let frames = theirs["frames"].as_array().unwrap();
    assert_eq!(frames.len(), bvh.frames.len());
    let mut worst = 0f64;
    for (f, row) in frames.iter().enumerate() {
        let ours = bvh.world(f).unwrap();
        for (k, name) in names.iter().enumerate() {
            let j = bvh
                .find(name)
                .unwrap_or_else(|| panic!("Blender made a bone {name}"));
            let p: Vec<f64> = serde_json::from_value(row[k].clone()).unwrap();
            let d = (ours[j].0 - nalgebra::Vector3::new(p[0], p[1], p[2])).norm();
            worst = worst.max(d);
        }
    }
    worst
}

#[test]
fn blender_reads_our_bvh_as_we_do() {
    let Some(blender) = blender() else { return };
    let dir = std::env::temp_dir().join(format!("lcm-blender-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Our export of a retargeted real clip (metres).
    let clip = deepmimic::read(&fixtures().join("deepmimic/humanoid3d_backflip.txt")).unwrap();
    let at20 = retarget::resample(&clip.joints, 1.0 / clip.dt, 20.0).unwrap();
    let joints = canonicalise(&retarget::uniform_skeleton(&at20).unwrap()).unwrap();
    let ours = dir.join("backflip.bvh");
    Bvh::from_joints(&joints, 20.0)
        .unwrap()
        .write(&ours)
        .unwrap();
    let d = compare(&blender, &ours, &dir.join("backflip.json"));
    println!("our backflip BVH: Blender vs our reader, max {d:.2e} m");
    assert!(d < 1e-3, "{d} m");
    // A CMU file (ZYX channels, 31 joints; its units ≈ 5.6 cm, so 1 mm ≈ 0.018 units).
    let cmu = fixtures().join("bvh/01_01_excerpt.bvh");
    let d = compare(&blender, &cmu, &dir.join("cmu.json"));
    println!("CMU 01_01 excerpt: Blender vs our reader, max {d:.2e} units");
    assert!(d < 0.018, "{d} units");
    std::fs::remove_dir_all(&dir).ok();
}

/// Must-show 3 of the motion model: a BVH that `lcm generate --model tiny-motion` writes imports
/// in Blender with the joints where our reader puts them.
#[test]
fn blender_imports_a_generated_motion() {
    let Some(blender) = blender() else { return };
    let dir = std::env::temp_dir().join(format!("lcm-blender-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bvh = dir.join("walk.bvh");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lcm"))
        .args(["generate", "--model", "tiny-motion", "--prompt"])
        .arg("a person walks forward and turns left")
        .arg("--output")
        .arg(&bvh)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = compare(&blender, &bvh, &dir.join("walk.json"));
    println!("generated BVH: Blender vs our reader, max {d:.2e} m");
    assert!(d < 1e-3, "{d} m");
    std::fs::remove_dir_all(&dir).ok();
}
