//! `apr data …`: problems, traces, validation, statistics and SFT views.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use apr_core::Mode;
use apr_countdown::io::{
    check_not_input, for_each_chunk, read_items, try_for_each_chunk, JsonlWriter, CHUNK,
};
use apr_countdown::problem::{streams, Problem, ProblemSpec};
use apr_countdown::record::{
    write_traces, AprSolverConfig, CharCounter, SolverConfig, SospSolverConfig, TokenCounter,
    TraceRecord,
};
use apr_countdown::search::SuccessorOrder;
use apr_countdown::sft::{sequences, SftOptions};
use apr_countdown::stats::{generate_facts, RecordFacts, TraceStats};
use apr_countdown::validate::Validator;
use apr_model::tokenizer::AprTokenizer;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Subcommand};
use rayon::prelude::*;
use serde_json::json;

use crate::progress::{bar, counter};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Draw solvable Countdown problems (JSONL; `.zst` compresses).
    Problems(ProblemsArgs),
    /// Run a symbolic solver on problems and write its trace records.
    Traces(TracesArgs),
    /// Replay a trace file through our grammar; exit 1 on any inconsistency.
    Validate {
        /// Trace file: ours (JSONL) or the reference's JSON array.
        file: PathBuf,
    },
    /// Success rate, spawn rounds, children, thread lengths of a trace file, or of traces
    /// generated in memory with `--generate N` (timed).
    Stats(StatsArgs),
    /// Write supervised fine-tuning sequences (`{"text", "prompt_len"}` per line).
    Sft(SftArgs),
}

#[derive(Args)]
pub struct ProblemsArgs {
    /// Starting numbers per problem (3–6).
    #[arg(long, value_parser = crate::args::count, default_value_t = 4)]
    numbers: usize,
    /// Largest target; inputs are drawn from 1..max-target.
    #[arg(long, default_value_t = 100)]
    max_target: i64,
    /// How many problems.
    #[arg(long, value_parser = crate::args::problems)]
    count: usize,
    /// Base seed; problem i is drawn from its own stream of this seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Draw a held-out split: a separate stream, redrawing any problem whose (sorted numbers,
    /// target) occurs in this file.
    #[arg(long)]
    exclude: Option<PathBuf>,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
}

/// The values of `--order`: the printed order of the kept successors of an expansion.
const ORDERS: [(SuccessorOrder, &str, &str); 2] = [
    (
        SuccessorOrder::Shuffled,
        "shuffled",
        "Shuffled, as the reference prints them (the released data)",
    ),
    (
        SuccessorOrder::Expansion,
        "expansion",
        "In the order they are generated (pairs in order, then + * - /): easier for small models",
    ),
];

/// `--order`, one of [`ORDERS`].
fn order() -> impl TypedValueParser<Value = SuccessorOrder> {
    PossibleValuesParser::new(ORDERS.map(|(_, name, help)| PossibleValue::new(name).help(help)))
        .map(|s| {
            ORDERS
                .iter()
                .find(|o| o.1 == s)
                .map_or(SuccessorOrder::default(), |o| o.0)
        })
}

/// The solver of `mode` (reference defaults) printing successors in `order`.
fn solver_config(mode: Mode, order: SuccessorOrder) -> SolverConfig {
    match mode {
        Mode::Apr => SolverConfig::Apr(AprSolverConfig {
            order,
            ..AprSolverConfig::default()
        }),
        Mode::Serial => SolverConfig::Sosp(SospSolverConfig {
            order,
            ..SospSolverConfig::default()
        }),
    }
}

#[derive(Args)]
pub struct TracesArgs {
    /// Which solver: APR (beam 1–10, sub-beam beam–15, spawn p 0.9) or SoS+ (beam 1–5,
    /// sub-search p 0.5).
    #[arg(long, value_parser = crate::args::mode("sosp"))]
    solver: Mode,
    /// Problem file (JSONL or the reference's JSON array).
    #[arg(long)]
    problems: PathBuf,
    /// Output file (`.jsonl`, or `.jsonl.zst` to compress).
    #[arg(long)]
    out: PathBuf,
    /// Base seed of the solver's random streams (one per problem).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Printed order of each expansion's kept successors.
    #[arg(long, value_parser = order(), default_value = "shuffled")]
    order: SuccessorOrder,
}

