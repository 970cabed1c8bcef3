//! `apr report`: the paper's figures and their table from several `apr eval` outputs
//! ([`apr_rl::figures`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use apr_rl::figures::{write_report, Curve};
use clap::Args;

/// Arguments of `apr report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Eval output directories (each with a `summary.json`), or directories holding them (such
    /// as a pipeline's `eval/`).
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Where to write the figures and `report.md` (default: next to the first input).
    #[arg(long)]
    out: Option<PathBuf>,
    /// SFT run directories (`metrics.jsonl` with held-out accuracy, `--eval-every`) to draw as
    /// held-out accuracy against training tokens; `DIR@N` shifts a run that started from a
    /// model trained on N tokens.
    #[arg(long = "curve")]
    curves: Vec<Curve>,
}

/// `apr report`.
pub fn run(args: ReportArgs) -> Result<ExitCode> {
    let out = match &args.out {
        Some(o) => o.clone(),
        None => args.dirs[0].join("figures"),
    };
    for path in write_report(&args.dirs, &args.curves, &out)? {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
