//! The diffusers / transformers `config.json` files, read at load time: every size a model has comes
//! from here, never from code. Fields the implementation cannot honour are rejected with an error
//! that names the file and the field instead of being silently ignored.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Read and parse a JSON config, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
}

/// A config number outside what any real model uses (so that an absurd value is an error, not
/// an allocation failure, a division by zero or hours of work).
fn in_range(field: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
    if !(lo..=hi).contains(&v) {
        bail!("{field} {v} is out of range ({lo} to {hi})")
    }
    Ok(())
}

/// The levels of a UNet or VAE: at most 8, each width in range and divisible by GroupNorm's groups.
fn check_blocks(channels: &[usize], groups: usize) -> Result<()> {
    in_range("the number of blocks", channels.len(), 1, 8)?;
    in_range("norm_num_groups", groups, 1, 1024)?;
    for &c in channels {
        in_range("block_out_channels", c, 1, 16384)?;
        if c % groups != 0 {
            bail!("block_out_channels {c} is not divisible by norm_num_groups {groups}")
        }
    }
    Ok(())
}

fn finite_in(field: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    if !(v.is_finite() && v >= lo && v <= hi) {
        bail!("{field} {v} is out of range ({lo} to {hi})")
    }
    Ok(())
}

/// Read, parse and check a config; every error names the file.
pub fn load_checked<T: DeserializeOwned>(
    path: &Path,
    check: impl FnOnce(&T) -> Result<()>,
) -> Result<T> {
    let c: T = read_json(path)?;
    check(&c).with_context(|| format!("{}", path.display()))?;
    Ok(c)
}

/// A config value that diffusers allows as one number or as one number per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Many(Vec<usize>),
}

impl PerBlock {
    /// Expand to one value per block, checking the length of an explicit list.
    pub fn expand(&self, blocks: usize, field: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; blocks]),
            PerBlock::Many(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Many(v) => bail!("{field} has {} entries for {blocks} blocks", v.len()),
        }
    }
}

fn one() -> PerBlock {
    PerBlock::One(1)
}
fn f_one() -> f64 {
    1.0
}
fn t() -> bool {
    true
}
fn eps5() -> f64 {
    1e-5
}
fn silu() -> String {
    "silu".into()
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}

/// `UNet2DConditionModel` config (diffusers).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    #[serde(default = "two_per_block")]
    pub layers_per_block: PerBlock,
    /// SD1.5 naming: when `num_attention_heads` is absent this is the number of heads.
    pub attention_head_dim: Option<PerBlock>,
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "eps5")]
    pub norm_eps: f64,
    #[serde(default = "t")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    /// The LCM guidance-embedding width (`time_embedding.cond_proj`).
    pub time_cond_proj_dim: Option<usize>,
    /// A flow-map student (`lcm` only, see docs/flow-map.md): the jump's end time enters through
    /// `time_embedding.end_proj`, a sinusoid like the timestep's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub end_time_embedding: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "one")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "f_one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "f_one")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    pub time_embedding_dim: Option<usize>,
    #[serde(default = "silu")]
    pub act_fn: String,
    pub sample_size: Option<usize>,
    pub only_cross_attention: Option<serde_json::Value>,
    pub dual_cross_attention: Option<bool>,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub encoder_hid_dim: Option<usize>,
    pub time_embedding_type: Option<String>,
    pub resnet_time_scale_shift: Option<String>,
    pub attention_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub center_input_sample: bool,
}

fn two_per_block() -> PerBlock {
    PerBlock::One(2)
}
fn f_one_usize() -> usize {
    1
}

