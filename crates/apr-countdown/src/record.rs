//! Trace records with the reference's field names (`generate_apr.py` / `generate_sosp.py`), their
//! length accounting, and the parallel, per-problem-seeded trace generation.

use apr_core::Mode;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::problem::{streams, Problem};
use crate::pyrand::{derive_seed, par_map_seeded, PyRandom};
use crate::search::{apr, sosp, SuccessorOrder, TraceDict};

/// Counts the length of sequences. Until a tokenizer is plugged in, lengths are characters.
pub trait TokenCounter: Sync {
    /// Length of a whole training sequence (a tokenizer adds BOS and EOS here).
    fn sequence(&self, text: &str) -> usize;
    /// Length of a bare piece of text (no special tokens), used for shared prefixes.
    fn piece(&self, text: &str) -> usize;
}

/// Lengths in characters.
#[derive(Clone, Copy, Debug, Default)]
pub struct CharCounter;

impl TokenCounter for CharCounter {
    fn sequence(&self, text: &str) -> usize {
        chars(text)
    }
    fn piece(&self, text: &str) -> usize {
        chars(text)
    }
}

/// Characters; traces are ASCII, where that is the byte length.
fn chars(text: &str) -> usize {
    if text.is_ascii() {
        text.len()
    } else {
        text.chars().count()
    }
}

/// Parameters of the APR solver (reference defaults: `create_search.sh`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AprSolverConfig {
    /// Beam drawn uniformly from `1..=max_beam` per problem.
    pub max_beam: u32,
    /// Children's beam drawn uniformly from `beam..=max_sub_beam`.
    pub max_sub_beam: u32,
    /// Probability of spawning at an eligible expansion (0.9 in the code; spec §3.3).
    pub promising: f64,
    /// Printed order of kept successors (the reference's: shuffled).
    #[serde(default)]
    pub order: SuccessorOrder,
}

impl Default for AprSolverConfig {
    fn default() -> Self {
        AprSolverConfig {
            max_beam: 10,
            max_sub_beam: 15,
            promising: 0.9,
            order: SuccessorOrder::Shuffled,
        }
    }
}

/// Parameters of the SoS+ solver (reference defaults: `generate_sosp.py`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SospSolverConfig {
    /// Beam drawn uniformly from `1..=max_beam` per problem.
    pub max_beam: u32,
    /// Probability of a serial sub-search after an expansion.
    pub promising: f64,
    /// Printed order of kept successors (the reference's: shuffled).
    #[serde(default)]
    pub order: SuccessorOrder,
}

impl Default for SospSolverConfig {
    fn default() -> Self {
        SospSolverConfig {
            max_beam: 5,
            promising: 0.5,
            order: SuccessorOrder::Shuffled,
        }
    }
}

/// Which solver to run, with its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum SolverConfig {
    /// APR.
    Apr(AprSolverConfig),
    /// SoS+.
    Sosp(SospSolverConfig),
}

impl SolverConfig {
    /// The kind of solver.
    pub fn kind(&self) -> Mode {
        match self {
            SolverConfig::Apr(_) => Mode::Apr,
            SolverConfig::Sosp(_) => Mode::Serial,
        }
    }

    /// The printed order of kept successors.
    pub fn order(&self) -> SuccessorOrder {
        match self {
            SolverConfig::Apr(cfg) => cfg.order,
            SolverConfig::Sosp(cfg) => cfg.order,
        }
    }
}

