#!/usr/bin/env python3
"""PyTorch peer of megabyte's MEGABYTE, for side-by-side speed measurements on a GPU.

The same architecture as `crates/megabyte` (and `megabyte_ref.py`): patch embedder with learned
byte positions, trainable global pad (shift by one patch), pre-norm global transformer of width
P·D_G, shared w_GL, local input = w_GL(slice) + embedding of the previous byte (trainable local
pad at p = 0) + learned local positions, pre-norm local transformer, head tied to the local
embedding. LayerNorm with bias, exact GELU, no linear biases; parameter names follow the Rust
checkpoint contract.

Written the way a careful PyTorch user would: bf16 autocast, `scaled_dot_product_attention`,
`torch.compile`, fused AdamW. Bench mode prints the figures `megabyte bench` prints (training
bytes/s, achieved TFLOP/s, MFU against 790 TFLOP/s, peak memory) as one JSON line.

    python3 tools/reference/torch_peer.py bench --preset enwik8 --batch-size 24 --steps 20
"""

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

V = 256

# (P, T, global width, layers, heads, local width, layers, heads), as in config.rs.
PRESETS = {
    "tiny": (8, 256, 128, 2, 2, 32, 2, 2),
    "enwik8": (8, 4096, 768, 12, 12, 256, 4, 4),
    "paper-arxiv": (8, 8192, 2048, 14, 32, 1024, 18, 16),
    "paper-pg19": (8, 8192, 2048, 24, 32, 1024, 15, 16),
}


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):  # [N, S, D]
        n, s, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(d, dim=2)
        split = lambda t: t.view(n, s, self.heads, d // self.heads).transpose(1, 2)  # [N, H, S, hd]
        y = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(n, s, d))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class Transformer(nn.Module):
    def __init__(self, d, layers, heads):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


class MegaByte(nn.Module):
    def __init__(self, p, t, gw, gl, gh, lw, ll, lh, std=0.02):
        super().__init__()
        self.p, self.t, self.dg, self.dl = p, t, gw // p, lw
        self.byte_embed = nn.Parameter(torch.randn(V, self.dg) * std)  # E_global_embed
        self.pos_embed = nn.Parameter(torch.randn(t, self.dg) * std)  # E_pos
        self.global_pad = nn.Parameter(torch.randn(gw) * std)  # E_global_pad
        self.global_model = Transformer(gw, gl, gh)
        self.global_to_local = nn.Linear(self.dg, lw, bias=False)  # w_GL
        self.local_byte_embed = nn.Parameter(torch.randn(V, lw) * std)  # E_local_embed, tied head
        self.local_pos_embed = nn.Parameter(torch.randn(p, lw) * std)
        self.local_pad = nn.Parameter(torch.randn(lw) * std)  # E_local_pad
        self.local_model = Transformer(lw, ll, lh)

    def logits(self, x):  # x: [B, T] int64
        b, t = x.shape
        k = t // self.p
        h = (self.byte_embed[x] + self.pos_embed[:t]).reshape(b, k, self.p * self.dg)  # [B, K, P·D_G]
        h = torch.cat([self.global_pad.expand(b, 1, -1), h[:, :-1]], dim=1)  # shift one patch
        h = self.global_model(h)  # [B, K, P·D_G]
        ctx = self.global_to_local(h.reshape(b * k, self.p, self.dg))  # [B·K, P, D_L]
        e = self.local_byte_embed[x.reshape(b * k, self.p)]  # [B·K, P, D_L]
        e = torch.cat([self.local_pad.expand(b * k, 1, -1), e[:, :-1]], dim=1)  # shift one byte
        h = self.local_model(ctx + e + self.local_pos_embed)  # [B·K, P, D_L]
        return (h @ self.local_byte_embed.t()).reshape(b, t, V)

    def loss(self, x):
        return F.cross_entropy(self.logits(x).float().reshape(-1, V), x.reshape(-1))


def flops_per_byte(p, t, gw, gl, gh, lw, ll, lh):
    """6·(m_G/P + m_L) + attention (PaLM convention), exactly as config.rs."""
    k = t // p
    m_g = 12 * gl * gw * gw
    m_l = 12 * ll * lw * lw + (gw // p) * lw + V * lw
    return 6 * (m_g / p + m_l) + 12 * gl * gw * k / p + 12 * ll * lw * p


def bench(args):
    shape = PRESETS[args.preset]
    p, t = shape[0], shape[1]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = MegaByte(*shape).to(dev)
    params = sum(q.numel() for q in model.parameters())
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1.5e-3, betas=(0.9, 0.98), fused=True,
    )
    loss_fn = torch.compile(model.loss) if not args.no_compile else model.loss

    def step():
        x = torch.randint(0, V, (args.batch_size, t), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    secs = time.perf_counter() - start
    bps = args.steps * args.batch_size * t / secs
    fpb = flops_per_byte(*shape)
    tflops = bps * fpb / 1e12
    print(json.dumps({
        "peer": "pytorch", "torch": torch.__version__, "preset": args.preset, "params": params,
        "batch_size": args.batch_size, "context": t, "steps": args.steps,
        "compile": not args.no_compile, "train_bytes_per_sec": bps,
        "train_step_ms": secs * 1e3 / args.steps, "train_tflops": tflops,
        "mfu": tflops / 790.0, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "flops_per_byte": fpb, "final_loss": loss.detach().item(),
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="training speed on random bytes")
    b.add_argument("--preset", default="enwik8", choices=sorted(PRESETS))
    b.add_argument("--batch-size", type=int, default=24)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if args.cmd == "bench":
        bench(args)


if __name__ == "__main__":
    main()
