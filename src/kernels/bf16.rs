//! Linear layers and stride-1 convolutions on bf16 weights packed once at load ([`PackedB`],
//! [`PackedRows`]), with f32 activations in and out: inputs are rounded to bf16 as they are packed for the
//! product, sums are f32 ([`super::amx`]). Inference only (no backward).

use candle_core::{Result, Shape, Tensor};

use super::amx::{self, pad, PackedA, PackedB, PackedCols, PackedRows};
use super::{apply_no_bwd, Input, Kernel};
use rayon::prelude::*;

/// Elements from which a conversion pass is spread over threads.
const PARALLEL_MIN: usize = 1 << 16;

thread_local! {
    /// The packed activations and the product, reused across calls (fresh multi-megabyte
    /// buffers per layer cost page faults).
    static SCRATCH: std::cell::RefCell<(PackedA, Vec<f32>)> =
        const { std::cell::RefCell::new((PackedA::new(), Vec::new())) };
}

/// A tensor's values as f32 (a layer's bias, kept beside its packed weight).
fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()
}

/// A frozen linear layer: `w` is `[in, out]` packed, `bias` `[out]`.
#[derive(Debug)]
pub struct Bf16Linear {
    w: PackedB,
    bias: Option<Vec<f32>>,
}

impl Bf16Linear {
    /// From PyTorch's `[out, in]` f32 weight.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let w = weight.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let bias = bias.map(f32_values).transpose()?;
        Ok(Self {
            w: PackedB::pack(1, k, n, |_, r, c| w[c][r]),
            bias,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        apply_no_bwd(self, &[&x.contiguous()?])
    }
}

impl Kernel for Bf16Linear {
    const NAME: &'static str = "bf16-linear";

