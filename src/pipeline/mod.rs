//! Pipelines: where a model's files come from ([`source`]), text → image ([`text2image`]),
//! text → motion ([`text2motion`]),
//! images to files ([`image_io`]) and the flags that choose a model and its sampling ([`args`]).

pub mod args;
pub mod image_io;
pub mod single_file;
pub mod source;
pub mod text2image;
pub mod text2motion;

pub use text2image::*;
