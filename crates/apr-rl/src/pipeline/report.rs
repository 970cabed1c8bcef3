//! The pipeline's report: `report.md` (the paper's comparison as tables), `summary.json` (the
//! same numbers for programs) and `figures/`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::json;

use super::{Evals, SftResult, Shipped};
use crate::error::TrainError;
use crate::eval::{AtSamples, EvalSummary};
use crate::figures::{write_report, Curve};
use crate::grpo::GrpoMetrics;
use crate::recipe::{Recipe, RecipePreset};
use crate::sft::StepMetrics;

/// Everything a pipeline run measured.
pub struct Report {
    /// The recipe's preset.
    pub preset: RecipePreset,
    /// The run's directory.
    pub out: PathBuf,
    /// Training problems.
    pub train_problems: usize,
    /// Held-out problems.
    pub val_problems: usize,
    /// Parameters of the trained models.
    pub parameters: usize,
    /// The shipped models, evaluated live (empty when skipped).
    pub shipped: Vec<Shipped>,
    /// The SoS+ SFT model.
    pub sosp: SftResult,
    /// The APR SFT model.
    pub apr: SftResult,
    /// The SoS+ model continued to the APR model's training tokens, when the recipe has it.
    pub sosp_equal: Option<SftResult>,
    /// The APR SFT model's evaluations.
    pub apr_evals: Evals,
    /// The SoS+ SFT model's evaluations.
    pub sosp_evals: Evals,
    /// The equal-tokens SoS+ model's evaluations.
    pub sosp_equal_evals: Option<Evals>,
    /// The APR model's after GRPO.
    pub grpo_evals: Evals,
    /// Every GRPO step's metrics.
    pub grpo_metrics: Vec<GrpoMetrics>,
    /// Seconds per stage, summed over resumed runs.
    pub timings: BTreeMap<String, f64>,
    /// Seconds of this call.
    pub seconds: f64,
}

/// (training tokens so far, held-out accuracy) at each measured step of a run that started
/// `offset` tokens in.
fn curve_points(metrics: &[StepMetrics], offset: f64) -> Vec<(f64, f64)> {
    let mut tokens = offset;
    metrics
        .iter()
        .filter_map(|m| {
            tokens += m.tokens;
            m.val_accuracy.map(|a| (tokens, a))
        })
        .collect()
}

impl Report {
    /// Training tokens before the APR model's first step (the SoS+ model's when it starts
    /// from it).
    fn apr_offset(&self, plan: &Recipe) -> f64 {
        if plan.apr_from_sosp {
            self.sosp.training_tokens()
        } else {
            0.0
        }
    }

