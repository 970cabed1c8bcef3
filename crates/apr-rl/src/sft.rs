//! Supervised fine-tuning on solver traces (spec §4.3): `BOS + text + EOS`, loss on every
//! non-pad token (optionally not on the prompt), length-bucketed micro-batches, AdamW with
//! warmup-cosine and clipping, accumulation, seeded order, atomic checkpoints, exact resume —
//! on either learner, and a run saved by one resumes on the other.
//!
//! The loss is the mean negative log-likelihood of the trained targets, so its derivative with
//! respect to each target's log-probability is `−1 / n`: that is all the learner is given.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use apr_countdown::pyrand::{derive_seed, PyRandom};
use apr_countdown::sft::{LossPlacement, SftSequence};
use apr_model::burn::tensor::Device;
use apr_model::checkpoint::{self, CheckpointMeta};
use apr_model::learner::{new_learner, Learner};
use apr_model::native::PackedBatch;
use apr_model::optim::AdamWConfig;
use apr_model::{AprTokenizer, ModelConfig, Precision, Weights};
use serde::{Deserialize, Serialize};

pub use crate::error::TrainError;
use crate::schedule::WarmupCosine;
use crate::train_loop::{self, Trainer};
pub use apr_model::learner::LearnerKind;

/// One tokenized training sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// `BOS + text + EOS`, truncated to the context + 1.
    pub tokens: Vec<u32>,
    /// Positions in `tokens` whose token carries no loss as a target (sorted, disjoint; empty:
    /// loss on every target).
    pub untrained: Vec<Range<usize>>,
}

impl Example {
    /// Whether the token at `position` (≥ 1) is a training target.
    pub fn trains(&self, position: usize) -> bool {
        position >= 1
            && position < self.tokens.len()
            && !self.untrained.iter().any(|r| r.contains(&position))
    }
}

/// Tokenizes SFT sequences, placing the loss by `placement` (and off the given prompt with
/// `mask_prompt`); text the tokenizer cannot encode, or a loss boundary that splits a token, is
/// an error naming the sequence.
pub fn tokenize(
    sequences: &[SftSequence],
    tokenizer: &AprTokenizer,
    context: usize,
    placement: LossPlacement,
    mask_prompt: bool,
) -> Result<Vec<Example>, String> {
    use rayon::prelude::*;
    // Parallel, and in input order: the result does not depend on the thread count.
    sequences
        .par_iter()
        .enumerate()
        .map(|(i, seq)| {
            let encode = |text: &str| {
                tokenizer
                    .encode(text)
                    .map_err(|e| format!("sequence {i}: {e}"))
            };
            let mut tokens = vec![tokenizer.bos_id()];
            tokens.extend(encode(&seq.text)?);
            tokens.push(tokenizer.eos_id());
            // Each untrained byte range becomes a token range by encoding the text up to its
            // ends: the spans end at line and tag boundaries, which no token crosses (checked).
            let mut untrained = Vec::new();
            for range in seq.untrained(placement, mask_prompt) {
                let at = |byte: usize| -> Result<usize, String> {
                    let head = seq.text.get(..byte).ok_or_else(|| {
                        format!("sequence {i}: loss boundary {byte} is not a character boundary")
                    })?;
                    let head = encode(head)?;
                    if tokens.get(1..1 + head.len()) != Some(&head[..]) {
                        return Err(format!("sequence {i}: loss boundary {byte} splits a token"));
                    }
                    Ok(1 + head.len())
                };
                let (start, end) = (at(range.start)?, at(range.end)?);
                if start < end {
                    untrained.push(start..end);
                }
            }
            tokens.truncate(context + 1);
            Ok(Example { tokens, untrained })
        })
        .collect()
}

/// Splits the last 2% of `examples` off (at least one, never all of them) for the validation
/// loss.
pub fn split_validation(examples: &mut Vec<Example>) -> Vec<Example> {
    let n = (examples.len() / 50)
        .max(1)
        .min(examples.len().saturating_sub(1));
    examples.split_off(examples.len() - n)
}

