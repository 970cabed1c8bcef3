//! Hot paths of data generation: drawing problems, the APR and SoS+ solvers, whole records.
//! Throughput is reported per problem on one thread (criterion runs single-threaded).

use std::collections::HashSet;
use std::hint::black_box;

use apr_countdown::problem::{streams, ProblemSpec};
use apr_countdown::pyrand::{PyRandom, LANES};
use apr_countdown::record::{
    trace_for, AprSolverConfig, CharCounter, SolverConfig, SospSolverConfig,
};
use apr_countdown::search::{apr, sosp, SuccessorOrder};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BATCH: u64 = 256;

fn solvers(c: &mut Criterion) {
    let spec = ProblemSpec::default();
    let problems = spec.generate(BATCH as usize, 1, streams::TRAIN, &HashSet::new());
    let mut group = c.benchmark_group("countdown");
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("problems_4", |b| {
        let mut i = 0;
        b.iter(|| {
            for _ in 0..BATCH {
                black_box(spec.draw(9, streams::TRAIN, i));
                i += 1;
            }
        })
    });
    group.bench_function("apr_solver_4", |b| {
        b.iter(|| {
            for (i, p) in problems.iter().enumerate() {
                let mut rng = PyRandom::new(i as u64);
                let beam = rng.randint(1, 10);
                let sub = rng.randint(beam, 15);
                black_box(apr(
                    p.target,
                    &p.nums,
                    beam as usize,
                    sub as usize,
                    0.9,
                    SuccessorOrder::Shuffled,
                    &mut rng,
                ));
            }
        })
    });
    group.bench_function("sosp_solver_4", |b| {
        b.iter(|| {
            for (i, p) in problems.iter().enumerate() {
                let mut rng = PyRandom::new(i as u64);
                let beam = 1 + rng.below(5);
                black_box(sosp(
                    p.target,
                    &p.nums,
                    beam as usize,
                    0.5,
                    SuccessorOrder::Shuffled,
                    &mut rng,
                ));
            }
        })
    });
    let apr_cfg = SolverConfig::Apr(AprSolverConfig::default());
    group.bench_function("apr_record_4", |b| {
        b.iter(|| {
            for (i, p) in problems.iter().enumerate() {
                black_box(trace_for(p, i, &apr_cfg, 3, &CharCounter));
            }
        })
    });
    let sosp_cfg = SolverConfig::Sosp(SospSolverConfig::default());
    group.bench_function("sosp_record_4", |b| {
        b.iter(|| {
            for (i, p) in problems.iter().enumerate() {
                black_box(trace_for(p, i, &sosp_cfg, 3, &CharCounter));
            }
        })
    });
    group.finish();
}

/// Seeding a Python-compatible stream per problem and per trace: one at a time, or
/// [`LANES`] side by side as the generators do.
fn seeding(c: &mut Criterion) {
    let mut group = c.benchmark_group("pyrand");
    group.throughput(Throughput::Elements(LANES as u64));
    let mut base = 1u64 << 40;
    group.bench_function("seed_one_at_a_time", |b| {
        b.iter(|| {
            for k in 0..LANES as u64 {
                black_box(PyRandom::new(base + k));
            }
            base += LANES as u64;
        })
    });
    group.bench_function("seed_lanes", |b| {
        b.iter(|| {
            black_box(PyRandom::new_lanes::<LANES>(std::array::from_fn(|k| {
                base + k as u64
            })));
            base += LANES as u64;
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = solvers, seeding
}
criterion_main!(benches);
