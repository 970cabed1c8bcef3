//! Summary statistics of a trace set (spec §3.4's table).

use serde::Serialize;

use std::time::Instant;

use rayon::prelude::*;

use crate::problem::{streams, ProblemSpec};
use crate::pyrand::{derive_seed, par_map_seeded};
use crate::record::{solve_counted, SolverConfig, TokenCounter, TokenStats, TraceRecord};

/// Mean, median and maximum of a quantity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub median: f64,
    /// Maximum.
    pub max: f64,
}

impl Summary {
    /// Summarises values (all zero when empty).
    pub fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Summary::default();
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Summary {
            mean: values.iter().sum::<f64>() / n as f64,
            median,
            max: values[n - 1],
        }
    }
}

/// Statistics of a set of trace records.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TraceStats {
    /// Records.
    pub records: usize,
    /// Fraction solved.
    pub success_rate: f64,
    /// Fraction of records with 0, 1, 2 and 3 or more spawn rounds (APR).
    pub spawn_rounds: [f64; 4],
    /// Child threads per problem.
    pub children_per_problem: Summary,
    /// Longest single call (the unit of the records: characters or tokens).
    pub longest_thread: Summary,
    /// Total length with repeated parent prefixes counted once.
    pub total_length: Summary,
    /// Mean length of one call as a training sequence: an APR thread segment (parent segment or
    /// child), or a whole SoS+ trace.
    pub mean_call_length: f64,
}

/// The per-record quantities the statistics need, so that large generated sets can be summarised
/// without keeping their text.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RecordFacts {
    /// Reached the goal.
    pub solved: bool,
    /// Spawn rounds.
    pub spawn_rounds: usize,
    /// Child threads.
    pub children: usize,
    /// Longest call.
    pub longest: f64,
    /// Total length.
    pub total: f64,
    /// Calls (thread segments; 1 for SoS+).
    pub calls: usize,
    /// Sum of the calls' lengths as training sequences.
    pub call_length_sum: f64,
}

impl RecordFacts {
    /// The facts of one record, its lengths measured with `counter` (a file's own counts, which
    /// may be in another tokenizer's units, are not used).
    pub fn of(r: &TraceRecord, counter: &dyn TokenCounter) -> Self {
        Self::counted(r, &TokenStats::of(&r.calls(), counter))
    }

    /// The facts of one record whose lengths are already counted.
    pub fn counted(r: &TraceRecord, stats: &TokenStats) -> Self {
        RecordFacts {
            solved: r.solved(),
            spawn_rounds: r.spawn_rounds(),
            children: r.children(),
            longest: stats.longest as f64,
            total: stats.total as f64,
            calls: stats.calls,
            call_length_sum: stats.call_sum as f64,
        }
    }
}

impl TraceStats {
    /// Computes the statistics of records, lengths measured with `counter`.
    pub fn of(records: &[TraceRecord], counter: &dyn TokenCounter) -> Self {
        let facts: Vec<RecordFacts> = records
            .par_iter()
            .map(|r| RecordFacts::of(r, counter))
            .collect();
        Self::of_facts(&facts)
    }

    /// Computes the statistics from per-record facts.
    pub fn of_facts(facts: &[RecordFacts]) -> Self {
        let n = facts.len().max(1) as f64;
        let mut rounds = [0.0; 4];
        for f in facts {
            rounds[f.spawn_rounds.min(3)] += 1.0;
        }
        TraceStats {
            records: facts.len(),
            success_rate: facts.iter().filter(|f| f.solved).count() as f64 / n,
            spawn_rounds: rounds.map(|r| r / n),
            children_per_problem: Summary::of(facts.iter().map(|f| f.children as f64).collect()),
            longest_thread: Summary::of(facts.iter().map(|f| f.longest).collect()),
            total_length: Summary::of(facts.iter().map(|f| f.total).collect()),
            mean_call_length: facts.iter().map(|f| f.call_length_sum).sum::<f64>()
                / facts.iter().map(|f| f.calls).sum::<usize>().max(1) as f64,
        }
    }
}

/// Timing of [`generate_facts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct GenerationTiming {
    /// Worker threads.
    pub threads: usize,
    /// Seconds drawing problems.
    pub problem_seconds: f64,
    /// Seconds solving them (records built, lengths counted).
    pub trace_seconds: f64,
    /// Wall seconds in all.
    pub total_seconds: f64,
    /// Problems with their traces per second.
    pub problems_and_traces_per_second: f64,
}

/// Draws `count` problems and solves them in memory, chunk by chunk, keeping only each record's
/// [`RecordFacts`] (the text of 500,000 APR records would not fit in memory); lengths are
/// counted with `counter`. Timed.
pub fn generate_facts(
    spec: &ProblemSpec,
    solver: &SolverConfig,
    count: usize,
    seed: u64,
    counter: &dyn TokenCounter,
    progress: &(dyn Fn(usize) + Sync),
) -> (Vec<RecordFacts>, GenerationTiming) {
    const CHUNK: usize = 16_384;
    let start = Instant::now();
    let mut facts = Vec::with_capacity(count);
    let mut problem_seconds = 0.0;
    let mut trace_seconds = 0.0;
    for first in (0..count).step_by(CHUNK) {
        let n = CHUNK.min(count - first);
        let t = Instant::now();
        let problems = par_map_seeded(
            n,
            |i| derive_seed(seed, streams::TRAIN, (first as u64) + i),
            |_, rng| spec.draw_with(rng),
        );
        problem_seconds += t.elapsed().as_secs_f64();
        let t = Instant::now();
        facts.extend(par_map_seeded(
            n,
            |i| derive_seed(seed, streams::SOLVER, (first as u64) + i),
            |i, rng| {
                let (record, stats) = solve_counted(&problems[i], solver, rng, counter);
                RecordFacts::counted(&record, &stats)
            },
        ));
        trace_seconds += t.elapsed().as_secs_f64();
        progress(first + n);
    }
    let total = start.elapsed().as_secs_f64();
    let timing = GenerationTiming {
        threads: rayon::current_num_threads(),
        problem_seconds,
        trace_seconds,
        total_seconds: total,
        problems_and_traces_per_second: count as f64 / total.max(1e-9),
    };
    (facts, timing)
}
