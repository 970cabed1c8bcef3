//! End-to-end GRPO over parent and child threads (spec §5.1–5.2).
//!
//! Each step rolls every prompt out `group` times through the APR runtime with the current
//! policy; a rollout's reward is 1 when the strict verifier accepts its final answer. The
//! group-normalised advantage of a rollout is given to *every* thread of its tree (each parent
//! segment and every child) on the tokens the model sampled (prompts and runtime-injected join
//! text are masked), weighted by 1/n for a tree of n threads. The loss is the clipped policy
//! gradient against the rollout policy plus β·k3 KL to a frozen reference. Both are functions of
//! each trained token's log-probability ([`token_objective`]), so the learner is given only
//! their derivative with respect to it, whichever learner it is.

use std::path::{Path, PathBuf};

use apr_core::runtime::{Finish, ProblemResult, RuntimeConfig};
use apr_countdown::Problem;
use apr_model::burn::tensor::Device;
use apr_model::checkpoint::{self, CheckpointMeta};
use apr_model::learner::{new_learner, Learner, LearnerKind};
use apr_model::native::PackedBatch;
use apr_model::optim::AdamWConfig;
use apr_model::{AprTokenizer, Precision, Weights};
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::rollout::rollout;
use crate::train_loop::{self, Trainer};

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
    /// What computes the gradients (rollouts use the learner's own decoder: the native engine
    /// for the native learner).
    #[serde(default)]
    pub learner: LearnerKind,
    /// What the burn learner computes its products and attention in.
    #[serde(default)]
    pub precision: Precision,
}

impl GrpoConfig {
    /// The reference's settings (spec §5.3): 150 steps of 64 prompts × 5 rollouts at τ = 1, lr
    /// 1e-5, clip 0.2, two inner steps, β 0.001 for APR and 0.01 for SoS+, normalised advantages,
    /// 4,096 tokens a thread; 64 slots, 4,096-token micro-batches, a checkpoint every step.
    pub fn reference(mode: apr_core::runtime::Mode) -> Self {
        GrpoConfig {
            steps: 150,
            prompts: 64,
            group: 5,
            lr: 1e-5,
            clip_eps: 0.2,
            kl_beta: match mode {
                apr_core::runtime::Mode::Apr => 0.001,
                apr_core::runtime::Mode::Serial => 0.01,
            },
            inner_steps: 2,
            normalize_std: true,
            runtime: RuntimeConfig {
                mode,
                context: 4096,
                sampling: apr_core::decoder::Sampling::temperature(1.0),
                ..RuntimeConfig::default()
            },
            slots: 64,
            batch_tokens: 4096,
            seed: 0,
            checkpoint_every: 1,
            learner: LearnerKind::default(),
            precision: Precision::F32,
        }
    }
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

/// Micro-batches of sequence indices under a token budget (sorted by length).
fn batch_indices(seqs: &[PolicySeq], batch_tokens: usize) -> Vec<Vec<usize>> {
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

/// One micro-batch of an update, built once and used by every inner step.
struct Micro {
    /// The sequences packed end to end.
    batch: PackedBatch,
    /// Each position's loss weights (`None` where the token was not sampled by the policy).
    terms: Vec<Option<TokenTerms>>,
    /// The reference model's log-probabilities.
    reference: Vec<f32>,
    /// The rollout policy's, filled by the first inner step: its forward pass runs on the
    /// rollout policy's weights, which saves a pass per update.
    old: Option<Vec<f32>>,
}

impl Micro {
    /// Sequences `idx` of `seqs` packed, with the weights of [`policy_token_weights`] and the
    /// KL term's `β / (T_s · N)`.
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
        Micro {
            batch,
            terms,
            reference: Vec::new(),
            old: None,
        }
    }

    /// Trained tokens.
    fn trained(&self) -> f64 {
        self.terms.iter().filter(|t| t.is_some()).count() as f64
    }
}

/// Per-position loss weights of a trained token.
#[derive(Clone, Copy)]
struct TokenTerms {
    advantage: f64,
    pg_weight: f64,
    kl_weight: f64,
}

/// Sums over the trained tokens of one pass over an update's micro-batches, for logging.
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
    policy: Box<dyn Learner>,
    /// The frozen starting policy of the KL term.
    reference: Box<dyn Learner>,
    tokenizer: AprTokenizer,
    problems: Vec<Problem>,
    step: usize,
    device: Device,
    out: PathBuf,
}

