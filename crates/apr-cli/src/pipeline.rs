//! `apr pipeline`: the main job. Data → SFT of an SoS+ and an APR model → GRPO of the APR model
//! → evaluation → report, in one directory. It only composes the library crates.
//!
//! Every stage is resumable: the same command, run again, reads back the stages that finished
//! (an evaluation's `summary.json`, a trainer's final checkpoint) and continues an interrupted
//! one from its last checkpoint, so the report comes out the same.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use apr_core::decoder::Sampling;
use apr_core::runtime::{Mode, RuntimeConfig};
use apr_countdown::io::write_items;
use apr_countdown::problem::{train_val_split, ProblemSpec};
use apr_countdown::record::{
    generate_traces, AprSolverConfig, CharCounter, SolverConfig, SospSolverConfig,
};
use apr_countdown::sft::{sequences, SftOptions, SftView};
use apr_countdown::stats::TraceStats;
use apr_countdown::Problem;
use apr_model::checkpoint::{self, CheckpointMeta};
use apr_model::{init_weights, AprTokenizer, Model, ModelConfig};
use apr_rl::eval::{evaluate, EvalConfig, EvalSummary};
use apr_rl::grpo::{GrpoMetrics, GrpoTrainer};
use apr_rl::recipe::{Recipe, RecipePreset};
use apr_rl::sft::{tokenize, LearnerKind, SftTrainer, StepMetrics, ValProblems};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::progress::bar;
use crate::DeviceArgs;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum PipelinePreset {
    /// CPU, about 20 minutes on 2 cores: 3-number Countdown with targets up to 30, number tokens,
    /// the `small` model.
    Quick,
    /// The paper's comparison at CPU scale, a few hours on 2 cores: the quick problems with
    /// 1,000 held out, both models trained to convergence, a longer GRPO, 8 samples.
    Repro,
    /// The paper's scale (4 numbers, 500k problems, the `paper` model); needs a GPU.
    Paper,
    /// Seconds: every stage on a handful of problems with the `tiny` model (tests).
    Smoke,
}

#[derive(Args)]
pub struct PipelineArgs {
    /// Scale.
    #[arg(long, value_enum, default_value = "quick")]
    preset: PipelinePreset,
    /// Output directory (an existing one is continued).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of everything.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    device: DeviceArgs,
}

/// One run of the pipeline in its directory: the data, the device, and the time each stage
/// took (kept in `timings.json`, so a resumed stage adds to what it had).
struct Pipeline {
    plan: Recipe,
    out: PathBuf,
    seed: u64,
    device: apr_model::burn::tensor::Device,
    tok: AprTokenizer,
    config: ModelConfig,
    train: Vec<Problem>,
    val: Vec<Problem>,
    timings: BTreeMap<String, f64>,
}

/// One evaluation's settings.
struct Evaluation {
    mode: Mode,
    temperature: f32,
    samples: usize,
    context: usize,
    slots: usize,
}

