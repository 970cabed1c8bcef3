#!/usr/bin/env bash
# The GPU check of issue 3 in one command, for a machine with an NVIDIA GPU and no Rust toolchain.
#
#   scripts/gpu_bench.sh build [FEATURES] # here (offline is fine): cuda test binaries + gpu_bench,
#                                     # stripped, xz-compressed into target/gpu-bundle (≈25 MB);
#                                     # FEATURES adds cargo features, e.g. apr-model/fusion
#   scripts/gpu_bench.sh run [OUTDIR] # there: CUDA equivalence tests, then the `paper` preset's
#                                     # training and decode throughput beside PyTorch on the same
#                                     # card; rows as JSON lines in OUTDIR/rows.jsonl, a table last
#
# Each measurement is its own process under `timeout`, so a failure or an out-of-memory costs one
# row. Sizes: training 8 micro-batches of 1 × 4,096 tokens per step (32,768 tokens, the paper's
# batch 8 × 4,096; burn's attention under autodiff materialises the [heads, 4,096, 4,096] scores,
# so eight sequences at once would need > 140 GB); decode 128 greedy tokens after a 16-token prompt
# at 1 / 64 / 256 slots. PYTHON picks the interpreter with torch (and, optionally, transformers).
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-bundle

if [[ ${1:-} == build ]]; then
    set -e
    # One `cargo build` (not `cargo test`, which would build the example as a test harness), so
    # the example and the two test binaries share one build of the dependencies.
    built=$(cargo build --release -p apr-model -p apr-benches --test engine --test native \
        --example gpu_bench --features "apr-model/cuda,apr-benches/cuda${2:+,$2}" --message-format=json |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        kind = "test_" if m["profile"]["test"] else ""
        print(kind + m["target"]["name"], m["executable"])')
    rm -rf "$bundle" && mkdir -p "$bundle"
    while read -r name exe; do xz -T2 -6 -c "$exe" >"$bundle/$name.xz"; done <<<"$built"
    ls -l "$bundle"
    exit 0
fi

[[ ${1:-} == run ]] || { echo "usage: $0 build | run [OUTDIR]" >&2; exit 2; }
out=${2:-gpu-out}
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
mkdir -p "$out"
rows="$out/rows.jsonl"
: >"$rows"
py=${PYTHON:-python3}
for f in "$bundle"/*.xz; do
    b="$bin/$(basename "$f" .xz)"
    xz -dc "$f" >"$b" && chmod +x "$b"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

# 1. Equivalence on CUDA: KV-cache engine = full forward (also after truncate + prefill),
#    batched decode = single-slot decodes, burn autodiff gradients = the native CPU learner's.
for t in "$bin"/test_*; do
    name=${t#"$bin"/test_}
    start=$SECONDS
    APR_BACKEND=cuda timeout 150 "$t" --test-threads 1 --nocapture >"$out/test_$name.log" 2>&1
    rc=$?
    summary=$(grep -E '^test result' "$out/test_$name.log" | tail -1)
    echo "{\"what\":\"tests\",\"impl\":\"$name\",\"rc\":$rc,\"seconds\":$((SECONDS - start)),\"summary\":\"$summary\"}" | tee -a "$rows"
done

ours() { timeout "$1" "$bin"/gpu_bench "${@:2}" 2>>"$out/gpu_bench.err" | tee -a "$rows"; }
theirs() { timeout "$1" "$py" scripts/gpu_baseline.py "${@:2}" 2>>"$out/torch.err" | tee -a "$rows"; }

# 2. Training, paper preset, 32,768 tokens a step; where a step's time goes.
ours 150 train cuda paper bf16 1 4096 8 3
ours 90 parts cuda paper bf16 1 4096 3
# 3. Decode, paper preset.
for slots in 1 64 256; do ours 60 decode cuda paper bf16 "$slots" 16 128 512; done
# 4. PyTorch on the same card.
theirs 90 train paper 8 4096 5
for slots in 1 64 256; do theirs 60 decode paper "$slots" 16 128; done
for slots in 1 64 256; do theirs 60 hf paper "$slots" 16 128; done

"$py" - "$rows" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("\n| measurement | implementation | shape | step | tokens/s |\n|---|---|---|---|---|")
for r in rows:
    if r["what"] == "tests":
        print(f"| CUDA tests {r['impl']} | exit {r['rc']} ({r['seconds']} s) | {r['summary']} | | |")
    elif r["what"] == "parts":
        print(f"| train parts | {r['impl']} {r['dtype']} | {r['micro_batch']} × {r['seq']} | forward {r['forward_s']} s, "
              f"forward+backward {r['forward_backward_s']} s, optimizer {r['optimizer_s']} s | matmul {r['matmul_tflops']} TFLOP/s |")
    elif r["what"] == "train":
        shape = f"{r.get('micro_batch', r.get('batch'))} × {r['seq']}" + (f" × {r['accum']}" if "accum" in r else "")
        print(f"| train | {r['impl']} {r.get('dtype', '')} | {shape} | {r['step_s']} s | {r['tokens_per_s']:,} |")
    else:
        print(f"| decode | {r['impl']} | {r['slots']} slots | {r['step_ms']} ms | {r['tokens_per_s']:,} |")
PY