/// One solved (or failed) problem: the problem's fields, the trace and its statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// Starting numbers.
    pub nums: Vec<i64>,
    /// Target.
    pub target: i64,
    /// Exhaustive-search solution of the problem.
    #[serde(default)]
    pub solution: Vec<String>,
    /// The reference's no-backtrack path.
    #[serde(default)]
    pub optimal_path: String,
    /// Number of starting numbers.
    #[serde(default)]
    pub start_size: usize,
    /// SoS+: the whole trace. APR: the parent's last call.
    pub search_path: String,
    /// `1 − (#Exploring Operation + 1) / max_nodes` when solved, else 0.
    #[serde(default)]
    pub rating: f64,
    /// `apr_{beam}` or `sosp_{beam}`.
    #[serde(default)]
    pub search_type: String,
    /// Heuristic used (always the multiply heuristic; spec §3.1).
    #[serde(default)]
    pub heuristic: String,
    /// Spawn / sub-search probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promising_threshold: Option<f64>,
    /// The search's beam.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beam_size: Option<u32>,
    /// The children's beam (APR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_call_beam_size: Option<u32>,
    /// Every call (APR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_dict: Option<TraceDict>,
    /// Total length, the repeated parent prefix counted once.
    #[serde(default)]
    pub token_count: f64,
    /// Longest single call.
    #[serde(default)]
    pub longest_seq_token_count: f64,
    /// Total over the number of calls.
    #[serde(default)]
    pub avg_seq_token_count: f64,
    /// Mean length of child calls.
    #[serde(default)]
    pub avg_sub_seq_token_count: f64,
    /// Children per spawn round.
    #[serde(default)]
    pub sub_call_count: f64,
    /// Printed order of kept successors; written only when it is not the reference's.
    #[serde(default, skip_serializing_if = "SuccessorOrder::is_shuffled")]
    pub successor_order: SuccessorOrder,
}

/// The rating denominators of the reference (`max_rating` by `start_size`).
pub fn max_nodes(start_size: usize) -> f64 {
    match start_size {
        2 => 4.0,
        3 => 48.0,
        4 => 1152.0,
        5 => 46080.0,
        _ => 2_764_800.0,
    }
}

fn simple_rating(path: &str) -> f64 {
    (path.matches("Exploring Operation").count() + 1) as f64
}

impl TraceRecord {
    /// The problem this record solves.
    pub fn problem(&self) -> Problem {
        Problem {
            nums: self.nums.clone(),
            target: self.target,
            solution: self.solution.clone(),
            optimal_path: self.optimal_path.clone(),
            start_size: if self.start_size == 0 {
                self.nums.len()
            } else {
                self.start_size
            },
        }
    }

    /// Which solver wrote it: APR records carry a `trace_dict`.
    pub fn kind(&self) -> Mode {
        if self.trace_dict.is_some() {
            Mode::Apr
        } else {
            Mode::Serial
        }
    }

    /// Whether the solver reached the goal.
    pub fn solved(&self) -> bool {
        self.search_path.contains("Goal Reached")
    }

    /// Spawn rounds of the parent.
    pub fn spawn_rounds(&self) -> usize {
        self.trace_dict.as_ref().map_or(0, |d| d.sub_calls.len())
    }

    /// Child threads in all.
    pub fn children(&self) -> usize {
        self.trace_dict.as_ref().map_or(0, TraceDict::child_count)
    }

    /// Every call (thread segment) of the record: APR's parent calls and children, or SoS+'s
    /// single trace.
    pub fn calls(&self) -> Vec<&str> {
        match &self.trace_dict {
            Some(d) => d.all_calls(),
            None => vec![self.search_path.as_str()],
        }
    }

    /// Recomputes the length statistics with `counter` (the reference's
    /// `calculate_token_counts`) and returns them.
    pub fn count_tokens(&mut self, counter: &dyn TokenCounter) -> TokenStats {
        let stats = TokenStats::of(&self.calls(), counter);
        self.token_count = stats.total as f64;
        self.longest_seq_token_count = stats.longest as f64;
        self.avg_seq_token_count = stats.avg_seq;
        self.avg_sub_seq_token_count = stats.avg_sub_seq;
        self.sub_call_count = stats.sub_call_count;
        stats
    }
}

/// Length statistics of a record's calls.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenStats {
    /// Sum over calls, minus the prefixes repeated between consecutive parent calls.
    pub total: usize,
    /// Longest call.
    pub longest: usize,
    /// `total / calls`.
    pub avg_seq: f64,
    /// Mean child call length.
    pub avg_sub_seq: f64,
    /// Children per spawn round.
    pub sub_call_count: f64,
    /// Calls.
    pub calls: usize,
    /// Sum of the calls' lengths, shared prefixes counted in every call (as training sees them).
    pub call_sum: usize,
}

