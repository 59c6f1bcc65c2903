//! `lcm serve`: an HTTP server over a text-to-image and a text-to-motion model (either may be
//! left out). OpenAI's images API and AUTOMATIC1111's txt2img/img2img, the motion API in the
//! images API's shape, model list, health, Prometheus metrics, the OpenAPI document and a
//! browser page, on axum.
//!
//! Requests are validated on the async runtime, then queued as jobs to a [`batcher::Batcher`]
//! whose single worker runs compatible jobs together as one model batch on a blocking thread.
//! Each kind of model is a [`batcher::BatchModel`] with its own batcher in [`AppState`]; its
//! routes validate, then call the generic `run_job` (queue, deadline, error mapping are
//! written once).

pub mod api;
pub mod batcher;
pub mod images;
pub mod listen;
pub mod metrics;
pub mod motions;
pub mod openapi;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::json;

use crate::pipeline::source::Defaults;
use crate::pipeline::text2motion::MotionPipeline;
use crate::pipeline::Pipeline;
use api::{ApiError, OpenAiImage, OpenAiRequest, OpenAiResponse, ResponseFormat, Txt2ImgRequest};
use batcher::{BatchConfig, BatchModel, Batcher, JobError, SubmitError};
use images::{ImageModel, UrlStore};
use metrics::Metrics;
use motions::{MotionModel, MotionRequest, MotionResponse};

/// Largest request body accepted (413 above).
pub const BODY_LIMIT: usize = 64 * 1024;
/// Body limit of the routes that take an image: the largest upload, base64-encoded, and fields.
pub const UPLOAD_BODY_LIMIT: usize = api::MAX_UPLOAD_BYTES * 4 / 3 + 64 * 1024;
/// Most images kept for `response_format: "url"`.
const URL_STORE_CAP: usize = 256;

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const MOTION_JS: &str = include_str!("../../web/motion.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Most images (or motions) per model batch; 1 turns batching off.
    pub max_batch: usize,
    /// Most requests waiting for the model; more get 429.
    pub max_queue: usize,
    /// Each request's deadline, from arrival.
    pub timeout: Duration,
    /// With a key, every route but `/healthz` and the page needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// How long the batcher waits for compatible requests after the first.
    pub batch_window: Duration,
    /// How long `response_format: "url"` images stay available.
    pub url_ttl: Duration,
    /// After a shutdown signal, how long in-flight work may finish before it is cancelled.
    pub shutdown_grace: Duration,
    /// Most work one request may ask for (network evaluations at the model's native size).
    pub max_request_cost: f64,
    /// Most work waiting in one model's queue; more gets 429.
    pub max_queued_cost: f64,
    /// Headers must arrive within this; idle keep-alive connections close after it.
    pub header_timeout: Duration,
    /// Most open connections; more are answered 503 and closed.
    pub max_connections: usize,
    /// The base of `response_format: "url"` links (e.g. behind a proxy); default: the address
    /// the server listens on. The request's Host header is never used.
    pub public_url: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_queue: 64,
            timeout: Duration::from_secs(120),
            api_key: None,
            batch_window: Duration::from_millis(10),
            url_ttl: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
            max_request_cost: 1000.0,
            max_queued_cost: 4000.0,
            header_timeout: Duration::from_secs(30),
            max_connections: 256,
            public_url: None,
        }
    }
}

