//! GroupNorm and LayerNorm as one CPU op each with a hand-written backward. Written with candle's
//! ops, a norm is eight to ten element-wise and reduction ops, each keeping a full-size tensor in
//! the autograd graph, and their backward reduces over strided dimensions slowly (GroupNorm ≈ 20 %
//! of an image VAE training step; LayerNorm's and the linear bias's reductions ≈ 27 % of a motion
//! VAE step, 2026-12-07). Statistics are accumulated in f64.

use candle_core::{Result, Shape, Tensor};
use rayon::prelude::*;

use super::{apply, Grads, Input, Kernel};

/// Mean and 1/σ of one group's or row's values, in f64.
fn stats(v: &[f32], eps: f64) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
}

/// `x` `[b, c, …]` normalised over each group of c/groups channels × the remaining dimensions, then
/// `· weight[c] + bias[c]`. f32 CPU; differentiable when any input is tracked.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    apply(GroupNormOp { groups, eps }, &[x, weight, bias])
}

impl GroupNormOp {
    /// (batch, channels, spatial size) of `shape`, checked against the group count.
    fn dims(&self, shape: &Shape) -> Result<(usize, usize, usize)> {
        let d = shape.dims();
        if d.len() < 2 || self.groups == 0 || !d[1].is_multiple_of(self.groups) {
            candle_core::bail!("group norm: shape {shape:?} with {} groups", self.groups)
        }
        Ok((d[0], d[1], d[2..].iter().product()))
    }
}

impl Kernel for GroupNormOp {
    const NAME: &'static str = "group-norm";

    fn forward(&self, inputs: &[Input]) -> Result<(Vec<f32>, Shape)> {
        let [x, w, b] = super::arity(Self::NAME, inputs)?;
        let (_, c, s) = self.dims(x.shape)?;
        let shape = x.shape.clone();
        let (x, w, b) = (x.data, w.data, b.data);
        if w.len() != c || b.len() != c {
            candle_core::bail!(
                "group norm: {c} channels but weight {} and bias {}",
                w.len(),
                b.len()
            )
        }
        let cg = c / self.groups;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(cg * s)
            .zip(x.par_chunks(cg * s))
            .enumerate()
            .for_each(|(i, (o, xg))| {
                let (mean, rstd) = stats(xg, self.eps);
                let c0 = (i % self.groups) * cg;
                for (k, (oc, xc)) in o.chunks_mut(s).zip(xg.chunks(s)).enumerate() {
                    let scale = (rstd * w[c0 + k] as f64) as f32;
                    let shift = (b[c0 + k] as f64 - mean * rstd * w[c0 + k] as f64) as f32;
                    for (y, &v) in oc.iter_mut().zip(xc) {
                        *y = v * scale + shift;
                    }
                }
            });
        Ok((out, shape))
    }

    fn backward(&self, i: &[&Tensor], _out: &Tensor, grad: &Tensor) -> Grads {
        let (x, w) = (i[0], i[1]);
        let (_, c, s) = self.dims(x.shape())?;
        let cg = c / self.groups;
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.flatten_all()?.to_vec1::<f32>()?;
        let gs = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xs.len()];
        // Per group: dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) with ĝ = dy·γ; per-channel sums of dy
        // and dy·x̂ give dβ and dγ.
        let per_group: Vec<(Vec<f64>, Vec<f64>)> = dx
            .par_chunks_mut(cg * s)
            .zip(xs.par_chunks(cg * s).zip(gs.par_chunks(cg * s)))
            .enumerate()
            .map(|(i, (dxg, (xg, gg)))| {
                let (mean, rstd) = stats(xg, self.eps);
                let c0 = (i % self.groups) * cg;
                let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                let mut dbeta = vec![0f64; cg];
                let mut dgamma = vec![0f64; cg];
                for k in 0..cg {
                    let gamma = ws[c0 + k] as f64;
                    for j in k * s..(k + 1) * s {
                        let xh = (xg[j] as f64 - mean) * rstd;
                        let g = gg[j] as f64;
                        dbeta[k] += g;
                        dgamma[k] += g * xh;
                        sum_g += g * gamma;
                        sum_gx += g * gamma * xh;
                    }
                }
                let n = (cg * s) as f64;
                let (mg, mgx) = (sum_g / n, sum_gx / n);
                for k in 0..cg {
                    let gamma = ws[c0 + k] as f64;
                    for j in k * s..(k + 1) * s {
                        let xh = (xg[j] as f64 - mean) * rstd;
                        dxg[j] = (rstd * (gg[j] as f64 * gamma - mg - xh * mgx)) as f32;
                    }
                }
                (dgamma, dbeta)
            })
            .collect();
        let mut dgamma = vec![0f32; c];
        let mut dbeta = vec![0f32; c];
        for (i, (dg, db)) in per_group.iter().enumerate() {
            let c0 = (i % self.groups) * cg;
            for k in 0..cg {
                dgamma[c0 + k] += dg[k] as f32;
                dbeta[c0 + k] += db[k] as f32;
            }
        }
        let dev = x.device();
        Ok(vec![
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dgamma, c, dev)?),
            Some(Tensor::from_vec(dbeta, c, dev)?),
        ])
    }
}

