//! `POST /v1/motions/generations` over real HTTP with the shipped motion student
//! (weights/tiny-motion) beside the tiny image fixture: every format decodes at the asked length,
//! seeds and batching leave each motion as it is alone and as `lcm generate` makes it, every class
//! of bad input is a JSON 4xx, auth and overload as for images; `/v1/models`, `/metrics` and
//! `/openapi.json` describe both models.

mod common;
mod serve_common;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use candle_core::{DType, Device};
use serde_json::{json, Value};

use lcm::motion::bvh::Bvh;
use lcm::pipeline::Pipeline;
use lcm::serve::{ImageSpec, Models, MotionSpec, ServeConfig, ServerHandle};
use serve_common::*;

const ROUTE: &str = "/v1/motions/generations";

fn image_model() -> Arc<Pipeline> {
    common::setup();
    static P: OnceLock<Arc<Pipeline>> = OnceLock::new();
    P.get_or_init(|| {
        let dir = common::fixtures().join("tiny-lcm");
        Arc::new(Pipeline::load(&dir, &Device::Cpu, DType::F32).unwrap())
    })
    .clone()
}

fn motion_model() -> MotionSpec {
    common::setup();
    static M: OnceLock<MotionSpec> = OnceLock::new();
    let m = M.get_or_init(|| MotionSpec::open("tiny-motion", &Device::Cpu).unwrap());
    MotionSpec {
        pipe: m.pipe.clone(),
        id: m.id.clone(),
        defaults: m.defaults.clone(),
        examples: m.examples.clone(),
    }
}

fn cfg() -> ServeConfig {
    ServeConfig {
        timeout: Duration::from_secs(600),
        ..Default::default()
    }
}

fn server(cfg: ServeConfig) -> ServerHandle {
    let models = Models {
        image: Some(ImageSpec {
            pipe: image_model(),
            id: "tiny-lcm".into(),
            examples: Vec::new(),
        }),
        motion: Some(motion_model()),
    };
    lcm::serve::start(TcpListener::bind("127.0.0.1:0").unwrap(), models, cfg).unwrap()
}

fn b64(s: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_str().expect("a base64 string"))
        .expect("valid base64")
}

/// The joints `[frames][22][3]` of a `json` motion.
fn joints(d: &Value) -> Vec<Vec<[f64; 3]>> {
    assert_eq!(d["format"], "json");
    assert_eq!(d["motion"]["fps"], 20.0);
    serde_json::from_value(d["motion"]["joints"].clone()).expect("[frames][22][3] numbers")
}

fn max_joint_diff(a: &[Vec<[f64; 3]>], b: &[Vec<[f64; 3]>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .flat_map(|(p, q)| (0..3).map(move |k| (p[k] - q[k]).abs()))
        .fold(0.0, f64::max)
}

fn generate(addr: SocketAddr, body: &Value) -> Value {
    let r = post_json(addr, ROUTE, body);
    assert_eq!(r.status, 200, "{body}: {}", r.text());
    r.json()
}

#[test]
fn every_format_decodes_at_the_asked_length() {
    let srv = server(cfg());
    let addr = srv.addr();
    // json: `seconds` and `frames` both set the length; motion i has seed + i.
    let v = generate(
        addr,
        &json!({"prompt": "a person walks forward", "seconds": 2.5, "n": 2, "seed": 5}),
    );
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        (data[0]["seed"].as_u64(), data[1]["seed"].as_u64()),
        (Some(5), Some(6))
    );
    let (a, b) = (joints(&data[0]), joints(&data[1]));
    assert_eq!((a.len(), a[0].len()), (50, 22));
    assert!(max_joint_diff(&a, &b) > 0.01, "two seeds, one motion");
    let one = generate(
        addr,
        &json!({"prompt": "a person walks forward", "frames": 50, "seed": 6}),
    );
    let alone = joints(&one["data"][0]);
    assert!(max_joint_diff(&alone, &b) < 1e-4, "motion 1 alone differs");

    // npy: HumanML3D feature rows (one fewer than frames), f4.
    let v = generate(
        addr,
        &json!({"prompt": "a person walks backward", "frames": 33, "format": "npy", "seed": 1}),
    );
    let bytes = b64(&v["data"][0]["b64"]);
    let npy = npyz::NpyFile::new(&bytes[..]).expect("an npy file");
    assert_eq!(npy.shape(), &[32, 263]);
    let rows: Vec<f32> = npy.into_vec().unwrap();
    assert!(rows.iter().all(|x| x.is_finite()));

    // bvh: text that parses back to the asked number of frames at 20 fps.
    let v = generate(
        addr,
        &json!({"prompt": "a person walks forward", "seconds": 1.5, "format": "bvh"}),
    );
    let bvh = Bvh::parse(v["data"][0]["motion"].as_str().unwrap()).expect("a BVH");
    let (clip, fps) = bvh.to_joints().unwrap();
    assert_eq!((clip.len(), fps), (30, 20.0));

    // gif: one frame per motion frame.
    let v = generate(
        addr,
        &json!({"prompt": "a person walks forward", "frames": 12, "format": "gif"}),
    );
    let bytes = b64(&v["data"][0]["b64"]);
    use image::AnimationDecoder;
    let gif = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(bytes)).expect("a GIF");
    assert_eq!(gif.into_frames().count(), 12);

    // Longer than the model's 10 s window: chained windows, still the asked length.
    let v = generate(
        addr,
        &json!({"prompt": "a person walks forward", "seconds": 12}),
    );
    assert_eq!(joints(&v["data"][0]).len(), 240);
}