/// Micro-batches of example indices for one epoch: a seeded shuffle, then windows of examples
/// sorted by length and packed while `rows × longest ≤ batch_tokens`, then the batches shuffled.
pub fn epoch_batches(
    lengths: &[usize],
    batch_tokens: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng = PyRandom::new(derive_seed(seed, 11, epoch));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    let mut batches = Vec::new();
    for window in order.chunks(1024) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| lengths[i]);
        let mut batch: Vec<usize> = Vec::new();
        let mut longest = 0;
        for i in w {
            let l = lengths[i].max(longest);
            if !batch.is_empty() && (batch.len() + 1) * l > batch_tokens {
                batches.push(std::mem::take(&mut batch));
                longest = 0;
            }
            longest = longest.max(lengths[i]);
            batch.push(i);
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
    }
    rng.shuffle(&mut batches);
    batches
}

/// SFT settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SftConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Tokens (rows × padded length) per micro-batch.
    pub batch_tokens: usize,
    /// Micro-batches per step.
    pub accum: usize,
    /// Peak learning rate.
    pub peak_lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// Optimizer.
    pub adamw: AdamWConfig,
    /// Sequence length limit (per thread).
    pub context: usize,
    /// Seed of the data order.
    pub seed: u64,
    /// Checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// Validation loss every this many steps (0: never).
    pub eval_every: usize,
    /// What computes the gradients.
    #[serde(default)]
    pub learner: LearnerKind,
    /// What the burn learner computes its products and attention in.
    #[serde(default)]
    pub precision: Precision,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Step (1-based).
    pub step: usize,
    /// Training loss of the step (mean over its micro-batches).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (non-pad targets, with or without loss) the step processed per second.
    pub tokens_per_s: f64,
    /// Tokens processed in this step (targets, with or without loss).
    #[serde(default)]
    pub tokens: f64,
    /// Of those, the tokens that carried the loss.
    #[serde(default)]
    pub trained_tokens: f64,
    /// Validation loss, when measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Validation accuracy, when measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
}

/// `train_state.json`: where a run is.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Micro-batches consumed in all (the data cursor).
    pub batches_consumed: usize,
}

/// A training run in progress.
pub struct SftTrainer {
    /// Settings.
    pub config: SftConfig,
    /// Tokenizer.
    pub tokenizer: AprTokenizer,
    learner: Box<dyn Learner>,
    schedule: WarmupCosine,
    examples: Vec<Example>,
    val: Vec<Example>,
    state: TrainState,
    out: PathBuf,
    /// Batches of the current epoch, cached.
    epoch_cache: Option<(u64, Vec<Vec<usize>>)>,
}

