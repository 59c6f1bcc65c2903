//! The one dataset encoder every latent-space trainer uses (teacher, text encoder, distillation):
//! each image's VAE posterior (mean and std) and each caption's token ids — plus, when a frozen
//! text encoder is given, each caption's prompt embedding — computed once and cached in the run
//! folder under one key ([`cache_key`]: the data, the resolution and the weights that made it).
//!
//! The cache holds the posterior, not a sample of it: a stage draws its latents from it
//! ([`EncodedDataset::latents`]), so the seed is not part of the key.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::model::clip::ClipTextModel;
use crate::model::config::{ClipTextConfig, VaeConfig};
use crate::model::folder::{file_fingerprint, Component};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::vae::AutoencoderKL;
use crate::sample::noise::NoiseSource;

/// The dataset in a latent model's terms, one row per example.
pub struct EncodedDataset {
    /// VAE posterior mean `[n, c, h, w]` (VAE space, not yet scaled).
    pub mean: Tensor,
    /// VAE posterior std, same shape.
    pub std: Tensor,
    /// Token ids `[n, max_len]`.
    pub ids: Tensor,
    pub captions: Vec<String>,
    /// Prompt embeddings `[n, tokens, d]` and the empty prompt's `[1, tokens, d]`, when a text
    /// encoder was given.
    pub prompt_embeds: Option<(Tensor, Tensor)>,
}

/// A frozen text encoder whose prompt embeddings the dataset should carry.
pub struct TextEncoderRef<'a> {
    /// Its folder (the weight files are part of the cache key).
    pub component: &'a Component<ClipTextConfig>,
    pub model: &'a ClipTextModel,
    /// The precision it runs in (part of the key: the embeddings are stored in it).
    pub dtype: DType,
}

/// What to encode and with what.
pub struct EncodeSpec<'a> {
    pub data: &'a [PathBuf],
    pub resolution: usize,
    /// The VAE's folder (its weight files are part of the cache key) and the VAE.
    pub vae: (&'a Component<VaeConfig>, &'a AutoencoderKL),
    pub tokenizer_dir: &'a Path,
    pub tokenizer: &'a ClipTokenizer,
    pub text_encoder: Option<TextEncoderRef<'a>>,
    /// Where cache files live (normally `RUN/cache`).
    pub cache_dir: &'a Path,
}

fn folder_fingerprint(dir: &Path, h: &mut impl Hasher) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in files {
        file_fingerprint(&f).hash(h);
    }
    Ok(())
}

/// What the cached encodings depend on: the data, the resolution, the VAE's weights, the
/// tokenizer, and — for prompt embeddings — the text encoder's weights and precision.
pub fn cache_key(spec: &EncodeSpec, examples: &[crate::data::Example]) -> Result<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    spec.resolution.hash(&mut h);
    spec.vae.0.fingerprint(&mut h);
    folder_fingerprint(spec.tokenizer_dir, &mut h)?;
    if let Some(te) = &spec.text_encoder {
        format!("{:?}", te.dtype).hash(&mut h);
        te.component.fingerprint(&mut h);
    }
    for ex in examples {
        ex.fingerprint().hash(&mut h);
    }
    Ok(h.finish())
}