struct LayerNormOp {
    eps: f64,
}

/// `x` `[.., d]` normalised over its last dimension, then `· weight[d] + bias[d]`. f32 CPU;
/// differentiable when any input is tracked.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    apply(LayerNormOp { eps }, &[x, weight, bias])
}

/// Rows per rayon task: enough work to pay for a task at the widths used (64–1024).
const ROWS_PER_TASK: usize = 64;

impl LayerNormOp {
    fn width(shape: &Shape, weight: usize, bias: usize) -> Result<usize> {
        let d = shape.dims().last().copied().unwrap_or(0);
        if d == 0 || weight != d || bias != d {
            candle_core::bail!("layer norm: input {shape:?} with weight {weight} and bias {bias}")
        }
        Ok(d)
    }
}

impl Kernel for LayerNormOp {
    const NAME: &'static str = "layer-norm";

    fn forward(&self, inputs: &[Input]) -> Result<(Vec<f32>, Shape)> {
        let [x, w, b] = super::arity(Self::NAME, inputs)?;
        let d = Self::width(x.shape, w.data.len(), b.data.len())?;
        let (w, b) = (w.data, b.data);
        let mut out = vec![0f32; x.data.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.data.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(o, xs)| {
                for (orow, xrow) in o.chunks_mut(d).zip(xs.chunks(d)) {
                    let (mean, rstd) = stats(xrow, self.eps);
                    let (mean, rstd) = (mean as f32, rstd as f32);
                    for (((y, &v), &g), &c) in orow.iter_mut().zip(xrow).zip(w).zip(b) {
                        *y = (v - mean) * rstd * g + c;
                    }
                }
            });
        Ok((out, x.shape.clone()))
    }

    fn backward(&self, i: &[&Tensor], _out: &Tensor, grad: &Tensor) -> Grads {
        let (x, w) = (i[0], i[1]);
        let d = Self::width(x.shape(), w.elem_count(), i[2].elem_count())?;
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ws: Vec<f64> = w
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        let gs = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xs.len()];
        // Per row: dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) with ĝ = dy·γ; column sums of dy·x̂
        // and dy give dγ and dβ, accumulated per task and added up after.
        let partial: Vec<(Vec<f64>, Vec<f64>)> = dx
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(
                xs.par_chunks(d * ROWS_PER_TASK)
                    .zip(gs.par_chunks(d * ROWS_PER_TASK)),
            )
            .map(|(dxs, (xs, gs))| {
                let (mut dgamma, mut dbeta) = (vec![0f64; d], vec![0f64; d]);
                let mut xh = vec![0f64; d];
                for ((dxr, xr), gr) in dxs.chunks_mut(d).zip(xs.chunks(d)).zip(gs.chunks(d)) {
                    let (mean, rstd) = stats(xr, self.eps);
                    let (mut sum_g, mut sum_gx) = (0f64, 0f64);
                    for j in 0..d {
                        xh[j] = (xr[j] as f64 - mean) * rstd;
                        let g = gr[j] as f64;
                        dbeta[j] += g;
                        dgamma[j] += g * xh[j];
                        sum_g += g * ws[j];
                        sum_gx += g * ws[j] * xh[j];
                    }
                    let (mg, mgx) = (sum_g / d as f64, sum_gx / d as f64);
                    for j in 0..d {
                        dxr[j] = (rstd * (gr[j] as f64 * ws[j] - mg - xh[j] * mgx)) as f32;
                    }
                }
                (dgamma, dbeta)
            })
            .collect();
        let mut dgamma = vec![0f64; d];
        let mut dbeta = vec![0f64; d];
        for (dg, db) in &partial {
            for j in 0..d {
                dgamma[j] += dg[j];
                dbeta[j] += db[j];
            }
        }
        let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
        let dev = x.device();
        Ok(vec![
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(f32s(dgamma), w.shape(), dev)?),
            Some(Tensor::from_vec(f32s(dbeta), i[2].shape(), dev)?),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Var};

