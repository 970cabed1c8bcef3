//! Scheduler overhead of the APR runtime per decode step, with a model that does no work: the
//! cost the runtime adds on top of a real model's forward pass (compare with `model/decode`).

use std::hint::black_box;

use apr_core::decoder::{BatchedDecoder, DecoderError, Sampled, SlotId, StepInput};
use apr_core::runtime::{run, Job, RuntimeConfig};
use apr_core::scripted::ByteCodec;
use apr_core::SlotTable;
use apr_countdown::{CountdownTask, Problem};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Writes `steps` digits per thread, then EOS; keeps no state but lengths.
struct Noop {
    lens: SlotTable,
    steps: usize,
    calls: u64,
}

impl BatchedDecoder for Noop {
    fn table(&self) -> &SlotTable {
        &self.lens
    }
    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<Sampled>, DecoderError> {
        self.calls += 1;
        self.lens.append(inputs);
        Ok(inputs
            .iter()
            .map(|i| {
                let token = if self.lens.slot_len(i.slot) > self.steps + 40 {
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
        self.lens.truncate(slot, len).map(|_| ())
    }
    fn release(&mut self, slot: SlotId) {
        self.lens.release(slot);
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
                lens: SlotTable::new(SLOTS, 100_000),
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
