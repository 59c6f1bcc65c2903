//! 2-D convolution for CPU inference without im2col.
//!
//! A stride-1 k×k convolution is a sum over the k² kernel taps of (C_out × C_in) · (C_in × pixels)
//! products. Computing the output on the zero-padded input's row width makes every tap's input a
//! plain strided matrix (an offset into the padded image), so each tap is one large gemm that
//! accumulates into the output: no 9×-sized im2col buffer, and gemm runs at full speed. The
//! padding columns of the output are dropped when the bias is added. The backward works the same
//! way: the input gradient is this convolution of the output gradient with the flipped, transposed
//! kernel, and each tap's weight gradient is one gemm of the (padded-width) output gradient with
//! the shifted input (candle's own conv backward took ~10× longer at training sizes).

use candle_core::{Result, Shape, Tensor};

use super::{apply, apply_no_bwd, matmul, Grads, Input, Kernel};

thread_local! {
    /// Reused working buffers: fresh multi-megabyte allocations every layer cost page faults
    /// (measured ≈ 12 % of a U-Net step).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

struct ShiftedGemmConv {
    padding: usize,
}

thread_local! {
    /// A row band's accumulator (apart from [`SCRATCH`], whose padded image the bands read).
    static BAND: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// How many row bands a shifted-GEMM convolution splits into (1: gemm parallelises each tap).
/// Bands run every tap serially on their own rows: one fork-join per image instead of one per
/// tap, and a band's accumulator stays in cache. With large weights and few pixels (the 8×8 and
/// 16×16 levels of SD1.5) each band would re-pack all the weights for little work, so gemm splits.
fn row_bands(ho: usize, weights: usize) -> usize {
    let threads = rayon::current_num_threads();
    if threads < 2 || ho < 2 * threads || weights > 256 * 256 {
        return 1;
    }
    threads.min(ho / 2)
}

/// The sizes one image's shifted-GEMM taps run over.
#[derive(Clone, Copy)]
struct TapGeometry {
    c_in: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    hp: usize,
    wp: usize,
}

impl TapGeometry {
    /// Output rows `[y0, y0 + rows)` on the padded width into `acc` (`c_out × rows·wp`): every
    /// tap is one product of the kernel's tap slice with the padded image shifted by the tap.
    fn taps(&self, k: &[f32], xp: &[f32], y0: usize, rows: usize, acc: &mut Vec<f32>, par: bool) {
        let Self {
            c_in,
            c_out,
            kh,
            kw,
            hp,
            wp,
        } = *self;
        let n = rows * wp;
        acc.resize(c_out * n, 0.0);
        for dy in 0..kh {
            for dx in 0..kw {
                let tap = dy * kw + dx;
                // lhs reads k[o·c_in·kh·kw + c·kh·kw + tap] for o < c_out, c < c_in; rhs reads
                // xp[c·hp·wp + (y0 + dy)·wp + dx + j] for j < rows·wp, which is below
                // c_in·hp·wp + kw (the slack) since y0 + rows ≤ ho = hp - kh + 1.
                matmul(
                    (c_out, n, c_in),
                    &mut acc[..],
                    (n, 1),
                    tap > 0,
                    &k[tap..],
                    (c_in * kh * kw, kh * kw),
                    &xp[(y0 + dy) * wp + dx..],
                    (hp * wp, 1),
                    1.0,
                    par,
                );
            }
        }
    }
}

/// `x` `[b, c_in, h, w]` ⊛ `w` `[c_out, c_in, kh, kw]`, stride 1, zero padding `padding`, f32 CPU.
/// Differentiable when either input is tracked (then `padding` must be below the kernel size).
pub fn conv2d_stride1(x: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    apply(ShiftedGemmConv { padding }, &[x, w])
}

/// The weight of a stride-1 convolution's input gradient: `w` (`[c_out, c_in, kh, kw]`) with in
/// and out swapped and flipped in space (the taps reversed), in one pass. Built from candle's
/// transpose, contiguous and two index_selects it took 20 % of an SD1.5 LCM-LoRA step (perf,
/// Xeon, 2026-12-07).
fn flipped_transpose(w: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (c_out, c_in, kh, kw) = w.dims4()?;
    let taps = kh * kw;
    let w = w.contiguous()?;
    let out = {
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("conv2d backward: the weight is not on the CPU")
        };
        let src = &cpu.as_slice::<f32>()?[layout.start_offset()..][..c_out * c_in * taps];
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(c_out * taps)
            .enumerate()
            .for_each(|(i, dst)| {
                for (o, d) in dst.chunks_exact_mut(taps).enumerate() {
                    let s = &src[(o * c_in + i) * taps..][..taps];
                    d.iter_mut().zip(s.iter().rev()).for_each(|(d, s)| *d = *s);
                }
            });
        out
    };
    Tensor::from_vec(out, (c_in, c_out, kh, kw), w.device())
}

/// ∂L/∂w for a stride-1 convolution: for each tap (dy, dx),
/// dw[:, :, dy, dx] = Σ_b g_b (c_out × ho·wp, zero beyond wo) · shifted(xp_b)ᵀ (ho·wp × c_in).
fn conv_weight_grad(
    x: &[f32],
    g: &[f32],
    (b, c_in, h, w): (usize, usize, usize, usize),
    (c_out, kh, kw): (usize, usize, usize),
    p: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    let (ho, wo) = (hp - kh + 1, wp - kw + 1);
    let l = ho * wp;
    let xsz = c_in * hp * wp + kw;
    let mut xp = vec![0f32; b * xsz];
    let mut gp = vec![0f32; b * c_out * l];
    for bi in 0..b {
        for c in 0..c_in {
            for y in 0..h {
                let src = &x[((bi * c_in + c) * h + y) * w..][..w];
                let dst = bi * xsz + (c * hp + y + p) * wp + p;
                xp[dst..dst + w].copy_from_slice(src);
            }
        }
        for o in 0..c_out {
            for y in 0..ho {
                let src = &g[((bi * c_out + o) * ho + y) * wo..][..wo];
                let dst = (bi * c_out + o) * l + y * wp;
                gp[dst..dst + wo].copy_from_slice(src);
            }
        }
    }
    let taps: Vec<Vec<f32>> = (0..kh * kw)
        .into_par_iter()
        .map(|tap| {
            let (dy, dx) = (tap / kw, tap % kw);
            let mut d = vec![0f32; c_out * c_in];
            for bi in 0..b {
                // lhs is gp_b (c_out × l); rhs element (j, i) is xp_b[i·hp·wp + dy·wp + dx + j]
                // for j < l = ho·wp, i < c_in, below c_in·hp·wp + kw; dst is c_out × c_in.
                matmul(
                    (c_out, c_in, l),
                    &mut d,
                    (c_in, 1),
                    bi > 0,
                    &gp[bi * c_out * l..],
                    (l, 1),
                    &xp[bi * xsz + dy * wp + dx..],
                    (1, hp * wp),
                    1.0,
                    false,
                );
            }
            d
        })
        .collect();
    let mut dw = vec![0f32; c_out * c_in * kh * kw];
    for (tap, d) in taps.iter().enumerate() {
        for (oi, v) in d.iter().enumerate() {
            dw[oi * kh * kw + tap] = *v;
        }
    }
    dw
}

impl Kernel for ShiftedGemmConv {
    const NAME: &'static str = "shifted-gemm-conv2d";

    fn forward(&self, inputs: &[Input]) -> Result<(Vec<f32>, Shape)> {
        let [x, k] = super::arity(Self::NAME, inputs)?;
        let (b, c_in, h, w) = x.shape.dims4()?;
        let (c_out, c_in_k, kh, kw) = k.shape.dims4()?;
        let p = self.padding;
        if c_in != c_in_k || h + 2 * p < kh || w + 2 * p < kw {
            candle_core::bail!(
                "conv2d: input {:?} and kernel {:?} do not fit",
                x.shape,
                k.shape
            )
        }
        let (x, k) = (x.data, k.data);
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        let (ho, wo) = (hp - kh + 1, wp - kw + 1);
        let n = ho * wp;
        let mut out = vec![0f32; b * c_out * ho * wo];
        let bands = row_bands(ho, c_out * c_in);
        let geometry = TapGeometry {
            c_in,
            c_out,
            kh,
            kw,
            hp,
            wp,
        };
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let (xp, acc) = &mut *scratch;
            // Padded image plus slack: the dropped output columns of the last rows read past the end.
            xp.clear();
            xp.resize(c_in * hp * wp + kw, 0.0);
            for bi in 0..b {
                let xb = &x[bi * c_in * h * w..(bi + 1) * c_in * h * w];
                for c in 0..c_in {
                    for y in 0..h {
                        let src = &xb[(c * h + y) * w..(c * h + y + 1) * w];
                        let dst = (c * hp + y + p) * wp + p;
                        xp[dst..dst + w].copy_from_slice(src);
                    }
                }
                let ob = &mut out[bi * c_out * ho * wo..(bi + 1) * c_out * ho * wo];
                if bands > 1 {
                    use rayon::prelude::*;
                    let out_ptr = OutPtr(ob.as_mut_ptr());
                    let rows = ho.div_ceil(bands);
                    let xp = &xp[..];
                    let starts: Vec<usize> = (0..ho).step_by(rows).collect();
                    starts.into_par_iter().for_each(|y0| {
                        BAND.with(|acc| {
                            let rows = rows.min(ho - y0);
                            let acc = &mut *acc.borrow_mut();
                            geometry.taps(k, xp, y0, rows, acc, false);
                            for o in 0..c_out {
                                for y in y0..y0 + rows {
                                    let src = &acc[(o * rows + y - y0) * wp..][..wo];
                                    // SAFETY: (o, y) lies in `ob` and rows [y0, y0 + rows)
                                    // belong to this band alone.
                                    unsafe {
                                        std::ptr::copy_nonoverlapping(
                                            src.as_ptr(),
                                            out_ptr.at((o * ho + y) * wo),
                                            wo,
                                        )
                                    };
                                }
                            }
                        })
                    });
                } else {
                    geometry.taps(k, xp, 0, ho, acc, true);
                    for o in 0..c_out {
                        for y in 0..ho {
                            let src = &acc[o * n + y * wp..o * n + y * wp + wo];
                            ob[(o * ho + y) * wo..(o * ho + y + 1) * wo].copy_from_slice(src);
                        }
                    }
                }
            }
        });
        Ok((out, Shape::from((b, c_out, ho, wo))))
    }

    fn backward(&self, i: &[&Tensor], _out: &Tensor, grad: &Tensor) -> Grads {
        let [x, w] = super::arity(Self::NAME, i)?;
        let (b, c_in, h, wd) = x.dims4()?;
        let (c_out, _, kh, kw) = w.dims4()?;
        let p = self.padding;
        if p >= kh || p >= kw {
            candle_core::bail!("conv2d backward: padding {p} must be below the kernel size")
        }
        let grad = grad.contiguous()?;
        // Only what the graph needs: frozen weights (LCM-LoRA's base layers) get no gradient, and
        // an input that tracks nothing (the first layer's) none either.
        let dx = if x.track_op() {
            // A full correlation with the kernel flipped in space, in/out swapped.
            let wt = flipped_transpose(w)?;
            if kh - 1 - p != kw - 1 - p {
                candle_core::bail!("conv2d backward: non-square kernels are not supported")
            }
            Some(conv2d_stride1(&grad, &wt, kh - 1 - p)?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            let gs = grad.flatten_all()?.to_vec1::<f32>()?;
            let dw = conv_weight_grad(&xs, &gs, (b, c_in, h, wd), (c_out, kh, kw), p);
            Some(Tensor::from_vec(dw, (c_out, c_in, kh, kw), x.device())?)
        } else {
            None
        };
        Ok(vec![dx, dw])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        // One thread: gemm splits nothing; three: row bands (13 rows make 3 bands, the last
        // shorter) — whatever this machine's default thread count is.
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(candle_core::Error::wrap)?;
            pool.install(|| -> Result<()> {
                for (b, ci, co, h, w, k, p) in [
                    (2, 3, 5, 7, 9, 3, 1),
                    (1, 4, 4, 8, 8, 3, 0),
                    (1, 2, 3, 5, 6, 1, 0),
                    (1, 3, 2, 6, 5, 5, 2),
                    (2, 8, 6, 13, 11, 3, 1),
                ] {
                    let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev)?;
                    let wt = Tensor::randn(0f32, 1.0, (co, ci, k, k), &dev)?;
                    let ours = conv2d_stride1(&x, &wt, p)?;
                    let reference = x.conv2d(&wt, p, 1, 1, 1)?;
                    assert_eq!(ours.dims(), reference.dims());
                    let diff = crate::kernels::max_abs_diff(&ours, &reference)?;
                    assert!(diff < 1e-4, "conv differs by {diff} on {threads} threads");
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    #[test]
    fn gradients_match_candle_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for (b, ci, co, h, w, k, p) in [
            (2, 3, 5, 7, 9, 3, 1),
            (1, 4, 2, 6, 6, 3, 0),
            (2, 3, 4, 5, 4, 1, 0),
        ] {
            let x = candle_core::Var::randn(0f32, 1.0, (b, ci, h, w), &dev)?;
            let wt = candle_core::Var::randn(0f32, 1.0, (co, ci, k, k), &dev)?;
            let ours = conv2d_stride1(&x, &wt, p)?;
            let theirs = x.conv2d(&wt, p, 1, 1, 1)?;
            for (name, diff, _) in
                crate::kernels::grad_diffs(&[("x", &x), ("w", &wt)], ours, theirs)?
            {
                assert!(diff < 1e-3, "d{name} differs by {diff} (k {k}, p {p})");
            }
        }
        Ok(())
    }
}

/// Whether a 3×3 stride-1 convolution is faster as Winograd F(2×2, 3×3) than as shifted GEMMs,
/// counting the kernel transform, which is recomputed per call (caching it would cost 16/9 of the
/// weights' memory). Winograd saves 2.25× of the products (∝ c_in·c_out) for input and output
/// transforms ∝ c_in + c_out, so it pays from a large effective width 2·c_in·c_out/(c_in + c_out)
/// on large images; on small ones the kernel transform outweighs the saving. Measured on a 2-core
/// Zen 4 (2026-12-06, benches/small_conv.rs; shifted / Winograd with transform, ms): 32 ch at 64²
/// 0.53 / 1.55, 192 at 64² 16.9 / 18.5, 256 at 64² 31.2 / 28.9, 320 at 64² 45.3 / 37.2, 320 at 32²
/// 12.9 / 19.8, 640 at 32² 47.4 / 65.1, 1280 at 16² 69 / 120.
pub fn prefer_winograd(c_in: usize, c_out: usize, pixels: usize) -> bool {
    let width = 2 * c_in * c_out / (c_in + c_out).max(1);
    width >= 256 && pixels >= 4096
}

/// Winograd F(2×2, 3×3) (Lavin & Gray 2016) for 3×3 stride-1 convolutions: each 2×2 output tile
/// costs 16 multiplies per (in, out) channel pair instead of 36, so the gemm work drops 2.25×. The
/// kernel transform G·g·Gᵀ is this struct (the layers recompute it per call: see
/// [`prefer_winograd`]). Tiles are processed in bands (≈512 tiles) so the transformed buffers
/// stay small and bands run in parallel.
pub struct WinogradKernel {
    /// `[16][c_out][c_in]` transformed weights.
    u: Vec<f32>,
    c_out: usize,
    c_in: usize,
}

impl WinogradKernel {
    /// From a `[c_out, c_in, 3, 3]` f32 weight.
    pub fn new(w: &Tensor) -> Result<Self> {
        let (c_out, c_in, kh, kw) = w.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("Winograd F(2,3) needs a 3x3 kernel, got {kh}x{kw}")
        }
        let g: Vec<f32> = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let mut u = vec![0f32; 16 * c_out * c_in];
        for o in 0..c_out {
            for c in 0..c_in {
                let k = &g[(o * c_in + c) * 9..(o * c_in + c + 1) * 9];
                // G·g (4×3), then (G·g)·Gᵀ (4×4).
                let mut gg = [[0f32; 3]; 4];
                for j in 0..3 {
                    let (a, b, cc) = (k[j], k[3 + j], k[6 + j]);
                    gg[0][j] = a;
                    gg[1][j] = 0.5 * (a + b + cc);
                    gg[2][j] = 0.5 * (a - b + cc);
                    gg[3][j] = cc;
                }
                for (i, row) in gg.iter().enumerate() {
                    let t = [
                        row[0],
                        0.5 * (row[0] + row[1] + row[2]),
                        0.5 * (row[0] - row[1] + row[2]),
                        row[2],
                    ];
                    for (j, v) in t.iter().enumerate() {
                        u[((i * 4 + j) * c_out + o) * c_in + c] = *v;
                    }
                }
            }
        }
        Ok(Self { u, c_out, c_in })
    }
}

struct Winograd<'a> {
    kernel: &'a WinogradKernel,
    padding: usize,
}