    fn forward(&self, inputs: &[Input]) -> Result<(Vec<f32>, Shape)> {
        let [x] = super::arity::<_, 1>(Self::NAME, inputs)?;
        let (k, n) = (self.w.k, self.w.n);
        let mut dims = x.shape.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("bf16 linear: input {:?} against weight [{n}, {k}]", x.shape)
        }
        let rows = x.data.len() / k.max(1);
        let kp = pad(k);
        // The buffers are taken out of the thread's slot while in use (see `IMAGE` below).
        let mut bufs = SCRATCH.take();
        let y = {
            let (a, c) = &mut bufs;
            let buf = a.reset_padding(rows, k);
            let convert = |(src, dst): (&[f32], &mut [u16])| amx::convert(src, &mut dst[..k]);
            if rows * k >= PARALLEL_MIN {
                let pairs = x.data.par_chunks_exact(k).zip(buf.par_chunks_exact_mut(kp));
                pairs.for_each(convert);
            } else {
                let pairs = x.data.chunks_exact(k).zip(buf.chunks_exact_mut(kp));
                pairs.for_each(convert);
            }
            let np = pad(n);
            let add_bias = |row: &mut [f32]| {
                if let Some(b) = &self.bias {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
            };
            if np == n {
                // The product's rows are the output's: written in place, no copy pass (SD1.5's
                // feed-forward writes 42 MB per call at 64²).
                let mut y = Vec::new();
                amx::matmul(a, &[0], &self.w, &mut y);
                y.truncate(rows * n);
                if self.bias.is_some() {
                    each_row(&mut y, n, |_, row| add_bias(row));
                }
                y
            } else {
                // Each row copied off the padded product with its bias added: one pass.
                amx::matmul(a, &[0], &self.w, c);
                let c = &*c;
                let mut y = vec![0f32; rows * n];
                each_row(&mut y, n, |i, row| {
                    row.copy_from_slice(&c[i * np..][..n]);
                    add_bias(row);
                });
                y
            }
        };
        SCRATCH.set(bufs);
        *dims.last_mut().expect("checked above") = n;
        Ok((y, Shape::from(dims)))
    }
}

/// `f(i, row i)` over the `n`-wide rows of `y`, across threads for large outputs.
fn each_row(y: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if y.len() >= PARALLEL_MIN {
        y.par_chunks_exact_mut(n)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        y.chunks_exact_mut(n).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// A frozen stride-1 convolution: `[c_out, c_in, k, k]` packed as k² tap matrices of
/// c_out × c_in, the left-hand side of [`amx::conv_matmul`]; the image is its right-hand side,
/// channel pairs interleaved (two contiguous rows zipped: no transposition either way, and the
/// product comes out as the NCHW planes themselves, on the padded width).
#[derive(Debug)]
pub struct Bf16Conv {
    w: PackedRows,
    bias: Option<Vec<f32>>,
    kernel: usize,
    padding: usize,
}

thread_local! {
    static IMAGE: std::cell::RefCell<(PackedCols, Vec<f32>)> =
        const { std::cell::RefCell::new((PackedCols::new(), Vec::new())) };
}

impl Bf16Conv {
    pub fn new(weight: &Tensor, bias: Option<&Tensor>, padding: usize) -> Result<Self> {
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        if kh != kw {
            candle_core::bail!("bf16 conv: square kernels only, got {kh}×{kw}")
        }
        let w = f32_values(weight)?;
        let taps = kh * kw;
        let bias = bias.map(f32_values).transpose()?;
        Ok(Self {
            w: PackedRows::pack(taps, c_out, c_in, |t, o, c| w[(o * c_in + c) * taps + t]),
            bias,
            kernel: kh,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        apply_no_bwd(self, &[&x.contiguous()?])
    }
}

impl Kernel for Bf16Conv {
    const NAME: &'static str = "bf16-conv";

    fn forward(&self, inputs: &[Input]) -> Result<(Vec<f32>, Shape)> {
        let [x] = super::arity::<_, 1>(Self::NAME, inputs)?;
        let (b, c_in, h, w) = x.shape.dims4()?;
        let (c_out, k, p) = (self.w.m, self.kernel, self.padding);
        if c_in != self.w.k {
            candle_core::bail!(
                "bf16 conv: input {:?} against {} input channels",
                x.shape,
                self.w.k
            )
        }
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        if hp < k || wp < k {
            candle_core::bail!(
                "bf16 conv: input {:?} smaller than the {k}×{k} kernel",
                x.shape
            )
        }
        let (ho, wo) = (hp - k + 1, wp - k + 1);
        // Output columns on the padded width: tap (dy, dx) reads the image dy·wp + dx columns on.
        let n = ho * wp;
        let offsets: Vec<usize> = (0..k * k).map(|t| (t / k) * wp + t % k).collect();
        let cols = pad(n) + (k - 1) * wp + k - 1;
        let np = pad(n);
        let mut out = vec![0f32; b * c_out * ho * wo];
        // Taken out of the thread's slot (not borrowed) while in use: a layer that rayon runs on
        // this thread while it waits finds the slot empty and allocates, rather than panicking.
        let mut bufs = IMAGE.take();
        {
            let (bx, c) = &mut bufs;
            for (img, dst) in x
                .data
                .chunks_exact(c_in * h * w)
                .zip(out.chunks_exact_mut(c_out * ho * wo))
            {
                // Channels 2r and 2r + 1 zipped into row r of the zero-padded image; every word
                // written (data or padding), so the buffer is not zeroed first.
                let plane = h * w;
                bx.reset_padding(c_in, cols)
                    .par_chunks_mut(cols)
                    .take(c_in.div_ceil(2))
                    .enumerate()
                    .for_each(|(r, row)| {
                        let lo = &img[2 * r * plane..][..plane];
                        let hi = img.get((2 * r + 1) * plane..(2 * r + 2) * plane);
                        row[..p * wp + p].fill(0);
                        for y in 0..h {
                            let start = (y + p) * wp + p;
                            let hi = hi.map(|hi| &hi[y * w..][..w]);
                            amx::pair_rows(&lo[y * w..][..w], hi, &mut row[start..][..w]);
                            // The right padding, the next row's left padding (or the rest).
                            let next = if y + 1 < h { start + wp } else { cols };
                            row[start + w..next].fill(0);
                        }
                    });
                amx::conv_matmul(&self.w, bx, n, &offsets, c);
                // Row o of the product is output plane o on the padded width: drop the padding
                // columns, add the bias.
                let c = &c[..];
                dst.par_chunks_mut(ho * wo)
                    .enumerate()
                    .for_each(|(o, plane)| {
                        let bias = self.bias.as_ref().map_or(0.0, |b| b[o]);
                        for y in 0..ho {
                            let src = &c[o * np + y * wp..][..wo];
                            for (d, &v) in plane[y * wo..][..wo].iter_mut().zip(src) {
                                *d = v + bias;
                            }
                        }
                    });
            }
        }
        IMAGE.set(bufs);
        Ok((out, Shape::from((b, c_out, ho, wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn rounded(t: &Tensor) -> Result<Tensor> {
        t.to_dtype(DType::BF16)?.to_dtype(DType::F64)
    }

    /// Against candle's f64 linear and conv of the bf16-rounded inputs (odd sizes, tails,
    /// 1×1 and 3×3 kernels, batch 2): max error relative to the largest output ≤ 1e-5.
    #[test]
    fn layers_match_f64_on_rounded_inputs() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, k, n) in [(vec![2, 13], 13, 7), (vec![2, 77, 40], 40, 130)] {
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?;
            let w = Tensor::randn(0f32, 0.3, (n, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, n, &dev)?;
            let got = Bf16Linear::new(&w, Some(&bias))?.forward(&x)?;
            let want = rounded(&x)?
                .broadcast_matmul(&rounded(&w)?.t()?)?
                .broadcast_add(&bias.to_dtype(DType::F64)?)?;
            check(&got, &want, &format!("linear {shape:?}·[{n},{k}]"))?;
        }
        for (b, c_in, c_out, h, w, k, p) in [
            (1, 4, 33, 9, 7, 3, 1),
            (2, 40, 17, 5, 6, 3, 1),
            (1, 35, 64, 8, 8, 1, 0),
            (1, 3, 5, 6, 6, 3, 0),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 0.2, (c_out, c_in, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, c_out, &dev)?;
            let got = Bf16Conv::new(&wt, Some(&bias), p)?.forward(&x)?;
            let want = rounded(&x)?
                .conv2d(&rounded(&wt)?, p, 1, 1, 1)?
                .broadcast_add(&bias.to_dtype(DType::F64)?.reshape((1, c_out, 1, 1))?)?;
            check(
                &got,
                &want,
                &format!("conv {c_in}→{c_out} {k}×{k} @ {h}×{w}"),
            )?;
        }
        Ok(())
    }

    fn check(got: &Tensor, want: &Tensor, what: &str) -> Result<()> {
        assert_eq!(got.dims(), want.dims(), "{what}");
        let err = (got.to_dtype(DType::F64)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err / scale <= 1e-5, "{what}: {err} of {scale}");
        Ok(())
    }
}
