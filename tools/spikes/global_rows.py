#!/usr/bin/env python3
"""Where a MEGABYTE checkpoint's global model is sensitive to its input, row by row.

benchmarks/spike-proxy/README.md uses it on the CPU proxy's checkpoints
(scripts/spike-proxy.sh). For windows of a data file it runs the global model in float64
with tools/reference's NumPy pieces and reports, for each patch row: the spread (standard
deviation) of the residual stream before the global model's final norm, and the row's own
sensitivity, |Δ output row| / |Δ input row| for a small random change of its input. Rows
whose residual nearly cancels have a small spread, and the final norm then multiplies every
change of them: those are where gradient spikes come from.

    python3 tools/spikes/global_rows.py CHECKPOINT_DIR DATA_FILE [--windows N] [--start BYTE]

With --start, that one window in detail: every row's sensitivity and its residual's spread
after each block's attention and MLP, and each head's median attention entropy. Otherwise N
random windows (default 200): the median over windows of each window's median row
sensitivity, and the five windows with the most sensitive row.
"""
import argparse, json, math, os, sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
import megabyte_ref as R  # noqa: E402


class Global:
    def __init__(self, ckpt):
        c = json.load(open(os.path.join(ckpt, "config.json")))
        g = c["global"]
        self.heads, self.layers, self.window, self.norm_kind = g["heads"], g["layers"], g.get("window"), c["norm"]
        self.cfg = R.Cfg(c["patch_size"], c["context"], R.TransformerCfg(g["width"], g["layers"], g["heads"]),
                         R.TransformerCfg(c["local"]["width"], c["local"]["layers"], c["local"]["heads"]), c["norm"])
        _, p = R.read_safetensors(os.path.join(ckpt, "model.safetensors"))
        self.p = {k: v.astype(np.float64) for k, v in p.items()}

    def nrm(self, name, h):
        return R.norm(h, self.p[f"{name}.weight"], self.p.get(f"{name}.bias"), self.norm_kind)

    def input_rows(self, x):
        """The global model's input for one window of bytes: [K, P·D_G]."""
        h = R.patch_embedder(x[None], self.p, self.cfg)
        return R.shift_one_patch(h, self.p["patch_embedder.global_pad"])[0]

    def attention(self, a, b, entropies):
        """R.attention for one sequence [K, D], with the global model's sliding window, noting
        each head's median attention entropy (the first row, which sees only itself, left out)."""
        k, d = a.shape
        hd = d // self.heads
        qkv = R.linear(a, self.p[b + "attn.qkv.weight"])
        seen = np.tril(np.ones((k, k), dtype=bool))
        if self.window:
            seen &= ~np.tril(np.ones((k, k), dtype=bool), -self.window)
        out = np.zeros((k, d))
        for j in range(self.heads):
            s = slice(j * hd, (j + 1) * hd)
            w = R.softmax(np.where(seen, qkv[:, s] @ qkv[:, d:][:, s].T / math.sqrt(hd), -np.inf))
            if entropies is not None:
                entropies.append(float(np.median(-(w * np.log(w + 1e-30)).sum(-1)[1:])))
            out[:, s] = w @ qkv[:, 2 * d :][:, s]
        return R.linear(out, self.p[b + "attn.proj.weight"])

    def run(self, h, trace=None):
        """The final norm's output for input rows h [K, D]; with `trace` (a list), appends
        each block's (attention entropies, residual spread after attention, after MLP)."""
        for i in range(self.layers):
            b = f"global.blocks.{i}."
            ent = [] if trace is not None else None
            h = h + self.attention(self.nrm(b + "attn_norm", h), b, ent)
            after_attn = h.std(-1)
            h = h + R.mlp(self.nrm(b + "mlp_norm", h), self.p[b + "mlp.up.weight"], self.p[b + "mlp.down.weight"])
            if trace is not None:
                trace.append((ent, after_attn, h.std(-1)))
        return self.nrm("global.norm", h)

    def sensitivity(self, h0, rng):
        """Each row's |Δ output row| / |Δ input row| for a random change of size 1e-4."""
        y0 = self.run(h0)
        out = []
        for r in range(len(h0)):
            dv = rng.standard_normal(h0.shape[1])
            h = h0.copy()
            h[r] += dv * 1e-4 / np.linalg.norm(dv)
            out.append(np.linalg.norm(self.run(h)[r] - y0[r]) / 1e-4)
        return np.array(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("data")
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--start", type=int)
    args = ap.parse_args()
    g = Global(args.checkpoint)
    t, p = g.cfg.context, g.cfg.patch_size
    data = np.fromfile(args.data, dtype=np.uint8)
    rng = np.random.default_rng(0)
    window = lambda s: data[s : s + t].astype(np.int64)
    r2 = lambda v: np.round(v, 2).tolist()
    if args.start is not None:
        if not 0 <= args.start <= len(data) - t:
            sys.exit(f"--start must lie in 0..={len(data) - t} (the file has {len(data)} bytes, a window {t})")
        h0 = g.input_rows(window(args.start))
        trace = []
        g.run(h0, trace)
        print("input spread, by row:", np.round(h0.std(-1), 3).tolist())
        for i, (ent, attn, mlp) in enumerate(trace):
            print(f"block {i}: median attention entropy by head (nats) {[round(e, 3) for e in ent]}")
            print(f"  residual spread after attention, by row: {r2(attn)}")
            print(f"  residual spread after the MLP, by row: {r2(mlp)}")
        print("own-row sensitivity, by row:", np.round(g.sensitivity(h0, rng), 1).tolist())
        return
    found = []
    for _ in range(args.windows):
        s = int(rng.integers(0, len(data) - t))
        h0 = g.input_rows(window(s))
        trace = []
        g.run(h0, trace)
        spread, sens = trace[-1][2], g.sensitivity(h0, rng)
        r = int(sens.argmax())
        found.append((sens[r], s, r, spread[r], float(np.median(sens)), float(np.median(spread))))
    found.sort(reverse=True)
    print(f"{args.windows} windows; the median over windows of each window's median own-row sensitivity: "
          f"{np.median([f[4] for f in found]):.2f}")
    for sens, s, r, spread, med_sens, med_spread in found[:5]:
        text = bytes(data[s + (r - 1) * p : s + r * p]).decode("latin-1") if r > 0 else "(pad)"
        print(f"start {s}: row {r} sensitivity {sens:.1f} (window median {med_sens:.2f}), residual spread {spread:.2f} "
              f"(median {med_spread:.2f}); its patch {text!r}")


if __name__ == "__main__":
    main()
