//! LoRA adapters for the U-Net (LCM-LoRA): a low-rank update W + s·(α/r)·up·down on the
//! attention, projection, feed-forward, resnet-conv and time-embedding weights, the layers the
//! reference LCM-LoRA script adapts.
//!
//! Files are written in diffusers' layout (`unet.<module>.lora.down.weight` `[r, in(, kh, kw)]`,
//! `unet.<module>.lora.up.weight` `[out, r(, 1, 1)]`, α = r so the scale is 1) and read in that
//! layout, PEFT's (`lora_A`/`lora_B`) and kohya's (`lora_unet_<module_with_underscores>`
//! `.lora_down/.lora_up.weight` + `.alpha`, the format of the published LCM-LoRA files).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::kernels::{Grads, Input, Kernel};

/// Module-name endings that get an adapter.
pub const TARGETS: &[&str] = &[
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
];

/// One adapted module: `down`, `up` and α (None: α = r).
#[derive(Clone)]
pub struct Pair {
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: Option<f64>,
}

/// The modules of a U-Net weight map that [`TARGETS`] selects, sorted.
pub fn target_modules(base: &HashMap<String, Tensor>) -> Vec<String> {
    let mut out: Vec<String> = base
        .iter()
        .filter_map(|(name, t)| {
            let module = name.strip_suffix(".weight")?;
            let hit = TARGETS
                .iter()
                .any(|t| module == *t || module.ends_with(&format!(".{t}")));
            (hit && t.rank() >= 2).then(|| module.to_string())
        })
        .collect();
    out.sort();
    out
}

/// File key of a module's down / up matrix in our (diffusers) layout.
pub fn down_key(module: &str) -> String {
    format!("unet.{module}.lora.down.weight")
}
pub fn up_key(module: &str) -> String {
    format!("unet.{module}.lora.up.weight")
}

/// Fresh adapters for every target module: `down` ~ U(±1/√fan_in) (PEFT's default), `up` = 0, so
/// the adapted model starts equal to the base. Keys as in the file layout.
pub fn init(
    base: &HashMap<String, Tensor>,
    rank: usize,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    if rank == 0 {
        bail!("--lora-rank must be at least 1")
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6c6f_7261);
    let mut out = HashMap::new();
    for m in target_modules(base) {
        let w = &base[&format!("{m}.weight")];
        let dims = w.dims();
        let fan_in: usize = dims[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt();
        let mut down_shape = dims.to_vec();
        down_shape[0] = rank;
        let n: usize = down_shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        out.insert(down_key(&m), Tensor::from_vec(v, down_shape, device)?);
        let mut up_shape = vec![dims[0], rank];
        up_shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        out.insert(up_key(&m), Tensor::zeros(up_shape, DType::F32, device)?);
    }
    Ok(out)
}

/// Group an adapter file's tensors by the U-Net module they adapt, whatever the layout.
/// `base_modules` (the U-Net's module names) resolves kohya's underscored names.
pub fn parse(
    tensors: &HashMap<String, Tensor>,
    base_modules: &[String],
    label: &str,
) -> Result<BTreeMap<String, Pair>> {
    let kohya: HashMap<String, &String> = base_modules
        .iter()
        .map(|m| (m.replace('.', "_"), m))
        .collect();
    #[derive(Default)]
    struct Parts {
        down: Option<Tensor>,
        up: Option<Tensor>,
        alpha: Option<f64>,
    }
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    for (key, t) in tensors {
        let (module, part) = if let Some(rest) = key.strip_prefix("lora_unet_") {
            let (m, p) = rest
                .split_once('.')
                .with_context(|| format!("{label}: unexpected key {key}"))?;
            let m = kohya
                .get(m)
                .with_context(|| format!("{label}: {key} names no U-Net module"))?;
            (m.to_string(), p)
        } else {
            let rest = key.strip_prefix("unet.").unwrap_or(key);
            let split = [".lora.down.", ".lora.up.", ".lora_A.", ".lora_B.", ".alpha"]
                .iter()
                .find_map(|s| {
                    rest.find(s)
                        .map(|i| (rest[..i].to_string(), &rest[i + 1..]))
                });
            match split {
                Some(x) => x,
                None if key.starts_with("text_encoder") || key.starts_with("lora_te") => continue,
                None => bail!("{label}: unexpected key {key}"),
            }
        };
        let e = parts.entry(module).or_default();
        match part {
            "lora.down.weight" | "lora_A.weight" | "lora_down.weight" => e.down = Some(t.clone()),
            "lora.up.weight" | "lora_B.weight" | "lora_up.weight" => e.up = Some(t.clone()),
            "alpha" => {
                e.alpha = Some(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0]);
            }
            _ => bail!("{label}: unexpected key {key}"),
        }
    }
    if parts.is_empty() {
        bail!("{label}: no U-Net LoRA weights found")
    }
    parts
        .into_iter()
        .map(|(m, p)| match (p.down, p.up) {
            (Some(down), Some(up)) => Ok((
                m,
                Pair {
                    down,
                    up,
                    alpha: p.alpha,
                },
            )),
            _ => bail!("{label}: module {m} lacks its down or up matrix"),
        })
        .collect()
}

