//! The CPU engine is batch-invariant: a slot's logits do not depend, to the bit, on which other
//! slots share its step, nor on the number of threads. Sampled decoding then gives the same
//! tokens and log-probabilities at any `--slots`.

use apr_core::decoder::{BatchedDecoder, Sampling, StepInput};
use apr_model::native::{NativeEngine, NativeModel};
use apr_model::{init_weights, AprTokenizer, ModelConfig, Preset};

fn engine(slots: usize) -> NativeEngine {
    let tok = AprTokenizer::domain();
    let config = ModelConfig::preset(Preset::Tiny, tok.vocab_size());
    let model = NativeModel::from_weights(&config, &init_weights(&config, 3)).unwrap();
    NativeEngine::new(model, slots, 256)
}

fn input(slot: usize, tokens: &[u32]) -> StepInput<'_> {
    StepInput {
        slot,
        tokens,
        sampling: Sampling::temperature(1.0),
        seed: slot as u64,
    }
}

/// Prefills slot 0 with a prompt, then decodes `steps` tokens of it while `others` other slots
/// decode beside it; returns slot 0's log-probability stream.
fn stream(others: usize, steps: usize) -> Vec<(u32, f32)> {
    let tok = AprTokenizer::domain();
    let prompt = tok
        .encode("Current State: 27:[22, 26, 31, 53], Operations: []\n")
        .unwrap();
    let mut e = engine(others + 1);
    let mut out = Vec::new();
    let mut last: Vec<Vec<u32>> = (0..=others).map(|_| Vec::new()).collect();
    // Different prompt lengths for the neighbours, so the batch holds ragged rows.
    let prompts: Vec<Vec<u32>> = (0..=others)
        .map(|s| prompt[..prompt.len() - (s % 5)].to_vec())
        .collect();
    let inputs: Vec<StepInput> = (0..=others).map(|s| input(s, &prompts[s])).collect();
    let sampled = e.step(&inputs).unwrap();
    for (s, x) in sampled.iter().enumerate() {
        last[s] = vec![x.token];
    }
    out.push((sampled[0].token, sampled[0].logprob));
    for _ in 0..steps {
        let inputs: Vec<StepInput> = (0..=others).map(|s| input(s, &last[s])).collect();
        let sampled = e.step(&inputs).unwrap();
        for (s, x) in sampled.iter().enumerate() {
            last[s] = vec![x.token];
        }
        out.push((sampled[0].token, sampled[0].logprob));
    }
    out
}

#[test]
fn a_slots_stream_does_not_depend_on_its_neighbours() {
    let alone = stream(0, 40);
    for others in [1, 6, 63] {
        let beside = stream(others, 40);
        for (i, (a, b)) in alone.iter().zip(&beside).enumerate() {
            assert_eq!(a.0, b.0, "token {i} with {others} neighbours");
            assert_eq!(
                a.1.to_bits(),
                b.1.to_bits(),
                "log-probability {i} with {others} neighbours: {} vs {}",
                a.1,
                b.1
            );
        }
    }
}

#[test]
fn a_slots_stream_does_not_depend_on_the_thread_count() {
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| stream(6, 30))
    };
    let one = run(1);
    let two = run(2);
    let bits = |s: &[(u32, f32)]| s.iter().map(|(t, l)| (*t, l.to_bits())).collect::<Vec<_>>();
    assert_eq!(bits(&one), bits(&two));
}