impl SftTrainer {
    /// A new run from fresh or given weights, or the continuation of the run in `out` when
    /// `resume` is set and a checkpoint exists there.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: SftConfig,
        model_config: ModelConfig,
        init: Weights,
        tokenizer: AprTokenizer,
        examples: Vec<Example>,
        val: Vec<Example>,
        out: &Path,
        device: &Device,
        resume: bool,
    ) -> Result<Self, TrainError> {
        let ckpt_dir = out.join("checkpoint");
        let mut state = TrainState::default();
        checkpoint::recover(&ckpt_dir)?;
        let (model_config, weights) = if resume && ckpt_dir.exists() {
            let ck = checkpoint::load(&ckpt_dir)?;
            let path = ckpt_dir.join("train_state.json");
            let text = std::fs::read_to_string(&path).map_err(|e| TrainError::file(&path, e))?;
            state = serde_json::from_str(&text).map_err(|e| TrainError::file(&path, e))?;
            (ck.meta.model, ck.weights)
        } else {
            (model_config, init)
        };
        let mut learner = new_learner(
            config.learner,
            &model_config,
            &weights,
            config.adamw,
            device,
            config.precision,
        )?;
        if state.step > 0 {
            let saved = checkpoint::read_safetensors(&ckpt_dir.join("optimizer.safetensors"))?;
            learner.restore_optimizer(state.step as u64, &saved)?;
        }
        let schedule = WarmupCosine {
            peak: config.peak_lr,
            min: config.min_lr,
            warmup: config.warmup,
            total: config.steps,
        };
        std::fs::create_dir_all(out).map_err(|e| TrainError::file(out, e))?;
        Ok(SftTrainer {
            config,
            tokenizer,
            learner,
            schedule,
            examples,
            val,
            state,
            out: out.to_owned(),
            epoch_cache: None,
        })
    }

    /// Steps done so far.
    pub fn step(&self) -> usize {
        self.state.step
    }

    fn batch(&mut self, index: usize) -> Vec<usize> {
        let lengths: Vec<usize> = self.examples.iter().map(|e| e.tokens.len()).collect();
        let mut epoch = 0u64;
        let mut offset = index;
        loop {
            if self.epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let batches =
                    epoch_batches(&lengths, self.config.batch_tokens, self.config.seed, epoch);
                self.epoch_cache = Some((epoch, batches));
            }
            let n = self.epoch_cache.as_ref().map_or(0, |(_, b)| b.len());
            if n == 0 {
                return Vec::new();
            }
            if offset < n {
                return self
                    .epoch_cache
                    .as_ref()
                    .map(|(_, b)| b[offset].clone())
                    .unwrap_or_default();
            }
            offset -= n;
            epoch += 1;
        }
    }

    /// Which learner computes the gradients.
    pub fn learner(&self) -> LearnerKind {
        self.learner.kind()
    }

    /// One optimizer step over `accum` micro-batches.
    pub fn train_step(&mut self) -> Result<StepMetrics, TrainError> {
        let start = Instant::now();
        let accum = self.config.accum.max(1);
        let step = self.state.step + 1;
        let (mut loss_sum, mut tokens, mut trained_tokens) = (0.0, 0.0, 0.0);
        for _ in 0..accum {
            let idx = self.batch(self.state.batches_consumed);
            self.state.batches_consumed += 1;
            if idx.is_empty() {
                return Err(TrainError::NoExamples);
            }
            let batch: Vec<&Example> = idx.iter().map(|&i| &self.examples[i]).collect();
            tokens += batch
                .iter()
                .map(|e| e.tokens.len().saturating_sub(1))
                .sum::<usize>() as f64;
            let (packed, weights) = pack(&batch);
            let logprobs = self.learner.forward(&packed)?;
            let (loss, n) = mean_nll(&logprobs, &weights);
            if !loss.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    trainer: "SFT",
                    step,
                    loss,
                });
            }
            let scale = (1.0 / n.max(1.0)) as f32;
            let dlogp: Vec<f32> = weights.iter().map(|&w| -w * scale).collect();
            self.learner.backward(&dlogp)?;
            loss_sum += loss;
            trained_tokens += n;
        }
        let lr = self.schedule.lr(self.state.step);
        let norm = self
            .learner
            .step(lr, accum)
            .map_err(|source| TrainError::Update {
                trainer: "SFT",
                step,
                source,
            })?;
        self.state.step = step;
        Ok(StepMetrics {
            step,
            loss: loss_sum / accum as f64,
            lr,
            grad_norm: norm,
            tokens_per_s: tokens / start.elapsed().as_secs_f64().max(1e-9),
            tokens,
            trained_tokens,
            val_loss: None,
            val_accuracy: None,
        })
    }

    /// The current weights.
    pub fn weights(&self) -> Weights {
        self.learner.weights()
    }

    /// Mean loss over the validation examples (no gradients).
    pub fn val_loss(&self) -> f64 {
        if self.val.is_empty() {
            return f64::NAN;
        }
        let lengths: Vec<usize> = self.val.iter().map(|e| e.tokens.len()).collect();
        let batches = epoch_batches(&lengths, self.config.batch_tokens, 0, 0);
        let (mut sum, mut count) = (0.0, 0.0);
        for idx in batches {
            let batch: Vec<&Example> = idx.iter().map(|&i| &self.val[i]).collect();
            let (packed, weights) = pack(&batch);
            let Ok(logprobs) = self.learner.score(&packed) else {
                return f64::NAN;
            };
            let (loss, n) = mean_nll(&logprobs, &weights);
            sum += loss * n;
            count += n;
        }
        sum / count.max(1.0)
    }

    /// Writes the checkpoint (weights, tokenizer, optimizer state, data cursor) atomically.
    pub fn save(&self, info: serde_json::Value) -> Result<PathBuf, TrainError> {
        let dir = self.out.join("checkpoint");
        let (_, opt) = self.learner.optimizer_state();
        let opt_bytes =
            checkpoint::safetensors_bytes(&opt).map_err(|e| TrainError::file(&dir, e))?;
        let state = serde_json::to_vec_pretty(&self.state).unwrap_or_default();
        let meta = CheckpointMeta {
            model: self.learner.config().clone(),
            info,
        };
        checkpoint::save(
            &dir,
            &meta,
            &self.weights(),
            &self.tokenizer,
            &[
                ("optimizer.safetensors", opt_bytes),
                ("train_state.json", state),
            ],
        )?;
        Ok(dir)
    }
}

