//! The engine's static and captured decode steps compute what its dynamic path computes, and the
//! device sampler draws what the host sampler draws.
//!
//! Run on every compiled backend through `APR_BACKEND` (CPU by default, lavapipe in CI, CUDA in
//! `scripts/gpu_bench.sh`). On the CubeCL backends the captured path must really capture: every
//! shape becomes a graph that replays (CUDA graphs; recorded dispatches on wgpu); burn-flex has
//! no graphs and every capture must be reported as a fallback.

use apr_core::decoder::{BatchedDecoder, Sampled, Sampling, StepInput};
use apr_model::backend::Backend;
use apr_model::device_sample::{draw_table, f32_tensor, sample_rows, SamplerTables, DRAW_FIELDS};
use apr_model::native::sample;
use apr_model::{init_weights, AprTokenizer, DecodePath, Engine, Model, ModelConfig, Preset};
use burn::tensor::TensorData;

/// Log-probabilities agree to this: f32 on the CPU; on a GPU the two paths run matmuls of other
/// shapes, which cubek rounds in TF32 on CUDA (~1e-3 of a logit).
fn tolerance() -> f32 {
    if backend() == Backend::Cpu {
        1e-4
    } else {
        2e-3
    }
}

fn backend() -> Backend {
    Backend::from_env().unwrap()
}

fn tiny_model(seed: u64) -> Model {
    let tok = AprTokenizer::domain();
    let config = ModelConfig::preset(Preset::Tiny, tok.vocab_size());
    let device = backend().device(0).unwrap();
    Model::new(config.clone(), &init_weights(&config, seed), &device).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    let tok = AprTokenizer::domain();
    [
        "Current State: 27:[22, 26, 31, 53], Operations: []\n",
        "Moving to Node #0,2\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']\n",
        "Current State: 10:[1, 2, 3], Operations: []\nExploring Operation: 1+2=3",
    ]
    .iter()
    .map(|t| tok.encode(t).unwrap())
    .collect()
}

/// Everything one engine answered in a fixed script: prefill three slots (not the first ones,
/// not in order), decode with a slot idle now and then, truncate one and prefill it again,
/// decode on past 128 positions. The tokens fed back are each slot's own samples. The steps
/// take three shapes: 12 rows over 128 keys, 8 rows over 128 keys (while slot 9 sits out), and
/// 12 rows over 200 keys (once slot 9 holds more than 127 tokens).
fn script(path: DecodePath, sampling: [Sampling; 3]) -> (Vec<Sampled>, Engine) {
    let mut engine = Engine::new(tiny_model(5), 12, 200, 0).with_decode_path(path);
    assert_eq!(engine.decode_path(), path);
    let slots = [9usize, 1, 4];
    let seeds = [11u64, 12, 13];
    let prompts = prompts();
    let mut out = Vec::new();
    let prefill: Vec<StepInput> = (0..3)
        .map(|i| StepInput {
            slot: slots[i],
            tokens: &prompts[i],
            sampling: sampling[i],
            seed: seeds[i],
        })
        .collect();
    let mut last: Vec<u32> = engine
        .step(&prefill)
        .unwrap()
        .iter()
        .map(|s| s.token)
        .collect();
    for step in 0..110 {
        if step == 20 {
            // Truncate slot 1 into its prompt and prefill a join-like block after it.
            engine.truncate(slots[1], 30).unwrap();
            let block = prompts[2][..9].to_vec();
            let s = engine
                .step(&[StepInput {
                    slot: slots[1],
                    tokens: &block,
                    sampling: sampling[1],
                    seed: seeds[1],
                }])
                .unwrap();
            out.extend(&s);
            last[1] = s[0].token;
        }
        // Slot 4 sits out every third step, slot 9 steps 50 to 59.
        let idle = |i: usize| match i {
            0 => (50..60).contains(&step),
            2 => step % 3 == 0,
            _ => false,
        };
        let active: Vec<usize> = (0..3).filter(|&i| !idle(i)).collect();
        let tokens: Vec<[u32; 1]> = active.iter().map(|&i| [last[i]]).collect();
        let inputs: Vec<StepInput> = active
            .iter()
            .zip(&tokens)
            .map(|(&i, t)| StepInput {
                slot: slots[i],
                tokens: t,
                sampling: sampling[i],
                seed: seeds[i],
            })
            .collect();
        let sampled = engine.step(&inputs).unwrap();
        for (&i, s) in active.iter().zip(&sampled) {
            last[i] = s.token;
        }
        out.extend(sampled);
    }
    (out, engine)
}

fn assert_same(a: &[Sampled], b: &[Sampled], what: &str) {
    assert_eq!(a.len(), b.len());
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.token, y.token, "{what}: token {k}");
        assert!(
            (x.logprob - y.logprob).abs() < tolerance(),
            "{what}: log-prob {k}: {} vs {}",
            x.logprob,
            y.logprob
        );
    }
}

