//! `apr train sft` (and later `apr train grpo`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use apr_core::runtime::Mode;
use apr_countdown::io::{for_each_chunk, CHUNK};
use apr_countdown::record::{CharCounter, TraceRecord};
use apr_countdown::sft::{sequences, LossPlacement, SftOptions};
use apr_model::{checkpoint, init_weights, Preset};
use apr_rl::optim::AdamWConfig;
use apr_rl::run_dir::{self, Start};
use apr_rl::sft::{tokenize, SftConfig, SftTrainer, ValProblems};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::data::load_problems;
use crate::model::{model_config, tokenizer};
use crate::progress::bar;
use crate::DeviceArgs;

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Supervised fine-tuning on solver traces.
    Sft(SftArgs),
    /// End-to-end GRPO over parent and child threads, from an SFT checkpoint.
    Grpo(GrpoArgs),
}

#[derive(Args)]
pub struct GrpoArgs {
    /// SFT checkpoint to start from (also the frozen KL reference).
    #[arg(long)]
    init: PathBuf,
    /// Training problems.
    #[arg(long)]
    problems: PathBuf,
    /// Steps.
    #[arg(long, value_parser = crate::args::steps, default_value_t = 150)]
    steps: usize,
    /// Rollouts per prompt.
    #[arg(long, value_parser = crate::args::samples, default_value_t = 5)]
    group: usize,
    /// Prompts per step.
    #[arg(long, value_parser = crate::args::samples, default_value_t = 64)]
    batch: usize,
    /// Learning rate.
    #[arg(long, value_parser = crate::args::learning_rate, default_value_t = 1e-5)]
    lr: f64,
    /// KL weight β (reference: 0.001 APR, 0.01 SoS+).
    #[arg(long, value_parser = crate::args::coefficient)]
    kl_beta: Option<f64>,
    /// Updates per rollout batch.
    #[arg(long, value_parser = crate::args::steps, default_value_t = 2)]
    inner_steps: usize,
    /// Do not divide advantages by the group's std (Dr.GRPO).
    #[arg(long)]
    no_std_norm: bool,
    /// Train the serial (SoS+) baseline instead of APR.
    #[arg(long)]
    serial: bool,
    /// Per-thread context.
    #[arg(long, value_parser = crate::args::context, default_value_t = 4096)]
    context: usize,
    /// Rollout temperature.
    #[arg(long, value_parser = crate::args::temperature, default_value_t = 1.0)]
    temperature: f32,
    /// Engine slots for rollouts.
    #[arg(long, value_parser = crate::args::slots, default_value_t = 64)]
    slots: usize,
    /// Refuse settings whose KV caches could exceed this many GB (default: 90% of RAM).
    #[arg(long, value_parser = crate::args::gigabytes)]
    max_memory: Option<f64>,
    /// Tokens per training micro-batch.
    #[arg(long, value_parser = crate::args::tokens, default_value_t = 8192)]
    batch_tokens: usize,
    /// Checkpoint every this many steps.
    #[arg(long, value_parser = crate::args::steps, default_value_t = 10)]
    checkpoint_every: usize,
    /// What computes gradients: `native` (hand-written CPU forward/backward; rollouts on the
    /// native engine; the default on --backend cpu) or `burn` (autodiff on any backend; the
    /// default elsewhere).
    #[arg(long)]
    learner: Option<apr_rl::sft::LearnerKind>,
    /// What the burn learner computes products and attention in: `f32` or `bf16` (mixed
    /// precision: weights, AdamW state, norms and the loss stay f32).
    #[arg(long, default_value_t = apr_model::Precision::F32)]
    precision: apr_model::Precision,
    #[command(flatten)]
    run: RunDirArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
pub struct SftArgs {
    /// Trace file (`apr data traces` output).
    #[arg(long)]
    data: PathBuf,
    /// How to cut traces into sequences: every APR call its own sequence, or one SoS+ trace per
    /// sequence.
    #[arg(long, value_parser = crate::args::mode("sosp"), default_value = "apr")]
    view: Mode,
    /// Model size (when not starting from --init).
    #[arg(long, default_value = "small")]
    preset: Preset,
    /// A JSON model configuration instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Tokenizer when not starting from --init: `domain` (one token per digit), `numbers` (one
    /// per number up to 999) or a `tokenizer.json`.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Start from this checkpoint instead of random weights.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, value_parser = crate::args::steps, default_value_t = 1000)]
    steps: usize,
    /// Tokens (rows × padded length) per micro-batch.
    #[arg(long, value_parser = crate::args::tokens, default_value_t = 8192)]
    batch_tokens: usize,
    /// Micro-batches per step (gradient accumulation).
    #[arg(long, value_parser = crate::args::steps, default_value_t = 1)]
    accum: usize,
    /// Peak learning rate.
    #[arg(long, value_parser = crate::args::learning_rate, default_value_t = 1e-3)]
    lr: f64,
    /// Final learning rate.
    #[arg(long, value_parser = crate::args::coefficient, default_value_t = 1e-4)]
    min_lr: f64,
    /// Warmup steps.
    #[arg(long, value_parser = crate::args::count, default_value_t = 50)]
    warmup: usize,
    /// Longest sequence in tokens (longer ones are truncated).
    #[arg(long, value_parser = crate::args::context, default_value_t = 2048)]
    context: usize,
    /// Which tokens carry the loss: `all` (the reference), `generated` (none on a child's
    /// prompt or a join block) or `once` (also none on a post-join call before its join block).
    #[arg(long, default_value_t = LossPlacement::default())]
    loss: LossPlacement,
    /// No loss on the given prompt either (the root's, an SoS+ trace's).
    #[arg(long)]
    mask_prompt: bool,
    /// What computes gradients: `native` (hand-written CPU forward/backward over packed
    /// batches; the default on --backend cpu) or `burn` (autodiff on any backend; the default
    /// elsewhere).
    #[arg(long)]
    learner: Option<apr_rl::sft::LearnerKind>,
    /// What the burn learner computes products and attention in: `f32` or `bf16` (mixed
    /// precision: weights, AdamW state, norms and the loss stay f32).
    #[arg(long, default_value_t = apr_model::Precision::F32)]
    precision: apr_model::Precision,
    /// Prefix APR parent calls with `Sub Call Budget: N `.
    #[arg(long)]
    sub_call_budget: bool,
    /// Held-out problems for greedy accuracy every --eval-every steps.
    #[arg(long)]
    val_problems: Option<PathBuf>,
    /// How many of them to use.
    #[arg(long, value_parser = crate::args::problems, default_value_t = 100)]
    val_count: usize,
    /// Validation every this many steps (0: never).
    #[arg(long, value_parser = crate::args::count, default_value_t = 0)]
    eval_every: usize,
    /// Checkpoint every this many steps.
    #[arg(long, value_parser = crate::args::steps, default_value_t = 100)]
    checkpoint_every: usize,
    #[command(flatten)]
    run: RunDirArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

/// A training run's directory and how to use it.
#[derive(Args)]
pub struct RunDirArgs {
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Start the run in --out over: remove its checkpoint and metrics (nothing else).
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    /// Resume even though data, seed or schedule differ from the run's recorded ones.
    #[arg(long, requires = "resume")]
    allow_changed: bool,
    /// Output directory (metrics.jsonl, checkpoint/, run.json).
    #[arg(long)]
    out: PathBuf,
    /// Seed of everything the run draws: initialisation, data order, rollouts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl RunDirArgs {
    /// Prepares the directory (see [`run_dir::prepare`]); returns whether a run continues.
    fn prepare(&self, settings: &serde_json::Value) -> Result<bool> {
        let start = match (self.resume, self.force) {
            (true, _) => Start::Resume,
            (false, true) => Start::Restart,
            (false, false) => Start::Fresh,
        };
        Ok(run_dir::prepare(
            &self.out,
            start,
            settings,
            self.allow_changed,
        )?)
    }
}

/// Refuses `--steps` that a resumed run has already reached.
fn check_steps(steps: usize, reached: usize) -> Result<()> {
    if steps <= reached {
        bail!("--steps {steps} is not above the step the run has reached ({reached}); ask for more steps");
    }
    Ok(())
}

pub fn run(cmd: TrainCommand) -> Result<ExitCode> {
    match cmd {
        TrainCommand::Sft(args) => sft(args),
        TrainCommand::Grpo(args) => grpo(args),
    }
}

fn grpo(args: GrpoArgs) -> Result<ExitCode> {
    if args.steps == 0 || args.group == 0 || args.batch == 0 {
        bail!("--steps, --group and --batch must be positive");
    }
    let device = args.device.device()?;
    let init = crate::model::resolve_model(&args.init)?;
    run_dir::check_init_outside(&init, &args.run.out)?;
    let ck = checkpoint::load(&init)?;
    let problems = load_problems(&args.problems)?;
    if problems.is_empty() {
        bail!("{}: no problems", args.problems.display());
    }
    if args.context > ck.meta.model.max_seq_len {
        bail!(
            "--context {} exceeds the model's max_seq_len {} (positions it never saw)",
            args.context,
            ck.meta.model.max_seq_len
        );
    }
    crate::args::check_kv_memory(&ck.meta.model, args.slots, args.context, args.max_memory)?;
    let settings = json!({
        "init": run_dir::file_identity(&init.join("model.safetensors")),
        "problems": run_dir::file_identity(&args.problems),
        "steps": args.steps, "group": args.group, "batch": args.batch, "lr": args.lr,
        "kl_beta": args.kl_beta, "inner_steps": args.inner_steps, "no_std_norm": args.no_std_norm,
        "serial": args.serial, "context": args.context, "temperature": args.temperature,
        "seed": args.run.seed,
    });
    let resuming = args.run.prepare(&settings)?;
    let mode = if args.serial { Mode::Serial } else { Mode::Apr };
    let reference = apr_rl::grpo::GrpoConfig::reference(mode);
    let config = apr_rl::grpo::GrpoConfig {
        precision: args.precision,
        steps: args.steps,
        prompts: args.batch,
        group: args.group,
        lr: args.lr,
        kl_beta: args.kl_beta.unwrap_or(reference.kl_beta),
        inner_steps: args.inner_steps,
        normalize_std: !args.no_std_norm,
        runtime: apr_core::runtime::RuntimeConfig {
            mode,
            context: args.context.min(ck.meta.model.max_seq_len),
            sampling: apr_core::decoder::Sampling::temperature(args.temperature),
            ..Default::default()
        },
        slots: args.slots,
        batch_tokens: args.batch_tokens,
        seed: args.run.seed,
        checkpoint_every: args.checkpoint_every,
        learner: args
            .learner
            .unwrap_or_else(|| apr_rl::sft::LearnerKind::for_device(&device)),
        ..reference
    };
    let mut trainer = apr_rl::grpo::GrpoTrainer::new(
        config,
        &ck.meta,
        &ck.weights,
        ck.tokenizer,
        problems,
        &args.run.out,
        &device,
    )?;
    if resuming {
        check_steps(args.steps, trainer.resume()?)?;
    }
    let progress = bar(args.steps as u64, "grpo");
    let metrics = trainer.run(&mut |m| {
        progress.set_position(m.step as u64);
        progress.set_message(format!("reward {:.2}", m.reward_mean));
    })?;
    progress.finish_and_clear();
    let first = metrics.first().cloned().unwrap_or_default();
    let last = metrics.last().cloned().unwrap_or_default();
    println!(
        "{}",
        json!({"out": args.run.out, "steps": metrics.len(), "first_reward": first.reward_mean, "last_reward": last.reward_mean,
               "children_first": first.children_per_problem, "children_last": last.children_per_problem})
    );
    Ok(ExitCode::SUCCESS)
}

fn sft(args: SftArgs) -> Result<ExitCode> {
    if args.steps == 0 || args.batch_tokens == 0 {
        bail!("--steps and --batch-tokens must be positive");
    }
    let device = args.device.device()?;
    let init = args
        .init
        .as_ref()
        .map(|dir| crate::model::resolve_model(dir))
        .transpose()?;
    if let Some(init) = &init {
        run_dir::check_init_outside(init, &args.run.out)?;
    }
    let settings = json!({
        "data": run_dir::file_identity(&args.data),
        "init": init.as_ref().map(|i| run_dir::file_identity(&i.join("model.safetensors"))),
        "view": format!("{:?}", args.view), "loss": args.loss.to_string(),
        "mask_prompt": args.mask_prompt, "sub_call_budget": args.sub_call_budget,
        "steps": args.steps, "batch_tokens": args.batch_tokens, "accum": args.accum,
        "lr": args.lr, "min_lr": args.min_lr, "warmup": args.warmup, "context": args.context,
        "seed": args.run.seed,
    });
    let resuming = args.run.prepare(&settings)?;
    let (tok, model_config, weights) = match &init {
        Some(dir) => {
            let ck = checkpoint::load(dir)?;
            (ck.tokenizer, ck.meta.model, ck.weights)
        }
        None => {
            let tok = tokenizer(args.tokenizer.as_ref())?;
            let config = model_config(args.preset, args.config.as_ref(), tok.vocab_size())?;
            let weights = init_weights(&config, args.run.seed);
            (tok, config, weights)
        }
    };
    let context = args.context.min(model_config.max_seq_len);
    let view = args.view;
    let options = SftOptions {
        sub_call_budget: args.sub_call_budget,
        token_budget: false,
    };
    // Records stream through: only their training sequences are kept.
    let mut seqs = Vec::new();
    let records = for_each_chunk(&args.data, CHUNK, |records: Vec<TraceRecord>| {
        seqs.extend(
            records
                .iter()
                .flat_map(|r| sequences(r, view, options, &CharCounter)),
        );
    })?;
    if records == 0 {
        bail!("{}: no trace records", args.data.display());
    }
    let mut examples =
        tokenize(&seqs, &tok, context, args.loss, args.mask_prompt).map_err(anyhow::Error::msg)?;
    let val = apr_rl::sft::split_validation(&mut examples);
    let val_problems = match &args.val_problems {
        Some(path) => Some(ValProblems {
            problems: load_problems(path)?
                .into_iter()
                .take(args.val_count)
                .collect(),
            mode: args.view,
            context,
            slots: 64,
        }),
        None => None,
    };
    let config = SftConfig {
        steps: args.steps,
        batch_tokens: args.batch_tokens,
        accum: args.accum,
        peak_lr: args.lr,
        min_lr: args.min_lr,
        warmup: args.warmup,
        adamw: AdamWConfig::default(),
        context,
        seed: args.run.seed,
        checkpoint_every: args.checkpoint_every,
        eval_every: args.eval_every,
        learner: args
            .learner
            .unwrap_or_else(|| apr_rl::sft::LearnerKind::for_device(&device)),
        precision: args.precision,
    };
    let n_examples = examples.len();
    let mut trainer = SftTrainer::new(
        config,
        model_config,
        weights,
        tok,
        examples,
        val,
        &args.run.out,
        &device,
        resuming,
    )?;
    if resuming {
        check_steps(args.steps, trainer.step())?;
    }
    let progress = bar(args.steps as u64, "sft");
    progress.set_position(trainer.step() as u64);
    let start = std::time::Instant::now();
    let metrics = trainer.run(val_problems.as_ref(), &mut |m| {
        progress.set_position(m.step as u64);
        progress.set_message(format!("loss {:.3}", m.loss));
    })?;
    progress.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let last = metrics.last().cloned().unwrap_or_default();
    let tokens_per_s =
        metrics.iter().map(|m| m.tokens_per_s).sum::<f64>() / metrics.len().max(1) as f64;
    println!(
        "{}",
        json!({
            "out": args.run.out, "steps": trainer.step(), "examples": n_examples, "seconds": seconds,
            "final_loss": last.loss, "val_loss": metrics.iter().rev().find_map(|m| m.val_loss),
            "val_accuracy": metrics.iter().rev().find_map(|m| m.val_accuracy), "mean_tokens_per_s": tokens_per_s,
        })
    );
    Ok(ExitCode::SUCCESS)
}
