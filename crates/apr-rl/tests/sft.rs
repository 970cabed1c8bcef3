//! SFT learns (loss falls) and a resumed run continues bit-identically on the CPU backend, with
//! either learner; the two learners take the same first step.

use std::collections::HashSet;

use apr_core::Mode;
use apr_countdown::problem::{streams, ProblemSpec};
use apr_countdown::record::{generate_traces, AprSolverConfig, CharCounter, SolverConfig};
use apr_countdown::sft::{sequences, LossPlacement, SftOptions};
use apr_model::backend::Backend;
use apr_model::{init_weights, AprTokenizer, ModelConfig, Preset};
use apr_rl::optim::AdamWConfig;
use apr_rl::sft::{tokenize, Example, LearnerKind, SftConfig, SftTrainer};

/// APR solver traces of 24 3-number problems (seed 1) with targets up to `max_target`.
fn apr_traces(max_target: i64) -> Vec<apr_countdown::record::TraceRecord> {
    let spec = ProblemSpec {
        numbers: 3,
        max_target,
    };
    let problems = spec.generate(24, 1, streams::TRAIN, &HashSet::new());
    generate_traces(
        &problems,
        &SolverConfig::Apr(AprSolverConfig::default()),
        1,
        &CharCounter,
    )
}

fn data(tok: &AprTokenizer) -> Vec<Example> {
    let seqs: Vec<_> = apr_traces(100)
        .iter()
        .flat_map(|r| sequences(r, Mode::Apr, SftOptions::default(), &CharCounter))
        .collect();
    tokenize(&seqs, tok, 512, LossPlacement::All, false).unwrap()
}

fn config(steps: usize, learner: LearnerKind) -> SftConfig {
    SftConfig {
        precision: apr_model::Precision::F32,
        steps,
        batch_tokens: 2048,
        accum: 2,
        peak_lr: 3e-3,
        min_lr: 3e-4,
        warmup: 2,
        adamw: AdamWConfig::default(),
        context: 512,
        seed: 7,
        checkpoint_every: 3,
        eval_every: 0,
        learner,
    }
}