/// `x` `[b, c_in, h, w]` ⊛ the kernel, stride 1, zero padding `padding`, f32 CPU.
pub fn conv3x3_winograd(x: &Tensor, kernel: &WinogradKernel, padding: usize) -> Result<Tensor> {
    apply_no_bwd(&Winograd { kernel, padding }, &[&x.contiguous()?])
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: bands write disjoint output rows; see `cpu_fwd`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not the field) so closures capture the Send + Sync wrapper, not the raw pointer.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

impl Kernel for Winograd<'_> {
    const NAME: &'static str = "winograd-conv3x3";

    // The transforms index 4×4 tiles by (row, column) as the formulas are written.
    #[allow(clippy::needless_range_loop)]
    fn forward(&self, inputs: &[Input]) -> Result<(Vec<f32>, Shape)> {
        use rayon::prelude::*;
        let [x] = super::arity(Self::NAME, inputs)?;
        let (b, c_in, h, w) = x.shape.dims4()?;
        let (k_out, p) = (self.kernel.c_out, self.padding);
        if c_in != self.kernel.c_in || h + 2 * p < 3 || w + 2 * p < 3 {
            candle_core::bail!("winograd conv: input {:?} does not fit the kernel", x.shape)
        }
        let x = x.data;
        let (ho, wo) = (h + 2 * p - 2, w + 2 * p - 2);
        let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
        let band = (512 / tw).max(1);
        let mut out = vec![0f32; b * k_out * ho * wo];
        let out_ptr = OutPtr(out.as_mut_ptr());
        let u = &self.kernel.u;
        let bands: Vec<(usize, usize)> = (0..b)
            .flat_map(|bi| (0..th).step_by(band).map(move |r| (bi, r)))
            .collect();
        bands.par_iter().for_each(|&(bi, r0)| {
            let r1 = (r0 + band).min(th);
            let n = (r1 - r0) * tw;
            let xb = &x[bi * c_in * h * w..(bi + 1) * c_in * h * w];
            // Input transform Bᵀ·d·B of every 4×4 tile: v[ξ][c][t].
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let (v, m) = &mut *scratch;
                // Every element of v and m is written below before it is read.
                v.resize(16 * c_in * n, 0.0);
                m.resize(16 * k_out * n, 0.0);
                for c in 0..c_in {
                    let img = &xb[c * h * w..(c + 1) * h * w];
                    for t in 0..n {
                        let (ti, tj) = (r0 + t / tw, t % tw);
                        let mut d = [[0f32; 4]; 4];
                        for (a, row) in d.iter_mut().enumerate() {
                            let y = (2 * ti + a) as isize - p as isize;
                            if y < 0 || y >= h as isize {
                                continue;
                            }
                            for (bb, val) in row.iter_mut().enumerate() {
                                let xx = (2 * tj + bb) as isize - p as isize;
                                if xx >= 0 && xx < w as isize {
                                    *val = img[y as usize * w + xx as usize];
                                }
                            }
                        }
                        // Bᵀ·d (rows), then ·B (columns).
                        let mut bd = [[0f32; 4]; 4];
                        for j in 0..4 {
                            bd[0][j] = d[0][j] - d[2][j];
                            bd[1][j] = d[1][j] + d[2][j];
                            bd[2][j] = d[2][j] - d[1][j];
                            bd[3][j] = d[1][j] - d[3][j];
                        }
                        for (i, row) in bd.iter().enumerate() {
                            let vals = [
                                row[0] - row[2],
                                row[1] + row[2],
                                row[2] - row[1],
                                row[1] - row[3],
                            ];
                            for (j, val) in vals.iter().enumerate() {
                                v[((i * 4 + j) * c_in + c) * n + t] = *val;
                            }
                        }
                    }
                }
                // 16 independent products M[ξ] = U[ξ] · V[ξ].
                for xi in 0..16 {
                    // u[ξ] is k_out × c_in, v[ξ] is c_in × n, m[ξ] is k_out × n, all row-major.
                    matmul(
                        (k_out, n, c_in),
                        &mut m[xi * k_out * n..],
                        (n, 1),
                        false,
                        &u[xi * k_out * c_in..],
                        (c_in, 1),
                        &v[xi * c_in * n..],
                        (n, 1),
                        1.0,
                        false,
                    );
                }
                // Output transform Aᵀ·m·A → 2×2 outputs per tile.
                for o in 0..k_out {
                    for t in 0..n {
                        let (ti, tj) = (r0 + t / tw, t % tw);
                        let e = |xi: usize| m[(xi * k_out + o) * n + t];
                        let mut am = [[0f32; 4]; 2];
                        for j in 0..4 {
                            am[0][j] = e(j) + e(4 + j) + e(8 + j);
                            am[1][j] = e(4 + j) - e(8 + j) - e(12 + j);
                        }
                        for (a, row) in am.iter().enumerate() {
                            let y = 2 * ti + a;
                            if y >= ho {
                                continue;
                            }
                            let vals = [row[0] + row[1] + row[2], row[1] - row[2] - row[3]];
                            for (bb, val) in vals.iter().enumerate() {
                                let xx = 2 * tj + bb;
                                if xx < wo {
                                    // SAFETY: (bi, o, y, xx) is inside `out`, and y lies in this
                                    // band's rows [2·r0, 2·r1), which no other band writes.
                                    unsafe {
                                        *out_ptr.at(((bi * k_out + o) * ho + y) * wo + xx) = *val;
                                    }
                                }
                            }
                        }
                    }
                }
            });
        });
        Ok((out, Shape::from((b, k_out, ho, wo))))
    }
}

