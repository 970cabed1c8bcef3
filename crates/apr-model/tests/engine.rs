//! The KV-cache engine computes what the full forward computes: for a batch of slots with
//! different lengths, after truncate + prefill, and a batched decode equals single-slot decodes.

use apr_core::decoder::{BatchedDecoder, Sampling, StepInput};
use apr_model::backend::Backend;
use apr_model::{init_weights, AprTokenizer, Engine, Model, ModelConfig, Preset};
use burn::tensor::{Int, Tensor, TensorData};

const TOL: f32 = 1e-4;

fn tiny_model(seed: u64) -> Model {
    let tok = AprTokenizer::domain();
    let config = ModelConfig::preset(Preset::Tiny, tok.vocab_size());
    let device = Backend::from_env().unwrap().device(0).unwrap();
    Model::new(config.clone(), &init_weights(&config, seed), &device).unwrap()
}

/// Logits at every position of one sequence, by the full (uncached) forward.
fn full_logits(model: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let device = model.rope_device();
    let t = Tensor::<2, Int>::from_data(
        TensorData::new(
            tokens.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            [1, tokens.len()],
        ),
        &device,
    );
    let logits = model.forward(t);
    let [_, s, v] = logits.dims();
    let data: Vec<f32> = logits.into_data().convert::<f32>().try_to_vec().unwrap();
    (0..s).map(|i| data[i * v..(i + 1) * v].to_vec()).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn input(slot: usize, tokens: &[u32]) -> StepInput<'_> {
    StepInput::greedy(slot, tokens)
}

fn sequences() -> Vec<Vec<u32>> {
    let tok = AprTokenizer::domain();
    [
        "Moving to Node #0\nCurrent State: 27:[22, 26, 31, 53], Operations: []\nExploring Operation: 53-22=31",
        "Current State: 10:[1, 2, 3], Operations: []\n",
        "Moving to Node #0,2\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']\nExploring Operation: 31/31=1, Resulting Numbers: [26, 1]\n",
    ]
    .iter()
    .map(|t| tok.encode(t).unwrap())
    .collect()
}

#[test]
fn cached_prefill_decode_and_truncate_match_the_full_forward() {
    let model = tiny_model(1);
    let seqs = sequences();
    let full: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| full_logits(&model, s)).collect();
    let mut engine = Engine::new(model, 4, 256, 0);
    // Prefill three slots with different prompt lengths in one pass (slot ids not in order).
    let prompt = [7usize, 3, 11];
    let slots = [2usize, 0, 3];
    let inputs: Vec<StepInput> = (0..3)
        .map(|i| input(slots[i], &seqs[i][..prompt[i]]))
        .collect();
    let logits = engine.step_logits(&inputs).unwrap();
    for i in 0..3 {
        let d = max_diff(&logits[i], &full[i][prompt[i] - 1]);
        assert!(d < TOL, "prefill row {i}: {d}");
    }
    // Decode the next tokens of all three together, one at a time.
    for k in 0..6 {
        let inputs: Vec<StepInput> = (0..3)
            .map(|i| input(slots[i], &seqs[i][prompt[i] + k..prompt[i] + k + 1]))
            .collect();
        let logits = engine.step_logits(&inputs).unwrap();
        for i in 0..3 {
            let d = max_diff(&logits[i], &full[i][prompt[i] + k]);
            assert!(d < TOL, "decode step {k} row {i}: {d}");
        }
    }
    // Truncate slot 0 (sequence 1) back to 2 tokens, then prefill the rest of the sequence.
    engine.truncate(0, 2).unwrap();
    assert_eq!(engine.slot_len(0), 2);
    let rest = &seqs[1][2..];
    let logits = engine.step_logits(&[input(0, rest)]).unwrap();
    let d = max_diff(&logits[0], full[1].last().unwrap());
    assert!(d < TOL, "after truncate: {d}");
}