#[test]
fn a_served_motion_equals_the_cli_one() {
    let srv = server(cfg());
    let v = generate(
        srv.addr(),
        &json!({"prompt": "someone runs forward quickly", "seconds": 2, "seed": 42, "n": 2}),
    );
    let dir = std::env::temp_dir().join(format!("lcm-serve-motion-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("run.json");
    let o = common::lcm_bin(&[
        "generate",
        "--model",
        "tiny-motion",
        "--prompt",
        "someone runs forward quickly",
        "--seconds",
        "2",
        "--seed",
        "42",
        "--n",
        "2",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // `--n 2` writes run-0.json and run-1.json; motion i uses seed + i in both.
    for i in 0..2 {
        let path = dir.join(format!("run-{i}.json"));
        let file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let cli: Vec<Vec<[f64; 3]>> = serde_json::from_value(file["joints"].clone()).unwrap();
        let served = joints(&v["data"][i]);
        assert!(max_joint_diff(&cli, &served) < 1e-4, "motion {i}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn concurrent_motions_of_one_length_run_as_one_batch_unchanged() {
    let srv = server(ServeConfig {
        max_batch: 8,
        batch_window: Duration::from_millis(300),
        ..cfg()
    });
    let addr = srv.addr();
    let bodies: Vec<Value> = (0..6)
        .map(|i| {
            let prompt = ["a person walks forward", "a person walks backward"][i % 2];
            json!({"prompt": prompt,
                   "seconds": 2, "steps": 2, "seed": 100 + i, "guidance_scale": 3.0 + i as f64})
        })
        .collect();
    let batched: Vec<_> = concurrent(addr, ROUTE, bodies.clone())
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{}", r.text());
            joints(&r.json()["data"][0])
        })
        .collect();
    let text = get(addr, "/metrics").text();
    let batches = metric(&text, "lcm_batch_size_count{model=\"motion\"}");
    assert_eq!(metric(&text, "lcm_batch_size_sum{model=\"motion\"}"), 6.0);
    assert!(batches < 6.0, "no batching: {batches} batches\n{text}");
    assert!(metric(&text, "lcm_batch_size_bucket{model=\"motion\",le=\"1\"}") < batches);
    assert_eq!(metric(&text, "lcm_generated_total{model=\"motion\"}"), 6.0);
    for (body, m) in bodies.iter().zip(&batched) {
        let alone = joints(&generate(addr, body)["data"][0]);
        assert!(max_joint_diff(&alone, m) < 1e-4, "{body}");
    }
}

#[test]
fn bad_motion_requests_get_a_json_4xx_and_the_server_keeps_serving() {
    let srv = server(cfg());
    let addr = srv.addr();
    let long = "walk ".repeat(400);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"prompt": "x", "seconds": 0}), "seconds"),
        (json!({"prompt": "x", "seconds": 61}), "seconds"),
        (json!({"prompt": "x", "seconds": -1}), "seconds"),
        (json!({"prompt": "x", "frames": 1}), "frames"),
        (json!({"prompt": "x", "frames": 5000}), "frames"),
        (json!({"prompt": "x", "seconds": 2, "frames": 40}), "frames"),
        (json!({"prompt": "x", "format": "fbx"}), "format"),
        (
            json!({"prompt": "x", "guidance_scale": "NaN"}),
            "guidance_scale",
        ),
        (
            json!({"prompt": "x", "guidance_scale": -1}),
            "guidance_scale",
        ),
        (
            json!({"prompt": "x", "guidance_scale": 1e300}),
            "guidance_scale",
        ),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": "   "}), "prompt"),
        (json!({"prompt": long}), "prompt"),
        (
            json!({"prompt": "x", "negative_prompt": long}),
            "negative_prompt",
        ),
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"prompt": "x", "n": 11}), "n"),
        (json!({"prompt": "x", "n": -1}), "n"),
        (json!({"prompt": "x", "steps": 0}), "steps"),
        (json!({"prompt": "x", "steps": 51}), "steps"),
        (json!({"prompt": "x", "sampler": "euler"}), "sampler"),
        (json!({"prompt": "x", "sampler": "flowmap"}), "sampler"),
        (json!({"prompt": "x", "model": "tiny-lcm"}), "model"),
        (json!({"prompt": "x", "size": "64x64"}), "size"),
        (json!({"prompt": "x", "seed": "seven"}), "seed"),
        (json!({"seconds": 2}), "prompt"),
    ];
    for (body, param) in &cases {
        let r = post_json(addr, ROUTE, body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let (kind, p) = error_of(&r);
        assert_eq!(kind, "invalid_request_error", "{body}");
        assert_eq!(p.as_deref(), Some(*param), "{body}: {}", r.text());
    }
    // Not JSON, not an object, or one object followed by more.
    let trailing = br#"{"prompt": "x"} {"prompt": "y"}"#;
    for raw in [&b"{not json"[..], b"[]", b"\"x\"", &trailing[..]] {
        let r = request(addr, "POST", ROUTE, &[], raw);
        assert_eq!(r.status, 400, "{}", r.text());
        error_of(&r);
    }
    let r = request(addr, "GET", ROUTE, &[], b"");
    assert_eq!(r.status, 405);
    error_of(&r);
    // JSON, or what `curl -d` sends; not text/plain.
    let good = br#"{"prompt": "a person walks", "frames": 10}"#;
    for (ty, status) in [
        ("text/plain", 415),
        ("application/json; charset=utf-8", 200),
        ("application/x-www-form-urlencoded", 200),
    ] {
        let r = request(addr, "POST", ROUTE, &[("Content-Type", ty)], good);
        assert_eq!(r.status, status, "{ty}: {}", r.text());
    }
    let text = get(addr, "/metrics").text();
    assert!(!text.contains("status=\"5"), "{text}");
    generate(
        addr,
        &json!({"prompt": "a person walks forward", "frames": 20}),
    );
}