/// `base` with every adapter merged in: W + scale·(α/r)·up·down, in W's dtype. Differentiable in
/// the adapters (training builds the student this way each step).
pub fn merge(
    base: &HashMap<String, Tensor>,
    adapters: &BTreeMap<String, Pair>,
    scale: f64,
    label: &str,
) -> Result<HashMap<String, Tensor>> {
    let mut out = base.clone();
    for (m, p) in adapters {
        let key = format!("{m}.weight");
        let w = base
            .get(&key)
            .with_context(|| format!("{label}: the U-Net has no weight {key}"))?;
        let r = p.down.dim(0)?;
        let s = scale * p.alpha.unwrap_or(r as f64) / r as f64;
        let up = p.up.to_dtype(DType::F32)?.flatten_from(1)?;
        let down = p.down.to_dtype(DType::F32)?.flatten_from(1)?;
        if up.dim(1)? != r || down.elem_count() / r * w.dim(0)? != w.elem_count() {
            bail!(
                "{label}: {m}: adapter shapes {:?} / {:?} do not fit the weight {:?}",
                p.down.dims(),
                p.up.dims(),
                w.dims()
            )
        }
        let merged = add_product(
            &w.to_dtype(DType::F32)?.reshape((w.dim(0)?, down.dim(1)?))?,
            &(up * s)?.contiguous()?,
            &down.contiguous()?,
        )?
        .reshape(w.dims())?
        .to_dtype(w.dtype())?;
        out.insert(key, merged);
    }
    Ok(out)
}

/// `w + up·down` for 2-D f32 tensors. On the CPU one op writing one W-sized result, whose
/// backward needs only the incoming gradient G (d up = G·downᵀ, d down = upᵀ·G); the composite
/// keeps a W-sized product per layer alive (training SD1.5-size adapters through merged weights
/// ran out of 24 GB that way; training now keeps adapters beside the layers, see `nn::Linear`).
fn add_product(w: &Tensor, up: &Tensor, down: &Tensor) -> Result<Tensor> {
    if w.device().is_cpu() && [w, up, down].iter().all(|t| t.dtype() == DType::F32) {
        Ok(crate::kernels::apply(AddProduct, &[w, up, down])?)
    } else {
        Ok((w + up.matmul(down)?)?)
    }
}

struct AddProduct;

impl Kernel for AddProduct {
    const NAME: &'static str = "lora-add-product";

    fn forward(&self, inputs: &[Input]) -> candle_core::Result<(Vec<f32>, Shape)> {
        let [w, up, down] = crate::kernels::arity(Self::NAME, inputs)?;
        let (o, k) = w.shape.dims2()?;
        let (o2, r) = up.shape.dims2()?;
        let (r2, k2) = down.shape.dims2()?;
        if o != o2 || r != r2 || k != k2 {
            candle_core::bail!("lora merge: [{o}, {k}] + [{o2}, {r}]·[{r2}, {k2}]")
        }
        let shape = w.shape.clone();
        let (w, up, down) = (w.data, up.data, down.data);
        let mut out = w.to_vec();
        // out is o×k, up is o×r and down is r×k, all row-major and contiguous.
        crate::kernels::matmul(
            (o, k, r),
            &mut out,
            (k, 1),
            true,
            up,
            (r, 1),
            down,
            (k, 1),
            1.0,
            true,
        );
        Ok((out, shape))
    }

