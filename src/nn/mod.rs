//! Building blocks every network shares: layers whose training path keeps gradients
//! ([`layers`], re-exported here), ResNet/down/up [`blocks`], [`lora`] adapters and seeded
//! initialisation ([`init`]).

pub mod blocks;
pub mod init;
pub mod layers;
pub mod lora;
pub mod transformer;

pub use layers::*;
