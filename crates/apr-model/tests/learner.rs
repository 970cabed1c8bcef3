//! The two learners behind one seam: the same log-probabilities and updates, optimizer moments
//! that either writes and the other reads, and clear refusals.

use apr_model::backend::Backend;
use apr_model::learner::{new_learner, LearnError, Learner, LearnerKind};
use apr_model::native::PackedBatch;
use apr_model::optim::AdamWConfig;
use apr_model::{init_weights, ModelConfig, Precision, Preset, Weights};
use burn::tensor::Device;

fn setup() -> (ModelConfig, Weights, PackedBatch) {
    let config = ModelConfig {
        max_seq_len: 64,
        ..ModelConfig::preset(Preset::Tiny, 40)
    };
    let weights = init_weights(&config, 5);
    // Three sequences of different lengths: the burn learner pads them, the native one packs.
    let seqs: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            (0..20 + 7 * i)
                .map(|t| ((t * 5 + i * 3) % 37 + 1) as u32)
                .collect()
        })
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    (config, weights, PackedBatch::from_sequences(&refs))
}

fn learner(kind: LearnerKind, config: &ModelConfig, weights: &Weights) -> Box<dyn Learner> {
    let device = Backend::Cpu.device(0).unwrap();
    new_learner(
        kind,
        config,
        weights,
        AdamWConfig::default(),
        &device,
        Precision::F32,
    )
    .unwrap()
}

/// `steps` SFT steps on `batch` at lr 1e-2; the gradient norms.
fn train(l: &mut dyn Learner, batch: &PackedBatch, steps: usize) -> Vec<f64> {
    (0..steps)
        .map(|_| {
            l.forward(batch).unwrap();
            let scale = -1.0 / batch.len() as f32;
            l.backward(&vec![scale; batch.len()]).unwrap();
            l.step(1e-2, 1).unwrap()
        })
        .collect()
}

