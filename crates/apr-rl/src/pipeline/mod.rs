//! The main job: data → SFT of an SoS+ and an APR model → GRPO of the APR model → evaluation
//! → report, in one directory, following a [`Recipe`].
//!
//! Every stage is resumable: the same call, made again, reads back the stages that finished
//! (an evaluation's `summary.json`, a trainer's final checkpoint) and continues an interrupted
//! one from its last checkpoint, so the report comes out the same.

mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use apr_core::decoder::Sampling;
use apr_core::runtime::{Mode, RuntimeConfig};
use apr_countdown::io::write_items;
use apr_countdown::problem::{train_val_split, ProblemSpec};
use apr_countdown::record::{
    generate_traces, AprSolverConfig, CharCounter, SolverConfig, SospSolverConfig,
};
use apr_countdown::sft::{sequences, SftOptions};
use apr_countdown::stats::TraceStats;
use apr_countdown::Problem;
use apr_model::burn::tensor::Device;
use apr_model::checkpoint::{self, CheckpointMeta};
use apr_model::learner::{LearnError, LearnerKind};
use apr_model::{init_weights, AprTokenizer, Model, ModelConfig};

use crate::error::TrainError;
use crate::eval::{evaluate, EvalConfig, EvalSummary};
use crate::grpo::{GrpoMetrics, GrpoTrainer};
use crate::recipe::{Recipe, RecipePreset};
use crate::sft::{tokenize, SftTrainer, StepMetrics, ValProblems};

pub use report::Report;

/// What a long stage reports as it goes (the binary draws bars; tests ignore it).
pub trait Progress {
    /// Stage `name` starts: `total` units, `done` of them already done by an earlier run.
    fn start(&mut self, name: &str, total: usize, done: usize);
    /// `done` units of the current stage are done; `message` (the loss) goes beside the count.
    fn update(&mut self, done: usize, message: Option<String>);
    /// The current stage ended.
    fn finish(&mut self);
}

/// A [`Progress`] that reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: &str, _: usize, _: usize) {}
    fn update(&mut self, _: usize, _: Option<String>) {}
    fn finish(&mut self) {}
}

/// One run of the pipeline.
pub struct PipelineOptions {
    /// The recipe.
    pub preset: RecipePreset,
    /// Output directory (an existing one is continued).
    pub out: PathBuf,
    /// Seed of everything.
    pub seed: u64,
    /// Where the models train and decode.
    pub device: Device,
    /// Directory of the shipped models (`apr-sft/`, `apr-grpo/`, `sosp/`, each with a
    /// `card.json`), evaluated first when the recipe asks for it; `None` or a missing model
    /// skips them.
    pub shipped: Option<PathBuf>,
}

/// Runs the pipeline into `options.out` and returns its report (also written there as
/// `report.md`, `summary.json` and `figures/`).
pub fn run(options: &PipelineOptions, progress: &mut dyn Progress) -> Result<Report, TrainError> {
    let start = Instant::now();
    let plan = Recipe::of(options.preset);
    let out = options.out.clone();
    std::fs::create_dir_all(&out).map_err(|e| TrainError::file(&out, e))?;

    // 1. Data (drawn again on every run: it is seeded and takes a second).
    let spec = ProblemSpec {
        numbers: plan.numbers,
        max_target: plan.max_target,
    };
    let (train, val) = train_val_split(&spec, plan.train_problems, plan.val_problems, options.seed);
    for (name, items) in [("train", &train), ("val", &val)] {
        let path = out.join("data").join(format!("{name}.jsonl"));
        write_items(&path, items).map_err(|e| TrainError::file(&path, e))?;
    }
    let tok = AprTokenizer::builtin(plan.tokenizer).ok_or_else(|| {
        TrainError::Tokenize(format!("no built-in tokenizer `{}`", plan.tokenizer))
    })?;
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
        seed: options.seed,
        device: options.device.clone(),
        tok,
        config,
        train,
        val,
        timings,
        progress,
    };

    // 2. The shipped models first: the paper's comparison from our own trained models, in
    //    minutes.
    let t = Instant::now();
    let shipped = match (&options.shipped, p.plan.shipped) {
        (Some(dir), true) => p.shipped_models(dir)?,
        _ => Vec::new(),
    };
    if !shipped.is_empty() {
        p.timed("shipped models", t.elapsed().as_secs_f64())?;
    }

    // 3. SFT of both models on the same problems: SoS+ first, as the APR model may start from it.
    let sosp = p.sft(SftStage {
        name: "sft-sosp",
        mode: Mode::Serial,
        steps: p.plan.sosp_steps,
        init: None,
    })?;
    let apr_init = p.plan.apr_from_sosp.then_some(sosp.checkpoint.as_path());
    let apr = p.sft(SftStage {
        name: "sft-apr",
        mode: Mode::Apr,
        steps: p.plan.apr_steps,
        init: apr_init,
    })?;
    // SoS+ on the APR model's budget, the same curriculum with serial data.
    let sosp_equal = if p.plan.sosp_equal_tokens {
        Some(p.sft(SftStage {
            name: "sft-sosp-equal",
            mode: Mode::Serial,
            steps: p.plan.apr_steps,
            init: Some(&sosp.checkpoint),
        })?)
    } else {
        None
    };

    // 4. Evaluate the SFT models: greedy at the full window (cumulative accuracy by window comes
    //    with it), and sampled (pass@k, cons@k).
    let apr_evals = p.evals("apr", &apr.checkpoint, Mode::Apr)?;
    let sosp_evals = p.evals("sosp", &sosp.checkpoint, Mode::Serial)?;
    let sosp_equal_evals = match &sosp_equal {
        Some(stage) => Some(p.evals("sosp-equal", &stage.checkpoint, Mode::Serial)?),
        None => None,
    };

    // 5. GRPO from the APR SFT checkpoint, and its evaluation.
    let (grpo_checkpoint, grpo_metrics) = p.grpo(&apr.checkpoint)?;
    let grpo_evals = p.evals("apr-grpo", &grpo_checkpoint, Mode::Apr)?;

    // 6. Report.
    let report = Report {
        preset: options.preset,
        out: out.clone(),
        train_problems: p.train.len(),
        val_problems: p.val.len(),
        parameters: p.config.total_params(),
        shipped,
        sosp,
        apr,
        sosp_equal,
        apr_evals,
        sosp_evals,
        sosp_equal_evals,
        grpo_evals,
        grpo_metrics,
        timings: p.timings.clone(),
        seconds: start.elapsed().as_secs_f64(),
    };
    report.write(&p.plan)?;
    Ok(report)
}

