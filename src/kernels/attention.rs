//! Fused scaled-dot-product attention for CPU inference.
//!
//! The plain path (q·kᵀ → scale → softmax → ·v) writes the whole score matrix: at SD1.5's 64×64
//! latent that is 8 heads × 4096² floats = 537 MB per attention, written and read four times. Here
//! each (head, block of queries) computes its scores into a small cache-resident buffer, applies a
//! vectorisable softmax in place and multiplies by v, so memory stays O(block × keys) and the exp
//! runs at SIMD speed. The backward recomputes the scores block by block from q, k and the saved
//! output (as FlashAttention does), so training keeps O(n·d) per attention instead of the
//! composite path's n² score, exp, sum and probability tensors (≈ 800 MB for the tiny test U-Net
//! at batch 8, most of its graph).

use candle_core::{Result, Shape, Tensor};

use super::amx::{self, pad, PackedA, PackedCols};
use super::{apply, matmul, Grads, Input, Kernel};
use rayon::prelude::*;

/// Query rows per work item: 32 rows × 4096 keys × 4 B = 512 KB of scores, about one L2.
const BLOCK: usize = 128;

struct FusedAttention {
    scale: f32,
}

/// `softmax(q·kᵀ·scale)·v` for contiguous f32 CPU tensors `[bh, nq, d]`, `[bh, nk, d]`, `[bh, nk, dv]`.
/// Differentiable when any input is tracked.
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    apply(FusedAttention { scale }, &[q, k, v])
}

/// (batch·heads, queries, keys, head dim, value dim) of q `[bh, nq, d]`, k `[bh, nk, d]`,
/// v `[bh, nk, dv]`, or an error naming the kernel when they do not fit together.
fn sizes(
    name: &str,
    q: &Input,
    k: &Input,
    v: &Input,
) -> Result<(usize, usize, usize, usize, usize)> {
    let (bh, nq, d) = q.shape.dims3()?;
    let (bh_k, nk, d_k) = k.shape.dims3()?;
    let (bh_v, nk_v, dv) = v.shape.dims3()?;
    if bh != bh_k || bh != bh_v || d != d_k || nk != nk_v {
        candle_core::bail!(
            "{name}: q {:?}, k {:?}, v {:?} do not fit",
            q.shape,
            k.shape,
            v.shape
        )
    }
    Ok((bh, nq, nk, d, dv))
}

/// Attention's work split: `[bh, nq, dv]` outputs, heads and blocks of `block` query rows over
/// rayon. `head(k_h, v_h)` prepares a head once (e.g. packs it); `run(&prepared, q_b, out_b)`
/// computes one block of `out_b.len() / dv` query rows.
fn per_block<'a, H: Sync>(
    (q, k, v): (&'a [f32], &'a [f32], &'a [f32]),
    (bh, nq, nk, d, dv): (usize, usize, usize, usize, usize),
    block: usize,
    head: impl Fn(&'a [f32], &'a [f32]) -> H + Sync,
    run: impl Fn(&H, &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; bh * nq * dv];
    out.par_chunks_mut(nq * dv)
        .enumerate()
        .for_each(|(h, out_h)| {
            let q_h = &q[h * nq * d..(h + 1) * nq * d];
            let prepared = head(
                &k[h * nk * d..(h + 1) * nk * d],
                &v[h * nk * dv..(h + 1) * nk * dv],
            );
            out_h
                .par_chunks_mut(block * dv)
                .enumerate()
                .for_each(|(blk, out_b)| {
                    let rows = out_b.len() / dv;
                    run(
                        &prepared,
                        &q_h[blk * block * d..(blk * block + rows) * d],
                        out_b,
                    );
                });
        });
    out
}

impl Kernel for FusedAttention {
    const NAME: &'static str = "fused-attention";

