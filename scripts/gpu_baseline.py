"""PyTorch on the same card and shapes as benches/examples/gpu_bench.rs (one JSON line per call).

Usage:
  python scripts/gpu_baseline.py train  PRESET BATCH SEQ STEPS        bf16 autocast, fused AdamW
  python scripts/gpu_baseline.py compile PRESET BATCH SEQ STEPS       the same, model torch.compile'd
  python scripts/gpu_baseline.py decode PRESET BATCH PROMPT NEW       bf16, static KV cache, eager
  python scripts/gpu_baseline.py graph  PRESET BATCH PROMPT NEW       bf16, one decode step captured
                                                                    with torch.cuda.graph
  python scripts/gpu_baseline.py hf     PRESET BATCH PROMPT NEW       transformers' generate

The model is scripts/cpu_baseline.py's (the same Llama as crates/apr-model/src/model.rs). Training
keeps f32 weights and runs the forward under bf16 autocast with `scaled_dot_product_attention`
(flash attention), as a PyTorch user would; timed after two warm-up steps. Decoding writes each
step's keys and values into a preallocated cache and attends over the filled part, reading the
greedy token ids back to the host every step, as the apr-rs engine does; timed on a second pass.
The CUDA-graph decode is the fastest PyTorch decode we know how to write for this model: bf16,
fused QKV and gate/up projections, a static KV cache of the whole context written at each row's
position (held on the device), SDPA with an additive length mask, greedy argmax, the step
captured once and replayed; the ids are read back to the host every step, as ours are. On the
CPU (`DEVICE=cpu`) the same step runs uncaptured. Every mode runs on the CPU, for checking the
script, with `DEVICE=cpu`.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_baseline import PRESETS, VOCAB, Llama, synthetic_ids, train_step  # noqa: E402

DEVICE = os.environ.get("DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def card():
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def train(preset, batch, seq, steps, compiled=False):
    torch.manual_seed(0)
    cfg = PRESETS[preset]
    model = Llama(cfg["d"], cfg["layers"], cfg["heads"], cfg["ff"], seq).to(DEVICE)
    fused = DEVICE == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=fused)
    forward = torch.compile(model) if compiled else model
    step = train_step(forward, opt, synthetic_ids(batch, seq).to(DEVICE), autocast=DEVICE)

    start = time.perf_counter()
    step()
    sync()
    first_s = time.perf_counter() - start
    step()
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    step_s = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
    how = "torch.compile" if compiled else "eager"
    return {"what": "train", "impl": f"pytorch {how} (bf16 autocast, SDPA)", "preset": preset,
            "batch": batch, "seq": seq, "first_step_s": round(first_s, 2),
            "step_s": round(step_s, 4), "tokens_per_s": round(batch * seq / step_s),
            "peak_gib": peak and round(peak, 2)}


def train_compiled(preset, batch, seq, steps):
    return train(preset, batch, seq, steps, compiled=True)


def second_pass(run, out):
    """Seconds of a second `run()` (the first compiles and warms up); with CHECK_TOKENS, the
    tokens it appended to `out`, printed to stderr."""
    run()
    out.clear()
    seconds = run()
    if os.environ.get("CHECK_TOKENS"):
        print(json.dumps(torch.stack(out, 1).tolist()), file=sys.stderr)
    return seconds


def rope(t, cos, sin):
    """HF's half rotation."""
    hd = t.shape[-1]
    rot = torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)
    return t * cos + rot * sin


def decode_model(preset, batch, max_len):
    """The model in bf16 and a zeroed static KV cache `[layers, batch, heads, max_len, hd]`."""
    torch.manual_seed(0)
    cfg = PRESETS[preset]
    model = Llama(cfg["d"], cfg["layers"], cfg["heads"], cfg["ff"], max_len)
    model = model.to(DEVICE, torch.bfloat16)
    heads, hd = cfg["heads"], cfg["d"] // cfg["heads"]
    shape = (len(model.blocks), batch, heads, max_len, hd)
    keys = torch.zeros(shape, dtype=torch.bfloat16, device=DEVICE)
    return model, heads, hd, keys, torch.zeros_like(keys)


@torch.no_grad()
def decode(preset, batch, prompt, new):
    model, heads, hd, keys, values = decode_model(preset, batch, prompt + new)

    def forward(ids, pos):
        b, s = ids.shape
        cos, sin = model.cos[pos:pos + s], model.sin[pos:pos + s]
        x = model.embed(ids)
        for i, blk in enumerate(model.blocks):
            h = blk.n1(x)
            split = lambda t: t.view(b, s, heads, hd).transpose(1, 2)
            q, k, v = split(blk.q(h)), split(blk.k(h)), split(blk.v(h))
            keys[i, :, :, pos:pos + s] = rope(k, cos, sin)
            values[i, :, :, pos:pos + s] = v
            a = F.scaled_dot_product_attention(rope(q, cos, sin), keys[i, :, :, :pos + s],
                                               values[i, :, :, :pos + s], is_causal=s > 1)
            x = x + blk.o(a.transpose(1, 2).reshape(b, s, -1))
            h = blk.n2(x)
            x = x + blk.down(F.silu(blk.gate(h)) * blk.up(h))
        return model.head(model.norm(x[:, -1]))

    ids = (4 + (torch.arange(prompt)[None, :] + 5 * torch.arange(batch)[:, None]) % 50)
    ids = ids.long().to(DEVICE)

    def run():
        token = forward(ids, 0).argmax(-1).cpu()
        sync()
        start = time.perf_counter()
        for t in range(new):
            token = forward(token.to(DEVICE)[:, None], prompt + t).argmax(-1).cpu()
            out.append(token)
        return time.perf_counter() - start

    out = []
    seconds = second_pass(run, out)
    return {"what": "decode", "impl": "pytorch eager (static KV cache)", "preset": preset,
            "slots": batch, "prompt": prompt, "new_tokens": new,
            "step_ms": round(seconds * 1e3 / new, 3), "tokens_per_s": round(batch * new / seconds)}