impl TokenStats {
    /// The reference's accounting: parent calls are those starting with `Moving to Node #0\n`;
    /// sorted by length, each consecutive pair's common prefix is counted once.
    pub fn of(calls: &[&str], counter: &dyn TokenCounter) -> Self {
        if calls.len() <= 1 {
            let n = calls.first().map_or(0, |c| counter.sequence(c));
            return TokenStats {
                total: n,
                longest: n,
                avg_seq: n as f64,
                avg_sub_seq: 0.0,
                sub_call_count: 0.0,
                calls: calls.len(),
                call_sum: n,
            };
        }
        let is_root = |c: &&str| c.starts_with("Moving to Node #0\n");
        let mut roots: Vec<&str> = calls.iter().copied().filter(is_root).collect();
        let sub_count = calls.len() - roots.len();
        let mut total = 0;
        let mut longest = 0;
        let mut sub_total = 0;
        for call in calls {
            let n = counter.sequence(call);
            total += n;
            longest = longest.max(n);
            if !is_root(call) {
                sub_total += n;
            }
        }
        roots.sort_by_key(|c| c.len());
        let redundant: usize = roots
            .windows(2)
            .map(|pair| {
                let common = common_prefix(pair[0], pair[1]);
                if common.is_empty() {
                    0
                } else {
                    counter.piece(common)
                }
            })
            .sum();
        let call_sum = total;
        let total = total - redundant.min(total);
        TokenStats {
            calls: calls.len(),
            call_sum,
            total,
            longest,
            avg_seq: total as f64 / calls.len() as f64,
            avg_sub_seq: if sub_count == 0 {
                0.0
            } else {
                sub_total as f64 / sub_count as f64
            },
            sub_call_count: sub_count as f64 / (roots.len().max(2) - 1) as f64,
        }
    }
}

fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    // Back off to a char boundary (traces are ASCII, but be safe).
    let mut n = n;
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    &a[..n]
}

/// Runs one solver on one problem with the stream of `rng`, drawing the beam sizes first as the
/// reference scripts do.
pub fn solve_problem(
    problem: &Problem,
    solver: &SolverConfig,
    rng: &mut PyRandom,
    counter: &dyn TokenCounter,
) -> TraceRecord {
    solve_counted(problem, solver, rng, counter).0
}

/// [`solve_problem`], also returning the length statistics it counted into the record.
pub fn solve_counted(
    problem: &Problem,
    solver: &SolverConfig,
    rng: &mut PyRandom,
    counter: &dyn TokenCounter,
) -> (TraceRecord, TokenStats) {
    let start_size = if problem.start_size == 0 {
        problem.nums.len()
    } else {
        problem.start_size
    };
    let mut record = TraceRecord {
        nums: problem.nums.clone(),
        target: problem.target,
        solution: problem.solution.clone(),
        optimal_path: problem.optimal_path.clone(),
        start_size,
        search_path: String::new(),
        rating: 0.0,
        search_type: String::new(),
        heuristic: "mult_heuristic".to_owned(),
        promising_threshold: None,
        beam_size: None,
        sub_call_beam_size: None,
        trace_dict: None,
        token_count: 0.0,
        longest_seq_token_count: 0.0,
        avg_seq_token_count: 0.0,
        avg_sub_seq_token_count: 0.0,
        sub_call_count: 0.0,
        successor_order: solver.order(),
    };
    match solver {
        SolverConfig::Apr(cfg) => {
            let beam = rng.randint(1, cfg.max_beam.max(1));
            let sub_beam = if cfg.max_sub_beam > beam {
                rng.randint(beam, cfg.max_sub_beam)
            } else {
                cfg.max_sub_beam
            };
            let trace = apr(
                problem.target,
                &problem.nums,
                beam as usize,
                sub_beam as usize,
                cfg.promising,
                cfg.order,
                rng,
            );
            record.search_path = trace.search_path().to_owned();
            // The APR script does not clamp its rating at zero.
            record.rating = if record.solved() {
                1.0 - simple_rating(&record.search_path) / max_nodes(start_size)
            } else {
                0.0
            };
            record.search_type = format!("apr_{beam}");
            record.promising_threshold = Some(cfg.promising);
            record.beam_size = Some(beam);
            record.sub_call_beam_size = Some(sub_beam);
            record.trace_dict = Some(trace.trace);
        }
        SolverConfig::Sosp(cfg) => {
            // The reference draws a heuristic it then ignores; keep the draw for the stream.
            let _ = rng.choice_index(2);
            let beam = 1 + rng.choice_index(cfg.max_beam.max(1) as usize) as u32;
            let trace = sosp(
                problem.target,
                &problem.nums,
                beam as usize,
                cfg.promising,
                cfg.order,
                rng,
            );
            record.search_path = trace.search_path;
            record.rating = if record.solved() {
                (1.0 - simple_rating(&record.search_path) / max_nodes(start_size)).max(0.0)
            } else {
                0.0
            };
            record.search_type = format!("sosp_{beam}");
            record.beam_size = Some(beam);
        }
    }
    let stats = record.count_tokens(counter);
    (record, stats)
}