    /// The report as Markdown; `figures` are the files of `figures/` it links to.
    pub fn markdown(&self, plan: &Recipe, figures: &[PathBuf]) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# apr pipeline ({})\n", self.preset.name());
        self.shipped_section(&mut md);
        let _ = writeln!(
            md,
            "{} train / {} held-out {}-number problems (targets up to {}); model `{:?}` ({} parameters, `{}` tokenizer), {}-token context; {} training tokens for SoS+ ({} steps of {}), {} for APR ({} steps{}; loss on `{}` tokens).\n",
            self.train_problems, self.val_problems, plan.numbers, plan.max_target, plan.model,
            self.parameters, plan.tokenizer, plan.context,
            plan.sosp_steps * plan.batch_tokens, plan.sosp_steps, plan.batch_tokens,
            plan.apr_tokens(), plan.apr_steps,
            if plan.apr_from_sosp { ", starting from the SoS+ model" } else { "" },
            plan.loss,
        );
        if plan.sosp_equal_tokens {
            let _ = writeln!(md, "\"SoS+ SFT, APR's tokens\" is the SoS+ model continued on SoS+ traces for {} more steps: the APR model's curriculum with serial data, {} training tokens like the APR model's.\n", plan.apr_steps, plan.apr_tokens());
        }
        self.accuracy_table(&mut md, plan.samples);
        self.samples_table(&mut md);
        self.window_table(&mut md);
        self.curve_table(&mut md, plan);
        self.grpo_line(&mut md);
        let times: Vec<String> = self
            .timings
            .iter()
            .map(|(k, v)| format!("{k} {v:.0} s"))
            .collect();
        let _ = writeln!(
            md,
            "\nTimes (summed over resumed runs): {}.",
            times.join(", ")
        );
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
        md
    }

    fn shipped_section(&self, md: &mut String) {
        if self.shipped.is_empty() {
            return;
        }
        let _ = writeln!(md, "## Shipped models (`models/`), evaluated now\n");
        let _ = writeln!(md, "Greedy, each on the first held-out problems of its card (its `quick_check`), at its card's per-thread context; \"card\" is what the card measured on the same problems.\n");
        let _ = writeln!(md, "| model | held-out problems | accuracy ± s.e. | card | training tokens | total tokens | longest thread | children |\n|---|---|---|---|---|---|---|---|");
        for m in &self.shipped {
            let s = &m.summary;
            let card = m.card["quick_check"]["greedy_accuracy"]
                .as_f64()
                .or(m.card["accuracy"]["greedy"].as_f64())
                .unwrap_or(f64::NAN);
            let _ = writeln!(
                md,
                "| {} | {} | {:.1}% ± {:.1} | {:.1}% | {} | {:.0} | {:.0} | {:.2} |",
                m.name,
                s.problems,
                100.0 * s.accuracy,
                100.0 * s.standard_error(s.accuracy),
                100.0 * card,
                m.card["training_tokens"].as_u64().unwrap_or(0),
                s.mean_total_tokens,
                s.mean_longest_thread,
                s.mean_children
            );
        }
        let _ = writeln!(md, "\n## This run's models\n");
    }

    fn accuracy_table(&self, md: &mut String, samples: usize) {
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
        let models = self.models();
        for (name, evals) in &models {
            row(md, name, "greedy", &evals.greedy);
        }
        let sampled = format!(
            "τ=1, {samples} samples, {} problems",
            self.apr_evals.sampled.problems
        );
        for (name, evals) in &models {
            row(md, name, &sampled, &evals.sampled);
        }
    }

    /// The models of the comparison tables, in their order.
    fn models(&self) -> Vec<(&'static str, &Evals)> {
        let mut models = vec![("APR SFT", &self.apr_evals), ("SoS+ SFT", &self.sosp_evals)];
        if let Some(evals) = &self.sosp_equal_evals {
            models.push(("SoS+ SFT, APR's tokens", evals));
        }
        models.push(("APR GRPO", &self.grpo_evals));
        models
    }

    /// The models of the per-k and per-window tables, in their column order.
    fn columns(&self) -> [&Evals; 3] {
        [&self.apr_evals, &self.sosp_evals, &self.grpo_evals]
    }

    fn samples_table(&self, md: &mut String) {
        let _ = writeln!(md, "\nSelf-consistency over the first k samples at τ = 1 (pass@k / cons@k, total tokens per problem):\n\n| k | APR SFT | SoS+ SFT | APR GRPO |\n|---|---|---|---|");
        let cell = |x: &AtSamples| {
            format!(
                "{:.1}% / {:.1}% ({:.0})",
                100.0 * x.pass,
                100.0 * x.cons,
                x.total_tokens
            )
        };
        let [apr, sosp, grpo] = self.columns().map(|e| &e.sampled.by_samples);
        for ((a, s), g) in apr.iter().zip(sosp).zip(grpo) {
            let _ = writeln!(md, "| {} | {} | {} | {} |", a.k, cell(a), cell(s), cell(g));
        }
    }

    fn window_table(&self, md: &mut String) {
        let _ = writeln!(md, "\nCumulative accuracy by per-thread context window (greedy):\n\n| window | APR SFT | SoS+ SFT | APR GRPO |\n|---|---|---|---|");
        let [apr, sosp, grpo] = self.columns().map(|e| &e.greedy.accuracy_by_window);
        for (((w, a), (_, s)), (_, g)) in apr.iter().zip(sosp).zip(grpo) {
            let _ = writeln!(
                md,
                "| {w} | {:.1}% | {:.1}% | {:.1}% |",
                100.0 * a,
                100.0 * s,
                100.0 * g
            );
        }
    }

    /// The held-out curves: SoS+, its continuation, APR.
    fn curves(&self, plan: &Recipe) -> [(&'static str, Vec<(f64, f64)>); 3] {
        let continued = self
            .sosp_equal
            .as_ref()
            .map(|r| curve_points(&r.metrics, self.sosp.training_tokens()))
            .unwrap_or_default();
        [
            ("SoS+", curve_points(&self.sosp.metrics, 0.0)),
            ("SoS+, continued", continued),
            (
                "APR",
                curve_points(&self.apr.metrics, self.apr_offset(plan)),
            ),
        ]
    }

    fn curve_table(&self, md: &mut String, plan: &Recipe) {
        let curves = self.curves(plan);
        if curves[0].1.is_empty() && curves[2].1.is_empty() {
            return;
        }
        let _ = writeln!(md, "\nHeld-out greedy accuracy during SFT ({} problems):\n\n| model | training tokens | accuracy |\n|---|---|---|", plan.curve_problems);
        for (name, points) in &curves {
            for (tokens, a) in points {
                let _ = writeln!(md, "| {name} | {:.2}M | {:.1}% |", tokens / 1e6, 100.0 * a);
            }
        }
    }

    fn grpo_line(&self, md: &mut String) {
        let first = self.grpo_metrics.first().cloned().unwrap_or_default();
        let last = self.grpo_metrics.last().cloned().unwrap_or_default();
        let _ = writeln!(
            md,
            "\nGRPO: {} steps, reward {:.2} → {:.2}, children per rollout {:.2} → {:.2}, tokens per rollout {:.0} → {:.0}, KL to the SFT model {:.4} at the last step.",
            self.grpo_metrics.len(),
            first.reward_mean,
            last.reward_mean,
            first.children_per_problem,
            last.children_per_problem,
            first.total_tokens,
            last.total_tokens,
            last.kl,
        );
    }

    /// The numbers of the report for programs (`summary.json`).
    pub fn json(&self, plan: &Recipe) -> serde_json::Value {
        let [sosp_curve, sosp_equal_curve, apr_curve] = self.curves(plan).map(|(_, c)| c);
        json!({
            "preset": self.preset.name(), "numbers": plan.numbers, "max_target": plan.max_target,
            "seconds_this_run": self.seconds, "timings": self.timings,
            "solver_stats": {"apr": self.apr.stats, "sosp": self.sosp.stats},
            "sosp_training_tokens": plan.sosp_steps * plan.batch_tokens, "apr_training_tokens": plan.apr_tokens(),
            "apr_from_sosp": plan.apr_from_sosp, "loss": plan.loss,
            "apr_greedy": self.apr_evals.greedy, "sosp_greedy": self.sosp_evals.greedy,
            "apr_sampled": self.apr_evals.sampled, "sosp_sampled": self.sosp_evals.sampled,
            "grpo_greedy": self.grpo_evals.greedy, "grpo_sampled": self.grpo_evals.sampled,
            "grpo_metrics": self.grpo_metrics,
            "sosp_curve": sosp_curve, "apr_curve": apr_curve, "sosp_equal_curve": sosp_equal_curve,
            "sosp_equal_greedy": self.sosp_equal_evals.as_ref().map(|e| &e.greedy),
            "sosp_equal_sampled": self.sosp_equal_evals.as_ref().map(|e| &e.sampled),
            "shipped": self.shipped.iter().map(|m| json!({"name": m.name, "summary": m.summary})).collect::<Vec<_>>(),
        })
    }

    /// Draws `figures/` and writes `report.md` and `summary.json` into the run's directory.
    pub fn write(&self, plan: &Recipe) -> Result<(), TrainError> {
        let mut curves = Vec::new();
        if plan.curve_every > 0 {
            curves.push(Curve {
                dir: self.out.join("sft-sosp"),
                offset_tokens: 0.0,
            });
            curves.push(Curve {
                dir: self.out.join("sft-apr"),
                offset_tokens: self.apr_offset(plan),
            });
            if self.sosp_equal.is_some() {
                curves.push(Curve {
                    dir: self.out.join("sft-sosp-equal"),
                    offset_tokens: self.sosp.training_tokens(),
                });
            }
        }
        let figures = write_report(&[self.out.join("eval")], &curves, &self.out.join("figures"))?;
        let md = self.markdown(plan, &figures);
        let path = self.out.join("report.md");
        std::fs::write(&path, &md).map_err(|e| TrainError::file(&path, e))?;
        let path = self.out.join("summary.json");
        let json = serde_json::to_string_pretty(&self.json(plan))
            .map_err(|e| TrainError::file(&path, e))?;
        std::fs::write(&path, json).map_err(|e| TrainError::file(&path, e))?;
        Ok(())
    }
}
