//! Pipelines: where a model's files come from ([`source`]), text → image ([`text2image`]) and
//! images to files ([`image_io`]).

pub mod image_io;
pub mod source;
pub mod text2image;

pub use text2image::*;
