//! Where a run's weights start: trained weights taken over by name (`--init`, optionally growing
//! into a larger config), a frozen trained text encoder, and the frozen VAE a latent stage reads.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::model::config::VaeConfig;
use crate::model::folder::load_component;
use crate::model::folder::Component;
use crate::model::vae::AutoencoderKL;

/// Replace every freshly initialised tensor by the trained one of the same name (`--init`), shapes
/// equal. Without `grow` the trained folder must hold every tensor; with it (`--init --grow`) the
/// ones it lacks keep their fresh values, the output projections among them zeroed so that each new
/// attention block (a residual branch) starts as the identity. Returns the number of new
/// parameters.
pub fn take_trained(
    init: &mut HashMap<String, Tensor>,
    trained: &HashMap<String, Tensor>,
    dir: &Path,
    grow: bool,
) -> Result<usize> {
    let mut fresh = 0;
    for (name, t) in init.iter_mut() {
        match trained.get(name) {
            Some(w) if w.dims() == t.dims() => *t = w.to_dtype(DType::F32)?,
            Some(w) => bail!(
                "--init {}: {name} has shape {:?}, the config wants {:?}",
                dir.display(),
                w.dims(),
                t.dims()
            ),
            None if !grow => bail!("--init {}: no tensor {name}", dir.display()),
            None => {
                fresh += t.elem_count();
                if name.contains(".proj_out.") {
                    *t = t.zeros_like()?;
                }
            }
        }
    }
    if grow && fresh == 0 {
        bail!(
            "--grow: the config adds nothing to --init {}; drop --grow",
            dir.display()
        )
    }
    Ok(fresh)
}

/// The trained VAE in `dir` (`--vae`), frozen, for a stage that trains on its latents; refuses a
/// `--resolution` it cannot encode.
pub fn frozen_vae(
    dir: &Path,
    resolution: usize,
    device: &Device,
) -> Result<(AutoencoderKL, Component<VaeConfig>)> {
    let what = || format!("--vae {}", dir.display());
    let folder = Component::<VaeConfig>::open(dir).with_context(what)?;
    let vae = AutoencoderKL::new(&folder.config, folder.var_builder(DType::F32, device)?)
        .with_context(what)?;
    check_resolution(resolution, folder.config.scale_factor())?;
    Ok((vae, folder))
}

/// The encoded dataset of a from-scratch latent stage (`--data` under the frozen VAE, captions by
/// the tokenizer of the model folder `config`), cached in the run folder.
pub fn encode_stage_data(
    train: &super::args::TrainArgs,
    resolution: usize,
    vae: (&Component<VaeConfig>, &AutoencoderKL),
    config: &Path,
    tokenizer: &crate::model::tokenizer::ClipTokenizer,
    device: &Device,
) -> Result<crate::data::encode::EncodedDataset> {
    let data = crate::data::encode::encode(
        &crate::data::encode::EncodeSpec {
            data: &train.data,
            resolution,
            vae,
            tokenizer_dir: &config.join("tokenizer"),
            tokenizer,
            text_encoder: None,
            cache_dir: &train.output.join("cache"),
        },
        device,
    )?;
    eprintln!(
        "{} training examples, latents {:?}",
        data.rows()?,
        data.mean.dims()
    );
    Ok(data)
}

/// `--resolution` must be a positive multiple of the VAE's downscaling factor `f`.
pub fn check_resolution(resolution: usize, f: usize) -> Result<()> {
    if resolution == 0 || !resolution.is_multiple_of(f) {
        bail!("--resolution {resolution} must be a positive multiple of {f}")
    }
    Ok(())
}

/// A trained component folder's weights under `prefix` (e.g. `text_encoder.`), checked against
/// the shapes `init` gives for the names under that prefix; `flag` names the source in errors.
pub fn component_weights(
    dir: &Path,
    prefix: &str,
    init: &HashMap<String, Tensor>,
    flag: &str,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let what = || format!("{flag} {}", dir.display());
    let weights = load_component(dir, device).with_context(what)?;
    let mut out = HashMap::new();
    for (name, want) in init.iter().filter(|(k, _)| k.starts_with(prefix)) {
        let key = &name[prefix.len()..];
        let w = weights
            .get(key)
            .with_context(|| format!("{}: no tensor {key}", what()))?;
        if w.dims() != want.dims() {
            bail!(
                "{}: {key} has shape {:?}, --config wants {:?}",
                what(),
                w.dims(),
                want.dims()
            )
        }
        out.insert(name.clone(), w.to_dtype(DType::F32)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarBuilder;

    /// `--grow` from the tiny teacher to the one with attention at full latent resolution: the
    /// grown model starts as the same function (new attention blocks are identities), has new
    /// parameters, and a shape clash is refused.
    #[test]
    fn a_grown_unet_starts_as_its_init() -> Result<()> {
        use crate::model::config::UNetConfig;
        let (small, big) = (
            crate::train::unet_config("tiny")?,
            crate::train::unet_config("tiny-xattn")?,
        );
        let dev = Device::Cpu;
        let unet = |cfg: &UNetConfig, vb: VarBuilder| {
            crate::model::unet::UNet2DConditionModel::new(cfg, vb.pp("unet"))
        };
        let trained = crate::nn::init::init_weights(1, &dev, |vb| unet(&small, vb))?;
        let mut grown = crate::nn::init::init_weights(2, &dev, |vb| unet(&big, vb))?;
        let fresh = take_trained(&mut grown, &trained, Path::new("small"), true)?;
        assert!(fresh > 0 && grown.len() > trained.len());
        let s = small.sample_size.unwrap_or(16);
        let x = Tensor::randn(0f32, 1.0, (2, small.in_channels, s, s), &dev)?;
        let ctx = Tensor::randn(0f32, 1.0, (2, 8, small.cross_attention_dim), &dev)?;
        let t = Tensor::new(&[10f32, 700.0], &dev)?;
        let run = |w: &HashMap<String, Tensor>, cfg: &UNetConfig| -> Result<Tensor> {
            let m = unet(cfg, VarBuilder::from_tensors(w.clone(), DType::F32, &dev))?;
            Ok(m.forward(&x, &t, &ctx, None)?)
        };
        let d = (run(&grown, &big)? - run(&trained, &small)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "the grown U-Net must start as its --init");
        // Growing into a config with a different width is a reshape, not a growth.
        let mut wider = big.clone();
        wider.cross_attention_dim *= 2;
        let mut bad = crate::nn::init::init_weights(3, &dev, |vb| unet(&wider, vb))?;
        let e = take_trained(&mut bad, &trained, Path::new("small"), true).unwrap_err();
        assert!(e.to_string().contains("has shape"), "{e}");
        // And a config that adds nothing needs no --grow.
        let mut same = crate::nn::init::init_weights(4, &dev, |vb| unet(&small, vb))?;
        let e = take_trained(&mut same, &trained, Path::new("small"), true).unwrap_err();
        assert!(e.to_string().contains("adds nothing"), "{e}");
        Ok(())
    }
}
