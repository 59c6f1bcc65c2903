//! Latent consistency distillation: one step as functions over tensors ([`lcd`]), the student
//! seam ([`student`]), the trainer as a task of the shared loop ([`task`]) and `lcm distill` for
//! images ([`cli`]).

pub mod cli;
pub mod lcd;
pub mod student;
pub mod task;

pub use task::{distillation, DistillConfig, Distillation, LcdTask, TrainData, LORA_FILE};
