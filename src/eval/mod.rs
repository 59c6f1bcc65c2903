//! Evaluation: the evaluator's network ([`classifier`]), its training ([`train`]), the figures
//! ([`metrics`]: FID; [`evaluator`]: prompt accuracy, agreement, prompt following), the caption
//! parser that says what a prompt asks for ([`prompts`]) and `lcm eval` ([`run`]).

pub mod classifier;
pub mod evaluator;
pub mod metrics;
pub mod prompts;
pub mod run;
pub mod train;

pub use evaluator::*;
