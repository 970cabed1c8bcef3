//! Model, training, evaluation and pipeline commands end to end on the smallest settings, and
//! one-line errors on wrong input.

mod common;

use common::{apr, apr_line, ok, one_line_error, s};

#[test]
fn init_generate_export_train_eval() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    let info = ok(&apr_line(&format!(
        "model init --preset tiny --seed 1 --out {}",
        s(&model)
    )));
    assert!(info["parameters"].as_u64().unwrap() < 1_000_000);
    let gen = ok(&apr(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "Current State: 24:[1, 2, 3], Operations: []",
        "--max-tokens",
        "5",
        "--json",
    ]));
    assert_eq!(
        gen["tokens"].as_array().unwrap().len(),
        gen["logprobs"].as_array().unwrap().len()
    );
    assert_eq!(gen["prompt_tokens"][0], 1, "BOS first");
    let export = dir.path().join("hf");
    ok(&apr_line(&format!(
        "export --model {} --format hf --out {}",
        s(&model),
        s(&export)
    )));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert!(export.join("model.safetensors").exists() && export.join("tokenizer.json").exists());

    let (problems, traces) = (dir.path().join("p.jsonl"), dir.path().join("t.jsonl"));
    let (p, t) = (s(&problems), s(&traces));
    ok(&apr_line(&format!(
        "data problems --numbers 3 --count 12 --out {p}"
    )));
    ok(&apr_line(&format!(
        "data traces --solver apr --problems {p} --out {t}"
    )));
    let run = dir.path().join("sft");
    let cfg = dir.path().join("cfg.json");
    std::fs::write(&cfg, r#"{"vocab_size":57,"d_model":32,"n_layers":1,"n_heads":2,"d_ff":64,"max_seq_len":512,"rope_theta":10000.0,"norm_eps":1e-6,"init_std":0.02}"#).unwrap();
    let sft = ok(&apr_line(&format!("train sft --data {} --config {} --steps 2 --batch-tokens 2048 --context 512 --val-problems {} --val-count 2 --eval-every 2 --out {}", s(&traces), s(&cfg), s(&problems), s(&run))));
    assert_eq!(sft["steps"], 2);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert!(last["loss"].is_number() && last["val_accuracy"].is_number());
    // Mixed precision trains through the burn learner and is refused, in one line, by the
    // native one (f32 only).
    let base = format!(
        "train sft --data {} --config {} --steps 1 --batch-tokens 2048 --context 512",
        s(&traces),
        s(&cfg)
    );
    let mixed = ok(&apr_line(&format!(
        "{base} --learner burn --precision bf16 --out {}",
        s(&dir.path().join("bf16"))
    )));
    assert_eq!(mixed["steps"], 1);
    let refused = apr_line(&format!(
        "{base} --learner native --precision bf16 --out {}",
        s(&dir.path().join("native-bf16"))
    ));
    one_line_error(&refused, "burn learner");
    let eval_dir = dir.path().join("eval");
    let summary = ok(&apr_line(&format!("eval --model {} --problems {} --mode sample --n 2 --context 256 --limit 3 --slots 4 --out {}", s(&run.join("checkpoint")), s(&problems), s(&eval_dir))));
    assert_eq!(summary["problems"], 3);
    assert_eq!(
        std::fs::read_to_string(eval_dir.join("records.jsonl"))
            .unwrap()
            .lines()
            .count(),
        6
    );
    let grpo = ok(&apr_line(&format!("train grpo --init {} --problems {} --steps 1 --batch 2 --group 2 --context 256 --slots 4 --out {}", s(&run.join("checkpoint")), s(&problems), s(&dir.path().join("grpo")))));
    assert_eq!(grpo["steps"], 1);
}

