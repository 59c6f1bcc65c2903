//! The wire formats: OpenAI's images API and AUTOMATIC1111's txt2img, their validation into an
//! [`ImageJob`], and the one error shape every failure uses.

use std::collections::BTreeMap;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::images::{ImageItem, ImageJob, ImageShape};
use crate::pipeline::{GenerateRequest, Pipeline};
use crate::sample::sampler::SamplerKind;

/// Most images one request may ask for (OpenAI's limit for n).
pub const MAX_IMAGES: usize = 10;
pub const MAX_STEPS: usize = 50;
pub const MAX_GUIDANCE: f64 = 30.0;
/// Prompt cap before tokenizing (OpenAI's character limit); the token limit applies after.
pub const MAX_PROMPT_BYTES: usize = 4000;

/// The body of every error response (for the OpenAPI document; [`ApiError`] writes it).
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`, `timeout_error` or
    /// `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
}

/// `GET /v1/models`.
#[derive(Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// A served model, its defaults and limits.
#[derive(Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// `text-to-image` or `text-to-motion`.
    pub kind: &'static str,
    pub endpoints: Vec<&'static str>,
    pub defaults: Option<ModelDefaults>,
    /// Prompts the model can follow.
    pub examples: Vec<String>,
    /// Most images or motions per request (`n`).
    pub max_outputs: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_side: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_multiple: Option<usize>,
    /// Motion: frames per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fps: Option<f64>,
    /// Motion: the longest motion served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_seconds: Option<f64>,
    /// Motion: the longest made in one window; longer ones are chained windows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<f64>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelDefaults {
    pub sampler: String,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Image: "WxH".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Motion: length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

/// `{"error": {"message", "type", "param"}}` with a status (and Retry-After for 429).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            retry_after_s: None,
        }
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {"message": self.message, "type": self.kind, "param": self.param}
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// Parse a JSON body (one value: trailing bytes other than whitespace are refused), naming the
/// offending field on failure.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(de_error)?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    Ok(value)
}

/// Deserialize an already parsed JSON value, naming the offending field on failure.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(de_error)
}

fn de_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let inner = e.inner();
    let path = e.path().to_string();
    let msg = inner.to_string();
    match inner.classify() {
        serde_json::error::Category::Data => {
            // Unknown and missing fields are reported at the parent's path; the name is in the
            // message.
            let param = if path != "." && !msg.starts_with("unknown field") {
                Some(path)
            } else {
                msg.split('`').nth(1).map(str::to_string)
            };
            ApiError {
                param,
                ..ApiError::bad_request(format!("invalid request: {msg}"))
            }
        }
        _ => ApiError::bad_request(format!("malformed JSON body: {msg}")),
    }
}

/// What both APIs ask for, before validation.
pub struct Ask<'a> {
    pub prompt: &'a str,
    pub negative_prompt: Option<&'a str>,
    pub images: usize,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub sampler: Option<SamplerKind>,
    pub seed: Option<u64>,
    /// Image-to-image: the uploaded image and its strength.
    pub init: Option<InitAsk>,
    /// Field names in the caller's API, for error messages.
    pub names: FieldNames,
}

/// An image-to-image upload, decoded, and the strength asked for.
pub struct InitAsk {
    pub image: image::RgbImage,
    pub strength: f64,
    /// The API's names of the image and strength fields, for messages.
    pub fields: (&'static str, &'static str),
}

/// Largest upload accepted, in pixels (width × height) and in bytes.
pub const MAX_UPLOAD_PIXELS: u64 = 4096 * 4096;
pub const MAX_UPLOAD_BYTES: usize = 8 * 1024 * 1024;