#[cfg(test)]
mod winograd_tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn winograd_matches_direct_convolution() -> Result<()> {
        let dev = Device::Cpu;
        for (b, ci, co, h, w, p) in [
            (2, 3, 5, 7, 9, 1),
            (1, 4, 6, 8, 8, 1),
            (1, 2, 3, 5, 6, 0),
            (1, 8, 4, 33, 17, 1),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (co, ci, 3, 3), &dev)?;
            let ours = conv3x3_winograd(&x, &WinogradKernel::new(&wt)?, p)?;
            let reference = x.conv2d(&wt, p, 1, 1, 1)?;
            assert_eq!(ours.dims(), reference.dims());
            let diff = crate::kernels::max_abs_diff(&ours, &reference)?;
            assert!(
                diff < 1e-4,
                "winograd conv differs by {diff} for {:?}",
                (b, ci, co, h, w, p)
            );
        }
        Ok(())
    }
}

struct ChannelBias;

/// `x` `[b, c, …]` + `bias` `[c]` on the CPU in f32, with a backward that sums the gradient per
/// channel in one pass (candle's broadcast backward reduces over strided dims slowly).
pub fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    apply(ChannelBias, &[x, bias])
}

impl Kernel for ChannelBias {
    const NAME: &'static str = "channel-bias";

