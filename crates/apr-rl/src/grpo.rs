//! End-to-end GRPO over parent and child threads (spec §5.1–5.2).
//!
//! Each step rolls every prompt out `group` times through the APR runtime with the current
//! policy; a rollout's reward is 1 when the strict verifier accepts its final answer. The
//! group-normalised advantage of a rollout is given to *every* thread of its tree (each parent
//! segment and every child) on the tokens the model sampled (prompts and runtime-injected join
//! text are masked), weighted by 1/n for a tree of n threads. The loss is the clipped policy
//! gradient against the rollout policy plus β·k3 KL to a frozen reference.

use std::path::{Path, PathBuf};

use apr_core::runtime::{run, Finish, Job, ProblemResult, RuntimeConfig};
use apr_countdown::{CountdownTask, Problem};
use apr_model::burn::tensor::activation::log_softmax;
use apr_model::burn::tensor::{Device, Int, Tensor, TensorData};
use apr_model::checkpoint::{self, CheckpointMeta};
use apr_model::engine::engine_for;
use apr_model::native::{NativeEngine, NativeModel, PackedBatch};
use apr_model::{AprTokenizer, Model, ModelConfig, Weights};
use serde::{Deserialize, Serialize};

use crate::metrics_log::MetricsLog;
use crate::optim::{AdamW, AdamWConfig, FlatAdamW};
use crate::sft::{LearnerKind, TrainError};

/// GRPO settings (reference defaults: spec §5.3).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GrpoConfig {
    /// Steps.
    pub steps: usize,
    /// Prompts per step.
    pub prompts: usize,
    /// Rollouts per prompt (G).
    pub group: usize,
    /// Learning rate.
    pub lr: f64,
    /// PPO clip ε.
    pub clip_eps: f64,
    /// KL weight β (0.001 APR, 0.01 SoS+).
    pub kl_beta: f64,
    /// Optimizer updates per rollout batch.
    pub inner_steps: usize,
    /// Divide advantages by the group's standard deviation (off: Dr.GRPO).
    pub normalize_std: bool,
    /// Runtime of the rollouts (mode, context, budgets, temperature).
    pub runtime: RuntimeConfig,
    /// Engine slots for rollouts.
    pub slots: usize,
    /// Tokens per training micro-batch.
    pub batch_tokens: usize,
    /// Seed of prompt order and sampling.
    pub seed: u64,
    /// Checkpoint every this many steps.
    pub checkpoint_every: usize,
    /// What computes the gradients (the native learner also rolls out with the native engine).
    #[serde(default)]
    pub learner: LearnerKind,
}

/// `(r − mean) / (std + 1e-10)` per consecutive group of `group` rewards (population std), or
/// `r − mean` without normalisation.
pub fn advantages(rewards: &[f32], group: usize, normalize_std: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group.max(1)) {
        let n = g.len() as f64;
        let mean = g.iter().map(|&r| r as f64).sum::<f64>() / n;
        let std = (g.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        for &r in g {
            let a = r as f64 - mean;
            out.push(if normalize_std { a / (std + 1e-10) } else { a } as f32);
        }
    }
    out
}

/// One thread segment as a training sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySeq {
    /// Context then generated tokens (then EOS when the model ended the segment).
    pub tokens: Vec<u32>,
    /// `trained[t]`: whether the token at position `t + 1` is trained (sampled by the policy).
    pub trained: Vec<bool>,
    /// The rollout's advantage.
    pub advantage: f32,
    /// 1 / (threads in the rollout).
    pub weight: f32,
    /// Rollout index.
    pub rollout: usize,
}

impl PolicySeq {
    /// Trained tokens.
    pub fn trained_count(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }
}

/// Every segment of every rollout as a training sequence, with its rollout's advantage and
/// 1/n weight. Segments without a sampled token are dropped (nothing to train).
pub fn policy_sequences(results: &[ProblemResult], advantages: &[f32], eos: u32) -> Vec<PolicySeq> {
    let mut out = Vec::new();
    for (i, (res, &adv)) in results.iter().zip(advantages).enumerate() {
        let n = res.segments.len().max(1) as f32;
        for seg in &res.segments {
            let mut tokens = seg.prompt_tokens.clone();
            let mut trained = vec![false; tokens.len().saturating_sub(1)];
            for (&tok, &sampled) in seg.tokens.iter().zip(&seg.sampled) {
                tokens.push(tok);
                trained.push(sampled);
            }
            if matches!(seg.finish, Finish::Eos | Finish::Spawn) {
                tokens.push(eos);
                trained.push(true);
            }
            if tokens.len() < 2 || !trained.iter().any(|&t| t) {
                continue;
            }
            out.push(PolicySeq {
                tokens,
                trained,
                advantage: adv,
                weight: 1.0 / n,
                rollout: i,
            });
        }
    }
    out
}