/// `lcm serve` flags.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The image model: as `lcm generate --model` (default: the shipped `tiny`), or `none`.
    #[command(flatten)]
    pub model: crate::pipeline::args::ModelArgs,
    /// The motion model: a pipeline name or a motion model folder, or `none`.
    #[arg(long, default_value = "tiny-motion")]
    pub motion_model: String,
    /// Address to listen on (port 0: any free port, printed on start).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Most images (or motions) per model batch (1 turns batching off).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub max_batch: u64,
    /// Most requests waiting for the model; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queue: u64,
    /// Each request's deadline in seconds (504 when it passes).
    #[arg(long, default_value_t = 120.0)]
    pub timeout_s: f64,
    /// Require `Authorization: Bearer KEY` on every route but /healthz and the page.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Milliseconds the batcher waits for compatible requests after the first.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub batch_window_ms: u64,
    /// Seconds a `response_format: "url"` image stays available.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub url_ttl_s: u64,
    /// Seconds in-flight requests may take to finish after SIGINT/SIGTERM before they are
    /// cancelled (a second signal exits at once).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_grace_s: u64,
    /// Most work one request may ask for, in network evaluations at the model's native size
    /// (an image: n × size²/native² × steps, twice with CFG); more is refused with 400.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_request_cost: u64,
    /// Most work waiting per model (same units); more is answered 429.
    #[arg(long, default_value_t = 4000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_queued_cost: u64,
    /// Seconds a client has to send a request's headers; idle keep-alive connections are
    /// closed after as long.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_s: u64,
    /// Most open connections (keep it below the process's file-descriptor limit); more are
    /// answered 503 and closed.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub max_connections: u64,
    /// The base of `response_format: "url"` image links, e.g. https://lcm.example.org behind a
    /// proxy (default: http:// and the listening address; the Host header is never trusted).
    #[arg(long)]
    pub public_url: Option<String>,
    #[command(flatten)]
    pub runtime: crate::runtime::RuntimeArgs,
}

/// `lcm serve`: load the model, bind, serve until SIGINT/SIGTERM, finish in-flight requests.
pub fn run_cli(args: &ServeArgs) -> Result<()> {
    if !(args.timeout_s.is_finite() && args.timeout_s > 0.0 && args.timeout_s <= 86400.0) {
        anyhow::bail!("--timeout-s must be a number of seconds in (0, 86400]")
    }
    if args.api_key.as_deref() == Some("") {
        anyhow::bail!("--api-key must not be empty")
    }
    if let Some(u) = &args.public_url {
        let ok = (u.starts_with("http://") || u.starts_with("https://"))
            && !u.chars().any(|c| c.is_whitespace() || c.is_control());
        if !ok {
            anyhow::bail!("--public-url must be an http:// or https:// URL, got {u:?}")
        }
    }
    let (device, dtype) = args.runtime.resolve_for_inference()?;
    let image = if args.model.model.as_deref() == Some("none") {
        None
    } else {
        let spec = args.model.spec()?;
        if let Some(dir) = crate::pipeline::source::local_dir(&spec)? {
            if crate::pipeline::text2motion::is_motion_folder(&dir) {
                anyhow::bail!("--model {spec} is a motion model: serve it with --motion-model")
            }
        }
        let (resolved, pipe) = args.model.open(&device, dtype)?;
        Some(ImageSpec {
            id: model_id(&resolved.folder.root, &resolved.label),
            examples: resolved.examples,
            pipe: Arc::new(pipe),
        })
    };
    let motion = match args.motion_model.as_str() {
        "none" => None,
        spec => Some(MotionSpec::open(spec, &device)?),
    };
    if image.is_none() && motion.is_none() {
        anyhow::bail!("--model none and --motion-model none leave nothing to serve")
    }
    let label = [
        image.as_ref().map(|m| m.id.clone()),
        motion.as_ref().map(|m| m.id.clone()),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" and ");
    let listener = std::net::TcpListener::bind(&args.addr)
        .with_context(|| format!("--addr {}: cannot listen", args.addr))?;
    let cfg = ServeConfig {
        max_batch: args.max_batch as usize,
        max_queue: args.max_queue as usize,
        timeout: Duration::from_secs_f64(args.timeout_s),
        api_key: args.api_key.clone(),
        batch_window: Duration::from_millis(args.batch_window_ms),
        url_ttl: Duration::from_secs(args.url_ttl_s),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_s),
        max_request_cost: args.max_request_cost as f64,
        max_queued_cost: args.max_queued_cost as f64,
        header_timeout: Duration::from_secs(args.header_timeout_s),
        max_connections: args.max_connections as usize,
        public_url: args.public_url.clone(),
    };
    let addr = listener.local_addr()?;
    println!(
        "serving {label} on http://{addr} (max batch {}, max queue {}, timeout {}s{})",
        cfg.max_batch,
        cfg.max_queue,
        args.timeout_s,
        if cfg.api_key.is_some() {
            ", API key required"
        } else {
            ""
        }
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(
        listener,
        Models { image, motion },
        cfg,
        shutdown_signal(),
    ))?;
    println!("stopped");
    Ok(())
}

