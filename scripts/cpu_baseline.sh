#!/usr/bin/env bash
# Training throughput of the `small` (or given) preset on this CPU: apr-rs's native learner, its
# burn learner, and PyTorch eager on the same shapes, in one run. Needs python3 with torch
# (`pip install torch`; PYTHON=... picks the interpreter). Usage: scripts/cpu_baseline.sh [PRESET] [BATCH] [SEQ] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-small} batch=${2:-8} seq=${3:-1024} steps=${4:-5}
cargo build --release -q -p apr-benches --example train_throughput
ours=$(target/release/examples/train_throughput "$preset" "$batch" "$seq" "$steps")
torch=$("${PYTHON:-python3}" scripts/cpu_baseline.py "$preset" "$batch" "$seq" "$steps")
printf '%s\n%s\n' "$ours" "$torch"
python3 - "$ours" "$torch" <<'PY'
import json, sys
rows = [json.loads(l) for arg in sys.argv[1:] for l in arg.splitlines() if l.strip()]
base = next(r for r in rows if r["learner"] == "pytorch-eager")["tokens_per_s"]
print(f"\n| learner | tokens/s | step (s) | vs PyTorch eager |\n|---|---|---|---|")
for r in rows:
    print(f"| {r['learner']} | {r['tokens_per_s']:,} | {r['step_s']} | {r['tokens_per_s'] / base:.2f}× |")
PY