fn max_difference(a: &Weights, b: &Weights) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flat_map(|(name, t)| t.data.iter().zip(&b[name].data).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

/// Largest |a − b| between two log-probability lists.
fn largest_gap(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Mean |a − b| over every weight.
fn mean_abs(a: &Weights, b: &Weights) -> f64 {
    let (sum, n) = a.iter().fold((0.0f64, 0usize), |(s, n), (name, t)| {
        let d: f64 = t
            .data
            .iter()
            .zip(&b[name].data)
            .map(|(x, y)| (x - y).abs() as f64)
            .sum();
        (s + d, n + t.data.len())
    });
    sum / n as f64
}

#[test]
fn both_learners_score_and_step_alike() {
    let (config, weights, batch) = setup();
    let mut native = learner(LearnerKind::Native, &config, &weights);
    let mut burn = learner(LearnerKind::Burn, &config, &weights);
    let a = native.score(&batch).unwrap();
    let b = burn.score(&batch).unwrap();
    assert_eq!((a.len(), b.len()), (batch.len(), batch.len()));
    let worst = largest_gap(&a, &b);
    assert!(worst < 1e-4, "log-probabilities differ by {worst}");
    let tracked = burn.forward(&batch).unwrap();
    assert!(tracked.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5));

    let na = train(native.as_mut(), &batch, 3);
    let nb = train(burn.as_mut(), &batch, 3);
    for (x, y) in na.iter().zip(&nb) {
        assert!((x - y).abs() < 1e-3 * y, "gradient norms {na:?} vs {nb:?}");
    }
    // Adam normalises each update, so where a gradient is near zero the two learners' rounding
    // can move a weight by a fraction of a step (lr 1e-2): allow a tenth of one.
    let drift = max_difference(&native.weights(), &burn.weights());
    assert!(drift < 1e-3, "weights differ by {drift} after 3 steps");
    assert!(
        max_difference(&native.weights(), &weights) > 1e-3,
        "training moved nothing"
    );
}

#[test]
fn optimizer_moments_carry_across_learners() {
    let (config, weights, batch) = setup();
    for (from, to) in [
        (LearnerKind::Native, LearnerKind::Burn),
        (LearnerKind::Burn, LearnerKind::Native),
    ] {
        let mut a = learner(from, &config, &weights);
        train(a.as_mut(), &batch, 2);
        let (steps, state) = a.optimizer_state();
        assert_eq!(steps, 2);
        assert_eq!(state.len(), 2 * weights.len(), "an m and a v per parameter");
        assert!(state.contains_key("m.model.layers.0.self_attn.q_proj.weight"));
        let mut b = learner(to, &config, &a.weights());
        b.restore_optimizer(steps, &state).unwrap();
        let (steps_b, state_b) = b.optimizer_state();
        assert_eq!(steps_b, 2);
        assert_eq!(
            state_b, state,
            "{from:?} → {to:?}: moments change on the way"
        );
        // The next update uses those moments: it matches the first learner's own.
        train(a.as_mut(), &batch, 1);
        train(b.as_mut(), &batch, 1);
        let drift = max_difference(&a.weights(), &b.weights());
        assert!(
            drift < 1e-5,
            "{from:?} → {to:?}: the next step differs by {drift}"
        );
    }
}

#[test]
fn learners_refuse_what_does_not_fit() {
    let (config, weights, batch) = setup();
    for kind in [LearnerKind::Native, LearnerKind::Burn] {
        let mut l = learner(kind, &config, &weights);
        assert!(matches!(l.backward(&[0.0]), Err(LearnError::NoForward(_))));
        l.forward(&batch).unwrap();
        assert!(matches!(
            l.backward(&[0.0; 3]),
            Err(LearnError::NoForward(_))
        ));
        let too_big: &[u32] = &[1, 2, 99];
        let bad = PackedBatch::from_sequences(&[too_big]);
        assert!(
            matches!(l.forward(&bad), Err(LearnError::Batch(_))),
            "{kind:?}"
        );
        assert!(matches!(
            l.restore_optimizer(3, &Weights::new()),
            Err(LearnError::State(_))
        ));
        // Nothing accumulated: the update is refused and the weights stay.
        assert!(
            matches!(l.step(1e-2, 1), Err(LearnError::Optim(_))),
            "{kind:?}"
        );
        assert_eq!(max_difference(&l.weights(), &weights), 0.0);
    }
}

#[test]
fn a_mixed_precision_step_follows_the_f32_one_and_native_bf16_is_refused() {
    let (config, weights, batch) = setup();
    let device = Backend::Cpu.device(0).unwrap();
    let make = |p| {
        new_learner(
            LearnerKind::Burn,
            &config,
            &weights,
            AdamWConfig::default(),
            &device,
            p,
        )
    };
    let (mut f32, mut bf16) = (
        make(Precision::F32).unwrap(),
        make(Precision::Bf16).unwrap(),
    );
    let (a, b) = (f32.score(&batch).unwrap(), bf16.score(&batch).unwrap());
    let worst = largest_gap(&a, &b);
    // bf16 products round to 8 mantissa bits; a wrong cast or mask is off by whole nats.
    assert!(
        worst < 5e-2 && worst > 0.0,
        "bf16 log-probabilities differ by {worst}"
    );
    let (na, nb) = (
        train(f32.as_mut(), &batch, 2),
        train(bf16.as_mut(), &batch, 2),
    );
    for (x, y) in na.iter().zip(&nb) {
        assert!((x - y).abs() < 5e-2 * x, "gradient norms {na:?} vs {nb:?}");
    }
    // Adam moves every weight by about lr a step, and where a gradient is near zero bf16's
    // rounding can flip its sign, so compare on average: the two updates mostly agree.
    let update = mean_abs(&f32.weights(), &weights);
    let apart = mean_abs(&f32.weights(), &bf16.weights());
    assert!(
        apart < 0.2 * update,
        "updates differ by {apart} on average (update {update})"
    );
    let refused = new_learner(
        LearnerKind::Native,
        &config,
        &weights,
        AdamWConfig::default(),
        &device,
        Precision::Bf16,
    );
    let why = refused
        .err()
        .expect("the native learner has no bf16")
        .to_string();
    assert!(why.contains("burn learner"), "{why}");
}

/// How closely a step on the test device follows the CPU's f32 step, by backend and precision.
struct Agreement {
    /// Largest |Δ log-probability|.
    logprob: f32,
    /// |Δ gradient norm| relative to the CPU's.
    grad_norm: f64,
    /// Mean |Δ weight| after the step, relative to the mean update.
    update: f64,
}

fn agreement(backend: Backend, precision: Precision) -> Agreement {
    match (backend, precision) {
        // The same ops on the same device: the same numbers.
        (Backend::Cpu, Precision::F32) => Agreement {
            logprob: 0.0,
            grad_norm: 0.0,
            update: 0.0,
        },
        // Another order of summation in f32.
        (Backend::Wgpu, Precision::F32) => Agreement {
            logprob: 1e-4,
            grad_norm: 1e-3,
            update: 0.05,
        },
        // TF32 products (cuBLASLt and cubek alike): a 10-bit mantissa.
        (Backend::Cuda, Precision::F32) => Agreement {
            logprob: 1e-2,
            grad_norm: 2e-2,
            update: 0.1,
        },
        // bf16 products against f32 ones, as the CPU's own mixed-precision test allows.
        (_, Precision::Bf16) => Agreement {
            logprob: 5e-2,
            grad_norm: 5e-2,
            update: 0.2,
        },
    }
}

/// The burn learner on the test device (`APR_BACKEND`; on CUDA its products and attention go
/// through cuBLASLt) takes the step burn's generic ops take on the CPU in f32: the same
/// log-probabilities, gradient norm and update, to the precision's tolerance. The `small`
/// preset everywhere, and the `paper` one (227M parameters, short sequences) on a GPU; f32
/// and, where the device has bf16 products, mixed precision. On the CPU the two must agree
/// exactly.
#[test]
fn a_step_on_the_test_device_follows_the_cpus_f32_step() {
    let backend = Backend::from_env().unwrap();
    let device = backend.device(0).unwrap();
    let cpu = Backend::Cpu.device(0).unwrap();
    let presets: &[Preset] = match backend {
        Backend::Cuda => &[Preset::Small, Preset::Paper],
        _ => &[Preset::Small],
    };
    let make = |config: &ModelConfig, weights: &Weights, device: &Device, precision| {
        new_learner(
            LearnerKind::Burn,
            config,
            weights,
            AdamWConfig::default(),
            device,
            precision,
        )
        .unwrap()
    };
    let (_, _, batch) = setup();
    let mut compared = 0;
    for &preset in presets {
        let config = ModelConfig {
            max_seq_len: 64,
            ..ModelConfig::preset(preset, 40)
        };
        let weights = init_weights(&config, 7);
        let mut reference = make(&config, &weights, &cpu, Precision::F32);
        let expected = reference.score(&batch).unwrap();
        let expected_norm = train(reference.as_mut(), &batch, 1)[0];
        let expected_weights = reference.weights();
        drop(reference);
        let update = mean_abs(&expected_weights, &weights);
        assert!(update > 1e-3, "{preset:?}: the step moved nothing");
        for precision in Precision::ALL {
            if precision.check(&device).is_err() {
                continue;
            }
            let what = format!("{preset:?} {precision} on {backend:?}");
            let tol = agreement(backend, precision);
            let mut ours = make(&config, &weights, &device, precision);
            let got = ours.score(&batch).unwrap();
            let worst = largest_gap(&got, &expected);
            assert!(
                worst <= tol.logprob,
                "{what}: log-probabilities differ by {worst}"
            );
            let norm = train(ours.as_mut(), &batch, 1)[0];
            assert!(
                (norm - expected_norm).abs() <= tol.grad_norm * expected_norm,
                "{what}: gradient norm {norm} vs the CPU's {expected_norm}"
            );
            let apart = mean_abs(&ours.weights(), &expected_weights);
            assert!(
                apart <= tol.update * update,
                "{what}: updates differ by {apart} on average (update {update})"
            );
            let apart_pct = 100.0 * apart / update;
            eprintln!(
                "{what}: log-prob {worst:.2e}, grad norm {norm:.4} vs {expected_norm:.4}, \
                 update apart {apart_pct:.1}%"
            );
            compared += 1;
        }
    }
    // f32 runs on every device, bf16 where the device has it.
    assert!(compared >= presets.len());
}
