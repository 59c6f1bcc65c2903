//! CPU kernels and their backward passes: fused attention, convolutions (shifted GEMM and
//! Winograd), GroupNorm. They know tensors and shapes, nothing about models.
//!
//! Each kernel implements [`Kernel`] — a forward over contiguous f32 slices and a backward in
//! tensor ops — and [`apply`] hands it to candle as a custom op; every matrix product goes through
//! [`matmul`].

/// `$vis fn $name(args)` running `$body(args)` (an `#[inline(always)]` fn) compiled for AVX-512
/// where the CPU has it, for the build's baseline (AVX2 + FMA) otherwise: the same source
/// vectorised at both widths, chosen at run time.
macro_rules! avx512_dispatch {
    ($vis:vis fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? => $body:ident) => {
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            if $crate::kernels::cpu::avx512() {
                #[target_feature(enable = "avx512f")]
                unsafe fn fast($($a: $t),*) $(-> $r)? {
                    $body($($a),*)
                }
                // SAFETY: the CPU has AVX-512F (checked at run time).
                return unsafe { fast($($a),*) };
            }
            $body($($a),*)
        }
    };
}
pub(crate) use avx512_dispatch;

pub mod activation;
pub mod amx;
pub mod attention;
pub mod bf16;
pub mod conv;
pub mod cpu;
pub mod linear;
pub mod norm;
pub mod transpose;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// One input of a kernel: a contiguous f32 tensor's data and shape.
pub(crate) struct Input<'a> {
    pub data: &'a [f32],
    pub shape: &'a Shape,
}

/// A CPU kernel over one to three contiguous f32 tensors.
pub(crate) trait Kernel: Send + Sync {
    const NAME: &'static str;

    /// The output's data and shape; `inputs` has the arity the kernel was applied with (see
    /// [`arity`]).
    fn forward(&self, inputs: &[Input]) -> Result<(Vec<f32>, Shape)>;

    /// The inputs' gradients (`None`: not needed or not differentiable), given the inputs, the
    /// output and its gradient.
    fn backward(&self, _inputs: &[&Tensor], _out: &Tensor, _grad: &Tensor) -> Grads {
        candle_core::bail!("{} has no backward pass", Self::NAME)
    }
}

/// The inputs' gradients, one per input.
pub(crate) type Grads = Result<Vec<Option<Tensor>>>;

/// `inputs` as the array of `N` a kernel takes.
pub(crate) fn arity<'a, T, const N: usize>(name: &str, inputs: &'a [T]) -> Result<&'a [T; N]> {
    inputs.try_into().map_err(|_| {
        candle_core::Error::Msg(format!("{name} takes {N} inputs, got {}", inputs.len()))
    })
}

/// `kernel` on `inputs` (made contiguous), recorded for the backward pass when any input is
/// tracked.
pub(crate) fn apply<K: Kernel + 'static>(kernel: K, inputs: &[&Tensor]) -> Result<Tensor> {
    let t: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<_>>()?;
    if !t.iter().any(|t| t.track_op()) {
        return apply_no_bwd(&kernel, &t.iter().collect::<Vec<_>>());
    }
    let op = Op(kernel);
    match t.as_slice() {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => candle_core::bail!("{}: 1 to 3 inputs, got {}", K::NAME, t.len()),
    }
}

/// `kernel` on contiguous `inputs`, outside the autograd graph.
pub(crate) fn apply_no_bwd<K: Kernel>(kernel: &K, inputs: &[&Tensor]) -> Result<Tensor> {
    let op = Op(kernel);
    match inputs {
        [a] => a.apply_op1_no_bwd(&op),
        [a, b] => a.apply_op2_no_bwd(b, &op),
        [a, b, c] => a.apply_op3_no_bwd(b, c, &op),
        _ => candle_core::bail!("{}: 1 to 3 inputs, got {}", K::NAME, inputs.len()),
    }
}

/// Adapts a [`Kernel`] to candle's custom-op traits of each arity.
struct Op<K>(K);

impl<K: Kernel> Kernel for &K {
    const NAME: &'static str = K::NAME;
    fn forward(&self, inputs: &[Input]) -> Result<(Vec<f32>, Shape)> {
        (*self).forward(inputs)
    }
    fn backward(&self, i: &[&Tensor], out: &Tensor, g: &Tensor) -> Grads {
        (*self).backward(i, out, g)
    }
}