    fn backward(&self, i: &[&Tensor], _out: &Tensor, grad: &Tensor) -> Grads {
        let (up, down) = (i[1], i[2]);
        let d_up = grad.matmul(&down.t()?)?;
        let d_down = up.t()?.matmul(grad)?;
        Ok(vec![None, Some(d_up), Some(d_down)])
    }
}

/// Read an adapter file for a U-Net with the given weights.
pub fn load(
    path: &Path,
    base: &HashMap<String, Tensor>,
    device: &Device,
) -> Result<BTreeMap<String, Pair>> {
    let label = format!("--lora {}", path.display());
    if !path.is_file() {
        bail!("{label}: no such file")
    }
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("{label}: not a safetensors file"))?;
    let modules: Vec<String> = base
        .keys()
        .filter_map(|k| k.strip_suffix(".weight").map(str::to_string))
        .collect();
    parse(&tensors, &modules, &label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Result<HashMap<String, Tensor>> {
        let dev = Device::Cpu;
        Ok(HashMap::from([
            (
                "mid.attn.to_q.weight".to_string(),
                Tensor::randn(0f32, 1.0, (6, 5), &dev)?,
            ),
            (
                "mid.attn.to_q.bias".to_string(),
                Tensor::zeros(6, DType::F32, &dev)?,
            ),
            (
                "down_blocks.0.resnets.0.conv1.weight".to_string(),
                Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev)?,
            ),
            (
                "down_blocks.0.resnets.0.norm1.weight".to_string(),
                Tensor::ones(3, DType::F32, &dev)?,
            ),
        ]))
    }

    #[test]
    fn adapters_start_as_identity_and_merge_as_the_formula() -> Result<()> {
        let base = base()?;
        assert_eq!(
            target_modules(&base),
            ["down_blocks.0.resnets.0.conv1", "mid.attn.to_q"]
        );
        let mut file = init(&base, 2, 0, &Device::Cpu)?;
        let mods: Vec<String> = base
            .keys()
            .map(|k| k.trim_end_matches(".weight").to_string())
            .collect();
        let same = merge(&base, &parse(&file, &mods, "t")?, 1.0, "t")?;
        for (k, w) in &base {
            assert_eq!(
                same[k].flatten_all()?.to_vec1::<f32>()?,
                w.flatten_all()?.to_vec1::<f32>()?
            );
        }
        // A non-zero up: the conv weight moves by scale·(α/r)·up·down, reshaped.
        let up = Tensor::randn(0f32, 1.0, (4, 2, 1, 1), &Device::Cpu)?;
        file.insert(up_key("down_blocks.0.resnets.0.conv1"), up.clone());
        let merged = merge(&base, &parse(&file, &mods, "t")?, 0.5, "t")?;
        let down = &file[&down_key("down_blocks.0.resnets.0.conv1")];
        let want = (up.flatten_from(1)?.matmul(&down.flatten_from(1)?)? * 0.5)?
            .reshape((4, 3, 3, 3))?
            .add(&base["down_blocks.0.resnets.0.conv1.weight"])?;
        let diff = (merged["down_blocks.0.resnets.0.conv1.weight"].clone() - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    #[test]
    fn adapters_beside_layers_equal_adapters_merged_into_them() -> Result<()> {
        use candle_core::Module;
        let dev = Device::Cpu;
        let t = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
        let base = HashMap::from([
            ("lin.weight".to_string(), t(&[6, 5])?),
            ("lin.bias".to_string(), t(&[6])?),
            ("conv.weight".to_string(), t(&[4, 3, 3, 3])?),
            ("conv.bias".to_string(), t(&[4])?),
        ]);
        let adapters = HashMap::from([
            (down_key("lin"), t(&[2, 5])?),
            (up_key("lin"), t(&[6, 2])?),
            (down_key("conv"), t(&[2, 3, 3, 3])?),
            (up_key("conv"), t(&[4, 2, 1, 1])?),
        ]);
        let mods = vec!["lin".to_string(), "conv".to_string()];
        let merged = merge(&base, &parse(&adapters, &mods, "t")?, 1.0, "t")?;
        let mut beside = base.clone();
        for (k, v) in &adapters {
            beside.insert(k.trim_start_matches("unet.").to_string(), v.clone());
        }
        let vb = |m: HashMap<String, Tensor>| {
            candle_nn::VarBuilder::from_tensors(m, DType::F32, &Device::Cpu)
        };
        let diff = |a: Tensor, b: Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        let x = t(&[3, 5])?;
        let (l1, l2) = (
            crate::nn::linear(5, 6, true, vb(beside.clone()).pp("lin"))?,
            crate::nn::linear(5, 6, true, vb(merged.clone()).pp("lin"))?,
        );
        assert!(diff(l1.forward(&x)?, l2.forward(&x)?)? < 1e-4);
        let x = t(&[2, 3, 8, 8])?;
        let (c1, c2) = (
            crate::nn::conv2d(3, 4, 3, 1, 1, vb(beside).pp("conv"))?,
            crate::nn::conv2d(3, 4, 3, 1, 1, vb(merged).pp("conv"))?,
        );
        assert!(diff(c1.forward(&x)?, c2.forward(&x)?)? < 1e-4);
        Ok(())
    }

    #[test]
    fn fused_merge_has_the_composite_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev)?;
        let up = candle_core::Var::randn(0f32, 1.0, (6, 2), &dev)?;
        let down = candle_core::Var::randn(0f32, 1.0, (2, 5), &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (6, 5), &dev)?;
        let fused = add_product(&w, up.as_tensor(), down.as_tensor())?;
        let composite = (&w + up.as_tensor().matmul(down.as_tensor())?)?;
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        assert!(close(&fused, &composite)? < 1e-5);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (composite * &probe)?.sum_all()?.backward()?;
        for v in [&up, &down] {
            let (a, b) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(close(a, b)? < 1e-4, "{a} {b}");
        }
        Ok(())
    }

    #[test]
    fn kohya_and_peft_layouts_read_as_ours() -> Result<()> {
        let base = base()?;
        let mods: Vec<String> = base
            .keys()
            .map(|k| k.trim_end_matches(".weight").to_string())
            .collect();
        let ours = init(&base, 2, 1, &Device::Cpu)?;
        let m = "mid.attn.to_q";
        let down = ours[&down_key(m)].clone();
        let up = Tensor::randn(0f32, 1.0, (6, 2), &Device::Cpu)?;
        let ours = HashMap::from([(down_key(m), down.clone()), (up_key(m), up.clone())]);
        let peft = HashMap::from([
            (format!("unet.{m}.lora_A.weight"), down.clone()),
            (format!("unet.{m}.lora_B.weight"), up.clone()),
        ]);
        // kohya with α = 4 at r = 2: twice the update, so merge it at half the scale.
        let kohya = HashMap::from([
            ("lora_unet_mid_attn_to_q.lora_down.weight".to_string(), down),
            ("lora_unet_mid_attn_to_q.lora_up.weight".to_string(), up),
            (
                "lora_unet_mid_attn_to_q.alpha".to_string(),
                Tensor::new(4f32, &Device::Cpu)?,
            ),
        ]);
        let w = |t: &HashMap<String, Tensor>, s: f64| -> Result<Vec<f32>> {
            Ok(
                merge(&base, &parse(t, &mods, "t")?, s, "t")?[&format!("{m}.weight")]
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            )
        };
        let reference = w(&ours, 1.0)?;
        assert_eq!(reference, w(&peft, 1.0)?);
        let k = w(&kohya, 0.5)?;
        assert!(reference.iter().zip(&k).all(|(a, b)| (a - b).abs() < 1e-6));
        // Unknown modules and half pairs are named.
        let bad = HashMap::from([(
            "lora_unet_nowhere.lora_down.weight".to_string(),
            Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?,
        )]);
        let e = parse(&bad, &mods, "f.safetensors")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("lora_unet_nowhere"), "{e}");
        let half = HashMap::from([(
            down_key(m),
            Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?,
        )]);
        let e = parse(&half, &mods, "f.safetensors")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(m), "{e}");
        Ok(())
    }
}