/// On the CubeCL backends (CUDA, wgpu) every captured shape is a graph that replays; burn-flex
/// has none, so there every capture fell back, and the engine says so.
fn assert_captures(engine: &Engine) {
    let report = engine.graph_report();
    assert_eq!(
        report.hardware + report.fallback,
        3,
        "one capture a shape: {report:?}"
    );
    if backend() == Backend::Cpu {
        assert_eq!(report.hardware, 0, "{report:?}");
        assert!(report.fallback > 0, "{report:?}");
    } else {
        assert!(report.hardware > 0, "{report:?}");
        assert_eq!(report.fallback, 0, "{report:?}");
        assert!(report.replays > 0, "{report:?}");
    }
}

#[test]
fn static_and_captured_greedy_decode_equal_the_dynamic_path() {
    let greedy = [Sampling::GREEDY; 3];
    let (dynamic, _) = script(DecodePath::Dynamic, greedy);
    let (fixed, _) = script(DecodePath::Static, greedy);
    assert_same(&dynamic, &fixed, "static vs dynamic");
    let (captured, engine) = script(DecodePath::Captured, greedy);
    assert_same(&fixed, &captured, "captured vs static");
    assert_captures(&engine);
}

#[test]
fn static_and_captured_sampling_draw_the_same_tokens_for_the_same_seeds() {
    let sampling = [
        Sampling::temperature(1.0),
        Sampling {
            temperature: 0.7,
            top_k: 5,
            top_p: 1.0,
        },
        Sampling {
            temperature: 1.3,
            top_k: 0,
            top_p: 0.8,
        },
    ];
    let (dynamic, _) = script(DecodePath::Dynamic, sampling);
    let (fixed, _) = script(DecodePath::Static, sampling);
    assert_same(&dynamic, &fixed, "static vs dynamic");
    let (captured, engine) = script(DecodePath::Captured, sampling);
    assert_same(&fixed, &captured, "captured vs static");
    assert_captures(&engine);
    // A mixed batch (one greedy slot among sampled ones) takes the sampled shape.
    let mixed = [sampling[0], Sampling::GREEDY, sampling[2]];
    let (dynamic, _) = script(DecodePath::Dynamic, mixed);
    let (captured, _) = script(DecodePath::Captured, mixed);
    assert_same(&dynamic, &captured, "mixed: captured vs dynamic");
}

/// Random logits with ties (coarse values), every kind of setting, many uniforms: the device
/// sampler picks the host sampler's token, except where the uniform lands within rounding of a
/// boundary of the cumulative mass (the two sum in different orders).
#[test]
fn device_sampler_draws_what_the_host_sampler_draws() {
    let device = backend().device(0).unwrap();
    let v = 37;
    let rows = 64;
    let tables = SamplerTables::new(v, &device);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let settings = [
        Sampling::GREEDY,
        Sampling::temperature(1.0),
        Sampling::temperature(0.5),
        Sampling {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
        },
        Sampling {
            temperature: 2.0,
            top_k: 0,
            top_p: 0.6,
        },
        Sampling {
            temperature: 0.8,
            top_k: 10,
            top_p: 0.9,
        },
        Sampling {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
        },
    ];
    let (mut compared, mut near_boundary) = (0, 0);
    for round in 0..6 {
        let logits: Vec<f32> = (0..rows * v)
            .map(|_| ((next() % 41) as f32 - 20.0) * 0.25)
            .collect();
        let params: Vec<(Sampling, f64)> = (0..rows)
            .map(|r| {
                let u = (next() >> 11) as f64 / (1u64 << 53) as f64;
                (settings[(r + round) % settings.len()], u)
            })
            .collect();
        let draws = f32_tensor(draw_table(&params, v), [DRAW_FIELDS, rows], &device);
        let tensor = burn::tensor::Tensor::<2>::from_data(
            TensorData::new(logits.clone(), [rows, v]),
            &device,
        );
        let (tokens, logprobs) = sample_rows(tensor, Some(&draws), &tables);
        let tokens: Vec<i64> = tokens.into_data().iter::<i64>().collect();
        let logprobs: Vec<f32> = logprobs.into_data().iter::<f32>().collect();
        for r in 0..rows {
            let row = &logits[r * v..(r + 1) * v];
            let (s, u) = params[r];
            let host = sample(row, s, u);
            compared += 1;
            if host.token as i64 != tokens[r] {
                // Only a uniform within 1e-5 of a boundary may flip the pick.
                let nudged = [
                    sample(row, s, u - 1e-5).token,
                    sample(row, s, u + 1e-5).token,
                ];
                assert!(
                    nudged.contains(&(tokens[r] as u32)),
                    "row {r} ({s:?}, u = {u}): device {} host {}",
                    tokens[r],
                    host.token
                );
                near_boundary += 1;
                continue;
            }
            assert!((host.logprob - logprobs[r]).abs() < 1e-4, "row {r}");
        }
    }
    assert!(
        near_boundary * 100 <= compared,
        "{near_boundary} of {compared} differ"
    );
}
