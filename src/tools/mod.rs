//! Tools beside the data path: latent whitening and benchmarks.

pub mod bench;
pub mod whiten;
