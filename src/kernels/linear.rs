//! A frozen linear layer on the CPU, y = x·W + b with W stored `[in, out]` (transposed from
//! PyTorch's layout once at load): one gemm call writing onto the bias rows, spread over threads
//! only when the product is large enough to pay for waking them. Through candle the same layer
//! took a column-major right-hand side (the `gemm` crate's slow case, up to 7× at batch-1 row
//! counts), a second pass for the bias, and both threads for products of a few microseconds.

use candle_core::{Result, Shape, Tensor};

use super::{apply, matmul, Grads, Input, Kernel};

/// Multiply-adds below which one thread does the whole product (about 10 µs of work: waking a
/// second thread costs about as much). Between 0 and 2^21 the CLIP-L and motion timings did not
/// move beyond their noise (2-core Zen 4, 2026-12-07).
const PARALLEL_MIN: usize = 1 << 18;

/// The kernel, with the size from which it spreads a product over threads.
struct Linear {
    parallel_min: usize,
}

impl Kernel for Linear {
    const NAME: &'static str = "linear";

    fn forward(&self, inputs: &[Input]) -> Result<(Vec<f32>, Shape)> {
        let (x, wt, bias) = match inputs {
            [x, wt] => (x, wt, None),
            [x, wt, b] => (x, wt, Some(b)),
            _ => candle_core::bail!("linear takes 2 or 3 inputs, got {}", inputs.len()),
        };
        let (k, n) = wt.shape.dims2()?;
        let mut dims = x.shape.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("linear: input {:?} against weight [{k}, {n}]", x.shape)
        }
        let rows = x.data.len() / k.max(1);
        let mut y = match bias {
            Some(b) if b.data.len() == n => b.data.repeat(rows),
            Some(b) => candle_core::bail!("linear: bias {:?} against {n} outputs", b.shape),
            None => vec![0f32; rows * n],
        };
        let parallel = rows * n * k >= self.parallel_min;
        let accumulate = bias.is_some();
        matmul(
            (rows, n, k),
            &mut y,
            (n, 1),
            accumulate,
            x.data,
            (k, 1),
            wt.data,
            (n, 1),
            1.0,
            parallel,
        );
        *dims.last_mut().expect("checked above") = n;
        Ok((y, Shape::from(dims)))
    }

    fn backward(&self, i: &[&Tensor], _out: &Tensor, grad: &Tensor) -> Grads {
        let (x, wt) = (i[0], i[1]);
        let (k, n) = wt.dims2()?;
        let g = grad.reshape(((), n))?;
        let x2 = x.reshape(((), k))?;
        let dx = g.matmul(&wt.t()?)?.reshape(x.shape())?;
        let dwt = x2.t()?.matmul(&g)?;
        let mut out = vec![Some(dx), Some(dwt)];
        if i.len() == 3 {
            out.push(Some(column_sums(&g)?));
        }
        Ok(out)
    }
}

/// Rows per rayon task of [`column_sums`].
const SUM_ROWS: usize = 256;

/// The sum over the rows of a `[rows, n]` f32 tensor: the bias's gradient. candle's `sum(0)`
/// walks the strided dimension one element at a time (with the LayerNorm's, ≈ 27 % of a motion
/// VAE training step); row by row the sum vectorises, with partial sums per task.
fn column_sums(g: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (_, n) = g.dims2()?;
    let v = g.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let partial: Vec<Vec<f32>> = v
        .par_chunks(n.max(1) * SUM_ROWS)
        .map(|rows| {
            let mut acc = vec![0f32; n];
            for row in rows.chunks(n.max(1)) {
                for (a, &x) in acc.iter_mut().zip(row) {
                    *a += x;
                }
            }
            acc
        })
        .collect();
    let mut sum = vec![0f32; n];
    for p in &partial {
        for (a, &x) in sum.iter_mut().zip(p) {
            *a += x;
        }
    }
    Tensor::from_vec(sum, n, g.device())
}

/// `x [.., in]` · `wt [in, out]` (+ `bias [out]`), f32 CPU, differentiable.
pub fn linear(x: &Tensor, wt: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_with(PARALLEL_MIN, x, wt, bias)
}

fn linear_with(parallel_min: usize, x: &Tensor, wt: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let k = Linear { parallel_min };
    match b {
        Some(b) => apply(k, &[x, wt, b]),
        None => apply(k, &[x, wt]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Against x·W + b in f64, over odd sizes, with and without a bias, on one thread and
    /// spread; and the gradients against candle's ops.
    #[test]
    fn matches_an_f64_reference_and_differentiates() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, k, n) in [
            (vec![1, 1], 1, 1),
            (vec![2, 13], 13, 7),
            (vec![3, 29, 77], 77, 33),
            (vec![1, 300, 40], 40, 130),
        ] {
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?;
            let wt = Tensor::randn(0f32, 0.3, (k, n), &dev)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            let x64 = x.to_dtype(DType::F64)?.reshape(((), k))?;
            let plain = x64.matmul(&wt.to_dtype(DType::F64)?)?;
            let with_bias = plain.broadcast_add(&b.to_dtype(DType::F64)?)?;
            for threshold in [0, usize::MAX] {
                for (got, want) in [
                    (linear_with(threshold, &x, &wt, None)?, &plain),
                    (linear_with(threshold, &x, &wt, Some(&b))?, &with_bias),
                ] {
                    let mut dims = shape.clone();
                    *dims.last_mut().unwrap() = n;
                    assert_eq!(got.dims(), dims.as_slice());
                    let got = got.to_dtype(DType::F64)?.reshape(((), n))?;
                    let err = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    let scale = want.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0);
                    assert!(err / scale <= 1e-5, "{shape:?}·[{k},{n}]: {err}");
                }
            }
        }
        // One task of the bias's column sums, and several with a partial last one.
        for rows in [5, 2 * SUM_ROWS + 37] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, rows, 6), &dev)?)?;
            let wt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 4), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 4, &dev)?)?;
            let ours = linear(&x, &wt, Some(&b))?;
            let reference = x.broadcast_matmul(&wt)?.broadcast_add(&b)?;
            let diffs =
                super::super::grad_diffs(&[("x", &x), ("wt", &wt), ("b", &b)], ours, reference)?;
            for (name, diff, scale) in diffs {
                assert!(
                    diff <= 1e-5 * scale.max(1.0),
                    "{rows}: {name}: {diff} of {scale}"
                );
            }
        }
        Ok(())
    }
}
