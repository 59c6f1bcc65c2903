//! `lcm`: latent consistency models on candle.
//!
//! The data path, one module per stage: [`tokenizer`] → [`clip`] (text encoder) → [`sampler`] over
//! the [`unet`] (with [`schedule`] for the noise schedule) → [`vae`] → [`image_io`]; [`pipeline`]
//! strings them together and [`source`] finds the weights.

pub mod attention;
pub mod bench;
pub mod blocks;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod contrastive;
pub mod conv;
pub mod data;
pub mod distill;
pub mod eval;
pub mod image_io;
pub mod init;
pub mod lcd;
pub mod lora;
pub mod nn;
pub mod norm;
pub mod optim;
pub mod pipeline;
pub mod pretrain;
pub mod runtime;
pub mod sampler;
pub mod schedule;
pub mod serve;
pub mod source;
pub mod tokenizer;
pub mod toydata;
pub mod unet;
pub mod vae;
pub mod whiten;
