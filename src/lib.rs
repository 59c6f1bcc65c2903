//! `lcm`: latent consistency models on candle.
//!
//! Layers, bottom to top (see docs/architecture.md): [`kernels`] → [`nn`] → [`model`] →
//! [`sample`] → [`pipeline`]; [`data`] → [`train`] → [`distill`]; [`eval`]; [`serve`]; the CLI
//! (`main.rs`) is a thin shell over them. [`motion`] is the motion modality's representation
//! (skeleton, HumanML3D features, files); [`tools`] holds whitening and benchmarks.

pub mod data;
pub mod distill;
pub mod eval;
pub mod files;
pub mod kernels;
pub mod model;
pub mod motion;
pub mod nn;
pub mod pipeline;
pub mod runtime;
pub mod sample;
pub mod serve;
pub mod tools;
pub mod train;
