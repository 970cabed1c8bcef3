//! Reliability of the `apr` binary against what a user can type (issue 22): outputs never
//! destroy what the command did not create, numeric flags are refused at parse time, and run
//! directories are resumed only as they were started.

mod common;

use std::path::Path;
use std::process::Output;

use common::{apr, apr_line, ok, one_line_error, problems_and_traces, s};

/// A usage error from the argument parser: exit 2, the reason on the first line, no panic.
fn usage_error(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    let first = text.lines().next().unwrap_or("");
    assert!(first.contains(needle), "expected {needle:?} in {text}");
    assert!(!text.contains("panicked"), "{text}");
}

fn tiny_model(dir: &Path) -> String {
    let m = dir.join("model");
    ok(&apr(&["model", "init", "--preset", "tiny", "--out", s(&m)]));
    s(&m).to_owned()
}

/// The arguments of a tiny SFT run on `traces` into `out`, then `extra`.
fn tiny_sft<'a>(traces: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "sft",
        "--data",
        s(traces),
        "--preset",
        "tiny",
        "--batch-tokens",
        "512",
        "--context",
        "256",
        "--checkpoint-every",
        "1",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn outputs_never_replace_what_the_command_did_not_make() {
    let dir = tempfile::tempdir().unwrap();
    // A directory with a user's files is not a checkpoint to replace.
    let vd = dir.path().join("vd");
    std::fs::create_dir_all(vd.join("sub")).unwrap();
    std::fs::write(vd.join("notes.txt"), "important").unwrap();
    one_line_error(
        &apr(&["model", "init", "--preset", "tiny", "--out", s(&vd)]),
        "refusing to replace it",
    );
    assert_eq!(
        std::fs::read_to_string(vd.join("notes.txt")).unwrap(),
        "important"
    );
    // Nor is a file, and it is left where it was.
    let file = dir.path().join("v.jsonl");
    std::fs::write(&file, "mine\n").unwrap();
    one_line_error(
        &apr(&["model", "init", "--preset", "tiny", "--out", s(&file)]),
        "not a checkpoint directory",
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine\n");
    assert!(!dir.path().join("v.jsonl.old").exists());
    // A checkpoint the tool wrote may be written again.
    let m = tiny_model(dir.path());
    ok(&apr(&["model", "init", "--preset", "tiny", "--out", &m]));
    // An output that is the command's own input is refused before anything is written.
    let p = dir.path().join("p.jsonl");
    ok(&apr(&["data", "problems", "--count", "20", "--out", s(&p)]));
    let before = std::fs::read(&p).unwrap();
    for args in [
        vec![
            "data",
            "problems",
            "--count",
            "5",
            "--exclude",
            s(&p),
            "--out",
            s(&p),
        ],
        vec![
            "data",
            "traces",
            "--solver",
            "apr",
            "--problems",
            s(&p),
            "--out",
            s(&p),
        ],
        vec![
            "data",
            "sft",
            "--view",
            "apr",
            "--traces",
            s(&p),
            "--out",
            s(&p),
        ],
    ] {
        one_line_error(&apr(&args), "would destroy what is being read");
    }
    // The same file under another name too.
    let link = dir.path().join("link.jsonl");
    std::fs::hard_link(&p, &link).unwrap();
    one_line_error(
        &apr_line(&format!(
            "data traces --solver apr --problems {} --out {}",
            s(&p),
            s(&link)
        )),
        "would destroy what is being read",
    );
    assert_eq!(std::fs::read(&p).unwrap(), before);
    // A failed write leaves no `.partial` behind.
    let out_dir = dir.path().join("adir");
    std::fs::create_dir(&out_dir).unwrap();
    one_line_error(
        &apr(&["data", "problems", "--count", "5", "--out", s(&out_dir)]),
        "is a directory",
    );
    assert!(!dir.path().join("adir.partial").exists());
    // Training never overwrites its own initial checkpoint.
    let traces = dir.path().join("t.jsonl");
    ok(&apr_line(&format!(
        "data traces --solver apr --problems {} --out {}",
        s(&p),
        s(&traces)
    )));
    let run = dir.path().join("run");
    let sft = |extra: &[&str]| {
        let mut all = vec!["--steps", "2"];
        all.extend_from_slice(extra);
        apr(&tiny_sft(&traces, &run, &all))
    };
    ok(&sft(&[]));
    let init = run.join("checkpoint");
    one_line_error(
        &sft(&["--init", s(&init), "--force"]),
        "would replace its own initialisation",
    );
    assert!(init.join("model.safetensors").exists());
}

#[test]
fn numeric_flags_are_refused_at_parse_time() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_model(dir.path());
    let p = dir.path().join("p.jsonl");
    ok(&apr(&["data", "problems", "--count", "3", "--out", s(&p)]));
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            &m,
            "--problems",
            s(&p),
            "--out",
            "unused",
        ];
        args.extend_from_slice(extra);
        apr(&args)
    };
    for bad in ["-1", "nan", "inf", "1e300"] {
        usage_error(&eval(&[&format!("--timeout={bad}")]), "--timeout");
    }
    let max = u64::MAX.to_string();
    for flag in ["--slots", "--n"] {
        usage_error(&eval(&[flag, &max]), flag);
    }
    usage_error(&eval(&["--slots", "10000000000"]), "--slots");
    // Memory is sized from the arguments and the model before anything is allocated.
    one_line_error(
        &eval(&["--slots", "4096", "--max-memory", "0.5"]),
        "above the memory limit of 0.5 GB",
    );
    usage_error(&eval(&["--slots", "0"]), "--slots");
    usage_error(
        &apr(&["--threads", "100000", "data", "stats", "--generate", "1"]),
        "--threads",
    );
    usage_error(&apr(&["data", "stats", "--generate", &max]), "--generate");
    let train = |args: &[&str]| {
        let mut all = vec!["train"];
        all.extend_from_slice(args);
        apr(&all)
    };
    let grpo = |rest: &str| {
        apr_line(&format!(
            "train grpo --init {m} --problems {} {rest}",
            s(&p)
        ))
    };
    for (flag, value) in [
        ("--slots", max.as_str()),
        ("--group", max.as_str()),
        ("--batch", max.as_str()),
        ("--slots", "0"),
        ("--context", "0"),
        ("--context", "1"),
        ("--temperature", "-1"),
        ("--kl-beta", "-1"),
        ("--inner-steps", "0"),
        ("--batch-tokens", "0"),
    ] {
        usage_error(&grpo(&format!("--out x {flag}={value}")), flag);
    }
    for (flag, value) in [("--accum", "0"), ("--lr", "-1"), ("--context", "0")] {
        let arg = format!("{flag}={value}");
        let out = train(&["sft", "--data", s(&p), "--out", "x", &arg]);
        usage_error(&out, flag);
    }
    // GRPO beyond the model's positions is an error, not a silent cut.
    let out = grpo(&format!(
        "--out {} --context 100000",
        s(&dir.path().join("g"))
    ));
    one_line_error(&out, "exceeds the model's max_seq_len");
    // A configuration no machine could hold is refused when written and when loaded.
    let cfg = dir.path().join("big.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&m).join("apr.json")).unwrap())
            .unwrap();
    config["model"]["max_seq_len"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(&cfg, config["model"].to_string()).unwrap();
    one_line_error(
        &apr_line(&format!(
            "model init --config {} --out {}",
            s(&cfg),
            s(&dir.path().join("b"))
        )),
        "max_seq_len 1000000000 is above the limit",
    );
    std::fs::write(Path::new(&m).join("apr.json"), config.to_string()).unwrap();
    one_line_error(
        &apr(&["generate", "--model", &m, "--prompt", "1"]),
        "is above the limit",
    );
    // An empty problem file evaluates nothing, and says so.
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let m2 = tiny_model(&dir.path().join("m2"));
    let (empty, out) = (s(&empty), dir.path().join("e"));
    let eval = format!("eval --model {m2} --problems {empty} --out {}", s(&out));
    one_line_error(&apr_line(&eval), "no problems");
}

#[test]
fn run_directories_resume_only_as_they_were_started() {
    let dir = tempfile::tempdir().unwrap();
    let (p, traces) = problems_and_traces(dir.path(), 20, "apr");
    let run = dir.path().join("run");
    let sft = |extra: &[&str]| apr(&tiny_sft(&traces, &run, extra));
    one_line_error(&sft(&["--steps", "3", "--resume"]), "no checkpoint here");
    ok(&sft(&["--steps", "3"]));
    // Again without --resume: refused, and nothing of the run is touched.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    one_line_error(&sft(&["--steps", "3"]), "holds a run already");
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
        metrics
    );
    // Resuming to a step already reached, or with other settings, is refused.
    one_line_error(&sft(&["--steps", "3", "--resume"]), "not above the step");
    one_line_error(&sft(&["--steps", "3", "--resume", "--seed", "9"]), "seed");
    // With only checkpoint.old left (a crash between renames), --resume finds it.
    std::fs::rename(run.join("checkpoint"), run.join("checkpoint.old")).unwrap();
    ok(&sft(&["--steps", "4", "--resume", "--allow-changed"]));
    assert!(run.join("checkpoint").is_dir() && !run.join("checkpoint.old").exists());
    let steps = logged_steps(&run);
    assert_eq!(steps, [1, 2, 3, 4]);
    // --force starts over: only the run's files go.
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    ok(&sft(&["--steps", "2", "--force"]));
    assert_eq!(
        std::fs::read_to_string(run.join("notes.txt")).unwrap(),
        "mine"
    );
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
    // A run directory given as --init says where its checkpoint is.
    let out = dir.path().join("g");
    let grpo = format!(
        "train grpo --init {} --problems {} --out {}",
        s(&run),
        s(&p),
        s(&out)
    );
    one_line_error(&apr_line(&grpo), "its checkpoint is");
}

