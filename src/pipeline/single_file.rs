//! One-file Stable Diffusion 1.x checkpoints (LDM key layout) to diffusers folders and back.
//!
//! `--model FILE.safetensors` converts the file once into a folder under the cache
//! (`$LCM_CACHE`, else `$XDG_CACHE_HOME/lcm`, else `~/.cache/lcm`) and opens that, so generation,
//! distillation, serving and evaluation take a checkpoint exactly as they take a folder. diffusers'
//! `from_single_file` converts in memory on every load instead; the cache trades disk for a
//! faster second load and one code path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::model::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::model::single_file::{
    identity_pairs, rename, text_config, unet_config, unet_layout_of, vae_config, Direction, Pairs,
    Shapes, UNetLayout, VaeLayout, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX,
};

/// Where a conversion may take what the tensors cannot tell.
#[derive(Debug, Default, Clone, Copy)]
pub struct Options<'a> {
    /// A VAE file to use instead of the checkpoint's own (LDM names with or without
    /// `first_stage_model.`, or diffusers names).
    pub vae: Option<&'a Path>,
    /// A diffusers folder whose `unet/`, `vae/`, `text_encoder/` configs and `tokenizer/` replace
    /// what is inferred (each where present).
    pub config: Option<&'a Path>,
}

/// What a conversion found.
#[derive(Debug)]
pub struct Summary {
    pub tensors: usize,
    /// Tensors outside the three components (EMA copies, schedule buffers), left out.
    pub ignored: usize,
    pub lcm: bool,
}

/// Refuse pickled checkpoints before reading them: unpickling runs arbitrary code.
fn refuse_pickle(file: &Path) -> Result<()> {
    let ext = file
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut head = [0u8; 4];
    let magic = std::fs::File::open(file)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        .then_some(head);
    let zip_or_pickle = magic.is_some_and(|h| h[..2] == *b"PK" || h[0] == 0x80);
    if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") || zip_or_pickle {
        bail!(
            "{}: a pickled PyTorch checkpoint; loading one runs arbitrary code, so lcm never does. \
             Convert it to .safetensors where you trust it (e.g. load it with torch and save it with \
             safetensors.torch.save_file)",
            file.display()
        )
    }
    Ok(())
}

/// Every tensor of a safetensors file, by name (memory-mapped, then copied per tensor).
struct File {
    path: PathBuf,
    st: candle_core::safetensors::MmapedSafetensors,
}

impl File {
    fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            bail!("{}: no such file", path.display())
        }
        refuse_pickle(path)?;
        // SAFETY: the file is only read; a concurrent writer could change what we read, as with
        // every memory-mapped load of model weights.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|e| {
                anyhow::anyhow!(
                    "{}: not a readable safetensors file (truncated or damaged?): {e}",
                    path.display()
                )
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            st,
        })
    }

    fn shapes(&self) -> HashMap<String, Vec<usize>> {
        self.st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec()))
            .collect()
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        self.st
            .load(name, &Device::Cpu)
            .with_context(|| format!("{}: tensor {name}", self.path.display()))
    }
}

/// The names of one component (prefix stripped) and their shapes.
fn component(shapes: &HashMap<String, Vec<usize>>, prefix: &str) -> Shapes {
    shapes
        .iter()
        .filter_map(|(n, s)| Some((n.strip_prefix(prefix)?.to_string(), s.clone())))
        .collect()
}

/// Tensors of one component renamed into the diffusers layout (VAE attention weights reshaped
/// from 1×1 convolutions to linear layers).
fn to_diffusers(
    file: &File,
    prefix: &str,
    names: &Shapes,
    pairs: &Pairs,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, shape) in names {
        let (to, reshape) = rename(pairs, name, Direction::ToDiffusers).with_context(|| {
            format!(
                "{}: tensor {prefix}{name} belongs to no block of the layout its other tensors describe",
                file.path.display()
            )
        })?;
        let mut t = file.load(&format!("{prefix}{name}"))?;
        if reshape {
            if shape.len() != 4 || shape[2] != 1 || shape[3] != 1 {
                bail!(
                    "{}: tensor {prefix}{name} has shape {shape:?}, expected [C, C, 1, 1]",
                    file.path.display()
                )
            }
            t = t.reshape((shape[0], shape[1]))?;
        }
        out.insert(to, t);
    }
    Ok(out)
}

