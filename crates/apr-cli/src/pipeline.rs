//! `apr pipeline`: the main job ([`apr_rl::pipeline`]), with progress bars.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use apr_rl::pipeline::{PipelineOptions, Progress};
use apr_rl::recipe::RecipePreset;
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Args;

use crate::DeviceArgs;

/// `--preset`: the recipes of [`RecipePreset::ALL`], each with its line of help.
fn preset() -> impl TypedValueParser<Value = RecipePreset> {
    PossibleValuesParser::new(
        RecipePreset::ALL.map(|p| PossibleValue::new(p.name()).help(p.about())),
    )
    .try_map(|s| s.parse::<RecipePreset>())
}

#[derive(Args)]
pub struct PipelineArgs {
    /// Scale.
    #[arg(long, value_parser = preset(), default_value = "quick")]
    preset: RecipePreset,
    /// Output directory (an existing one is continued; default `runs/PRESET`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of everything.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    device: DeviceArgs,
}

/// The stages' progress as terminal bars.
#[derive(Default)]
struct Bars(Option<crate::progress::Progress>);

impl Progress for Bars {
    fn start(&mut self, name: &str, total: usize, done: usize) {
        let bar = crate::progress::bar(total as u64, name);
        bar.set_position(done as u64);
        self.0 = Some(bar);
    }

    fn update(&mut self, done: usize, message: Option<String>) {
        if let Some(bar) = &self.0 {
            bar.set_position(done as u64);
            if let Some(message) = message {
                bar.set_message(message);
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.0.take() {
            bar.finish_and_clear();
        }
    }
}

pub fn run(args: PipelineArgs) -> Result<ExitCode> {
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from("runs").join(args.preset.name()));
    eprintln!("apr pipeline ({}) → {}", args.preset.name(), out.display());
    let options = PipelineOptions {
        preset: args.preset,
        out,
        seed: args.seed,
        device: args.device.device()?,
        shipped: Some(crate::model::models_dir()),
    };
    let report = apr_rl::pipeline::run(&options, &mut Bars::default())?;
    println!("{}", std::fs::read_to_string(report.out.join("report.md"))?);
    eprintln!("report: {}", report.out.join("report.md").display());
    Ok(ExitCode::SUCCESS)
}