/// Held-out problems for greedy accuracy during training.
#[derive(Clone, Debug)]
pub struct ValProblems {
    /// Problems.
    pub problems: Vec<apr_countdown::Problem>,
    /// APR or serial.
    pub mode: apr_core::runtime::Mode,
    /// Per-thread context.
    pub context: usize,
    /// Engine slots.
    pub slots: usize,
}

impl SftTrainer {
    /// Greedy accuracy on held-out problems through the runtime.
    pub fn val_accuracy(&self, val: &ValProblems) -> f64 {
        if val.problems.is_empty() {
            return f64::NAN;
        }
        let config = crate::eval::EvalConfig {
            runtime: apr_core::runtime::RuntimeConfig {
                mode: val.mode,
                context: val.context,
                ..Default::default()
            },
            samples: 1,
            slots: val.slots,
            seed: 0,
        };
        let context = val.context.min(self.learner.config().max_seq_len);
        let mut decoder = self
            .learner
            .decoder(val.slots.max(1), context, self.tokenizer.pad_id());
        let (_, summary) = crate::eval::evaluate_on(
            decoder.as_mut(),
            &self.tokenizer,
            &val.problems,
            &config,
            &mut |_, _| {},
        );
        summary.accuracy
    }

    /// Trains to `config.steps`: appends one JSON line per step to `OUT/metrics.jsonl`, measures
    /// validation loss (and accuracy, when `val` is given) every `eval_every` steps, checkpoints
    /// every `checkpoint_every` steps and at the end. `progress` sees every step's metrics.
    /// A non-finite loss or gradient stops the run with an error; the last checkpoint stays.
    pub fn run(
        &mut self,
        val: Option<&ValProblems>,
        progress: &mut dyn FnMut(&StepMetrics),
    ) -> Result<Vec<StepMetrics>, TrainError> {
        train_loop::run(&mut SftRun { trainer: self, val }, progress)
    }
}

/// An SFT run as the shared loop drives it: a step, then the held-out measurements it is due.
struct SftRun<'a> {
    trainer: &'a mut SftTrainer,
    val: Option<&'a ValProblems>,
}

impl Trainer for SftRun<'_> {
    type Metrics = StepMetrics;

    fn steps_done(&self) -> usize {
        self.trainer.state.step
    }

    fn steps(&self) -> usize {
        self.trainer.config.steps
    }

    fn checkpoint_every(&self) -> usize {
        self.trainer.config.checkpoint_every
    }

    fn out_dir(&self) -> &Path {
        &self.trainer.out
    }

    fn train_step(&mut self) -> Result<StepMetrics, TrainError> {
        let mut m = self.trainer.train_step()?;
        let c = &self.trainer.config;
        if c.eval_every > 0 && (m.step.is_multiple_of(c.eval_every) || m.step == c.steps) {
            m.val_loss = Some(self.trainer.val_loss()).filter(|v| v.is_finite());
            if let Some(v) = self.val {
                m.val_accuracy = Some(self.trainer.val_accuracy(v));
            }
        }
        Ok(m)
    }

    fn checkpoint(&mut self) -> Result<(), TrainError> {
        let step = self.trainer.state.step;
        self.trainer
            .save(serde_json::json!({"step": step, "trainer": "sft"}))
            .map(drop)
    }
}

/// Mean negative log-likelihood of the positions with weight 1, and how many there are.
fn mean_nll(logprobs: &[f32], weights: &[f32]) -> (f64, f64) {
    let n = weights.iter().filter(|&&w| w > 0.0).count() as f64;
    let sum: f64 = logprobs
        .iter()
        .zip(weights)
        .map(|(&lp, &w)| lp as f64 * w as f64)
        .sum();
    // Times the reciprocal, as the gradient's scale is formed.
    (-sum * (1.0 / n.max(1.0)), n)
}

/// Packs examples end to end with a loss weight (0 or 1) per position.
fn pack(batch: &[&Example]) -> (PackedBatch, Vec<f32>) {
    let seqs: Vec<&[u32]> = batch.iter().map(|e| e.tokens.as_slice()).collect();
    let packed = PackedBatch::from_sequences(&seqs);
    let mut weights = Vec::with_capacity(packed.len());
    for e in batch.iter().filter(|e| e.tokens.len() >= 2) {
        weights.extend((1..e.tokens.len()).map(|target| e.trains(target) as u8 as f32));
    }
    (packed, weights)
}