/// Encode `spec.data`, or read the cache when its key matches.
pub fn encode(spec: &EncodeSpec, device: &Device) -> Result<EncodedDataset> {
    let mut examples = Vec::new();
    for d in spec.data {
        examples.extend(crate::data::scan(d)?);
    }
    let key = cache_key(spec, &examples)?;
    let cache = spec
        .cache_dir
        .join(format!("encoded-{key:016x}.safetensors"));
    let captions_file = cache.with_extension("captions.json");
    if let Some(d) = read_cache(&cache, &captions_file, spec, device)? {
        eprintln!("using the encoded dataset in {}", cache.display());
        return Ok(d);
    }
    let (items, report) = crate::data::load_all(&examples, spec.resolution, &Device::Cpu);
    if !report.skipped.is_empty() {
        eprintln!(
            "skipped {} unreadable image(s) of {}",
            report.skipped.len(),
            examples.len()
        );
    }
    if items.is_empty() {
        bail!("--data: no readable images")
    }
    let n = items.len();
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("encoding {pos}/{len} {per_sec} ETA {eta}")
            .expect("valid template"),
    );
    let (mut means, mut stds, mut embeds) = (Vec::new(), Vec::new(), Vec::new());
    let mut ids = Vec::with_capacity(n * spec.tokenizer.max_len());
    let mut truncated = 0;
    for chunk in items.chunks(32) {
        let imgs: Vec<Tensor> = chunk.iter().map(|(img, _)| img.clone()).collect();
        let post = spec
            .vae
            .1
            .encode(&Tensor::stack(&imgs, 0)?.to_device(device)?)?;
        means.push(post.mean.contiguous()?);
        stds.push(post.logvar.affine(0.5, 0.0)?.exp()?.contiguous()?);
        for (_, caption) in chunk {
            let t = spec.tokenizer.encode(caption)?;
            truncated += usize::from(t.dropped > 0);
            if let Some(te) = &spec.text_encoder {
                let row = Tensor::new(t.ids.as_slice(), device)?.unsqueeze(0)?;
                embeds.push(te.model.forward(&row)?);
            }
            ids.extend(t.ids);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if truncated > 0 {
        eprintln!("warning: {truncated} captions were truncated to the text encoder's length");
    }
    let prompt_embeds = match &spec.text_encoder {
        Some(te) => {
            let empty = spec.tokenizer.encode("")?.ids;
            let empty = Tensor::new(empty.as_slice(), device)?.unsqueeze(0)?;
            Some((Tensor::cat(&embeds, 0)?, te.model.forward(&empty)?))
        }
        None => None,
    };
    let data = EncodedDataset {
        mean: Tensor::cat(&means, 0)?,
        std: Tensor::cat(&stds, 0)?,
        ids: Tensor::from_vec(ids, (n, spec.tokenizer.max_len()), device)?,
        captions: items.into_iter().map(|(_, c)| c).collect(),
        prompt_embeds,
    };
    let mut tensors = HashMap::from([
        ("mean".to_string(), data.mean.clone()),
        ("std".to_string(), data.std.clone()),
        ("ids".to_string(), data.ids.clone()),
    ]);
    if let Some((p, u)) = &data.prompt_embeds {
        tensors.insert("prompt_embeds".into(), p.clone());
        tensors.insert("uncond_embeds".into(), u.clone());
    }
    crate::files::save_safetensors(&tensors, &cache)?;
    crate::files::write_atomic(&captions_file, &serde_json::to_vec(&data.captions)?)?;
    eprintln!(
        "encoded {n} examples at {}² into {}",
        spec.resolution,
        cache.display()
    );
    Ok(data)
}

fn read_cache(
    cache: &Path,
    captions_file: &Path,
    spec: &EncodeSpec,
    device: &Device,
) -> Result<Option<EncodedDataset>> {
    if !cache.is_file() || !captions_file.is_file() {
        return Ok(None);
    }
    let t = candle_core::safetensors::load(cache, device)
        .with_context(|| format!("cannot read {}", cache.display()))?;
    let captions: Vec<String> = crate::model::config::read_json(captions_file)?;
    let (Some(mean), Some(std), Some(ids)) = (t.get("mean"), t.get("std"), t.get("ids")) else {
        return Ok(None);
    };
    let prompt_embeds = match (
        &spec.text_encoder,
        t.get("prompt_embeds"),
        t.get("uncond_embeds"),
    ) {
        (None, _, _) => None,
        (Some(_), Some(p), Some(u)) => Some((p.clone(), u.clone())),
        (Some(_), _, _) => return Ok(None),
    };
    Ok(Some(EncodedDataset {
        mean: mean.clone(),
        std: std.clone(),
        ids: ids.clone(),
        captions,
        prompt_embeds,
    }))
}

impl EncodedDataset {
    pub fn rows(&self) -> Result<usize> {
        Ok(self.mean.dim(0)?)
    }

    /// The shape of `b` rows' latents.
    pub fn batch_shape(&self, b: usize) -> candle_core::Shape {
        let mut dims = self.mean.dims().to_vec();
        dims[0] = b;
        dims.into()
    }

    /// VAE-space latents of the rows `rows`: the posterior means, or one sample each with the
    /// given standard-normal draw `eps` (of the rows' shape).
    pub fn posterior(&self, rows: &Tensor, eps: Option<&Tensor>) -> Result<Tensor> {
        let mean = self.mean.index_select(rows, 0)?;
        Ok(match eps {
            None => mean,
            Some(e) => (mean + (self.std.index_select(rows, 0)? * e)?)?,
        })
    }

    /// Every row's latent in U-Net space (× the VAE's scaling): the posterior means, or one
    /// sample each drawn from `noise` in row order.
    pub fn latents(
        &self,
        vae: &AutoencoderKL,
        posterior_mean: bool,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let z = if posterior_mean {
            self.mean.clone()
        } else {
            let eps = noise.sample(self.mean.shape(), self.mean.device())?;
            (&self.mean + (&self.std * eps)?)?
        };
        Ok(vae.scale(&z)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::folder::ModelFolder;
    use crate::pipeline::source::repo_root;
    use crate::sample::noise::SeededNoise;

    /// The cache is keyed by what made it — resolution, data, text encoder precision — and is
    /// reused when nothing changed; latents are drawn from it per seed (so a rerun with another
    /// seed does not silently reuse the first seed's latents) or are the posterior means.
    #[test]
    fn encodings_are_cached_by_their_inputs_and_latents_follow_the_seed() -> Result<()> {
        let fx = ModelFolder::open(&repo_root().join("tests/fixtures/tiny-sd"))?;
        let dev = Device::Cpu;
        let vae = AutoencoderKL::new(&fx.vae.config, fx.vae.var_builder(DType::F32, &dev)?)?;
        let te_cfg = &fx.text_encoder.config;
        let te = ClipTextModel::new(te_cfg, fx.text_encoder.var_builder(DType::F32, &dev)?)?;
        let tok = ClipTokenizer::from_dir(&fx.tokenizer, te_cfg.max_position_embeddings)?;
        let root = std::env::temp_dir().join(format!("lcm-encode-{}", std::process::id()));
        let data = root.join("data");
        crate::data::toy::write_shapes(&data, 3, 32, 1)?;
        let dirs = vec![data.clone()];
        let cache_dir = root.join("cache");
        let spec = |resolution: usize, dtype: Option<DType>| EncodeSpec {
            data: &dirs,
            resolution,
            vae: (&fx.vae, &vae),
            tokenizer_dir: &fx.tokenizer,
            tokenizer: &tok,
            text_encoder: dtype.map(|dtype| TextEncoderRef {
                component: &fx.text_encoder,
                model: &te,
                dtype,
            }),
            cache_dir: &cache_dir,
        };
        let examples = crate::data::scan(&data)?;
        let key = |s: &EncodeSpec| cache_key(s, &examples).unwrap();
        let base = key(&spec(32, None));
        assert_eq!(base, key(&spec(32, None)));
        assert_ne!(base, key(&spec(16, None)));
        assert_ne!(base, key(&spec(32, Some(DType::F32))));
        assert_ne!(
            key(&spec(32, Some(DType::F32))),
            key(&spec(32, Some(DType::F16)))
        );
        assert_ne!(base, cache_key(&spec(32, None), &examples[..2])?);

        let a = encode(&spec(32, Some(DType::F32)), &dev)?;
        assert_eq!(a.rows()?, 3);
        let (embeds, _) = a.prompt_embeds.as_ref().expect("prompt embeddings");
        assert_eq!(embeds.dim(0)?, 3);
        let b = encode(&spec(32, Some(DType::F32)), &dev)?;
        let diff = |x: &Tensor, y: &Tensor| -> Result<f32> {
            Ok((x - y)?.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        assert_eq!(diff(&a.mean, &b.mean)?, 0.0);
        assert_eq!(a.captions, b.captions);
        let cached = std::fs::read_dir(root.join("cache"))?.count();
        assert_eq!(cached, 2, "one tensor file and its captions");

        let sample = |seed| a.latents(&vae, false, &mut SeededNoise::new(seed));
        assert_eq!(diff(&sample(0)?, &sample(0)?)?, 0.0);
        assert!(diff(&sample(0)?, &sample(1)?)? > 0.0);
        let means = a.latents(&vae, true, &mut SeededNoise::new(0))?;
        assert_eq!(diff(&means, &vae.scale(&a.mean)?)?, 0.0);
        std::fs::remove_dir_all(&root).ok();
        Ok(())
    }
}