    fn forward(&self, inputs: &[Input]) -> Result<(Vec<f32>, Shape)> {
        let [q, k, v] = super::arity(Self::NAME, inputs)?;
        let (bh, nq, nk, d, dv) = sizes(Self::NAME, q, k, v)?;
        let scale = self.scale;
        let out = per_block(
            (q.data, k.data, v.data),
            (bh, nq, nk, d, dv),
            BLOCK,
            |k_h, v_h| (k_h, v_h),
            |&(k_h, v_h), q_b, out_b| {
                let rows = out_b.len() / dv;
                attend_block(q_b, k_h, v_h, out_b, rows, nk, d, dv, scale);
            },
        );
        Ok((out, Shape::from((bh, nq, dv))))
    }

    fn backward(&self, i: &[&Tensor], _out: &Tensor, grad_out: &Tensor) -> Grads {
        let [q, k, v] = super::arity(Self::NAME, i)?;
        let (bh, nq, d) = q.dims3()?;
        let (_, nk, dv) = v.dims3()?;
        let flat = |t: &Tensor| t.contiguous()?.flatten_all()?.to_vec1::<f32>();
        let (qs, ks, vs, gs) = (flat(q)?, flat(k)?, flat(v)?, flat(grad_out)?);
        let mut dq = vec![0f32; bh * nq * d];
        let mut dk = vec![0f32; bh * nk * d];
        let mut dvs = vec![0f32; bh * nk * dv];
        let scale = self.scale;
        dq.par_chunks_mut(nq * d)
            .zip(dk.par_chunks_mut(nk * d))
            .zip(dvs.par_chunks_mut(nk * dv))
            .enumerate()
            .for_each(|(h, ((dq_h, dk_h), dv_h))| {
                let heads = HeadGrads {
                    q: &qs[h * nq * d..(h + 1) * nq * d],
                    k: &ks[h * nk * d..(h + 1) * nk * d],
                    v: &vs[h * nk * dv..(h + 1) * nk * dv],
                    g: &gs[h * nq * dv..(h + 1) * nq * dv],
                    nq,
                    nk,
                    d,
                    dv,
                    scale,
                };
                heads.run(dq_h, dk_h, dv_h);
            });
        let dev = q.device();
        Ok(vec![
            Some(Tensor::from_vec(dq, (bh, nq, d), dev)?),
            Some(Tensor::from_vec(dk, (bh, nk, d), dev)?),
            Some(Tensor::from_vec(dvs, (bh, nk, dv), dev)?),
        ])
    }
}

/// One head's attention backward. With P = softmax(scale·q·kᵀ) and the upstream gradient g of
/// o = P·v: dv = Pᵀg, dP = g·vᵀ, dS = P∘(dP − rowsum(P∘dP)), dq = scale·dS·k, dk = scale·dSᵀq.
/// Query rows are taken BLOCK at a time so the scratch stays BLOCK × nk.
struct HeadGrads<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    g: &'a [f32],
    nq: usize,
    nk: usize,
    d: usize,
    dv: usize,
    scale: f32,
}

