//! Sampling: the noise [`schedule`], noise sources, and the samplers (LCM, TCD, DDIM, flow map) as pure
//! step functions over tensors, and the [`denoiser`] seam: the trait every ε-predicting network
//! implements and the one sampling loop over it.

pub mod denoiser;
pub mod flowmap;
pub mod noise;
pub mod sampler;
pub mod schedule;
