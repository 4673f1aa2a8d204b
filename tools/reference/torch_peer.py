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
bytes/s, achieved TFLOP/s, MFU against 790 TFLOP/s, peak memory, and KV-cached greedy generation
bytes/s at each --gen-batch) as one JSON line. Generation decodes as `crates/megabyte/src/generate.rs`
does: one global step per patch (the first feeds the global pad), one local step per byte, the
local cache restarting at every patch; bf16 weights, eager, the sampled bytes staying on the GPU.

    python3 tools/reference/torch_peer.py bench --preset enwik8 --batch-size 24 --steps 20
    python3 tools/reference/torch_peer.py gen --preset paper-pg19 --gen-bytes 8192 --gen-batch 1,16
    python3 tools/reference/torch_peer.py check --preset tiny --device cpu   # cached == full logits
"""

import argparse
import copy
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

    def forward_step(self, x, cache, pos):
        """x [N, s, D]: positions pos..pos+s−1, written into cache = (k, v), each [N, H, S_max, hd]."""
        n, s, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(d, dim=2)
        split = lambda t: t.view(n, s, self.heads, d // self.heads).transpose(1, 2)  # [N, H, s, hd]
        kc, vc = cache
        kc[:, :, pos:pos + s] = split(k)
        vc[:, :, pos:pos + s] = split(v)
        # One new position attends every cached one and itself: no mask. Several (a prefill)
        # need the causal mask shifted by the cached length.
        mask = None if s == 1 else torch.ones(s, pos + s, dtype=torch.bool, device=x.device).tril(pos)
        y = F.scaled_dot_product_attention(split(q), kc[:, :, :pos + s], vc[:, :, :pos + s], attn_mask=mask)
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

    def new_cache(self, n, s_max):
        """Preallocated (k, v) per layer, [N, H, S_max, hd]; positions are overwritten, never concatenated."""
        w = self.norm.weight
        h = self.blocks[0].heads
        shape = (n, h, s_max, w.numel() // h)
        return [(w.new_empty(shape), w.new_empty(shape)) for _ in self.blocks]

    def forward_step(self, x, cache, pos):
        for b, c in zip(self.blocks, cache):
            x = b.forward_step(x, c, pos)
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

    # Cached decoding (paper section 3), as model.rs's global_step and local_step.

    def global_step(self, b, patch, cache, k):
        """Global position k: the pad (k = 0, patch None) or patch k−1's bytes [B, P].
        Returns the local contexts of patch k, [B, P, D_L]."""
        if k == 0:
            h = self.global_pad.expand(b, 1, -1)  # [B, 1, P·D_G]
        else:
            pos = self.pos_embed[(k - 1) * self.p:k * self.p]  # [P, D_G]
            h = (self.byte_embed[patch] + pos).reshape(b, 1, self.p * self.dg)
        h = self.global_model.forward_step(h, cache, k)  # [B, 1, P·D_G]
        return self.global_to_local(h.view(-1, self.p, self.dg))  # [B, P, D_L]

    def local_step(self, ctx, prev, cache, pos):
        """Local position pos of a patch: ctx [B, D_L], prev [B] the previous byte (None at 0,
        which gets the pad). Returns logits [B, V]."""
        e = self.local_pad if prev is None else self.local_byte_embed[prev]  # [D_L] or [B, D_L]
        x = (ctx + e + self.local_pos_embed[pos]).unsqueeze(1)  # [B, 1, D_L]
        h = self.local_model.forward_step(x, cache, pos)  # [B, 1, D_L]
        return h.squeeze(1) @ self.local_byte_embed.t()


def flops_per_byte(p, t, gw, gl, gh, lw, ll, lh):
    """6·(m_G/P + m_L) + attention (PaLM convention), exactly as config.rs."""
    k = t // p
    m_g = 12 * gl * gw * gw
    m_l = 12 * ll * lw * lw + (gw // p) * lw + V * lw
    return 6 * (m_g / p + m_l) + 12 * gl * gw * k / p + 12 * ll * lw * p


@torch.inference_mode()
def generate(model, batch, n_bytes, force=None, keep_logits=False):
    """Greedy decoding of n_bytes from an empty prompt with both KV caches, in the model's own
    dtype and device. Returns bytes [B, n] (and logits [B, n, V] with keep_logits). `force`
    [B, n] feeds given bytes instead of the argmax (to check against the full forward).

    n_bytes ≤ T: the window never slides. After a completed patch the global model steps at
    once, as the Rust decoder does, except after the T-th byte, where there is no position left
    (there `megabyte` would slide the window and prefill again)."""
    p, kmax = model.p, model.t // model.p
    assert 0 < n_bytes <= model.t, f"generate: {n_bytes} bytes do not fit the context of {model.t}"
    dev = model.local_pad.device
    gcache = model.global_model.new_cache(batch, kmax)
    lcache = model.local_model.new_cache(batch, p)  # reused by every patch: positions restart at 0
    out = torch.empty(batch, n_bytes, dtype=torch.long, device=dev)
    kept = []
    ctx = model.global_step(batch, None, gcache, 0)  # the pad; [B, P, D_L]
    for i in range(n_bytes):
        pos = i % p
        logits = model.local_step(ctx[:, pos], None if pos == 0 else out[:, i - 1], lcache, pos)
        # argmax on the device: no host round trip per byte.
        out[:, i] = logits.argmax(-1) if force is None else force[:, i]
        if keep_logits:
            kept.append(logits)
        if pos == p - 1 and (i + 1) // p < kmax:
            ctx = model.global_step(batch, out[:, i + 1 - p:i + 1], gcache, (i + 1) // p)
    return (out, torch.stack(kept, 1)) if keep_logits else out


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def gen_bench(model, args, dev):
    """Generation bytes/s at each --gen-batch, as `megabyte bench` measures it: one untimed
    run of 2·P bytes, then --gen-bytes bytes timed between device synchronisations."""
    if args.gen_bytes <= 0:
        return []
    if args.gen_bytes > model.t:
        raise SystemExit(f"--gen-bytes {args.gen_bytes}: at most the context, {model.t} bytes, without sliding")
    # bf16 weights (model.to), not autocast: `megabyte bench` also converts the parameters to the
    # activations' dtype, and in this launch-bound loop autocast's per-op casts only add time.
    # Plain eager: no torch.compile here (a fresh compile per shape, cache writes in place).
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.gen_dtype]
    gm = copy.deepcopy(model).to(dtype).eval()
    runs = []
    for b in (int(x) for x in args.gen_batch.split(",")):
        generate(gm, b, 2 * gm.p)
        sync(dev)
        start = time.perf_counter()
        generate(gm, b, args.gen_bytes)
        sync(dev)
        secs = time.perf_counter() - start
        runs.append({"batch": b, "bytes": args.gen_bytes, "bytes_per_sec": b * args.gen_bytes / secs, "secs": secs})
    del gm
    return runs


def bench(args):
    shape = PRESETS[args.preset]
    p, t = shape[0], shape[1]
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = MegaByte(*shape).to(dev)
    params = sum(q.numel() for q in model.parameters())
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1.5e-3, betas=(0.9, 0.98), fused=dev.type == "cuda",
    )
    loss_fn = torch.compile(model.loss) if not args.no_compile else model.loss

    def step():
        x = torch.randint(0, V, (args.batch_size, t), device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
            loss = loss_fn(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    cuda = dev.type == "cuda"
    for _ in range(args.warmup):
        step()
    sync(dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(dev)
    secs = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None  # training's, before generation
    generation = gen_bench(model, args, dev)
    bps = args.steps * args.batch_size * t / secs
    fpb = flops_per_byte(*shape)
    tflops = bps * fpb / 1e12
    print(json.dumps({
        "peer": "pytorch", "torch": torch.__version__, "preset": args.preset, "params": params,
        "batch_size": args.batch_size, "context": t, "steps": args.steps,
        "compile": not args.no_compile, "autocast": args.autocast, "train_bytes_per_sec": bps,
        "train_step_ms": secs * 1e3 / args.steps, "train_tflops": tflops,
        "mfu": tflops / 790.0, "peak_memory_gib": peak,
        "flops_per_byte": fpb, "final_loss": loss.detach().item(), "generation": generation,
    }))


def gen(args):
    """Only the generation measurement, on a freshly initialised model."""
    shape = PRESETS[args.preset]
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = MegaByte(*shape).to(dev)
    print(json.dumps({
        "peer": "pytorch", "torch": torch.__version__, "preset": args.preset,
        "params": sum(q.numel() for q in model.parameters()), "context": shape[1],
        "gen_dtype": args.gen_dtype, "generation": gen_bench(model, args, dev),
    }))


@torch.inference_mode()
def check(args):
    """The cached decoder's logits against the full forward's on the same bytes (fp32), and
    greedy generation against the argmax of the full forward on its own output."""
    shape = PRESETS[args.preset]
    p, t = shape[0], shape[1]
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = MegaByte(*shape, std=0.2).to(dev).eval()  # larger weights: logits far from zero
    n = min(args.steps, t)
    k = -(-n // p) * p  # the full forward takes whole patches
    x = torch.randint(0, V, (args.batch, k), device=dev)
    _, cached = generate(model, args.batch, n, force=x, keep_logits=True)
    full = model.logits(x)[:, :n]
    err = (cached - full).abs().max().item()
    scale = full.abs().max().item()
    out = generate(model, args.batch, n)
    pad = torch.zeros(args.batch, k - n, dtype=torch.long, device=dev)
    same = bool((model.logits(torch.cat([out, pad], 1))[:, :n].argmax(-1) == out).all())
    ok = err <= 1e-5 * max(1.0, scale) and same
    print(json.dumps({"preset": args.preset, "bytes": n, "batch": args.batch, "max_abs_err": err,
                      "max_abs_logit": scale, "greedy_matches_full": same, "ok": ok}))
    if not ok:
        raise SystemExit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="training speed on random bytes")
    b.add_argument("--preset", default="enwik8", choices=sorted(PRESETS))
    b.add_argument("--batch-size", type=int, default=24)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--no-compile", action="store_true")
    b.add_argument("--autocast", default="bf16", choices=["bf16", "off"],
                   help="bf16 autocast of the training step (off: fp32 throughout, the faster on most CPUs)")
    g = sub.add_parser("gen", help="KV-cached greedy generation speed only")
    g.add_argument("--preset", default="enwik8", choices=sorted(PRESETS))
    for q in (b, g):
        q.add_argument("--device", default="cuda")
        q.add_argument("--gen-bytes", type=int, default=512, help="bytes per generation run (≤ T; 0 skips)")
        q.add_argument("--gen-batch", default="1,16", help="batch sizes, comma-separated")
        q.add_argument("--gen-dtype", default="bf16", choices=["bf16", "fp32"])
    c = sub.add_parser("check", help="cached decoding against the full forward (fp32)")
    c.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    c.add_argument("--device", default="cpu")
    c.add_argument("--batch", type=int, default=3)
    c.add_argument("--steps", type=int, default=20, help="bytes decoded (capped at T)")
    args = ap.parse_args()
    {"bench": bench, "gen": gen, "check": check}[args.cmd](args)


if __name__ == "__main__":
    main()
