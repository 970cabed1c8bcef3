//! Evaluation: runs problems through the APR runtime on the engine and aggregates what the paper
//! reports (accuracy, pass@n, cons@n, token counts, latency).

use std::collections::HashMap;
use std::time::Instant;

use apr_core::runtime::{ProblemResult, RuntimeConfig};
use apr_core::BatchedDecoder;
use apr_countdown::Problem;
use apr_model::engine::engine_for;
use apr_model::{AprTokenizer, Model};
use serde::{Deserialize, Serialize};

use crate::rollout::rollout;

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
    /// pass@k and cons@k over the first k samples of every problem, k = 1, 2, 4, … and n: the
    /// self-consistency curve of one sampled run (paper Fig. 4a).
    #[serde(default)]
    pub by_samples: Vec<AtSamples>,
}

impl EvalSummary {
    /// The standard error of a rate `p` measured on this run's problems (binomial over
    /// problems: samples of one problem are not independent, so they do not shrink it).
    pub fn standard_error(&self, p: f64) -> f64 {
        (p * (1.0 - p) / self.problems.max(1) as f64).sqrt()
    }
}

/// Self-consistency at k samples.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AtSamples {
    /// Samples per problem.
    pub k: usize,
    /// Problems with a correct answer among the first k samples.
    pub pass: f64,
    /// Problems whose majority answer over the first k samples is correct.
    pub cons: f64,
    /// Mean total tokens a problem costs with k samples.
    pub total_tokens: f64,
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
    let mut engine = engine_for(
        model,
        config.slots.max(1),
        config.runtime.context.min(model.config.max_seq_len),
        tokenizer.pad_id(),
    );
    evaluate_on(engine.as_mut(), tokenizer, problems, config, progress)
}

