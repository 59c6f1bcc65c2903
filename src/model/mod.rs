//! Model components, each built from its `config.json`: the CLIP [`tokenizer`] and text encoder
//! ([`clip`]), the latent [`unet`], the [`vae`]; weight files ([`weights`]) and the model folder that holds them all
//! ([`folder`]).

pub mod clip;
pub mod config;
pub mod contrastive;
pub mod folder;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
