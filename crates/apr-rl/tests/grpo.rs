//! GRPO credit assignment: the advantage of a rollout reaches every thread of its tree on the
//! sampled tokens only, weighted 1/n; equal rewards with β = 0 give a zero gradient.

use apr_core::runtime::{Finish, Metrics, ProblemResult, Role, RuntimeConfig, Segment};
use apr_model::backend::Backend;
use apr_model::checkpoint::CheckpointMeta;
use apr_model::{init_weights, AprTokenizer, ModelConfig, Preset};
use apr_rl::grpo::{advantages, policy_sequences, policy_token_weights, GrpoConfig, GrpoTrainer};
use apr_rl::sft::LearnerKind;

const EOS: u32 = 2;

fn segment(
    role: Role,
    prompt: &[u32],
    tokens: &[u32],
    sampled: &[bool],
    finish: Finish,
) -> Segment {
    Segment {
        role,
        round: 0,
        index: 0,
        node: None,
        prompt: String::new(),
        output: String::new(),
        finish,
        prompt_tokens: prompt.to_vec(),
        tokens: tokens.to_vec(),
        logprobs: vec![0.0; tokens.len()],
        sampled: sampled.to_vec(),
        reused_prefix: 0,
    }
}

fn result(id: usize, reward: f32, segments: Vec<Segment>) -> ProblemResult {
    ProblemResult {
        id,
        prompt: String::new(),
        segments,
        answer: None,
        reward,
        failure: None,
        metrics: Metrics::default(),
    }
}

/// Rollout 0: a parent that spawns (3 sampled tokens + EOS), two children, and a resumed parent
/// whose first two tokens were injected by the runtime. Rollout 1: one serial thread.
fn rollouts(r0: f32, r1: f32) -> Vec<ProblemResult> {
    vec![
        result(
            0,
            r0,
            vec![
                segment(
                    Role::Parent,
                    &[1, 10, 11],
                    &[12, 13, 14],
                    &[true, true, true],
                    Finish::Spawn,
                ),
                segment(Role::Child, &[1, 20], &[21, 22], &[true, true], Finish::Eos),
                segment(Role::Child, &[1, 30], &[31], &[true], Finish::ContextLimit),
                segment(
                    Role::Parent,
                    &[1, 10, 11, 40, 41],
                    &[42, 43, 44],
                    &[false, false, true],
                    Finish::Eos,
                ),
            ],
        ),
        result(
            1,
            r1,
            vec![segment(
                Role::Parent,
                &[1, 10, 11],
                &[50, 51],
                &[true, true],
                Finish::Eos,
            )],
        ),
    ]
}

#[test]
fn advantages_are_group_normalised() {
    let a = advantages(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 3, true);
    // Group 1: mean 1/3, population std √2/3.
    let std = (2.0f64).sqrt() / 3.0;
    assert!((a[0] as f64 - (2.0 / 3.0) / std).abs() < 1e-5);
    assert!((a[1] as f64 + (1.0 / 3.0) / std).abs() < 1e-5);
    assert_eq!(
        &a[3..],
        &[0.0, 0.0, 0.0],
        "equal rewards give zero advantage"
    );
    assert_eq!(advantages(&[1.0, 0.0], 2, false), vec![0.5, -0.5]);
}

