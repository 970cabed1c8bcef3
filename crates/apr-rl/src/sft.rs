//! Supervised fine-tuning on solver traces (spec §4.3): `BOS + text + EOS`, loss on every
//! non-pad token (optionally not on the prompt), length-bucketed micro-batches, AdamW with
//! warmup-cosine and clipping, accumulation, seeded order, atomic checkpoints, exact resume.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use apr_countdown::pyrand::{derive_seed, PyRandom};
use apr_countdown::sft::{LossPlacement, SftSequence};
use apr_model::burn::tensor::activation::log_softmax;
use apr_model::burn::tensor::{Device, Int, Tensor, TensorData};
use apr_model::checkpoint::{self, CheckpointMeta};
use apr_model::native::{NativeModel, PackedBatch};
use apr_model::{AprTokenizer, Model, ModelConfig, Weights};
use serde::{Deserialize, Serialize};

use crate::metrics_log::MetricsLog;
use crate::optim::{AdamW, AdamWConfig, FlatAdamW};
use crate::schedule::WarmupCosine;

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

/// Pads a batch: `(inputs [b, L], targets [b, L], mask [b, L])`, L = longest − 1.
pub fn pad_batch(
    examples: &[&Example],
    pad: u32,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>, Tensor<2>) {
    let b = examples.len();
    let l = examples
        .iter()
        .map(|e| e.tokens.len())
        .max()
        .unwrap_or(2)
        .max(2)
        - 1;
    let mut inputs = Vec::with_capacity(b * l);
    let mut targets = Vec::with_capacity(b * l);
    let mut mask = Vec::with_capacity(b * l);
    for e in examples {
        for i in 0..l {
            inputs.push(e.tokens.get(i).copied().unwrap_or(pad) as i64);
            let target = e.tokens.get(i + 1).copied();
            targets.push(target.unwrap_or(pad) as i64);
            mask.push(e.trains(i + 1) as u8 as f32);
        }
    }
    (
        Tensor::from_data(TensorData::new(inputs, [b, l]), device),
        Tensor::from_data(TensorData::new(targets, [b, l]), device),
        Tensor::from_data(TensorData::new(mask, [b, l]), device),
    )
}

/// Mean negative log-likelihood of the masked targets.
pub fn masked_nll(
    model: &Model,
    inputs: Tensor<2, Int>,
    targets: Tensor<2, Int>,
    mask: Tensor<2>,
) -> Tensor<1> {
    let logits = model.forward(inputs);
    let [b, l, _] = logits.dims();
    let logp = log_softmax(logits, 2)
        .gather(2, targets.reshape([b, l, 1]))
        .reshape([b, l]);
    let count = mask.clone().sum().clamp_min(1.0);
    -(logp * mask).sum() / count
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
}

/// What computes the gradients of a training step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LearnerKind {
    /// The hand-differentiated CPU model ([`apr_model::native`]): packed batches, no padding.
    #[default]
    Native,
    /// burn's autodiff on the trainer's device (any backend).
    Burn,
}