/// A shipped model evaluated live: its name, what its card says, and what it does now.
pub struct Shipped {
    /// Its directory's name.
    pub name: String,
    /// Its `card.json`.
    pub card: serde_json::Value,
    /// The live evaluation.
    pub summary: EvalSummary,
}

/// A trained SFT model: its checkpoint, its solver's trace statistics, its metrics.
pub struct SftResult {
    /// The final checkpoint.
    pub checkpoint: PathBuf,
    /// Statistics of the traces it trained on.
    pub stats: TraceStats,
    /// Every step's metrics (held-out accuracy on the steps that measured it).
    pub metrics: Vec<StepMetrics>,
}

impl SftResult {
    /// Tokens the run processed.
    pub fn training_tokens(&self) -> f64 {
        self.metrics.iter().map(|m| m.tokens).sum()
    }
}

/// A model's greedy and τ = 1 evaluations.
pub struct Evals {
    /// Greedy on every held-out problem.
    pub greedy: EvalSummary,
    /// τ = 1, `samples` samples on the first `sampled_problems`.
    pub sampled: EvalSummary,
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
        device: &Device,
        progress: &mut dyn Progress,
    ) -> Result<(EvalSummary, Option<f64>), TrainError> {
        let summary_path = dir.join("summary.json");
        if summary_path.exists() {
            let text = std::fs::read_to_string(&summary_path)
                .map_err(|e| TrainError::file(&summary_path, e))?;
            let summary = serde_json::from_str(&text).map_err(|e| {
                TrainError::file(&summary_path, format!("not an evaluation summary ({e})"))
            })?;
            return Ok((summary, None));
        }
        let t = Instant::now();
        let ck = checkpoint::load(model)?;
        let engine_model =
            Model::new(ck.meta.model.clone(), &ck.weights, device).map_err(LearnError::from)?;
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
        progress.start(&name.unwrap_or_default(), problems.len() * self.samples, 0);
        let (records, summary) = evaluate(
            &engine_model,
            &ck.tokenizer,
            problems,
            &config,
            &mut |done, _| progress.update(done, None),
        );
        progress.finish();
        let records_path = dir.join("records.jsonl");
        write_items(&records_path, &records).map_err(|e| TrainError::file(&records_path, e))?;
        // The summary goes last: its presence marks the evaluation done.
        let json = serde_json::to_string_pretty(&summary)
            .map_err(|e| TrainError::file(&summary_path, e))?;
        checkpoint::write_atomic(&summary_path, json.as_bytes())?;
        Ok((summary, Some(t.elapsed().as_secs_f64())))
    }
}

/// What an SFT stage trains.
struct SftStage<'a> {
    name: &'a str,
    /// The solver that writes its traces and the view SFT takes of them.
    mode: Mode,
    steps: usize,
    /// Start from this checkpoint's weights instead of random ones.
    init: Option<&'a Path>,
}

/// The pipeline's state between stages: the data, the device, and the time each stage took
/// (kept in `timings.json`, so a resumed stage adds to what it had).
struct Pipeline<'a> {
    plan: Recipe,
    out: PathBuf,
    seed: u64,
    device: Device,
    tok: AprTokenizer,
    config: ModelConfig,
    train: Vec<Problem>,
    val: Vec<Problem>,
    timings: BTreeMap<String, f64>,
    progress: &'a mut dyn Progress,
}