impl Evaluation {
    /// Runs the checkpoint `model` on `problems` into `dir` (`records.jsonl`, then
    /// `summary.json`), or reads back the summary a finished earlier run left there. Returns
    /// the summary and, when it ran, the seconds it took.
    fn cached(
        &self,
        dir: &Path,
        model: &Path,
        problems: &[Problem],
        device: &apr_model::burn::tensor::Device,
    ) -> Result<(EvalSummary, Option<f64>)> {
        let summary_path = dir.join("summary.json");
        if summary_path.exists() {
            let text = std::fs::read_to_string(&summary_path)
                .with_context(|| summary_path.display().to_string())?;
            let summary = serde_json::from_str(&text).with_context(|| {
                format!("{}: not an evaluation summary", summary_path.display())
            })?;
            return Ok((summary, None));
        }
        let t = Instant::now();
        let ck = checkpoint::load(model)?;
        let engine_model = Model::new(ck.meta.model.clone(), &ck.weights, device)?;
        let config = EvalConfig {
            runtime: RuntimeConfig {
                mode: self.mode,
                context: self.context,
                sampling: Sampling::temperature(self.temperature),
                ..RuntimeConfig::default()
            },
            samples: self.samples,
            slots: self.slots,
            // Greedy decoding draws nothing; sampled runs get their own seed.
            seed: if self.temperature > 0.0 { 1 } else { 0 },
        };
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        let progress = bar(
            (problems.len() * self.samples) as u64,
            &name.unwrap_or_default(),
        );
        let (records, summary) = evaluate(
            &engine_model,
            &ck.tokenizer,
            problems,
            &config,
            &mut |d, _| progress.set_position(d as u64),
        );
        progress.finish_and_clear();
        std::fs::create_dir_all(dir)?;
        write_items(&dir.join("records.jsonl"), &records)?;
        // The summary goes last: its presence marks the evaluation done.
        checkpoint::write_atomic(
            &summary_path,
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        Ok((summary, Some(t.elapsed().as_secs_f64())))
    }
}

/// A shipped model evaluated live: its name, what its card says, and what it does now.
struct Shipped {
    name: String,
    card: serde_json::Value,
    summary: EvalSummary,
}

/// The shipped models, each evaluated greedily on the held-out problems its card names (not the
/// pipeline's, which may overlap the problems it was trained on); none when `models/` is not
/// there.
fn shipped_models(out: &Path, device: &apr_model::burn::tensor::Device) -> Result<Vec<Shipped>> {
    let mut shipped = Vec::new();
    for name in ["apr-sft", "apr-grpo", "sosp"] {
        let dir = crate::model::models_dir().join(name);
        if !dir.join("card.json").exists() {
            continue;
        }
        let path = dir.join("card.json");
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let card: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a model card", path.display()))?;
        let number = |key: &str| {
            card["data"][key]
                .as_u64()
                .with_context(|| format!("{}: no data.{key}", path.display()))
        };
        let spec = ProblemSpec {
            numbers: number("numbers")? as usize,
            max_target: number("max_target")? as i64,
        };
        let (_, val) = train_val_split(
            &spec,
            number("train_problems")? as usize,
            number("val_problems")? as usize,
            number("seed")?,
        );
        let mode = match card["mode"].as_str() {
            Some("serial") => Mode::Serial,
            _ => Mode::Apr,
        };
        let run = Evaluation {
            mode,
            temperature: 0.0,
            samples: 1,
            context: card["context"].as_u64().unwrap_or(1024) as usize,
            slots: 64,
        };
        // The card's quick check: its first problems, so that the live check stays a few
        // minutes whatever the card was measured on.
        let n = card["quick_check"]["problems"]
            .as_u64()
            .map_or(val.len(), |n| (n as usize).min(val.len()));
        let (summary, _) = run.cached(&out.join("shipped").join(name), &dir, &val[..n], device)?;
        shipped.push(Shipped {
            name: name.to_owned(),
            card,
            summary,
        });
    }
    Ok(shipped)
}

/// What an SFT stage trains.
struct SftStage<'a> {
    name: &'a str,
    view: SftView,
    solver: SolverConfig,
    steps: usize,
    /// Start from this checkpoint's weights instead of random ones.
    init: Option<&'a Path>,
}

impl Pipeline {
    /// Adds `seconds` of work to stage `name` and writes the timings.
    fn timed(&mut self, name: &str, seconds: f64) -> Result<()> {
        *self.timings.entry(name.to_owned()).or_default() += seconds;
        let text = serde_json::to_string_pretty(&self.timings)?;
        checkpoint::write_atomic(&self.out.join("timings.json"), text.as_bytes())?;
        Ok(())
    }

