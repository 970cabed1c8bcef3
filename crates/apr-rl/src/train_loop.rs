//! The loop both trainers share: take a step, append its line to `metrics.jsonl`, report it,
//! and checkpoint every `checkpoint_every` steps and at the end. A resumed run starts from its
//! checkpoint's step, and the log first drops the lines of steps after it (see
//! [`crate::metrics_log`]), so a killed run continues as if it had never stopped.

use std::path::Path;

use serde::Serialize;

use crate::error::TrainError;
use crate::metrics_log::MetricsLog;

/// A run the loop can drive.
pub trait Trainer {
    /// One line of `metrics.jsonl`.
    type Metrics: Serialize;
    /// Steps done (those in the last checkpoint, on resume).
    fn steps_done(&self) -> usize;
    /// Steps to reach.
    fn steps(&self) -> usize;
    /// Checkpoint cadence in steps.
    fn checkpoint_every(&self) -> usize;
    /// The run directory (`metrics.jsonl`, `checkpoint/`).
    fn out_dir(&self) -> &Path;
    /// One step.
    fn train_step(&mut self) -> Result<Self::Metrics, TrainError>;
    /// Writes the checkpoint of the steps done.
    fn checkpoint(&mut self) -> Result<(), TrainError>;
}

/// Trains to `trainer.steps()`; `progress` sees every step's metrics. An error stops the run
/// with the last checkpoint in place.
pub fn run<T: Trainer>(
    trainer: &mut T,
    progress: &mut dyn FnMut(&T::Metrics),
) -> Result<Vec<T::Metrics>, TrainError> {
    let mut log = MetricsLog::open(trainer.out_dir(), trainer.steps_done())?;
    let mut all = Vec::new();
    while trainer.steps_done() < trainer.steps() {
        let m = trainer.train_step()?;
        log.write(&m)?;
        progress(&m);
        let step = trainer.steps_done();
        if step.is_multiple_of(trainer.checkpoint_every().max(1)) || step == trainer.steps() {
            trainer.checkpoint()?;
        }
        all.push(m);
    }
    Ok(all)
}