#[test]
fn every_thread_gets_its_rollouts_advantage_on_sampled_tokens_weighted_by_one_over_n() {
    let res = rollouts(1.0, 0.0);
    let adv = advantages(&[1.0, 0.0], 2, true);
    assert!((adv[0] - 1.0).abs() < 1e-6 && (adv[1] + 1.0).abs() < 1e-6);
    let seqs = policy_sequences(&res, &adv, EOS);
    assert_eq!(seqs.len(), 5, "four threads of rollout 0, one of rollout 1");
    let w = policy_token_weights(&seqs);
    let n = 5.0f32;
    let a0 = adv[0];
    let a1 = adv[1];
    // Rollout 0 has 4 threads: weight 1/4. Parent call 0: prompt [1,10,11] masked; 3 sampled + EOS.
    let expect = |a: f32, threads: f32, trained: f32, mask: &[bool]| -> Vec<f32> {
        mask.iter()
            .map(|&m| if m { a / threads / (trained * n) } else { 0.0 })
            .collect()
    };
    assert_eq!(
        w[0],
        expect(a0, 4.0, 4.0, &[false, false, true, true, true, true])
    );
    assert_eq!(w[1], expect(a0, 4.0, 3.0, &[false, true, true, true]));
    // A child cut by the context limit trains its sampled token but gets no EOS.
    assert_eq!(w[2], expect(a0, 4.0, 1.0, &[false, true]));
    // The resumed parent: prompt and the two runtime-injected tokens are masked.
    assert_eq!(
        w[3],
        expect(
            a0,
            4.0,
            2.0,
            &[false, false, false, false, false, false, true, true]
        )
    );
    assert_eq!(
        w[4],
        expect(a1, 1.0, 3.0, &[false, false, true, true, true])
    );
    assert_eq!(seqs[3].tokens, vec![1, 10, 11, 40, 41, 42, 43, 44, EOS]);
}

/// The tiny model (seed 1, 64-token context) under GRPO `config`, with `tok` and `problems`.
fn tiny_trainer(
    config: GrpoConfig,
    tok: AprTokenizer,
    problems: Vec<apr_countdown::Problem>,
    dir: &std::path::Path,
) -> GrpoTrainer {
    let model = ModelConfig {
        max_seq_len: 64,
        ..ModelConfig::preset(Preset::Tiny, tok.vocab_size())
    };
    let weights = init_weights(&model, 1);
    let meta = CheckpointMeta {
        model,
        info: serde_json::Value::Null,
    };
    let device = Backend::Cpu.device(0).unwrap();
    GrpoTrainer::new(config, &meta, &weights, tok, problems, dir, &device).unwrap()
}

fn trainer(learner: LearnerKind, beta: f64, dir: &std::path::Path) -> GrpoTrainer {
    let config = GrpoConfig {
        precision: apr_model::Precision::F32,
        steps: 1,
        prompts: 1,
        group: 2,
        lr: 1e-5,
        clip_eps: 0.2,
        kl_beta: beta,
        inner_steps: 1,
        normalize_std: true,
        runtime: RuntimeConfig::default(),
        slots: 4,
        batch_tokens: 4096,
        seed: 0,
        checkpoint_every: 1,
        learner,
    };
    tiny_trainer(config, AprTokenizer::domain(), vec![], dir)
}

#[test]
fn equal_rewards_and_no_kl_give_zero_gradient() {
    for learner in [LearnerKind::Burn, LearnerKind::Native] {
        let dir = tempfile::tempdir().unwrap();
        let mut trainer = trainer(learner, 0.0, dir.path());
        let res = rollouts(1.0, 1.0);
        let adv = advantages(&[1.0, 1.0], 2, true);
        let seqs = policy_sequences(&res, &adv, EOS);
        let (loss, norm, _) = trainer.loss_and_grad_norm(&seqs);
        assert_eq!(loss, 0.0, "{learner:?}");
        assert_eq!(norm, 0.0, "{learner:?}");
        // With unequal rewards the gradient is not zero.
        let adv = advantages(&[1.0, 0.0], 2, true);
        let (_, norm, _) = trainer.loss_and_grad_norm(&policy_sequences(&res, &adv, EOS));
        assert!(norm > 0.0, "{learner:?}");
    }
}

