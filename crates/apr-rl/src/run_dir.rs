//! A training run's directory: what a trainer may write there and when. A fresh run never
//! replaces another run's files, a resumed one must find its checkpoint and the settings it was
//! started with, and starting over removes only the files a run writes.

use std::path::{Path, PathBuf};

use apr_model::checkpoint;
use serde_json::Value;

use crate::error::TrainError;

/// The files (and directories) a run writes into its directory.
pub const RUN_FILES: &[&str] = &[
    "checkpoint",
    "checkpoint.old",
    "checkpoint.partial",
    "metrics.jsonl",
    RUN_JSON,
];

/// The settings a run was started with, compared on resume.
pub const RUN_JSON: &str = "run.json";

/// How a command means to use a run directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run: the directory must hold no run yet.
    Fresh,
    /// Continue the run there: its checkpoint must exist.
    Resume,
    /// Continue the run there if there is one, else start it (the pipeline's stages).
    Continue,
    /// Remove the run there (only its own files), then start a new one.
    Restart,
}

fn err(path: &Path, msg: impl std::fmt::Display) -> TrainError {
    TrainError::file(path, msg)
}

/// Prepares `out` for a run as `start` says and returns whether a checkpoint is there to
/// continue from. A checkpoint a crash left only as `checkpoint.old` is put back first.
///
/// `settings` are what must not change across a resume (data, seed, view, schedule …): a fresh
/// run records them in `run.json`; a resumed one is refused when they differ, naming the keys,
/// unless `allow_changed`.
pub fn prepare(
    out: &Path,
    start: Start,
    settings: &Value,
    allow_changed: bool,
) -> Result<bool, TrainError> {
    if out.exists() && !out.is_dir() {
        return Err(err(out, "exists and is not a directory"));
    }
    let ckpt = out.join("checkpoint");
    checkpoint::recover(&ckpt)?;
    let has_run = RUN_FILES.iter().any(|f| out.join(f).exists());
    let resumable = ckpt.is_dir();
    match start {
        Start::Fresh if has_run => {
            return Err(err(
                out,
                "holds a run already (checkpoint, metrics.jsonl): pass --resume to continue it \
                 or --force to start it over",
            ))
        }
        Start::Resume if !resumable => {
            return Err(err(
                out,
                "--resume: there is no checkpoint here to continue",
            ))
        }
        Start::Restart => {
            for f in RUN_FILES {
                let p = out.join(f);
                let removed = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else if p.exists() {
                    std::fs::remove_file(&p)
                } else {
                    Ok(())
                };
                removed.map_err(|e| err(&p, e))?;
            }
        }
        _ => {}
    }
    std::fs::create_dir_all(out).map_err(|e| err(out, e))?;
    let record = out.join(RUN_JSON);
    let continuing = resumable && matches!(start, Start::Resume | Start::Continue);
    if continuing && record.exists() {
        let text = std::fs::read_to_string(&record).map_err(|e| err(&record, e))?;
        let before: Value = serde_json::from_str(&text).map_err(|e| err(&record, e))?;
        let changed = changed_keys(&before, settings);
        if !changed.is_empty() && !allow_changed {
            return Err(err(
                out,
                format!(
                    "the run was started with other settings ({}); pass --allow-changed to \
                     resume with these anyway",
                    changed.join(", ")
                ),
            ));
        }
        if changed.is_empty() {
            return Ok(true);
        }
    }
    let bytes = serde_json::to_vec_pretty(settings).map_err(|e| err(&record, e))?;
    checkpoint::write_atomic(&record, &bytes)?;
    Ok(continuing)
}

/// Keys of `now` whose values differ from `before` (missing ones included).
fn changed_keys(before: &Value, now: &Value) -> Vec<String> {
    let (Some(b), Some(n)) = (before.as_object(), now.as_object()) else {
        return if before == now {
            vec![]
        } else {
            vec!["settings".into()]
        };
    };
    let mut keys: Vec<String> = n
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .chain(b.keys().filter(|k| !n.contains_key(*k)).cloned())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// What identifies an input file in [`prepare`]'s settings: its canonical path and size.
pub fn file_identity(path: &Path) -> Value {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let bytes = std::fs::metadata(path).map(|m| m.len()).ok();
    serde_json::json!({"path": canonical, "bytes": bytes})
}

/// Refuses an initial checkpoint that lies inside the files a run in `out` would replace.
pub fn check_init_outside(init: &Path, out: &Path) -> Result<(), TrainError> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let init = canon(init);
    let owned: Vec<PathBuf> = RUN_FILES.iter().map(|f| canon(&out.join(f))).collect();
    if owned.iter().any(|o| init.starts_with(o)) {
        return Err(err(
            &init,
            format!(
                "is the run's own checkpoint in {}: training would replace its own \
                 initialisation; copy it elsewhere or pick another --out",
                out.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fresh_resume_restart_and_changed_settings() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let a = json!({"seed": 1, "lr": 0.001});
        assert!(!prepare(&out, Start::Fresh, &a, false).unwrap());
        // A run's files make the directory used.
        std::fs::write(out.join("metrics.jsonl"), "{\"step\":1}\n").unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        assert!(prepare(&out, Start::Fresh, &a, false).is_err());
        assert!(
            prepare(&out, Start::Resume, &a, false).is_err(),
            "no checkpoint yet"
        );
        std::fs::create_dir(out.join("checkpoint.old")).unwrap();
        // A checkpoint left only as checkpoint.old is recovered, not deleted.
        assert!(prepare(&out, Start::Resume, &a, false).unwrap());
        assert!(out.join("checkpoint").is_dir());
        let b = json!({"seed": 2, "lr": 0.001});
        let e = prepare(&out, Start::Resume, &b, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("seed") && !e.contains("lr"), "{e}");
        assert!(prepare(&out, Start::Resume, &b, true).unwrap());
        // Starting over removes the run's files and nothing else.
        assert!(!prepare(&out, Start::Restart, &a, false).unwrap());
        assert!(!out.join("checkpoint").exists() && !out.join("metrics.jsonl").exists());
        assert_eq!(
            std::fs::read_to_string(out.join("notes.txt")).unwrap(),
            "mine"
        );
        assert!(check_init_outside(&out.join("checkpoint"), &out).is_err());
        assert!(check_init_outside(&dir.path().join("other"), &out).is_ok());
    }
}