impl UNetConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate()
            .with_context(|| format!("unsupported U-Net config {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("block_out_channels is empty")
        }
        check_blocks(&self.block_out_channels, self.norm_num_groups)?;
        in_range("in_channels", self.in_channels, 1, 64)?;
        in_range("out_channels", self.out_channels, 1, 64)?;
        in_range("cross_attention_dim", self.cross_attention_dim, 1, 16384)?;
        if let Some(s) = self.sample_size {
            in_range("sample_size", s, 1, 1024)?;
        }
        if let Some(d) = self.time_cond_proj_dim {
            in_range("time_cond_proj_dim", d, 1, 16384)?;
        }
        if let Some(d) = self.time_embedding_dim {
            in_range("time_embedding_dim", d, 1, 65536)?;
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "down_block_types/up_block_types must have one entry per block_out_channels entry"
            )
        }
        for ty in &self.down_block_types {
            if ty != "CrossAttnDownBlock2D" && ty != "DownBlock2D" {
                bail!("down block type {ty:?} is not supported")
            }
        }
        for ty in &self.up_block_types {
            if ty != "CrossAttnUpBlock2D" && ty != "UpBlock2D" {
                bail!("up block type {ty:?} is not supported")
            }
        }
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") => {}
            Some(other) => bail!("mid_block_type {other:?} is not supported"),
        }
        if self.act_fn != "silu" {
            bail!("act_fn {:?} is not supported (only silu)", self.act_fn)
        }
        let unsupported_some = [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("addition_embed_type", self.addition_embed_type.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            (
                "dual_cross_attention",
                self.dual_cross_attention == Some(true),
            ),
            ("center_input_sample", self.center_input_sample),
        ];
        for (field, bad) in unsupported_some {
            if bad {
                bail!("{field} is set but not supported")
            }
        }
        if let Some(v) = &self.only_cross_attention {
            let any_true = match v {
                serde_json::Value::Bool(b) => *b,
                serde_json::Value::Array(a) => a.iter().any(|x| x.as_bool() == Some(true)),
                _ => false,
            };
            if any_true {
                bail!("only_cross_attention is not supported")
            }
        }
        let checks = [
            (
                "time_embedding_type",
                &self.time_embedding_type,
                "positional",
            ),
            (
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "default",
            ),
            ("attention_type", &self.attention_type, "default"),
        ];
        for (field, value, allowed) in checks {
            if let Some(v) = value {
                if v != allowed {
                    bail!("{field} {v:?} is not supported (only {allowed:?})")
                }
            }
        }
        for (heads, &c) in self.heads()?.into_iter().zip(&self.block_out_channels) {
            in_range("attention heads (attention_head_dim)", heads, 1, c)?;
            if c % heads != 0 {
                bail!("block_out_channels {c} is not divisible into {heads} attention heads")
            }
        }
        for l in self.layers()? {
            in_range("layers_per_block", l, 1, 32)?;
        }
        for l in self.transformer_layers()? {
            in_range("transformer_layers_per_block", l, 1, 32)?;
        }
        Ok(())
    }

    /// Attention heads per block. diffusers' SD1.5 configs call this `attention_head_dim`.
    pub fn heads(&self) -> Result<Vec<usize>> {
        let n = self.block_out_channels.len();
        match (&self.num_attention_heads, &self.attention_head_dim) {
            (Some(h), _) => h.expand(n, "num_attention_heads"),
            (None, Some(h)) => h.expand(n, "attention_head_dim"),
            (None, None) => Ok(vec![8; n]),
        }
    }

    pub fn layers(&self) -> Result<Vec<usize>> {
        self.layers_per_block
            .expand(self.block_out_channels.len(), "layers_per_block")
    }

    pub fn transformer_layers(&self) -> Result<Vec<usize>> {
        self.transformer_layers_per_block.expand(
            self.block_out_channels.len(),
            "transformer_layers_per_block",
        )
    }

    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }
}

/// `AutoencoderKL` config (diffusers).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "f_one_usize")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    #[serde(default = "t")]
    pub use_quant_conv: bool,
    #[serde(default = "t")]
    pub use_post_quant_conv: bool,
    #[serde(default = "t")]
    pub mid_block_add_attention: bool,
    #[serde(default = "silu")]
    pub act_fn: String,
    pub sample_size: Option<usize>,
}

fn sd_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    pub fn load(path: &Path) -> Result<Self> {
        load_checked(path, |cfg: &Self| {
            if cfg.block_out_channels.is_empty() {
                bail!("block_out_channels is empty")
            }
            if cfg.act_fn != "silu" {
                bail!("act_fn {:?} is not supported", cfg.act_fn)
            }
            check_blocks(&cfg.block_out_channels, cfg.norm_num_groups)?;
            in_range("in_channels", cfg.in_channels, 1, 64)?;
            in_range("out_channels", cfg.out_channels, 1, 64)?;
            in_range("latent_channels", cfg.latent_channels, 1, 64)?;
            in_range("layers_per_block", cfg.layers_per_block, 1, 32)?;
            if let Some(s) = cfg.sample_size {
                in_range("sample_size", s, 1, 16384)?;
            }
            finite_in("scaling_factor", cfg.scaling_factor, 1e-6, 1e6)?;
            if let Some(s) = cfg.shift_factor {
                finite_in("shift_factor", s, -1e6, 1e6)?;
            }
            Ok(())
        })
    }

    /// Pixels per latent cell along each side: 2^(number of blocks − 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// transformers `CLIPTextConfig` (a `CLIPTextModel`'s config.json; also accepts a full `CLIPConfig`
/// with a nested `text_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "seventy_seven")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps5")]
    pub layer_norm_eps: f64,
}

fn seventy_seven() -> usize {
    77
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}