#[test]
fn sft_killed_five_times_ends_as_an_uninterrupted_run() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let (_, traces) = problems_and_traces(dir.path(), 60, "apr");
    let steps = "120";
    let args = |out: &Path, mode: Option<&'static str>| {
        let mut a: Vec<String> = [
            "train",
            "sft",
            "--data",
            s(&traces),
            "--preset",
            "tiny",
            "--steps",
            steps,
            "--batch-tokens",
            "1024",
            "--context",
            "256",
            "--checkpoint-every",
            "3",
            "--out",
            s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(mode.map(str::to_owned));
        a
    };
    let straight = dir.path().join("straight");
    let started = std::time::Instant::now();
    ok(&Command::new(env!("CARGO_BIN_EXE_apr"))
        .args(args(&straight, None))
        .output()
        .unwrap());
    let full = started.elapsed();
    // Kill points spread over the run, from a fixed seed (reproducible, not tuned).
    let run = dir.path().join("killed");
    let mut z: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut kills = 0;
    let mut resumed_then_killed = 0;
    // Five kills of at most 18% of the run each cannot finish it; a start that dies before its
    // first checkpoint, or exits before the kill, is retried.
    for _attempt in 0..20 {
        if kills == 5 {
            break;
        }
        z = z
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = full.mul_f64(0.05 + 0.13 * ((z >> 11) as f64 / (1u64 << 53) as f64));
        // Continue what is there: resume from a checkpoint, or start over if the last run died
        // before writing its first one.
        let mode = if run.join("checkpoint").is_dir() {
            Some("--resume")
        } else if run.exists() {
            Some("--force")
        } else {
            None
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_apr"))
            .args(args(&run, mode))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
            resumed_then_killed += usize::from(mode == Some("--resume"));
        }
        child.wait().unwrap();
    }
    assert_eq!(kills, 5);
    assert!(
        resumed_then_killed >= 2,
        "kills must land in resumed runs too"
    );
    let mode = if run.join("checkpoint").is_dir() {
        "--resume"
    } else {
        "--force"
    };
    let out = Command::new(env!("CARGO_BIN_EXE_apr"))
        .args(args(&run, Some(mode)))
        .output()
        .unwrap();
    ok(&out);
    let weights = |d: &Path| std::fs::read(d.join("checkpoint/model.safetensors")).unwrap();
    assert!(
        weights(&straight) == weights(&run),
        "killed and resumed run ended elsewhere"
    );
    let steps_logged = logged_steps(&run);
    assert_eq!(steps_logged, (1..=120).collect::<Vec<u64>>());
}

/// The `step` of every line of a run's `metrics.jsonl`.
fn logged_steps(run: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}
