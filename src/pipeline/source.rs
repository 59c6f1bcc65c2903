//! Where a model's files come from: a local diffusers-layout folder, a Hugging Face hub id
//! (through hf-hub: the local cache first, then a download), or a short name defined in
//! `pipelines/*.toml` (compiled into the binary) that names one of those plus its defaults.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::model::folder::{ModelFolder, CONFIG_FILES, TOKENIZER_FILES, WEIGHT_FILES};
use crate::sample::sampler::SamplerKind;

/// A named pipeline definition (`pipelines/<name>.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineDef {
    pub name: String,
    pub description: String,
    /// A hub repository id, e.g. `SimianLuo/LCM_Dreamshaper_v7`.
    pub repo: Option<String>,
    pub revision: Option<String>,
    /// A folder relative to the repository root (for models shipped in `weights/`).
    pub path: Option<String>,
    #[serde(default)]
    pub defaults: Defaults,
    /// Prompts the model can follow (the server offers them as examples).
    #[serde(default)]
    pub examples: Vec<String>,
}

/// Generation defaults a pipeline definition (or a folder's model_index.json) suggests.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub sampler: Option<SamplerKind>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub tcd_gamma: Option<f64>,
    /// Motion models: the length of a motion, in seconds.
    pub seconds: Option<f64>,
}

impl Defaults {
    /// `self`, with gaps filled from `other`.
    pub fn or(&self, other: &Defaults) -> Defaults {
        Defaults {
            sampler: self.sampler.or(other.sampler),
            steps: self.steps.or(other.steps),
            guidance: self.guidance.or(other.guidance),
            width: self.width.or(other.width),
            height: self.height.or(other.height),
            tcd_gamma: self.tcd_gamma.or(other.tcd_gamma),
            seconds: self.seconds.or(other.seconds),
        }
    }
}

const BUILTIN: &[(&str, &str)] = &[
    ("sd15", include_str!("../../pipelines/sd15.toml")),
    ("lcm-sd15", include_str!("../../pipelines/lcm-sd15.toml")),
    (
        "tiny-teacher",
        include_str!("../../pipelines/tiny-teacher.toml"),
    ),
    ("tiny", include_str!("../../pipelines/tiny.toml")),
    (
        "tiny-motion-teacher",
        include_str!("../../pipelines/tiny-motion-teacher.toml"),
    ),
    (
        "tiny-motion",
        include_str!("../../pipelines/tiny-motion.toml"),
    ),
    (
        "tiny-motion-flow",
        include_str!("../../pipelines/tiny-motion-flow.toml"),
    ),
];

/// Every pipeline definition compiled into the binary.
pub fn builtin_pipelines() -> Result<Vec<PipelineDef>> {
    BUILTIN
        .iter()
        .map(|(file, text)| {
            toml::from_str::<PipelineDef>(text)
                .with_context(|| format!("invalid pipeline definition pipelines/{file}.toml"))
        })
        .collect()
}

/// The model used when no `--model` is given (generate, eval, serve): the shipped LCM.
pub const DEFAULT_MODEL: &str = "tiny";

pub fn find_pipeline(name: &str) -> Result<Option<PipelineDef>> {
    Ok(builtin_pipelines()?.into_iter().find(|p| p.name == name))
}

/// A model resolved to a folder on disk, read.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// What the user asked for (name, folder or hub id), for messages.
    pub label: String,
    pub folder: ModelFolder,
    /// What its pipeline definition suggests (none for a folder or hub id).
    pub defaults: Defaults,
    /// The definition's example prompts (none for a folder or hub id).
    pub examples: Vec<String>,
}

/// Resolve `--model`: an existing folder, a single-file checkpoint (converted once into the
/// cache), a built-in pipeline name, or a hub id (`org/name`).
pub fn resolve(model: &str) -> Result<ResolvedModel> {
    let path = Path::new(model);
    if super::single_file::is_single_file(model) {
        return Ok(ResolvedModel {
            label: model.to_string(),
            folder: ModelFolder::open(&super::single_file::cached_folder(
                path,
                Default::default(),
            )?)?,
            defaults: Defaults::default(),
            examples: Vec::new(),
        });
    }
    if path.is_dir() {
        return Ok(ResolvedModel {
            label: model.to_string(),
            folder: ModelFolder::open(path)?,
            defaults: Defaults::default(),
            examples: Vec::new(),
        });
    }
    if let Some(def) = find_pipeline(model)? {
        return resolve_def(&def);
    }
    if looks_like_hub_id(model) {
        return Ok(ResolvedModel {
            label: model.to_string(),
            folder: hub_snapshot(model, None)?,
            defaults: Defaults::default(),
            examples: Vec::new(),
        });
    }
    let names: Vec<String> = builtin_pipelines()?.into_iter().map(|p| p.name).collect();
    bail!(
        "--model {model:?} is neither a folder, a pipeline name ({}) nor a hub id (org/name)",
        names.join(", ")
    )
}