impl HeadGrads<'_> {
    fn run(&self, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let (nk, d, dvd) = (self.nk, self.d, self.dv);
        let mut p = vec![0f32; BLOCK.min(self.nq) * nk];
        let mut dp = vec![0f32; BLOCK.min(self.nq) * nk];
        for start in (0..self.nq).step_by(BLOCK) {
            let rows = BLOCK.min(self.nq - start);
            let q_b = &self.q[start * d..(start + rows) * d];
            let g_b = &self.g[start * dvd..(start + rows) * dvd];
            let (p, dp) = (&mut p[..rows * nk], &mut dp[..rows * nk]);
            // P: scores, then the softmax in place.
            matmul(
                (rows, nk, d),
                p,
                (nk, 1),
                false,
                q_b,
                (d, 1),
                self.k,
                (1, d),
                1.0,
                false,
            );
            for row in p.chunks_mut(nk) {
                let inv = 1.0 / softmax_numerator(row, self.scale);
                row.iter_mut().for_each(|x| *x *= inv);
            }
            // dv += Pᵀ·g
            matmul(
                (nk, dvd, rows),
                dv,
                (dvd, 1),
                true,
                p,
                (1, nk),
                g_b,
                (dvd, 1),
                1.0,
                false,
            );
            // dP = g·vᵀ, then dS in place.
            matmul(
                (rows, nk, dvd),
                dp,
                (nk, 1),
                false,
                g_b,
                (dvd, 1),
                self.v,
                (1, dvd),
                1.0,
                false,
            );
            for (prow, dprow) in p.chunks(nk).zip(dp.chunks_mut(nk)) {
                let dot: f32 = prow.iter().zip(dprow.iter()).map(|(a, b)| a * b).sum();
                for (x, &pv) in dprow.iter_mut().zip(prow) {
                    *x = pv * (*x - dot);
                }
            }
            let dq_b = &mut dq[start * d..(start + rows) * d];
            matmul(
                (rows, d, nk),
                dq_b,
                (d, 1),
                false,
                dp,
                (nk, 1),
                self.k,
                (d, 1),
                self.scale,
                false,
            );
            matmul(
                (nk, d, rows),
                dk,
                (d, 1),
                true,
                dp,
                (1, nk),
                q_b,
                (d, 1),
                self.scale,
                false,
            );
        }
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
        // Scores s = q_b·kᵀ (kᵀ read from k's nk × d rows).
        matmul(
            (rows, nk, d),
            &mut s[..],
            (nk, 1),
            false,
            q,
            (d, 1),
            k,
            (1, d),
            1.0,
            false,
        );
        let mut sums = vec![0f32; rows];
        for (row, sum) in s.chunks_mut(nk).zip(sums.iter_mut()) {
            *sum = softmax_numerator(row, scale);
        }
        matmul(
            (rows, dv, nk),
            out,
            (dv, 1),
            false,
            &s[..],
            (nk, 1),
            v,
            (dv, 1),
            1.0,
            false,
        );
        for (o, sum) in out.chunks_mut(dv).zip(&sums) {
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|x| *x *= inv);
        }
    })
}

/// `softmax(q·kᵀ·scale)·v` with both products on bf16 tiles ([`super::amx`]): q, k, the
/// softmax's numerators and v rounded to bf16, sums, maxima and the softmax in f32. For networks
/// run in bf16 on the CPU (inference only). Shapes as [`fused_attention`]'s.
pub fn fused_attention_bf16(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let t = |x: &Tensor| x.contiguous();
    super::apply_no_bwd(&Bf16Attention { scale }, &[&t(q)?, &t(k)?, &t(v)?])
}

struct Bf16Attention {
    scale: f32,
}

/// Query rows per work item of the bf16 attention: one row of tiles, so its scores (32 × 4096
/// f32 at SD1.5's 64² level, 512 KB) and their bf16 numerators stay in L2 between the products
/// and the softmax. With 128 rows (the f32 kernel's block) they spilled to memory and the
/// softmax pass ran at memory speed.
const BF16_BLOCK_ROWS: usize = 32;

thread_local! {
    /// A query block's packed q, its scores, their bf16 numerators and the block's output.
    static BF16_BLOCK: std::cell::RefCell<(PackedA, Vec<f32>, PackedA, Vec<f32>)> =
        const { std::cell::RefCell::new((PackedA::new(), Vec::new(), PackedA::new(), Vec::new())) };
}

impl Kernel for Bf16Attention {
    const NAME: &'static str = "bf16-attention";

