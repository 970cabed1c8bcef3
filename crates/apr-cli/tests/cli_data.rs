//! The `apr data` commands end to end: outputs, and one-line errors on bad input.

mod common;

use common::{apr, apr_line, ok, one_line_error, problems_and_traces, s};

/// Writes `count` problems (seed 5) and their `solver` traces under `dir`; returns the traces.
#[test]
fn problems_traces_validate_stats_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let problems = dir.path().join("p.jsonl");
    let val = dir.path().join("val.jsonl");
    let traces = dir.path().join("t.jsonl.zst");
    let out = apr_line(&format!(
        "data problems --count 60 --seed 3 --out {}",
        s(&problems)
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = apr_line(&format!(
        "data problems --count 20 --seed 3 --exclude {} --out {}",
        s(&problems),
        s(&val)
    ));
    assert!(out.status.success());
    let out = apr_line(&format!(
        "data traces --solver apr --order sorted --problems {} --out {}",
        s(&problems),
        s(&traces)
    ));
    assert!(!out.status.success(), "an unknown order is refused");
    // Both solvers, in the reference's order and in expansion order.
    for (solver, order) in [
        ("apr", "shuffled"),
        ("sosp", "shuffled"),
        ("apr", "expansion"),
        ("sosp", "expansion"),
    ] {
        let out = apr_line(&format!(
            "--threads 1 data traces --solver {solver} --order {order} --problems {} --out {}",
            s(&problems),
            s(&traces)
        ));
        let report = ok(&out);
        assert_eq!(report["records"], 60);
        let summary = ok(&apr(&["data", "validate", s(&traces)]));
        assert_eq!(summary["consistent"], 60);
        assert_eq!(summary["solved"], summary["verified"]);
        // Only the non-reference order is recorded (reference files stay byte-identical).
        let records: Vec<serde_json::Value> = apr_countdown::io::read_items(&traces).unwrap();
        let marked = records
            .iter()
            .filter(|r| r["successor_order"] == "expansion")
            .count();
        assert_eq!(marked, if order == "expansion" { 60 } else { 0 });
        let out = apr(&["data", "stats", s(&traces)]);
        assert!(out.status.success());
        let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(stats["records"], 60);
        assert_eq!(stats["unit"], "characters");
        // The same records counted in domain tokens: fewer units (phrases are one token each),
        // the same success rate.
        let out = apr(&["data", "stats", s(&traces), "--tokenizer", "domain"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tokens: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(tokens["success_rate"], stats["success_rate"]);
        let (chars, toks) = (
            stats["mean_call_length"].as_f64().unwrap(),
            tokens["mean_call_length"].as_f64().unwrap(),
        );
        assert!(
            toks > 0.0 && toks < chars / 2.0,
            "{toks} tokens vs {chars} chars"
        );
    }
}

#[test]
fn stats_reports_text_the_tokenizer_cannot_encode() {
    let dir = tempfile::tempdir().unwrap();
    let (_, traces) = problems_and_traces(dir.path(), 5, "sosp");
    let text = std::fs::read_to_string(&traces).unwrap();
    std::fs::write(&traces, text.replace("Current State", "Current Stat\u{e9}")).unwrap();
    let out = apr(&["data", "stats", s(&traces), "--tokenizer", "domain"]);
    one_line_error(&out, "cannot encode");
}

#[test]
fn validate_fails_on_an_altered_record() {
    let dir = tempfile::tempdir().unwrap();
    let (_, traces) = problems_and_traces(dir.path(), 40, "apr");
    let text = std::fs::read_to_string(&traces).unwrap();
    // Break the first join block of the file by one character.
    let altered = text.replacen("at level 1 at Node #0,", "at level 1 at Node #0;", 1);
    assert_ne!(altered, text, "the test data has a join block");
    std::fs::write(&traces, altered).unwrap();
    let out = apr(&["data", "validate", s(&traces)]);
    assert_eq!(out.status.code(), Some(1));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["inconsistent"], 1);
    // The first occurrence may sit in `search_path` (a copy of the last parent call) or in a
    // join block: either way the record is named and the difference described.
    let message = summary["mismatches"][0].as_str().unwrap();
    assert!(
        message.starts_with("record ")
            && (message.contains("differs") || message.contains("search_path")),
        "{message}"
    );
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = apr_line(&format!(
        "data problems --numbers 1 --count 5 --out {}",
        s(&dir.path().join("x.jsonl"))
    ));
    one_line_error(&out, "--numbers must be between 3 and 6");

    let bad_json = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad_json,
        "{\"nums\": [1, 2, 3], \"target\": 6}\nnot json\n",
    )
    .unwrap();
    let out = apr_line(&format!(
        "data traces --solver apr --problems {} --out {}",
        s(&bad_json),
        s(&dir.path().join("t.jsonl"))
    ));
    one_line_error(&out, "bad.jsonl:2:");

    let negative = dir.path().join("neg.jsonl");
    std::fs::write(&negative, "{\"nums\": [1, -2, 3, 4], \"target\": 6}\n").unwrap();
    let out = apr_line(&format!(
        "data traces --solver apr --problems {} --out {}",
        s(&negative),
        s(&dir.path().join("t.jsonl"))
    ));
    one_line_error(&out, "numbers must be positive integers, got -2");
    assert!(!dir.path().join("t.jsonl").exists(), "no partial output");

    let out = apr(&["data", "validate", s(&dir.path().join("missing.jsonl"))]);
    one_line_error(&out, "missing.jsonl");
}
