//! A diffusers-layout model folder, read once into a typed handle: each component's folder, parsed
//! config (and the JSON as written, for exports that change one field) and weight files. Every stage
//! — loading a pipeline, encoding a dataset, distilling, exporting — takes the handle instead of
//! joining paths and re-reading files itself.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::{
    read_json, ClipTextConfig, ModelIndex, SchedulerConfig, UNetConfig, VaeConfig,
};
use super::weights::{load_weights, tensors};

/// The config files a diffusers text-to-image folder needs, relative to its root.
pub const CONFIG_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
];

const DIFFUSERS_WEIGHTS: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
];
const TRANSFORMERS_WEIGHTS: &[&str] = &["model.safetensors", "model.fp16.safetensors"];

/// Each weighted component and its weight file names, by preference (the first present is used).
pub const WEIGHT_FILES: &[(&str, &[&str])] = &[
    ("unet", DIFFUSERS_WEIGHTS),
    ("vae", DIFFUSERS_WEIGHTS),
    ("text_encoder", TRANSFORMERS_WEIGHTS),
];

/// The tokenizer files a repository may ship (tokenizer.json, or vocab.json + merges.txt).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer/tokenizer.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
];

/// A component's `config.json`, parsed and checked.
pub trait ComponentConfig: Sized {
    fn load(path: &Path) -> Result<Self>;
}

macro_rules! component_config {
    ($($t:ty),*) => {$(
        impl ComponentConfig for $t {
            fn load(path: &Path) -> Result<Self> {
                <$t>::load(path)
            }
        }
    )*};
}
component_config!(UNetConfig, VaeConfig, ClipTextConfig);

/// One component folder (`unet/`, `vae/`, `text_encoder/`, or a trained component on its own).
#[derive(Debug, Clone)]
pub struct Component<C> {
    pub dir: PathBuf,
    pub config: C,
    /// `config.json` as written, fields this crate does not model included.
    pub config_json: serde_json::Value,
    /// Its safetensors file(s): one file or the shards of an index.
    pub weights: Vec<PathBuf>,
}

impl<C: ComponentConfig> Component<C> {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        Ok(Self {
            dir: dir.to_path_buf(),
            config: C::load(&path)?,
            config_json: read_json(&path)?,
            weights: weight_files(dir)?,
        })
    }
}

impl<C> Component<C> {
    /// The weights for inference, converted to `dtype` (memory-mapped).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        load_weights(&self.weights, dtype, device)
    }

    /// Every tensor, as stored (for training and merging).
    pub fn tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        tensors(&self.weights, device)
    }

    /// What identifies these weights in a cache key: each file's path, size and modification time.
    pub fn fingerprint(&self, h: &mut impl Hasher) {
        for f in &self.weights {
            file_fingerprint(f).hash(h);
        }
    }
}

/// A complete text-to-image folder.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    pub root: PathBuf,
    /// model_index.json: the pipeline class (what kind of model this is).
    pub index: ModelIndex,
    pub scheduler: SchedulerConfig,
    pub scheduler_json: serde_json::Value,
    pub unet: Component<UNetConfig>,
    pub vae: Component<VaeConfig>,
    pub text_encoder: Component<ClipTextConfig>,
    pub tokenizer: PathBuf,
}

impl ModelFolder {
    /// Read a folder; the error names the first file it lacks or cannot parse.
    pub fn open(root: &Path) -> Result<Self> {
        for f in CONFIG_FILES {
            let p = root.join(f);
            if !p.is_file() {
                bail!("{} is missing", p.display())
            }
        }
        let tokenizer = root.join("tokenizer");
        let has_json = tokenizer.join("tokenizer.json").is_file();
        let has_bpe =
            tokenizer.join("vocab.json").is_file() && tokenizer.join("merges.txt").is_file();
        if !has_json && !has_bpe {
            bail!(
                "{} has neither tokenizer.json nor vocab.json + merges.txt",
                tokenizer.display()
            )
        }
        let scheduler_file = root.join("scheduler/scheduler_config.json");
        Ok(Self {
            root: root.to_path_buf(),
            index: read_json(&root.join("model_index.json"))?,
            scheduler: SchedulerConfig::load(&scheduler_file)?,
            scheduler_json: read_json(&scheduler_file)?,
            unet: Component::open(&root.join("unet"))?,
            vae: Component::open(&root.join("vae"))?,
            text_encoder: Component::open(&root.join("text_encoder"))?,
            tokenizer,
        })
    }
}

/// The safetensors file(s) of one component folder: a single file (f32 or f16 name) or a sharded
/// set listed in `*.safetensors.index.json`.
pub fn weight_files(component_dir: &Path) -> Result<Vec<PathBuf>> {
    let component = component_dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let names = WEIGHT_FILES
        .iter()
        .find(|(c, _)| *c == component)
        .map(|(_, n)| *n)
        .unwrap_or(&["diffusion_pytorch_model.safetensors", "model.safetensors"]);
    for n in names {
        let p = component_dir.join(n);
        if p.is_file() {
            return Ok(vec![p]);
        }
        let index = component_dir.join(format!("{n}.index.json"));
        if index.is_file() {
            return sharded(&index);
        }
    }
    bail!(
        "no weights in {} (looked for {})",
        component_dir.display(),
        names.join(", ")
    )
}

fn sharded(index: &Path) -> Result<Vec<PathBuf>> {
    let v: serde_json::Value = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut files = Vec::new();
    for f in map.values().filter_map(|f| f.as_str()) {
        // A shard is a file beside its index: no folders, no `..`, no absolute path.
        let plain = matches!(
            Path::new(f).components().collect::<Vec<_>>().as_slice(),
            [std::path::Component::Normal(_)]
        );
        if !plain {
            bail!(
                "{}: shard {f:?} is not a file name in the model folder",
                index.display()
            )
        }
        files.push(index.with_file_name(f));
    }
    files.sort();
    files.dedup();
    for f in &files {
        if !f.is_file() {
            bail!("{} lists {} which is missing", index.display(), f.display())
        }
    }
    Ok(files)
}

/// Every tensor of a component folder's weight files (e.g. a trained `--init` folder).
pub fn load_component(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    tensors(&weight_files(dir)?, device)
}

/// A file's path, size and modification time: changes when the file is rewritten.
pub fn file_fingerprint(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => format!("{}:{}:{:?}", path.display(), m.len(), m.modified().ok()),
        Err(_) => format!("{}:missing", path.display()),
    }
}

/// Whether hf-hub may not download (`HF_HUB_OFFLINE` set to anything but 0).
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v != "0" && !v.is_empty())
}
