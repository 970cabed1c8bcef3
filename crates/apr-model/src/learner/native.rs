//! [`Learner`] over the hand-differentiated CPU model: the tape of the last forward pass waits for
//! its backward pass, gradients accumulate in one flat vector, [`FlatAdamW`] applies them.

use apr_core::decoder::BatchedDecoder;

use super::{LearnError, Learner, LearnerKind};
use crate::config::ModelConfig;
use crate::model::Weights;
use crate::native::{Forward, NativeEngine, NativeModel, PackedBatch};
use crate::optim::{AdamWConfig, FlatAdamW, OptimError};

/// The native model, its optimizer, its gradient accumulator and the pending tape.
pub struct NativeLearner {
    model: NativeModel,
    optim: FlatAdamW,
    /// Accumulated gradients, allocated at the first backward pass (GRPO's reference model is
    /// only scored).
    grads: Vec<f32>,
    /// Backward passes accumulated in `grads` since the last step.
    accumulated: usize,
    tape: Option<Forward>,
}

impl NativeLearner {
    /// A learner over `weights`, with a fresh optimizer.
    pub fn new(
        config: &ModelConfig,
        weights: &Weights,
        adamw: AdamWConfig,
    ) -> Result<Self, LearnError> {
        let model = NativeModel::from_weights(config, weights)?;
        let n = model.num_params();
        Ok(NativeLearner {
            optim: FlatAdamW::new(adamw, n),
            grads: Vec::new(),
            accumulated: 0,
            tape: None,
            model,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &NativeModel {
        &self.model
    }
}

impl Learner for NativeLearner {
    fn kind(&self) -> LearnerKind {
        LearnerKind::Native
    }

    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn forward(&mut self, batch: &PackedBatch) -> Result<Vec<f32>, LearnError> {
        self.tape = None;
        let fwd = self.model.forward(batch)?;
        let logprobs = fwd.logprobs.clone();
        self.tape = Some(fwd);
        Ok(logprobs)
    }

    fn score(&self, batch: &PackedBatch) -> Result<Vec<f32>, LearnError> {
        Ok(self.model.forward(batch)?.logprobs)
    }

    fn backward(&mut self, dlogp: &[f32]) -> Result<(), LearnError> {
        let tape = self
            .tape
            .take()
            .ok_or_else(|| LearnError::NoForward("none".into()))?;
        if tape.logprobs.len() != dlogp.len() {
            return Err(LearnError::NoForward(format!(
                "{} positions, {} derivatives",
                tape.logprobs.len(),
                dlogp.len()
            )));
        }
        if self.grads.is_empty() {
            self.grads = vec![0.0; self.model.num_params()];
        }
        self.model.backward(tape, dlogp, &mut self.grads);
        self.accumulated += 1;
        Ok(())
    }

    fn step(&mut self, lr: f64, average_over: usize) -> Result<f64, LearnError> {
        if std::mem::take(&mut self.accumulated) == 0 {
            return Err(OptimError::Empty.into());
        }
        if average_over > 1 {
            let inv = 1.0 / average_over as f32;
            self.grads.iter_mut().for_each(|g| *g *= inv);
        }
        let result = self.optim.step(&mut self.model.params, &self.grads, lr);
        self.grads.fill(0.0);
        result.map_err(LearnError::from)
    }

    fn weights(&self) -> Weights {
        self.model.to_weights()
    }

    fn optimizer_state(&self) -> (u64, Weights) {
        (self.optim.steps(), self.optim.named_state(&self.model))
    }

    fn restore_optimizer(&mut self, steps: u64, state: &Weights) -> Result<(), LearnError> {
        self.optim
            .restore_named(&self.model, steps, state)
            .map_err(LearnError::State)
    }

    fn decoder(&self, slots: usize, context: usize, _pad: u32) -> Box<dyn BatchedDecoder> {
        Box::new(NativeEngine::new(self.model.clone(), slots, context))
    }
}
