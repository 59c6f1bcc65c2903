//! GroupNorm as one CPU op with a hand-written backward. candle-nn's GroupNorm is ten element-wise
//! and reduction ops, each keeping a full-size tensor in the autograd graph, and its backward
//! reduces over strided dimensions slowly (≈ 20 % of a VAE training step measured). Statistics are
//! accumulated in f64.

use candle_core::{Result, Shape, Tensor};
use rayon::prelude::*;

use super::{apply, Grads, Input, Kernel};
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

    /// Mean and 1/σ of one group's values.
    fn stats(&self, v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, 1.0 / (var + self.eps).sqrt())
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
                let (mean, rstd) = self.stats(xg);
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
                let (mean, rstd) = self.stats(xg);
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
}
