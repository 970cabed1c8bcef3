//! Sampling is invariant to batch composition: the same sampled evaluation at 1, 7 and 64 slots,
//! on 1 and 2 threads, writes the same records byte for byte (segment order included), and one
//! GRPO step from the same checkpoint gives the same rollouts, metrics and weights at any
//! `--slots`. The model is the shipped APR model, so the rollouts spawn and join for real.

mod common;

use apr_core::decoder::Sampling;
use apr_core::runtime::{Mode, RuntimeConfig};
use apr_countdown::Problem;
use apr_model::backend::Backend;
use apr_model::checkpoint::{self, Checkpoint};
use apr_model::Model;
use apr_rl::eval::{evaluate, EvalConfig};
use apr_rl::grpo::{GrpoConfig, GrpoTrainer};
use apr_rl::sft::LearnerKind;

fn shipped() -> Checkpoint {
    checkpoint::load(&common::shipped_dir()).unwrap()
}

/// The first `n` held-out problems of the shipped model's card.
fn problems(n: usize) -> Vec<Problem> {
    common::held_out(&common::card())[..n].to_vec()
}

fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

fn runtime() -> RuntimeConfig {
    RuntimeConfig {
        mode: Mode::Apr,
        context: 1024,
        sampling: Sampling::temperature(1.0),
        ..RuntimeConfig::default()
    }
}

#[test]
fn sampled_eval_records_do_not_depend_on_slots_or_threads() {
    let ck = shipped();
    let problems = problems(12);
    let model = Model::new(
        ck.meta.model.clone(),
        &ck.weights,
        &Backend::Cpu.device(0).unwrap(),
    )
    .unwrap();
    let records = |slots: usize, threads: usize| {
        let config = EvalConfig {
            runtime: runtime(),
            samples: 3,
            slots,
            seed: 11,
        };
        let (mut records, _) = on_threads(threads, || {
            evaluate(&model, &ck.tokenizer, &problems, &config, &mut |_, _| {})
        });
        for r in &mut records {
            r.result.metrics.latency_s = 0.0;
        }
        records
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect::<Vec<_>>()
    };
    let reference = records(64, 2);
    let children: usize = reference
        .iter()
        .map(|r| r.matches("\"role\":\"child\"").count())
        .sum();
    assert!(children > 20, "the rollouts spawn ({children} children)");
    for (slots, threads) in [(1, 2), (7, 1), (7, 2), (64, 1)] {
        let other = records(slots, threads);
        for (i, (a, b)) in reference.iter().zip(&other).enumerate() {
            assert_eq!(
                a, b,
                "record {i}: 64 slots on 2 threads vs {slots} on {threads}"
            );
        }
    }
}

#[test]
fn a_grpo_step_does_not_depend_on_slots() {
    let ck = shipped();
    let problems = problems(4);
    let device = Backend::Cpu.device(0).unwrap();
    let step = |slots: usize| {
        let out = tempfile::tempdir().unwrap();
        let config = GrpoConfig {
            precision: apr_model::Precision::F32,
            steps: 1,
            prompts: 2,
            group: 3,
            lr: 1e-4,
            clip_eps: 0.2,
            kl_beta: 0.01,
            inner_steps: 1,
            normalize_std: true,
            runtime: runtime(),
            slots,
            batch_tokens: 8192,
            seed: 3,
            checkpoint_every: 0,
            learner: LearnerKind::Native,
        };
        let mut trainer = GrpoTrainer::new(
            config,
            &ck.meta,
            &ck.weights,
            ck.tokenizer.clone(),
            problems.clone(),
            out.path(),
            &device,
        )
        .unwrap();
        let mut metrics = trainer.run(&mut |_| {}).unwrap();
        for m in &mut metrics {
            m.rollout_s = 0.0;
            m.update_s = 0.0;
        }
        (serde_json::to_string(&metrics).unwrap(), trainer.weights())
    };
    let (metrics, weights) = step(64);
    assert!(metrics.contains("\"children_per_problem\""));
    for slots in [1, 7] {
        let (m, w) = step(slots);
        assert_eq!(m, metrics, "{slots} slots vs 64");
        assert!(w == weights, "{slots} slots vs 64: weights differ");
    }
}
