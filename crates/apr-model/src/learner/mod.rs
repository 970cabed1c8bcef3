//! The seam between trainers and what computes gradients.
//!
//! A [`Learner`] scores packed batches (`log p(target)` at every position), backpropagates a
//! loss given only its derivative with respect to each of those log-probabilities, and applies
//! AdamW. Every loss the trainers use — SFT's cross-entropy, GRPO's clipped objective with its KL
//! term — is a function of per-token log-probabilities, so a trainer computes `d loss / d logp`
//! on the host and never touches a tensor. Weights and optimizer moments travel under Hugging
//! Face names, so a run saved by one learner resumes on the other.
//!
//! * [`NativeLearner`]: the hand-differentiated CPU model ([`crate::native`]);
//! * [`BurnLearner`]: burn autodiff on any backend. It pads a packed batch internally and
//!   backpropagates `Σ stopgrad(dlogp) · logp`, whose gradient is exactly the loss's.

mod autodiff;
mod native;

use apr_core::decoder::BatchedDecoder;
use serde::{Deserialize, Serialize};

pub use self::autodiff::BurnLearner;
pub use self::native::NativeLearner;
use crate::config::ModelConfig;
use crate::model::Weights;
use crate::native::PackedBatch;
use crate::optim::AdamWConfig;

/// Which learner computes the gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LearnerKind {
    /// The hand-differentiated CPU model ([`crate::native`]): packed batches, no padding.
    #[default]
    Native,
    /// burn's autodiff on the trainer's device (any backend).
    Burn,
}

impl LearnerKind {
    /// The faster learner for a device: native on the CPU backend, burn autodiff on a GPU.
    pub fn for_device(device: &burn::tensor::Device) -> Self {
        if crate::backend::is_cpu(device) {
            LearnerKind::Native
        } else {
            LearnerKind::Burn
        }
    }
}

impl std::str::FromStr for LearnerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(LearnerKind::Native),
            "burn" => Ok(LearnerKind::Burn),
            other => Err(format!(
                "unknown learner {other:?} (expected native or burn)"
            )),
        }
    }
}

/// Why a learner refused a call.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LearnError {
    /// Weights that do not fit the configuration.
    #[error(transparent)]
    Weights(#[from] crate::model::WeightsError),
    /// A batch the model cannot run.
    #[error(transparent)]
    Batch(#[from] crate::native::BatchError),
    /// `backward` without a `forward` to go back through, or with another batch's length.
    #[error("backward needs the forward pass of the same batch ({0})")]
    NoForward(String),
    /// The optimizer refused the update (non-finite or missing gradients).
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimError),
    /// Saved optimizer moments that do not fit this model.
    #[error("optimizer state: {0}")]
    State(String),
    /// A compute precision the device cannot run.
    #[error("{0}")]
    Precision(String),
}

/// What a trainer needs of a model under training.
pub trait Learner {
    /// Which learner this is.
    fn kind(&self) -> LearnerKind;

    /// The model's shape.
    fn config(&self) -> &ModelConfig;

    /// `log p(target)` at every position of `batch`, keeping what [`Learner::backward`] needs.
    fn forward(&mut self, batch: &PackedBatch) -> Result<Vec<f32>, LearnError>;

    /// `log p(target)` at every position of `batch`, keeping nothing (a frozen model's score).
    fn score(&self, batch: &PackedBatch) -> Result<Vec<f32>, LearnError>;

    /// Adds to the accumulated gradient that of a loss whose derivative with respect to each
    /// position's log-probability (from the last [`Learner::forward`]) is `dlogp`.
    fn backward(&mut self, dlogp: &[f32]) -> Result<(), LearnError>;

    /// One AdamW update at learning rate `lr` from the accumulated gradient divided by
    /// `average_over` (the micro-batches of a mean; 1 for a sum); clears the accumulator and
    /// returns the gradient norm before clipping. A refused update leaves the weights as they are.
    fn step(&mut self, lr: f64, average_over: usize) -> Result<f64, LearnError>;

    /// The weights, HF names and layout.
    fn weights(&self) -> Weights;

    /// The optimizer's step count and moments, named `m.<parameter>` and `v.<parameter>` in HF
    /// layout: what a checkpoint's `optimizer.safetensors` holds, whichever learner wrote it.
    fn optimizer_state(&self) -> (u64, Weights);

    /// Restores a state given as by [`Learner::optimizer_state`] at optimizer step `steps`.
    fn restore_optimizer(&mut self, steps: u64, state: &Weights) -> Result<(), LearnError>;

    /// A decoder over the current weights, for rollouts and evaluation.
    fn decoder(&self, slots: usize, context: usize, pad: u32) -> Box<dyn BatchedDecoder>;
}

/// A learner of `kind` over `weights` on `device` (the native learner always computes on the
/// host, in f32), with a fresh AdamW, computing its products and attention in `precision`.
pub fn new_learner(
    kind: LearnerKind,
    config: &ModelConfig,
    weights: &Weights,
    adamw: AdamWConfig,
    device: &burn::tensor::Device,
    precision: crate::Precision,
) -> Result<Box<dyn Learner>, LearnError> {
    let learner: Box<dyn Learner> = match (kind, precision) {
        (LearnerKind::Native, crate::Precision::F32) => {
            Box::new(NativeLearner::new(config, weights, adamw)?)
        }
        (LearnerKind::Native, p) => {
            return Err(LearnError::Precision(format!(
                "{p} compute needs the burn learner (--learner burn); the native one is f32"
            )))
        }
        (LearnerKind::Burn, p) => {
            Box::new(BurnLearner::new(config, weights, adamw, device)?.with_precision(p)?)
        }
    };
    Ok(learner)
}
