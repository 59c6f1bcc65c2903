//! Property-based fuzzing (proptest) of every parser of outside input: the HTTP bodies of every
//! route as far as validation (OpenAI generations, A1111 txt2img/img2img, motions), model configs,
//! safetensors files, BVH, npy, joints JSON and image uploads. Inputs are random bytes, random
//! JSON built from each format's own field names, and random mutations (flipped, inserted and
//! deleted bytes, truncation) of a valid sample. The property: an error or a valid result,
//! never a panic, and for requests, never a job beyond the limits.
//!
//! CI runs proptest's default 256 cases per property; `scripts/fuzz.sh` runs many more.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use serde_json::{json, Value};

use lcm::pipeline::Pipeline;
use lcm::serve::api;
use lcm::serve::motions::{MotionModel, MotionRequest, MAX_FRAMES};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lcm-fuzz-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn image_model() -> &'static Pipeline {
    static P: OnceLock<Pipeline> = OnceLock::new();
    P.get_or_init(|| {
        common::setup();
        Pipeline::load(
            &common::fixtures().join("tiny-lcm"),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap()
    })
}

fn motion_model() -> &'static MotionModel {
    static M: OnceLock<MotionModel> = OnceLock::new();
    M.get_or_init(|| {
        common::setup();
        let spec = lcm::serve::MotionSpec::open("tiny-motion", &Device::Cpu).unwrap();
        MotionModel::new(spec.pipe, spec.id, &spec.defaults, Vec::new(), 8)
    })
}

/// A JSON value of any shape, a few levels deep, with the numbers and strings that break
/// parsers: huge, negative, fractional, empty, long, odd characters.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop_oneof![
            Just(-1i64),
            Just(0),
            Just(1),
            Just(2),
            Just(64),
            Just(4096),
            Just(i64::MAX)
        ]
        .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(Value::from("x".repeat(5000))),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// What a field usually holds, so that many generated bodies get past the type check into
/// validation; one value in ten is of any shape instead.
#[derive(Clone, Copy)]
enum Kind {
    /// A count or seed (JSON integers; fractions are a type error).
    Int,
    Num,
    Str(&'static [&'static str]),
    Bool,
}

fn value_of(kind: Kind) -> BoxedStrategy<Value> {
    let typed = match kind {
        Kind::Int => prop_oneof![
            4 => (1i64..5).prop_map(Value::from),
            1 => prop_oneof![Just(-1i64), Just(0), Just(10), Just(11), Just(50),
                        Just(51), Just(4096), Just(1 << 40)]
                .prop_map(Value::from),
            1 => (-100i64..5000).prop_map(Value::from),
        ]
        .boxed(),
        Kind::Num => prop_oneof![
            prop_oneof![
                Just(-1i64),
                Just(0),
                Just(1),
                Just(2),
                Just(10),
                Just(11),
                Just(50),
                Just(51),
                Just(4096),
                Just(1 << 40)
            ]
            .prop_map(Value::from),
            (-100i64..5000).prop_map(Value::from),
            (-10.0f64..100.0).prop_map(Value::from),
            Just(Value::from(1e300)),
        ]
        .boxed(),
        Kind::Str(choices) => prop_oneof![
            4 => prop::sample::select(choices).prop_map(Value::from),
            1 => ".{0,30}".prop_map(Value::from),
            1 => Just(Value::from("walk ".repeat(400))),
        ]
        .boxed(),
        Kind::Bool => any::<bool>().prop_map(Value::from).boxed(),
    };
    prop_oneof![9 => typed, 1 => any_json()].boxed()
}

/// An object built from `fields` (each present or not), sometimes with an extra key.
fn object_of(fields: &'static [(&'static str, Kind)]) -> impl Strategy<Value = Value> {
    let values: Vec<_> = fields
        .iter()
        .map(|(name, k)| {
            // The prompt is required: mostly there, so that most bodies reach validation.
            let p = if *name == "prompt" { 0.95 } else { 0.4 };
            prop::option::weighted(p, value_of(*k))
        })
        .collect();
    (values, prop::option::weighted(0.1, (".{1,10}", any_json()))).prop_map(
        move |(values, extra)| {
            let mut obj = serde_json::Map::new();
            for ((k, _), v) in fields.iter().zip(values) {
                if let Some(v) = v {
                    obj.insert(k.to_string(), v);
                }
            }
            if let Some((k, v)) = extra {
                obj.insert(k, v);
            }
            Value::Object(obj)
        },
    )
}

