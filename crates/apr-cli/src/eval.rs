//! `apr eval`: APR, serial and sampled evaluation of a checkpoint.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use apr_core::decoder::BatchedDecoder;
use apr_core::decoder::Sampling;
use apr_core::grammar::Conditioning;
use apr_core::runtime::{Mode, RuntimeConfig};
use apr_countdown::io::JsonlWriter;
use apr_rl::eval::{evaluate, evaluate_on, EvalConfig};
use apr_serve::client::{RemoteConfig, RemoteDecoder};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Args;

use crate::data::load_problems;
use crate::model::load_model;
use crate::progress::bar;
use crate::DeviceArgs;

/// `--mode`: APR or serial, or `sample`, serial with τ = 1 unless `--temperature` says otherwise
/// (`--n` samples a problem give pass@n and cons@n).
fn eval_mode() -> impl TypedValueParser<Value = (Mode, bool)> {
    PossibleValuesParser::new([
        PossibleValue::new("apr").help("Parent and child threads (greedy by default)"),
        PossibleValue::new("serial")
            .alias("sosp")
            .help("One thread per problem (SoS+)"),
        PossibleValue::new("sample")
            .help("`--n` samples per problem at `--temperature` (1.0), serial: pass@n and cons@n"),
    ])
    .try_map(|s| match s.as_str() {
        "sample" => Ok((Mode::Serial, true)),
        name => name.parse::<Mode>().map(|mode| (mode, false)),
    })
}

#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint directory, or the name of a shipped model (`apr-sft`, `apr-grpo`, `sosp`).
    #[arg(long)]
    model: PathBuf,
    /// Problems (JSONL or the reference's JSON array).
    #[arg(long)]
    problems: PathBuf,
    /// How to solve.
    #[arg(long, value_parser = eval_mode(), default_value = "apr")]
    mode: (Mode, bool),
    /// Samples per problem (sample mode; APR/serial too, for pass@n).
    #[arg(long, value_parser = crate::args::samples, default_value_t = 1)]
    n: usize,
    /// Sampling temperature (0 = greedy; sample mode defaults to 1.0).
    #[arg(long, value_parser = crate::args::temperature)]
    temperature: Option<f32>,
    /// Condition APR parents with `Sub Call Budget: N `.
    #[arg(long)]
    sub_call_budget: Option<u32>,
    /// Per-thread context window in tokens (default: the model's `max_seq_len`; larger is an
    /// error, as the model never saw those positions).
    #[arg(long, value_parser = crate::args::context)]
    context: Option<usize>,
    /// Tokens per problem in all.
    #[arg(long, value_parser = crate::args::tokens, default_value_t = 200_000)]
    max_total_tokens: usize,
    /// Wall-clock seconds per problem.
    #[arg(long, value_parser = crate::args::seconds)]
    timeout: Option<f64>,
    /// Engine slots (threads decoded together).
    #[arg(long, value_parser = crate::args::slots, default_value_t = 64)]
    slots: usize,
    /// Refuse settings whose KV caches could exceed this many GB (default: 90% of RAM).
    #[arg(long, value_parser = crate::args::gigabytes)]
    max_memory: Option<f64>,
    /// Evaluate only the first P problems.
    #[arg(long, value_parser = crate::args::problems)]
    limit: Option<usize>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (records.jsonl, summary.json).
    #[arg(long)]
    out: PathBuf,
    /// Run every thread call on this OpenAI-compatible completions server (`apr serve`, vLLM,
    /// SGLang) instead of in process; repeat it for several replicas (all calls of a problem go
    /// to one). `--model` still names the checkpoint whose tokenizer counts the tokens.
    #[arg(long = "engine", value_name = "URL")]
    engines: Vec<String>,
    /// With --engine: the served model's name (default: the first the server lists).
    #[arg(long)]
    served_model_name: Option<String>,
    /// With --engine: seconds one request may take.
    #[arg(long, value_parser = crate::args::seconds, default_value_t = 600.0)]
    request_timeout: f64,
    /// With --engine: retries of a failed request (with backoff) before its problem fails.
    #[arg(long, default_value_t = 3)]
    retries: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Where an evaluation's thread calls run.