    fn forward(&self, inputs: &[Input]) -> Result<(Vec<f32>, Shape)> {
        let [x, b] = super::arity(Self::NAME, inputs)?;
        let (d, shape) = (x.shape.dims(), x.shape.clone());
        let (x, b) = (x.data, b.data);
        if d.len() < 2 || b.len() != d[1] {
            candle_core::bail!("channel bias: input {d:?}, bias of {}", b.len())
        }
        let s: usize = d[2..].iter().product();
        let mut out = x.to_vec();
        for (i, chunk) in out.chunks_mut(s).enumerate() {
            let v = b[i % d[1]];
            chunk.iter_mut().for_each(|y| *y += v);
        }
        Ok((out, shape))
    }

    fn backward(&self, i: &[&Tensor], _out: &Tensor, grad: &Tensor) -> Grads {
        let x = i[0];
        let d = x.dims();
        let (c, s) = (d[1], d[2..].iter().product::<usize>());
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut db = vec![0f64; c];
        for (i, chunk) in g.chunks(s).enumerate() {
            db[i % c] += chunk.iter().map(|&v| v as f64).sum::<f64>();
        }
        let db: Vec<f32> = db.into_iter().map(|v| v as f32).collect();
        Ok(vec![
            Some(grad.clone()),
            Some(Tensor::from_vec(db, c, x.device())?),
        ])
    }
}

#[cfg(test)]
mod bias_tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn channel_bias_matches_broadcast_add_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 4, 5), &dev)?;
        let b = Var::randn(0f32, 1.0, 3, &dev)?;
        let ours = add_channel_bias(&x, &b)?;
        let reference = x.broadcast_add(&b.reshape((1, 3, 1, 1))?)?;
        assert_eq!(crate::kernels::max_abs_diff(&ours, &reference)?, 0.0);
        for (name, d, _) in crate::kernels::grad_diffs(&[("x", &x), ("b", &b)], ours, reference)? {
            assert!(d < 1e-5, "d{name}: {d}");
        }
        Ok(())
    }
}
