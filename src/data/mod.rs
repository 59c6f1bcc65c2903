//! Training data: image–caption folders and shards ([`imagefolder`], re-exported here), the
//! project's own procedural shapes and emoji ([`toy`]), HumanML3D motion folders ([`humanml3d`]),
//! the project's own motion data built from real clips ([`motion`]) and its augmentation
//! ([`augment`]).

pub mod augment;
pub mod encode;
pub mod humanml3d;
pub mod imagefolder;
pub mod motion;
pub mod toy;

pub use imagefolder::*;

/// `b` row indices drawn uniformly from `0..n`, as a tensor for `index_select`.
pub fn random_rows(
    rng: &mut rand_chacha::ChaCha8Rng,
    n: usize,
    b: usize,
    device: &candle_core::Device,
) -> anyhow::Result<candle_core::Tensor> {
    use rand::Rng;
    let idx: Vec<u32> = (0..b).map(|_| rng.random_range(0..n as u32)).collect();
    Ok(candle_core::Tensor::new(idx.as_slice(), device)?)
}
