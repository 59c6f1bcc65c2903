//! `lcm serve` over real HTTP on 127.0.0.1 with the tiny LCM fixture: every route, every class of
//! bad input, auth, overload (429), deadlines, disconnects, dynamic batching, graceful shutdown;
//! and the batched pipeline entry point against single runs.

mod common;
mod serve_common;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use candle_core::{DType, Device};
use serde_json::{json, Value};

use common::fixtures;
use lcm::pipeline::{GenerateRequest, Pipeline};
use lcm::sample::noise::{NoiseSource, SeededNoise};
use lcm::serve::{ImageSpec, Models, ServeConfig, ServerHandle};
use serve_common::*;

const GEN: &str = "/v1/images/generations";

fn pipeline(name: &str) -> Arc<Pipeline> {
    common::setup();
    static LCM: OnceLock<Arc<Pipeline>> = OnceLock::new();
    static SD: OnceLock<Arc<Pipeline>> = OnceLock::new();
    let cell = if name == "tiny-lcm" { &LCM } else { &SD };
    cell.get_or_init(|| {
        Arc::new(Pipeline::load(&fixtures().join(name), &Device::Cpu, DType::F32).unwrap())
    })
    .clone()
}

/// Test servers: a generous deadline, as debug builds under a parallel test run are slow.
fn cfg() -> ServeConfig {
    ServeConfig {
        timeout: Duration::from_secs(600),
        ..Default::default()
    }
}

fn server(cfg: ServeConfig) -> ServerHandle {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let models = Models {
        image: Some(ImageSpec {
            pipe: pipeline("tiny-lcm"),
            id: "tiny-lcm".into(),
            examples: vec!["a red circle".into()],
        }),
        motion: None,
    };
    lcm::serve::start(listener, models, cfg).unwrap()
}

fn b64_png(s: &str) -> image::RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("valid base64");
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .expect("a PNG")
        .to_rgb8()
}

fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

fn metrics(addr: SocketAddr) -> String {
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    r.text()
}

