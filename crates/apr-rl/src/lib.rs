//! Trainers: supervised fine-tuning on solver traces and end-to-end GRPO over parent and child
//! threads (spec §4.3, §5), and the evaluation harness both use.
#![warn(missing_docs)]

pub mod eval;
pub mod grpo;
pub mod metrics_log;
pub mod optim;
pub mod run_dir;
pub mod schedule;
pub mod sft;