/// The name clients see for a model: a local folder by its name, not its path (which would leak
/// into /v1/models); anything else as given.
fn model_id(root: &Path, label: &str) -> String {
    match root.file_name() {
        Some(name) if Path::new(label).is_dir() => name.to_string_lossy().into_owned(),
        _ => label.to_string(),
    }
}

/// What one server serves: an image model, a motion model, or both.
pub struct Models {
    pub image: Option<ImageSpec>,
    pub motion: Option<MotionSpec>,
}

/// A loaded text-to-image pipeline and what clients see of it.
pub struct ImageSpec {
    pub pipe: Arc<Pipeline>,
    pub id: String,
    /// Prompts the model can follow (the pipeline definition's `examples`).
    pub examples: Vec<String>,
}

/// A loaded text-to-motion pipeline and what clients see of it.
pub struct MotionSpec {
    pub pipe: Arc<MotionPipeline>,
    pub id: String,
    /// The pipeline definition's defaults (the class's fill the gaps).
    pub defaults: Defaults,
    pub examples: Vec<String>,
}

impl MotionSpec {
    /// Load a motion model named by a pipeline name or a folder.
    pub fn open(spec: &str, device: &candle_core::Device) -> Result<Self> {
        use crate::pipeline::text2motion::{is_motion_folder, MotionFolder};
        let Some(dir) = crate::pipeline::source::local_dir(spec)? else {
            anyhow::bail!("--motion-model {spec:?} is neither a pipeline name nor a folder")
        };
        if !is_motion_folder(&dir) {
            anyhow::bail!(
                "--motion-model {spec}: {} is not a motion model (no denoiser/config.json)",
                dir.display()
            )
        }
        let def = crate::pipeline::source::find_pipeline(spec)?;
        let pipe = MotionPipeline::open(MotionFolder::open(&dir)?, device)
            .with_context(|| format!("--motion-model {spec}"))?;
        Ok(Self {
            pipe: Arc::new(pipe),
            id: model_id(&dir, spec),
            defaults: def.as_ref().map(|d| d.defaults.clone()).unwrap_or_default(),
            examples: def.map(|d| d.examples).unwrap_or_default(),
        })
    }
}

