//! Why a training run stopped.

use std::path::{Path, PathBuf};

use apr_model::checkpoint::CheckpointError;
use apr_model::learner::LearnError;

/// Failure of a training run, one line each.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Checkpoint I/O.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A model, batch or optimizer state the learner cannot use.
    #[error(transparent)]
    Learn(#[from] LearnError),
    /// A file of the run that cannot be read, written or parsed, or that does not fit the run.
    #[error("{}: {message}", path.display())]
    File {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A training sequence the tokenizer cannot encode, or whose loss boundaries split a token.
    #[error("tokenizing the traces: {0}")]
    Tokenize(String),
    /// Nothing to train on.
    #[error("no training examples")]
    NoExamples,
    /// A step whose loss is NaN or infinite; the last checkpoint stays.
    #[error("{trainer} step {step}: non-finite loss ({loss})")]
    NonFiniteLoss {
        /// `SFT` or `GRPO`.
        trainer: &'static str,
        /// The step (1-based).
        step: usize,
        /// The loss.
        loss: f64,
    },
    /// An update the learner refused (non-finite gradients, nothing accumulated).
    #[error("{trainer} step {step}: {source}")]
    Update {
        /// `SFT` or `GRPO`.
        trainer: &'static str,
        /// The step (1-based).
        step: usize,
        /// Why.
        source: LearnError,
    },
}

impl TrainError {
    /// A [`TrainError::File`] error.
    pub fn file(path: &Path, message: impl std::fmt::Display) -> Self {
        TrainError::File {
            path: path.to_owned(),
            message: message.to_string(),
        }
    }
}
