//! 2-D convolution for CPU inference without im2col.
//!
//! A stride-1 k×k convolution is a sum over the k² kernel taps of (C_out × C_in) · (C_in × pixels)
//! products. Computing the output on the zero-padded input's row width makes every tap's input a
//! plain strided matrix (an offset into the padded image), so each tap is one large gemm that
//! accumulates into the output: no 9×-sized im2col buffer, and gemm runs at full speed. The
//! padding columns of the output are dropped when the bias is added. Forward only; training
//! uses candle's differentiable conv2d.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct ShiftedGemmConv {
    padding: usize,
}

/// `x` `[b, c_in, h, w]` ⊛ `w` `[c_out, c_in, kh, kw]`, stride 1, zero padding `padding`, f32 CPU.
pub fn conv2d_stride1(x: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    x.apply_op2_no_bwd(&w, &ShiftedGemmConv { padding })
}

impl CustomOp2 for ShiftedGemmConv {
    fn name(&self) -> &'static str {
        "shifted-gemm-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c_in, h, w) = l1.shape().dims4()?;
        let (c_out, c_in_k, kh, kw) = l2.shape().dims4()?;
        let p = self.padding;
        if c_in != c_in_k || h + 2 * p < kh || w + 2 * p < kw {
            candle_core::bail!(
                "conv2d: input {:?} and kernel {:?} do not fit",
                l1.shape(),
                l2.shape()
            )
        }
        let (x, k) = match (s1, s2, l1.contiguous_offsets(), l2.contiguous_offsets()) {
            (CpuStorage::F32(x), CpuStorage::F32(k), Some((a, b_)), Some((c, d))) => {
                (&x[a..b_], &k[c..d])
            }
            _ => candle_core::bail!("conv2d fast path needs contiguous f32 inputs"),
        };
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        let (ho, wo) = (hp - kh + 1, wp - kw + 1);
        let n = ho * wp;
        let mut out = vec![0f32; b * c_out * ho * wo];
        // Padded image plus slack: the dropped output columns of the last rows read past the end.
        let mut xp = vec![0f32; c_in * hp * wp + kw];
        let mut acc = vec![0f32; c_out * n];
        for bi in 0..b {
            let xb = &x[bi * c_in * h * w..(bi + 1) * c_in * h * w];
            for c in 0..c_in {
                for y in 0..h {
                    let src = &xb[(c * h + y) * w..(c * h + y + 1) * w];
                    let dst = (c * hp + y + p) * wp + p;
                    xp[dst..dst + w].copy_from_slice(src);
                }
            }
            for dy in 0..kh {
                for dx in 0..kw {
                    let tap = dy * kw + dx;
                    // SAFETY: lhs reads k[o·c_in·kh·kw + c·kh·kw + tap] for o < c_out, c < c_in;
                    // rhs reads xp[c·hp·wp + j + dy·wp + dx] for j < ho·wp, which is below
                    // c_in·hp·wp + kw (the slack); dst is c_out × n.
                    unsafe {
                        gemm::gemm(
                            c_out,
                            n,
                            c_in,
                            acc.as_mut_ptr(),
                            1,
                            n as isize,
                            tap > 0,
                            k.as_ptr().add(tap),
                            (kh * kw) as isize,
                            (c_in * kh * kw) as isize,
                            xp.as_ptr().add(dy * wp + dx),
                            1,
                            (hp * wp) as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::Rayon(0),
                        );
                    }
                }
            }
            let ob = &mut out[bi * c_out * ho * wo..(bi + 1) * c_out * ho * wo];
            for o in 0..c_out {
                for y in 0..ho {
                    let src = &acc[o * n + y * wp..o * n + y * wp + wo];
                    ob[(o * ho + y) * wo..(o * ho + y + 1) * wo].copy_from_slice(src);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, ho, wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for (b, ci, co, h, w, k, p) in [
            (2, 3, 5, 7, 9, 3, 1),
            (1, 4, 4, 8, 8, 3, 0),
            (1, 2, 3, 5, 6, 1, 0),
            (1, 3, 2, 6, 5, 5, 2),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (co, ci, k, k), &dev)?;
            let ours = conv2d_stride1(&x, &wt, p)?;
            let reference = x.conv2d(&wt, p, 1, 1, 1)?;
            assert_eq!(ours.dims(), reference.dims());
            let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "conv differs by {diff}");
        }
        Ok(())
    }
}
