//! The project's own text-to-motion data, in HumanML3D's layout: the real clips (DeepMimic's and
//! the BVH files, retargeted) and procedural compositions of them. Four minutes of capture cannot
//! teach language, so each sample is a *program* — steps of an action with its direction, side,
//! speed, turn and count — synthesised from the real clips and captioned from templates with
//! paraphrases; the program is kept beside the caption, so an evaluator can check adherence.
//!
//! Synthesis works on HumanML3D features, where it is simple: the rows are heading-relative, so
//! concatenating two clips' rows continues the second from where the first ended; a turn is a yaw
//! rate added to the root's angular velocity; a loop repeats a cycle's rows. Joints are recovered
//! from the rows and the features recomputed from them, so every written sample is consistent.
//!
//! Splits: `train`, `val`, `test` (one distribution), `test_compositional` (combinations never in
//! training: running while turning right, a left kick, a jump then a kick), `test_paraphrase`
//! (every caption in phrasings held out of training), `real` (the real clips, unmodified).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::motion::bvh::Bvh;
use crate::motion::features::{canonicalise, concat_rows};
pub use crate::motion::gesture::Gesture;
pub use crate::motion::skeleton::Side;
use crate::motion::{
    deepmimic, features, joints_from_features, npy, retarget, Pose, FEATURES, FPS,
};

/// A real clip moved onto the 22-joint chain (20 fps, canonical).
pub struct Source {
    pub name: String,
    pub joints: Vec<Pose>,
}

/// Every real clip under a folder made by `scripts/fetch_motion.sh`: DeepMimic's humanoid clips
/// (`humanoid3d_*.txt`, `walker/*.txt`) and the BVH files, wherever they are below it.
pub fn load_sources(dir: &Path) -> Result<Vec<Source>> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries =
            std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?;
        for e in entries {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut out = Vec::new();
    for p in files {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = p
            .parent()
            .and_then(|d| d.file_name())
            .map(|s| s.to_string_lossy().into_owned());
        let (name, joints, fps) =
            if stem.starts_with("humanoid3d_") || parent.as_deref() == Some("walker") {
                if p.extension().is_none_or(|e| e != "txt") {
                    continue;
                }
                let c = deepmimic::read(&p)?;
                let name = match parent.as_deref() {
                    Some("walker") => format!("walker_{stem}"),
                    _ => stem.trim_start_matches("humanoid3d_").to_string(),
                };
                (name, c.joints, 1.0 / c.dt)
            } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("bvh")) {
                let (j, fps) = Bvh::read(&p)?
                    .to_joints()
                    .with_context(|| p.display().to_string())?;
                (stem, j, fps)
            } else {
                continue;
            };
        let at20 = retarget::resample(&joints, fps, FPS)?;
        out.push(Source {
            name,
            joints: canonicalise(&retarget::uniform_skeleton(&at20)?)?,
        });
    }
    if out.is_empty() {
        bail!(
            "no motion clips under {} (run scripts/fetch_motion.sh)",
            dir.display()
        )
    }
    Ok(out)
}

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Walk,
    Run,
    Jump,
    Kick,
    Punch,
    Backflip,
    Cartwheel,
    Spin,
    Crawl,
    Dance,
    /// Standing in place (the walk's most upright frame, held): the ground of most gestures.
    Stand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Speed {
    Slow,
    Normal,
    Fast,
}

/// One step of a program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub action: Action,
    /// Locomotion: walking backwards.
    #[serde(default)]
    pub backward: bool,
    /// The limb (kick, punch).
    pub side: Option<Side>,
    pub speed: Speed,
    /// Degrees turned over the step, left positive (locomotion).
    pub turn: i32,
    /// Repetitions (jumps, kicks, punches).
    pub count: u32,
}

/// An upper-body gesture over a whole single-step program (see [`crate::motion::gesture`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overlay {
    pub gesture: Gesture,
    /// The hand (wave, raise); `None` for a clap.
    pub side: Option<Side>,
    /// Repetitions (raise, clap; 1 for a wave).
    pub count: u32,
}

