//! Model components, each built from its `config.json`: the CLIP [`tokenizer`] and text encoder
//! ([`clip`]), the latent [`unet`], the [`vae`], the CLIP-style pair [`contrastive`] and the
//! pretrained [`sentence`] encoder for motion captions, the [`motion_vae`] and
//! [`motion_denoiser`]; weight files ([`weights`]) and the model
//! folder that holds them all ([`folder`]), or one LDM-layout checkpoint file ([`single_file`]).

pub mod clip;
pub mod config;
pub mod contrastive;
pub mod folder;
pub mod motion_denoiser;
pub mod motion_vae;
pub mod sentence;
pub mod single_file;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
