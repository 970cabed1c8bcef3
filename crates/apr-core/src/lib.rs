//! The thread protocol of Adaptive Parallel Reasoning (APR, arXiv 2504.15466).
//!
//! * [`grammar`]: the spawn and join blocks, byte-exact with the reference traces, with a strict
//!   parser that returns typed errors for any input.
//! * [`stop`]: streaming detection of stop markers while a thread decodes.
//! * [`mode`]: APR or SoS+, the one choice every layer makes.
//! * [`task`]: what the protocol asks of a task (child prompts, join messages, answers, reward).
//!
//! This crate depends on no machine-learning crate.
#![warn(missing_docs)]

pub mod decoder;
pub mod grammar;
pub mod mode;
pub mod runtime;
pub mod scripted;
pub mod slots;
pub mod step;
pub mod stop;
pub mod task;

pub use decoder::{
    BatchedDecoder, DecoderError, Horizon, Sampled, Sampling, SlotId, StepInput, TextCodec,
};
pub use grammar::{
    ends_with_spawn, join_context, split_spawn, Conditioning, GrammarError, JoinBlock, JoinEntry,
    NodeId, SpawnBlock, SpawnSplit,
};
pub use mode::Mode;
pub use slots::SlotTable;
pub use stop::{StopDetector, StopHit};
pub use task::{Task, TaskError};