    fn forward(&self, inputs: &[Input]) -> Result<(Vec<f32>, Shape)> {
        let [q, k, v] = super::arity(Self::NAME, inputs)?;
        let (bh, nq, nk, d, dv) = sizes(Self::NAME, q, k, v)?;
        let scale = self.scale;
        let out = per_block(
            (q.data, k.data, v.data),
            (bh, nq, nk, d, dv),
            BF16_BLOCK_ROWS,
            |k_h, v_h| {
                // kᵀ (d × nk) and v (nk × dv) as k-pairs, once per head.
                let mut kt = PackedCols::new();
                let words = kt.reset(d, pad(nk));
                for (r, row) in words
                    .chunks_exact_mut(pad(nk))
                    .take(d.div_ceil(2))
                    .enumerate()
                {
                    for (j, w) in row[..nk].iter_mut().enumerate() {
                        let key = &k_h[j * d..][..d];
                        *w = amx::pair(key[2 * r], key.get(2 * r + 1).copied().unwrap_or(0.0));
                    }
                }
                let mut vp = PackedCols::new();
                let words = vp.reset(nk, pad(dv));
                for (r, row) in words
                    .chunks_exact_mut(pad(dv))
                    .take(nk.div_ceil(2))
                    .enumerate()
                {
                    let lo = &v_h[2 * r * dv..][..dv];
                    let hi = v_h.get((2 * r + 1) * dv..(2 * r + 2) * dv);
                    amx::pair_rows(lo, hi, &mut row[..dv]);
                }
                (kt, vp)
            },
            |(kt, vp), q_b, out_b| {
                let rows = out_b.len() / dv;
                // Taken out of the thread's slot (not borrowed) while in use: a task rayon runs on
                // this thread meanwhile finds it empty and allocates, rather than panicking.
                let mut bufs = BF16_BLOCK.take();
                {
                    let (qa, s, pa, o) = &mut bufs;
                    let qw = qa.reset_padding(rows, d);
                    for (src, dst) in q_b.chunks_exact(d).zip(qw.chunks_exact_mut(pad(d))) {
                        amx::convert(src, &mut dst[..d]);
                    }
                    amx::matmul_cols(qa, kt, nk, s, false);
                    // Every numerator is written below: only the padding is zeroed.
                    let pw = pa.reset_padding(rows, nk);
                    let mut sums = [0f32; BF16_BLOCK_ROWS];
                    for ((row, p), sum) in s
                        .chunks_exact(pad(nk))
                        .zip(pw.chunks_exact_mut(pad(nk)))
                        .zip(sums.iter_mut())
                    {
                        *sum = softmax_numerator_bf16(&row[..nk], scale, &mut p[..nk]);
                    }
                    amx::matmul_cols(pa, vp, dv, o, false);
                    for ((dst, src), sum) in out_b
                        .chunks_exact_mut(dv)
                        .zip(o.chunks_exact(pad(dv)))
                        .zip(&sums)
                    {
                        let inv = 1.0 / sum;
                        for (d, x) in dst.iter_mut().zip(src) {
                            *d = x * inv;
                        }
                    }
                }
                BF16_BLOCK.set(bufs);
            },
        );
        Ok((out, Shape::from((bh, nq, dv))))
    }
}

// Replace `row` by exp(scale·(x − max)) and return its sum.
super::avx512_dispatch!(fn softmax_numerator(row: &mut [f32], scale: f32) -> f32 => softmax_numerator_body);

/// The largest element, from sixteen partial maxima (vectorises at any width).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&m)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    max
}