#[test]
fn openai_route_returns_pngs_with_reproducible_per_image_seeds() {
    let srv = server(cfg());
    let body =
        json!({"prompt": "a photo of a cat", "n": 2, "size": "32x48", "steps": 2, "seed": 7});
    let r = post_json(srv.addr(), "/v1/images/generations", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let imgs: Vec<_> = data
        .iter()
        .map(|d| b64_png(d["b64_json"].as_str().unwrap()))
        .collect();
    assert_eq!(imgs[0].dimensions(), (32, 48));
    assert_eq!(data[0]["seed"], 7);
    assert_eq!(data[1]["seed"], 8);
    assert_ne!(imgs[0], imgs[1], "different seeds, same image");
    // Image 1 alone, by its own seed.
    let alone = json!({"prompt": "a photo of a cat", "size": "32x48", "steps": 2, "seed": 8});
    let r = post_json(srv.addr(), "/v1/images/generations", &alone);
    let d = &r.json()["data"][0];
    assert!(max_pixel_diff(&b64_png(d["b64_json"].as_str().unwrap()), &imgs[1]) <= 1);
    // No seed: the server draws one and reports it.
    let r = post_json(
        srv.addr(),
        "/v1/images/generations",
        &json!({"prompt": "x"}),
    );
    assert!(r.json()["data"][0]["seed"].as_u64().is_some());
}

#[test]
fn url_response_format_serves_the_png_from_memory() {
    let srv = server(cfg());
    let body = json!({"prompt": "a red car", "response_format": "url", "steps": 1, "seed": 3});
    // A forged Host header does not make the link (the server's own address does).
    let r = request(
        srv.addr(),
        "POST",
        GEN,
        &[("Host", "evil.example")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.text().contains("evil.example"), "{}", r.text());
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    let path = url
        .strip_prefix(&format!("http://{}", srv.addr()))
        .unwrap_or_else(|| panic!("url {url} is not on this server"));
    let png = get(srv.addr(), path);
    assert_eq!(png.status, 200);
    assert_eq!(png.header("content-type"), Some("image/png"));
    image::load_from_memory(&png.body).expect("a PNG");
    let missing = get(srv.addr(), "/v1/images/files/0123.png");
    assert_eq!(missing.status, 404);
    error_of(&missing);
    // Expired after the TTL.
    let srv = server(ServeConfig {
        url_ttl: Duration::from_millis(1),
        ..cfg()
    });
    let r = post_json(srv.addr(), "/v1/images/generations", &body);
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    let path = url
        .split_once(&srv.addr().to_string())
        .unwrap()
        .1
        .to_string();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(get(srv.addr(), &path).status, 404);
    // Behind a proxy: --public-url.
    let srv = server(ServeConfig {
        public_url: Some("https://lcm.example.org/".into()),
        ..cfg()
    });
    let r = post_json(srv.addr(), GEN, &body);
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    assert!(
        url.starts_with("https://lcm.example.org/v1/images/files/"),
        "{url}"
    );
}

#[test]
fn a1111_txt2img_returns_images_parameters_and_info() {
    let srv = server(cfg());
    let body = json!({
        "prompt": "a lighthouse", "negative_prompt": "", "steps": 3, "cfg_scale": 6.5,
        "seed": -1, "width": 40, "height": 32, "batch_size": 2, "sampler_name": "LCM",
        // Sent by stock A1111 clients; accepted with these values.
        "send_images": true, "save_images": false, "restore_faces": false, "n_iter": 1,
        "styles": [], "override_settings": {}
    });
    let r = post_json(srv.addr(), "/sdapi/v1/txt2img", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(b64_png(images[0].as_str().unwrap()).dimensions(), (40, 32));
    let p = &v["parameters"];
    assert_eq!(p["steps"], 3);
    assert_eq!(p["cfg_scale"], 6.5);
    assert_eq!(p["sampler_name"], "LCM");
    let seed = p["seed"].as_u64().expect("a drawn seed");
    let info: Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([seed, seed + 1]));
    assert_eq!(info["width"], 40);

    for (body, param) in [
        (
            json!({"prompt": "x", "restore_faces": true}),
            "restore_faces",
        ),
        (json!({"prompt": "x", "foo": 1}), "foo"),
        (
            json!({"prompt": "x", "sampler_name": "Euler a"}),
            "sampler_name",
        ),
        (json!({"prompt": "x", "seed": -2}), "seed"),
        (json!({"prompt": "x", "batch_size": 0}), "batch_size"),
        (json!({"prompt": "x", "width": 33}), "width"),
        (json!({"prompt": "x", "cfg_scale": "high"}), "cfg_scale"),
    ] {
        let r = post_json(srv.addr(), "/sdapi/v1/txt2img", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(error_of(&r).1.as_deref(), Some(param), "{body}");
    }
}

#[test]
fn models_health_metrics_and_page_routes() {
    let srv = server(cfg());
    let m = get(srv.addr(), "/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "tiny-lcm");
    assert_eq!(m["data"][0]["defaults"]["steps"], 4);
    assert_eq!(m["data"][0]["kind"], "text-to-image");
    assert_eq!(m["data"][0]["examples"][0], "a red circle");
    assert_eq!(
        m["data"].as_array().unwrap().len(),
        1,
        "no motion model here"
    );
    assert_eq!(get(srv.addr(), "/healthz").json()["status"], "ok");
    let page = get(srv.addr(), "/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("id=\"generate\""));
    assert!(get(srv.addr(), "/app.js")
        .text()
        .contains("v1/images/generations"));
    assert_eq!(get(srv.addr(), "/style.css").status, 200);
    let r = post_json(
        srv.addr(),
        "/v1/images/generations",
        &json!({"prompt": "x", "n": 3, "steps": 1}),
    );
    assert_eq!(r.status, 200);
    let text = metrics(srv.addr());
    for series in [
        "lcm_http_requests_total{route=\"/v1/models\",model=\"none\",status=\"200\"}",
        "lcm_http_requests_total{route=\"/v1/images/generations\",model=\"image\",status=\"200\"}",
        "lcm_http_request_duration_seconds_count{route=\"/v1/images/generations\",model=\"image\"}",
        "lcm_generated_total{model=\"image\"}",
        "lcm_batch_size_count{model=\"image\"}",
    ] {
        assert!(metric(&text, series) >= 1.0, "{series} missing in\n{text}");
    }
    assert_eq!(metric(&text, "lcm_generated_total{model=\"image\"}"), 3.0);
    assert!(text.contains("lcm_queue_depth{model=\"image\"} 0"));
}

#[test]
fn bad_input_gets_a_json_4xx_and_the_server_keeps_serving() {
    let srv = server(cfg());
    let addr = srv.addr();
    let gen = "/v1/images/generations";
    let long_prompt = "cat ".repeat(100);
    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>)> = vec![
        ("malformed JSON", b"{\"prompt\": ".to_vec(), 400, None),
        ("not an object", b"[1, 2]".to_vec(), 400, None),
        ("empty body", b"".to_vec(), 400, None),
        (
            "missing prompt",
            br#"{"n": 1}"#.to_vec(),
            400,
            Some("prompt"),
        ),
        (
            "wrong type",
            br#"{"prompt": "x", "n": "two"}"#.to_vec(),
            400,
            Some("n"),
        ),
        (
            "negative n",
            br#"{"prompt": "x", "n": -1}"#.to_vec(),
            400,
            Some("n"),
        ),
        (
            "unknown field",
            br#"{"prompt": "x", "colour": 1}"#.to_vec(),
            400,
            Some("colour"),
        ),
        (
            "prompt too long",
            json!({"prompt": long_prompt}).to_string().into_bytes(),
            400,
            Some("prompt"),
        ),
        (
            "negative prompt too long",
            json!({"prompt": "x", "negative_prompt": long_prompt})
                .to_string()
                .into_bytes(),
            400,
            Some("negative_prompt"),
        ),
        (
            "n zero",
            br#"{"prompt": "x", "n": 0}"#.to_vec(),
            400,
            Some("n"),
        ),
        (
            "n too big",
            br#"{"prompt": "x", "n": 11}"#.to_vec(),
            400,
            Some("n"),
        ),
        (
            "size not WxH",
            br#"{"prompt": "x", "size": "big"}"#.to_vec(),
            400,
            Some("size"),
        ),
        (
            "size odd",
            br#"{"prompt": "x", "size": "31x32"}"#.to_vec(),
            400,
            Some("size"),
        ),
        (
            "size huge",
            br#"{"prompt": "x", "size": "4096x4096"}"#.to_vec(),
            400,
            Some("size"),
        ),
        (
            "steps zero",
            br#"{"prompt": "x", "steps": 0}"#.to_vec(),
            400,
            Some("steps"),
        ),
        (
            "steps too many",
            br#"{"prompt": "x", "steps": 51}"#.to_vec(),
            400,
            Some("steps"),
        ),
        (
            "guidance negative",
            br#"{"prompt": "x", "guidance_scale": -1}"#.to_vec(),
            400,
            Some("guidance_scale"),
        ),
        (
            "guidance too big",
            br#"{"prompt": "x", "guidance_scale": 31}"#.to_vec(),
            400,
            Some("guidance_scale"),
        ),
        (
            "unknown sampler",
            br#"{"prompt": "x", "sampler": "euler"}"#.to_vec(),
            400,
            Some("sampler"),
        ),
        (
            "flow-map sampler on an LCM",
            br#"{"prompt": "x", "sampler": "flowmap"}"#.to_vec(),
            400,
            None,
        ),
        (
            "other model",
            br#"{"prompt": "x", "model": "dall-e-3"}"#.to_vec(),
            400,
            Some("model"),
        ),
        (
            "bad response format",
            br#"{"prompt": "x", "response_format": "jpeg"}"#.to_vec(),
            400,
            Some("response_format"),
        ),
        (
            "negative seed",
            br#"{"prompt": "x", "seed": -5}"#.to_vec(),
            400,
            Some("seed"),
        ),
        (
            "body over the limit",
            json!({"prompt": "x".repeat(100_000)})
                .to_string()
                .into_bytes(),
            413,
            None,
        ),
    ];
    for (what, body, status, param) in cases {
        let r = request(
            addr,
            "POST",
            gen,
            &[("Content-Type", "application/json")],
            &body,
        );
        assert_eq!(r.status, status, "{what}: {}", r.text());
        let (kind, p) = error_of(&r);
        assert_eq!(kind, "invalid_request_error", "{what}");
        if param.is_some() {
            assert_eq!(p.as_deref(), param, "{what}: {}", r.text());
        }
    }
    // Routes and methods.
    let r = get(addr, gen);
    assert_eq!(r.status, 405);
    error_of(&r);
    let r = get(addr, "/nope");
    assert_eq!(r.status, 404);
    error_of(&r);
    // Still serving, and no 5xx was counted.
    let r = post_json(addr, gen, &json!({"prompt": "x", "steps": 1}));
    assert_eq!(r.status, 200);
    let text = metrics(addr);
    assert!(!text.contains("status=\"5"), "{text}");
    assert!(
        metric(
            &text,
            "lcm_http_requests_total{route=\"/v1/images/generations\",model=\"image\",status=\"400\"}"
        ) >= 20.0
    );
}

#[test]
fn api_key_guards_every_route_but_health_and_the_page() {
    let srv = server(ServeConfig {
        api_key: Some("s3cret".into()),
        ..cfg()
    });
    let addr = srv.addr();
    let body = json!({"prompt": "x", "steps": 1}).to_string();
    let auth = [("Authorization", "Bearer s3cret")];
    let wrong = [("Authorization", "Bearer s3cre")];
    for (method, path) in [
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("POST", "/v1/images/generations"),
        ("POST", "/sdapi/v1/txt2img"),
        ("GET", "/v1/images/files/abc.png"),
        ("GET", "/nope"),
    ] {
        for h in [&[][..], &wrong[..]] {
            let r = request(addr, method, path, h, body.as_bytes());
            assert_eq!(r.status, 401, "{method} {path} {h:?}");
            assert_eq!(error_of(&r).0, "authentication_error");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        }
    }
    for path in ["/healthz", "/", "/app.js", "/motion.js", "/openapi.json"] {
        assert_eq!(get(addr, path).status, 200, "{path}");
    }
    // Health checks by HEAD too (load balancers use it).
    assert_eq!(request(addr, "HEAD", "/healthz", &[], b"").status, 200);
    assert_eq!(request(addr, "GET", "/v1/models", &auth, b"").status, 200);
    assert_eq!(request(addr, "GET", "/metrics", &auth, b"").status, 200);
    let r = request(
        addr,
        "POST",
        "/v1/images/generations",
        &auth,
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(addr, "POST", "/sdapi/v1/txt2img", &auth, body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let srv = server(ServeConfig {
        max_batch: 1,
        max_queue: 1,
        batch_window: Duration::ZERO,
        ..cfg()
    });
    let body = json!({"prompt": "a busy server", "steps": 6});
    let rs = concurrent(srv.addr(), GEN, vec![body; 8]);
    let statuses: Vec<u16> = rs.iter().map(|r| r.status).collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let limited: Vec<&Resp> = rs.iter().filter(|r| r.status == 429).collect();
    assert!(!limited.is_empty(), "no 429 under overload: {statuses:?}");
    assert!(statuses.contains(&200));
    for r in limited {
        assert_eq!(error_of(r).0, "rate_limit_error");
        let secs: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!(secs >= 1);
    }
    // The queue drained; the server serves again.
    let r = post_json(
        srv.addr(),
        "/v1/images/generations",
        &json!({"prompt": "x", "steps": 1}),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn concurrent_compatible_requests_run_as_one_batch_with_the_same_images() {
    let srv = server(ServeConfig {
        max_batch: 8,
        batch_window: Duration::from_millis(300),
        ..cfg()
    });
    let addr = srv.addr();
    let bodies: Vec<Value> = (0..6)
        .map(|i| {
            json!({"prompt": format!("prompt number {i}"), "steps": 2, "seed": 100 + i,
                   "guidance_scale": 2.0 + i as f64})
        })
        .collect();
    let rs = concurrent(addr, GEN, bodies.clone());
    let batched: Vec<_> = rs
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{}", r.text());
            b64_png(r.json()["data"][0]["b64_json"].as_str().unwrap())
        })
        .collect();
    let text = metrics(addr);
    let batches = metric(&text, "lcm_batch_size_count{model=\"image\"}");
    let images = metric(&text, "lcm_batch_size_sum{model=\"image\"}");
    assert_eq!(images, 6.0);
    assert!(
        batches < 6.0,
        "no batching: {batches} batches for 6 requests\n{text}"
    );
    assert!(metric(&text, "lcm_batch_size_bucket{model=\"image\",le=\"1\"}") < batches);
    // Each request again, alone: the same image (PNG-rounding aside).
    for (body, img) in bodies.iter().zip(&batched) {
        let r = post_json(addr, "/v1/images/generations", body);
        let alone = b64_png(r.json()["data"][0]["b64_json"].as_str().unwrap());
        assert!(max_pixel_diff(&alone, img) <= 1, "{body}");
    }
}

#[test]
fn a_passed_deadline_answers_504() {
    let srv = server(ServeConfig {
        timeout: Duration::from_millis(1),
        batch_window: Duration::from_millis(50),
        ..cfg()
    });
    let r = post_json(
        srv.addr(),
        "/v1/images/generations",
        &json!({"prompt": "x"}),
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(error_of(&r).0, "timeout_error");
    // The expired job never ran.
    std::thread::sleep(Duration::from_millis(200));
    let text = metrics(srv.addr());
    assert_eq!(metric(&text, "lcm_generated_total{model=\"image\"}"), 0.0);
    assert_eq!(
        metric(
            &text,
            "lcm_jobs_dropped_total{model=\"image\",reason=\"deadline\"}"
        ),
        1.0
    );
}

#[test]
fn a_client_that_disconnects_stops_its_queued_work() {
    let srv = server(ServeConfig {
        max_batch: 1,
        batch_window: Duration::ZERO,
        ..cfg()
    });
    let addr = srv.addr();
    // Long enough to still be running when the second request arrives, in a release build too
    // (8 steps at the fixture's own size finished within the 300 ms below there): 2.3 s release,
    // 13 s in the test profile, on 2 busy Xeon cores.
    let slow = json!({"prompt": "slow", "steps": 16, "size": "64x64"});
    let busy = std::thread::spawn(move || post_json(addr, "/v1/images/generations", &slow));
    std::thread::sleep(Duration::from_millis(300));
    // Queue a request behind it, then hang up.
    let body = json!({"prompt": "gone", "steps": 1}).to_string();
    let s = post_raw(addr, GEN, &body);
    // Hang up once it is queued behind the slow one.
    let t = Instant::now();
    while metric(&metrics(addr), "lcm_queue_depth{model=\"image\"}") < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the request was never queued"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(s);
    assert_eq!(busy.join().unwrap().status, 200);
    let t = Instant::now();
    let dropped = "lcm_jobs_dropped_total{model=\"image\",reason=\"disconnected\"}";
    let mut text = metrics(addr);
    while metric(&text, dropped) < 1.0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        text = metrics(addr);
    }
    assert_eq!(metric(&text, dropped), 1.0, "{text}");
    // Only the slow request's image was made.
    assert_eq!(metric(&text, "lcm_generated_total{model=\"image\"}"), 1.0);
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits() {
    let fx = fixtures().join("tiny-lcm");
    let mut p = ServeProcess::spawn(&["--model", fx.to_str().unwrap(), "--max-batch", "1"]);
    let addr = p.addr;
    let slow = json!({"prompt": "finish me", "steps": 8});
    let inflight = std::thread::spawn(move || post_json(addr, "/v1/images/generations", &slow));
    std::thread::sleep(Duration::from_millis(300));
    p.signal("TERM");
    let r = inflight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let status = p.child.wait().unwrap();
    assert!(status.success(), "exit {status}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut p.stdout, &mut rest).unwrap();
    assert!(rest.contains("stopped"), "{rest}");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening"
    );
}

/// A request that runs for minutes alone (10 images at 64² × 50 DDIM steps on the fixture, an LCM
/// so no CFG: ≈ 2 min on 2 cores) once its batch has started: 2000 native-size U-Net evaluations,
/// over the default --max-request-cost (1000), so the tests that run it raise the cap.
fn expensive() -> Value {
    json!({"prompt": "a", "n": 10, "size": "64x64", "steps": 50, "sampler": "ddim",
           "guidance_scale": 30, "negative_prompt": "b"})
}

/// Wait (up to a minute) until the server reports a job stopped mid-run, and return /metrics.
fn await_cancelled(addr: SocketAddr) -> String {
    let series = "lcm_jobs_dropped_total{model=\"image\",reason=\"cancelled\"}";
    let t = Instant::now();
    loop {
        let text = metrics(addr);
        if metric(&text, series) >= 1.0 {
            return text;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the running batch was never cancelled\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn work_over_the_request_and_queue_budgets_is_refused() {
    let srv = server(ServeConfig {
        max_batch: 1,
        batch_window: Duration::ZERO,
        max_queued_cost: 16.0,
        ..cfg()
    });
    let addr = srv.addr();
    // One request over the per-request cap: 400, naming what to lower.
    let r = post_json(addr, "/v1/images/generations", &expensive());
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("2000 network evaluations") && msg.contains("steps"),
        "{msg}"
    );
    // Under the cap, but more than the queue's budget while another waits: 429.
    let busy = json!({"prompt": "a", "n": 2, "steps": 8});
    let rs: Vec<_> = (0..4)
        .map(|_| {
            let b = busy.clone();
            std::thread::spawn(move || post_json(addr, "/v1/images/generations", &b))
        })
        .collect();
    let statuses: Vec<u16> = rs.into_iter().map(|t| t.join().unwrap().status).collect();
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(
        statuses.contains(&429),
        "the queue's cost budget held nothing back: {statuses:?}"
    );
}

#[test]
fn work_that_cannot_finish_by_its_deadline_is_refused_up_front() {
    let srv = server(ServeConfig {
        timeout: Duration::from_secs(3),
        ..cfg()
    });
    let addr = srv.addr();
    // A cheap request measures the pace (seconds per unit of cost)…
    let r = post_json(addr, GEN, &json!({"prompt": "x", "steps": 4}));
    assert_eq!(r.status, 200, "{}", r.text());
    // …by which 10 images at 64² × 25 steps (1000 units, at the cap) take far longer than 3 s.
    let big = json!({"prompt": "x", "n": 10, "size": "64x64", "steps": 25, "sampler": "ddim"});
    let r = post_json(addr, GEN, &big);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("more than the server's deadline"),
        "{}",
        r.text()
    );
    // Nothing of it ran.
    let text = metrics(addr);
    assert_eq!(metric(&text, "lcm_generated_total{model=\"image\"}"), 1.0);
}

#[test]
fn a_running_batch_stops_at_its_deadline() {
    let srv = server(ServeConfig {
        timeout: Duration::from_millis(1500),
        max_request_cost: 1e6,
        ..cfg()
    });
    let addr = srv.addr();
    let r = post_json(addr, "/v1/images/generations", &expensive());
    assert_eq!(r.status, 504, "{}", r.text());
    let text = await_cancelled(addr);
    // It stopped at a step boundary soon after the deadline instead of running to its end.
    let ran = metric(&text, "lcm_batch_duration_seconds_sum{model=\"image\"}");
    assert!(ran < 30.0, "the batch ran {ran} s");
    assert_eq!(metric(&text, "lcm_generated_total{model=\"image\"}"), 0.0);
    let r = post_json(
        addr,
        "/v1/images/generations",
        &json!({"prompt": "x", "steps": 1}),
    );
    assert_eq!(r.status, 200, "the server is still busy: {}", r.text());
}

/// Two requests in one U-Net batch; one client leaves mid-way: its rows leave the batch, the
/// other request finishes with the image it makes alone.
#[test]
fn a_batch_drops_a_member_whose_client_left_and_finishes_the_rest() {
    let srv = server(ServeConfig {
        batch_window: Duration::from_millis(500),
        ..cfg()
    });
    let addr = srv.addr();
    let stay = json!({"prompt": "a blue square", "size": "64x64", "steps": 30,
                      "sampler": "ddim", "seed": 11});
    let body = stay.clone();
    let kept = std::thread::spawn(move || post_json(addr, GEN, &body));
    let s = post_raw(
        addr,
        GEN,
        &json!({"prompt": "gone", "size": "64x64", "steps": 30, "sampler": "ddim", "seed": 12})
            .to_string(),
    );
    // Hang up once the batch of both runs.
    let t = Instant::now();
    loop {
        let text = metrics(addr);
        if metric(&text, "lcm_queue_depth{model=\"image\"}") == 0.0
            && metric(&text, "lcm_batch_size_count{model=\"image\"}") == 0.0
            && t.elapsed() > Duration::from_millis(800)
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never batched\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(s);
    let r = kept.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let text = await_cancelled(addr);
    // One batch of two images, of which one was made.
    assert_eq!(
        metric(&text, "lcm_batch_size_sum{model=\"image\"}"),
        2.0,
        "{text}"
    );
    assert_eq!(metric(&text, "lcm_generated_total{model=\"image\"}"), 1.0);
    let batched = b64_png(r.json()["data"][0]["b64_json"].as_str().unwrap());
    let r = post_json(addr, GEN, &stay);
    let alone = b64_png(r.json()["data"][0]["b64_json"].as_str().unwrap());
    assert!(max_pixel_diff(&alone, &batched) <= 1);
}

#[test]
fn a_running_batch_stops_when_its_client_leaves() {
    let srv = server(ServeConfig {
        max_request_cost: 1e6,
        ..cfg()
    });
    let addr = srv.addr();
    let s = post_raw(addr, GEN, &expensive().to_string());
    // Hang up once its batch runs.
    let t = Instant::now();
    while metric(&metrics(addr), "lcm_queue_depth{model=\"image\"}") > 0.0
        || t.elapsed() < Duration::from_millis(500)
    {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(s);
    let text = await_cancelled(addr);
    let ran = metric(&text, "lcm_batch_duration_seconds_sum{model=\"image\"}");
    assert!(ran < 30.0, "the batch ran {ran} s");
}

#[test]
fn sigterm_cancels_work_left_after_the_grace_period() {
    use std::io::Write;
    let fx = fixtures().join("tiny-lcm");
    let mut p = ServeProcess::spawn(&[
        "--model",
        fx.to_str().unwrap(),
        "--motion-model",
        "none",
        "--shutdown-grace-s",
        "1",
        "--max-request-cost",
        "1000000",
    ]);
    let addr = p.addr;
    // An expensive request, read raw: after the grace period the server may close its
    // connection without an answer.
    let inflight = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = post_raw(addr, GEN, &expensive().to_string());
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    // A client that sends half its headers and then nothing.
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.write_all(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let t = Instant::now();
    p.signal("TERM");
    let status = loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "still running 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit {status}");
    // The in-flight request was answered 503 or its connection closed; it did not hang.
    let answer = inflight.join().unwrap();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 503"),
        "{answer}"
    );
    drop(slow);
}

#[test]
fn idle_and_trickling_connections_are_closed_and_connections_are_capped() {
    use std::io::{Read, Write};
    let srv = server(ServeConfig {
        header_timeout: Duration::from_secs(1),
        max_connections: 3,
        ..cfg()
    });
    let addr = srv.addr();
    let closed_within = |s: &mut std::net::TcpStream, limit: Duration| {
        s.set_read_timeout(Some(limit)).unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 256];
        // EOF (or a reset) once the server closes it; a read timeout means it stayed open.
        match s.read(&mut buf) {
            Ok(0) | Err(_) if t.elapsed() < limit => t.elapsed(),
            r => panic!("still open after {:?}: {r:?}", t.elapsed()),
        }
    };
    // Three connections: one idle, one trickling half a header, one that never speaks.
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    let mut trickle = std::net::TcpStream::connect(addr).unwrap();
    trickle
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut third = std::net::TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // A fourth is over the cap: 503 in the JSON error shape, then closed.
    let r = get(addr, "/healthz");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(error_of(&r).0, "rate_limit_error");
    // The header timeout closes all three.
    for s in [&mut idle, &mut trickle, &mut third] {
        closed_within(s, Duration::from_secs(5));
    }
    // Slots are free again.
    assert_eq!(get(addr, "/healthz").status, 200);
}

#[test]
fn serve_flags_are_checked_before_binding() {
    for (args, needle) in [
        (vec!["serve", "--max-batch", "0"], "--max-batch"),
        (vec!["serve", "--model", "/no/such/dir"], "/no/such/dir"),
        (
            vec!["serve", "--timeout-s=-1", "--model", "x"],
            "--timeout-s",
        ),
        (
            vec!["serve", "--batch-window-ms", "18446744073709551615"],
            "--batch-window-ms",
        ),
        (vec!["serve", "--url-ttl-s", "99999999999"], "--url-ttl-s"),
        (vec!["serve", "--max-connections", "0"], "--max-connections"),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lcm"))
            .args(&args)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// The batched entry point: each request's images equal the request run alone, for the LCM
/// guidance embedding (per-sample w) and for CFG (per-sample guidance, own negative prompts).
#[test]
fn generate_batch_equals_each_request_alone() {
    for model in ["tiny-lcm", "tiny-sd"] {
        let pipe = pipeline(model);
        let reqs: Vec<GenerateRequest> = [
            ("a cat", Some("blurry"), 2.5, 1usize, 11u64),
            ("a dog on a hill", None, 6.0, 2, 12),
            ("", Some("dark"), 4.0, 1, 13),
        ]
        .iter()
        .map(|(p, neg, g, n, seed)| GenerateRequest {
            prompt: p.to_string(),
            negative_prompt: neg.map(str::to_string),
            steps: Some(3),
            guidance: Some(*g),
            n: *n,
            seed: *seed,
            // TCD re-noises between steps: the per-request noise split is exercised.
            sampler: Some(lcm::sample::sampler::SamplerKind::Tcd),
            ..Default::default()
        })
        .collect();
        let mut sources: Vec<SeededNoise> = reqs.iter().map(|r| SeededNoise::new(r.seed)).collect();
        let mut noises: Vec<&mut dyn NoiseSource> = sources
            .iter_mut()
            .map(|s| s as &mut dyn NoiseSource)
            .collect();
        let batched = pipe
            .generate_batch(&reqs, &Default::default(), &mut noises, &mut |_| {})
            .unwrap();
        assert_eq!(batched.len(), 3);
        for (req, b) in reqs.iter().zip(&batched) {
            let alone = pipe
                .generate(
                    req,
                    &Default::default(),
                    &mut SeededNoise::new(req.seed),
                    &mut |_| {},
                )
                .unwrap();
            assert_eq!(b.images.len(), req.n);
            // Batched kernels may sum in another order: equal to f32 rounding, relative to the
            // latents' scale.
            let d = common::max_abs_diff(&alone.latents, &b.latents);
            let bound = 1e-5 * common::max_abs(&alone.latents).max(1.0);
            assert!(
                d <= bound,
                "{model} {:?}: batched latents differ by {d:.3e} (bound {bound:.3e})",
                req.prompt
            );
        }
        // Incompatible requests are refused, not mixed.
        let mut other = reqs[0].clone();
        other.steps = Some(2);
        let mut a = SeededNoise::new(1);
        let mut b = SeededNoise::new(2);
        let err = pipe
            .generate_batch(
                &[reqs[0].clone(), other],
                &Default::default(),
                &mut [&mut a as &mut dyn NoiseSource, &mut b],
                &mut |_| {},
            )
            .err()
            .expect("incompatible batch");
        assert!(err.to_string().contains("differ"), "{err}");
    }
}

/// `lcm generate --init-image` of the img2img fixture on tiny-lcm: strength 0.5, 4 steps,
/// guidance 8.5, seed 3 — what the HTTP img2img tests compare with.
fn cli_img2img(tag: &str) -> image::RgbImage {
    let dir = std::env::temp_dir().join(format!("lcm-serve-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("cli.png");
    let init = fixtures().join("img2img/init.png");
    let o = common::lcm_bin(&[
        "generate",
        // The in-process server runs f32 (on an AMX CPU the CLI's default would be bf16).
        "--dtype",
        "f32",
        "--model",
        fixtures().join("tiny-lcm").to_str().unwrap(),
        "--prompt",
        "a photo of a cat",
        "--init-image",
        init.to_str().unwrap(),
        "--strength",
        "0.5",
        "--steps",
        "4",
        "--guidance",
        "8.5",
        "--seed",
        "3",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&out).unwrap().to_rgb8();
    std::fs::remove_dir_all(&dir).ok();
    img
}

/// AUTOMATIC1111's img2img: the image a request returns equals `lcm generate --init-image` with
/// the same settings (same seed, same draws); every bad upload or field is a 400 naming it, and
/// the server keeps serving.
#[test]
fn a1111_img2img_equals_the_cli_and_refuses_bad_uploads() {
    let srv = server(cfg());
    let init_path = fixtures().join("img2img/init.png");
    let init_b64 =
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&init_path).unwrap());
    let body = json!({
        "prompt": "a photo of a cat", "init_images": [format!("data:image/png;base64,{init_b64}")],
        "denoising_strength": 0.5, "steps": 4, "cfg_scale": 8.5, "seed": 3, "sampler_name": "LCM",
        "width": 32, "height": 32, "mask_blur": 4, "resize_mode": 0, "include_init_images": false,
    });
    let r = post_json(srv.addr(), "/sdapi/v1/img2img", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["parameters"]["denoising_strength"], 0.5);
    let served = b64_png(v["images"][0].as_str().unwrap());
    let cli = cli_img2img("i2i");
    assert!(
        max_pixel_diff(&served, &cli) <= 1,
        "served and CLI images differ by {}",
        max_pixel_diff(&served, &cli)
    );

    // A PNG of more pixels than accepted (compressed, it is small).
    let huge = {
        let img = image::GrayImage::new(8192, 2049);
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
        base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
    };
    let with = |k: &str, v: Value| {
        let mut b = body.clone();
        b[k] = v;
        b
    };
    for (bad, param) in [
        (
            with("init_images", json!(["%%% not base64"])),
            "init_images",
        ),
        (
            with(
                "init_images",
                json!([base64::engine::general_purpose::STANDARD.encode(b"not an image")]),
            ),
            "init_images",
        ),
        (with("init_images", json!([])), "init_images"),
        (
            with("init_images", json!([init_b64, init_b64])),
            "init_images",
        ),
        (with("init_images", json!([huge])), "init_images"),
        (with("mask", json!(init_b64)), "mask"),
        (with("denoising_strength", json!(0.0)), "denoising_strength"),
        (with("denoising_strength", json!(1.5)), "denoising_strength"),
        (
            with("denoising_strength", json!(0.05)),
            "denoising_strength",
        ),
        (with("resize_mode", json!(2)), "resize_mode"),
        (with("bogus", json!(1)), "bogus"),
    ] {
        let r = post_json(srv.addr(), "/sdapi/v1/img2img", &bad);
        assert_eq!(r.status, 400, "{param}: {}", r.text());
        let e = r.json();
        assert_eq!(e["error"]["param"], param, "{}", r.text());
    }
    let r = post_json(srv.addr(), "/sdapi/v1/img2img", &body);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A multipart/form-data body of text fields and files (name, filename, bytes).
fn multipart(texts: &[(&str, &str)], files: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "lcmtestboundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (k, v) in texts {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    for (k, name, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// OpenAI's image edits as image-to-image: image i uses seed + i and equals `lcm generate
/// --init-image` with that seed; a mask, a missing or corrupt image, a non-multipart body and bad
/// fields are 400s naming the field.
#[test]
fn openai_edits_are_img2img_and_refuse_bad_forms() {
    let srv = server(cfg());
    let init_path = fixtures().join("img2img/init.png");
    let png = std::fs::read(&init_path).unwrap();
    let texts = [
        ("prompt", "a photo of a cat"),
        ("n", "2"),
        ("size", "32x32"),
        ("seed", "3"),
        ("steps", "4"),
        ("guidance_scale", "8.5"),
        ("strength", "0.5"),
        ("response_format", "b64_json"),
    ];
    let post = |texts: &[(&str, &str)], files: &[(&str, &str, &[u8])]| {
        let (ct, body) = multipart(texts, files);
        serve_common::request(
            srv.addr(),
            "POST",
            "/v1/images/edits",
            &[("Content-Type", &ct)],
            &body,
        )
    };
    let r = post(&texts, &[("image", "init.png", &png)]);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["seed"], 4);
    let first = b64_png(data[0]["b64_json"].as_str().unwrap());
    assert!(max_pixel_diff(&first, &cli_img2img("edits")) <= 1);

    let mut extra = texts.to_vec();
    extra.push(("foo", "1"));
    let mut bad_n = texts.to_vec();
    bad_n[1] = ("n", "two");
    for (r, param) in [
        (
            post(
                &texts,
                &[("image", "init.png", &png), ("mask", "m.png", &png)],
            ),
            Some("mask"),
        ),
        (post(&texts, &[]), Some("image")),
        (
            post(&texts, &[("image", "x.png", b"not an image")]),
            Some("image"),
        ),
        (post(&extra, &[("image", "init.png", &png)]), Some("foo")),
        (post(&bad_n, &[("image", "init.png", &png)]), Some("n")),
        (
            post_json(srv.addr(), "/v1/images/edits", &json!({"prompt": "x"})),
            None,
        ),
    ] {
        assert_eq!(r.status, 400, "{param:?}: {}", r.text());
        let e = r.json();
        if let Some(p) = param {
            assert_eq!(e["error"]["param"], p, "{}", r.text());
        }
    }
    // Strength belongs to edits.
    let r = post_json(
        srv.addr(),
        "/v1/images/generations",
        &json!({"prompt": "x", "strength": 0.5}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "strength");
    let r = post(&texts, &[("image", "init.png", &png)]);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Requests hyper rejects before any handler (malformed, too many headers, URI too long) are
/// answered in the API's JSON error shape, and the server keeps serving.
#[test]
fn requests_hyper_rejects_get_json_errors() {
    use std::io::Write;
    let srv = server(cfg());
    let addr = srv.addr();
    let many: String = (0..200).map(|i| format!("x-{i}: y\r\n")).collect();
    let cases = [
        (400, "NOT A REQUEST\r\n\r\n".to_string()),
        (
            431,
            format!("GET /healthz HTTP/1.1\r\nHost: a\r\n{many}\r\n"),
        ),
        (
            414,
            format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(70_000)),
        ),
    ];
    for (status, raw) in cases {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let r = read_response(&mut s);
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(error_of(&r).0, "invalid_request_error", "{}", r.text());
    }
    assert_eq!(get(addr, "/healthz").status, 200);
}