#[derive(Args)]
pub struct StatsArgs {
    /// Trace file to summarise.
    file: Option<PathBuf>,
    /// Instead of a file: draw this many problems and solve them in memory, timed.
    #[arg(long, value_parser = crate::args::problems, conflicts_with = "file")]
    generate: Option<usize>,
    /// With --generate: the solver.
    #[arg(long, value_parser = crate::args::mode("sosp"), default_value = "apr")]
    solver: Mode,
    /// With --generate: starting numbers per problem.
    #[arg(long, value_parser = crate::args::count, default_value_t = 4)]
    numbers: usize,
    /// With --generate: the seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// With --generate: printed order of each expansion's kept successors.
    #[arg(long, value_parser = order(), default_value = "shuffled")]
    order: SuccessorOrder,
    /// Count lengths in tokens of this HF `tokenizer.json` (each call as `BOS + text + EOS`)
    /// instead of characters; `domain` and `numbers` are our own tokenizers.
    #[arg(long)]
    tokenizer: Option<String>,
}

#[derive(Args)]
pub struct SftArgs {
    /// Which view: every APR call its own sequence, or one sequence per SoS+ trace.
    #[arg(long, value_parser = crate::args::mode("sosp"))]
    view: Mode,
    /// Trace file.
    #[arg(long)]
    traces: PathBuf,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Prefix APR parent calls with `Sub Call Budget: N `.
    #[arg(long)]
    sub_call_budget: bool,
    /// Prefix SoS+ traces with `Token Budget: B `.
    #[arg(long)]
    token_budget: bool,
}

pub fn run(cmd: DataCommand) -> Result<ExitCode> {
    match cmd {
        DataCommand::Problems(args) => problems(args),
        DataCommand::Traces(args) => traces(args),
        DataCommand::Validate { file } => validate_file(file),
        DataCommand::Stats(args) => stats(args),
        DataCommand::Sft(args) => sft(args),
    }
}

/// Reads a problem file and checks every problem's shape.
pub fn load_problems(path: &std::path::Path) -> Result<Vec<Problem>> {
    let problems: Vec<Problem> = read_items(path)?;
    for (i, p) in problems.iter().enumerate() {
        p.validate()
            .with_context(|| format!("{}: problem {}", path.display(), i + 1))?;
    }
    Ok(problems)
}

fn problems(args: ProblemsArgs) -> Result<ExitCode> {
    let spec = ProblemSpec {
        numbers: args.numbers,
        max_target: args.max_target,
    };
    spec.validate().map_err(anyhow::Error::msg)?;
    let (stream, exclude) = match &args.exclude {
        Some(path) => {
            let keys: HashSet<_> = load_problems(path)?.iter().map(Problem::key).collect();
            (streams::VAL, keys)
        }
        None => (streams::TRAIN, HashSet::new()),
    };
    if let Some(exclude) = &args.exclude {
        check_not_input(&args.out, &[exclude])?;
    }
    // Generated and written a chunk at a time: memory stays flat in --count.
    let mut gen = 0.0;
    let mut writer = JsonlWriter::create(&args.out)?;
    for chunk_start in (0..args.count).step_by(CHUNK) {
        let t = Instant::now();
        let end = (chunk_start + CHUNK).min(args.count);
        let problems = spec.generate_range(chunk_start..end, args.seed, stream, &exclude);
        gen += t.elapsed().as_secs_f64();
        for p in &problems {
            writer.write(p)?;
        }
    }
    let bytes = writer.bytes();
    writer.finish()?;
    println!(
        "{}",
        json!({
            "problems": args.count,
            "out": args.out,
            "seconds": gen,
            "problems_per_second": args.count as f64 / gen.max(1e-9),
            "bytes": bytes,
        })
    );
    Ok(ExitCode::SUCCESS)
}

fn traces(args: TracesArgs) -> Result<ExitCode> {
    check_not_input(&args.out, &[&args.problems])?;
    let problems = load_problems(&args.problems)?;
    let progress = bar(problems.len() as u64, "traces");
    let report = write_traces(
        &problems,
        &solver_config(args.solver, args.order),
        args.seed,
        &CharCounter,
        &args.out,
        &|done| progress.set_position(done as u64),
    )?;
    progress.finish_and_clear();
    println!(
        "{}",
        json!({
            "records": report.records,
            "solved": report.solved,
            "success_rate": report.solved as f64 / report.records.max(1) as f64,
            "out": args.out,
            "json_bytes": report.bytes,
            "solve_seconds": report.solve_seconds,
            "total_seconds": report.total_seconds,
            "traces_per_second": report.records as f64 / report.solve_seconds.max(1e-9),
            "write_mb_per_second": report.bytes as f64 / 1e6 / report.total_seconds.max(1e-9),
        })
    );
    Ok(ExitCode::SUCCESS)
}

