//! Tools beside the data path: latent whitening, benchmarks, and motion file conversion and
//! rendering.

pub mod bench;
pub mod motion;
pub mod whiten;
