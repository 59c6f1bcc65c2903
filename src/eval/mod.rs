//! Evaluation: the evaluator's network ([`classifier`]), its training ([`train`]), the figures
//! ([`metrics`]: FID; [`evaluator`]: prompt accuracy, agreement, prompt following), the caption
//! parser that says what a prompt asks for ([`prompts`]) and `lcm eval` ([`run`]); the motion
//! evaluator ([`motion`]) and its training ([`motion_train`]).

pub mod classifier;
pub mod evaluator;
pub mod metrics;
pub mod motion;
pub mod motion_train;
pub mod prompts;
pub mod run;
pub mod train;

pub use evaluator::*;