/// A sample's program: its steps in order, and a gesture laid over them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Program {
    pub steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<Overlay>,
}

/// The real clips the actions are made of, by action.
fn clip_name(a: Action) -> &'static str {
    match a {
        Action::Walk => "walk",
        Action::Run => "run",
        Action::Jump => "jump",
        Action::Kick => "kick",
        Action::Punch => "punch",
        Action::Backflip => "backflip",
        Action::Cartwheel => "cartwheel",
        Action::Spin => "spin",
        Action::Crawl => "crawl",
        Action::Dance => "dance_a",
        Action::Stand => "walk",
    }
}

/// The walk's most upright frame (feet closest together, both down), held for 2–4 s.
fn standing(walk: &[Pose], rng: &mut ChaCha8Rng) -> Vec<Pose> {
    let gap = |p: &Pose| (p[7] - p[8]).xz().norm() + (p[7].y - p[8].y).abs();
    let pose = walk
        .iter()
        .min_by(|a, b| gap(a).total_cmp(&gap(b)))
        .copied()
        .expect("a clip has frames");
    vec![pose; ((2.0 + 2.0 * rng.random::<f64>()) * FPS) as usize]
}

/// Left and right swapped: x mirrored, each left joint trading places with its right twin.
pub fn mirror(joints: &[Pose]) -> Vec<Pose> {
    let twin = |j: usize| -> usize {
        let name = crate::motion::skeleton::NAMES[j];
        let other = if let Some(r) = name.strip_prefix("left") {
            format!("right{r}")
        } else if let Some(r) = name.strip_prefix("right") {
            format!("left{r}")
        } else {
            return j;
        };
        crate::motion::skeleton::NAMES
            .iter()
            .position(|n| *n == other)
            .expect("every side has a twin")
    };
    joints
        .iter()
        .map(|p| {
            std::array::from_fn(|j| {
                let q = p[twin(j)];
                nalgebra::Vector3::new(-q.x, q.y, q.z)
            })
        })
        .collect()
}

/// Which side a one-sided action uses in a clip: the foot that rises highest (kick) or the wrist
/// that reaches furthest forward of the root (punch).
fn active_side(joints: &[Pose], action: Action) -> Side {
    let reach = |j: usize| -> f64 {
        joints
            .iter()
            .map(|p| match action {
                Action::Kick => p[j].y,
                _ => {
                    let h = crate::motion::skeleton::facing(p);
                    (p[j] - p[0]).dot(&h)
                }
            })
            .fold(f64::MIN, f64::max)
    };
    let (l, r) = match action {
        Action::Kick => (reach(7), reach(8)),
        _ => (reach(20), reach(21)),
    };
    if l > r {
        Side::Left
    } else {
        Side::Right
    }
}

/// Rows of features, `FEATURES` wide.
type Rows = Vec<f32>;

fn rows_of(joints: &[Pose]) -> Result<Rows> {
    features(joints, &Default::default())
}

