#!/usr/bin/env python3
"""Copies a finished `apr pipeline` run's three models into models/ with their cards.

    python3 scripts/ship_models.py RUN_DIR PRESET SEED [COMMIT]

RUN_DIR is the pipeline's output (runs/quick for `apr pipeline`), PRESET and SEED what it was
run with, COMMIT the commit of the `apr` binary that ran it (written on each card). Each model gets model.safetensors, config.json, tokenizer.json and apr.json (no
optimizer state), a card.json the pipeline and the regression test read, and a README.md.
Everything on a card is read from the run's own files.
"""
import json
import shutil
import sys
from pathlib import Path

FILES = ["model.safetensors", "config.json", "tokenizer.json", "apr.json"]


def load(path):
    return json.loads(Path(path).read_text())


def sft_tokens(run_dir):
    """Tokens an SFT run processed, summed from its metrics.jsonl."""
    total = 0
    for line in Path(run_dir, "metrics.jsonl").read_text().splitlines():
        total += json.loads(line).get("tokens", 0)
    return int(total)


def greedy_first(records_path, n):
    """Greedy accuracy on the first n problems of an evaluation."""
    rows = [json.loads(l) for l in Path(records_path).read_text().splitlines()]
    first = [r for r in rows if r["problem"] < n]
    assert len(first) == n, f"{records_path}: {len(first)} of {n} problems"
    return sum(r["correct"] for r in first) / n


def main(run, preset, seed, commit=None):
    run = Path(run)
    summary = load(run / "summary.json")
    timings = load(run / "timings.json")
    data_info = {
        "numbers": summary["numbers"],
        "max_target": summary["max_target"],
        "train_problems": sum(1 for _ in open(run / "data/train.jsonl")),
        "val_problems": sum(1 for _ in open(run / "data/val.jsonl")),
        "seed": seed,
    }
    sosp_tokens = sft_tokens(run / "sft-sosp")
    apr_tokens = sft_tokens(run / "sft-apr") + (sosp_tokens if summary["apr_from_sosp"] else 0)
    command = f"apr pipeline --preset {preset} --seed {seed}"
    if summary.get("sosp_equal_greedy"):
        # The run also trained SoS+ on the APR model's tokens: that is the comparison's SoS+.
        sosp = ("sft-sosp-equal/checkpoint", "serial", "sosp_equal_greedy", "sosp-equal-greedy",
                sosp_tokens + sft_tokens(run / "sft-sosp-equal"),
                timings["sft-sosp"] + timings["sft-sosp-equal"],
                "SoS+ (serial search), supervised on SoS+ solver traces for as many tokens as "
                "the APR model (its SoS+ start, then as many steps again on SoS+ traces)")
    else:
        sosp = ("sft-sosp/checkpoint", "serial", "sosp_greedy", "sosp-greedy", sosp_tokens,
                timings["sft-sosp"], "SoS+ (serial search), supervised on SoS+ solver traces")
    models = {
        "sosp": sosp,
        "apr-sft": ("sft-apr/checkpoint", "apr", "apr_greedy", "apr-greedy", apr_tokens,
                    timings["sft-sosp"] * summary["apr_from_sosp"] + timings["sft-apr"],
                    "APR, supervised on APR solver traces"
                    + (" after the SoS+ model's training" if summary["apr_from_sosp"] else "")),
        "apr-grpo": ("grpo-apr/checkpoint", "apr", "grpo_greedy", "apr-grpo-greedy", apr_tokens,
                     timings["sft-sosp"] * summary["apr_from_sosp"] + timings["sft-apr"]
                     + timings["grpo-apr"],
                     f"apr-sft after {len(summary['grpo_metrics'])} GRPO steps"),
    }
    out_root = Path(__file__).resolve().parent.parent / "models"
    for name, (ckpt, mode, key, eval_dir, tokens, seconds, what) in models.items():
        out = out_root / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for f in FILES:
            shutil.copy(run / ckpt / f, out / f)
        s = summary[key]
        acc, n = s["accuracy"], s["problems"]
        se = (acc * (1 - acc) / n) ** 0.5
        card = {
            "name": name,
            "what": what,
            "mode": mode,
            "context": 1024,
            "data": data_info,
            "command": command,
            "commit": commit,
            "checkpoint": f"RUN_DIR/{ckpt}",
            "training_tokens": tokens,
            "wall_clock_s": round(seconds),
            "accuracy": {"greedy": acc, "standard_error": se, "problems": n},
            "regression": {
                "problems": min(200, n),
                "greedy_accuracy": greedy_first(
                    run / "eval" / eval_dir / "records.jsonl", min(200, n)
                ),
            },
            # What the quick pipeline's live check of the shipped models runs.
            "quick_check": {
                "problems": min(300, n),
                "greedy_accuracy": greedy_first(
                    run / "eval" / eval_dir / "records.jsonl", min(300, n)
                ),
            },
            "mean_total_tokens": s["mean_total_tokens"],
            "mean_children": s["mean_children"],
        }
        (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        (out / "README.md").write_text(
            f"# {name}\n\n{what}. `small` Llama (d 128, 4 layers, number tokens), "
            f"{data_info['numbers']}-number Countdown with targets up to {data_info['max_target']}.\n\n"
            f"- Reproduce: `{command}` (2-core CPU), then `{ckpt}` of its output directory "
            f"(`scripts/ship_models.py` copies it here)"
            + (f"; trained by the code of commit `{commit}`" if commit else "")
            + ".\n"
            f"- Data: {data_info['train_problems']} training / {data_info['val_problems']} held-out "
            f"problems drawn from seed {seed} (`train_val_split`), solver traces from the same seed.\n"
            f"- Training tokens: {tokens:,}; wall clock of its training stages: {seconds:.0f} s "
            f"(the run's `timings.json`).\n"
            f"- Held-out accuracy, greedy, {card['context']}-token per-thread context: "
            f"**{100 * acc:.1f}% ± {100 * se:.1f}** of {n} problems "
            f"({s['mean_total_tokens']:.0f} tokens, {s['mean_children']:.2f} children per problem).\n"
            f"- Regression check (`crates/apr-rl/tests/shipped_model.rs` runs it for apr-sft): the "
            f"first {card['regression']['problems']} held-out problems, "
            f"{100 * card['regression']['greedy_accuracy']:.1f}% here.\n"
        )
        print(f"{name}: {100 * acc:.1f}% of {n}, {tokens:,} tokens → {out}")


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) == 5 else None)