/// SIGINT or SIGTERM.
async fn signalled() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The first signal starts a graceful shutdown; a second exits at once.
async fn shutdown_signal() {
    signalled().await;
    println!("shutting down: finishing in-flight requests (a second signal exits at once)");
    tokio::spawn(async {
        signalled().await;
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}

/// A server running on its own thread and runtime (for tests and embedding).
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting, finish in-flight requests, and wait.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Serve `models` on `listener` from a new thread; returns once the server accepts connections.
pub fn start(
    listener: std::net::TcpListener,
    models: Models,
    cfg: ServeConfig,
) -> Result<ServerHandle> {
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("lcm-serve".into())
        .spawn(move || {
            runtime.block_on(serve(listener, models, cfg, async {
                let _ = stopped.await;
            }))
        })?;
    Ok(ServerHandle {
        addr,
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// Serve until `shutdown` completes, then finish in-flight requests and queued jobs.
pub async fn serve(
    listener: std::net::TcpListener,
    models: Models,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let base_url = match &cfg.public_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => format!("http://{}", listener.local_addr()?),
    };
    let metrics = Arc::new(Metrics::default());
    let batch_cfg = BatchConfig {
        max_batch: cfg.max_batch,
        max_queue: cfg.max_queue,
        max_queued_cost: cfg.max_queued_cost,
        window: cfg.batch_window,
    };
    let images = models.image.map(|m| {
        let model = ImageModel {
            pipe: m.pipe,
            id: m.id,
            examples: m.examples,
            max_batch: cfg.max_batch,
        };
        Batcher::start(Arc::new(model), batch_cfg, metrics.clone())
    });
    let motions = models.motion.map(|m| {
        let model = MotionModel::new(m.pipe, m.id, &m.defaults, m.examples, cfg.max_batch);
        Batcher::start(Arc::new(model), batch_cfg, metrics.clone())
    });
    let state = Arc::new(AppState {
        images,
        motions,
        metrics,
        urls: UrlStore::new(cfg.url_ttl, URL_STORE_CAP),
        created: unix_now(),
        base_url,
        cfg,
    });
    // Shutdown: stop accepting, let in-flight requests finish for the grace period, then cancel
    // what still runs (at its next step) and stop waiting for connections.
    let (fired, mut fired_rx) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = fired.send(true);
    };
    let limits = listen::ConnLimits {
        header_timeout: state.cfg.header_timeout,
        max_connections: state.cfg.max_connections,
    };
    let server = listen::serve_connections(listener, router(state.clone()), limits, signal);
    let grace = state.cfg.shutdown_grace;
    let grace_over = async move {
        let _ = fired_rx.wait_for(|f| *f).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r.context("server failed")?,
        _ = grace_over => {
            eprintln!("shutdown: the {} s grace period is over; cancelling what still runs", grace.as_secs_f64());
            state.abort();
        }
    }
    if let Some(b) = &state.images {
        b.shutdown().await;
    }
    if let Some(b) = &state.motions {
        b.shutdown().await;
    }
    Ok(())
}

pub struct AppState {
    images: Option<Batcher<ImageModel>>,
    motions: Option<Batcher<MotionModel>>,
    metrics: Arc<Metrics>,
    urls: UrlStore,
    cfg: ServeConfig,
    created: u64,
    /// What `url` links start with.
    base_url: String,
}

impl AppState {
    fn abort(&self) {
        if let Some(b) = &self.images {
            b.abort();
        }
        if let Some(b) = &self.motions {
            b.abort();
        }
    }

    fn images(&self) -> Result<&Batcher<ImageModel>, ApiError> {
        self.images.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no image model is served here (lcm serve --model none)",
            )
        })
    }

    fn motions(&self) -> Result<&Batcher<MotionModel>, ApiError> {
        self.motions.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no motion model is served here (lcm serve --motion-model none)",
            )
        })
    }
}

/// The routes a label may name in metrics (anything else is `other`, so that clients cannot grow
/// the label set), with the kind of model each serves (`none`: the server itself).
const ROUTES: &[(&str, &str)] = &[
    ("/", "none"),
    ("/app.js", "none"),
    ("/motion.js", "none"),
    ("/style.css", "none"),
    ("/healthz", "none"),
    ("/metrics", "none"),
    ("/openapi.json", "none"),
    ("/v1/models", "none"),
    ("/v1/images/generations", "image"),
    ("/v1/images/edits", "image"),
    ("/v1/images/files/{id}", "image"),
    ("/sdapi/v1/txt2img", "image"),
    ("/sdapi/v1/img2img", "image"),
    ("/v1/motions/generations", "motion"),
];

