//! Evaluation: the evaluator's network ([`classifier`]), its training ([`train`]), the figures
//! ([`metrics`]: FID; [`evaluator`]: prompt accuracy, agreement, prompt following), the caption
//! parser that says what a prompt asks for ([`prompts`]) and `lcm eval` ([`run`]); the motion
//! evaluator ([`motion`]), its training ([`motion_train`]), and what the joints alone tell
//! ([`motion_checks`]: plausibility, program adherence), and `lcm eval` of a motion model
//! ([`motion_eval`]).

pub mod classifier;
pub mod evaluator;
pub mod metrics;
pub mod motion;
pub mod motion_checks;
pub mod motion_eval;
pub mod motion_train;
pub mod prompts;
pub mod run;
pub mod train;

pub use evaluator::*;
