//! Fused scaled-dot-product attention for CPU inference.
//!
//! The plain path (q·kᵀ → scale → softmax → ·v) writes the whole score matrix: at SD1.5's 64×64
//! latent that is 8 heads × 4096² floats = 537 MB per attention, written and read four times. Here
//! each (head, block of queries) computes its scores into a small cache-resident buffer, applies a
//! vectorisable softmax in place and multiplies by v, so memory stays O(block × keys) and the exp
//! runs at SIMD speed. Forward only: training takes the differentiable path in [`crate::nn`].

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query rows per work item: 32 rows × 4096 keys × 4 B = 512 KB of scores, about one L2.
const BLOCK: usize = 128;

struct FusedAttention {
    scale: f32,
}

/// `softmax(q·kᵀ·scale)·v` for contiguous f32 CPU tensors `[bh, nq, d]`, `[bh, nk, d]`, `[bh, nk, dv]`.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3_no_bwd(&k, &v, &FusedAttention { scale })
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bh, nq, d) = l1.shape().dims3()?;
        let (bh_k, nk, d_k) = l2.shape().dims3()?;
        let (bh_v, nk_v, dv) = l3.shape().dims3()?;
        if bh != bh_k || bh != bh_v || d != d_k || nk != nk_v {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?}, v {:?} do not fit",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
            match s {
                CpuStorage::F32(v) => match l.contiguous_offsets() {
                    Some((a, b)) => Ok(&v[a..b]),
                    None => candle_core::bail!("fused attention needs contiguous inputs"),
                },
                _ => candle_core::bail!("fused attention supports f32 only"),
            }
        }
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let mut out = vec![0f32; bh * nq * dv];
        let scale = self.scale;
        out.par_chunks_mut(nq * dv)
            .enumerate()
            .for_each(|(h, out_h)| {
                let q_h = &q[h * nq * d..(h + 1) * nq * d];
                let k_h = &k[h * nk * d..(h + 1) * nk * d];
                let v_h = &v[h * nk * dv..(h + 1) * nk * dv];
                out_h
                    .par_chunks_mut(BLOCK * dv)
                    .enumerate()
                    .for_each(|(blk, out_b)| {
                        let rows = out_b.len() / dv;
                        let q_b = &q_h[blk * BLOCK * d..(blk * BLOCK + rows) * d];
                        attend_block(q_b, k_h, v_h, out_b, rows, nk, d, dv, scale);
                    });
            });
        Ok((CpuStorage::F32(out), Shape::from((bh, nq, dv))))
    }
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[allow(clippy::too_many_arguments)]
fn attend_block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    rows: usize,
    nk: usize,
    d: usize,
    dv: usize,
    scale: f32,
) {
    SCORES.with(|buf| {
        let mut s = buf.borrow_mut();
        s.resize(rows * nk, 0.0);
        // SAFETY: every pointer/stride pair below addresses a slice of exactly the stated
        // rows × columns: q_b (rows × d), kᵀ (d × nk, read from k's nk × d rows), s (rows × nk),
        // v (nk × dv) and out (rows × dv).
        unsafe {
            gemm::gemm(
                rows,
                nk,
                d,
                s.as_mut_ptr(),
                1,
                nk as isize,
                false,
                q.as_ptr(),
                1,
                d as isize,
                k.as_ptr(),
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        let mut sums = vec![0f32; rows];
        for (row, sum) in s.chunks_mut(nk).zip(sums.iter_mut()) {
            *sum = softmax_numerator(row, scale);
        }
        unsafe {
            gemm::gemm(
                rows,
                dv,
                nk,
                out.as_mut_ptr(),
                1,
                dv as isize,
                false,
                s.as_ptr(),
                1,
                nk as isize,
                v.as_ptr(),
                1,
                dv as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (o, sum) in out.chunks_mut(dv).zip(&sums) {
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|x| *x *= inv);
        }
    })
}

/// Replace `row` by exp(scale·(x − max)) and return its sum.
fn softmax_numerator(row: &mut [f32], scale: f32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let shift = max * scale;
    row.iter_mut().for_each(|x| *x = exp(*x * scale - shift));
    // Eight partial sums so the reduction vectorises.
    let mut acc = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// exp(x) for x ≤ 0 to ~1 ulp: x = n·ln2 + r with |r| ≤ ln2/2, a degree-6 polynomial for e^r
/// (Cephes' expf coefficients), then scale by 2^n through the exponent bits. Branch-free so the
/// loop above compiles to SIMD.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E).round();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p.mul_add(r, 1.398_2e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_is_accurate() {
        for i in 0..10000 {
            let x = -87.0 + 87.0 * i as f32 / 9999.0;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            assert!(rel < 4e-7, "exp({x}) rel err {rel}");
        }
    }

    #[test]
    fn matches_unfused_attention() -> Result<()> {
        let dev = Device::Cpu;
        for (bh, nq, nk, d, dv) in [(3, 70, 77, 8, 8), (2, 33, 33, 40, 40), (1, 5, 200, 16, 4)] {
            let q = Tensor::randn(0f32, 1.0, (bh, nq, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (bh, nk, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (bh, nk, dv), &dev)?;
            let scale = 1.0 / (d as f32).sqrt();
            let fused = fused_attention(&q, &k, &v, scale)?;
            let scores = (q.matmul(&k.t()?)? * scale as f64)?;
            let plain = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
            let diff = (fused - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "fused vs plain attention differ by {diff}");
        }
        Ok(())
    }
}