/// The optimizer of GRPO.
fn grpo_adamw() -> AdamWConfig {
    AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    }
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
        let learner = |kind| {
            new_learner(
                kind,
                &meta.model,
                weights,
                grpo_adamw(),
                device,
                config.precision,
            )
        };
        let policy = learner(config.learner)?;
        let reference = learner(config.learner)?;
        std::fs::create_dir_all(out).map_err(|e| TrainError::file(out, e))?;
        Ok(GrpoTrainer {
            config,
            policy,
            reference,
            tokenizer,
            problems,
            step: 0,
            device: device.clone(),
            out: out.to_owned(),
        })
    }

    /// Which learner computes the gradients.
    pub fn learner(&self) -> LearnerKind {
        self.policy.kind()
    }

    /// The policy's current weights.
    pub fn weights(&self) -> Weights {
        self.policy.weights()
    }

    /// Rolls out `problems`, `group` times each, with the current policy.
    pub fn rollouts(&self, problems: &[Problem], seed: u64) -> Vec<ProblemResult> {
        let mut engine = self.policy.decoder(
            self.config.slots,
            self.config.runtime.context,
            self.tokenizer.pad_id(),
        );
        rollout(
            engine.as_mut(),
            &self.tokenizer,
            problems,
            self.config.group,
            seed,
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
        let mut micro = self.micro_batches(seqs)?;
        let trained: f64 = micro.iter().map(Micro::trained).sum();
        let mut old_logp = 0.0;
        for _ in 0..self.config.inner_steps.max(1) {
            let sums = self.accumulate(&mut micro)?;
            old_logp += sums.old_logp;
            if !sums.loss.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    trainer: "GRPO",
                    step,
                    loss: sums.loss,
                });
            }
            m.grad_norm =
                self.policy
                    .step(self.config.lr, 1)
                    .map_err(|source| TrainError::Update {
                        trainer: "GRPO",
                        step,
                        source,
                    })?;
            m.loss = sums.loss;
            m.kl = sums.kl / trained.max(1.0);
            m.clip_fraction = sums.clipped / trained.max(1.0);
        }
        m.entropy = -old_logp / trained.max(1.0);
        Ok(())
    }

    /// The micro-batches of an update with their reference log-probabilities.
    fn micro_batches(&self, seqs: &[PolicySeq]) -> Result<Vec<Micro>, TrainError> {
        batch_indices(seqs, self.config.batch_tokens)
            .into_iter()
            .map(|idx| {
                let mut mb = Micro::new(seqs, &idx, self.config.kl_beta);
                mb.reference = self.reference.score(&mb.batch)?;
                Ok(mb)
            })
            .collect()
    }

    /// Adds the gradient of the GRPO loss over all micro-batches (a sum over them) to the
    /// policy's accumulator; returns the loss and logging sums (stopping at a non-finite loss).
    fn accumulate(&mut self, micro: &mut [Micro]) -> Result<UpdateSums, TrainError> {
        let eps = self.config.clip_eps;
        let mut sums = UpdateSums::default();
        for mb in micro.iter_mut() {
            let logp = self.policy.forward(&mb.batch)?;
            if mb.old.is_none() {
                sums.old_logp += logp
                    .iter()
                    .zip(&mb.terms)
                    .filter(|(_, t)| t.is_some())
                    .map(|(&lp, _)| lp as f64)
                    .sum::<f64>();
                mb.old = Some(logp.clone());
            }
            let old = mb.old.as_deref().unwrap_or(&logp[..]);
            let mut dlogp = vec![0.0f32; logp.len()];
            for (p, term) in mb.terms.iter().enumerate() {
                let Some(t) = term else { continue };
                let o = token_objective(
                    logp[p] as f64,
                    old[p] as f64,
                    mb.reference[p] as f64,
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
            self.policy.backward(&dlogp)?;
        }
        Ok(sums)
    }

    /// Trains to `config.steps`, logging to `OUT/metrics.jsonl` and checkpointing.
    pub fn run(
        &mut self,
        progress: &mut dyn FnMut(&GrpoMetrics),
    ) -> Result<Vec<GrpoMetrics>, TrainError> {
        train_loop::run(self, progress)
    }

    /// Writes the policy checkpoint with its optimizer state atomically.
    pub fn save(&self) -> Result<PathBuf, TrainError> {
        let dir = self.out.join("checkpoint");
        let (optimizer_steps, optimizer) = self.policy.optimizer_state();
        let meta = CheckpointMeta {
            model: self.policy.config().clone(),
            info: serde_json::json!({
                "step": self.step, "trainer": "grpo", "optimizer_steps": optimizer_steps,
            }),
        };
        let optimizer =
            checkpoint::safetensors_bytes(&optimizer).map_err(|e| TrainError::file(&dir, e))?;
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
    /// stopped), on either learner. The reference model stays the one this trainer was built
    /// with. Returns the step reached.
    pub fn resume(&mut self) -> Result<usize, TrainError> {
        let dir = self.out.join("checkpoint");
        checkpoint::recover(&dir)?;
        if !dir.join("apr.json").exists() {
            return Ok(self.step);
        }
        let ck = checkpoint::load(&dir)?;
        if ck.meta.info.get("trainer").and_then(|t| t.as_str()) != Some("grpo") {
            return Err(TrainError::file(&dir, "not a GRPO checkpoint"));
        }
        let count = |key: &str| ck.meta.info.get(key).and_then(|s| s.as_u64());
        let (step, optimizer_steps) = count("step")
            .zip(count("optimizer_steps"))
            .ok_or_else(|| TrainError::file(&dir, "no step or optimizer step count"))?;
        let saved = checkpoint::read_safetensors(&dir.join("optimizer.safetensors"))?;
        let mut policy = new_learner(
            self.config.learner,
            &ck.meta.model,
            &ck.weights,
            grpo_adamw(),
            &self.device,
            self.config.precision,
        )?;
        policy.restore_optimizer(optimizer_steps, &saved)?;
        self.policy = policy;
        self.step = step as usize;
        Ok(self.step)
    }

    /// The GRPO loss on given sequences, with old and reference log-probabilities equal to the
    /// current policy's, its gradient norm and the entropy estimate (−mean old log-prob over
    /// trained tokens), for tests. The weights are left unchanged (a zero-learning-rate step),
    /// but the optimizer's moments and step count advance.
    pub fn loss_and_grad_norm(&mut self, seqs: &[PolicySeq]) -> (f64, f64, f64) {
        let nan = (f64::NAN, f64::NAN, f64::NAN);
        let Ok(mut micro) = self.micro_batches(seqs) else {
            return nan;
        };
        let trained: f64 = micro.iter().map(Micro::trained).sum();
        let Ok(sums) = self.accumulate(&mut micro) else {
            return nan;
        };
        // A zero learning rate leaves the weights as they are (decoupled decay is lr-scaled).
        let norm = self.policy.step(0.0, 1).unwrap_or(f64::NAN);
        (sums.loss, norm, -sums.old_logp / trained.max(1.0))
    }
}

impl Trainer for GrpoTrainer {
    type Metrics = GrpoMetrics;

    fn steps_done(&self) -> usize {
        self.step
    }

    fn steps(&self) -> usize {
        self.config.steps
    }

    fn checkpoint_every(&self) -> usize {
        self.config.checkpoint_every
    }

    fn out_dir(&self) -> &Path {
        &self.out
    }

    fn train_step(&mut self) -> Result<GrpoMetrics, TrainError> {
        GrpoTrainer::train_step(self)
    }

    fn checkpoint(&mut self) -> Result<(), TrainError> {
        self.save().map(drop)
    }
}

fn rollout_metrics(results: &[ProblemResult], group: usize) -> GrpoMetrics {
    let n = results.len().max(1) as f64;
    let mean = |f: &dyn Fn(&ProblemResult) -> f64| results.iter().map(f).sum::<f64>() / n;
    let segments: usize = results.iter().map(|r| r.segments.len()).sum();
    let generated: usize = results
        .iter()
        .flat_map(|r| &r.segments)
        .map(|s| s.tokens.len())
        .sum();
    let groups = results.chunks(group.max(1));
    let solved = groups
        .clone()
        .filter(|g| g.iter().any(ProblemResult::correct));
    GrpoMetrics {
        reward_mean: mean(&|r| r.reward as f64),
        accuracy: solved.count() as f64 / groups.count().max(1) as f64,
        children_per_problem: mean(&|r| r.metrics.children as f64),
        spawn_rounds: mean(&|r| r.metrics.spawn_rounds as f64),
        tokens_per_thread: generated as f64 / segments.max(1) as f64,
        total_tokens: mean(&|r| r.metrics.total_tokens as f64),
        sequential_tokens: mean(&|r| r.metrics.sequential_tokens as f64),
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
