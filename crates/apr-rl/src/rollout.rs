//! Problems through the runtime: the one place where evaluation and GRPO turn problems into
//! seeded jobs and run them.

use apr_core::runtime::{run, Job, ProblemResult, RuntimeConfig};
use apr_core::BatchedDecoder;
use apr_countdown::{CountdownTask, Problem};
use apr_model::AprTokenizer;

/// The sampling seed of job `index` of a batch whose seed is `base`: the index spread by the
/// golden-ratio constant, so that neighbouring jobs (the samples of one problem) get unrelated
/// trees.
pub fn job_seed(base: u64, index: usize) -> u64 {
    base ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Runs every problem `samples` times (job `i` is sample `i % samples` of problem
/// `i / samples`) in `runtime.mode` on `decoder`; the results come back in job order.
pub fn rollout(
    decoder: &mut dyn BatchedDecoder,
    tokenizer: &AprTokenizer,
    problems: &[Problem],
    samples: usize,
    seed: u64,
    runtime: &RuntimeConfig,
    progress: &mut dyn FnMut(usize),
) -> Vec<ProblemResult> {
    let samples = samples.max(1);
    let jobs: Vec<Job<Problem>> = (0..problems.len() * samples)
        .map(|i| Job {
            id: i,
            problem: problems[i / samples].clone(),
            seed: job_seed(seed, i),
        })
        .collect();
    let task = CountdownTask::new(runtime.mode);
    run(&task, decoder, tokenizer, jobs, runtime, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_between_jobs_and_between_batches() {
        let seeds: std::collections::HashSet<u64> = (0..4)
            .flat_map(|base| (0..1000).map(move |i| job_seed(base, i)))
            .collect();
        assert_eq!(seeds.len(), 4000);
        assert_eq!(job_seed(7, 0), 7);
    }
}