/// Paths open without the API key: health checks, the page itself (which asks for the key) and
/// the API's description.
const OPEN_PATHS: &[&str] = &[
    "/",
    "/app.js",
    "/motion.js",
    "/style.css",
    "/healthz",
    "/openapi.json",
];

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| page(INDEX_HTML, "text/html; charset=utf-8")))
        .route(
            "/app.js",
            get(|| page(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/motion.js",
            get(|| page(MOTION_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/style.css",
            get(|| page(STYLE_CSS, "text/css; charset=utf-8")),
        )
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/openapi.json", get(openapi::document))
        .route("/v1/motions/generations", post(motion_generations))
        .route("/v1/images/generations", post(openai_generations))
        .route(
            "/v1/images/edits",
            post(openai_edits).layer(DefaultBodyLimit::max(UPLOAD_BODY_LIMIT)),
        )
        .route("/v1/images/files/{id}", get(url_image))
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route(
            "/sdapi/v1/img2img",
            // Uploads need more than the JSON routes' body limit.
            post(img2img).layer(DefaultBodyLimit::max(UPLOAD_BODY_LIMIT)),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such route",
            )
        })
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!("method {method} is not allowed on this route"),
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(json_content_type))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

async fn page(text: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

/// Count every response by route and status, and time it.
async fn record(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let path = if path.starts_with("/v1/images/files/") {
        "/v1/images/files/{id}"
    } else {
        path
    };
    let (route, kind) = ROUTES
        .iter()
        .find(|r| r.0 == path)
        .copied()
        .unwrap_or(("other", "none"));
    let t = Instant::now();
    let resp = next.run(req).await;
    st.metrics.request(
        route,
        kind,
        resp.status().as_u16(),
        t.elapsed().as_secs_f64(),
    );
    resp
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = &st.cfg.api_key else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if OPEN_PATHS.contains(&path) && matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
        return next.run(req).await;
    }
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "missing or wrong API key: send Authorization: Bearer KEY",
    )
    .into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// The JSON routes take `application/json`, or no type, or `application/x-www-form-urlencoded`
/// (what `curl -d` sends, so the README's examples work); anything else (e.g. `text/plain`) is a
/// 415. Multipart goes to the routes that take uploads only.
async fn json_content_type(req: Request, next: Next) -> Response {
    let json_route = req.method() == Method::POST
        && ROUTES
            .iter()
            .any(|(r, kind)| *r == req.uri().path() && *kind != "none")
        && req.uri().path() != "/v1/images/edits";
    if json_route {
        let ty = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        let ok = match ty.as_deref() {
            None | Some("") => true,
            Some(t) => t == "application/json" || t == "application/x-www-form-urlencoded",
        };
        if !ok {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                format!(
                    "the body must be JSON (Content-Type: application/json), not {}",
                    ty.unwrap_or_default()
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Compare without an early exit, so that timing does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= (*x ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses((status = 200, description = "The served models", body = api::ModelList)))]
async fn models(State(st): State<Arc<AppState>>) -> Json<api::ModelList> {
    let mut data = Vec::new();
    if let Some(b) = &st.images {
        let m = b.model();
        let s = m.pipe.resolve(
            &crate::pipeline::GenerateRequest {
                n: 1,
                ..Default::default()
            },
            &Default::default(),
        );
        data.push(api::ModelCard {
            id: m.id.clone(),
            object: "model",
            created: st.created,
            owned_by: "lcm",
            kind: "text-to-image",
            endpoints: vec![
                "/v1/images/generations",
                "/v1/images/edits",
                "/sdapi/v1/txt2img",
                "/sdapi/v1/img2img",
            ],
            defaults: s.ok().map(|s| api::ModelDefaults {
                sampler: s.sampler.to_string(),
                steps: s.steps,
                guidance_scale: s.guidance,
                size: Some(format!("{}x{}", s.width, s.height)),
                seconds: None,
            }),
            examples: m.examples.clone(),
            max_outputs: api::MAX_IMAGES,
            max_side: Some(api::max_side(&m.pipe)),
            size_multiple: Some(m.pipe.vae_scale_factor()),
            fps: None,
            max_seconds: None,
            window_seconds: None,
        });
    }
    if let Some(b) = &st.motions {
        let m = b.model();
        let d = &m.defaults;
        let fps = crate::motion::FPS;
        data.push(api::ModelCard {
            id: m.id.clone(),
            object: "model",
            created: st.created,
            owned_by: "lcm",
            kind: "text-to-motion",
            endpoints: vec!["/v1/motions/generations"],
            defaults: Some(api::ModelDefaults {
                sampler: d
                    .sampler
                    .unwrap_or(crate::sample::sampler::SamplerKind::Lcm)
                    .to_string(),
                steps: d.steps.unwrap_or(4),
                guidance_scale: d.guidance.unwrap_or(7.5),
                size: None,
                seconds: d.seconds,
            }),
            examples: m.examples.clone(),
            max_outputs: api::MAX_IMAGES,
            max_side: None,
            size_multiple: None,
            fps: Some(fps),
            max_seconds: Some(motions::MAX_FRAMES as f64 / fps),
            window_seconds: Some(m.pipe.vae.config.max_frames as f64 / fps),
        });
    }
    Json(api::ModelList {
        object: "list",
        data,
    })
}

fn body_error(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than {BODY_LIMIT} bytes"),
        )
    } else {
        ApiError::new(e.status(), "invalid_request_error", e.body_text())
    }
}

/// Queue a validated job on any model's batcher and wait for its output within the request's
/// deadline, mapping every way it can fail to the API's error shape: a second kind of model
/// (e.g. motion) serves through this same function.
async fn run_job<M: BatchModel>(
    st: &AppState,
    batcher: &Batcher<M>,
    job: M::Job,
) -> Result<M::Output, ApiError> {
    let cost = batcher.model().cost(&job);
    if cost > st.cfg.max_request_cost {
        return Err(ApiError::bad_request(format!(
            "this request asks for {cost:.0} network evaluations ({}), more than this server's \
             limit of {:.0}: ask for fewer outputs, a smaller size or length, or fewer steps",
            batcher.model().cost_terms(),
            st.cfg.max_request_cost
        )));
    }
    let deadline = Instant::now() + st.cfg.timeout;
    let rx = batcher.submit(job, deadline).map_err(|e| match e {
        SubmitError::QueueFull { retry_after_s } => ApiError {
            retry_after_s: Some(retry_after_s),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "the queue is full (requests or queued work), retry later",
            )
        },
        SubmitError::TooBusy { retry_after_s } => ApiError {
            retry_after_s: Some(retry_after_s),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "the work queued ahead would not let this request finish within {} s; \
                     retry later",
                    st.cfg.timeout.as_secs_f64()
                ),
            )
        },
        SubmitError::TooSlow { seconds } => ApiError::bad_request(format!(
            "this request would take about {seconds:.0} s here, more than the server's \
             deadline of {} s: ask for less work",
            st.cfg.timeout.as_secs_f64()
        )),
        SubmitError::ShuttingDown => shutting_down(),
    })?;
    let timeout = || {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            format!(
                "the request did not finish within {} s",
                st.cfg.timeout.as_secs_f64()
            ),
        )
    };
    match tokio::time::timeout_at(deadline.into(), rx).await {
        Err(_) => Err(timeout()),
        Ok(Err(_)) => Err(shutting_down()),
        Ok(Ok(Ok(output))) => Ok(output),
        Ok(Ok(Err(JobError::Expired))) => Err(timeout()),
        Ok(Ok(Err(JobError::ShuttingDown))) => Err(shutting_down()),
        Ok(Ok(Err(JobError::Failed(msg)))) => {
            eprintln!("error: generation failed: {msg}");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("generation failed: {msg}"),
            ))
        }
    }
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the server is shutting down",
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// OpenAI's images API, with `steps`, `guidance_scale`, `seed`, `sampler` and `negative_prompt`
/// as extensions.
#[utoipa::path(post, path = "/v1/images/generations", tag = "images",
    request_body = OpenAiRequest,
    responses(
        (status = 200, description = "The images", body = OpenAiResponse),
        (status = 400, description = "A bad field, named in `param`", body = api::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = api::ErrorBody),
        (status = 429, description = "The queue is full; see Retry-After", body = api::ErrorBody),
    ))]
