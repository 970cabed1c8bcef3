//! Helpers shared by the CLI tests: run the built `apr` binary and check what it printed.
#![allow(dead_code)] // each test file uses a subset

use std::path::Path;
use std::process::{Command, Output};

/// Runs `apr` with arguments.
pub fn apr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_apr"))
        .args(args)
        .output()
        .expect("run apr")
}

/// A successful run's stdout as JSON (Null if it is not JSON).
pub fn ok(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or(serde_json::Value::Null)
}

/// A failed run whose stderr is one line containing `needle`, and no panic.
pub fn one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(text.trim_end().lines().count(), 1, "{text}");
    assert!(text.contains(needle), "expected {needle:?} in {text}");
    assert!(!text.contains("panicked"), "{text}");
}

/// A path as `&str`.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
