//! `metrics.jsonl`, one JSON object a step, as both trainers write it: a resumed run first drops
//! the lines of steps after its checkpoint, so it does not log them twice.

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::TrainError;

/// An open `metrics.jsonl` that continues a run from step `from` (lines of later steps, written
/// after the checkpoint the run resumes from, are removed first).
pub struct MetricsLog {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl` for a run at step `from`.
    pub fn open(dir: &Path, from: usize) -> Result<Self, TrainError> {
        let path = dir.join("metrics.jsonl");
        let err = |e: std::io::Error| TrainError::file(&path, e);
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(err)?;
            let kept: String = text
                .lines()
                .filter(|line| step_of(line).is_some_and(|s| s <= from))
                .map(|line| format!("{line}\n"))
                .collect();
            if kept.len() != text.len() {
                apr_model::checkpoint::write_atomic(&path, kept.as_bytes())?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(err)?;
        Ok(MetricsLog { file, path })
    }

    /// Appends one step's metrics.
    pub fn write<M: Serialize>(&mut self, metrics: &M) -> Result<(), TrainError> {
        let line = serde_json::to_string(metrics).map_err(|e| TrainError::file(&self.path, e))?;
        writeln!(self.file, "{line}").map_err(|e| TrainError::file(&self.path, e))
    }
}

/// Every step's metrics in `dir/metrics.jsonl`, in order (a missing file is an empty run).
pub fn read<M: DeserializeOwned>(dir: &Path) -> Result<Vec<M>, TrainError> {
    let path = dir.join("metrics.jsonl");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::file(&path, e))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .map_err(|e| TrainError::file(&path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

fn step_of(line: &str) -> Option<usize> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    value.get("step")?.as_u64().map(|s| s as usize)
}