async fn openai_generations(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<OpenAiResponse>, ApiError> {
    let body = body.map_err(body_error)?;
    let req: OpenAiRequest = api::parse_json(&body)?;
    openai_images(&st, req, None).await
}

/// `POST /v1/images/edits`: OpenAI's multipart form (`image`, `prompt`, `n`, `size`,
/// `response_format`, …) as image-to-image; a `mask` is refused until inpainting exists.
#[utoipa::path(post, path = "/v1/images/edits", tag = "images",
    request_body(content = inline(Object), content_type = "multipart/form-data",
        description = "`image` (PNG or JPEG) and the generations fields as form fields, plus \
                       `strength` (default 0.8)"),
    responses(
        (status = 200, description = "The images", body = OpenAiResponse),
        (status = 400, description = "A bad field, named in `param`", body = api::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = api::ErrorBody),
        (status = 429, description = "The queue is full; see Retry-After", body = api::ErrorBody),
    ))]
async fn openai_edits(
    State(st): State<Arc<AppState>>,
    form: Result<axum::extract::Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<OpenAiResponse>, ApiError> {
    let bad = |msg: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", msg);
    let mut form = form.map_err(|e| bad(format!("expected a multipart/form-data body: {e}")))?;
    let (mut fields, mut image) = (Vec::new(), None);
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| bad(format!("unreadable multipart body: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "image" | "image[]" => {
                if image.is_some() {
                    return Err(ApiError::invalid("image", "one image is supported"));
                }
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| ApiError::invalid("image", format!("image: {e}")))?;
                image = Some(api::decode_upload(&bytes, "image")?);
            }
            "mask" => {
                return Err(ApiError::invalid(
                    "mask",
                    "inpainting (mask) is not supported yet; send no mask for an edit",
                ))
            }
            _ => {
                let text = field
                    .text()
                    .await
                    .map_err(|e| ApiError::invalid(&name, format!("{name}: {e}")))?;
                fields.push((name, text));
            }
        }
    }
    let Some(image) = image else {
        return Err(ApiError::invalid("image", "the form has no image"));
    };
    let req = OpenAiRequest::from_form(fields)?;
    openai_images(&st, req, Some(image)).await
}