/// The native learner's matrix products are one fused multiply-add chain per element, so the
/// portable build and the AVX ones give the same weights: what makes a training run the same
/// on every CPU. Each available extension (`APR_SIMD`) trains two steps; the weights must match to the byte.
#[test]
fn training_gives_the_same_weights_with_every_vector_extension() {
    let dir = tempfile::tempdir().unwrap();
    let (_, traces) = common::problems_and_traces(dir.path(), 12, "apr");
    let cfg = dir.path().join("cfg.json");
    std::fs::write(&cfg, r#"{"vocab_size":57,"d_model":32,"n_layers":1,"n_heads":2,"d_ff":64,"max_seq_len":512,"rope_theta":10000.0,"norm_eps":1e-6,"init_std":0.02}"#).unwrap();
    let mut runs = Vec::new();
    for simd in ["portable", "avx2", "avx512"] {
        let run = dir.path().join(simd);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_apr"))
            .args(["train", "sft", "--data", s(&traces), "--config", s(&cfg)])
            .args(["--steps", "2", "--batch-tokens", "2048", "--context", "512"])
            .args(["--learner", "native", "--out", s(&run)])
            .env("APR_SIMD", simd)
            .output()
            .unwrap();
        ok(&out);
        // An extension this CPU lacks falls back to the default, with a warning; that run is then
        // not a separate one.
        if !String::from_utf8_lossy(&out.stderr).contains("is not available here") {
            let weights = std::fs::read(run.join("checkpoint/model.safetensors")).unwrap();
            runs.push((simd, weights));
        }
    }
    assert!(
        runs.len() >= 2,
        "the portable build and at least the default ran"
    );
    let (first, weights) = &runs[0];
    for (simd, other) in &runs[1..] {
        assert!(
            other == weights,
            "{simd} trained other weights than {first}"
        );
    }
}

#[test]
fn builtin_tokenizers_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut vocab = Vec::new();
    for name in ["domain", "numbers"] {
        let model = dir.path().join(name);
        ok(&apr_line(&format!(
            "model init --preset tiny --tokenizer {name} --out {}",
            s(&model)
        )));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap())
                .unwrap();
        vocab.push(config["vocab_size"].as_u64().unwrap());
    }
    assert_eq!(vocab[1], vocab[0] + 990, "one token per number 10..=999");
}