impl LearnerKind {
    /// The faster learner for a device: native on the CPU backend, burn autodiff on a GPU.
    pub fn for_device(device: &Device) -> Self {
        if apr_model::backend::is_cpu(device) {
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

/// The model being trained and its optimizer.
// One per trainer: the variants' size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Learner {
    Burn {
        model: Model,
        optim: AdamW,
    },
    Native {
        model: NativeModel,
        optim: FlatAdamW,
        grads: Vec<f32>,
    },
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
    model_config: ModelConfig,
    learner: Learner,
    schedule: WarmupCosine,
    examples: Vec<Example>,
    val: Vec<Example>,
    state: TrainState,
    out: PathBuf,
    device: Device,
    /// Batches of the current epoch, cached.
    epoch_cache: Option<(u64, Vec<Vec<usize>>)>,
}

/// Failure of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Checkpoint I/O.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// Anything else (with its own message).
    #[error("{0}")]
    Other(String),
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
            let text = std::fs::read_to_string(ckpt_dir.join("train_state.json"))
                .map_err(|e| TrainError::Other(format!("{}: {e}", ckpt_dir.display())))?;
            state = serde_json::from_str(&text).map_err(|e| {
                TrainError::Other(format!(
                    "{}: {e}",
                    ckpt_dir.join("train_state.json").display()
                ))
            })?;
            (ck.meta.model, ck.weights)
        } else {
            (model_config, init)
        };
        let saved_optimizer =
            || checkpoint::read_safetensors(&ckpt_dir.join("optimizer.safetensors"));
        let learner = match config.learner {
            LearnerKind::Burn => {
                let model = Model::new(model_config.clone(), &weights, &device.clone().autodiff())
                    .map_err(|e| TrainError::Other(e.to_string()))?;
                let mut optim = AdamW::new(config.adamw);
                if state.step > 0 {
                    optim
                        .restore(&model.llama, device, state.step as u64, &saved_optimizer()?)
                        .map_err(TrainError::Other)?;
                }
                Learner::Burn { model, optim }
            }
            LearnerKind::Native => {
                let model = NativeModel::from_weights(&model_config, &weights)
                    .map_err(|e| TrainError::Other(e.to_string()))?;
                let mut optim = FlatAdamW::new(config.adamw, model.num_params());
                if state.step > 0 {
                    optim
                        .restore_named(&model, state.step as u64, &saved_optimizer()?)
                        .map_err(|e| TrainError::Other(format!("{}: {e}", ckpt_dir.display())))?;
                }
                let grads = vec![0.0; model.num_params()];
                Learner::Native {
                    model,
                    optim,
                    grads,
                }
            }
        };
        let schedule = WarmupCosine {
            peak: config.peak_lr,
            min: config.min_lr,
            warmup: config.warmup,
            total: config.steps,
        };
        std::fs::create_dir_all(out)
            .map_err(|e| TrainError::Other(format!("{}: {e}", out.display())))?;
        Ok(SftTrainer {
            config,
            tokenizer,
            model_config,
            learner,
            schedule,
            examples,
            val,
            state,
            out: out.to_owned(),
            device: device.clone(),
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

    /// One optimizer step over `accum` micro-batches.
    pub fn train_step(&mut self) -> Result<StepMetrics, TrainError> {
        let start = Instant::now();
        let accum = self.config.accum.max(1);
        let mut loss_sum = 0.0;
        let (mut tokens, mut trained_tokens) = (0.0, 0.0);
        for _ in 0..accum {
            let idx = self.batch(self.state.batches_consumed);
            self.state.batches_consumed += 1;
            if idx.is_empty() {
                return Err(TrainError::Other("no training examples".into()));
            }
            let batch: Vec<&Example> = idx.iter().map(|&i| &self.examples[i]).collect();
            tokens += batch
                .iter()
                .map(|e| e.tokens.len().saturating_sub(1))
                .sum::<usize>() as f64;
            let (loss, n) = match &mut self.learner {
                Learner::Burn { model, optim } => {
                    let device = model.rope_device();
                    let (inputs, targets, mask) =
                        pad_batch(&batch, self.tokenizer.pad_id(), &device);
                    let n = scalar(mask.clone().sum());
                    let loss = masked_nll(model, inputs, targets, mask);
                    let value = scalar(loss.clone());
                    if value.is_finite() {
                        optim.accumulate(&model.llama, &loss.backward());
                    }
                    (value, n)
                }
                Learner::Native { model, grads, .. } => {
                    let (packed, weights) = pack(&batch);
                    let n = weights.iter().filter(|&&w| w > 0.0).count() as f64;
                    let fwd = model
                        .forward(&packed)
                        .map_err(|e| TrainError::Other(e.to_string()))?;
                    let scale = 1.0 / n.max(1.0);
                    let value = -fwd
                        .logprobs
                        .iter()
                        .zip(&weights)
                        .map(|(&lp, &w)| lp as f64 * w as f64)
                        .sum::<f64>()
                        * scale;
                    let dlogp: Vec<f32> = weights.iter().map(|&w| -w * scale as f32).collect();
                    if value.is_finite() {
                        model.backward(fwd, &dlogp, grads);
                    }
                    (value, n)
                }
            };
            if !loss.is_finite() {
                return Err(TrainError::Other(format!(
                    "non-finite loss ({loss}) at step {}",
                    self.state.step + 1
                )));
            }
            loss_sum += loss;
            trained_tokens += n;
        }
        let lr = self.schedule.lr(self.state.step);
        let step = self.state.step + 1;
        let norm = match &mut self.learner {
            Learner::Burn { model, optim } => {
                // Parameters are reference-counted tensors: the clone is cheap and is replaced.
                match optim.step(model.llama.clone(), lr) {
                    Ok((llama, norm)) => {
                        model.llama = llama;
                        Ok(norm)
                    }
                    Err((llama, e)) => {
                        model.llama = llama;
                        Err(e)
                    }
                }
            }
            Learner::Native {
                model,
                optim,
                grads,
            } => {
                let inv = 1.0 / accum as f32;
                grads.iter_mut().for_each(|g| *g *= inv);
                let result = optim.step(&mut model.params, grads, lr);
                grads.fill(0.0);
                result
            }
        }
        .map_err(|e| TrainError::Other(format!("step {step}: {e}")))?;
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
        match &self.learner {
            Learner::Burn { model, .. } => model.llama.to_weights(),
            Learner::Native { model, .. } => model.to_weights(),
        }
    }

    /// The current model for inference, on the trainer's (non-autodiff) device.
    pub fn inference_model(&self) -> Model {
        match &self.learner {
            Learner::Burn { model, .. } => model.valid(),
            Learner::Native { model, .. } => {
                Model::new(self.model_config.clone(), &model.to_weights(), &self.device)
                    .expect("native weights have the configuration's shapes")
            }
        }
    }

    /// Mean loss over the validation examples (no gradients).
    pub fn val_loss(&self) -> f64 {
        if self.val.is_empty() {
            return f64::NAN;
        }
        let model = self.inference_model();
        let lengths: Vec<usize> = self.val.iter().map(|e| e.tokens.len()).collect();
        let batches = epoch_batches(&lengths, self.config.batch_tokens, 0, 0);
        let (mut sum, mut count) = (0.0, 0.0);
        for idx in batches {
            let batch: Vec<&Example> = idx.iter().map(|&i| &self.val[i]).collect();
            let (inputs, targets, mask) = pad_batch(&batch, self.tokenizer.pad_id(), &self.device);
            let n = scalar(mask.clone().sum());
            let loss = scalar(masked_nll(&model, inputs, targets, mask));
            sum += loss * n;
            count += n;
        }
        sum / count.max(1.0)
    }

    /// Writes the checkpoint (weights, tokenizer, optimizer state, data cursor) atomically.
    pub fn save(&self, info: serde_json::Value) -> Result<PathBuf, TrainError> {
        let dir = self.out.join("checkpoint");
        let opt = match &self.learner {
            Learner::Burn { optim, .. } => optim.state().1,
            Learner::Native { model, optim, .. } => optim.named_state(model),
        };
        let opt_bytes = checkpoint::safetensors_bytes(&opt).map_err(TrainError::Other)?;
        let state = serde_json::to_vec_pretty(&self.state).unwrap_or_default();
        let meta = CheckpointMeta {
            model: self.model_config.clone(),
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
        let (_, summary) = crate::eval::evaluate(
            &self.inference_model(),
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
        let mut log = MetricsLog::open(&self.out, self.state.step)?;
        let mut all = Vec::new();
        while self.state.step < self.config.steps {
            let mut m = self.train_step()?;
            let step = m.step;
            if self.config.eval_every > 0
                && (step.is_multiple_of(self.config.eval_every) || step == self.config.steps)
            {
                m.val_loss = Some(self.val_loss()).filter(|v| v.is_finite());
                if let Some(v) = val {
                    m.val_accuracy = Some(self.val_accuracy(v));
                }
            }
            log.write(&m)?;
            progress(&m);
            if step.is_multiple_of(self.config.checkpoint_every.max(1)) || step == self.config.steps
            {
                self.save(serde_json::json!({"step": step, "trainer": "sft"}))?;
            }
            all.push(m);
        }
        Ok(all)
    }
}

/// The value of a one-element tensor (NaN if it has none).
fn scalar(t: Tensor<1>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
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
