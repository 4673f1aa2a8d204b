#!/usr/bin/env python3
"""Where a MEGABYTE checkpoint's global model is sensitive to its input, row by row.

RESULTS.md ("MEGABYTE's training can spike") uses it on the CPU proxy's checkpoints
(scripts/spike-proxy.sh). For windows of a data file it runs the global model (in float64,
NumPy only, reading the checkpoint with tools/reference's safetensors reader) and reports,
for each patch row: the spread (standard deviation) of the residual stream before the
global model's final norm, and the row's own sensitivity, |Δ output row| / |Δ input row| for
a small random change of its input. Rows whose residual nearly cancels have a small spread,
and the final norm then multiplies every change of them: those are where gradient spikes
come from.

    python3 tools/spikes/global_rows.py CHECKPOINT_DIR DATA_FILE [--windows N] [--start BYTE]

With --start, that one window in detail (every row, and each block's and head's median
attention entropy); otherwise N random windows (default 200): the median over windows of
each window's median row sensitivity, and the five windows with the most sensitive row.
LayerNorm models (the `layer_norm` norm) only.
"""
import argparse, json, math, os, sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
import megabyte_ref as R  # noqa: E402

EPS = 1e-5


def ln(v, w, b):
    mu = v.mean(-1, keepdims=True)
    var = ((v - mu) ** 2).mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + EPS) * w + b


_erf = np.vectorize(math.erf)


def gelu(u):
    return u * 0.5 * (1 + _erf(u / math.sqrt(2)))


class Global:
    def __init__(self, ckpt):
        self.cfg = json.load(open(os.path.join(ckpt, "config.json")))
        if self.cfg.get("norm", "layer_norm") != "layer_norm":
            sys.exit("layer_norm models only")
        _, p = R.read_safetensors(os.path.join(ckpt, "model.safetensors"))
        self.p = {k: v.astype(np.float64) for k, v in p.items()}
        g = self.cfg["global"]
        self.heads, self.layers, self.window = g["heads"], g["layers"], g.get("window")
        self.P, self.T = self.cfg["patch_size"], self.cfg["context"]

    def input_rows(self, x):
        p = self.p
        h = (p["patch_embedder.byte_embed.weight"][x] + p["patch_embedder.pos_embed.weight"][: len(x)])
        h = h.reshape(len(x) // self.P, -1)
        return np.concatenate([p["patch_embedder.global_pad"][None], h[:-1]], 0)

    def run(self, h, entropies=None):
        """(the final norm's output, the residual before it) for input rows h [K, D]."""
        p = self.p
        k, d = h.shape
        hd = d // self.heads
        mask = np.tril(np.ones((k, k))) > 0
        if self.window:
            mask &= ~np.tril(np.ones((k, k)), -self.window).astype(bool)
        for i in range(self.layers):
            b = f"global.blocks.{i}."
            a = ln(h, p[b + "attn_norm.weight"], p[b + "attn_norm.bias"])
            qkv = a @ p[b + "attn.qkv.weight"].T
            out = np.zeros((k, d))
            for j in range(self.heads):
                s = slice(j * hd, (j + 1) * hd)
                sc = qkv[:, s] @ qkv[:, d:][:, s].T / math.sqrt(hd)
                sc = np.where(mask, sc, -np.inf)
                w = np.exp(sc - sc.max(-1, keepdims=True))
                w /= w.sum(-1, keepdims=True)
                if entropies is not None:
                    entropies.append((i, j, float(np.median(-(w * np.log(w + 1e-30)).sum(-1)[1:]))))
                out[:, s] = w @ qkv[:, 2 * d :][:, s]
            h = h + out @ p[b + "attn.proj.weight"].T
            m = ln(h, p[b + "mlp_norm.weight"], p[b + "mlp_norm.bias"])
            h = h + gelu(m @ p[b + "mlp.up.weight"].T) @ p[b + "mlp.down.weight"].T
        return ln(h, p["global.norm.weight"], p["global.norm.bias"]), h

    def rows(self, x, rng):
        h0 = self.input_rows(x)
        y0, res = self.run(h0)
        spread = res.std(-1)
        sens = []
        for r in range(len(h0)):
            dv = rng.standard_normal(h0.shape[1])
            dv *= 1e-4 / np.linalg.norm(dv)
            h = h0.copy()
            h[r] += dv
            sens.append(np.linalg.norm(self.run(h)[0][r] - y0[r]) / 1e-4)
        return spread, np.array(sens)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("data")
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--start", type=int)
    args = ap.parse_args()
    g = Global(args.checkpoint)
    data = np.fromfile(args.data, dtype=np.uint8)
    rng = np.random.default_rng(0)
    window = lambda s: data[s : s + g.T].astype(np.int64)
    if args.start is not None:
        if not 0 <= args.start <= len(data) - g.T:
            sys.exit(f"--start must lie in 0..={len(data) - g.T} (the file has {len(data)} bytes, a window {g.T})")
        spread, sens = g.rows(window(args.start), rng)
        ent = []
        g.run(g.input_rows(window(args.start)), ent)
        print("residual spread before the final norm, by row:", np.round(spread, 2).tolist())
        print("own-row sensitivity, by row:", np.round(sens, 1).tolist())
        print("median attention entropy (block, head, nats):", [(i, j, round(e, 3)) for i, j, e in ent])
        return
    found = []
    for _ in range(args.windows):
        s = int(rng.integers(0, len(data) - g.T))
        spread, sens = g.rows(window(s), rng)
        r = int(sens.argmax())
        found.append((sens[r], s, r, spread[r], float(np.median(sens)), float(np.median(spread))))
    found.sort(reverse=True)
    print(f"{args.windows} windows; the median over windows of each window's median own-row sensitivity: "
          f"{np.median([f[4] for f in found]):.2f}")
    for sens, s, r, spread, med_sens, med_spread in found[:5]:
        text = bytes(data[s + (r - 1) * g.P : s + r * g.P]).decode("latin-1") if r > 0 else "(pad)"
        print(f"start {s}: row {r} sensitivity {sens:.1f} (window median {med_sens:.2f}), residual spread {spread:.2f} "
              f"(median {med_spread:.2f}); its patch {text!r}")


if __name__ == "__main__":
    main()