#[inline(always)]
fn softmax_numerator_body(row: &mut [f32], scale: f32) -> f32 {
    // Sixteen partial sums (and maxima, in `row_max`) so the reductions vectorise at any width.
    let max = row_max(row);
    let shift = max * scale;
    row.iter_mut().for_each(|x| *x = exp(*x * scale - shift));
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// exp(scale·(x − max)) of `row` into `out` as bf16, in one pass; returns the f32 sum. On CPUs
/// with AVX512-BF16 (every AMX CPU) a kernel of its own, else the portable loop below.
fn softmax_numerator_bf16(row: &[f32], scale: f32, out: &mut [u16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::features().avx512_bf16 {
        // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked at run time).
        return unsafe { numerators_avx512_bf16(row, scale, out) };
    }
    softmax_numerator_bf16_generic(row, scale, out)
}

super::avx512_dispatch!(fn softmax_numerator_bf16_generic(row: &[f32], scale: f32, out: &mut [u16]) -> f32 => softmax_numerator_bf16_body);

/// 2^f on [-½, ½] to 3.1e-6 relative: a degree-4 least-squares fit on Chebyshev nodes (2^0 = 1
/// held exact). Ample for numerators that are rounded to bf16 (2⁻⁹) next.
const EXP2_POLY: [f32; 4] = [0.693_122, 0.240_237_19, 0.055_916_894, 0.009_600_396];

/// The numerators in base 2 — y = (x − max)·scale·log2 e by one FMA, n = round(y),
/// 2^(y − n) by [`EXP2_POLY`], scaled by 2^n with `vscalefps` — and rounded to bf16 by
/// `vcvtneps2bf16` (round to nearest even, as [`amx::to_bf16`]): about half the operations of
/// [`exp`] plus the integer rounding, whose pass was 14 % of a bf16 SD1.5 U-Net step.
/// y is clamped at −126 (2⁻¹²⁶: far below what a bf16 sum can see).
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn numerators_avx512_bf16(row: &[f32], scale: f32, out: &mut [u16]) -> f32 {
    use std::arch::x86_64::*;
    assert!(out.len() >= row.len(), "one numerator per score");
    let max = row_max(row);
    let k = scale * std::f32::consts::LOG2_E;
    let (vk, vb) = (_mm512_set1_ps(k), _mm512_set1_ps(-max * k));
    let lo = _mm512_set1_ps(-126.0);
    let c = EXP2_POLY.map(|c| _mm512_set1_ps(c));
    let one = _mm512_set1_ps(1.0);
    let mut acc = _mm512_setzero_ps();
    let n = row.len();
    let mut i = 0;
    while i < n {
        let left = n - i;
        // A full vector, or the tail under a mask (masked-off lanes are neither read nor written).
        let mask: __mmask16 = if left >= 16 {
            0xffff
        } else {
            (1u16 << left) - 1
        };
        let x = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(i));
        let y = _mm512_max_ps(_mm512_fmadd_ps(x, vk, vb), lo);
        let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
        let f = _mm512_sub_ps(y, r);
        let mut p = c[3];
        p = _mm512_fmadd_ps(p, f, c[2]);
        p = _mm512_fmadd_ps(p, f, c[1]);
        p = _mm512_fmadd_ps(p, f, c[0]);
        p = _mm512_fmadd_ps(p, f, one);
        let e = _mm512_maskz_mov_ps(mask, _mm512_scalef_ps(p, r));
        acc = _mm512_add_ps(acc, e);
        let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
        _mm256_mask_storeu_epi16(out.as_mut_ptr().add(i).cast(), mask, b);
        i += 16;
    }
    _mm512_reduce_add_ps(acc)
}

#[inline(always)]
fn softmax_numerator_bf16_body(row: &[f32], scale: f32, out: &mut [u16]) -> f32 {
    let max = row_max(row);
    let shift = max * scale;
    let mut acc = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    let mut outs = out.chunks_exact_mut(16);
    for (c, o) in (&mut chunks).zip(&mut outs) {
        for i in 0..16 {
            let e = exp(c[i] * scale - shift);
            acc[i] += e;
            o[i] = amx::to_bf16(e);
        }
    }
    let mut tail = 0f32;
    for (x, o) in chunks.remainder().iter().zip(outs.into_remainder()) {
        let e = exp(x * scale - shift);
        tail += e;
        *o = amx::to_bf16(e);
    }
    acc.iter().sum::<f32>() + tail
}

/// exp(x) for x ≤ 0 to ~1 ulp: x = n·ln2 + r with |r| ≤ ln2/2, a degree-6 polynomial for e^r
/// (Cephes' expf coefficients), then scale by 2^n through the exponent bits. Branch-free and
/// without a float→int cast (Rust's saturating `as i32` compiles to scalar code per lane, which
/// kept this loop from vectorising: 12 % of an SD1.5 U-Net step measured): adding 1.5·2²³ rounds
/// x·log2(e) to an integer held in the low mantissa bits, which shift straight into the exponent.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const SHIFTER: f32 = 12_582_912.0; // 1.5 · 2²³
    let x = x.clamp(-87.0, 88.0);
    let t = x.mul_add(LOG2E, SHIFTER);
    let n = t - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p.mul_add(r, 1.398_2e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
    // t's low bits are n (two's complement, |n| ≤ 127): shifted into the exponent field, plus
    // the bias, that is 2^n.
    let two_n = f32::from_bits((t.to_bits() << 23).wrapping_add(127 << 23));
    e * two_n
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The bf16 attention against f64 attention of the bf16-rounded q, k, v. Beyond those, its
    /// one rounding is the softmax numerators' (relative 2⁻⁹ each), which moves an output by at
    /// most 2⁻⁹·max|v|: the bound, over odd sizes (K = 40 heads, key counts off the tile size).
    /// Runs the tiles where the CPU has AMX, the portable loop elsewhere (printed).
    #[test]
    fn bf16_attention_is_within_the_numerators_rounding() -> Result<()> {
        println!(
            "bf16 attention path: {}",
            crate::kernels::cpu::path(candle_core::DType::BF16)
        );
        let dev = Device::Cpu;
        for (bh, nq, nk, d, dv) in [(2, 130, 77, 40, 40), (1, 5, 300, 8, 24), (3, 33, 1, 64, 17)] {
            let round = |t: Tensor| {
                t.to_dtype(candle_core::DType::BF16)?
                    .to_dtype(candle_core::DType::F32)
            };
            let q = round(Tensor::randn(0f32, 1.0, (bh, nq, d), &dev)?)?;
            let k = round(Tensor::randn(0f32, 1.0, (bh, nk, d), &dev)?)?;
            let v = round(Tensor::randn(0f32, 1.0, (bh, nk, dv), &dev)?)?;
            let scale = 1.0 / (d as f32).sqrt();
            let got = fused_attention_bf16(&q, &k, &v, scale)?;
            let f64s = |t: &Tensor| t.to_dtype(candle_core::DType::F64);
            let scores = (f64s(&q)?.matmul(&f64s(&k)?.t()?)? * scale as f64)?;
            let e = scores.broadcast_sub(&scores.max_keepdim(2)?)?.exp()?;
            let want = e.broadcast_div(&e.sum_keepdim(2)?)?.matmul(&f64s(&v)?)?;
            let err = (f64s(&got)? - &want)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?;
            let vmax = v.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            let bound = vmax / 512.0 * 1.01 + 1e-5;
            assert!(err <= bound, "{bh}×{nq}×{nk}×{d}×{dv}: {err} > {bound}");
        }
        Ok(())
    }

    #[test]
    fn exp_is_accurate() {
        // Over the whole clamped range, including the positive side and exact multiples of ln 2.
        for i in 0..20000 {
            let x = -87.0 + 175.0 * i as f32 / 19999.0;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            assert!(rel < 4e-7, "exp({x}) rel err {rel}");
        }
    }

    /// The bf16 numerators — the AVX512-BF16 kernel where the CPU has it, the portable loop —
    /// against f64: each within bf16's rounding (2⁻⁸ relative, plus the polynomial's 3.1e-6),
    /// the f32 sum within 1e-5, over tails of every length and a range of scores that reaches
    /// exp's clamp.
    #[test]
    fn bf16_numerators_match_f64() {
        type Path = (&'static str, fn(&[f32], f32, &mut [u16]) -> f32);
        let mut paths: Vec<Path> = vec![("portable", softmax_numerator_bf16_generic)];
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu::features().avx512_bf16 {
            paths.push(("AVX512-BF16", softmax_numerator_bf16));
        } else {
            println!("AVX512-BF16 numerators not tested: this CPU lacks avx512_bf16");
        }
        for (name, f) in paths {
            for n in (1..=33).chain([77, 4096, 4097]) {
                for spread in [0.37f32, 40.0] {
                    let x: Vec<f32> = (0..n)
                        .map(|i| ((i * 37 % 101) as f32 - 50.0) * spread)
                        .collect();
                    let scale = 0.158;
                    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let want: Vec<f64> = x
                        .iter()
                        .map(|&v| ((v as f64 - max) * scale as f64).exp())
                        .collect();
                    // One guard element past the row: never written.
                    let mut out = vec![0xdeadu16; n + 1];
                    let sum = f(&x, scale, &mut out[..n]) as f64;
                    let total: f64 = want.iter().sum();
                    assert!(((sum - total) / total).abs() < 1e-5, "{name} n={n} sum");
                    assert_eq!(out[n], 0xdead, "{name} n={n}: wrote past the row");
                    for (&g, w) in out.iter().zip(&want) {
                        let g = amx::from_bf16(g) as f64;
                        let tol = w * (1.0 / 256.0 + 4e-6) + 1e-37;
                        assert!((g - w).abs() <= tol, "{name} n={n}: {g} vs {w}");
                    }
                }
            }
        }
    }

    /// Both compiled paths of the softmax numerator against f64, over lengths that are not
    /// multiples of the vector width.
    #[test]
    fn softmax_numerator_paths_match_f64() {
        type Path = (&'static str, fn(&mut [f32], f32) -> f32);
        let mut paths: Vec<Path> = vec![("generic", softmax_numerator_body)];
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu::avx512() {
            paths.push(("dispatched (AVX-512)", softmax_numerator));
        } else {
            println!("AVX-512 path not tested: this CPU lacks avx512f");
        }
        for (name, f) in paths {
            for n in [1, 7, 15, 16, 17, 40, 77, 4097] {
                let x: Vec<f32> = (0..n)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37)
                    .collect();
                let scale = 0.158;
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let want: Vec<f64> = x
                    .iter()
                    .map(|&v| (v as f64 * scale as f64 - max * scale as f64).exp())
                    .collect();
                let mut row = x.clone();
                let sum = f(&mut row, scale);
                let total: f64 = want.iter().sum();
                assert!(
                    ((sum as f64 - total) / total).abs() < 1e-5,
                    "{name} n={n} sum"
                );
                for (g, w) in row.iter().zip(&want) {
                    assert!(
                        ((*g as f64 - w) / w).abs() < 1e-5,
                        "{name} n={n}: {g} vs {w}"
                    );
                }
            }
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
            let diff = crate::kernels::max_abs_diff(&fused, &plain)?;
            assert!(diff < 1e-5, "fused vs plain attention differ by {diff}");
        }
        Ok(())
    }

    #[test]
    fn gradients_match_composite_attention() -> Result<()> {
        let dev = Device::Cpu;
        // nq > BLOCK exercises the blocked backward; nk ≠ nq and dv ≠ d catch transposed strides.
        for (bh, nq, nk, d, dv) in [(2, 300, 77, 8, 6), (3, 16, 40, 5, 9)] {
            let q = candle_core::Var::randn(0f32, 1.0, (bh, nq, d), &dev)?;
            let k = candle_core::Var::randn(0f32, 1.0, (bh, nk, d), &dev)?;
            let v = candle_core::Var::randn(0f32, 1.0, (bh, nk, dv), &dev)?;
            let scale = 1.0 / (d as f32).sqrt();
            let fused = fused_attention(&q, &k, &v, scale)?;
            let scores = (q.matmul(&k.t()?)? * scale as f64)?;
            let plain = candle_nn::ops::softmax(&scores, 2)?.matmul(&v)?;
            let vars = [("q", &q), ("k", &k), ("v", &v)];
            for (name, diff, mag) in crate::kernels::grad_diffs(&vars, fused, plain)? {
                assert!(
                    diff < 1e-5 * mag.max(1.0),
                    "d{name}: {diff} (max |grad| {mag})"
                );
            }
        }
        Ok(())
    }
}