/// Decode an uploaded image (PNG or JPEG), refusing oversized or unreadable ones with a 4xx that
/// names `field`.
pub fn decode_upload(bytes: &[u8], field: &str) -> Result<image::RgbImage, ApiError> {
    if bytes.len() > MAX_UPLOAD_BYTES {
        return Err(ApiError::invalid(
            field,
            format!(
                "{field} is {} bytes, at most {MAX_UPLOAD_BYTES} are accepted",
                bytes.len()
            ),
        ));
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::invalid(field, format!("{field}: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_UPLOAD_PIXELS * 4);
    reader.limits(limits);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ApiError::invalid(field, format!("{field} is not a readable image: {e}")))?;
    if w as u64 * h as u64 > MAX_UPLOAD_PIXELS {
        return Err(ApiError::invalid(
            field,
            format!("{field} is {w}x{h}, more than {MAX_UPLOAD_PIXELS} pixels"),
        ));
    }
    crate::pipeline::image_io::decode_rgb(bytes, field)
        .map_err(|e| ApiError::invalid(field, format!("{e:#}")))
}

#[derive(Clone, Copy)]
pub struct FieldNames {
    pub images: &'static str,
    pub size: (&'static str, &'static str),
    pub steps: &'static str,
    pub guidance: &'static str,
}

/// Check every value and resolve defaults from the model; nothing here touches the model weights.
pub fn build_job(pipe: &Pipeline, ask: &Ask) -> Result<ImageJob, ApiError> {
    let names = ask.names;
    check_prompt(pipe, "prompt", ask.prompt)?;
    if let Some(neg) = ask.negative_prompt {
        check_prompt(pipe, "negative_prompt", neg)?;
    }
    if !(1..=MAX_IMAGES).contains(&ask.images) {
        return Err(ApiError::invalid(
            names.images,
            format!(
                "{} must be between 1 and {MAX_IMAGES}, got {}",
                names.images, ask.images
            ),
        ));
    }
    if let Some(steps) = ask.steps {
        if !(1..=MAX_STEPS).contains(&steps) {
            return Err(ApiError::invalid(
                names.steps,
                format!(
                    "{} must be between 1 and {MAX_STEPS}, got {steps}",
                    names.steps
                ),
            ));
        }
    }
    if let Some(g) = ask.guidance {
        if !(0.0..=MAX_GUIDANCE).contains(&g) {
            return Err(ApiError::invalid(
                names.guidance,
                format!(
                    "{} must be between 0 and {MAX_GUIDANCE}, got {g}",
                    names.guidance
                ),
            ));
        }
    }
    let f = pipe.vae_scale_factor();
    let max_side = max_side(pipe);
    for (name, v) in [(names.size.0, ask.width), (names.size.1, ask.height)] {
        if let Some(v) = v {
            if v == 0 || v % f != 0 || v > max_side {
                return Err(ApiError::invalid(
                    name,
                    format!("{name} {v} must be a positive multiple of {f} and at most {max_side}"),
                ));
            }
        }
    }
    let mut req = GenerateRequest {
        prompt: ask.prompt.to_string(),
        negative_prompt: ask.negative_prompt.map(str::to_string),
        sampler: ask.sampler,
        steps: ask.steps,
        guidance: ask.guidance,
        width: ask.width,
        height: ask.height,
        n: 1,
        ..Default::default()
    };
    let bad = |e: anyhow::Error| ApiError::bad_request(format!("{e:#}").replace("--", ""));
    let mut s = pipe.resolve(&req, &Default::default()).map_err(bad)?;
    // Image-to-image: the upload at the resolved size (A1111 and OpenAI resize it to the
    // requested size), then the strength's timesteps checked.
    let init = match &ask.init {
        Some(init) => {
            let (img_field, strength_field) = init.fields;
            if !(init.strength > 0.0 && init.strength <= 1.0) {
                return Err(ApiError::invalid(
                    strength_field,
                    format!("{strength_field} must be in (0, 1], got {}", init.strength),
                ));
            }
            let t = crate::pipeline::image_io::init_image_tensor(
                &init.image,
                Some(s.width),
                Some(s.height),
                f,
            )
            .map_err(|e| ApiError::invalid(img_field, format!("{img_field}: {e:#}")))?;
            req.init_image = Some(t.clone());
            req.strength = Some(init.strength);
            req.width = Some(s.width);
            req.height = Some(s.height);
            s = pipe.resolve(&req, &Default::default()).map_err(|e| {
                ApiError::invalid(strength_field, format!("{e:#}").replace("--", ""))
            })?;
            Some(std::sync::Arc::new(t))
        }
        None => None,
    };
    let seed = ask.seed.unwrap_or_else(random_seed);
    let items = (0..ask.images as u64)
        .map(|i| ImageItem {
            prompt: ask.prompt.to_string(),
            negative_prompt: ask.negative_prompt.map(str::to_string),
            guidance: s.guidance,
            // Image i of a request uses seed + i (as AUTOMATIC1111 does), so any one image can be
            // reproduced alone with n = 1.
            seed: seed.wrapping_add(i),
            init_image: init.clone(),
        })
        .collect();
    Ok(ImageJob {
        shape: ImageShape {
            width: s.width,
            height: s.height,
            steps: s.steps,
            sampler: s.sampler,
            cfg: s.cfg,
            strength: ask.init.as_ref().map(|_| s.strength.to_bits()),
        },
        items,
    })
}

/// Seeds the server draws stay below 2^32 so that they survive JavaScript numbers and A1111 tools.
pub fn random_seed() -> u64 {
    rand::random::<u32>() as u64
}

/// The largest width or height served: four times the model's native size.
pub fn max_side(pipe: &Pipeline) -> usize {
    4 * pipe.unet.config.sample_size.unwrap_or(64) * pipe.vae_scale_factor()
}

/// The cap on a prompt's bytes, before any tokenizing.
pub fn check_prompt_bytes(param: &str, prompt: &str) -> Result<(), ApiError> {
    if prompt.len() > MAX_PROMPT_BYTES {
        return Err(ApiError::invalid(
            param,
            format!(
                "{param} is {} bytes, at most {MAX_PROMPT_BYTES} are accepted",
                prompt.len()
            ),
        ));
    }
    Ok(())
}

fn check_prompt(pipe: &Pipeline, param: &str, prompt: &str) -> Result<(), ApiError> {
    check_prompt_bytes(param, prompt)?;
    let tokens = pipe
        .tokenizer
        .encode(prompt)
        .map_err(|e| ApiError::invalid(param, format!("{e:#}")))?;
    if tokens.dropped > 0 {
        let room = pipe.tokenizer.max_len() - 2;
        return Err(ApiError::invalid(
            param,
            format!(
                "{param} is {} tokens, the text encoder takes at most {room}",
                room + tokens.dropped
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- OpenAI images API

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAiRequest {
    pub prompt: String,
    pub model: Option<String>,
    pub n: Option<usize>,
    /// "WxH".
    pub size: Option<String>,
    /// `b64_json` (default) or `url`.
    pub response_format: Option<String>,
    /// Accepted and ignored (OpenAI clients send them; they have no meaning here).
    pub quality: Option<String>,
    pub style: Option<String>,
    pub user: Option<String>,
    // Extensions.
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub seed: Option<u64>,
    pub sampler: Option<String>,
    pub negative_prompt: Option<String>,
    /// Edits (image-to-image) only: the share of the schedule to run (default 0.8, as
    /// `lcm generate --strength`).
    pub strength: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    B64Json,
    Url,
}

impl OpenAiRequest {
    pub fn response_format(&self) -> Result<ResponseFormat, ApiError> {
        match self.response_format.as_deref() {
            None | Some("b64_json") => Ok(ResponseFormat::B64Json),
            Some("url") => Ok(ResponseFormat::Url),
            Some(other) => Err(ApiError::invalid(
                "response_format",
                format!("response_format must be b64_json or url, got {other:?}"),
            )),
        }
    }

    /// The fields of a multipart `/v1/images/edits` form (all text; `n`, `steps`, `seed`,
    /// `guidance_scale` and `strength` as numbers) as the JSON this type parses.
    pub fn from_form(fields: Vec<(String, String)>) -> Result<Self, ApiError> {
        let mut obj = serde_json::Map::new();
        for (k, v) in fields {
            let value = match k.as_str() {
                "n" | "steps" | "seed" | "guidance_scale" | "strength" => {
                    let n: serde_json::Number = v.trim().parse().map_err(|_| {
                        ApiError::invalid(&k, format!("{k} must be a number, got {v:?}"))
                    })?;
                    Value::Number(n)
                }
                _ => Value::String(v),
            };
            obj.insert(k, value);
        }
        from_value(Value::Object(obj))
    }

    pub fn to_job(
        &self,
        pipe: &Pipeline,
        model_id: &str,
        init: Option<image::RgbImage>,
    ) -> Result<ImageJob, ApiError> {
        let init = match (init, self.strength) {
            (Some(image), s) => Some(InitAsk {
                image,
                strength: s.unwrap_or(0.8),
                fields: ("image", "strength"),
            }),
            (None, Some(_)) => {
                return Err(ApiError::invalid(
                    "strength",
                    "strength is for /v1/images/edits",
                ))
            }
            (None, None) => None,
        };
        if let Some(m) = &self.model {
            if m != model_id {
                return Err(ApiError::invalid(
                    "model",
                    format!("model {m:?} is not served here; this server serves {model_id:?}"),
                ));
            }
        }
        let (width, height) = match &self.size {
            None => (None, None),
            Some(s) => {
                let parsed = s
                    .split_once(['x', 'X'])
                    .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
                match parsed {
                    Some((w, h)) => (Some(w), Some(h)),
                    None => {
                        return Err(ApiError::invalid(
                            "size",
                            format!("size must look like \"512x512\", got {s:?}"),
                        ))
                    }
                }
            }
        };
        let sampler = match &self.sampler {
            None => None,
            Some(s) => Some(
                s.parse::<SamplerKind>()
                    .map_err(|e| ApiError::invalid("sampler", e.to_string()))?,
            ),
        };
        build_job(
            pipe,
            &Ask {
                prompt: &self.prompt,
                negative_prompt: self.negative_prompt.as_deref(),
                images: self.n.unwrap_or(1),
                width,
                height,
                steps: self.steps,
                guidance: self.guidance_scale,
                sampler,
                seed: self.seed,
                init,
                names: FieldNames {
                    images: "n",
                    size: ("size", "size"),
                    steps: "steps",
                    guidance: "guidance_scale",
                },
            },
        )
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiResponse {
    pub created: u64,
    pub data: Vec<OpenAiImage>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiImage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Never set: prompts are used as given. Kept for OpenAI clients that read it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revised_prompt: Option<String>,
    pub seed: u64,
}

// ---------------------------------------------------------------- AUTOMATIC1111 txt2img

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Txt2ImgRequest {
    #[serde(default)]
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: Option<usize>,
    pub cfg_scale: Option<f64>,
    /// −1 (or absent) draws a random seed.
    pub seed: Option<i64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub batch_size: Option<usize>,
    pub n_iter: Option<usize>,
    pub sampler_name: Option<String>,
    /// Fields A1111 clients send routinely, taken out before the strict parse and accepted only
    /// with values that change nothing here (see docs/deviations.md).
    #[serde(skip)]
    pub ignored: BTreeMap<String, Value>,
}

type ValueTest = fn(&Value) -> bool;

/// A1111 fields accepted when they ask for nothing this server would do differently: the name and
/// a test of the value.
const A1111_TOLERATED: &[(&str, ValueTest)] = &[
    ("sampler_index", |_| true),
    ("scheduler", |_| true),
    ("send_images", |v| v.as_bool() == Some(true)),
    ("save_images", |v| v.is_boolean()),
    ("do_not_save_samples", |v| v.is_boolean()),
    ("do_not_save_grid", |v| v.is_boolean()),
    ("restore_faces", |v| {
        v.as_bool() == Some(false) || v.is_null()
    }),
    ("tiling", |v| v.as_bool() == Some(false) || v.is_null()),
    ("enable_hr", |v| v.as_bool() == Some(false)),
    ("denoising_strength", |v| v.is_number() || v.is_null()),
    ("eta", |v| v.is_number() || v.is_null()),
    ("styles", |v| v.as_array().is_some_and(|a| a.is_empty())),
    ("subseed", |v| v.is_i64()),
    ("subseed_strength", |v| v.as_f64() == Some(0.0)),
    ("seed_resize_from_h", |v| v.as_i64().is_some_and(|x| x <= 0)),
    ("seed_resize_from_w", |v| v.as_i64().is_some_and(|x| x <= 0)),
    ("override_settings", |v| {
        v.as_object().is_some_and(|o| o.is_empty()) || v.is_null()
    }),
    ("override_settings_restore_afterwards", |v| v.is_boolean()),
    ("alwayson_scripts", |v| {
        v.as_object().is_some_and(|o| o.is_empty()) || v.is_null()
    }),
    ("script_args", |v| {
        v.as_array().is_some_and(|a| a.is_empty())
    }),
    ("script_name", |v| v.is_null() || v.as_str() == Some("")),
];

/// A1111 sampler names this server maps to its own samplers.
pub fn a1111_sampler(name: &str) -> Result<Option<SamplerKind>, ApiError> {
    match name.to_ascii_lowercase().as_str() {
        "" | "automatic" | "default" => Ok(None),
        "lcm" => Ok(Some(SamplerKind::Lcm)),
        "ddim" => Ok(Some(SamplerKind::Ddim)),
        "tcd" => Ok(Some(SamplerKind::Tcd)),
        "flowmap" | "flow map" => Ok(Some(SamplerKind::FlowMap)),
        _ => Err(ApiError::invalid(
            "sampler_name",
            format!("sampler_name {name:?} is not available (LCM, TCD, DDIM or flow map)"),
        )),
    }
}

impl Txt2ImgRequest {
    /// Parse a body: tolerated fields are checked and set aside, the rest parsed strictly.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let mut value: Value = parse_json(body)?;
        let mut ignored = BTreeMap::new();
        if let Some(obj) = value.as_object_mut() {
            for (name, ok) in A1111_TOLERATED {
                if let Some(v) = obj.remove(*name) {
                    if !ok(&v) {
                        return Err(ApiError::invalid(
                            name,
                            format!("{name} = {v} is not supported by this server"),
                        ));
                    }
                    ignored.insert(name.to_string(), v);
                }
            }
        }
        let mut req: Self = from_value(value)?;
        req.ignored = ignored;
        Ok(req)
    }

    /// The job of a txt2img body, or of an img2img body with its decoded `init` upload.
    pub fn to_job(&self, pipe: &Pipeline, init: Option<InitAsk>) -> Result<ImageJob, ApiError> {
        let seed = match self.seed {
            None | Some(-1) => None,
            Some(s) if s >= 0 => Some(s as u64),
            Some(s) => {
                return Err(ApiError::invalid(
                    "seed",
                    format!("seed must be -1 (random) or ≥ 0, got {s}"),
                ))
            }
        };
        let sampler_name = self
            .sampler_name
            .as_deref()
            .or_else(|| self.ignored.get("sampler_index").and_then(|v| v.as_str()));
        let sampler = match sampler_name {
            None => None,
            Some(n) => a1111_sampler(n)?,
        };
        let batch = self.batch_size.unwrap_or(1);
        let iters = self.n_iter.unwrap_or(1);
        if batch == 0 || iters == 0 {
            let param = if batch == 0 { "batch_size" } else { "n_iter" };
            return Err(ApiError::invalid(
                param,
                format!("{param} must be at least 1"),
            ));
        }
        build_job(
            pipe,
            &Ask {
                prompt: &self.prompt,
                negative_prompt: self.negative_prompt.as_deref(),
                images: batch.saturating_mul(iters),
                width: self.width,
                height: self.height,
                steps: self.steps,
                guidance: self.cfg_scale,
                sampler,
                seed,
                init,
                names: FieldNames {
                    images: "batch_size",
                    size: ("width", "height"),
                    steps: "steps",
                    guidance: "cfg_scale",
                },
            },
        )
    }
}

/// AUTOMATIC1111's img2img fields beyond txt2img's that ask for inpainting or resizing choices;
/// accepted (and changing nothing) only without a mask, refused otherwise.
const A1111_INPAINT_FIELDS: &[&str] = &[
    "mask_blur",
    "mask_blur_x",
    "mask_blur_y",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "inpainting_mask_invert",
    "initial_noise_multiplier",
    "latent_mask",
    "image_cfg_scale",
];

/// An AUTOMATIC1111 `/sdapi/v1/img2img` body: txt2img's fields, one init image (base64, with or
/// without a `data:` prefix) and `denoising_strength` (default 0.75, as A1111).
pub struct Img2ImgRequest {
    pub txt: Txt2ImgRequest,
    pub init: InitAsk,
}

impl Img2ImgRequest {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let mut value: Value = parse_json(body)?;
        let Some(obj) = value.as_object_mut() else {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        };
        let images = obj.remove("init_images");
        let strength = obj.remove("denoising_strength");
        if obj.remove("mask").is_some_and(|m| !m.is_null()) {
            return Err(ApiError::invalid(
                "mask",
                "inpainting (mask) is not supported yet; send no mask for img2img",
            ));
        }
        for f in A1111_INPAINT_FIELDS {
            obj.remove(*f);
        }
        if let Some(v) = obj.remove("resize_mode") {
            if v.as_i64() != Some(0) {
                return Err(ApiError::invalid(
                    "resize_mode",
                    "only resize_mode 0 (just resize) is supported",
                ));
            }
        }
        if let Some(v) = obj.remove("include_init_images") {
            if v.as_bool() == Some(true) {
                return Err(ApiError::invalid(
                    "include_init_images",
                    "include_init_images = true is not supported by this server",
                ));
            }
        }
        let b64 = match images.as_ref().and_then(Value::as_array).map(Vec::as_slice) {
            Some([Value::String(s)]) => s.clone(),
            Some([_]) => {
                return Err(ApiError::invalid(
                    "init_images",
                    "init_images must hold a base64 string",
                ))
            }
            _ => {
                return Err(ApiError::invalid(
                    "init_images",
                    "init_images must be a list of exactly one base64 image",
                ))
            }
        };
        let strength = match strength {
            None | Some(Value::Null) => 0.75,
            Some(v) => v.as_f64().ok_or_else(|| {
                ApiError::invalid("denoising_strength", "denoising_strength must be a number")
            })?,
        };
        let data = b64.split_once(";base64,").map_or(b64.as_str(), |(_, d)| d);
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| {
                ApiError::invalid("init_images", format!("init_images is not base64: {e}"))
            })?;
        let image = decode_upload(&bytes, "init_images")?;
        let txt = Txt2ImgRequest::parse(&serde_json::to_vec(&value).expect("a JSON value"))?;
        Ok(Self {
            txt,
            init: InitAsk {
                image,
                strength,
                fields: ("init_images", "denoising_strength"),
            },
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Txt2ImgResponse {
    /// PNGs, base64.
    pub images: Vec<String>,
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// A JSON document in a string, as A1111 returns it.
    pub info: String,
}
