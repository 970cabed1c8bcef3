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
use apr_model::{AprTokenizer, Model, Weights};
use serde::{Deserialize, Serialize};

use crate::optim::{AdamW, AdamWConfig};
use crate::sft::TrainError;

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

/// A GRPO run.
pub struct GrpoTrainer {
    /// Settings.
    pub config: GrpoConfig,
    /// Policy (autodiff device).
    pub policy: Model,
    reference: Model,
    tokenizer: AprTokenizer,
    optim: AdamW,
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
        let policy = Model::new(meta.model.clone(), weights, &device.clone().autodiff())
            .map_err(|e| TrainError::Other(e.to_string()))?;
        let reference = Model::new(meta.model.clone(), weights, device)
            .map_err(|e| TrainError::Other(e.to_string()))?;
        std::fs::create_dir_all(out)
            .map_err(|e| TrainError::Other(format!("{}: {e}", out.display())))?;
        let adamw = AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        Ok(GrpoTrainer {
            config,
            policy,
            reference,
            tokenizer,
            optim: AdamW::new(adamw),
            problems,
            step: 0,
            device: device.clone(),
            out: out.to_owned(),
        })
    }

    /// Rolls out `problems`, `group` times each, with the current policy.
    pub fn rollouts(&self, problems: &[Problem], seed: u64) -> Vec<ProblemResult> {
        let policy = self.policy.valid();
        let mut engine = engine_for(
            &policy,
            self.config.slots,
            self.config.runtime.context,
            self.tokenizer.pad_id(),
        );
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
        let pad = self.tokenizer.pad_id();
        let batches = micro_batches(seqs, self.config.batch_tokens);
        let n_total = seqs.len();
        let train_device = self.device.clone().autodiff();
        // Old (rollout-policy) and reference log-probabilities, without gradients.
        let frozen = self.policy.valid();
        let mut fixed = Vec::with_capacity(batches.len());
        let (mut entropy_sum, mut trained) = (0.0, 0.0);
        for idx in &batches {
            let refs: Vec<&PolicySeq> = idx.iter().map(|&i| &seqs[i]).collect();
            let b = make_batch(&refs, n_total, self.config.kl_beta, pad, &self.device);
            let old = token_logp(&frozen, b.inputs.clone(), b.targets.clone());
            let reference = token_logp(&self.reference, b.inputs, b.targets);
            entropy_sum -= scalar((old.clone() * b.mask.clone()).sum());
            trained += scalar(b.mask.sum());
            fixed.push((to_host(old), to_host(reference)));
        }
        m.entropy = entropy_sum / trained.max(1.0);
        let micro = batches.len() as f64;
        for _ in 0..self.config.inner_steps.max(1) {
            let (mut loss_sum, mut kl_sum, mut clip_sum) = (0.0, 0.0, 0.0);
            for (idx, (old, reference)) in batches.iter().zip(&fixed) {
                let refs: Vec<&PolicySeq> = idx.iter().map(|&i| &seqs[i]).collect();
                let b = make_batch(&refs, n_total, self.config.kl_beta, pad, &train_device);
                let old = from_host(old, &train_device);
                let reference = from_host(reference, &train_device);
                let (loss, kl, clip) = loss(&self.policy, &b, old, reference, self.config.clip_eps);
                let value = scalar(loss.clone());
                if !value.is_finite() {
                    return Err(TrainError::Other(format!(
                        "non-finite GRPO loss at step {}",
                        self.step + 1
                    )));
                }
                loss_sum += value;
                kl_sum += scalar(kl);
                clip_sum += scalar(clip);
                // The optimizer averages micro-batches; the loss is a sum over them.
                let grads = (loss * micro).backward();
                self.optim.accumulate(&self.policy.llama, &grads);
            }
            match self.optim.step(self.policy.llama.clone(), self.config.lr) {
                Ok((llama, norm)) => {
                    self.policy.llama = llama;
                    m.grad_norm = norm;
                }
                Err((_, e)) => {
                    return Err(TrainError::Other(format!(
                        "GRPO step {}: {e}",
                        self.step + 1
                    )))
                }
            }
            m.loss = loss_sum;
            m.kl = kl_sum / trained.max(1.0);
            m.clip_fraction = clip_sum / trained.max(1.0);
        }
        Ok(())
    }

    /// Trains to `config.steps`, logging to `OUT/metrics.jsonl` and checkpointing.
    pub fn run(
        &mut self,
        progress: &mut dyn FnMut(&GrpoMetrics),
    ) -> Result<Vec<GrpoMetrics>, TrainError> {
        use std::io::Write;
        let path = self.out.join("metrics.jsonl");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::Other(format!("{}: {e}", path.display())))?;
        let mut all = Vec::new();
        while self.step < self.config.steps {
            let m = self.train_step()?;
            writeln!(log, "{}", serde_json::to_string(&m).unwrap_or_default())
                .map_err(|e| TrainError::Other(format!("{}: {e}", path.display())))?;
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

    /// Writes the policy checkpoint atomically.
    pub fn save(&self) -> Result<PathBuf, TrainError> {
        let dir = self.out.join("checkpoint");
        let meta = CheckpointMeta {
            model: self.policy.config.clone(),
            info: serde_json::json!({"step": self.step, "trainer": "grpo"}),
        };
        checkpoint::save(
            &dir,
            &meta,
            &self.policy.llama.to_weights(),
            &self.tokenizer,
            &[],
        )?;
        Ok(dir)
    }

    /// The GRPO loss and its gradient norm on given sequences with fixed old/reference
    /// log-probabilities equal to the current policy's (for tests).
    pub fn loss_and_grad_norm(&mut self, seqs: &[PolicySeq]) -> (f64, f64) {
        let train_device = self.device.clone().autodiff();
        let frozen = self.policy.valid();
        let refs: Vec<&PolicySeq> = seqs.iter().collect();
        let b = make_batch(
            &refs,
            seqs.len(),
            self.config.kl_beta,
            self.tokenizer.pad_id(),
            &self.device,
        );
        let old = to_host(token_logp(&frozen, b.inputs.clone(), b.targets.clone()));
        let reference = to_host(token_logp(&self.reference, b.inputs, b.targets));
        let b = make_batch(
            &refs,
            seqs.len(),
            self.config.kl_beta,
            self.tokenizer.pad_id(),
            &train_device,
        );
        let (loss, _, _) = loss(
            &self.policy,
            &b,
            from_host(&old, &train_device),
            from_host(&reference, &train_device),
            self.config.clip_eps,
        );
        let value = scalar(loss.clone());
        let grads = loss.backward();
        let mut optim = AdamW::new(AdamWConfig::default());
        optim.accumulate(&self.policy.llama, &grads);
        let norm = optim
            .step(self.policy.llama.clone(), 0.0)
            .map(|(_, n)| n)
            .unwrap_or(f64::NAN);
        (value, norm)
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