const PROMPTS: &[&str] = &["a cat", "a person walks forward", "a person jumps", ""];
const SAMPLERS: &[&str] = &["lcm", "ddim", "tcd", "LCM", "Euler a", "automatic"];
const OPENAI: &[(&str, Kind)] = &[
    ("prompt", Kind::Str(PROMPTS)),
    ("model", Kind::Str(&["tiny-lcm", "dall-e-3"])),
    ("n", Kind::Int),
    (
        "size",
        Kind::Str(&["32x32", "64x64", "0x0", "33x32", "4096x4096", "x"]),
    ),
    ("response_format", Kind::Str(&["b64_json", "url", "png"])),
    ("quality", Kind::Str(&["hd"])),
    ("style", Kind::Str(&["vivid"])),
    ("user", Kind::Str(&["u"])),
    ("steps", Kind::Int),
    ("guidance_scale", Kind::Num),
    ("seed", Kind::Int),
    ("sampler", Kind::Str(SAMPLERS)),
    ("negative_prompt", Kind::Str(PROMPTS)),
    ("strength", Kind::Num),
];
const A1111: &[(&str, Kind)] = &[
    ("prompt", Kind::Str(PROMPTS)),
    ("negative_prompt", Kind::Str(PROMPTS)),
    ("steps", Kind::Int),
    ("cfg_scale", Kind::Num),
    ("seed", Kind::Int),
    ("width", Kind::Int),
    ("height", Kind::Int),
    ("batch_size", Kind::Int),
    ("n_iter", Kind::Int),
    ("sampler_name", Kind::Str(SAMPLERS)),
    ("send_images", Kind::Bool),
    ("restore_faces", Kind::Bool),
    ("eta", Kind::Num),
    ("denoising_strength", Kind::Num),
    ("resize_mode", Kind::Int),
    (
        "init_images",
        Kind::Str(&["iVBORw0KGgo=", "data:image/png;base64,xyz"]),
    ),
];
const MOTION: &[(&str, Kind)] = &[
    ("prompt", Kind::Str(PROMPTS)),
    ("model", Kind::Str(&["tiny-motion", "tiny"])),
    ("negative_prompt", Kind::Str(PROMPTS)),
    ("seconds", Kind::Num),
    ("frames", Kind::Int),
    ("n", Kind::Int),
    ("steps", Kind::Int),
    ("guidance_scale", Kind::Num),
    ("seed", Kind::Int),
    ("sampler", Kind::Str(SAMPLERS)),
    ("format", Kind::Str(&["json", "npy", "bvh", "gif", "fbx"])),
];

/// Random edits of `sample`: flipped bytes, inserted and deleted runs, a truncation.
fn mutated(sample: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = sample.len().max(1);
    prop::collection::vec((0..4u8, 0..n, any::<u8>(), 1..16usize), 1..8).prop_map(move |edits| {
        let mut b = sample.clone();
        for (kind, at, byte, len) in edits {
            let at = at.min(b.len());
            match kind {
                0 if at < b.len() => b[at] ^= byte | 1,
                1 => b
                    .splice(at..at, std::iter::repeat_n(byte, len))
                    .for_each(drop),
                2 => {
                    let end = (at + len).min(b.len());
                    b.drain(at..end);
                }
                _ => b.truncate(at),
            }
        }
        b
    })
}

fn check_api(r: Result<(), api::ApiError>) {
    if let Err(e) = r {
        assert!(e.status.is_client_error(), "{} {}", e.status, e.message);
    }
}

proptest! {
    #[test]
    fn openai_bodies(body in prop_oneof![
        6 => object_of(OPENAI).prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..512),
        2 => mutated(json!({"prompt": "a cat", "n": 2, "size": "32x32", "steps": 2}).to_string().into_bytes()),
    ]) {
        check_api(api::parse_json::<api::OpenAiRequest>(&body).and_then(|req| {
            req.response_format()?;
            let job = req.to_job(image_model(), "tiny-lcm", None)?;
            assert!((1..=api::MAX_IMAGES).contains(&job.items.len()));
            assert!(job.shape.steps >= 1 && job.shape.steps <= api::MAX_STEPS);
            Ok(())
        }));
    }

    #[test]
    fn a1111_bodies(body in prop_oneof![
        6 => object_of(A1111).prop_map(|v| v.to_string().into_bytes()),
        2 => mutated(json!({"prompt": "a cat", "steps": 2, "width": 32, "height": 32,
                       "batch_size": 2, "sampler_name": "LCM"}).to_string().into_bytes()),
    ]) {
        check_api(api::Txt2ImgRequest::parse(&body).and_then(|req| {
            let job = req.to_job(image_model(), None)?;
            assert!((1..=api::MAX_IMAGES).contains(&job.items.len()));
            Ok(())
        }));
        check_api(api::Img2ImgRequest::parse(&body).map(|_| ()));
    }

    #[test]
    fn motion_bodies(body in prop_oneof![
        6 => object_of(MOTION).prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..512),
        2 => mutated(json!({"prompt": "a person walks", "seconds": 2, "n": 2, "format": "bvh"})
            .to_string().into_bytes()),
    ]) {
        check_api(api::parse_json::<MotionRequest>(&body).and_then(|req| {
            req.format()?;
            let job = req.to_job(motion_model())?;
            assert!((1..=api::MAX_IMAGES).contains(&job.items.len()));
            assert!((2..=MAX_FRAMES).contains(&job.key.shape.frames));
            Ok(())
        }));
    }

    #[test]
    fn image_uploads(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        mutated(png_sample()),
    ]) {
        check_api(api::decode_upload(&bytes, "image").map(|_| ()));
    }

    #[test]
    fn model_configs(
        component in 0..6usize,
        key in 0..12usize,
        value in any_json(),
        replace_all in any::<bool>(),
        whole in any_json(),
    ) {
        let (file, sample) = &config_samples()[component];
        let mut cfg = sample.clone();
        if replace_all {
            cfg = whole;
        } else if let Some(obj) = cfg.as_object_mut() {
            let keys: Vec<String> = obj.keys().cloned().collect();
            let k = keys[key % keys.len()].clone();
            obj.insert(k, value);
        }
        let dir = tmp("cfg");
        let path = dir.join(file);
        std::fs::write(&path, cfg.to_string()).unwrap();
        let _ = match component {
            0 => lcm::model::config::UNetConfig::load(&path).map(drop),
            1 => lcm::model::config::VaeConfig::load(&path).map(drop),
            2 => lcm::model::config::ClipTextConfig::load(&path).map(drop),
            3 => lcm::model::config::SchedulerConfig::load(&path).map(drop),
            4 => lcm::model::motion_vae::MotionVaeConfig::load(&path).map(drop),
            _ => lcm::model::motion_denoiser::MotionDenoiserConfig::load(&path).map(drop),
        };
    }

    #[test]
    fn safetensors_files(bytes in mutated(safetensors_sample())) {
        let path = tmp("st").join("w.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let _ = lcm::model::weights::load_weights(std::slice::from_ref(&path), DType::F32, &Device::Cpu);
        let _ = lcm::model::weights::tensors(&[path], &Device::Cpu);
    }

    #[test]
    fn bvh_text(bytes in prop_oneof![
        mutated(bvh_sample()),
        prop::collection::vec(any::<u8>(), 0..256),
    ]) {
        if let Ok(b) = lcm::motion::bvh::Bvh::parse(&String::from_utf8_lossy(&bytes)) {
            let _ = b.to_joints();
        }
    }

    #[test]
    fn npy_and_joints_files(npy in mutated(npy_sample()), joints in any_json()) {
        let dir = tmp("motionfiles");
        std::fs::write(dir.join("a.npy"), &npy).unwrap();
        let _ = lcm::motion::npy::read(&dir.join("a.npy"));
        std::fs::write(dir.join("a.json"), joints.to_string()).unwrap();
        let _ = lcm::motion::io::read_json(&dir.join("a.json"));
    }
}