/// Generations and edits: the job, run, and OpenAI's response shape.
async fn openai_images(
    st: &AppState,
    req: OpenAiRequest,
    init: Option<image::RgbImage>,
) -> Result<Json<OpenAiResponse>, ApiError> {
    let format = req.response_format()?;
    let batcher = st.images()?;
    let model = batcher.model();
    let job = req.to_job(&model.pipe, &model.id, init)?;
    let images = run_job(st, batcher, job).await?;
    let data = images
        .into_iter()
        .map(|img| match format {
            ResponseFormat::B64Json => OpenAiImage {
                b64_json: Some(b64(&img.png)),
                url: None,
                revised_prompt: None,
                seed: img.seed,
            },
            ResponseFormat::Url => OpenAiImage {
                b64_json: None,
                url: Some(format!(
                    "{}/v1/images/files/{}.png",
                    st.base_url,
                    st.urls.put(img.png)
                )),
                revised_prompt: None,
                seed: img.seed,
            },
        })
        .collect();
    Ok(Json(OpenAiResponse {
        created: unix_now(),
        data,
    }))
}

async fn url_image(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let id = id.strip_suffix(".png").unwrap_or(&id);
    match st.urls.get(id) {
        Some(png) => (
            [(header::CONTENT_TYPE, "image/png")],
            Body::from(png.as_ref().clone()),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "no such image (URLs expire after {} s)",
                st.urls.ttl().as_secs()
            ),
        )
        .into_response(),
    }
}

/// AUTOMATIC1111's txt2img.
#[utoipa::path(post, path = "/sdapi/v1/txt2img", tag = "a1111",
    request_body = Txt2ImgRequest,
    responses(
        (status = 200, description = "The images", body = api::Txt2ImgResponse),
        (status = 400, description = "A bad field, named in `param`", body = api::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = api::ErrorBody),
        (status = 429, description = "The queue is full; see Retry-After", body = api::ErrorBody),
    ))]