@torch.no_grad()
def graph(preset, batch, prompt, new):
    max_len = prompt + new
    model, heads, hd, keys, values = decode_model(preset, batch, max_len)
    blocks = list(model.blocks)
    qkv = [torch.cat([b.q.weight, b.k.weight, b.v.weight]) for b in blocks]
    gate_up = [torch.cat([b.gate.weight, b.up.weight]) for b in blocks]
    rows = torch.arange(batch, device=DEVICE)
    key_pos = torch.arange(max_len, device=DEVICE)
    # The step's inputs and outputs live in these buffers across replays.
    token = torch.zeros(batch, dtype=torch.long, device=DEVICE)
    pos = torch.zeros(batch, dtype=torch.long, device=DEVICE)

    def step():
        cos, sin = model.cos[pos][:, None, None], model.sin[pos][:, None, None]
        zero = torch.zeros((), dtype=torch.bfloat16, device=DEVICE)
        mask = torch.where(key_pos[None] <= pos[:, None], zero, float("-inf"))[:, None, None]
        x = model.embed(token)[:, None]
        for i, blk in enumerate(blocks):
            q, k, v = F.linear(blk.n1(x), qkv[i]).view(batch, 3, heads, hd).unbind(1)
            q, k = rope(q, cos[:, 0], sin[:, 0]), rope(k, cos[:, 0], sin[:, 0])
            keys[i, rows, :, pos] = k
            values[i, rows, :, pos] = v
            a = F.scaled_dot_product_attention(q[:, :, None], keys[i], values[i], attn_mask=mask)
            x = x + blk.o(a.reshape(batch, 1, -1))
            g, u = F.linear(blk.n2(x), gate_up[i]).chunk(2, -1)
            x = x + blk.down(F.silu(g) * u)
        token.copy_(model.head(model.norm(x[:, 0])).argmax(-1))
        pos.add_(1)

    ids = (4 + (torch.arange(prompt, device=DEVICE)[None, :] + 5 * rows[:, None]) % 50).long()

    def reset():
        # Prefill by single steps (untimed): each prompt token written at its position.
        keys.zero_(), values.zero_(), pos.fill_(0)
        for t in range(prompt):
            token.copy_(ids[:, t])
            step()

    if DEVICE == "cuda":
        reset()
        saved = token.clone(), pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            step()
        token.copy_(saved[0]), pos.copy_(saved[1])
        run_step = captured.replay
    else:
        run_step = step

    def run():
        reset()
        sync()
        start = time.perf_counter()
        for _ in range(new):
            run_step()
            out.append(token.to("cpu", copy=True))
        return time.perf_counter() - start

    out = []
    seconds = second_pass(run, out)
    return {"what": "decode", "impl": "pytorch CUDA graph (static KV cache)" if DEVICE == "cuda"
            else "pytorch static step (uncaptured)", "preset": preset, "slots": batch,
            "prompt": prompt, "new_tokens": new, "step_ms": round(seconds * 1e3 / new, 3),
            "tokens_per_s": round(batch * new / seconds)}


@torch.no_grad()
def hf(preset, batch, prompt, new):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = PRESETS[preset]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=cfg["d"], intermediate_size=cfg["ff"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         max_position_embeddings=prompt + new, rms_norm_eps=1e-6,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(DEVICE, torch.bfloat16).eval()
    ids = (4 + (torch.arange(prompt)[None, :] + 5 * torch.arange(batch)[:, None]) % 50)
    ids = ids.long().to(DEVICE)

    def run():
        sync()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False)
        sync()
        assert out.shape[1] == prompt + new
        return time.perf_counter() - start

    run()
    seconds = run()
    return {"what": "decode", "impl": "HF generate", "preset": preset, "slots": batch,
            "prompt": prompt, "new_tokens": new, "step_ms": round(seconds * 1e3 / new, 3),
            "tokens_per_s": round(batch * new / seconds)}


def main():
    if len(sys.argv) != 6 or sys.argv[1] not in ("train", "compile", "decode", "graph", "hf"):
        sys.exit(__doc__)
    what, preset = sys.argv[1], sys.argv[2]
    a, b, c = (int(x) for x in sys.argv[3:6])
    modes = {"train": train, "compile": train_compiled, "decode": decode, "graph": graph, "hf": hf}
    row = modes[what](preset, a, b, c)
    row.update(device=card(), torch=torch.__version__)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