    #[test]
    fn matches_candle_group_norm_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, groups) in [((2, 8, 5, 3), 4), ((3, 6, 4, 4), 2)] {
            let c = shape.1;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?.affine(3.0, 1.5)?)?;
            let w = Var::randn(1f32, 0.5, c, &dev)?;
            let b = Var::randn(0f32, 0.5, c, &dev)?;
            let r = Tensor::randn(0f32, 1.0, shape, &dev)?;
            let ours = group_norm(&x, &w, &b, groups, 1e-5)?;
            let reference = candle_nn::GroupNorm::new(
                w.as_tensor().clone(),
                b.as_tensor().clone(),
                c,
                groups,
                1e-5,
            )?
            .forward(&x)?;
            let diff = crate::kernels::max_abs_diff(&ours, &reference)?;
            assert!(diff < 1e-5, "forward differs by {diff}");
            let ga = (ours * &r)?.sum_all()?.backward()?;
            let gb = (reference * &r)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let d = crate::kernels::max_abs_diff(
                    ga.get(v).expect("ours"),
                    gb.get(v).expect("candle"),
                )?;
                assert!(d < 1e-4, "d{name} differs by {d}");
            }
        }
        Ok(())
    }

    /// LayerNorm from candle's own ops, as the layers computed it before the kernel.
    fn composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(candle_core::D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        centred
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }

    #[test]
    fn layer_norm_matches_candle_ops_and_their_gradients() -> Result<()> {
        let dev = Device::Cpu;
        // Widths off the vector lanes, row counts off the task size, a 3-D input.
        for shape in [vec![3, 5], vec![130, 37], vec![2, 67, 128]] {
            let d = *shape.last().unwrap();
            let x = Var::from_tensor(
                &Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?.affine(3.0, 1.5)?,
            )?;
            let w = Var::randn(1f32, 0.5, d, &dev)?;
            let b = Var::randn(0f32, 0.5, d, &dev)?;
            let r = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?;
            let ours = layer_norm(&x, &w, &b, 1e-5)?;
            let reference = composed(&x, &w, &b, 1e-5)?;
            let diff = crate::kernels::max_abs_diff(&ours, &reference)?;
            assert!(diff < 1e-5, "{shape:?}: forward differs by {diff}");
            let ga = (ours * &r)?.sum_all()?.backward()?;
            let gb = (reference * &r)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let (ga, gb) = (ga.get(v).expect("ours"), gb.get(v).expect("candle"));
                let scale = gb.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                let d = crate::kernels::max_abs_diff(ga, gb)? / scale;
                assert!(d < 1e-4, "{shape:?}: d{name} differs by {d} (relative)");
            }
        }
        // A weight of the wrong width is refused.
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &dev)?;
        let w = Tensor::ones(3, candle_core::DType::F32, &dev)?;
        assert!(layer_norm(&x, &w, &w, 1e-5).is_err());
        Ok(())
    }
}