/// A config from `--config DIR/<part>/config.json` when present, else the inferred one.
fn config_or(
    file: &Path,
    config: Option<&Path>,
    part: &str,
    inferred: Result<serde_json::Value>,
) -> Result<serde_json::Value> {
    if let Some(p) = config
        .map(|d| d.join(part).join("config.json"))
        .filter(|p| p.is_file())
    {
        return crate::model::config::read_json(&p);
    }
    inferred.map_err(|e| {
        anyhow::anyhow!(
            "{}: the {part} config cannot be read off the tensors ({e}); pass --config DIR with {part}/config.json",
            file.display()
        )
    })
}

/// Build a component from its tensors, so that shapes that contradict each other or the config
/// are reported now, with the tensor's name in the checkpoint.
fn check<T>(
    file: &Path,
    what: &str,
    prefix: &str,
    tensors: &HashMap<String, Tensor>,
    pairs: &Pairs,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<()> {
    let dtype = tensors.values().next().map_or(DType::F32, Tensor::dtype);
    if let Err(e) = build(VarBuilder::from_tensors(
        tensors.clone(),
        dtype,
        &Device::Cpu,
    )) {
        let msg = e.to_string();
        // Name the tensor as the checkpoint has it.
        let ldm = tensors
            .keys()
            .filter(|n| msg.contains(n.as_str()))
            .max_by_key(|n| n.len())
            .and_then(|n| rename(pairs, n, Direction::ToLdm))
            .map(|(n, _)| format!(" (tensor {prefix}{n})"))
            .unwrap_or_default();
        bail!(
            "{}: the {what} does not fit together{ldm}: {msg}",
            file.display()
        )
    }
    Ok(())
}

/// Convert `file` into a diffusers folder at `out`.
pub fn to_folder(file: &Path, out: &Path, opts: Options) -> Result<Summary> {
    let f = File::open(file)?;
    let shapes = f.shapes();
    let has = |p: &str| shapes.keys().any(|n| n.starts_with(p));
    if has("conditioner.embedders.") {
        bail!("{}: an SDXL checkpoint (conditioner.embedders.*); lcm reads Stable Diffusion 1.x files", file.display())
    }
    if has("cond_stage_model.model.") {
        bail!("{}: a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.*); lcm reads 1.x files", file.display())
    }
    let unet = component(&shapes, UNET_PREFIX);
    let text = component(&shapes, TEXT_PREFIX);
    if unet.is_empty() {
        bail!(
            "{}: no {UNET_PREFIX}* tensors: not a Stable Diffusion checkpoint in the LDM layout",
            file.display()
        )
    }
    if text.is_empty() {
        bail!(
            "{}: no {TEXT_PREFIX}* tensors: the text encoder is missing",
            file.display()
        )
    }
    // The VAE: the checkpoint's own, or a separate file.
    let vae_file = opts.vae.map(File::open).transpose()?;
    let (vf, vae_prefix, vae_names) = match &vae_file {
        Some(v) => {
            let s = v.shapes();
            let prefix = if s.keys().any(|n| n.starts_with(VAE_PREFIX)) {
                VAE_PREFIX
            } else {
                ""
            };
            (v, prefix, component(&s, prefix))
        }
        None => (&f, VAE_PREFIX, component(&shapes, VAE_PREFIX)),
    };
    if vae_names.is_empty() {
        bail!(
            "{}: no {VAE_PREFIX}* tensors: the VAE is missing (pass --vae FILE)",
            file.display()
        )
    }
    let diffusers_vae = vae_names
        .keys()
        .any(|n| n.starts_with("encoder.down_blocks."));

    let u_layout = UNetLayout::from_ldm(&unet.keys().map(String::as_str).collect::<Vec<_>>())
        .with_context(|| format!("{}: the U-Net", file.display()))?;
    let u_pairs = u_layout.pairs();
    let unet_json = config_or(file, opts.config, "unet", unet_config(&unet, &u_layout))?;
    let unet_t = to_diffusers(&f, UNET_PREFIX, &unet, &u_pairs)?;

    let (vae_json, vae_t, v_pairs) = if diffusers_vae {
        let identity = identity_pairs();
        let t = to_diffusers(vf, vae_prefix, &vae_names, &identity)?;
        let cfg = config_or(
            &vf.path,
            opts.config,
            "vae",
            Err(anyhow::anyhow!(
                "a VAE in diffusers names carries no layout to read"
            )),
        )?;
        (cfg, t, identity)
    } else {
        let v_layout =
            VaeLayout::from_ldm(&vae_names.keys().map(String::as_str).collect::<Vec<_>>())
                .with_context(|| format!("{}: the VAE", vf.path.display()))?;
        let pairs = v_layout.pairs();
        let cfg = config_or(
            &vf.path,
            opts.config,
            "vae",
            vae_config(&vae_names, &v_layout),
        )?;
        (
            cfg,
            to_diffusers(vf, vae_prefix, &vae_names, &pairs)?,
            pairs,
        )
    };
    let t_pairs = identity_pairs();
    let text_json = config_or(file, opts.config, "text_encoder", text_config(&text))?;
    let text_t = to_diffusers(&f, TEXT_PREFIX, &text, &t_pairs)?;

    let unet_cfg: UNetConfig =
        serde_json::from_value(unet_json.clone()).context("the U-Net config")?;
    let vae_cfg: VaeConfig = serde_json::from_value(vae_json.clone()).context("the VAE config")?;
    let text_cfg: ClipTextConfig =
        serde_json::from_value(text_json.clone()).context("the text encoder config")?;
    check(file, "U-Net", UNET_PREFIX, &unet_t, &u_pairs, |vb| {
        crate::model::unet::UNet2DConditionModel::new(&unet_cfg, vb)
    })?;
    check(&vf.path, "VAE", vae_prefix, &vae_t, &v_pairs, |vb| {
        crate::model::vae::AutoencoderKL::new(&vae_cfg, vb)
    })?;
    check(file, "text encoder", TEXT_PREFIX, &text_t, &t_pairs, |vb| {
        crate::model::clip::ClipTextModel::new(&text_cfg, vb)
    })?;

    // The folder.
    let lcm = unet_cfg.time_cond_proj_dim.is_some();
    let write = |part: &str,
                 weights: &str,
                 cfg: &serde_json::Value,
                 t: &HashMap<String, Tensor>|
     -> Result<()> {
        let dir = out.join(part);
        crate::files::write_atomic(&dir.join("config.json"), &serde_json::to_vec_pretty(cfg)?)?;
        crate::files::save_safetensors(t, &dir.join(weights))
    };
    write(
        "unet",
        "diffusion_pytorch_model.safetensors",
        &unet_json,
        &unet_t,
    )?;
    write(
        "vae",
        "diffusion_pytorch_model.safetensors",
        &vae_json,
        &vae_t,
    )?;
    write("text_encoder", "model.safetensors", &text_json, &text_t)?;
    let tokenizer = opts
        .config
        .map(|d| d.join("tokenizer"))
        .filter(|d| d.is_dir())
        .unwrap_or_else(|| super::source::repo_root().join("weights/tiny-teacher/tokenizer"));
    crate::files::copy_files(&tokenizer, &out.join("tokenizer"))?;
    let scheduler = serde_json::json!({
        "_class_name": if lcm { "LCMScheduler" } else { "DDIMScheduler" },
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": false,
        "set_alpha_to_one": lcm, "steps_offset": 1, "timestep_spacing": "leading",
        "original_inference_steps": if lcm { Some(50) } else { None },
        "timestep_scaling": if lcm { Some(10.0) } else { None },
    });
    let scheduler = opts
        .config
        .map(|d| d.join("scheduler/scheduler_config.json"))
        .filter(|p| p.is_file())
        .map(|p| crate::model::config::read_json(&p))
        .transpose()?
        .unwrap_or(scheduler);
    crate::files::write_atomic(
        &out.join("scheduler/scheduler_config.json"),
        &serde_json::to_vec_pretty(&scheduler)?,
    )?;
    let (pipe, sched) = if lcm {
        ("LatentConsistencyModelPipeline", "LCMScheduler")
    } else {
        ("StableDiffusionPipeline", "DDIMScheduler")
    };
    super::source::write_model_index(out, pipe, sched)?;
    let used = unet.len()
        + text.len()
        + if vae_file.is_some() {
            0
        } else {
            vae_names.len()
        };
    Ok(Summary {
        tensors: unet_t.len() + vae_t.len() + text_t.len(),
        ignored: shapes.len() - used,
        lcm,
    })
}

/// Write the diffusers folder `dir` as one LDM-layout file (each tensor in its stored dtype).
pub fn from_folder(dir: &Path, file: &Path) -> Result<usize> {
    let folder = crate::model::folder::ModelFolder::open(dir)?;
    let u_pairs = unet_layout_of(&folder.unet.config)
        .with_context(|| format!("{}", folder.unet.dir.join("config.json").display()))?
        .pairs();
    let v = &folder.vae.config;
    let v_pairs = VaeLayout {
        blocks: v.block_out_channels.len(),
        layers: v.layers_per_block,
    }
    .pairs();
    let mut all = HashMap::new();
    for (prefix, pairs, tensors) in [
        (UNET_PREFIX, u_pairs, folder.unet.tensors(&Device::Cpu)?),
        (VAE_PREFIX, v_pairs, folder.vae.tensors(&Device::Cpu)?),
        (
            TEXT_PREFIX,
            identity_pairs(),
            folder.text_encoder.tensors(&Device::Cpu)?,
        ),
    ] {
        for (name, t) in tensors {
            let (to, reshape) = rename(&pairs, &name, Direction::ToLdm).with_context(|| {
                format!(
                    "{}: tensor {name} has no place in the LDM layout",
                    dir.display()
                )
            })?;
            let t = if reshape {
                t.unsqueeze(2)?.unsqueeze(3)?
            } else {
                t
            };
            all.insert(format!("{prefix}{to}"), t);
        }
    }
    crate::files::save_safetensors(&all, file)?;
    Ok(all.len())
}

/// The cache root for converted checkpoints.
fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("LCM_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("lcm");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/lcm")
}

