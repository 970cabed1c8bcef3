//! Helpers shared by the CLI tests: run the built `apr` binary and check what it printed.
#![allow(dead_code)] // each test file uses a subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

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

/// Runs `apr` with the words of `line` as arguments: `apr_line("data problems --count 5")`.
/// For arguments without spaces (temporary paths have none).
pub fn apr_line(line: &str) -> Output {
    apr(&line.split_whitespace().collect::<Vec<_>>())
}

/// `count` problems (seed 5) and `solver`'s traces of them under `dir`: (problems, traces).
pub fn problems_and_traces(dir: &Path, count: usize, solver: &str) -> (PathBuf, PathBuf) {
    let (problems, traces) = (dir.join("p.jsonl"), dir.join("t.jsonl"));
    let (p, t) = (s(&problems), s(&traces));
    ok(&apr_line(&format!(
        "data problems --count {count} --seed 5 --out {p}"
    )));
    ok(&apr_line(&format!(
        "data traces --solver {solver} --problems {p} --out {t}"
    )));
    (problems, traces)
}

/// `apr serve --model MODEL --slots SLOTS` on a free port: the process and the URL it printed.
pub fn serve(model: &str, slots: usize) -> (Child, String) {
    let slots = slots.to_string();
    let mut server = Command::new(env!("CARGO_BIN_EXE_apr"))
        .args(["serve", "--model", model, "--port", "0", "--slots", &slots])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start apr serve");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("apr serve prints where it listens");
    let info: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    let url = info["listening"].as_str().expect("a listening URL");
    (server, url.to_owned())
}
