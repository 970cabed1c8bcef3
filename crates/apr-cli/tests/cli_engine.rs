//! `apr eval --engine URL`: the same runtime driving `apr serve` over HTTP instead of an engine
//! in process. Every call of every thread is a completion request, and the records (segments,
//! tokens, log-probabilities, metrics) are identical to the in-process run's, greedy and
//! sampled, because both sides run the same batch-invariant engine and draw each token from the
//! thread's seed and position.

mod common;

use std::path::Path;

use common::{apr, apr_line, ok, serve};

/// `apr data problems ARGS` into `dir/problems.jsonl`; returns its path.
fn problems(dir: &Path, args: &str) -> String {
    let path = dir.join("problems.jsonl").to_str().unwrap().to_owned();
    ok(&apr_line(&format!("data problems {args} --out {path}")));
    path
}

/// An evaluation's records without their wall-clock latency.
fn records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("records.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut r: serde_json::Value = serde_json::from_str(l).unwrap();
            r["result"]["metrics"]["latency_s"] = 0.into();
            r
        })
        .collect()
}

#[test]
fn eval_over_http_gives_the_in_process_records() {
    let tmp = tempfile::tempdir().unwrap();
    let problems = problems(
        tmp.path(),
        "--numbers 3 --max-target 30 --count 24 --seed 11",
    );
    let p = problems.as_str();
    let (mut server, url) = serve("apr-sft", 16);
    let mut compared = 0;
    let mut children = 0;
    for (name, extra) in [
        ("greedy", vec![]),
        (
            "sampled",
            vec!["--temperature", "1", "--n", "2", "--seed", "5"],
        ),
        ("serial", vec!["--mode", "serial", "--limit", "8"]),
    ] {
        let local = tmp.path().join(format!("{name}-local"));
        let remote = tmp.path().join(format!("{name}-remote"));
        let base = [
            "eval",
            "--model",
            "apr-sft",
            "--problems",
            p,
            "--slots",
            "16",
        ];
        let mut args: Vec<&str> = base.to_vec();
        args.extend(&extra);
        args.extend(["--out", local.to_str().unwrap()]);
        ok(&apr(&args));
        args.truncate(args.len() - 2);
        args.extend(["--out", remote.to_str().unwrap(), "--engine", url.as_str()]);
        ok(&apr(&args));
        let (a, b) = (records(&local), records(&remote));
        assert_eq!(a.len(), b.len(), "{name}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x, y, "{name}: in process vs over HTTP");
            children += x["result"]["metrics"]["children"].as_u64().unwrap();
        }
        compared += a.len();
    }
    server.kill().unwrap();
    let _ = server.wait();
    assert_eq!(compared, 24 + 48 + 8);
    // The comparison covers spawns and joins, not only single threads.
    assert!(children > 50, "only {children} children");
}

#[test]
fn an_unreachable_engine_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let problems = problems(tmp.path(), "--numbers 3 --count 2");
    let p = problems.as_str();
    let out_dir = tmp.path().join("out");
    for url in ["http://127.0.0.1:1", "https://example.invalid"] {
        let out = apr_line(&format!(
            "eval --model apr-sft --problems {p} --out {} --engine {url}",
            out_dir.to_str().unwrap()
        ));
        assert!(!out.status.success(), "{url}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{url}: {err}");
        assert!(err.contains(url), "{url}: {err}");
    }
}
