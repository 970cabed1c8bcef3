#!/usr/bin/env python3
"""Paired comparisons of a pipeline run's evaluations, with standard errors.

    python3 scripts/repro_stats.py RUN_DIR

Two evaluations on the same problems are compared problem by problem: the difference of their
accuracies, and its standard error from the per-problem differences (sd / sqrt(n); for greedy
runs this is the paired, McNemar-style error, smaller than the unpaired one when the models
agree on most problems). Sampled runs use each problem's mean over its samples. Prints a
Markdown table; reads only the run's `eval/*/records.jsonl`.
"""
import json
import math
import sys
from collections import defaultdict
from pathlib import Path


def per_problem(run, name):
    """problem → (mean correctness over samples, mean children, mean total tokens)."""
    path = Path(run, "eval", name, "records.jsonl")
    if not path.exists():
        return None
    acc = defaultdict(list)
    for line in path.read_text().splitlines():
        r = json.loads(line)
        m = r["result"]["metrics"]
        acc[r["problem"]].append((float(r["correct"]), m["children"], m["total_tokens"]))
    return {p: tuple(sum(x[i] for x in v) / len(v) for i in range(3)) for p, v in acc.items()}


def paired(a, b):
    common = sorted(set(a) & set(b))
    d = [b[p][0] - a[p][0] for p in common]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    return n, mean, sd / math.sqrt(n)


def main(run):
    evals = {}
    for name in ["apr-greedy", "sosp-greedy", "sosp-equal-greedy", "apr-grpo-greedy",
                 "apr-sampled", "sosp-sampled", "sosp-equal-sampled", "apr-grpo-sampled"]:
        e = per_problem(run, name)
        if e is not None:
            evals[name] = e
    print("| evaluation | problems | accuracy ± s.e. | children | total tokens |")
    print("|---|---|---|---|---|")
    for name, e in evals.items():
        n = len(e)
        acc = sum(v[0] for v in e.values()) / n
        se = math.sqrt(acc * (1 - acc) / n)
        children = sum(v[1] for v in e.values()) / n
        tokens = sum(v[2] for v in e.values()) / n
        print(f"| {name} | {n} | {100 * acc:.1f}% ± {100 * se:.1f} | {children:.2f} | {tokens:.0f} |")
    print()
    print("| comparison (B − A) | problems | difference ± paired s.e. | in s.e. |")
    print("|---|---|---|---|")
    for a, b in [("sosp-greedy", "apr-greedy"), ("sosp-equal-greedy", "apr-greedy"),
                 ("sosp-equal-greedy", "apr-grpo-greedy"), ("sosp-greedy", "sosp-equal-greedy"),
                 ("apr-greedy", "apr-grpo-greedy"), ("apr-sampled", "apr-grpo-sampled"),
                 ("sosp-equal-sampled", "apr-sampled")]:
        if a in evals and b in evals:
            n, d, se = paired(evals[a], evals[b])
            z = d / se if se > 0 else float("inf")
            print(f"| {b} − {a} | {n} | {100 * d:+.1f} ± {100 * se:.1f} | {z:+.1f} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