/// Solves every problem in parallel; problem `i` draws from its own stream
/// `derive_seed(seed, SOLVER, i)`, so the output does not depend on the thread count.
pub fn generate_traces(
    problems: &[Problem],
    solver: &SolverConfig,
    seed: u64,
    counter: &dyn TokenCounter,
) -> Vec<TraceRecord> {
    traces_from(problems, 0, solver, seed, counter)
}

/// The records of `problems`, numbered from `first` in their file, as [`trace_for`] computes
/// each (streams seeded side by side).
fn traces_from(
    problems: &[Problem],
    first: usize,
    solver: &SolverConfig,
    seed: u64,
    counter: &dyn TokenCounter,
) -> Vec<TraceRecord> {
    par_map_seeded(
        problems.len(),
        |i| derive_seed(seed, streams::SOLVER, first as u64 + i),
        |i, rng| solve_problem(&problems[i], solver, rng, counter),
    )
}

/// The record of problem number `index` of a file, as [`generate_traces`] computes it.
pub fn trace_for(
    problem: &Problem,
    index: usize,
    solver: &SolverConfig,
    seed: u64,
    counter: &dyn TokenCounter,
) -> TraceRecord {
    let mut rng = PyRandom::new(derive_seed(seed, streams::SOLVER, index as u64));
    solve_problem(problem, solver, &mut rng, counter)
}

/// What [`write_traces`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct WriteReport {
    /// Records written.
    pub records: usize,
    /// Records whose search reached the goal.
    pub solved: usize,
    /// Uncompressed JSON bytes.
    pub bytes: u64,
    /// Seconds spent solving.
    pub solve_seconds: f64,
    /// Seconds in all (solving, serialising, compressing, writing).
    pub total_seconds: f64,
}

/// Solves `problems` in chunks and streams the records to `path` as JSON Lines (zstd when it ends
/// in `.zst`), so memory stays bounded for any count. `progress` is called with the number of
/// records done after each chunk. Output is identical for any thread count.
pub fn write_traces(
    problems: &[Problem],
    solver: &SolverConfig,
    seed: u64,
    counter: &dyn TokenCounter,
    path: &std::path::Path,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<WriteReport, crate::io::DataError> {
    const CHUNK: usize = 8192;
    let start = std::time::Instant::now();
    let mut writer = crate::io::JsonlWriter::create(path)?;
    let mut report = WriteReport::default();
    let mut solve = std::time::Duration::ZERO;
    for (c, chunk) in problems.chunks(CHUNK).enumerate() {
        let t = std::time::Instant::now();
        let records = traces_from(chunk, c * CHUNK, solver, seed, counter);
        solve += t.elapsed();
        report.solved += records.iter().filter(|r| r.solved()).count();
        let lines: Vec<Vec<u8>> = records
            .par_iter()
            .map(|r| {
                let mut line = serde_json::to_vec(r).expect("records serialise");
                line.push(b'\n');
                line
            })
            .collect();
        for line in &lines {
            writer.write_raw(line)?;
        }
        report.records += chunk.len();
        progress(report.records);
    }
    report.bytes = writer.bytes();
    writer.finish()?;
    report.solve_seconds = solve.as_secs_f64();
    report.total_seconds = start.elapsed().as_secs_f64();
    Ok(report)
}