impl Pipeline<'_> {
    /// Adds `seconds` of work to stage `name` and writes the timings.
    fn timed(&mut self, name: &str, seconds: f64) -> Result<(), TrainError> {
        *self.timings.entry(name.to_owned()).or_default() += seconds;
        let path = self.out.join("timings.json");
        let text =
            serde_json::to_string_pretty(&self.timings).map_err(|e| TrainError::file(&path, e))?;
        checkpoint::write_atomic(&path, text.as_bytes())?;
        Ok(())
    }

    /// The shipped models under `dir`, each evaluated greedily on the held-out problems its
    /// card names (not the pipeline's, which may overlap the problems it was trained on).
    fn shipped_models(&mut self, dir: &Path) -> Result<Vec<Shipped>, TrainError> {
        let mut shipped = Vec::new();
        for name in ["apr-sft", "apr-grpo", "sosp"] {
            let model = dir.join(name);
            let path = model.join("card.json");
            if !path.exists() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| TrainError::file(&path, e))?;
            let card: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| TrainError::file(&path, format!("not a model card ({e})")))?;
            let number = |key: &str| {
                card["data"][key]
                    .as_u64()
                    .ok_or_else(|| TrainError::file(&path, format!("no data.{key}")))
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
            let mode = card["mode"]
                .as_str()
                .map_or(Ok(Mode::Apr), str::parse)
                .map_err(|e| TrainError::file(&path, e))?;
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
            let eval_dir = self.out.join("shipped").join(name);
            let (summary, _) =
                run.cached(&eval_dir, &model, &val[..n], &self.device, self.progress)?;
            shipped.push(Shipped {
                name: name.to_owned(),
                card,
                summary,
            });
        }
        Ok(shipped)
    }

    /// Trains (or continues, or reads back) one SFT model.
    fn sft(&mut self, stage: SftStage) -> Result<SftResult, TrainError> {
        let t = Instant::now();
        let plan = &self.plan;
        let solver = match stage.mode {
            Mode::Apr => SolverConfig::Apr(AprSolverConfig::default()),
            Mode::Serial => SolverConfig::Sosp(SospSolverConfig::default()),
        };
        // Trace records live only until they are tokenized: kept, the two solvers' records would
        // be most of the pipeline's peak memory.
        let (examples, stats) = {
            let traces = generate_traces(&self.train, &solver, self.seed, &CharCounter);
            let seqs: Vec<_> = traces
                .iter()
                .flat_map(|r| sequences(r, stage.mode, SftOptions::default(), &CharCounter))
                .collect();
            let examples = tokenize(&seqs, &self.tok, plan.context, plan.loss, false)
                .map_err(TrainError::Tokenize)?;
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
            mode: stage.mode,
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
        let progress = &mut *self.progress;
        progress.start(stage.name, stage.steps, trainer.step());
        let name = stage.name;
        trainer.run(curve.as_ref(), &mut |m| {
            progress.update(m.step, Some(format!("{name} {:.3}", m.loss)));
        })?;
        progress.finish();
        self.timed(stage.name, t.elapsed().as_secs_f64())?;
        Ok(SftResult {
            checkpoint: dir.join("checkpoint"),
            stats,
            metrics: crate::metrics_log::read(&dir)?,
        })
    }

    /// Evaluates a checkpoint on the held-out problems, greedy and at τ = 1, into
    /// `eval/{name}-greedy` and `eval/{name}-sampled`, or reads back the evaluations of an
    /// earlier run of the pipeline.
    fn evals(&mut self, name: &str, model: &Path, mode: Mode) -> Result<Evals, TrainError> {
        Ok(Evals {
            greedy: self.eval(&format!("{name}-greedy"), model, mode, 0.0, 1)?,
            sampled: self.eval(
                &format!("{name}-sampled"),
                model,
                mode,
                1.0,
                self.plan.samples,
            )?,
        })
    }

    /// One evaluation of [`Pipeline::evals`].
    fn eval(
        &mut self,
        name: &str,
        model: &Path,
        mode: Mode,
        temperature: f32,
        samples: usize,
    ) -> Result<EvalSummary, TrainError> {
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
        let (summary, seconds) = run.cached(&dir, model, problems, &self.device, self.progress)?;
        if let Some(seconds) = seconds {
            self.timed(&format!("eval {name}"), seconds)?;
        }
        Ok(summary)
    }

    /// GRPO of the APR model from `init` (continued from its last checkpoint if interrupted);
    /// returns the policy checkpoint and every step's metrics.
    fn grpo(&mut self, init: &Path) -> Result<(PathBuf, Vec<GrpoMetrics>), TrainError> {
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
        let steps = plan.grpo.steps;
        let progress = &mut *self.progress;
        progress.start("grpo", steps, done);
        grpo.run(&mut |m| progress.update(m.step, None))?;
        progress.finish();
        self.timed("grpo-apr", t.elapsed().as_secs_f64())?;
        Ok((dir.join("checkpoint"), crate::metrics_log::read(&dir)?))
    }
}
