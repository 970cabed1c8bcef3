//! Trainers: supervised fine-tuning on solver traces and end-to-end GRPO over parent and child
//! threads (spec §4.3, §5), the evaluation harness both use ([`rollout`] is the one way problems
//! reach the runtime), and the recipes ([`recipe`]) the [`pipeline`] runs into a report.
//!
//! Trainers hold no tensor code: they compute each loss's derivative with respect to per-token
//! log-probabilities and hand it to an [`apr_model::learner::Learner`]. One loop
//! ([`train_loop`]) owns `metrics.jsonl` and the checkpoint cadence for both.
#![warn(missing_docs)]

pub mod error;
pub mod eval;
pub mod figures;
pub mod grpo;
pub mod metrics_log;
pub mod pipeline;
pub mod recipe;
pub mod rollout;
pub mod run_dir;
pub mod schedule;
pub mod sft;
pub mod train_loop;

pub use apr_model::optim;
pub use error::TrainError;