    /// Trains (or continues, or reads back) one SFT model; returns its checkpoint, the
    /// solver's statistics and the held-out curve.
    fn sft(&mut self, stage: SftStage) -> Result<(PathBuf, TraceStats, Vec<StepMetrics>)> {
        let t = Instant::now();
        let plan = &self.plan;
        // Trace records live only until they are tokenized: kept, the two solvers' records would
        // be most of the pipeline's peak memory.
        let (examples, stats) = {
            let traces = generate_traces(&self.train, &stage.solver, self.seed, &CharCounter);
            let seqs: Vec<_> = traces
                .iter()
                .flat_map(|r| sequences(r, stage.view, SftOptions::default(), &CharCounter))
                .collect();
            let examples = tokenize(&seqs, &self.tok, plan.context, plan.loss, false)
                .map_err(anyhow::Error::msg)?;
            (examples, TraceStats::of(&traces, &CharCounter))
        };
        let init = match stage.init {
            Some(dir) => checkpoint::load(dir)?.weights,
            None => init_weights(&self.config, self.seed),
        };
        let cfg = plan.sft_config(
            stage.steps,
            self.seed,
            LearnerKind::for_device(&self.device),
        );
        let curve = (plan.curve_every > 0).then(|| ValProblems {
            problems: self.val[..plan.curve_problems.min(self.val.len())].to_vec(),
            mode: match stage.view {
                SftView::Apr => Mode::Apr,
                SftView::Sosp => Mode::Serial,
            },
            context: plan.context,
            slots: plan.slots,
        });
        let dir = self.out.join(stage.name);
        let mut trainer = SftTrainer::new(
            cfg,
            self.config.clone(),
            init,
            self.tok.clone(),
            examples,
            vec![],
            &dir,
            &self.device,
            true,
        )?;
        let progress = bar(stage.steps as u64, stage.name);
        progress.set_position(trainer.step() as u64);
        let name = stage.name;
        trainer.run(curve.as_ref(), &mut |m| {
            progress.set_position(m.step as u64);
            progress.set_message(format!("{name} {:.3}", m.loss));
        })?;
        progress.finish_and_clear();
        self.timed(stage.name, t.elapsed().as_secs_f64())?;
        let metrics = apr_rl::metrics_log::read(&dir)?;
        Ok((dir.join("checkpoint"), stats, metrics))
    }

    /// Evaluates a checkpoint on the held-out problems, or reads back the evaluation of an
    /// earlier run of the pipeline.
    fn eval(
        &mut self,
        name: &str,
        model: &Path,
        mode: Mode,
        temperature: f32,
        samples: usize,
    ) -> Result<EvalSummary> {
        let dir = self.out.join("eval").join(name);
        let run = Evaluation {
            mode,
            temperature,
            samples,
            context: self.plan.context,
            slots: self.plan.slots,
        };
        let problems = if samples > 1 {
            &self.val[..self.plan.sampled_problems.min(self.val.len())]
        } else {
            &self.val[..]
        };
        let (summary, seconds) = run.cached(&dir, model, problems, &self.device)?;
        if let Some(seconds) = seconds {
            self.timed(&format!("eval {name}"), seconds)?;
        }
        Ok(summary)
    }

    /// GRPO of the APR model from `init` (continued from its last checkpoint if interrupted);
    /// returns the policy checkpoint and every step's metrics.
    fn grpo(&mut self, init: &Path) -> Result<(PathBuf, Vec<GrpoMetrics>)> {
        let t = Instant::now();
        let plan = &self.plan;
        let ck = checkpoint::load(init)?;
        let cfg = plan.grpo_config(self.seed, LearnerKind::for_device(&self.device));
        let meta = CheckpointMeta {
            model: ck.meta.model.clone(),
            info: ck.meta.info.clone(),
        };
        let dir = self.out.join("grpo-apr");
        let mut grpo = GrpoTrainer::new(
            cfg,
            &meta,
            &ck.weights,
            ck.tokenizer.clone(),
            self.train.clone(),
            &dir,
            &self.device,
        )?;
        let done = grpo.resume()?;
        let progress = bar(plan.grpo.steps as u64, "grpo");
        progress.set_position(done as u64);
        grpo.run(&mut |m| progress.set_position(m.step as u64))?;
        progress.finish_and_clear();
        self.timed("grpo-apr", t.elapsed().as_secs_f64())?;
        Ok((dir.join("checkpoint"), apr_rl::metrics_log::read(&dir)?))
    }
}

