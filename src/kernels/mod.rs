//! CPU kernels and their backward passes: fused attention, convolutions (shifted GEMM and
//! Winograd), GroupNorm. They know tensors and shapes, nothing about models.

pub mod attention;
pub mod conv;
pub mod norm;

/// Tests: the largest absolute difference between two tensors of one shape.
#[cfg(test)]
pub(crate) fn max_abs_diff(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> candle_core::Result<f32> {
    (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
}