fn validate_file(file: PathBuf) -> Result<ExitCode> {
    let mut validator = Validator::default();
    let progress = counter("validating");
    for_each_chunk(&file, CHUNK, |records: Vec<TraceRecord>| {
        validator.add(&records);
        progress.inc(records.len() as u64);
    })?;
    progress.finish_and_clear();
    let summary = validator.finish();
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(if summary.inconsistent == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Lengths in tokens of a tokenizer, as training sequences count them. A text the tokenizer
/// cannot encode counts 0 and is reported after the pass.
struct TokenizerCounter {
    tokenizer: AprTokenizer,
    error: Mutex<Option<String>>,
}

impl TokenizerCounter {
    fn len(&self, text: &str) -> usize {
        self.tokenizer.encode(text).map_or_else(
            |e| {
                self.error.lock().unwrap().get_or_insert(e.to_string());
                0
            },
            |ids| ids.len(),
        )
    }
}

impl TokenCounter for TokenizerCounter {
    fn sequence(&self, text: &str) -> usize {
        self.len(text) + 2
    }
    fn piece(&self, text: &str) -> usize {
        self.len(text)
    }
}

fn stats(args: StatsArgs) -> Result<ExitCode> {
    let tokenizer = match args.tokenizer.as_deref() {
        None => None,
        Some(name) => Some(AprTokenizer::named_or_file(name.as_ref())?),
    };
    let unit = match &args.tokenizer {
        None => "characters".to_string(),
        Some(name) => format!("tokens of {name} (BOS + call + EOS)"),
    };
    let token_counter = tokenizer.map(|tokenizer| TokenizerCounter {
        tokenizer,
        error: Mutex::new(None),
    });
    let counter: &dyn TokenCounter = match &token_counter {
        Some(c) => c,
        None => &CharCounter,
    };
    let (stats, timing) = match (&args.file, args.generate) {
        (Some(file), _) => {
            let mut facts = Vec::new();
            for_each_chunk(file, CHUNK, |records: Vec<TraceRecord>| {
                facts.par_extend(records.par_iter().map(|r| RecordFacts::of(r, counter)));
            })?;
            (TraceStats::of_facts(&facts), None)
        }
        (None, Some(count)) => {
            let spec = ProblemSpec {
                numbers: args.numbers,
                ..ProblemSpec::default()
            };
            spec.validate().map_err(anyhow::Error::msg)?;
            let progress = bar(count as u64, "solving");
            let (facts, timing) = generate_facts(
                &spec,
                &solver_config(args.solver, args.order),
                count,
                args.seed,
                counter,
                &|done| progress.set_position(done as u64),
            );
            progress.finish_and_clear();
            let timing = serde_json::to_value(timing)?;
            (TraceStats::of_facts(&facts), Some(timing))
        }
        (None, None) => bail!("give a trace file or --generate N"),
    };
    if let Some(error) = token_counter.and_then(|c| c.error.into_inner().unwrap()) {
        bail!("the tokenizer cannot encode the traces: {error}");
    }
    let mut out = serde_json::to_value(stats)?;
    out["unit"] = json!(unit);
    if let Some(timing) = timing {
        out["timing"] = timing;
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

fn sft(args: SftArgs) -> Result<ExitCode> {
    let view = args.view;
    let options = SftOptions {
        sub_call_budget: args.sub_call_budget,
        token_budget: args.token_budget,
    };
    check_not_input(&args.out, &[&args.traces])?;
    let mut writer = JsonlWriter::create(&args.out)?;
    let mut count = 0;
    let mut written = Ok(());
    // A write error (a full disk) stops the reading too; the unfinished output is removed, so no
    // truncated file appears under the asked-for name (the input is only read).
    let records = try_for_each_chunk(&args.traces, CHUNK, |records: Vec<TraceRecord>| {
        for record in &records {
            for seq in sequences(record, view, options, &CharCounter) {
                written = writer.write(&seq);
                if written.is_err() {
                    return ControlFlow::Break(());
                }
                count += 1;
            }
        }
        ControlFlow::Continue(())
    })?;
    written?;
    writer.finish()?;
    println!(
        "{}",
        json!({"records": records, "sequences": count, "out": args.out})
    );
    Ok(ExitCode::SUCCESS)
}