/// Tokens an SFT run processed, from its metrics.
fn training_tokens(metrics: &[StepMetrics]) -> f64 {
    metrics.iter().map(|m| m.tokens).sum()
}

pub fn run(args: PipelineArgs) -> Result<ExitCode> {
    let start = Instant::now();
    let plan = Recipe::of(match args.preset {
        PipelinePreset::Quick => RecipePreset::Quick,
        PipelinePreset::Repro => RecipePreset::Repro,
        PipelinePreset::Paper => RecipePreset::Paper,
        PipelinePreset::Smoke => RecipePreset::Smoke,
    });
    let device = args.device.device()?;
    let preset_name = format!("{:?}", args.preset).to_lowercase();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&preset_name));
    std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
    eprintln!("apr pipeline ({preset_name}) → {}", out.display());

    // 1. Data (drawn again on every run: it is seeded and takes a second).
    let spec = ProblemSpec {
        numbers: plan.numbers,
        max_target: plan.max_target,
    };
    let (train, val) = train_val_split(&spec, plan.train_problems, plan.val_problems, args.seed);
    write_items(&out.join("data/train.jsonl"), &train)?;
    write_items(&out.join("data/val.jsonl"), &val)?;
    let val_keys: HashSet<_> = val.iter().map(Problem::key).collect();
    debug_assert!(train.iter().all(|p| !val_keys.contains(&p.key())));
    let tok = AprTokenizer::builtin(plan.tokenizer).expect("presets name built-in tokenizers");
    let config = ModelConfig {
        max_seq_len: plan.context,
        ..ModelConfig::preset(plan.model, tok.vocab_size())
    };
    let timings = match std::fs::read_to_string(out.join("timings.json")) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
        Err(_) => BTreeMap::new(),
    };
    let mut p = Pipeline {
        plan,
        out: out.clone(),
        seed: args.seed,
        device,
        tok,
        config,
        train,
        val,
        timings,
    };

    // 2. The shipped models first: the paper's comparison from our own trained models, in
    //    minutes.
    let t = Instant::now();
    let shipped = if p.plan.shipped {
        shipped_models(&out, &p.device)?
    } else {
        Vec::new()
    };
    if !shipped.is_empty() {
        p.timed("shipped models", t.elapsed().as_secs_f64())?;
    }

    // 3. SFT of both models on the same problems: SoS+ first, as the APR model may start from it.
    let (sosp_ckpt, sosp_stats, sosp_curve) = p.sft(SftStage {
        name: "sft-sosp",
        view: SftView::Sosp,
        solver: SolverConfig::Sosp(SospSolverConfig::default()),
        steps: p.plan.sosp_steps,
        init: None,
    })?;
    let apr_init = p.plan.apr_from_sosp.then_some(sosp_ckpt.as_path());
    let (apr_ckpt, apr_stats, apr_curve) = p.sft(SftStage {
        name: "sft-apr",
        view: SftView::Apr,
        solver: SolverConfig::Apr(AprSolverConfig::default()),
        steps: p.plan.apr_steps,
        init: apr_init,
    })?;

    // SoS+ on the APR model's budget, the same curriculum with serial data.
    let sosp_equal = if p.plan.sosp_equal_tokens {
        Some(p.sft(SftStage {
            name: "sft-sosp-equal",
            view: SftView::Sosp,
            solver: SolverConfig::Sosp(SospSolverConfig::default()),
            steps: p.plan.apr_steps,
            init: Some(&sosp_ckpt),
        })?)
    } else {
        None
    };

    // 4. Evaluate the SFT models: greedy at the full window (cumulative accuracy by window comes
    //    with it), and sampled (pass@k, cons@k).
    let samples = p.plan.samples;
    let apr_greedy = p.eval("apr-greedy", &apr_ckpt, Mode::Apr, 0.0, 1)?;
    let sosp_greedy = p.eval("sosp-greedy", &sosp_ckpt, Mode::Serial, 0.0, 1)?;
    let apr_sampled = p.eval("apr-sampled", &apr_ckpt, Mode::Apr, 1.0, samples)?;
    let sosp_sampled = p.eval("sosp-sampled", &sosp_ckpt, Mode::Serial, 1.0, samples)?;
    let sosp_equal_evals = match &sosp_equal {
        Some((ckpt, _, _)) => Some((
            p.eval("sosp-equal-greedy", ckpt, Mode::Serial, 0.0, 1)?,
            p.eval("sosp-equal-sampled", ckpt, Mode::Serial, 1.0, samples)?,
        )),
        None => None,
    };

    // 5. GRPO from the APR SFT checkpoint, and its evaluation.
    let (grpo_ckpt, grpo_metrics) = p.grpo(&apr_ckpt)?;
    let grpo_greedy = p.eval("apr-grpo-greedy", &grpo_ckpt, Mode::Apr, 0.0, 1)?;
    let grpo_sampled = p.eval("apr-grpo-sampled", &grpo_ckpt, Mode::Apr, 1.0, samples)?;

    // 6. Report.
    let plan = &p.plan;
    let mut md = String::new();
    let _ = writeln!(md, "# apr pipeline ({preset_name})\n");
    if !shipped.is_empty() {
        let _ = writeln!(md, "## Shipped models (`models/`), evaluated now\n");
        let _ = writeln!(md, "Greedy, each on the first held-out problems of its card (its `quick_check`), at its card's per-thread context; \"card\" is what the card measured on the same problems.\n");
        let _ = writeln!(md, "| model | held-out problems | accuracy ± s.e. | card | training tokens | total tokens | longest thread | children |\n|---|---|---|---|---|---|---|---|");
        for m in &shipped {
            let s = &m.summary;
            let _ = writeln!(
                md,
                "| {} | {} | {:.1}% ± {:.1} | {:.1}% | {} | {:.0} | {:.0} | {:.2} |",
                m.name,
                s.problems,
                100.0 * s.accuracy,
                100.0 * s.standard_error(s.accuracy),
                100.0
                    * m.card["quick_check"]["greedy_accuracy"]
                        .as_f64()
                        .or(m.card["accuracy"]["greedy"].as_f64())
                        .unwrap_or(f64::NAN),
                m.card["training_tokens"].as_u64().unwrap_or(0),
                s.mean_total_tokens,
                s.mean_longest_thread,
                s.mean_children
            );
        }
        let _ = writeln!(md, "\n## This run's models\n");
    }
    let _ = writeln!(
        md,
        "{} train / {} held-out {}-number problems (targets up to {}); model `{:?}` ({} parameters, `{}` tokenizer), {}-token context; {} training tokens for SoS+ ({} steps of {}), {} for APR ({} steps{}; loss on `{}` tokens).\n",
        p.train.len(), p.val.len(), plan.numbers, plan.max_target, plan.model,
        p.config.total_params(), plan.tokenizer, plan.context,
        plan.sosp_steps * plan.batch_tokens, plan.sosp_steps, plan.batch_tokens,
        plan.apr_tokens(), plan.apr_steps,
        if plan.apr_from_sosp { ", starting from the SoS+ model" } else { "" },
        plan.loss,
    );
    if plan.sosp_equal_tokens {
        let _ = writeln!(md, "\"SoS+ SFT, APR's tokens\" is the SoS+ model continued on SoS+ traces for {} more steps: the APR model's curriculum with serial data, {} training tokens like the APR model's.\n", plan.apr_steps, plan.apr_tokens());
    }
    let _ = writeln!(md, "| model | decoding | accuracy ± s.e. | pass@{samples} | cons@{samples} | total tokens | sequential | longest thread | children |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    let row = |md: &mut String, name: &str, how: &str, s: &EvalSummary| {
        let rate = |p: f64| format!("{:.1}% ± {:.1}", 100.0 * p, 100.0 * s.standard_error(p));
        let (pass, cons) = if s.samples > 1 {
            (rate(s.pass_at_n), rate(s.cons_at_n))
        } else {
            (String::new(), String::new())
        };
        let _ = writeln!(
            md,
            "| {name} | {how} | {} | {pass} | {cons} | {:.0} | {:.0} | {:.0} | {:.2} |",
            rate(s.accuracy),
            s.mean_total_tokens,
            s.mean_sequential_tokens,
            s.mean_longest_thread,
            s.mean_children
        );
    };
    let sampled = format!("τ=1, {samples} samples, {} problems", apr_sampled.problems);
    row(&mut md, "APR SFT", "greedy", &apr_greedy);
    row(&mut md, "SoS+ SFT", "greedy", &sosp_greedy);
    if let Some((greedy, _)) = &sosp_equal_evals {
        row(&mut md, "SoS+ SFT, APR's tokens", "greedy", greedy);
    }
    row(&mut md, "APR GRPO", "greedy", &grpo_greedy);
    row(&mut md, "APR SFT", &sampled, &apr_sampled);
    row(&mut md, "SoS+ SFT", &sampled, &sosp_sampled);
    if let Some((_, sampled_run)) = &sosp_equal_evals {
        row(&mut md, "SoS+ SFT, APR's tokens", &sampled, sampled_run);
    }
    row(&mut md, "APR GRPO", &sampled, &grpo_sampled);
    let _ = writeln!(md, "\nSelf-consistency over the first k samples at τ = 1 (pass@k / cons@k, total tokens per problem):\n\n| k | APR SFT | SoS+ SFT | APR GRPO |\n|---|---|---|---|");
    for ((a, s), g) in apr_sampled
        .by_samples
        .iter()
        .zip(&sosp_sampled.by_samples)
        .zip(&grpo_sampled.by_samples)
    {
        let cell = |x: &apr_rl::eval::AtSamples| {
            format!(
                "{:.1}% / {:.1}% ({:.0})",
                100.0 * x.pass,
                100.0 * x.cons,
                x.total_tokens
            )
        };
        let _ = writeln!(md, "| {} | {} | {} | {} |", a.k, cell(a), cell(s), cell(g));
    }
    let _ = writeln!(md, "\nCumulative accuracy by per-thread context window (greedy):\n\n| window | APR SFT | SoS+ SFT | APR GRPO |\n|---|---|---|---|");
    for (((w, a), (_, s)), (_, g)) in apr_greedy
        .accuracy_by_window
        .iter()
        .zip(&sosp_greedy.accuracy_by_window)
        .zip(&grpo_greedy.accuracy_by_window)
    {
        let _ = writeln!(
            md,
            "| {w} | {:.1}% | {:.1}% | {:.1}% |",
            100.0 * a,
            100.0 * s,
            100.0 * g
        );
    }
    // (training tokens so far, held-out accuracy) at each measured step.
    let curve_rows = |curve: &[StepMetrics], offset: f64| -> Vec<(f64, f64)> {
        let mut tokens = offset;
        curve
            .iter()
            .filter_map(|m| {
                tokens += m.tokens;
                m.val_accuracy.map(|a| (tokens, a))
            })
            .collect()
    };
    let apr_offset = if plan.apr_from_sosp {
        training_tokens(&sosp_curve)
    } else {
        0.0
    };
    let sosp_points = curve_rows(&sosp_curve, 0.0);
    let apr_points = curve_rows(&apr_curve, apr_offset);
    let sosp_equal_points = sosp_equal
        .as_ref()
        .map(|(_, _, curve)| curve_rows(curve, training_tokens(&sosp_curve)))
        .unwrap_or_default();
    if !sosp_points.is_empty() || !apr_points.is_empty() {
        let _ = writeln!(md, "\nHeld-out greedy accuracy during SFT ({} problems):\n\n| model | training tokens | accuracy |\n|---|---|---|", plan.curve_problems);
        for (name, points) in [
            ("SoS+", &sosp_points),
            ("SoS+, continued", &sosp_equal_points),
            ("APR", &apr_points),
        ] {
            for (tokens, a) in points {
                let _ = writeln!(md, "| {name} | {:.2}M | {:.1}% |", tokens / 1e6, 100.0 * a);
            }
        }
    }
    let first = grpo_metrics.first().cloned().unwrap_or_default();
    let last = grpo_metrics.last().cloned().unwrap_or_default();
    let _ = writeln!(
        md,
        "\nGRPO: {} steps, reward {:.2} → {:.2}, children per rollout {:.2} → {:.2}, tokens per rollout {:.0} → {:.0}, KL to the SFT model {:.4} at the last step.",
        grpo_metrics.len(),
        first.reward_mean,
        last.reward_mean,
        first.children_per_problem,
        last.children_per_problem,
        first.total_tokens,
        last.total_tokens,
        last.kl,
    );
    let times: Vec<String> = p
        .timings
        .iter()
        .map(|(k, v)| format!("{k} {v:.0} s"))
        .collect();
    let _ = writeln!(
        md,
        "\nTimes (summed over resumed runs): {}.",
        times.join(", ")
    );
    let curves: Vec<String> = if plan.curve_every > 0 {
        let apr_start = if plan.apr_from_sosp {
            format!("@{apr_offset}")
        } else {
            String::new()
        };
        let mut curves = vec![
            out.join("sft-sosp").display().to_string(),
            format!("{}{apr_start}", out.join("sft-apr").display()),
        ];
        if sosp_equal.is_some() {
            curves.push(format!(
                "{}@{}",
                out.join("sft-sosp-equal").display(),
                training_tokens(&sosp_curve)
            ));
        }
        curves
    } else {
        Vec::new()
    };
    let figures = crate::report::write_report(&[out.join("eval")], &curves, &out.join("figures"))?;
    let _ = writeln!(md, "\n## Figures\n");
    for png in figures
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
    {
        if let Some(name) = png.file_name() {
            let name = name.to_string_lossy();
            let _ = writeln!(md, "![{name}](figures/{name})\n");
        }
    }
    std::fs::write(out.join("report.md"), &md)?;
    let summary = json!({
        "preset": preset_name, "numbers": plan.numbers, "max_target": plan.max_target,
        "seconds_this_run": start.elapsed().as_secs_f64(), "timings": p.timings,
        "solver_stats": {"apr": apr_stats, "sosp": sosp_stats},
        "sosp_training_tokens": plan.sosp_steps * plan.batch_tokens, "apr_training_tokens": plan.apr_tokens(),
        "apr_from_sosp": plan.apr_from_sosp, "loss": plan.loss,
        "apr_greedy": apr_greedy, "sosp_greedy": sosp_greedy, "apr_sampled": apr_sampled, "sosp_sampled": sosp_sampled,
        "grpo_greedy": grpo_greedy, "grpo_sampled": grpo_sampled, "grpo_metrics": grpo_metrics,
        "sosp_curve": sosp_points, "apr_curve": apr_points, "sosp_equal_curve": sosp_equal_points,
        "sosp_equal_greedy": sosp_equal_evals.as_ref().map(|e| &e.0),
        "sosp_equal_sampled": sosp_equal_evals.as_ref().map(|e| &e.1),
        "shipped": shipped.iter().map(|m| json!({"name": m.name, "summary": m.summary})).collect::<Vec<_>>(),
    });
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    println!("{md}");
    eprintln!("report: {}", out.join("report.md").display());
    Ok(ExitCode::SUCCESS)
}