#[test]
fn batched_decode_equals_single_slot_decodes() {
    let seqs = sequences();
    let mut batched = Engine::new(tiny_model(2), 3, 256, 0);
    let mut single = Engine::new(tiny_model(2), 3, 256, 0);
    let inputs: Vec<StepInput> = (0..3).map(|i| input(i, &seqs[i][..5])).collect();
    batched.step_logits(&inputs).unwrap();
    for (i, seq) in seqs.iter().enumerate() {
        single.step_logits(&[input(i, &seq[..5])]).unwrap();
    }
    for k in 5..9 {
        let inputs: Vec<StepInput> = (0..3).map(|i| input(i, &seqs[i][k..k + 1])).collect();
        let together = batched.step_logits(&inputs).unwrap();
        for i in 0..3 {
            let alone = single.step_logits(&[input(i, &seqs[i][k..k + 1])]).unwrap();
            let d = max_diff(&together[i], &alone[0]);
            assert!(d < TOL, "token {k} slot {i}: {d}");
        }
    }
}

#[test]
fn sampling_is_seeded_per_thread_and_greedy_is_argmax() {
    let seqs = sequences();
    let sampling = Sampling {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    // The same thread (seed 42) alone and next to another thread draws the same tokens.
    let run = |with_neighbour: bool| -> Vec<u32> {
        let mut engine = Engine::new(tiny_model(3), 2, 256, 0);
        let mut next = seqs[0][..4].to_vec();
        let mut out = Vec::new();
        for _ in 0..12 {
            let mut inputs = vec![StepInput {
                slot: 0,
                tokens: &next,
                sampling,
                seed: 42,
            }];
            if with_neighbour {
                inputs.push(StepInput {
                    slot: 1,
                    tokens: &seqs[2][..1],
                    sampling,
                    seed: 7,
                });
            }
            let sampled = engine.step(&inputs).unwrap();
            if with_neighbour {
                engine.release(1);
            }
            out.push(sampled[0].token);
            next = vec![sampled[0].token];
        }
        out
    };
    assert_eq!(run(false), run(true));
    // Greedy picks the argmax, and its log-probability is the log-softmax there.
    let mut engine = Engine::new(tiny_model(3), 1, 256, 0);
    let logits = engine.step_logits(&[input(0, &seqs[1])]).unwrap().remove(0);
    let mut engine = Engine::new(tiny_model(3), 1, 256, 0);
    let s = engine.step(&[input(0, &seqs[1])]).unwrap()[0];
    let argmax = logits
        .iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > logits[best] { i } else { best });
    assert_eq!(s.token as usize, argmax);
    let lse = logits
        .iter()
        .map(|&x| ((x - logits[argmax]) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + logits[argmax];
    assert!((s.logprob - (logits[argmax] - lse)).abs() < 1e-4);
    // top_k = 1 at any temperature is greedy.
    let mut engine = Engine::new(tiny_model(3), 1, 256, 0);
    let k1 = engine
        .step(&[StepInput {
            slot: 0,
            tokens: &seqs[1],
            sampling: Sampling {
                temperature: 1.5,
                top_k: 1,
                top_p: 1.0,
            },
            seed: 9,
        }])
        .unwrap()[0];
    assert_eq!(k1.token as usize, argmax);
}

#[test]
fn context_overflow_and_bad_slots_are_errors() {
    let seqs = sequences();
    let mut engine = Engine::new(tiny_model(4), 2, 8, 0);
    assert!(engine.step(&[input(0, &seqs[0][..9])]).is_err());
    assert!(engine.step(&[input(5, &seqs[0][..2])]).is_err());
    assert!(engine
        .step(&[input(1, &seqs[0][..2]), input(1, &seqs[0][..2])])
        .is_err());
}

/// A binary with CUDA compiled in answers in one line on a machine without a driver, instead of
/// letting burn's CUDA runtime panic on a worker thread; without CUDA compiled in it says so.
#[test]
fn cuda_device_is_a_one_line_answer_with_or_without_a_driver() {
    let result = Backend::Cuda.device(0);
    if !Backend::compiled().contains(&Backend::Cuda) {
        let e = result.unwrap_err();
        assert!(e.contains("not compiled into this binary"), "{e}");
    } else if apr_model::backend::cuda_driver_present() {
        assert!(result.is_ok(), "driver present but no device: {result:?}");
    } else {
        let e = result.unwrap_err();
        assert!(e.contains("no NVIDIA driver"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}