/// [`evaluate`] on any decoder: an in-process engine, or a remote server
/// (`apr_serve::client::RemoteDecoder`). The decoder's slots replace `config.slots`.
pub fn evaluate_on(
    decoder: &mut dyn BatchedDecoder,
    tokenizer: &AprTokenizer,
    problems: &[Problem],
    config: &EvalConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> (Vec<EvalRecord>, EvalSummary) {
    let start = Instant::now();
    let samples = config.samples.max(1);
    let total = problems.len() * samples;
    let results = rollout(
        decoder,
        tokenizer,
        problems,
        samples,
        config.seed,
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
    let summary = summarize(
        &records,
        problems.len(),
        samples,
        config.runtime.context,
        seconds,
    );
    (records, summary)
}

/// Whether some sample is correct, and whether the majority answer over the samples that found
/// one is (ties go to the answer seen first).
fn pass_and_consensus(samples: &[&EvalRecord]) -> (bool, bool) {
    let pass = samples.iter().any(|r| r.correct);
    let mut votes: Vec<(&str, usize, bool)> = Vec::new();
    for r in samples {
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
    (pass, best.is_some_and(|b| b.2))
}

/// The context windows of a run at `context` tokens a thread: every 128 up to 1,024, every 512
/// after, and the context itself.
pub fn context_windows(context: usize) -> Vec<usize> {
    let mut windows: Vec<usize> = (128..=1024)
        .step_by(128)
        .chain((1536..=4096).step_by(512))
        .take_while(|&w| w < context)
        .collect();
    windows.push(context);
    windows
}

/// Aggregates records (see [`EvalSummary`]) of a run at a per-thread `context`.
pub fn summarize(
    records: &[EvalRecord],
    problems: usize,
    samples: usize,
    context: usize,
    seconds: f64,
) -> EvalSummary {
    let n = records.len().max(1) as f64;
    let mean = |f: &dyn Fn(&EvalRecord) -> f64| records.iter().map(f).sum::<f64>() / n;
    let mut by_problem: HashMap<usize, Vec<&EvalRecord>> = HashMap::new();
    for r in records {
        by_problem.entry(r.problem).or_default().push(r);
    }
    for recs in by_problem.values_mut() {
        recs.sort_by_key(|r| r.sample);
    }
    let at = |k: usize| {
        let (mut pass, mut cons, mut tokens) = (0usize, 0usize, 0usize);
        for recs in by_problem.values() {
            let first = &recs[..k.min(recs.len())];
            let (p, c) = pass_and_consensus(first);
            pass += p as usize;
            cons += c as usize;
            tokens += first
                .iter()
                .map(|r| r.result.metrics.total_tokens)
                .sum::<usize>();
        }
        let n_problems = problems.max(1) as f64;
        AtSamples {
            k,
            pass: pass as f64 / n_problems,
            cons: cons as f64 / n_problems,
            total_tokens: tokens as f64 / n_problems,
        }
    };
    let mut ks: Vec<usize> = std::iter::successors(Some(1usize), |k| k.checked_mul(2))
        .take_while(|&k| k < samples)
        .collect();
    ks.push(samples.max(1));
    let by_samples: Vec<AtSamples> = ks.into_iter().map(at).collect();
    let all = by_samples.last().cloned().unwrap_or_default();
    let generated: usize = records
        .iter()
        .map(|r| r.result.metrics.generated_tokens)
        .sum();
    // Every 128 tokens up to 1,024 (CPU-scale contexts), then every 512 up to the paper's
    // 4,096; none past the run's own context, where nothing changes.
    let windows = context_windows(context);
    EvalSummary {
        problems,
        samples,
        accuracy: mean(&|r| r.correct as u8 as f64),
        pass_at_n: all.pass,
        cons_at_n: all.cons,
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
            .into_iter()
            .map(|w| {
                (
                    w,
                    mean(&|r| (r.correct && r.result.metrics.longest_thread <= w) as u8 as f64),
                )
            })
            .collect(),
        by_samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apr_core::runtime::Metrics;

    fn record(problem: usize, sample: usize, answer: Option<&str>, correct: bool) -> EvalRecord {
        EvalRecord {
            problem,
            sample,
            nums: vec![1, 2, 3],
            target: 6,
            correct,
            result: ProblemResult {
                id: problem * 4 + sample,
                prompt: String::new(),
                segments: vec![],
                answer: answer.map(str::to_owned),
                reward: correct as u8 as f32,
                failure: None,
                metrics: Metrics {
                    total_tokens: 100,
                    longest_thread: 300 + 200 * sample,
                    ..Metrics::default()
                },
            },
        }
    }

    #[test]
    fn pass_and_cons_at_k_use_the_first_k_samples() {
        // Problem 0: wrong, right, wrong (same wrong answer twice), right.
        // Problem 1: right once, then no answers.
        let records = vec![
            record(0, 3, Some("b"), true),
            record(0, 0, Some("a"), false),
            record(0, 1, Some("b"), true),
            record(0, 2, Some("a"), false),
            record(1, 0, Some("c"), true),
            record(1, 1, None, false),
            record(1, 2, None, false),
            record(1, 3, None, false),
        ];
        let s = summarize(&records, 2, 4, 1024, 1.0);
        assert_eq!(s.accuracy_by_window.last().map(|w| w.0), Some(1024));
        let at: Vec<(usize, f64, f64, f64)> = s
            .by_samples
            .iter()
            .map(|a| (a.k, a.pass, a.cons, a.total_tokens))
            .collect();
        // k = 1: only problem 1 is right. k = 2: problem 0 ties a/b, the first seen (a) wins.
        // k = 4: b has two votes against a's two: still a tie, a first; problem 1 keeps c.
        assert_eq!(
            at,
            [
                (1, 0.5, 0.5, 100.0),
                (2, 1.0, 0.5, 200.0),
                (4, 1.0, 0.5, 400.0)
            ]
        );
        assert_eq!((s.pass_at_n, s.cons_at_n), (1.0, 0.5));
        assert_eq!(s.accuracy, 3.0 / 8.0);
        // Samples 0..=1 of each problem fit 512 tokens; of those, two are right.
        let at_512 = s.accuracy_by_window.iter().find(|(w, _)| *w == 512);
        assert_eq!(at_512, Some(&(512, 2.0 / 8.0)));
    }
}
