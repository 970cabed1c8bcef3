#!/usr/bin/env python3
"""Held-out accuracy against training-token budget for SFT runs (the README's loss-placement
figure).

    python3 scripts/plot_sft_curves.py OUT.png BATCH_TOKENS LABEL=RUN_DIR[@STEPS] ...

Each RUN_DIR is an `apr train sft ... --val-problems ... --eval-every N` output; its
metrics.jsonl gives the held-out accuracy at the measured steps. The x axis is steps × the batch
budget; `@STEPS` shifts a run that started from a model trained for STEPS steps of the same
budget (a curriculum). Needs matplotlib.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curve(run, offset):
    points = []
    for line in Path(run, "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m.get("val_accuracy") is not None:
            points.append(((offset + m["step"]), 100 * m["val_accuracy"]))
    return points


def main(out, batch, specs):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for spec in specs:
        label, run = spec.split("=", 1)
        run, _, offset = run.partition("@")
        pts = curve(run, int(offset or 0))
        ax.plot([s * batch / 1e6 for s, _ in pts], [a for _, a in pts], marker="o", label=label)
    ax.set_xlabel(f"training-token budget (millions; steps × {batch})")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