#[test]
fn pipeline_smoke_writes_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let smoke = format!("pipeline --preset smoke --out {}", s(dir.path()));
    ok(&apr_line(&smoke));
    let report = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(report.contains("| APR SFT | greedy |") && report.contains("SoS+"));
    assert!(report.contains("`numbers` tokenizer"), "{report}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    // Every accuracy is the share of correct records in its evaluation's own records.
    for (key, eval) in [
        ("apr_greedy", "apr-greedy"),
        ("sosp_greedy", "sosp-greedy"),
        ("sosp_equal_greedy", "sosp-equal-greedy"),
        ("grpo_greedy", "apr-grpo-greedy"),
        ("apr_sampled", "apr-sampled"),
    ] {
        let records =
            std::fs::read_to_string(dir.path().join(format!("eval/{eval}/records.jsonl"))).unwrap();
        let (n, correct) = records.lines().fold((0, 0), |(n, c), l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            (n + 1, c + r["correct"].as_bool().unwrap() as usize)
        });
        let summary = &summary[key];
        let samples = summary["samples"].as_u64().unwrap() as usize;
        assert_eq!(
            n,
            summary["problems"].as_u64().unwrap() as usize * samples,
            "{key}"
        );
        let accuracy = summary["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "{key}");
        assert!((accuracy - correct as f64 / n as f64).abs() < 1e-9, "{key}");
    }
    assert!(
        report.contains("| SoS+ SFT, APR's tokens | greedy |"),
        "{report}"
    );
    // The figures are real images, and `apr report` redraws them from the eval outputs.
    for fig in ["accuracy_vs_total_tokens", "accuracy_vs_context_window"] {
        let png = std::fs::read(dir.path().join(format!("figures/{fig}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{fig}.png"
        );
        let svg = std::fs::read_to_string(dir.path().join(format!("figures/{fig}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("apr-greedy"));
    }
    assert!(report.contains("figures/accuracy_vs_total_tokens.png"));
    // Run again after losing an evaluation and the GRPO stage: finished stages are read back,
    // the lost ones redone, and the report is the same (but for the times).
    std::fs::remove_dir_all(dir.path().join("eval/apr-sampled")).unwrap();
    std::fs::remove_dir_all(dir.path().join("grpo-apr")).unwrap();
    let sft_weights =
        std::fs::read(dir.path().join("sft-apr/checkpoint/model.safetensors")).unwrap();
    ok(&apr_line(&smoke));
    let again = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    let without_times = |r: &str| -> String {
        r.lines()
            .filter(|l| !l.starts_with("Times"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(without_times(&again), without_times(&report));
    assert_eq!(
        std::fs::read(dir.path().join("sft-apr/checkpoint/model.safetensors")).unwrap(),
        sft_weights
    );
    let again = dir.path().join("again");
    let out = apr(&["report", s(&dir.path().join("eval")), "--out", s(&again)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = std::fs::read_to_string(again.join("figures.md")).unwrap();
    assert!(table.contains("| apr-greedy |") && table.contains("| sosp-sampled |"));
    let missing = apr(&["report", s(&dir.path().join("nowhere"))]);
    assert!(!missing.status.success());
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr)
            .trim()
            .lines()
            .count(),
        1
    );
}

#[test]
fn wrong_input_gives_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    one_line_error(
        &apr_line(&format!(
            "generate --model {} --prompt x",
            s(&dir.path().join("nope"))
        )),
        "no such checkpoint directory",
    );
    // A bare name is looked up among the shipped models too, and the error says so.
    one_line_error(
        &apr(&["generate", "--model", "no-such-model", "--prompt", "x"]),
        "nor a shipped model",
    );
    let model = dir.path().join("m");
    ok(&apr_line(&format!(
        "model init --preset tiny --out {}",
        s(&model)
    )));
    one_line_error(
        &apr_line(&format!(
            "generate --model {} --prompt x --backend tpu",
            s(&model)
        )),
        "unknown backend \"tpu\"",
    );
    // The binary shares apr-model's features with this test: without CUDA compiled in it says
    // so; with CUDA but no driver it says that instead.
    use apr_model::backend::{cuda_driver_present, Backend};
    let cuda_expected = if !Backend::compiled().contains(&Backend::Cuda) {
        Some("not compiled into this binary")
    } else if !cuda_driver_present() {
        Some("no NVIDIA driver")
    } else {
        None
    };
    if let Some(expected) = cuda_expected {
        one_line_error(
            &apr_line(&format!(
                "generate --model {} --prompt x --backend cuda",
                s(&model)
            )),
            expected,
        );
    }
    one_line_error(
        &apr(&["generate", "--model", s(&model), "--prompt", "hello"]),
        "cannot encode 'h'",
    );
    one_line_error(
        &apr_line(&format!(
            "solve --model {} --numbers 5,x --target 10",
            s(&model)
        )),
        "--numbers: \"x\" is not an integer",
    );
    one_line_error(
        &apr_line(&format!(
            "solve --model {} --numbers 5,-1,3 --target 10",
            s(&model)
        )),
        "numbers must be positive",
    );
    let solve = |context: &str| {
        apr_line(&format!(
            "solve --model {} --numbers 22,26,31,53 --target 27 --context {context}",
            s(&model)
        ))
    };
    let solved = solve("128");
    assert!(
        solved.status.success(),
        "{}",
        String::from_utf8_lossy(&solved.stderr)
    );
    assert!(String::from_utf8_lossy(&solved.stdout).contains("== parent call 0"));
    // A context longer than the model's positions is refused, not silently shortened.
    one_line_error(&solve("100000"), "exceeds the model's max_seq_len");
    one_line_error(
        &apr_line(&format!(
            "eval --model {} --problems {} --out {}",
            s(&model),
            s(&dir.path().join("none.jsonl")),
            s(dir.path())
        )),
        "none.jsonl",
    );
}