/// Whether `model` names a single checkpoint file rather than a folder or a name.
pub fn is_single_file(model: &str) -> bool {
    let p = Path::new(model);
    let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase());
    p.is_file()
        || matches!(
            ext.as_deref(),
            Some("safetensors" | "ckpt" | "pt" | "pth" | "bin")
        )
}

/// The folder a checkpoint file converts to, converted on first use (keyed by the file's
/// absolute path, size and modification time, and the options).
pub fn cached_folder(file: &Path, opts: Options) -> Result<PathBuf> {
    let meta =
        std::fs::metadata(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let abs = std::fs::canonicalize(file)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&(abs, meta.len(), mtime, opts.vae, opts.config), &mut h);
    let stem = file
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy());
    let dir = cache_root()
        .join("single-file")
        .join(format!("{stem}-{:016x}", std::hash::Hasher::finish(&h)));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let s = to_folder(file, &tmp, opts)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("cannot move the conversion into {}", dir.display()))?;
    eprintln!(
        "converted {} ({} tensors{}) into {}",
        file.display(),
        s.tensors,
        if s.ignored > 0 {
            format!(", {} others left out", s.ignored)
        } else {
            String::new()
        },
        dir.display()
    );
    Ok(dir)
}

/// What a model flag names, as the rest of the program takes it: a single-file checkpoint is
/// replaced by its converted folder (converted on first use with `vae` and `config`); anything
/// else is returned as it is, and then `vae`/`config` are refused. `flags` prefixes the flag
/// names in messages (`""` for --vae/--config, `"teacher-"` for --teacher-vae/--teacher-config).
pub fn model_spec(
    model: &str,
    vae: Option<&Path>,
    config: Option<&Path>,
    flags: &str,
) -> Result<String> {
    if is_single_file(model) {
        let dir = cached_folder(Path::new(model), Options { vae, config })?;
        return Ok(dir.to_string_lossy().into_owned());
    }
    if vae.is_some() || config.is_some() {
        bail!(
            "--{flags}vae and --{flags}config are for single-file checkpoints ({model} is not one)"
        )
    }
    Ok(model.to_string())
}