/// Per-token weights of the policy-gradient term in the total loss: a trained token of sequence
/// `s` weighs `A_s · w_s / (T_s · N)` (T_s trained tokens of s, N sequences). Zero elsewhere.
pub fn policy_token_weights(seqs: &[PolicySeq]) -> Vec<Vec<f32>> {
    let n = seqs.len().max(1) as f32;
    seqs.iter()
        .map(|s| {
            let t = s.trained_count().max(1) as f32;
            s.trained
                .iter()
                .map(|&tr| {
                    if tr {
                        s.advantage * s.weight / (t * n)
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect()
}

/// The loss terms of one trained token and their derivatives with respect to its log-probability
/// under the policy being trained.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenObjective {
    /// Clipped policy-gradient term `max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`, `ρ = exp(logp − old)`.
    pub pg: f64,
    /// Its derivative.
    pub dpg: f64,
    /// k3 estimate of KL(π ‖ π_ref): `exp(ref − logp) − (ref − logp) − 1`.
    pub k3: f64,
    /// Its derivative.
    pub dk3: f64,
    /// Whether the clipped branch is the larger one (the token contributes no policy gradient).
    pub clipped: bool,
}

/// [`TokenObjective`] of a token with log-probabilities `logp` (current policy), `old` (rollout
/// policy) and `reference`, and advantage `advantage`.
pub fn token_objective(
    logp: f64,
    old: f64,
    reference: f64,
    advantage: f64,
    eps: f64,
) -> TokenObjective {
    let ratio = (logp - old).exp();
    let unclipped = -advantage * ratio;
    let clipped = -advantage * ratio.clamp(1.0 - eps, 1.0 + eps);
    // At a tie (ρ inside the clip range) the unclipped branch carries the gradient, as burn's
    // `max_pair` does; when the clipped branch wins, ρ is outside the range and the clamp is flat.
    let (pg, dpg) = if unclipped >= clipped {
        (unclipped, unclipped)
    } else {
        (clipped, 0.0)
    };
    let diff = reference - logp;
    TokenObjective {
        pg,
        dpg,
        k3: diff.exp() - diff - 1.0,
        dk3: 1.0 - diff.exp(),
        clipped: clipped > unclipped,
    }
}

struct Batch {
    inputs: Tensor<2, Int>,
    targets: Tensor<2, Int>,
    mask: Tensor<2>,
    pg_weight: Tensor<2>,
    kl_weight: Tensor<2>,
    advantage: Tensor<2>,
}

fn make_batch(seqs: &[&PolicySeq], n_total: usize, beta: f64, pad: u32, device: &Device) -> Batch {
    let b = seqs.len();
    let l = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(2) - 1;
    let (mut inputs, mut targets, mut mask, mut pgw, mut klw, mut adv) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for s in seqs {
        let t = s.trained_count().max(1) as f64;
        for i in 0..l {
            inputs.push(s.tokens.get(i).copied().unwrap_or(pad) as i64);
            targets.push(s.tokens.get(i + 1).copied().unwrap_or(pad) as i64);
            let m = s.trained.get(i).copied().unwrap_or(false);
            mask.push(m as u8 as f32);
            pgw.push((s.weight as f64 / (t * n_total as f64)) as f32);
            klw.push((beta / (t * n_total as f64)) as f32);
            adv.push(s.advantage);
        }
    }
    let f = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [b, l]), device);
    Batch {
        inputs: Tensor::from_data(TensorData::new(inputs, [b, l]), device),
        targets: Tensor::from_data(TensorData::new(targets, [b, l]), device),
        mask: f(mask),
        pg_weight: f(pgw),
        kl_weight: f(klw),
        advantage: f(adv),
    }
}

fn token_logp(model: &Model, inputs: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<2> {
    let logits = model.forward(inputs);
    let [b, l, _] = logits.dims();
    log_softmax(logits, 2)
        .gather(2, targets.reshape([b, l, 1]))
        .reshape([b, l])
}

/// Micro-batches of sequence indices under a token budget (sorted by length).
fn micro_batches(seqs: &[PolicySeq], batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].tokens.len());
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in order {
        let l = seqs[i].tokens.len();
        if !cur.is_empty() && (cur.len() + 1) * l > batch_tokens {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The GRPO loss of one micro-batch given fixed old/reference log-probabilities, and the
/// statistics (KL sum, clipped-token count) for logging.
fn loss(
    model: &Model,
    batch: &Batch,
    old: Tensor<2>,
    reference: Tensor<2>,
    eps: f64,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let logp = token_logp(model, batch.inputs.clone(), batch.targets.clone());
    let ratio = (logp.clone() - old).exp();
    let clipped = ratio.clone().clamp(1.0 - eps, 1.0 + eps);
    let a = batch.advantage.clone();
    let unclipped_obj = -(a.clone() * ratio.clone());
    let clipped_obj = -(a * clipped);
    let pg = unclipped_obj.clone().max_pair(clipped_obj.clone());
    let diff = reference - logp;
    let k3 = diff.clone().exp() - diff - 1.0;
    let total =
        (pg * batch.pg_weight.clone() + k3.clone() * batch.kl_weight.clone()) * batch.mask.clone();
    let clip_frac = clipped_obj.greater(unclipped_obj).float() * batch.mask.clone();
    (
        total.sum(),
        (k3 * batch.mask.clone()).sum(),
        clip_frac.sum(),
    )
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct GrpoMetrics {
    /// Step.
    pub step: usize,
    /// Loss of the last inner update.
    pub loss: f64,
    /// Mean reward of the rollouts.
    pub reward_mean: f64,
    /// Fraction of prompts with at least one correct rollout.
    pub accuracy: f64,
    /// Children per rollout.
    pub children_per_problem: f64,
    /// Spawn rounds per rollout.
    pub spawn_rounds: f64,
    /// Generated tokens per thread segment.
    pub tokens_per_thread: f64,
    /// Total tokens per rollout.
    pub total_tokens: f64,
    /// Sequential tokens per rollout.
    pub sequential_tokens: f64,
    /// Mean k3 KL per trained token.
    pub kl: f64,
    /// Mean −log π of the sampled tokens (an entropy estimate).
    pub entropy: f64,
    /// Fraction of trained tokens where the clipped objective was active.
    pub clip_fraction: f64,
    /// Gradient norm of the last inner update (before clipping).
    pub grad_norm: f64,
    /// Seconds spent in rollouts and in updates.
    pub rollout_s: f64,
    /// Seconds in updates.
    pub update_s: f64,
}

/// The policy being trained, its frozen reference and its optimizer.
// One per trainer: the variants' size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Learner {
    /// burn autodiff on the trainer's device.
    Burn {
        policy: Model,
        reference: Model,
        optim: AdamW,
    },
    /// The hand-differentiated CPU model; rollouts use the native engine.
    Native {
        policy: NativeModel,
        reference: NativeModel,
        optim: FlatAdamW,
        grads: Vec<f32>,
    },
}

/// One micro-batch of an update: built once, used by every inner step.
struct Micro {
    /// What the learner reads of it.
    inputs: MicroInputs,
    /// Reference-model log-probabilities.
    reference: HostMatrix,
}

/// A micro-batch as each learner holds it, with the rollout policy's log-probabilities (no
/// gradient).
enum MicroInputs {
    /// Indices into the update's sequences (batched afresh on the device each inner step), and
    /// the old log-probabilities from a forward pass of the frozen policy.
    Burn { seqs: Vec<usize>, old: HostMatrix },
    /// The sequences packed once; the old log-probabilities are `None` until the first inner
    /// step, whose forward pass is the rollout policy's own.
    Native {
        packed: NativeMicro,
        old: Option<Vec<f32>>,
    },
}

/// The micro-batches of an update and the sums over trained tokens that the entropy estimate
/// needs.
struct Fixed {
    micro: Vec<Micro>,
    /// −Σ old log-prob.
    entropy_sum: f64,
    /// Trained tokens.
    trained: f64,
}

/// Sums over the trained tokens of one update, for logging.
#[derive(Default)]
struct UpdateSums {
    loss: f64,
    kl: f64,
    clipped: f64,
    /// Σ old log-prob over trained tokens, where this pass filled in the old log-probs.
    old_logp: f64,
}

/// A GRPO run.
pub struct GrpoTrainer {
    /// Settings.
    pub config: GrpoConfig,
    model_config: ModelConfig,
    learner: Learner,
    tokenizer: AprTokenizer,
    problems: Vec<Problem>,
    step: usize,
    device: Device,
    out: PathBuf,
}

impl GrpoTrainer {
    /// Starts from weights (the SFT checkpoint); the reference is a frozen copy of them.
    pub fn new(
        config: GrpoConfig,
        meta: &CheckpointMeta,
        weights: &Weights,
        tokenizer: AprTokenizer,
        problems: Vec<Problem>,
        out: &Path,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let adamw = AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        let learner = match config.learner {
            LearnerKind::Burn => Learner::Burn {
                policy: Model::new(meta.model.clone(), weights, &device.clone().autodiff())
                    .map_err(|e| TrainError::Other(e.to_string()))?,
                reference: Model::new(meta.model.clone(), weights, device)
                    .map_err(|e| TrainError::Other(e.to_string()))?,
                optim: AdamW::new(adamw),
            },
            LearnerKind::Native => {
                let policy = NativeModel::from_weights(&meta.model, weights)
                    .map_err(|e| TrainError::Other(e.to_string()))?;
                let n = policy.num_params();
                Learner::Native {
                    reference: policy.clone(),
                    policy,
                    optim: FlatAdamW::new(adamw, n),
                    grads: vec![0.0; n],
                }
            }
        };
        std::fs::create_dir_all(out)
            .map_err(|e| TrainError::Other(format!("{}: {e}", out.display())))?;
        Ok(GrpoTrainer {
            config,
            model_config: meta.model.clone(),
            learner,
            tokenizer,
            problems,
            step: 0,
            device: device.clone(),
            out: out.to_owned(),
        })
    }

    /// The policy's current weights.
    pub fn weights(&self) -> Weights {
        match &self.learner {
            Learner::Burn { policy, .. } => policy.llama.to_weights(),
            Learner::Native { policy, .. } => policy.to_weights(),
        }
    }

    /// Rolls out `problems`, `group` times each, with the current policy.
    pub fn rollouts(&self, problems: &[Problem], seed: u64) -> Vec<ProblemResult> {
        let context = self.config.runtime.context;
        let mut engine: Box<dyn apr_core::decoder::BatchedDecoder> = match &self.learner {
            Learner::Burn { policy, .. } => engine_for(
                &policy.valid(),
                self.config.slots,
                context,
                self.tokenizer.pad_id(),
            ),
            Learner::Native { policy, .. } => Box::new(NativeEngine::new(
                policy.clone(),
                self.config.slots,
                context,
            )),
        };
        let task = match self.config.runtime.mode {
            apr_core::runtime::Mode::Apr => CountdownTask::apr(),
            apr_core::runtime::Mode::Serial => CountdownTask::sosp(),
        };
        let g = self.config.group.max(1);
        let jobs: Vec<Job<Problem>> = (0..problems.len() * g)
            .map(|i| Job {
                id: i,
                problem: problems[i / g].clone(),
                seed: seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            })
            .collect();
        run(
            &task,
            engine.as_mut(),
            &self.tokenizer,
            jobs,
            &self.config.runtime,
            &mut |_| {},
        )
    }

    /// One GRPO step: rollouts, advantages, `inner_steps` updates.
    pub fn train_step(&mut self) -> Result<GrpoMetrics, TrainError> {
        let t0 = std::time::Instant::now();
        let n = self.problems.len().max(1);
        let start = (self.step * self.config.prompts) % n;
        let batch: Vec<Problem> = (0..self.config.prompts)
            .map(|i| self.problems[(start + i) % n].clone())
            .collect();
        let seed = apr_countdown::pyrand::derive_seed(self.config.seed, 21, self.step as u64);
        let results = self.rollouts(&batch, seed);
        let rollout_s = t0.elapsed().as_secs_f64();
        let rewards: Vec<f32> = results.iter().map(|r| r.reward).collect();
        let adv = advantages(&rewards, self.config.group, self.config.normalize_std);
        let seqs = policy_sequences(&results, &adv, self.tokenizer.eos_id());
        let mut m = rollout_metrics(&results, self.config.group);
        m.step = self.step + 1;
        let t1 = std::time::Instant::now();
        if !seqs.is_empty() {
            self.update(&seqs, &mut m)?;
        }
        m.update_s = t1.elapsed().as_secs_f64();
        m.rollout_s = rollout_s;
        self.step += 1;
        Ok(m)
    }

    fn update(&mut self, seqs: &[PolicySeq], m: &mut GrpoMetrics) -> Result<(), TrainError> {
        let step = self.step + 1;
        let fail = |what: &str| TrainError::Other(format!("GRPO step {step}: {what}"));
        let mut fixed = self.fixed_logprobs(seqs)?;
        let trained = fixed.trained;
        for _ in 0..self.config.inner_steps.max(1) {
            let sums = self.accumulate(seqs, &mut fixed.micro)?;
            fixed.entropy_sum -= sums.old_logp;
            if !sums.loss.is_finite() {
                return Err(fail("non-finite loss"));
            }
            m.grad_norm = self.optimizer_step(self.config.lr).map_err(|e| fail(&e))?;
            m.loss = sums.loss;
            m.kl = sums.kl / trained.max(1.0);
            m.clip_fraction = sums.clipped / trained.max(1.0);
        }
        // Complete once the first inner step has filled in any old log-probs it had to.
        m.entropy = fixed.entropy_sum / trained.max(1.0);
        Ok(())
    }

    /// The micro-batches of an update with their old (rollout-policy) and reference
    /// log-probabilities, without gradients.
    fn fixed_logprobs(&self, seqs: &[PolicySeq]) -> Result<Fixed, TrainError> {
        let batches = micro_batches(seqs, self.config.batch_tokens);
        let mut micro = Vec::with_capacity(batches.len());
        let (mut entropy_sum, mut trained) = (0.0, 0.0);
        match &self.learner {
            Learner::Burn {
                policy, reference, ..
            } => {
                let frozen = policy.valid();
                let pad = self.tokenizer.pad_id();
                for idx in batches {
                    let refs: Vec<&PolicySeq> = idx.iter().map(|&i| &seqs[i]).collect();
                    let b = make_batch(&refs, seqs.len(), self.config.kl_beta, pad, &self.device);
                    let old = token_logp(&frozen, b.inputs.clone(), b.targets.clone());
                    let refp = token_logp(reference, b.inputs, b.targets);
                    entropy_sum -= scalar((old.clone() * b.mask.clone()).sum());
                    trained += scalar(b.mask.sum());
                    micro.push(Micro {
                        inputs: MicroInputs::Burn {
                            seqs: idx,
                            old: to_host(old),
                        },
                        reference: to_host(refp),
                    });
                }
            }
            Learner::Native { reference, .. } => {
                for idx in batches {
                    let packed = NativeMicro::new(seqs, &idx, self.config.kl_beta);
                    let refp = reference
                        .forward(&packed.batch)
                        .map(|f| f.logprobs)
                        .map_err(|e| TrainError::Other(e.to_string()))?;
                    trained += packed.terms.iter().filter(|t| t.is_some()).count() as f64;
                    let n = refp.len();
                    micro.push(Micro {
                        // `old` is filled by the first inner step (see `accumulate`).
                        inputs: MicroInputs::Native { packed, old: None },
                        reference: (refp, [1, n]),
                    });
                }
            }
        }
        Ok(Fixed {
            micro,
            entropy_sum,
            trained,
        })
    }

    /// Adds the gradient of the GRPO loss over all micro-batches (a sum over them) to the
    /// learner's accumulator; returns the loss and logging sums.
    fn accumulate(
        &mut self,
        seqs: &[PolicySeq],
        micro: &mut [Micro],
    ) -> Result<UpdateSums, TrainError> {
        let eps = self.config.clip_eps;
        let mut sums = UpdateSums::default();
        match &mut self.learner {
            Learner::Burn { policy, optim, .. } => {
                let train_device = self.device.clone().autodiff();
                let pad = self.tokenizer.pad_id();
                let count = micro.len() as f64;
                for mb in micro {
                    let MicroInputs::Burn { seqs: idx, old } = &mb.inputs else {
                        return Err(TrainError::Other(
                            "micro-batch built for another learner".into(),
                        ));
                    };
                    let refs: Vec<&PolicySeq> = idx.iter().map(|&i| &seqs[i]).collect();
                    let b = make_batch(&refs, seqs.len(), self.config.kl_beta, pad, &train_device);
                    let old = from_host(old, &train_device);
                    let reference = from_host(&mb.reference, &train_device);
                    let (loss, kl, clip) = loss(policy, &b, old, reference, eps);
                    let value = scalar(loss.clone());
                    if !value.is_finite() {
                        sums.loss = value;
                        return Ok(sums);
                    }
                    sums.loss += value;
                    sums.kl += scalar(kl);
                    sums.clipped += scalar(clip);
                    // The optimizer averages micro-batches; the loss is a sum over them.
                    let grads = (loss * count).backward();
                    optim.accumulate(&policy.llama, &grads);
                }
            }
            Learner::Native { policy, grads, .. } => {
                for mb in micro.iter_mut() {
                    let MicroInputs::Native { packed, old } = &mut mb.inputs else {
                        return Err(TrainError::Other(
                            "micro-batch built for another learner".into(),
                        ));
                    };
                    let fwd = policy
                        .forward(&packed.batch)
                        .map_err(|e| TrainError::Other(e.to_string()))?;
                    // The first inner step runs on the rollout policy's weights, so its forward
                    // pass gives the old log-probabilities: one pass saved per update.
                    let old = old.get_or_insert_with(|| {
                        sums.old_logp += fwd
                            .logprobs
                            .iter()
                            .zip(&packed.terms)
                            .filter(|(_, t)| t.is_some())
                            .map(|(&lp, _)| lp as f64)
                            .sum::<f64>();
                        fwd.logprobs.clone()
                    });
                    let mut dlogp = vec![0.0f32; packed.batch.len()];
                    for (p, term) in packed.terms.iter().enumerate() {
                        let Some(t) = term else { continue };
                        let o = token_objective(
                            fwd.logprobs[p] as f64,
                            old[p] as f64,
                            mb.reference.0[p] as f64,
                            t.advantage,
                            eps,
                        );
                        sums.loss += t.pg_weight * o.pg + t.kl_weight * o.k3;
                        sums.kl += o.k3;
                        sums.clipped += o.clipped as u8 as f64;
                        dlogp[p] = (t.pg_weight * o.dpg + t.kl_weight * o.dk3) as f32;
                    }
                    if !sums.loss.is_finite() {
                        return Ok(sums);
                    }
                    policy.backward(fwd, &dlogp, grads);
                }
            }
        }
        Ok(sums)
    }

    /// Applies the accumulated gradient; returns its norm before clipping.
    fn optimizer_step(&mut self, lr: f64) -> Result<f64, String> {
        match &mut self.learner {
            Learner::Burn { policy, optim, .. } => {
                // Parameters are reference-counted tensors: the clone is cheap and is replaced.
                match optim.step(policy.llama.clone(), lr) {
                    Ok((llama, norm)) => {
                        policy.llama = llama;
                        Ok(norm)
                    }
                    Err((_, e)) => Err(e.to_string()),
                }
            }
            Learner::Native {
                policy,
                optim,
                grads,
                ..
            } => {
                let result = optim.step(&mut policy.params, grads, lr);
                grads.fill(0.0);
                result.map_err(|e| e.to_string())
            }
        }
    }

    /// Trains to `config.steps`, logging to `OUT/metrics.jsonl` and checkpointing.
    pub fn run(
        &mut self,
        progress: &mut dyn FnMut(&GrpoMetrics),
    ) -> Result<Vec<GrpoMetrics>, TrainError> {
        let mut log = MetricsLog::open(&self.out, self.step)?;
        let mut all = Vec::new();
        while self.step < self.config.steps {
            let m = self.train_step()?;
            log.write(&m)?;
            progress(&m);
            if self
                .step
                .is_multiple_of(self.config.checkpoint_every.max(1))
                || self.step == self.config.steps
            {
                self.save()?;
            }
            all.push(m);
        }
        Ok(all)
    }

    /// Writes the policy checkpoint with its optimizer state atomically.
    pub fn save(&self) -> Result<PathBuf, TrainError> {
        let dir = self.out.join("checkpoint");
        let (optimizer_steps, optimizer) = match &self.learner {
            Learner::Burn { optim, .. } => optim.state(),
            Learner::Native { policy, optim, .. } => (optim.steps(), optim.named_state(policy)),
        };
        let meta = CheckpointMeta {
            model: self.model_config.clone(),
            info: serde_json::json!({
                "step": self.step, "trainer": "grpo", "optimizer_steps": optimizer_steps,
            }),
        };
        let optimizer = checkpoint::safetensors_bytes(&optimizer).map_err(TrainError::Other)?;
        checkpoint::save(
            &dir,
            &meta,
            &self.weights(),
            &self.tokenizer,
            &[("optimizer.safetensors", optimizer)],
        )?;
        Ok(dir)
    }

    /// Continues the run in `out` from its checkpoint, if there is one: policy, optimizer and
    /// step (rollout problems and seeds follow from the step, so the run goes on as if never
    /// stopped). The reference model stays the one this trainer was built with. Returns the
    /// step reached.
    pub fn resume(&mut self) -> Result<usize, TrainError> {
        let dir = self.out.join("checkpoint");
        checkpoint::recover(&dir)?;
        if !dir.join("apr.json").exists() {
            return Ok(self.step);
        }
        let ck = checkpoint::load(&dir)?;
        let bad = |what: String| TrainError::Other(format!("{}: {what}", dir.display()));
        if ck.meta.info.get("trainer").and_then(|t| t.as_str()) != Some("grpo") {
            return Err(bad("not a GRPO checkpoint".into()));
        }
        let count = |key: &str| ck.meta.info.get(key).and_then(|s| s.as_u64());
        let (step, optimizer_steps) = count("step")
            .zip(count("optimizer_steps"))
            .ok_or_else(|| bad("no step or optimizer step count".into()))?;
        let step = step as usize;
        let saved = checkpoint::read_safetensors(&dir.join("optimizer.safetensors"))?;
        match &mut self.learner {
            Learner::Burn { policy, optim, .. } => {
                *policy = Model::new(
                    ck.meta.model.clone(),
                    &ck.weights,
                    &self.device.clone().autodiff(),
                )
                .map_err(|e| bad(e.to_string()))?;
                optim
                    .restore(&policy.llama, &self.device, optimizer_steps, &saved)
                    .map_err(bad)?;
            }
            Learner::Native { policy, optim, .. } => {
                *policy = NativeModel::from_weights(&ck.meta.model, &ck.weights)
                    .map_err(|e| bad(e.to_string()))?;
                optim
                    .restore_named(policy, optimizer_steps, &saved)
                    .map_err(bad)?;
            }
        }
        self.step = step;
        Ok(step)
    }

    /// The GRPO loss on given sequences, with old and reference log-probabilities equal to the
    /// current policy's, its gradient norm and the entropy estimate (−mean old log-prob over
    /// trained tokens), for tests. The weights are left unchanged (a zero-learning-rate step),
    /// but the optimizer's moments and step count advance.
    pub fn loss_and_grad_norm(&mut self, seqs: &[PolicySeq]) -> (f64, f64, f64) {
        let nan = (f64::NAN, f64::NAN, f64::NAN);
        let Ok(mut fixed) = self.fixed_logprobs(seqs) else {
            return nan;
        };
        let Ok(sums) = self.accumulate(seqs, &mut fixed.micro) else {
            return nan;
        };
        let entropy = (fixed.entropy_sum - sums.old_logp) / fixed.trained.max(1.0);
        // A zero learning rate leaves the weights as they are (decoupled decay is lr-scaled).
        let norm = self.optimizer_step(0.0).unwrap_or(f64::NAN);
        (sums.loss, norm, entropy)
    }
}

/// Per-position loss weights of a trained token of a native micro-batch.
#[derive(Clone, Copy)]
struct TokenTerms {
    advantage: f64,
    pg_weight: f64,
    kl_weight: f64,
}

/// Sequences packed end to end for the native learner, with each position's loss weights
/// (`None` where the token was not sampled by the policy).
struct NativeMicro {
    batch: PackedBatch,
    terms: Vec<Option<TokenTerms>>,
}

impl NativeMicro {
    fn new(seqs: &[PolicySeq], idx: &[usize], beta: f64) -> Self {
        let n_total = seqs.len() as f64;
        let picked: Vec<&PolicySeq> = idx
            .iter()
            .map(|&i| &seqs[i])
            .filter(|s| s.tokens.len() >= 2)
            .collect();
        let tokens: Vec<&[u32]> = picked.iter().map(|s| s.tokens.as_slice()).collect();
        let batch = PackedBatch::from_sequences(&tokens);
        let mut terms = Vec::with_capacity(batch.len());
        for s in picked {
            let t = s.trained_count().max(1) as f64;
            let on = TokenTerms {
                advantage: s.advantage as f64,
                pg_weight: s.weight as f64 / (t * n_total),
                kl_weight: beta / (t * n_total),
            };
            let positions = s.tokens.len() - 1;
            terms.extend(
                (0..positions).map(|p| s.trained.get(p).copied().unwrap_or(false).then_some(on)),
            );
        }
        NativeMicro { batch, terms }
    }
}

fn scalar(t: Tensor<1>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
}

type HostMatrix = (Vec<f32>, [usize; 2]);

fn to_host(t: Tensor<2>) -> HostMatrix {
    let dims = t.dims();
    (
        t.into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap_or_default(),
        dims,
    )
}

fn from_host(h: &HostMatrix, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(h.0.clone(), h.1), device)
}

fn rollout_metrics(results: &[ProblemResult], group: usize) -> GrpoMetrics {
    let n = results.len().max(1) as f64;
    let segments: usize = results.iter().map(|r| r.segments.len()).sum();
    let generated: usize = results
        .iter()
        .flat_map(|r| &r.segments)
        .map(|s| s.tokens.len())
        .sum();
    let solved_prompts = results
        .chunks(group.max(1))
        .filter(|g| g.iter().any(ProblemResult::correct))
        .count();
    GrpoMetrics {
        reward_mean: results.iter().map(|r| r.reward as f64).sum::<f64>() / n,
        accuracy: solved_prompts as f64 / results.chunks(group.max(1)).count().max(1) as f64,
        children_per_problem: results
            .iter()
            .map(|r| r.metrics.children as f64)
            .sum::<f64>()
            / n,
        spawn_rounds: results
            .iter()
            .map(|r| r.metrics.spawn_rounds as f64)
            .sum::<f64>()
            / n,
        tokens_per_thread: generated as f64 / segments.max(1) as f64,
        total_tokens: results
            .iter()
            .map(|r| r.metrics.total_tokens as f64)
            .sum::<f64>()
            / n,
        sequential_tokens: results
            .iter()
            .map(|r| r.metrics.sequential_tokens as f64)
            .sum::<f64>()
            / n,
        ..GrpoMetrics::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_objective_derivatives_match_finite_differences() {
        let eps = 0.2;
        let h = 1e-6;
        // (logp, old, reference, advantage): inside the clip range, clipped above and below,
        // negative advantage, and the tie at ρ = 1.
        let cases = [
            (-1.0, -1.05, -0.9, 1.3),
            (-0.5, -1.0, -0.7, 1.0),
            (-0.5, -1.0, -0.7, -1.0),
            (-2.0, -1.0, -1.5, 0.7),
            (-2.0, -1.0, -1.5, -0.7),
            (-1.2, -1.2, -1.0, 0.5),
        ];
        for (logp, old, reference, adv) in cases {
            let o = token_objective(logp, old, reference, adv, eps);
            let up = token_objective(logp + h, old, reference, adv, eps);
            let down = token_objective(logp - h, old, reference, adv, eps);
            let dpg = (up.pg - down.pg) / (2.0 * h);
            let dk3 = (up.k3 - down.k3) / (2.0 * h);
            assert!(
                (o.dpg - dpg).abs() < 1e-5,
                "{logp} {old} {adv}: {} vs {dpg}",
                o.dpg
            );
            assert!(
                (o.dk3 - dk3).abs() < 1e-5,
                "{logp} {reference}: {} vs {dk3}",
                o.dk3
            );
            let ratio = (logp - old).exp();
            let outside = (adv > 0.0 && ratio > 1.0 + eps) || (adv < 0.0 && ratio < 1.0 - eps);
            assert_eq!(o.clipped, outside, "{logp} {old} {adv}");
            assert_eq!(o.dpg == 0.0, outside);
        }
        // k3 is zero with zero slope when the policy equals the reference.
        let o = token_objective(-1.0, -1.0, -1.0, 1.0, eps);
        assert_eq!((o.k3, o.dk3), (0.0, 0.0));
    }
}