#[test]
fn native_and_autodiff_learners_agree_on_the_grpo_loss_and_gradient() {
    // Same weights, same rollouts, KL on: the hand-derived per-token derivative must give the
    // gradient burn's autodiff gives.
    let res = rollouts(1.0, 0.0);
    let adv = advantages(&[1.0, 0.0], 2, true);
    let seqs = policy_sequences(&res, &adv, EOS);
    let run = |learner| {
        let dir = tempfile::tempdir().unwrap();
        trainer(learner, 0.01, dir.path()).loss_and_grad_norm(&seqs)
    };
    let (burn_loss, burn_norm, burn_entropy) = run(LearnerKind::Burn);
    let (native_loss, native_norm, native_entropy) = run(LearnerKind::Native);
    assert!(burn_norm > 0.0);
    // The native learner takes the old log-probs from its first update's forward pass.
    assert!(burn_entropy > 0.0);
    assert!(
        (burn_entropy - native_entropy).abs() <= 1e-5 * burn_entropy,
        "entropy {burn_entropy} vs {native_entropy}"
    );
    assert!(
        (burn_loss - native_loss).abs() <= 1e-6 * burn_loss.abs().max(1.0),
        "loss {burn_loss} vs {native_loss}"
    );
    assert!(
        (burn_norm - native_norm).abs() <= 1e-3 * burn_norm,
        "gradient norm {burn_norm} vs {native_norm}"
    );
}

#[test]
fn a_resumed_run_continues_bit_identically() {
    use apr_countdown::problem::{streams, ProblemSpec};
    let problems = ProblemSpec {
        numbers: 3,
        max_target: 30,
    }
    .generate(4, 3, streams::TRAIN, &Default::default());
    // Weight decay moves the policy off the reference at step 1, so the KL term gives later
    // steps a gradient and the optimizer moments matter.
    let make = |dir: &std::path::Path, steps: usize| {
        let config = GrpoConfig {
            precision: apr_model::Precision::F32,
            steps,
            prompts: 2,
            group: 2,
            lr: 1e-2,
            clip_eps: 0.2,
            kl_beta: 0.5,
            inner_steps: 2,
            normalize_std: true,
            runtime: RuntimeConfig {
                context: 64,
                sampling: apr_core::decoder::Sampling::temperature(1.0),
                ..RuntimeConfig::default()
            },
            slots: 4,
            batch_tokens: 4096,
            seed: 5,
            checkpoint_every: 1,
            learner: LearnerKind::Native,
        };
        tiny_trainer(config, AprTokenizer::numbers(), problems.clone(), dir)
    };
    let straight = tempfile::tempdir().unwrap();
    let mut a = make(straight.path(), 3);
    let metrics_a = a.run(&mut |_| {}).unwrap();
    let stopped = tempfile::tempdir().unwrap();
    make(stopped.path(), 2).run(&mut |_| {}).unwrap();
    // A line logged after the last checkpoint (the run died before saving) is dropped.
    let log = stopped.path().join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("{\"step\":3,\"loss\":0.0}\n");
    std::fs::write(&log, text).unwrap();
    let mut b = make(stopped.path(), 3);
    assert_eq!(b.resume().unwrap(), 2);
    let metrics_b = b.run(&mut |_| {}).unwrap();
    assert_eq!(metrics_b.len(), 1);
    assert_eq!(metrics_b[0].kl, metrics_a[2].kl);
    assert_eq!(metrics_b[0].grad_norm, metrics_a[2].grad_norm);
    assert!(metrics_a[2].grad_norm > 0.0);
    assert_eq!(a.weights(), b.weights());
    let logged: Vec<apr_rl::grpo::GrpoMetrics> = apr_rl::metrics_log::read(stopped.path()).unwrap();
    assert_eq!(logged.iter().map(|m| m.step).collect::<Vec<_>>(), [1, 2, 3]);
    // A directory holding an SFT checkpoint is not a GRPO run to continue.
    let other = tempfile::tempdir().unwrap();
    let mut c = make(other.path(), 1);
    let ck = other.path().join("checkpoint");
    apr_model::checkpoint::save(
        &ck,
        &CheckpointMeta {
            model: ModelConfig {
                max_seq_len: 64,
                ..ModelConfig::preset(Preset::Tiny, AprTokenizer::numbers().vocab_size())
            },
            info: serde_json::json!({"step": 1, "trainer": "sft"}),
        },
        &a.weights(),
        &AprTokenizer::numbers(),
        &[],
    )
    .unwrap();
    assert!(c.resume().is_err());
}
