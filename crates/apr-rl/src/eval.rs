//! Evaluation: runs problems through the APR runtime on the engine and aggregates what the paper
//! reports (accuracy, pass@n, cons@n, token counts, latency).

use std::collections::HashMap;
use std::time::Instant;

use apr_core::runtime::{run, Job, Mode, ProblemResult, RuntimeConfig};
use apr_countdown::{CountdownTask, Problem};
use apr_model::engine::engine_for;
use apr_model::{AprTokenizer, Model};
use serde::{Deserialize, Serialize};

/// One sample of one problem, as written to `records.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Problem index in the input.
    pub problem: usize,
    /// Sample index (0 for greedy).
    pub sample: usize,
    /// Starting numbers.
    pub nums: Vec<i64>,
    /// Target.
    pub target: i64,
    /// Whether the verified answer is correct.
    pub correct: bool,
    /// The runtime's result (prompt, every thread, answer, metrics).
    pub result: ProblemResult,
}

/// Aggregates over an evaluation.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EvalSummary {
    /// Problems.
    pub problems: usize,
    /// Samples per problem.
    pub samples: usize,
    /// Mean correctness over all samples (= greedy accuracy when samples = 1).
    pub accuracy: f64,
    /// Problems with at least one correct sample.
    pub pass_at_n: f64,
    /// Problems whose majority answer (over samples that found one) is correct.
    pub cons_at_n: f64,
    /// Mean total tokens per sample.
    pub mean_total_tokens: f64,
    /// Mean sequential tokens per sample.
    pub mean_sequential_tokens: f64,
    /// Mean longest thread per sample.
    pub mean_longest_thread: f64,
    /// Mean children per sample.
    pub mean_children: f64,
    /// Mean spawn rounds per sample.
    pub mean_spawn_rounds: f64,
    /// Mean wall-clock latency per sample (seconds; samples run concurrently).
    pub mean_latency_s: f64,
    /// Generated tokens per second over the whole run.
    pub decode_tokens_per_s: f64,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
    /// Fraction of samples that failed (malformed output, budgets).
    pub failure_rate: f64,
    /// Cumulative accuracy at context windows: (window, accuracy counting only samples whose
    /// longest thread fits).
    pub accuracy_by_window: Vec<(usize, f64)>,
}

/// An evaluation's settings.
#[derive(Clone, Debug)]
pub struct EvalConfig {
    /// Runtime budgets, mode, sampling.
    pub runtime: RuntimeConfig,
    /// Samples per problem (1 for greedy).
    pub samples: usize,
    /// Slots of the engine.
    pub slots: usize,
    /// Base seed of sampling.
    pub seed: u64,
}

/// Runs every problem `samples` times and returns the records and the summary.
pub fn evaluate(
    model: &Model,
    tokenizer: &AprTokenizer,
    problems: &[Problem],
    config: &EvalConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> (Vec<EvalRecord>, EvalSummary) {
    let start = Instant::now();
    let mut engine = engine_for(
        model,
        config.slots.max(1),
        config.runtime.context.min(model.config.max_seq_len),
        tokenizer.pad_id(),
    );
    let task = match config.runtime.mode {
        Mode::Apr => CountdownTask::apr(),
        Mode::Serial => CountdownTask::sosp(),
    };
    let samples = config.samples.max(1);
    let jobs: Vec<Job<Problem>> = (0..problems.len() * samples)
        .map(|i| Job {
            id: i,
            problem: problems[i / samples].clone(),
            seed: config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64,
        })
        .collect();
    let total = jobs.len();
    let results = run(
        &task,
        engine.as_mut(),
        tokenizer,
        jobs,
        &config.runtime,
        &mut |done| progress(done, total),
    );
    let seconds = start.elapsed().as_secs_f64();
    let records: Vec<EvalRecord> = results
        .into_iter()
        .map(|result| {
            let p = &problems[result.id / samples];
            EvalRecord {
                problem: result.id / samples,
                sample: result.id % samples,
                nums: p.nums.clone(),
                target: p.target,
                correct: result.correct(),
                result,
            }
        })
        .collect();
    let summary = summarize(&records, problems.len(), samples, seconds);
    (records, summary)
}

/// Aggregates records (see [`EvalSummary`]).
pub fn summarize(
    records: &[EvalRecord],
    problems: usize,
    samples: usize,
    seconds: f64,
) -> EvalSummary {
    let n = records.len().max(1) as f64;
    let mean = |f: &dyn Fn(&EvalRecord) -> f64| records.iter().map(f).sum::<f64>() / n;
    let mut by_problem: HashMap<usize, Vec<&EvalRecord>> = HashMap::new();
    for r in records {
        by_problem.entry(r.problem).or_default().push(r);
    }
    let mut pass = 0usize;
    let mut cons = 0usize;
    for recs in by_problem.values() {
        if recs.iter().any(|r| r.correct) {
            pass += 1;
        }
        // Majority vote over the final paths of samples that found one; ties go to the answer
        // seen first.
        let mut votes: Vec<(&str, usize, bool)> = Vec::new();
        for r in recs {
            if let Some(answer) = r.result.answer.as_deref() {
                match votes.iter_mut().find(|(a, _, _)| *a == answer) {
                    Some(v) => v.1 += 1,
                    None => votes.push((answer, 1, r.correct)),
                }
            }
        }
        let best = votes
            .iter()
            .fold(None::<&(&str, usize, bool)>, |best, v| match best {
                Some(b) if b.1 >= v.1 => Some(b),
                _ => Some(v),
            });
        if best.is_some_and(|b| b.2) {
            cons += 1;
        }
    }
    let generated: usize = records
        .iter()
        .map(|r| r.result.metrics.generated_tokens)
        .sum();
    let windows = [512, 1024, 1536, 2048, 2560, 3072, 3584, 4096];
    EvalSummary {
        problems,
        samples,
        accuracy: mean(&|r| r.correct as u8 as f64),
        pass_at_n: pass as f64 / problems.max(1) as f64,
        cons_at_n: cons as f64 / problems.max(1) as f64,
        mean_total_tokens: mean(&|r| r.result.metrics.total_tokens as f64),
        mean_sequential_tokens: mean(&|r| r.result.metrics.sequential_tokens as f64),
        mean_longest_thread: mean(&|r| r.result.metrics.longest_thread as f64),
        mean_children: mean(&|r| r.result.metrics.children as f64),
        mean_spawn_rounds: mean(&|r| r.result.metrics.spawn_rounds as f64),
        mean_latency_s: mean(&|r| r.result.metrics.latency_s),
        decode_tokens_per_s: generated as f64 / seconds.max(1e-9),
        seconds,
        failure_rate: mean(&|r| r.result.failure.is_some() as u8 as f64),
        accuracy_by_window: windows
            .iter()
            .map(|&w| {
                (
                    w,
                    mean(&|r| (r.correct && r.result.metrics.longest_thread <= w) as u8 as f64),
                )
            })
            .collect(),
    }
}
