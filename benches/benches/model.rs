//! The model on the CPU backend: training-step throughput (tiny, small; burn and native learners)
//! and engine prefill and decode throughput at 1, 16 and 64 slots (small), for the burn engine
//! and the CPU engine.

use std::hint::black_box;

use apr_benches::{forward_backward, synthetic_batch};
use apr_core::decoder::{BatchedDecoder, Sampling, StepInput};
use apr_model::backend::Backend;
use apr_model::learner::{new_learner, LearnerKind};
use apr_model::native::{NativeEngine, NativeModel};
use apr_model::optim::AdamWConfig;
use apr_model::{init_weights, AprTokenizer, Engine, Model, ModelConfig, Precision, Preset};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn model(preset: Preset) -> Model {
    let tok = AprTokenizer::domain();
    let config = ModelConfig::preset(preset, tok.vocab_size());
    let device = Backend::Cpu.device(0).unwrap();
    Model::new(config.clone(), &init_weights(&config, 0), &device).unwrap()
}

/// Forward and backward of 16 sequences of 256 tokens (4,096 tokens a step) through each learner.
fn training(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step");
    let device = Backend::Cpu.device(0).unwrap();
    let batch = synthetic_batch(16, 256);
    for (preset, name) in [(Preset::Tiny, "tiny"), (Preset::Small, "small")] {
        let config = ModelConfig::preset(preset, AprTokenizer::domain().vocab_size());
        let weights = init_weights(&config, 0);
        for (kind, prefix) in [(LearnerKind::Burn, ""), (LearnerKind::Native, "native_")] {
            let mut learner = new_learner(
                kind,
                &config,
                &weights,
                AdamWConfig::default(),
                &device,
                Precision::F32,
            )
            .unwrap();
            group.throughput(Throughput::Elements(batch.len() as u64));
            group.bench_function(format!("{prefix}{name}"), |b| {
                b.iter(|| forward_backward(black_box(learner.as_mut()), &batch).unwrap())
            });
        }
    }
    group.finish();
}

fn engine(c: &mut Criterion) {
    let m = model(Preset::Small);
    let native = NativeModel::from_weights(&m.config, &m.llama.to_weights()).unwrap();
    let burn = |slots| Box::new(Engine::new(m.clone(), slots, 1024, 0)) as Box<dyn BatchedDecoder>;
    let cpu =
        |slots| Box::new(NativeEngine::new(native.clone(), slots, 1024)) as Box<dyn BatchedDecoder>;
    engine_group(c, "engine", &burn);
    engine_group(c, "native_engine", &cpu);
}

/// Prefill of 64 tokens and decode of one token, at 1, 16 and 64 slots.
fn engine_group(c: &mut Criterion, name: &str, make: &dyn Fn(usize) -> Box<dyn BatchedDecoder>) {
    let prompt: Vec<u32> = (0..64).map(|t| 4 + (t % 50) as u32).collect();
    let mut group = c.benchmark_group(name);
    for slots in [1usize, 16, 64] {
        group.throughput(Throughput::Elements((slots * prompt.len()) as u64));
        group.bench_function(format!("prefill_64_tokens_{slots}_slots"), |b| {
            let mut e = make(slots);
            b.iter(|| {
                for s in 0..slots {
                    e.release(s);
                }
                let inputs: Vec<StepInput> = (0..slots)
                    .map(|s| StepInput {
                        slot: s,
                        tokens: &prompt,
                        sampling: Sampling::GREEDY,
                        seed: 0,
                    })
                    .collect();
                black_box(e.step(&inputs).unwrap())
            })
        });
        group.throughput(Throughput::Elements(slots as u64));
        group.bench_function(format!("decode_{slots}_slots"), |b| {
            let mut e = make(slots);
            let inputs: Vec<StepInput> = (0..slots)
                .map(|s| StepInput {
                    slot: s,
                    tokens: &prompt,
                    sampling: Sampling::GREEDY,
                    seed: 0,
                })
                .collect();
            e.step(&inputs).unwrap();
            let one = [7u32];
            b.iter(|| {
                if e.slot_len(0) + 1 >= 1024 {
                    for s in 0..slots {
                        e.truncate(s, 64).unwrap();
                    }
                }
                let inputs: Vec<StepInput> = (0..slots)
                    .map(|s| StepInput {
                        slot: s,
                        tokens: &one,
                        sampling: Sampling::temperature(1.0),
                        seed: s as u64,
                    })
                    .collect();
                black_box(e.step(&inputs).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = training, engine
}
criterion_main!(benches);