/// The joints of one step.
fn step_joints(
    step: &Step,
    sources: &BTreeMap<&str, &Source>,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Pose>> {
    let name = clip_name(step.action);
    let src = sources
        .get(name)
        .with_context(|| format!("the real clip {name:?} is missing from the sources"))?;
    if step.action == Action::Stand {
        return Ok(standing(&src.joints, rng));
    }
    let mut joints = src.joints.clone();
    if let (Some(side), Action::Kick | Action::Punch) = (step.side, step.action) {
        if active_side(&joints, step.action) != side {
            joints = mirror(&joints);
        }
    }
    let warp = match step.speed {
        Speed::Slow => 0.7,
        Speed::Normal => 1.0,
        Speed::Fast => 1.4,
    };
    if warp != 1.0 {
        joints = retarget::resample(&joints, FPS * warp, FPS)?;
    }
    let mut rows = rows_of(&joints)?;
    if matches!(step.action, Action::Walk | Action::Run) {
        // Loop the cycle to 2.5–4.5 s of travel, its net turn removed first: a captured cycle
        // drifts a little (DeepMimic's walk by ≈ 8° a cycle), and looping would compound it.
        let target = ((2.5 + 2.0 * rng.random::<f64>()) * FPS) as usize;
        let n = rows.len() / FEATURES;
        let drift = rows.chunks(FEATURES).map(|r| r[0]).sum::<f32>() / n as f32;
        rows.chunks_mut(FEATURES).for_each(|r| r[0] -= drift);
        let cycle = rows.clone();
        while rows.len() / FEATURES < target {
            rows.extend_from_slice(&cycle);
        }
        rows.truncate(target * FEATURES);
    } else {
        let one = rows.clone();
        for _ in 1..step.count.max(1) {
            rows = concat_rows(&rows, &one, 4);
        }
    }
    let n = rows.len() / FEATURES;
    if step.turn != 0 {
        // A constant yaw rate: feature 0 is half the heading's change per frame, and the heading
        // maps the facing onto +Z, so a left turn (facing towards +X) lowers it. Backward steps
        // are played in reverse, which reverses the turn too.
        let turn = if step.backward { -step.turn } else { step.turn };
        let per_frame = -(turn as f64).to_radians() / 2.0 / n as f64;
        for row in rows.chunks_mut(FEATURES) {
            row[0] += per_frame as f32;
        }
    }
    let mut joints = joints_from_features(&rows)?;
    if step.backward {
        joints.reverse();
    }
    Ok(joints)
}

/// A program's joints (20 fps, canonical).
pub fn synthesise(
    program: &Program,
    sources: &[Source],
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Pose>> {
    let by_name: BTreeMap<&str, &Source> = sources.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut rows: Rows = Vec::new();
    for step in &program.steps {
        let r = rows_of(&step_joints(step, &by_name, rng)?)?;
        rows = if rows.is_empty() {
            r
        } else {
            concat_rows(&rows, &r, 6)
        };
    }
    let joints = canonicalise(&joints_from_features(&rows)?)?;
    Ok(match &program.overlay {
        Some(o) => {
            crate::motion::gesture::apply(&joints, o.gesture, o.side.unwrap_or(Side::Left), o.count)
        }
        None => joints,
    })
}

// ---------------------------------------------------------------- captions

const SUBJECTS: [&str; 5] = ["a person", "someone", "a man", "a woman", "the person"];

/// Verb phrases of a step; the last phrasing of every list is held out of training (the
/// paraphrase test).
fn phrases(step: &Step) -> Vec<String> {
    let side = match step.side {
        Some(Side::Left) => "left",
        _ => "right",
    };
    let count = match step.count {
        0 | 1 => "",
        2 => " twice",
        3 => " three times",
        _ => " several times",
    };
    let speed: &[&str] = match step.speed {
        Speed::Slow => &[" slowly"],
        Speed::Fast => &[" quickly", " fast"],
        Speed::Normal => &[""],
    };
    let dir = if step.backward { "backward" } else { "forward" };
    let turn = match step.turn {
        0 => vec![String::new()],
        t if t.abs() >= 150 => vec![" and turns around".into(), " turning around".into()],
        t if t.abs() <= 45 => {
            let s = if t > 0 { "left" } else { "right" };
            vec![
                format!(" and veers {s}"),
                format!(" bearing slightly {s}"),
                format!(" drifting to the {s}"),
            ]
        }
        t => {
            let s = if t > 0 { "left" } else { "right" };
            vec![
                format!(" and turns {s}"),
                format!(" while turning to the {s}"),
                format!(" curving to the {s}"),
            ]
        }
    };
    let base: Vec<String> = match step.action {
        Action::Walk => vec![
            format!("walks {dir}"),
            format!("is walking {dir}"),
            format!("takes steps {dir}"),
            format!("strolls {dir}"),
        ],
        Action::Run => vec![
            format!("runs {dir}"),
            format!("is running {dir}"),
            format!("jogs {dir}"),
            format!("sprints {dir}"),
        ],
        Action::Jump => vec![
            format!("jumps{count}"),
            format!("jumps up{count}"),
            format!("hops{count}"),
        ],
        Action::Kick => vec![
            format!("kicks with the {side} leg{count}"),
            format!("kicks with the {side} foot{count}"),
            format!("does a {side}-footed kick{count}"),
        ],
        Action::Punch => vec![
            format!("punches with the {side} hand{count}"),
            format!("throws a {side} punch{count}"),
            format!("strikes with the {side} fist{count}"),
        ],
        Action::Backflip => vec![
            "does a backflip".into(),
            "flips backward".into(),
            "performs a back somersault".into(),
        ],
        Action::Cartwheel => vec![
            "does a cartwheel".into(),
            "performs a cartwheel".into(),
            "turns a cartwheel".into(),
        ],
        Action::Spin => vec![
            "spins around".into(),
            "turns around in place".into(),
            "twirls".into(),
        ],
        Action::Crawl => vec![
            "crawls on the floor".into(),
            "crawls on hands and knees".into(),
            "creeps along the ground".into(),
        ],
        Action::Dance => vec![
            "dances".into(),
            "does a little dance".into(),
            "moves to music".into(),
        ],
        Action::Stand => vec![
            "stands still".into(),
            "stands in place".into(),
            "is standing".into(),
            "remains standing".into(),
        ],
    };
    let mut out = Vec::new();
    for (i, b) in base.iter().enumerate() {
        let sp = speed[i % speed.len()];
        let tu = &turn[i % turn.len()];
        out.push(format!("{b}{sp}{tu}"));
    }
    out
}

fn count_phrase(count: u32) -> &'static str {
    match count {
        0 | 1 => "",
        2 => " twice",
        3 => " three times",
        _ => " several times",
    }
}

/// Verb phrases of a gesture; the last is held out of training, as in [`phrases`].
fn overlay_phrases(o: &Overlay) -> Vec<String> {
    let s = o.side.unwrap_or(Side::Left).name();
    let c = count_phrase(o.count);
    match o.gesture {
        Gesture::Wave => vec![
            format!("waves with the {s} hand"),
            format!("waves the {s} hand"),
            format!("waves {s} hand in greeting"),
            format!("gives a wave with the {s} hand"),
        ],
        Gesture::Raise => vec![
            format!("raises the {s} arm{c}"),
            format!("lifts the {s} arm up{c}"),
            format!("puts the {s} hand up{c}"),
            format!("raises the {s} hand over the head{c}"),
        ],
        Gesture::Clap => vec![
            format!("claps{c}"),
            format!("claps the hands{c}"),
            format!("claps the hands together{c}"),
            format!("brings the palms together{c}"),
        ],
    }
}

/// Three captions of a program: (caption, held-out phrasing?) — the first three from training
/// phrasings, or all from held-out ones when `paraphrase_test`.
pub fn captions(program: &Program, paraphrase_test: bool, rng: &mut ChaCha8Rng) -> Vec<String> {
    let connectors = [", then ", " and then ", ", after that "];
    (0..3)
        .map(|k| {
            let subject = SUBJECTS.choose(rng).expect("subjects");
            let mut parts = Vec::new();
            let pick = |p: Vec<String>, rng: &mut ChaCha8Rng| {
                if paraphrase_test {
                    p.last().cloned().expect("phrasings")
                } else {
                    p[(k + rng.random_range(0..p.len() - 1)) % (p.len() - 1)].clone()
                }
            };
            for step in &program.steps {
                parts.push(pick(phrases(step), rng));
            }
            let gesture = program
                .overlay
                .as_ref()
                .map(|o| format!(" and {}", pick(overlay_phrases(o), rng)))
                .unwrap_or_default();
            let connector = if paraphrase_test {
                ", and afterwards "
            } else {
                connectors[k % connectors.len()]
            };
            format!("{subject} {}{gesture}", parts.join(connector))
        })
        .collect()
}

/// Hand-written captions of the real DeepMimic clips (by what each clip is; the long BVH
/// recordings are not captioned yet).
fn real_captions(s: &Source) -> Option<Vec<String>> {
    let side = |a| match active_side(&s.joints, a) {
        Side::Left => "left",
        Side::Right => "right",
    };
    let c: Vec<String> = match s.name.as_str() {
        "walk" | "walker_0walk_forward" => vec![
            "a person walks forward".into(),
            "someone takes a few steps ahead".into(),
        ],
        "run" => vec!["a person runs forward".into(), "someone jogs ahead".into()],
        "jump" => vec![
            "a person jumps forward".into(),
            "someone leaps ahead with both feet".into(),
        ],
        "kick" => vec![format!(
            "a person kicks with the {} leg",
            side(Action::Kick)
        )],
        "punch" => vec![format!(
            "a person punches with the {} hand",
            side(Action::Punch)
        )],
        "backflip" => vec!["a person does a backflip".into()],
        "cartwheel" => vec!["a person does a cartwheel".into()],
        "crawl" => vec!["a person crawls forward on hands and knees".into()],
        "dance_a" | "dance_b" => vec!["a person dances".into()],
        "getup_facedown" => vec!["a person lying face down gets up".into()],
        "getup_faceup" => vec!["a person lying on their back gets up".into()],
        "roll" => vec!["a person rolls on the ground and stands up".into()],
        "spin" => vec!["a person spins around in place".into()],
        "spinkick" => vec!["a person does a spinning kick".into()],
        "walker_turn_left0" | "walker_turn_left1" => {
            vec!["a person walks forward and turns left".into()]
        }
        "walker_turn_right0" | "walker_turn_right1" => {
            vec!["a person walks forward and turns right".into()]
        }
        _ => return None,
    };
    Some(c)
}

// ---------------------------------------------------------------- programs and splits

/// Every action, in the order of the evaluator's action classes.
pub const ALL_ACTIONS: [Action; 11] = [
    Action::Walk,
    Action::Run,
    Action::Jump,
    Action::Kick,
    Action::Punch,
    Action::Backflip,
    Action::Cartwheel,
    Action::Spin,
    Action::Crawl,
    Action::Dance,
    Action::Stand,
];

/// The actions whose real clips are among `sources`.
/// Walking and standing (the ground of most gestures) are listed twice: drawn twice as often.
pub fn available(sources: &[Source]) -> Vec<Action> {
    ALL_ACTIONS
        .iter()
        .flat_map(|&a| {
            let twice = matches!(a, Action::Walk | Action::Stand);
            std::iter::repeat_n(a, if twice { 2 } else { 1 })
        })
        .filter(|a| sources.iter().any(|s| s.name == clip_name(*a)))
        .collect()
}

fn random_step(rng: &mut ChaCha8Rng, actions: &[Action]) -> Step {
    let action = *actions.choose(rng).expect("at least one action");
    let locomotion = matches!(action, Action::Walk | Action::Run);
    let sided = matches!(action, Action::Kick | Action::Punch);
    Step {
        action,
        backward: action == Action::Walk && rng.random_bool(0.2),
        side: sided.then(|| {
            if rng.random_bool(0.5) {
                Side::Left
            } else {
                Side::Right
            }
        }),
        speed: if locomotion {
            *[Speed::Slow, Speed::Normal, Speed::Normal, Speed::Fast]
                .choose(rng)
                .expect("speeds")
        } else {
            Speed::Normal
        },
        turn: if locomotion && rng.random_bool(0.5) {
            *[90, -90, 45, -45, 180].choose(rng).expect("turns")
        } else {
            0
        },
        count: if matches!(action, Action::Jump | Action::Kick | Action::Punch) {
            rng.random_range(1..=3)
        } else {
            1
        },
    }
}

/// Combinations that never reach training.
pub fn is_compositional_holdout(p: &Program) -> bool {
    let held = |s: &Step| {
        (s.action == Action::Run && s.turn < 0)
            || (s.action == Action::Kick && s.side == Some(Side::Left))
    };
    let held_gesture = p.overlay.as_ref().is_some_and(|o| {
        o.gesture == Gesture::Raise
            && o.side == Some(Side::Left)
            && p.steps.iter().any(|s| s.action == Action::Walk)
    });
    held_gesture
        || p.steps.iter().any(held)
        || p.steps
            .windows(2)
            .any(|w| w[0].action == Action::Jump && w[1].action == Action::Kick)
}

/// A random program of one or two steps of `actions`; single steps of standing (mostly) or
/// walking forward (sometimes) carry a gesture.
pub fn random_program(rng: &mut ChaCha8Rng, actions: &[Action]) -> Program {
    let n = if rng.random_bool(0.35) { 2 } else { 1 };
    let steps: Vec<Step> = (0..n).map(|_| random_step(rng, actions)).collect();
    let overlay = match steps.as_slice() {
        [s] if s.action == Action::Stand && rng.random_bool(0.85) => Some(random_overlay(rng)),
        [s] if s.action == Action::Walk && !s.backward && rng.random_bool(0.4) => {
            Some(random_overlay(rng))
        }
        _ => None,
    };
    Program { steps, overlay }
}

fn random_overlay(rng: &mut ChaCha8Rng) -> Overlay {
    let gesture = *[Gesture::Wave, Gesture::Raise, Gesture::Clap]
        .choose(rng)
        .expect("gestures");
    let side = if rng.random_bool(0.5) {
        Side::Left
    } else {
        Side::Right
    };
    Overlay {
        gesture,
        side: (gesture != Gesture::Clap).then_some(side),
        count: if gesture == Gesture::Wave {
            1
        } else {
            rng.random_range(1..=3)
        },
    }
}

/// What `lcm data motion` writes.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub count: usize,
    pub seed: u64,
}