fn png_sample() -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 7]));
    lcm::pipeline::image_io::encode_png(&img).unwrap()
}

fn config_samples() -> &'static [(&'static str, Value)] {
    static C: OnceLock<Vec<(&'static str, Value)>> = OnceLock::new();
    C.get_or_init(|| {
        let fx = common::fixtures().join("tiny-lcm");
        let motion = lcm::pipeline::source::local_dir("tiny-motion")
            .unwrap()
            .unwrap();
        let read = |p: &Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        vec![
            ("config.json", read(&fx.join("unet/config.json"))),
            ("config.json", read(&fx.join("vae/config.json"))),
            ("config.json", read(&fx.join("text_encoder/config.json"))),
            (
                "scheduler_config.json",
                read(&fx.join("scheduler/scheduler_config.json")),
            ),
            ("config.json", read(&motion.join("motion_vae/config.json"))),
            ("config.json", read(&motion.join("denoiser/config.json"))),
        ]
    })
}

fn safetensors_sample() -> Vec<u8> {
    let path = tmp("st-sample").join("s.safetensors");
    let t = std::collections::HashMap::from([
        (
            "a".to_string(),
            Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu).unwrap(),
        ),
        (
            "b".to_string(),
            Tensor::new(&[[0.5f32, -1.]], &Device::Cpu).unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&t, &path).unwrap();
    std::fs::read(&path).unwrap()
}

/// A few frames of a real HumanML3D-layout clip (the test fixture).
fn walking_clip() -> Vec<lcm::motion::Pose> {
    let a = lcm::motion::npy::read(
        &common::fixtures().join("humanml3d-mini/new_joint_vecs/000001.npy"),
    )
    .unwrap();
    let joints = lcm::motion::joints_from_features(&a.data).unwrap();
    joints[..joints.len().min(8)].to_vec()
}

fn bvh_sample() -> Vec<u8> {
    lcm::motion::io::MotionFormat::Bvh
        .encode(&walking_clip(), 20.0)
        .unwrap()
}

fn npy_sample() -> Vec<u8> {
    lcm::motion::io::MotionFormat::Npy
        .encode(&walking_clip(), 20.0)
        .unwrap()
}

#[test]
fn the_fuzz_samples_are_valid() {
    // Mutations start from valid inputs: check that they are.
    assert!(api::decode_upload(&png_sample(), "image").is_ok());
    assert!(lcm::motion::bvh::Bvh::parse(&String::from_utf8(bvh_sample()).unwrap()).is_ok());
    let dir = tmp("samples");
    std::fs::write(dir.join("s.npy"), npy_sample()).unwrap();
    assert!(lcm::motion::npy::read(&dir.join("s.npy")).is_ok());
    let st = dir.join("w.safetensors");
    std::fs::write(&st, safetensors_sample()).unwrap();
    assert!(lcm::model::weights::tensors(&[st], &Device::Cpu).is_ok());
}