fn resolve_def(def: &PipelineDef) -> Result<ResolvedModel> {
    let folder = match (&def.repo, &def.path) {
        (Some(repo), None) => hub_snapshot(repo, def.revision.as_deref()),
        (None, Some(p)) => {
            let dir = repo_root().join(p);
            if !dir.is_dir() {
                bail!(
                    "pipeline {:?}: folder {} does not exist",
                    def.name,
                    dir.display()
                )
            }
            ModelFolder::open(&dir)
        }
        _ => bail!(
            "pipeline {:?} must set exactly one of repo or path",
            def.name
        ),
    };
    Ok(ResolvedModel {
        label: def.name.clone(),
        folder: folder.with_context(|| format!("pipeline {:?}", def.name))?,
        defaults: def.defaults.clone(),
        examples: def.examples.clone(),
    })
}

/// The local folder `model` names, without reading it: a folder path, a single-file checkpoint's
/// converted folder, or a pipeline definition with a `path` (`None` for hub ids and hub-backed
/// pipelines).
pub fn local_dir(model: &str) -> Result<Option<PathBuf>> {
    let path = Path::new(model);
    if super::single_file::is_single_file(model) {
        return Ok(Some(super::single_file::cached_folder(
            path,
            Default::default(),
        )?));
    }
    if path.is_dir() {
        return Ok(Some(path.to_path_buf()));
    }
    Ok(find_pipeline(model)?
        .and_then(|def| def.path)
        .map(|p| repo_root().join(p)))
}

