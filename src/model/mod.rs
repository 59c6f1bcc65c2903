//! Model components, each built from its `config.json`: the CLIP [`tokenizer`] and text encoder
//! ([`clip`]), the latent [`unet`], the [`vae`], the CLIP-style pair [`contrastive`] and the
//! pretrained [`sentence`] encoder for motion captions; weight files ([`weights`]) and the model
//! folder that holds them all ([`folder`]).

pub mod clip;
pub mod config;
pub mod contrastive;
pub mod folder;
pub mod sentence;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