#[test]
fn api_key_and_a_full_queue_guard_the_motion_route() {
    let srv = server(ServeConfig {
        api_key: Some("s3cret".into()),
        max_batch: 1,
        max_queue: 1,
        batch_window: Duration::ZERO,
        ..cfg()
    });
    let addr = srv.addr();
    let body = json!({"prompt": "a person walks forward", "seconds": 10, "steps": 4});
    let bytes = body.to_string();
    for h in [&[][..], &[("Authorization", "Bearer nope")][..]] {
        let r = request(addr, "POST", ROUTE, h, bytes.as_bytes());
        assert_eq!(r.status, 401);
        assert_eq!(error_of(&r).0, "authentication_error");
    }
    let auth = [("Authorization", "Bearer s3cret")];
    let threads: Vec<_> = (0..12)
        .map(|_| {
            let b = bytes.clone();
            std::thread::spawn(move || request(addr, "POST", ROUTE, &auth, b.as_bytes()))
        })
        .collect();
    let rs: Vec<Resp> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let statuses: Vec<u16> = rs.iter().map(|r| r.status).collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");
    let limited: Vec<&Resp> = rs.iter().filter(|r| r.status == 429).collect();
    assert!(!limited.is_empty(), "no 429 under overload: {statuses:?}");
    for r in limited {
        assert_eq!(error_of(r).0, "rate_limit_error");
        assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    }
    let r = request(addr, "POST", ROUTE, &auth, bytes.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn models_metrics_and_openapi_describe_both_models() {
    let srv = server(cfg());
    let addr = srv.addr();
    let m = get(addr, "/v1/models").json();
    let data = m["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["kind"], "text-to-image");
    let motion = &data[1];
    assert_eq!(
        (&motion["id"], &motion["kind"]),
        (&json!("tiny-motion"), &json!("text-to-motion"))
    );
    // The defaults are pipelines/tiny-motion.toml's, and so are the example prompts.
    let d = &motion["defaults"];
    assert_eq!((&d["sampler"], &d["steps"]), (&json!("lcm"), &json!(1)));
    assert_eq!(
        (&d["guidance_scale"], &d["seconds"]),
        (&json!(7.5), &json!(4.0))
    );
    assert!(motion["examples"].as_array().unwrap().len() >= 3);
    assert_eq!(motion["max_seconds"], 60.0);

    generate(
        addr,
        &json!({"prompt": "a person walks forward", "frames": 10}),
    );
    let text = get(addr, "/metrics").text();
    for series in [
        "lcm_http_requests_total{route=\"/v1/motions/generations\",model=\"motion\",status=\"200\"}",
        "lcm_http_requests_total{route=\"/v1/models\",model=\"none\",status=\"200\"}",
        "lcm_generated_total{model=\"motion\"}",
        "lcm_batch_size_count{model=\"motion\"}",
    ] {
        assert!(metric(&text, series) >= 1.0, "{series} missing in\n{text}");
    }
    assert!(text.contains("lcm_queue_depth{model=\"motion\"} 0"));
    assert!(text.contains("lcm_queue_depth{model=\"image\"} 0"));
    // Every series names its model kind.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.contains("model=\""), "{line}");
    }

    // The OpenAPI document, open without a key, has both APIs with their request schemas.
    let doc = get(addr, "/openapi.json").json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        ROUTE,
        "/v1/images/generations",
        "/sdapi/v1/txt2img",
        "/v1/models",
    ] {
        assert!(
            doc["paths"][path]["post"].is_object() || doc["paths"][path]["get"].is_object(),
            "{path} missing"
        );
    }
    let schema = &doc["components"]["schemas"]["MotionRequest"];
    assert_eq!(schema["required"], json!(["prompt"]));
    for field in ["seconds", "frames", "format", "guidance_scale", "seed", "n"] {
        assert!(schema["properties"][field].is_object(), "{field}");
    }
}

#[test]
fn either_model_can_be_left_out() {
    let images_only = lcm::serve::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Models {
            image: Some(ImageSpec {
                pipe: image_model(),
                id: "tiny-lcm".into(),
                examples: Vec::new(),
            }),
            motion: None,
        },
        cfg(),
    )
    .unwrap();
    let r = post_json(images_only.addr(), ROUTE, &json!({"prompt": "x"}));
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("motion"));
    let motions_only = lcm::serve::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Models {
            image: None,
            motion: Some(motion_model()),
        },
        cfg(),
    )
    .unwrap();
    let addr = motions_only.addr();
    let r = post_json(addr, "/v1/images/generations", &json!({"prompt": "x"}));
    assert_eq!(r.status, 404);
    let m = get(addr, "/v1/models").json();
    assert_eq!(m["data"].as_array().unwrap().len(), 1);
    generate(
        addr,
        &json!({"prompt": "a person walks forward", "frames": 10}),
    );
    // The CLI refuses to serve nothing, and a motion model given as the image model.
    let o = common::lcm_bin(&["serve", "--model", "none", "--motion-model", "none"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to serve"));
    let o = common::lcm_bin(&["serve", "--model", "tiny-motion"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--motion-model"));
}