enum Engine {
    /// An engine in this process.
    Local(Box<apr_model::Model>),
    /// OpenAI-compatible servers.
    Remote(Box<RemoteDecoder>),
}

/// The per-thread context: the model's `max_seq_len` unless asked for less.
fn context_for(asked: Option<usize>, max_seq_len: usize) -> Result<usize> {
    match asked {
        None => Ok(max_seq_len),
        Some(c) if c < 2 => bail!("--context must be at least 2"),
        Some(c) if c > max_seq_len => bail!(
            "--context {c} exceeds the model's max_seq_len {max_seq_len} (positions it never saw)"
        ),
        Some(c) => Ok(c),
    }
}

pub fn run(args: EvalArgs) -> Result<ExitCode> {
    if args.n == 0 || args.slots == 0 {
        bail!("--n and --slots must be positive");
    }
    let temperature = args
        .temperature
        .unwrap_or(if args.mode.1 { 1.0 } else { 0.0 });
    if !temperature.is_finite() || temperature < 0.0 {
        bail!("--temperature must be a non-negative number");
    }
    let mut problems = load_problems(&args.problems)?;
    if let Some(limit) = args.limit {
        problems.truncate(limit);
    }
    if problems.is_empty() {
        bail!("{}: no problems to evaluate", args.problems.display());
    }
    // In process: the checkpoint's model on an engine here. Remote: only its tokenizer here,
    // the model on the servers.
    let (engine, tok, max_seq_len) = if args.engines.is_empty() {
        let (model, tok, _) = load_model(&args.model, &args.device)?;
        let context = context_for(args.context, model.config.max_seq_len)?;
        crate::args::check_kv_memory(&model.config, args.slots, context, args.max_memory)?;
        let len = model.config.max_seq_len;
        (Engine::Local(Box::new(model)), tok, len)
    } else {
        let ck = apr_model::checkpoint::load(&crate::model::resolve_model(&args.model)?)?;
        let remote = RemoteConfig {
            urls: args.engines.clone(),
            model: args.served_model_name.clone(),
            slots: args.slots,
            in_flight: args.slots,
            timeout: Duration::from_secs_f64(args.request_timeout),
            retries: args.retries,
            ..RemoteConfig::default()
        };
        let decoder = RemoteDecoder::connect(&remote, Arc::new(ck.tokenizer.clone()))?;
        let len = ck.meta.model.max_seq_len.min(decoder.context_limit());
        (Engine::Remote(Box::new(decoder)), ck.tokenizer, len)
    };
    let context = context_for(args.context, max_seq_len)?;
    let runtime = RuntimeConfig {
        mode: args.mode.0,
        context,
        max_total_tokens: args.max_total_tokens,
        timeout: args.timeout.map(Duration::from_secs_f64),
        sampling: Sampling::temperature(temperature),
        conditioning: Conditioning {
            sub_call_budget: args.sub_call_budget,
            token_budget: None,
        },
        ..RuntimeConfig::default()
    };
    let config = EvalConfig {
        runtime,
        samples: args.n,
        slots: args.slots,
        seed: args.seed,
    };
    let progress = bar((problems.len() * args.n) as u64, "eval");
    let mut report = |done: usize, _: usize| progress.set_position(done as u64);
    let (records, summary) = match engine {
        Engine::Local(model) => evaluate(&model, &tok, &problems, &config, &mut report),
        Engine::Remote(mut decoder) => {
            let run = evaluate_on(decoder.as_mut(), &tok, &problems, &config, &mut report);
            let c = decoder.counters();
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            eprintln!(
                "{}: {} requests, {} retried, {} failed, {} tokens written",
                decoder.model(),
                load(&c.requests),
                load(&c.retries),
                load(&c.failures),
                load(&c.completion_tokens)
            );
            run
        }
    };
    progress.finish_and_clear();
    std::fs::create_dir_all(&args.out)?;
    let mut writer = JsonlWriter::create(&args.out.join("records.jsonl"))?;
    for r in &records {
        writer.write(r)?;
    }
    writer.finish()?;
    let text = serde_json::to_string_pretty(&summary)?;
    apr_model::checkpoint::write_atomic(&args.out.join("summary.json"), text.as_bytes())?;
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct SolveArgs {
    /// Checkpoint directory, or the name of a shipped model (`apr-sft`, `apr-grpo`, `sosp`).
    #[arg(long)]
    model: PathBuf,
    /// Starting numbers, comma-separated (e.g. 22,26,31,53).
    #[arg(long)]
    numbers: String,
    /// Target.
    #[arg(long)]
    target: i64,
    /// Serial (SoS+) instead of APR.
    #[arg(long)]
    serial: bool,
    /// Sampling temperature (0 = greedy).
    #[arg(long, value_parser = crate::args::temperature, default_value_t = 0.0)]
    temperature: f32,
    /// Per-thread context (default: the model's `max_seq_len`).
    #[arg(long, value_parser = crate::args::context)]
    context: Option<usize>,
    /// Print the whole record as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Parses `22,26,31,53`.
fn parse_numbers(text: &str) -> Result<Vec<i64>> {
    text.split(',')
        .map(|n| {
            n.trim()
                .parse::<i64>()
                .map_err(|_| anyhow::anyhow!("--numbers: {:?} is not an integer", n.trim()))
        })
        .collect()
}

pub fn solve(args: SolveArgs) -> Result<ExitCode> {
    let nums = parse_numbers(&args.numbers)?;
    let problem = apr_countdown::Problem {
        start_size: nums.len(),
        nums,
        target: args.target,
        solution: vec![],
        optimal_path: String::new(),
    };
    problem.validate()?;
    let (model, tok, _) = load_model(&args.model, &args.device)?;
    let runtime = RuntimeConfig {
        mode: if args.serial { Mode::Serial } else { Mode::Apr },
        context: context_for(args.context, model.config.max_seq_len)?,
        sampling: Sampling::temperature(args.temperature),
        ..RuntimeConfig::default()
    };
    let config = EvalConfig {
        runtime,
        samples: 1,
        slots: 16,
        seed: 0,
    };
    let (records, _) = evaluate(
        &model,
        &tok,
        std::slice::from_ref(&problem),
        &config,
        &mut |_, _| {},
    );
    let record = &records[0];
    if args.json {
        println!("{}", serde_json::to_string_pretty(record)?);
        return Ok(ExitCode::SUCCESS);
    }
    for seg in &record.result.segments {
        let who = match (seg.role, &seg.node) {
            (apr_core::runtime::Role::Parent, _) => format!("parent call {}", seg.round),
            (_, node) => format!(
                "  child {} (round {}, node #{})",
                seg.index,
                seg.round,
                node.as_deref().unwrap_or("?")
            ),
        };
        let outcome = match seg.role {
            apr_core::runtime::Role::Child => {
                if apr_countdown::verify::final_answer(&format!("{}{}", seg.prompt, seg.output))
                    .is_some()
                {
                    "goal reached"
                } else {
                    "no solution"
                }
            }
            _ => "",
        };
        println!("== {who}: {} tokens, {:?} {outcome}", seg.len(), seg.finish);
        if seg.role == apr_core::runtime::Role::Parent {
            println!("{}", seg.output.trim_end());
        }
    }
    match (&record.result.answer, record.correct) {
        (Some(answer), true) => println!("== verified answer:\n{answer}"),
        (Some(answer), false) => println!("== answer does NOT verify:\n{answer}"),
        (None, _) => println!(
            "== no answer ({})",
            record
                .result
                .failure
                .as_ref()
                .map_or("the search found none".to_string(), ToString::to_string)
        ),
    }
    Ok(ExitCode::SUCCESS)
}
