//! Latent consistency distillation: one step as functions over tensors ([`lcd`]), the student
//! seam ([`student`]), the trainer as a task of the shared loop ([`task`]) and `lcm distill` for
//! images ([`cli`]) and motion ([`motion`]). Flow-map distillation's objective and sampler
//! ([`flowmap`]) sit beside it.

pub mod cli;
pub mod flowmap;
pub mod lcd;
pub mod motion;
pub mod student;
pub mod task;

pub use task::{
    distillation, DistillConfig, Distillation, LcdTask, Objective, TrainData, LORA_FILE,
};