async fn txt2img(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<api::Txt2ImgResponse>, ApiError> {
    let body = body.map_err(body_error)?;
    let req = Txt2ImgRequest::parse(&body)?;
    a1111(&st, &req, None).await
}

/// AUTOMATIC1111's img2img.
#[utoipa::path(post, path = "/sdapi/v1/img2img", tag = "a1111",
    request_body(content = inline(Object),
        description = "txt2img's fields plus `init_images` (one base64 PNG or JPEG) and \
                       `denoising_strength` (default 0.75)"),
    responses(
        (status = 200, description = "The images", body = api::Txt2ImgResponse),
        (status = 400, description = "A bad field, named in `param`", body = api::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = api::ErrorBody),
        (status = 429, description = "The queue is full; see Retry-After", body = api::ErrorBody),
    ))]
async fn img2img(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<api::Txt2ImgResponse>, ApiError> {
    let body = body.map_err(body_error)?;
    let req = api::Img2ImgRequest::parse(&body)?;
    a1111(&st, &req.txt, Some(req.init)).await
}

/// txt2img and img2img: the job, run, and A1111's response shape.
async fn a1111(
    st: &AppState,
    req: &Txt2ImgRequest,
    init: Option<api::InitAsk>,
) -> Result<Json<api::Txt2ImgResponse>, ApiError> {
    let strength = init.as_ref().map(|i| i.strength);
    let batcher = st.images()?;
    let model = batcher.model();
    let job = req.to_job(&model.pipe, init)?;
    let shape = job.shape;
    let guidance = job.items[0].guidance;
    let seeds: Vec<u64> = job.items.iter().map(|i| i.seed).collect();
    let images = run_job(st, batcher, job).await?;
    let send = req
        .ignored
        .get("send_images")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let sampler_name = shape.sampler.to_string().to_uppercase();
    let batch_size = req.batch_size.unwrap_or(1);
    let n_iter = req.n_iter.unwrap_or(1);
    let mut parameters = json!({
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt.clone().unwrap_or_default(),
        "steps": shape.steps,
        "cfg_scale": guidance,
        "seed": seeds[0],
        "width": shape.width,
        "height": shape.height,
        "batch_size": batch_size,
        "n_iter": n_iter,
        "sampler_name": sampler_name,
    });
    if let Some(s) = strength {
        parameters["denoising_strength"] = s.into();
    }
    let info = json!({
        "prompt": req.prompt,
        "all_prompts": vec![&req.prompt; seeds.len()],
        "negative_prompt": req.negative_prompt.clone().unwrap_or_default(),
        "seed": seeds[0],
        "all_seeds": seeds,
        "width": shape.width,
        "height": shape.height,
        "sampler_name": sampler_name,
        "cfg_scale": guidance,
        "steps": shape.steps,
        "batch_size": batch_size,
        "n_iter": n_iter,
        "sd_model_name": model.id,
    });
    Ok(Json(api::Txt2ImgResponse {
        images: if send {
            images.iter().map(|i| b64(&i.png)).collect()
        } else {
            Vec::new()
        },
        parameters,
        info: info.to_string(),
    }))
}

/// `POST /v1/motions/generations`: validate, queue on the motion batcher, encode each motion in
/// the asked format off the async runtime.
#[utoipa::path(post, path = "/v1/motions/generations", tag = "motions",
    request_body = MotionRequest,
    responses(
        (status = 200, description = "The motions", body = MotionResponse),
        (status = 400, description = "A bad field, named in `param`", body = api::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = api::ErrorBody),
        (status = 429, description = "The queue is full; see Retry-After", body = api::ErrorBody),
    ))]
async fn motion_generations(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<MotionResponse>, ApiError> {
    let body = body.map_err(body_error)?;
    let req: MotionRequest = api::parse_json(&body)?;
    let batcher = st.motions()?;
    let format = req.format()?;
    let job = req.to_job(batcher.model())?;
    let motions = run_job(&st, batcher, job).await?;
    let data = tokio::task::spawn_blocking(move || {
        motions
            .iter()
            .map(|m| motions::encode(m, format))
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
    .and_then(|r| r)
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("encoding the motions failed: {e:#}"),
        )
    })?;
    Ok(Json(MotionResponse {
        created: unix_now(),
        data,
    }))
}
