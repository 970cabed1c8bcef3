//! `apr model init`, `apr generate`, `apr export`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use apr_core::decoder::{Sampling, StepInput};
use apr_model::checkpoint::{self, CheckpointMeta};
use apr_model::{init_weights, AprTokenizer, Model, ModelConfig, Preset};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::DeviceArgs;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Write a randomly initialised checkpoint.
    Init(InitArgs),
}

#[derive(Args)]
pub struct InitArgs {
    /// Model size.
    #[arg(long, default_value = "tiny")]
    preset: Preset,
    /// A JSON model configuration instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// `numbers` (the domain tokenizer with a token per number up to 999) or a `tokenizer.json`,
    /// instead of the domain tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Initialisation seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output checkpoint directory.
    #[arg(long)]
    out: PathBuf,
}

/// A built-in tokenizer by name (`domain`, `numbers`) or an HF `tokenizer.json`; the domain one
/// by default.
pub fn tokenizer(name_or_path: Option<&PathBuf>) -> Result<AprTokenizer> {
    Ok(match name_or_path {
        Some(p) => AprTokenizer::named_or_file(p)?,
        None => AprTokenizer::domain(),
    })
}

/// A model configuration from a preset or a JSON file.
pub fn model_config(preset: Preset, file: Option<&PathBuf>, vocab: usize) -> Result<ModelConfig> {
    let config = match file {
        Some(f) => {
            let text = std::fs::read_to_string(f).with_context(|| f.display().to_string())?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not a model configuration", f.display()))?
        }
        None => ModelConfig::preset(preset, vocab),
    };
    config.validate().map_err(anyhow::Error::msg)?;
    if config.vocab_size < vocab {
        bail!(
            "vocab_size {} is smaller than the tokenizer's {vocab}",
            config.vocab_size
        );
    }
    Ok(config)
}

pub fn run(cmd: ModelCommand) -> Result<ExitCode> {
    match cmd {
        ModelCommand::Init(args) => {
            let tok = tokenizer(args.tokenizer.as_ref())?;
            let config = model_config(args.preset, args.config.as_ref(), tok.vocab_size())?;
            let weights = init_weights(&config, args.seed);
            let meta = CheckpointMeta {
                model: config.clone(),
                info: json!({"init_seed": args.seed}),
            };
            checkpoint::save(&args.out, &meta, &weights, &tok, &[])?;
            println!(
                "{}",
                json!({"out": args.out, "parameters": config.total_params(), "non_embedding_parameters": config.non_embedding_params()})
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Checkpoint directory, or the name of a shipped model (`apr-sft`, `apr-grpo`, `sosp`).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (BOS is added).
    #[arg(long)]
    prompt: String,
    /// Tokens to generate at most.
    #[arg(long, value_parser = crate::args::tokens, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, value_parser = crate::args::temperature, default_value_t = 0.0)]
    temperature: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON (tokens, text, log-probabilities).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Loads a checkpoint onto the selected device.
/// Where shipped models live: `$APR_MODELS`, else `models/` of this source tree.
pub fn models_dir() -> PathBuf {
    std::env::var_os("APR_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

/// A checkpoint directory given as a path, or by the name of a shipped model (`apr-grpo` is
/// `models/apr-grpo`).
pub fn resolve_model(name_or_path: &Path) -> Result<PathBuf> {
    if name_or_path.exists() {
        return Ok(name_or_path.to_owned());
    }
    let shipped = models_dir().join(name_or_path);
    let is_name = name_or_path.components().count() == 1;
    if is_name && shipped.join("config.json").exists() {
        return Ok(shipped);
    }
    let names: Vec<String> = std::fs::read_dir(models_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("config.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    bail!(
        "{}: no such checkpoint directory, nor a shipped model (shipped: {})",
        name_or_path.display(),
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    )
}

pub fn load_model(
    dir: &std::path::Path,
    device: &DeviceArgs,
) -> Result<(Model, AprTokenizer, CheckpointMeta)> {
    let ck = checkpoint::load(&resolve_model(dir)?)?;
    let dev = device.device()?;
    let model = Model::new(ck.meta.model.clone(), &ck.weights, &dev)?;
    Ok((model, ck.tokenizer, ck.meta))
}

pub fn generate(args: GenerateArgs) -> Result<ExitCode> {
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        bail!("--temperature must be a non-negative number");
    }
    let (model, tok, _) = load_model(&args.model, &args.device)?;
    let mut prompt_tokens = vec![tok.bos_id()];
    prompt_tokens.extend(tok.encode(&args.prompt)?);
    let limit = model.config.max_seq_len;
    if prompt_tokens.len() >= limit {
        bail!(
            "the prompt has {} tokens; the model's context is {limit}",
            prompt_tokens.len()
        );
    }
    let mut engine = apr_model::engine::engine_for(&model, 1, limit, tok.pad_id());
    let sampling = Sampling::temperature(args.temperature);
    let mut pending = prompt_tokens.clone();
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    while tokens.len() < args.max_tokens && engine.slot_len(0) + pending.len() < limit {
        let s = engine.step(&[StepInput {
            slot: 0,
            tokens: &pending,
            sampling,
            seed: args.seed,
        }])?[0];
        if s.token == tok.eos_id() {
            break;
        }
        tokens.push(s.token);
        logprobs.push(s.logprob);
        pending = vec![s.token];
    }
    let text = tok.decode(&tokens);
    if args.json {
        println!(
            "{}",
            json!({"prompt_tokens": prompt_tokens, "tokens": tokens, "text": text, "logprobs": logprobs})
        );
    } else {
        println!("{}{}", args.prompt, text);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct ExportArgs {
    /// Checkpoint directory, or the name of a shipped model (`apr-sft`, `apr-grpo`, `sosp`).
    #[arg(long)]
    model: PathBuf,
    /// Export format.
    #[arg(long, default_value = "hf")]
    format: String,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

pub fn export(args: ExportArgs) -> Result<ExitCode> {
    if args.format != "hf" {
        bail!("unknown export format {:?} (expected hf)", args.format);
    }
    let ck = checkpoint::load(&resolve_model(&args.model)?)?;
    checkpoint::export_hf(&ck, &args.out)?;
    println!("{}", json!({"out": args.out, "format": "hf"}));
    Ok(ExitCode::SUCCESS)
}
