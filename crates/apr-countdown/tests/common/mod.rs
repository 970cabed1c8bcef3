//! Helpers shared by the apr-countdown tests.

use std::collections::HashSet;

use apr_countdown::problem::{streams, ProblemSpec};
use apr_countdown::record::{
    generate_traces, AprSolverConfig, CharCounter, SolverConfig, TraceRecord,
};

/// The APR solver's records of `n` training problems drawn with `seed`.
pub fn apr_records(n: usize, seed: u64) -> Vec<TraceRecord> {
    let problems = ProblemSpec::default().generate(n, seed, streams::TRAIN, &HashSet::new());
    generate_traces(
        &problems,
        &SolverConfig::Apr(AprSolverConfig::default()),
        seed,
        &CharCounter,
    )
}
