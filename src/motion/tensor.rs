//! [`super::joints_from_features`] as tensor operations over a batch, differentiable, so that a
//! network's loss can be taken on the joints its features decode to (MLD's joint loss). The
//! slice-based version stays the reference; a test holds the two together.

use candle_core::{Result, Tensor, D};

use super::{FEATURES, JOINTS};

/// Joints `[b, t, 22, 3]` from features `[b, t, 263]` in their own units (not z-normalised).
pub fn joints_from_features(x: &Tensor) -> Result<Tensor> {
    let (b, t, f) = x.dims3()?;
    if f != FEATURES {
        candle_core::bail!("motion features must be {FEATURES} wide, got {f}")
    }
    let col = |i: usize| x.narrow(2, i, 1)?.squeeze(2);
    // The heading angle before each frame: the exclusive running sum of the yaw velocities.
    let yaw = col(0)?;
    let angle = ((yaw.cumsum(1)? - &yaw)? * 2.0)?;
    let (cos, sin) = (angle.cos()?, angle.sin()?);
    // Frame s ≥ 1 moves the root by row s − 1's velocity, rotated by the inverse heading at s.
    let shift = |c: Tensor| -> Result<Tensor> {
        let zero = Tensor::zeros((b, 1), c.dtype(), c.device())?;
        Tensor::cat(&[&zero, &c.narrow(1, 0, t - 1)?], 1)
    };
    let (vx, vz) = (shift(col(1)?)?, shift(col(2)?)?);
    let rx = ((&vx * &cos)? - (&vz * &sin)?)?.cumsum(1)?;
    let rz = ((&vx * &sin)? + (&vz * &cos)?)?.cumsum(1)?;
    let ric = x
        .narrow(2, 4, (JOINTS - 1) * 3)?
        .reshape((b, t, JOINTS - 1, 3))?;
    let part = |i: usize| ric.narrow(3, i, 1)?.squeeze(3);
    let (px, py, pz) = (part(0)?, part(1)?, part(2)?);
    let (c3, s3) = (cos.unsqueeze(2)?, sin.unsqueeze(2)?);
    let jx =
        ((px.broadcast_mul(&c3)? - pz.broadcast_mul(&s3)?)?).broadcast_add(&rx.unsqueeze(2)?)?;
    let jz =
        ((px.broadcast_mul(&s3)? + pz.broadcast_mul(&c3)?)?).broadcast_add(&rz.unsqueeze(2)?)?;
    let others = Tensor::stack(&[jx, py, jz], D::Minus1)?;
    let root = Tensor::stack(&[rx, col(3)?, rz], D::Minus1)?.unsqueeze(2)?;
    Tensor::cat(&[root, others], 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_the_reference_recovery() -> anyhow::Result<()> {
        let clip = crate::motion::features::tests::synthetic_clip(50);
        let f = crate::motion::features(&clip, &Default::default())?;
        let rows = f.len() / FEATURES;
        let want = crate::motion::joints_from_features(&f)?;
        let x = Tensor::from_vec(f, (1, rows, FEATURES), &Device::Cpu)?;
        let got = joints_from_features(&x)?.squeeze(0)?.to_vec3::<f32>()?;
        let mut worst = 0f64;
        for (p, q) in want.iter().zip(&got) {
            for (a, b) in p.iter().zip(q) {
                for k in 0..3 {
                    worst = worst.max((a[k] - b[k] as f64).abs());
                }
            }
        }
        assert!(worst < 1e-4, "tensor recovery differs by {worst} m");
        Ok(())
    }
}