/// The source tree's root (where `weights/` lives), taken at build time.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    // `../x` and `./x` are paths (that do not exist), never an organisation named `..`.
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The cache folder hf-hub uses (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
pub fn hub_cache_dir() -> PathBuf {
    hf_hub::Cache::from_env().path().clone()
}

/// Every file of a text-to-image model in the hub repo `id`, from the local hf-hub cache if all are
/// there, else downloaded (unless `HF_HUB_OFFLINE` is set). Returns the snapshot folder, read.
pub fn hub_snapshot(id: &str, revision: Option<&str>) -> Result<ModelFolder> {
    let cache = hf_hub::Cache::from_env();
    let revision = revision.unwrap_or("main").to_string();
    let repo = hf_hub::Repo::with_revision(id.to_string(), hf_hub::RepoType::Model, revision);
    if let Some(folder) = snapshot_from_cache(&cache.repo(repo.clone())) {
        return Ok(folder);
    }
    let offline = crate::model::folder::hub_offline();
    let how = format!(
        "download it where there is network (`huggingface-cli download {id}`) and copy it into {}, \
         or pass --model DIR with a diffusers-layout folder",
        cache.path().display()
    );
    if offline {
        bail!("{id} is not in the hub cache and HF_HUB_OFFLINE is set: {how}")
    }
    download(&cache, repo)
        .map_err(|e| anyhow!("cannot fetch {id} from the Hugging Face hub ({e}): {how}"))
}

fn snapshot_from_cache(cache: &hf_hub::CacheRepo) -> Option<ModelFolder> {
    let index = cache.get("model_index.json")?;
    ModelFolder::open(index.parent()?).ok()
}

fn download(cache: &hf_hub::Cache, repo: hf_hub::Repo) -> Result<ModelFolder> {
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(true)
        .build()?;
    let api = api.repo(repo);
    let index = api.get("model_index.json")?;
    for f in CONFIG_FILES.iter().skip(1) {
        api.get(f)?;
    }
    for (component, names) in WEIGHT_FILES {
        let ok = names
            .iter()
            .any(|n| api.get(&format!("{component}/{n}")).is_ok());
        if !ok {
            bail!("no safetensors weights for {component}")
        }
    }
    // Repos ship either tokenizer.json or vocab.json + merges.txt: take what exists and let
    // ModelFolder::open say what is missing.
    for f in TOKENIZER_FILES {
        let _ = api.get(f);
    }
    ModelFolder::open(index.parent().context("snapshot folder")?)
}

/// Copy a diffusers-layout folder, converting every floating-point tensor of its `.safetensors`
/// files to `dtype` (other files are copied as they are). Writes are atomic per file. A pipeline
/// folder (with model_index.json) contributes only that file and the components it names, so a
/// training run's checkpoints, cache and samples beside them stay behind.
pub fn convert_folder(src: &Path, dst: &Path, dtype: candle_core::DType) -> Result<()> {
    if !src.is_dir() {
        bail!("--input {} is not a folder", src.display())
    }
    std::fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    let index = src.join("model_index.json");
    let keep: Option<Vec<String>> = if index.is_file() {
        let v: serde_json::Value = crate::model::config::read_json(&index)?;
        let mut names: Vec<String> = v
            .as_object()
            .map(|o| o.keys().filter(|k| !k.starts_with('_')).cloned().collect())
            .unwrap_or_default();
        names.push("model_index.json".into());
        // A motion model's index names its sentence encoder, not its components.
        if super::text2motion::is_motion_folder(src) {
            names.extend(super::text2motion::MOTION_COMPONENTS.map(String::from));
        }
        Some(names)
    } else {
        None
    };
    for entry in std::fs::read_dir(src).with_context(|| format!("cannot read {}", src.display()))? {
        let path = entry?.path();
        let name = path.file_name().context("file name")?.to_string_lossy();
        if keep.as_ref().is_some_and(|k| !k.iter().any(|n| *n == name)) {
            continue;
        }
        let target = dst.join(path.file_name().context("file name")?);
        if path.is_dir() {
            convert_folder(&path, &target, dtype)?;
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let converted = tensors
                .into_iter()
                .map(|(k, t)| {
                    let t = if t.dtype().is_float() {
                        t.to_dtype(dtype)?
                    } else {
                        t
                    };
                    Ok((k, t))
                })
                .collect::<Result<std::collections::HashMap<_, _>>>()?;
            crate::files::check_output(&target)?;
            let tmp = target.with_extension("tmp");
            candle_core::safetensors::save(&converted, &tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, &target)?;
        } else {
            let bytes = std::fs::read(&path)?;
            crate::files::write_atomic(&target, &bytes)?;
        }
    }
    Ok(())
}

/// Write a diffusers `model_index.json` for a text-to-image pipeline of the usual five components.
pub fn write_model_index(out: &Path, pipeline_class: &str, scheduler_class: &str) -> Result<()> {
    let index = serde_json::json!({
        "_class_name": pipeline_class,
        "feature_extractor": [null, null], "image_encoder": [null, null], "safety_checker": [null, null],
        "requires_safety_checker": false,
        "scheduler": ["diffusers", scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    crate::files::write_atomic(
        &out.join("model_index.json"),
        &serde_json::to_vec_pretty(&index)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_definitions_parse_and_name_a_source() {
        let defs = builtin_pipelines().unwrap();
        assert!(defs.len() >= 2);
        for d in defs {
            assert!(d.repo.is_some() ^ d.path.is_some(), "{}", d.name);
            // A shipped model's folder is in the repository, complete.
            if let Some(p) = &d.path {
                let dir = repo_root().join(p);
                assert_eq!(local_dir(&d.name).unwrap().as_ref(), Some(&dir));
                if crate::pipeline::text2motion::is_motion_folder(&dir) {
                    crate::pipeline::text2motion::MotionFolder::open(&dir)
                        .unwrap_or_else(|e| panic!("{}: {e:#}", d.name));
                    continue;
                }
                ModelFolder::open(&dir).unwrap_or_else(|e| panic!("{}: {e:#}", d.name));
                assert_eq!(resolve(&d.name).unwrap().folder.root, dir);
            }
        }
    }

    #[test]
    fn hub_ids_are_recognised() {
        assert!(looks_like_hub_id("SimianLuo/LCM_Dreamshaper_v7"));
        assert!(!looks_like_hub_id("just-a-name"));
        assert!(!looks_like_hub_id("a/b/c"));
    }
}