/// The tiny model, its initial weights and the APR examples every trainer here starts from.
struct Setup {
    tok: AprTokenizer,
    examples: Vec<Example>,
    model_config: ModelConfig,
    init: apr_model::Weights,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let tok = AprTokenizer::domain();
        let model_config = ModelConfig {
            max_seq_len: 512,
            ..ModelConfig::preset(Preset::Tiny, tok.vocab_size())
        };
        Setup {
            examples: data(&tok),
            init: init_weights(&model_config, 3),
            model_config,
            tok,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A trainer of `steps` steps on `learner` in the run directory `name` (continued there when
    /// `resume` and it holds a checkpoint).
    fn trainer(&self, steps: usize, learner: LearnerKind, name: &str, resume: bool) -> SftTrainer {
        SftTrainer::new(
            config(steps, learner),
            self.model_config.clone(),
            self.init.clone(),
            self.tok.clone(),
            self.examples.clone(),
            vec![],
            &self.dir.path().join(name),
            &Backend::Cpu.device(0).unwrap(),
            resume,
        )
        .unwrap()
    }
}

#[test]
fn native_loss_falls_and_resume_is_bit_identical() {
    loss_falls_and_resume_is_bit_identical(LearnerKind::Native);
}

#[test]
fn burn_loss_falls_and_resume_is_bit_identical() {
    loss_falls_and_resume_is_bit_identical(LearnerKind::Burn);
}

#[test]
fn both_learners_take_the_same_first_step() {
    let setup = Setup::new();
    let step = |learner: LearnerKind, name: &str| {
        let mut t = setup.trainer(1, learner, name, false);
        let m = t.train_step().unwrap();
        (m, t.weights())
    };
    let (a, wa) = step(LearnerKind::Native, "native");
    let (b, wb) = step(LearnerKind::Burn, "burn");
    assert!(
        (a.loss - b.loss).abs() < 1e-4,
        "loss {} vs {}",
        a.loss,
        b.loss
    );
    assert!(
        (a.grad_norm - b.grad_norm).abs() < 1e-3 * b.grad_norm,
        "norm {} vs {}",
        a.grad_norm,
        b.grad_norm
    );
    for (name, t) in &wa {
        let worst = t
            .data
            .iter()
            .zip(&wb[name].data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            worst < 1e-4,
            "{name}: weights differ by {worst} after one step"
        );
    }
}

fn loss_falls_and_resume_is_bit_identical(learner: LearnerKind) {
    let setup = Setup::new();
    let mut straight = setup.trainer(6, learner, "a", false);
    let losses: Vec<f64> = (0..6)
        .map(|_| straight.train_step().unwrap().loss)
        .collect();
    assert!(losses[5] < losses[0] * 0.9, "loss should fall: {losses:?}");

    let mut first = setup.trainer(6, learner, "b", false);
    for _ in 0..3 {
        first.train_step().unwrap();
    }
    first.save(serde_json::json!({})).unwrap();
    drop(first); // the "kill"
    let mut resumed = setup.trainer(6, learner, "b", true);
    assert_eq!(resumed.step(), 3);
    let resumed_losses: Vec<f64> = (0..3).map(|_| resumed.train_step().unwrap().loss).collect();
    assert_eq!(resumed_losses, losses[3..].to_vec());
    assert_eq!(resumed.weights(), straight.weights());
}

/// Largest absolute difference between two weight sets.
fn max_difference(a: &apr_model::Weights, b: &apr_model::Weights) -> f32 {
    a.iter()
        .flat_map(|(name, t)| t.data.iter().zip(&b[name].data).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn a_run_resumes_on_the_other_learner() {
    // 20 steps on one learner, checkpoint, 20 more on the other: the weights end within the
    // learners' parity of an uninterrupted run, because the checkpoint carries the optimizer's
    // moments under HF names that both learners read.
    let setup = Setup::new();
    let trainer = |learner, name: &str, resume| setup.trainer(40, learner, name, resume);
    let straight = |learner: LearnerKind, name: &str| {
        let mut t = trainer(learner, name, false);
        t.run(None, &mut |_| {}).unwrap();
        t.weights()
    };
    let native = straight(LearnerKind::Native, "native");
    let burn = straight(LearnerKind::Burn, "burn");
    let parity = max_difference(&native, &burn);
    assert!(
        parity < 1e-3,
        "the learners drift apart by {parity} in 40 steps"
    );
    for (first, second) in [
        (LearnerKind::Native, LearnerKind::Burn),
        (LearnerKind::Burn, LearnerKind::Native),
    ] {
        let name = format!("{first:?}-then-{second:?}");
        let mut t = trainer(first, &name, false);
        for _ in 0..20 {
            t.train_step().unwrap();
        }
        t.save(serde_json::json!({"step": 20, "trainer": "sft"}))
            .unwrap();
        drop(t);
        let mut t = trainer(second, &name, true);
        assert_eq!((t.step(), t.learner()), (20, second));
        t.run(None, &mut |_| {}).unwrap();
        let weights = t.weights();
        let off = max_difference(&weights, &native).min(max_difference(&weights, &burn));
        assert!(
            off <= parity.max(1e-6) * 2.0,
            "{name}: {off} from an uninterrupted run (learner parity {parity})"
        );
    }
}

#[test]
fn loss_placements_become_token_masks() {
    let tok = AprTokenizer::numbers();
    let traces = apr_traces(30);
    let r = traces.iter().find(|r| r.children() >= 2).unwrap();
    let seqs = sequences(r, Mode::Apr, SftOptions::default(), &CharCounter);
    let all = tokenize(&seqs, &tok, 1024, LossPlacement::All, false).unwrap();
    let generated = tokenize(&seqs, &tok, 1024, LossPlacement::Generated, false).unwrap();
    let once = tokenize(&seqs, &tok, 1024, LossPlacement::Once, false).unwrap();
    let parents = r.trace_dict.as_ref().unwrap().main_calls.len();
    let trained = |e: &Example| (1..e.tokens.len()).filter(|&p| e.trains(p)).count();
    for (i, seq) in seqs.iter().enumerate() {
        // Same tokens under every placement; only the loss moves.
        assert_eq!(all[i].tokens, once[i].tokens);
        assert_eq!(trained(&all[i]), all[i].tokens.len() - 1);
        // The untrained tokens decode to exactly the untrained text.
        let untrained_text: String = generated[i]
            .untrained
            .iter()
            .map(|r| tok.decode(&generated[i].tokens[r.clone()]))
            .collect();
        let expected: String = seq
            .untrained(LossPlacement::Generated, false)
            .into_iter()
            .map(|r| seq.text[r].to_string())
            .collect();
        assert_eq!(untrained_text, expected, "sequence {i}");
        assert!(trained(&once[i]) <= trained(&generated[i]));
    }
    // A post-join call under `once` trains only after its join block, and the EOS.
    let join = seqs[1].join.clone().unwrap();
    let after = tok.encode(&seqs[1].text[join.end..]).unwrap().len();
    assert_eq!(trained(&once[1]), after + 1);
    // A child's prompt carries no loss under `generated`, the root's does.
    assert!(generated[parents]
        .untrained
        .first()
        .is_some_and(|r| r.start == 1));
    assert!(generated[0].untrained.is_empty());
}