impl ClipTextConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path)?;
        let value = value.get("text_config").cloned().unwrap_or(value);
        let cfg: Self = serde_json::from_value(value)
            .with_context(|| format!("invalid text encoder config {}", path.display()))?;
        let ranges = [
            ("vocab_size", cfg.vocab_size, 1, 1 << 20),
            ("hidden_size", cfg.hidden_size, 1, 16384),
            ("intermediate_size", cfg.intermediate_size, 1, 65536),
            ("num_hidden_layers", cfg.num_hidden_layers, 1, 128),
            ("num_attention_heads", cfg.num_attention_heads, 1, 256),
            (
                "max_position_embeddings",
                cfg.max_position_embeddings,
                2,
                8192,
            ),
        ];
        for (field, v, lo, hi) in ranges {
            in_range(field, v, lo, hi).with_context(|| path.display().to_string())?;
        }
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            bail!(
                "{}: hidden_size {} is not divisible by num_attention_heads {}",
                path.display(),
                cfg.hidden_size,
                cfg.num_attention_heads
            )
        }
        match cfg.hidden_act.as_str() {
            "quick_gelu" | "gelu" => {}
            other => bail!("{}: hidden_act {other:?} is not supported", path.display()),
        }
        Ok(cfg)
    }
}

/// A scheduler_config.json of any of diffusers' DDPM-family schedulers. We only need the noise
/// schedule and the few knobs the LCM/TCD/DDIM samplers read; the class name picks the default
/// sampler.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub set_alpha_to_one: Option<bool>,
    pub steps_offset: usize,
    pub prediction_type: String,
    pub timestep_spacing: String,
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
    pub clip_sample: bool,
    pub thresholding: bool,
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    /// What a missing field means: SD1.5's DDPM schedule as LCM checkpoints ship it.
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            set_alpha_to_one: None,
            steps_offset: 0,
            prediction_type: "epsilon".into(),
            timestep_spacing: "leading".into(),
            original_inference_steps: None,
            timestep_scaling: None,
            clip_sample: false,
            thresholding: false,
            rescale_betas_zero_snr: false,
        }
    }
}

impl SchedulerConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        let bad =
            |field: &str, why: &str| -> Result<()> { bail!("{}: {field} {why}", path.display()) };
        if !matches!(cfg.beta_schedule.as_str(), "scaled_linear" | "linear") {
            bad(
                "beta_schedule",
                &format!("{:?} is not supported", cfg.beta_schedule),
            )?
        }
        if cfg.prediction_type != "epsilon" {
            bad(
                "prediction_type",
                &format!("{:?} is not supported (only epsilon)", cfg.prediction_type),
            )?
        }
        if cfg.clip_sample || cfg.thresholding || cfg.rescale_betas_zero_snr {
            bad(
                "clip_sample/thresholding/rescale_betas_zero_snr",
                "must be false",
            )?
        }
        if !matches!(
            cfg.timestep_spacing.as_str(),
            "leading" | "trailing" | "linspace"
        ) {
            bad(
                "timestep_spacing",
                &format!("{:?} is not supported", cfg.timestep_spacing),
            )?
        }
        if !(1..=100_000).contains(&cfg.num_train_timesteps) {
            bad(
                "num_train_timesteps",
                &format!("{} is out of range (1 to 100000)", cfg.num_train_timesteps),
            )?
        }
        let betas_ok = cfg.beta_start.is_finite()
            && cfg.beta_end.is_finite()
            && 0.0 < cfg.beta_start
            && cfg.beta_start <= cfg.beta_end
            && cfg.beta_end < 1.0;
        if !betas_ok {
            bad(
                "beta_start/beta_end",
                &format!(
                    "{} / {} must satisfy 0 < start ≤ end < 1",
                    cfg.beta_start, cfg.beta_end
                ),
            )?
        }
        if let Some(k) = cfg.original_inference_steps {
            if !(1..=cfg.num_train_timesteps).contains(&k) {
                bad(
                    "original_inference_steps",
                    &format!("{k} must be between 1 and num_train_timesteps"),
                )?
            }
        }
        if cfg.steps_offset >= cfg.num_train_timesteps {
            bad("steps_offset", "must be below num_train_timesteps")?
        }
        Ok(cfg)
    }
}

/// model_index.json: which pipeline class and which component classes a folder holds.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    pub scheduler: Option<(Option<String>, Option<String>)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_block_expands_and_checks_length() {
        assert_eq!(PerBlock::One(8).expand(3, "x").unwrap(), vec![8, 8, 8]);
        assert_eq!(
            PerBlock::Many(vec![5, 10]).expand(2, "x").unwrap(),
            vec![5, 10]
        );
        let err = PerBlock::Many(vec![5]).expand(2, "heads").unwrap_err();
        assert!(err.to_string().contains("heads"));
    }

    #[test]
    fn scheduler_defaults_are_sd15() {
        let c = SchedulerConfig::default();
        assert_eq!(c.num_train_timesteps, 1000);
        assert_eq!(c.beta_schedule, "scaled_linear");
        assert_eq!(c.prediction_type, "epsilon");
    }
}
