//! Model components, each built from its `config.json`: the CLIP [`tokenizer`] and text encoder
//! ([`clip`]), the latent [`unet`], the [`vae`], and weight files ([`weights`]).

pub mod clip;
pub mod config;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