type S = CpuStorage;
type L = Layout;
type Grad = Option<Tensor>;

impl<K: Kernel> Op<K> {
    fn run(&self, inputs: &[(&S, &L)]) -> Result<(S, Shape)> {
        let slices = inputs
            .iter()
            .map(|(s, l)| match (s, l.contiguous_offsets()) {
                (CpuStorage::F32(v), Some((a, b))) => Ok(Input {
                    data: &v[a..b],
                    shape: l.shape(),
                }),
                _ => candle_core::bail!("{} needs contiguous f32 inputs", K::NAME),
            })
            .collect::<Result<Vec<_>>>()?;
        let (out, shape) = self.0.forward(&slices)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn grads<const N: usize>(
        &self,
        i: [&Tensor; N],
        out: &Tensor,
        g: &Tensor,
    ) -> Result<[Grad; N]> {
        let grads = self.0.backward(&i, out, g)?;
        grads.try_into().map_err(|v: Vec<Grad>| {
            candle_core::Error::Msg(format!("{}: {} gradients for {N} inputs", K::NAME, v.len()))
        })
    }
}

impl<K: Kernel> CustomOp1 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }
    fn cpu_fwd(&self, a: &S, la: &L) -> Result<(S, Shape)> {
        self.run(&[(a, la)])
    }
    fn bwd(&self, a: &Tensor, out: &Tensor, g: &Tensor) -> Result<Grad> {
        let [da] = self.grads([a], out, g)?;
        Ok(da)
    }
}

impl<K: Kernel> CustomOp2 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }
    fn cpu_fwd(&self, a: &S, la: &L, b: &S, lb: &L) -> Result<(S, Shape)> {
        self.run(&[(a, la), (b, lb)])
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, out: &Tensor, g: &Tensor) -> Result<(Grad, Grad)> {
        let [da, db] = self.grads([a, b], out, g)?;
        Ok((da, db))
    }
}

impl<K: Kernel> CustomOp3 for Op<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }
    fn cpu_fwd(&self, a: &S, la: &L, b: &S, lb: &L, c: &S, lc: &L) -> Result<(S, Shape)> {
        self.run(&[(a, la), (b, lb), (c, lc)])
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Grad, Grad, Grad)> {
        let [da, db, dc] = self.grads([a, b, c], o, g)?;
        Ok((da, db, dc))
    }
}

/// dst (m×n) = [dst +] alpha · lhs (m×k) · rhs (k×n) through the gemm crate; each matrix is a
/// slice with its (row stride, column stride), checked to hold every element they address.
/// `parallel` spreads one product over rayon's threads (for a kernel not already split).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    alpha: f32,
    parallel: bool,
) {
    let extent = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(dst.len() >= extent(m, n, dst_rs, dst_cs));
    assert!(lhs.len() >= extent(m, k, lhs_rs, lhs_cs));
    assert!(rhs.len() >= extent(k, n, rhs_rs, rhs_cs));
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every element the strides can address, and `dst` is a
    // unique borrow, so it overlaps neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Tests: the largest absolute difference between two tensors of one shape.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
}

/// Tests: two ways to compute one function of `vars`, differentiated (the output's product with
/// one random tensor, summed): for each var, its name, the largest difference between the two
/// gradients and the reference gradient's largest magnitude.
#[cfg(test)]
pub(crate) fn grad_diffs<'a>(
    vars: &[(&'a str, &candle_core::Var)],
    ours: Tensor,
    reference: Tensor,
) -> Result<Vec<(&'a str, f32, f32)>> {
    let r = Tensor::randn(0f32, 1.0, reference.dims(), reference.device())?;
    let ga = (&ours * &r)?.sum_all()?.backward()?;
    let gb = (&reference * &r)?.sum_all()?.backward()?;
    let mut out = Vec::new();
    for (name, var) in vars {
        let (x, y) = (
            ga.get(var).expect("our grad"),
            gb.get(var).expect("ref grad"),
        );
        let mag = y.abs()?.max_all()?.to_scalar::<f32>()?;
        out.push((*name, max_abs_diff(x, y)?, mag));
    }
    Ok(out)
}
