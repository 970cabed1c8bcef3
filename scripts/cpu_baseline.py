"""PyTorch CPU eager training throughput of the same Llama shapes as apr-rs.

Usage: python scripts/cpu_baseline.py PRESET BATCH SEQ STEPS   (prints one JSON line)

The model mirrors crates/apr-model/src/model.rs: embedding, pre-RMSNorm blocks with causal
multi-head attention (RoPE, HF half rotation) and a SwiGLU MLP, final RMSNorm, untied head;
AdamW (0.9, 0.999, wd 0.01), clip 1.0, masked mean cross-entropy. Timed like
benches/examples/train_throughput.rs: two warm-up steps, then STEPS timed steps.
"""
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "tiny": dict(d=64, layers=2, heads=4, ff=176),
    "small": dict(d=128, layers=4, heads=4, ff=384),
    "paper": dict(d=1024, layers=18, heads=16, ff=2752),
}
VOCAB = 57


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down = nn.Linear(ff, d, bias=False)

    def forward(self, x, cos, sin):
        b, s, d = x.shape
        h = self.n1(x)
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))

        def rope(t):
            half = t.shape[-1] // 2
            rot = torch.cat([-t[..., half:], t[..., :half]], -1)
            return t * cos + rot * sin

        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, d, layers, heads, ff, max_len):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(Block(d, heads, ff) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        hd = d // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).double() / hd))
        ang = torch.arange(max_len).double()[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], -1)
        self.register_buffer("cos", ang.cos().float())
        self.register_buffer("sin", ang.sin().float())
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids):
        s = ids.shape[1]
        cos, sin = self.cos[:s], self.sin[:s]
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.head(self.norm(x))


def synthetic_ids(batch, seq):
    """The token rows every throughput script trains on (benches' `synthetic_examples`)."""
    return (4 + (torch.arange(seq + 1)[None, :] * 7 + torch.arange(batch)[:, None] * 3) % 50).long()


def train_step(model, opt, ids, autocast=None):
    """One AdamW step on next-token cross-entropy; `autocast` names a device to run the
    forward under bf16 autocast on."""
    def step():
        if autocast:
            with torch.autocast(autocast, dtype=torch.bfloat16):
                logits = model(ids[:, :-1])
        else:
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def main():
    preset = sys.argv[1] if len(sys.argv) > 1 else "small"
    batch, seq, steps = (int(a) for a in (sys.argv[2:5] + ["8", "1024", "5"][len(sys.argv[2:5]):]))
    torch.manual_seed(0)
    cfg = PRESETS[preset]
    model = Llama(cfg["d"], cfg["layers"], cfg["heads"], cfg["ff"], seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    ids = synthetic_ids(batch, seq)
    step = train_step(model, opt, ids)

    step()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - start) / steps
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"learner": "pytorch-eager", "preset": preset, "params": params, "batch": batch,
                      "seq": seq, "step_s": round(step_s, 4), "tokens_per_s": round(batch * seq / step_s),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
