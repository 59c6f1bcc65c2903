//! Seeded weight initialisation for training from scratch: the layers' own init hints (ones for
//! norms, zeros for biases, Kaiming/uniform for weights, as candle-nn and PyTorch choose them),
//! drawn from a ChaCha stream so that a run is reproducible from its seed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

#[derive(Default)]
struct Drawn {
    tensors: HashMap<String, Tensor>,
}

struct SeededBackend {
    rng: Mutex<ChaCha8Rng>,
    drawn: Arc<Mutex<Drawn>>,
}

impl SimpleBackend for SeededBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut drawn = self.drawn.lock().expect("init lock");
        if let Some(t) = drawn.tensors.get(name) {
            return t.to_dtype(dtype);
        }
        let n = s.elem_count();
        let mut rng = self.rng.lock().expect("init lock");
        let mut uniform = |lo: f64, up: f64| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(lo..up) as f32).collect()
        };
        let values: Vec<f32> = match h {
            Init::Const(v) => vec![v as f32; n],
            Init::Uniform { lo, up } => uniform(lo, up),
            Init::Randn { mean, stdev } => normal(&mut rng, n, mean, stdev),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(&s) as f64).sqrt();
                match dist {
                    candle_nn::init::NormalOrUniform::Normal => normal(&mut rng, n, 0.0, std),
                    candle_nn::init::NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (0..n)
                            .map(|_| rng.random_range(-bound..bound) as f32)
                            .collect()
                    }
                }
            }
        };
        let t = Tensor::from_vec(values, s, dev)?;
        drawn.tensors.insert(name.to_string(), t.clone());
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("initialising {name} needs its shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

fn normal(rng: &mut ChaCha8Rng, n: usize, mean: f64, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            (mean + std * z) as f32
        })
        .collect()
}

/// Build a model once through a seeded VarBuilder and return every weight it asked for, by name.
pub fn init_weights<M>(
    seed: u64,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<HashMap<String, Tensor>> {
    let drawn = Arc::new(Mutex::new(Drawn::default()));
    let backend = SeededBackend {
        rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        drawn: drawn.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    build(vb)?;
    let tensors = std::mem::take(&mut drawn.lock().expect("init lock").tensors);
    Ok(tensors)
}

/// Tests that need gradients: a model built once over seeded `Var`s, and the `Var`s by name.
#[cfg(test)]
pub fn live_vars<M>(
    seed: u64,
    device: &Device,
    build: impl Fn(VarBuilder) -> candle_core::Result<M>,
) -> Result<(HashMap<String, candle_core::Var>, M)> {
    let vars: HashMap<String, candle_core::Var> = init_weights(seed, device, &build)?
        .into_iter()
        .map(|(k, t)| Ok((k, candle_core::Var::from_tensor(&t)?)))
        .collect::<Result<_>>()?;
    let map = candle_nn::VarMap::new();
    map.data().lock().expect("varmap lock").extend(vars.clone());
    let model = build(VarBuilder::from_varmap(&map, DType::F32, device))?;
    Ok((vars, model))
}

/// Names of the `vars` whose gradient is absent or all zero, except those `exempt` accepts.
#[cfg(test)]
pub fn without_gradient(
    vars: &HashMap<String, candle_core::Var>,
    grads: &candle_core::backprop::GradStore,
    exempt: impl Fn(&str) -> bool,
) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for (name, v) in vars {
        let norm = match grads.get(v) {
            Some(g) => g.sqr()?.sum_all()?.to_scalar::<f32>()?,
            None => 0.0,
        };
        if norm == 0.0 && !exempt(name) {
            missing.push(name.clone());
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_init_is_reproducible_and_honours_hints() -> Result<()> {
        let build = |vb: VarBuilder| {
            let l = candle_nn::linear(64, 32, vb.pp("lin"))?;
            let n = crate::nn::LayerNorm::new(32, 1e-5, vb.pp("norm"))?;
            Ok((l, n))
        };
        let a = init_weights(7, &Device::Cpu, build)?;
        let b = init_weights(7, &Device::Cpu, build)?;
        let c = init_weights(8, &Device::Cpu, build)?;
        let w = |m: &HashMap<String, Tensor>, k: &str| m[k].flatten_all()?.to_vec1::<f32>();
        assert_eq!(w(&a, "lin.weight")?, w(&b, "lin.weight")?);
        assert_ne!(w(&a, "lin.weight")?, w(&c, "lin.weight")?);
        assert!(w(&a, "norm.weight")?.iter().all(|&x| x == 1.0));
        assert!(w(&a, "norm.bias")?.iter().all(|&x| x == 0.0));
        // candle-nn's linear asks for Kaiming-normal (ReLU gain) over fan-in 64: std √2/8.
        let v = w(&a, "lin.weight")?;
        let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        assert!((std / (2f32.sqrt() / 8.0) - 1.0).abs() < 0.05, "{std}");
        Ok(())
    }
}
