//! Scheduler overhead of the APR runtime per decode step, with a model that does no work: the
//! cost the runtime adds on top of a real model's forward pass (compare with `model/decode`).

use std::hint::black_box;

use apr_core::decoder::{BatchedDecoder, DecoderError, Sampled, SlotId, StepInput};
use apr_core::runtime::{run, Job, RuntimeConfig};
use apr_core::scripted::ByteCodec;
use apr_countdown::{CountdownTask, Problem};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Writes `steps` digits per thread, then EOS; keeps no state but lengths.
struct Noop {
    lens: Vec<usize>,
    steps: usize,
    calls: u64,
}

impl BatchedDecoder for Noop {
    fn slots(&self) -> usize {
        self.lens.len()
    }
    fn context_limit(&self) -> usize {
        100_000
    }
    fn slot_len(&self, slot: SlotId) -> usize {
        self.lens[slot]
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Sampled>, DecoderError> {
        self.calls += 1;
        Ok(inputs
            .iter()
            .map(|i| {
                self.lens[i.slot] += i.tokens.len();
                let token = if self.lens[i.slot] > self.steps + 40 {
                    2
                } else {
                    b'7' as u32 + 3
                };
                Sampled {
                    token,
                    logprob: 0.0,
                }
            })
            .collect())
    }
    fn truncate(&mut self, slot: SlotId, len: usize) -> Result<(), DecoderError> {
        self.lens[slot] = self.lens[slot].min(len);
        Ok(())
    }
    fn release(&mut self, slot: SlotId) {
        self.lens[slot] = 0;
    }
}

fn scheduler(c: &mut Criterion) {
    const SLOTS: usize = 64;
    const STEPS: usize = 200;
    let problem = Problem {
        nums: vec![3, 4, 8, 3],
        target: 24,
        solution: vec![],
        optimal_path: String::new(),
        start_size: 4,
    };
    let mut group = c.benchmark_group("runtime");
    // One element = one batched decode step of 64 threads.
    group.throughput(Throughput::Elements(STEPS as u64));
    group.bench_function("scheduler_64_slots", |b| {
        b.iter(|| {
            let mut model = Noop {
                lens: vec![0; SLOTS],
                steps: STEPS,
                calls: 0,
            };
            let jobs: Vec<Job<Problem>> = (0..SLOTS)
                .map(|i| Job {
                    id: i,
                    problem: problem.clone(),
                    seed: i as u64,
                })
                .collect();
            let results = run(
                &CountdownTask::apr(),
                &mut model,
                &ByteCodec,
                jobs,
                &RuntimeConfig::default(),
                &mut |_| {},
            );
            black_box((results, model.calls))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = scheduler
}
criterion_main!(benches);