/// One written sample.
struct Sample {
    id: String,
    split: &'static str,
    joints: Vec<Pose>,
    captions: Vec<String>,
    program: Option<Program>,
}

/// Build the dataset from the real clips in `sources_dir` into `out` (HumanML3D's layout plus
/// `programs/<id>.json` and `stats.json`).
pub fn build(sources_dir: &Path, out: &Path, opts: &BuildOptions) -> Result<serde_json::Value> {
    let sources = load_sources(sources_dir)?;
    let actions = available(&sources);
    if actions.is_empty() {
        bail!(
            "{}: none of the action clips (walk, run, jump, …) is there",
            sources_dir.display()
        )
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut samples = Vec::new();
    let bar = indicatif::ProgressBar::new(opts.count as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("motion samples {pos}/{len} {per_sec} ETA {eta}")
            .expect("valid template"),
    );
    let (min_frames, max_frames) = (40, 199);
    let mut attempts = 0;
    while samples.len() < opts.count {
        attempts += 1;
        if attempts > opts.count * 20 {
            bail!(
                "could not make {} samples within the length bounds",
                opts.count
            )
        }
        let program = random_program(&mut rng, &actions);
        let joints = synthesise(&program, &sources, &mut rng)?;
        if joints.len() < min_frames || joints.len() > max_frames {
            continue;
        }
        let i = samples.len();
        let split = if is_compositional_holdout(&program) {
            "test_compositional"
        } else {
            match i % 20 {
                0 => "test_paraphrase",
                1 | 2 => "test",
                3 => "val",
                _ => "train",
            }
        };
        let captions = captions(&program, split == "test_paraphrase", &mut rng);
        samples.push(Sample {
            id: format!("P{i:06}"),
            split,
            joints,
            captions,
            program: Some(program),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    for s in &sources {
        // The real clips as they are, where a caption is known for them.
        let Some(captions) = real_captions(s) else {
            continue;
        };
        if s.joints.len() >= min_frames && s.joints.len() <= max_frames {
            samples.push(Sample {
                id: format!("R_{}", s.name),
                split: "real",
                joints: s.joints.clone(),
                captions,
                program: None,
            });
        }
    }
    write(out, &samples)
}

fn write(out: &Path, samples: &[Sample]) -> Result<serde_json::Value> {
    for d in ["new_joint_vecs", "new_joints", "texts", "programs"] {
        std::fs::create_dir_all(out.join(d))
            .with_context(|| format!("cannot create {}", out.join(d).display()))?;
    }
    let mut splits: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let (mut sum, mut sq, mut n) = (vec![0f64; FEATURES], vec![0f64; FEATURES], 0usize);
    let mut seconds: BTreeMap<&str, f64> = BTreeMap::new();
    for s in samples {
        let f = features(&s.joints, &Default::default())?;
        let rows = f.len() / FEATURES;
        npy::write(
            &out.join(format!("new_joint_vecs/{}.npy", s.id)),
            &f,
            &[rows, FEATURES],
        )?;
        let flat: Vec<f32> = s
            .joints
            .iter()
            .flatten()
            .flat_map(|p| [p.x as f32, p.y as f32, p.z as f32])
            .collect();
        npy::write(
            &out.join(format!("new_joints/{}.npy", s.id)),
            &flat,
            &[s.joints.len(), 22, 3],
        )?;
        let lines: Vec<String> = s
            .captions
            .iter()
            .map(|c| {
                let tokens: Vec<String> = c
                    .split_whitespace()
                    .map(|w| format!("{}/X", w.trim_matches(',')))
                    .collect();
                format!("{c}#{}#0.0#0.0", tokens.join(" "))
            })
            .collect();
        crate::files::write_atomic(
            &out.join(format!("texts/{}.txt", s.id)),
            (lines.join("\n") + "\n").as_bytes(),
        )?;
        if let Some(p) = &s.program {
            crate::files::write_atomic(
                &out.join(format!("programs/{}.json", s.id)),
                &serde_json::to_vec(p)?,
            )?;
        }
        splits.entry(s.split).or_default().push(&s.id);
        *seconds.entry(s.split).or_default() += rows as f64 / FPS;
        if s.split == "train" {
            for row in f.chunks(FEATURES) {
                for (k, v) in row.iter().enumerate() {
                    sum[k] += *v as f64;
                    sq[k] += (*v as f64).powi(2);
                }
                n += 1;
            }
        }
    }
    if n == 0 {
        bail!("no training samples: raise --count")
    }
    let mean: Vec<f32> = sum.iter().map(|s| (s / n as f64) as f32).collect();
    // A floor keeps near-constant features (e.g. contacts that never change) finite.
    let std: Vec<f32> = sq
        .iter()
        .zip(&sum)
        .map(|(q, s)| {
            ((q / n as f64 - (s / n as f64).powi(2))
                .max(0.0)
                .sqrt()
                .max(0.01)) as f32
        })
        .collect();
    npy::write(&out.join("Mean.npy"), &mean, &[FEATURES])?;
    npy::write(&out.join("Std.npy"), &std, &[FEATURES])?;
    for (split, ids) in &splits {
        crate::files::write_atomic(
            &out.join(format!("{split}.txt")),
            (ids.join("\n") + "\n").as_bytes(),
        )?;
    }
    let stats = serde_json::json!({
        "samples": splits.iter().map(|(k, v)| (k.to_string(), v.len())).collect::<BTreeMap<_, _>>(),
        "seconds": seconds.iter().map(|(k, v)| (k.to_string(), (v * 10.0).round() / 10.0)).collect::<BTreeMap<_, _>>(),
    });
    crate::files::write_atomic(&out.join("stats.json"), &serde_json::to_vec_pretty(&stats)?)?;
    Ok(stats)
}

/// `lcm data motion`: fetch the clips (with `fetch`, by scripts/fetch_motion.sh), build, report.
pub fn run_cli(source: &Path, fetch: bool, out: &Path, count: usize, seed: u64) -> Result<()> {
    if fetch {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch_motion.sh");
        let status = std::process::Command::new("bash")
            .arg(&script)
            .arg(source)
            .status()
            .with_context(|| format!("cannot run {}", script.display()))?;
        if !status.success() {
            bail!("{} failed ({status})", script.display())
        }
    }
    let stats = build(source, out, &BuildOptions { count, seed })?;
    println!("wrote {}: {stats}", out.display());
    Ok(())
}
