#!/usr/bin/env python3
"""Independent NumPy reference of the MEGABYTE model (Yu et al., 2023, arXiv 2305.07185, §2),
written from the paper's section 2 (as ARCHITECTURE.md summarises it) and the checkpoint contract, not translated from the Rust
code. It exists to produce golden fixtures that the Rust model must reproduce. The options
(sliding-window attention, cross-patch local attention, RMSNorm, an untied head) follow their
definitions in the config's documentation (crates/megabyte/src/config.rs) and MEGABYTE.md.

Letters: B batch, T bytes per sequence, P patch size, K = T/P patches, D_G per-byte global width
(the global model is P·D_G wide), D_L local width, V = 256 byte values.

Everything is computed in float64. Linear weights are [out, in] and y = x @ W.T; no biases.

Commands:
    python3 tools/reference/megabyte_ref.py fixture --out crates/megabyte/tests/fixtures/golden-tiny-v1.safetensors
    python3 tools/reference/megabyte_ref.py fixture --preset cross-patch \
        --out crates/megabyte/tests/fixtures/golden-cross-patch-v1.safetensors
    python3 tools/reference/megabyte_ref.py fixture --preset recipe \
        --out crates/megabyte/tests/fixtures/golden-recipe-v1.safetensors
    python3 tools/reference/megabyte_ref.py fixture --preset hash-ngrams \
        --out crates/megabyte/tests/fixtures/golden-hash-ngrams-v1.safetensors
    python3 tools/reference/megabyte_ref.py check

Dependencies: Python 3 and NumPy only (the safetensors file is written and read by hand).
"""

import argparse
import json
import math
import os
import struct
import sys
import tempfile
from dataclasses import dataclass, replace

import numpy as np

V = 256
EPS = 1e-5
FIXTURE_FORMAT = "megabyte-golden"
# Per preset: the version in the fixture's metadata and file name (golden-<preset>-v<version>),
# and the seed its weights and input are drawn from.
FIXTURE_VERSION = {"tiny": "1", "cross-patch": "1", "recipe": "1", "hash-ngrams": "1"}
FIXTURE_SEED = {"tiny": 1234, "cross-patch": 2024, "recipe": 2025, "hash-ngrams": 2026}
# Central differences: fourth-order stencil, step CD_STEP (see central_difference).
CD_STEP = 1e-3
CD_ENTRIES = 3


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerCfg:
    width: int
    layers: int
    heads: int
    # Sliding-window attention: each position sees the last `window` positions of this
    # transformer, itself included. None: every earlier position (full causal).
    window: int = None


@dataclass(frozen=True)
class Cfg:
    patch_size: int  # P
    context: int  # T
    glob: TransformerCfg  # width P·D_G
    local: TransformerCfg  # width D_L
    norm: str = "layer_norm"  # or "rms_norm"
    tied_head: bool = True
    # Cross-patch local attention: one local sequence per row of T' bytes (not one per patch),
    # attending through local.window; the local shift and position table run over the row.
    cross_patch: bool = False
    # Initialisation only (the reference draws its own weights); kept for the config record.
    init_std: float = 0.02
    zero_w_gl: bool = False
    patch_embed_std: float = None
    # QK-norm: each head's q and k RMS-normalised over the head dimension and scaled by a gain
    # [head_dim] (`attn.q_norm.weight`, `attn.k_norm.weight`) before the scores.
    qk_norm: bool = False
    # The MLP's activation: "gelu" (exact, erf) or "relu2" (max(x, 0)²).
    mlp: str = "gelu"
    # Hash n-gram embeddings: (sizes, buckets) or None. For each size n = sizes[i], the n bytes
    # ending at byte t (a 257th value, 256, before the sequence) hash to one row of section i
    # of `patch_embedder.hash_embed.weight` and `local_embedder.hash_embed.weight`
    # ([len(sizes)·buckets, D]); the rows' sum joins the byte's embedding in each embedder.
    hash_ngrams: tuple = None

    @property
    def d_global(self):  # D_G
        return self.glob.width // self.patch_size

    @property
    def patches(self):  # K
        return self.context // self.patch_size

    @property
    def local_positions(self):  # rows of the local position table: P, or T across patches
        return self.context if self.cross_patch else self.patch_size

    def to_json(self):
        """The config as the Rust `ModelConfig` reads it (serde field names; optional fields
        left out when unset)."""

        def tf(t):
            d = {"width": t.width, "layers": t.layers, "heads": t.heads}
            if t.window is not None:
                d["window"] = t.window
            return d

        d = {
            "patch_size": self.patch_size,
            "context": self.context,
            "global": tf(self.glob),
            "local": tf(self.local),
            "norm": self.norm,
            "tied_head": self.tied_head,
            "init_std": self.init_std,
        }
        if self.cross_patch:
            d["cross_patch"] = True
        if self.zero_w_gl:
            d["zero_w_gl"] = True
        if self.patch_embed_std is not None:
            d["patch_embed_std"] = self.patch_embed_std
        if self.qk_norm:
            d["qk_norm"] = True
        if self.mlp != "gelu":
            d["mlp"] = self.mlp
        if self.hash_ngrams is not None:
            d["hash_ngrams"] = {"sizes": list(self.hash_ngrams[0]), "buckets": self.hash_ngrams[1]}
        return json.dumps(d, separators=(",", ":"))


PRESETS = {
    # P=8, T=256, global 128 wide (D_G=16) 2 layers 2 heads, local 32 wide 2 layers 2 heads.
    "tiny": Cfg(8, 256, TransformerCfg(128, 2, 2), TransformerCfg(32, 2, 2), "layer_norm", True),
    # Every option at once, small enough for central differences of every tensor: P=4, T=32,
    # global 16 wide (D_G=4) 2 layers 2 heads over a window of 3 patches; local 8 wide 2
    # layers 2 heads, across patches over a window of 6 bytes; RMSNorm; untied head.
    "cross-patch": Cfg(
        4, 32, TransformerCfg(16, 2, 2, window=3), TransformerCfg(8, 2, 2, window=6), "rms_norm", False,
        cross_patch=True, init_std=0.2, zero_w_gl=True, patch_embed_std=1.0,
    ),
    # The cross-patch preset with the model options of the modern training recipe on: QK-norm
    # (q and k gains [head_dim] per block) and the ReLU² MLP.
    "recipe": Cfg(
        4, 32, TransformerCfg(16, 2, 2, window=3), TransformerCfg(8, 2, 2, window=6), "rms_norm", False,
        cross_patch=True, init_std=0.2, zero_w_gl=True, patch_embed_std=1.0, qk_norm=True, mlp="relu2",
    ),
    # Hash n-gram embeddings (sizes 2 and 3, 5 rows each: rows shared by several n-grams) with
    # the recipe's options, on the per-patch local model (n-grams reach into the previous
    # patch); ReLU², so that its derivatives are complex steps.
    "hash-ngrams": Cfg(
        4, 32, TransformerCfg(16, 2, 2, window=3), TransformerCfg(8, 2, 2), "rms_norm", False,
        init_std=0.2, patch_embed_std=1.0, qk_norm=True, mlp="relu2", hash_ngrams=((2, 3), 5),
    ),
}


# --------------------------------------------------------------------------------------------
# Parameters: names and shapes are the checkpoint contract
# --------------------------------------------------------------------------------------------


def transformer_specs(prefix, tc, norm, qk_norm=False):
    """(name, shape, kind) of one transformer; kind is 'normal', 'norm_w' or 'norm_b'."""
    d = tc.width
    out = []

    def norm_specs(name):
        out.append((f"{name}.weight", (d,), "norm_w"))
        if norm == "layer_norm":
            out.append((f"{name}.bias", (d,), "norm_b"))

    for i in range(tc.layers):
        b = f"{prefix}.blocks.{i}"
        norm_specs(f"{b}.attn_norm")
        out.append((f"{b}.attn.qkv.weight", (3 * d, d), "normal"))
        if qk_norm:
            out.append((f"{b}.attn.q_norm.weight", (d // tc.heads,), "norm_w"))
            out.append((f"{b}.attn.k_norm.weight", (d // tc.heads,), "norm_w"))
        out.append((f"{b}.attn.proj.weight", (d, d), "normal"))
        norm_specs(f"{b}.mlp_norm")
        out.append((f"{b}.mlp.up.weight", (4 * d, d), "normal"))
        out.append((f"{b}.mlp.down.weight", (d, 4 * d), "normal"))
    norm_specs(f"{prefix}.norm")
    return out


def param_specs(cfg):
    """Every parameter in a fixed order (the order weights are drawn from the RNG)."""
    p, t, dg, dl = cfg.patch_size, cfg.context, cfg.d_global, cfg.local.width
    specs = [
        ("patch_embedder.byte_embed.weight", (V, dg), "normal"),
        ("patch_embedder.pos_embed.weight", (t, dg), "normal"),
        ("patch_embedder.global_pad", (p * dg,), "normal"),
    ]
    specs += transformer_specs("global", cfg.glob, cfg.norm, cfg.qk_norm)
    specs.append(("global_to_local.weight", (dl, dg), "normal"))
    specs += [
        ("local_embedder.byte_embed.weight", (V, dl), "normal"),
        ("local_embedder.pos_embed.weight", (cfg.local_positions, dl), "normal"),
        ("local_embedder.local_pad", (dl,), "normal"),
    ]
    specs += transformer_specs("local", cfg.local, cfg.norm, cfg.qk_norm)
    if not cfg.tied_head:
        specs.append(("head.weight", (V, dl), "normal"))
    if cfg.hash_ngrams is not None:
        rows = len(cfg.hash_ngrams[0]) * cfg.hash_ngrams[1]
        specs.append(("patch_embedder.hash_embed.weight", (rows, dg), "normal"))
        specs.append(("local_embedder.hash_embed.weight", (rows, dl), "normal"))
    return specs


def random_params(cfg, rng):
    """Weights drawn in param_specs order: normal·0.02 for matrices, embeddings and pads;
    norm weights 1 + 0.1·normal, norm biases 0.1·normal (so they are not trivially 1 and 0).
    Returned as float32 (the checkpoint dtype)."""
    params = {}
    for name, shape, kind in param_specs(cfg):
        z = rng.standard_normal(shape)
        if kind == "normal":
            w = 0.02 * z
        elif kind == "norm_w":
            w = 1.0 + 0.1 * z
        else:
            w = 0.1 * z
        params[name] = w.astype(np.float32)
    return params


def random_params_f64(cfg, rng):
    """Weights for a float64 fixture, drawn in param_specs order: normal·patch_embed_std for
    the patch embedder's tables and pad, normal·init_std for every other matrix, embedding
    and pad (w_GL included: `zero_w_gl` only changes the Rust model's initialisation, and a
    zero w_GL would cut every gradient through the global model), norm weights
    1 + 0.1·normal, norm biases 0.1·normal. Plain (untruncated) normals: any values will do."""
    params = {}
    for name, shape, kind in param_specs(cfg):
        z = rng.standard_normal(shape)
        if kind == "normal":
            std = cfg.patch_embed_std if name.startswith("patch_embedder.") else cfg.init_std
            w = std * z
        elif kind == "norm_w":
            w = 1.0 + 0.1 * z
        else:
            w = 0.1 * z
        params[name] = w
    return params


# --------------------------------------------------------------------------------------------
# Building blocks (float64)
# --------------------------------------------------------------------------------------------

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_erf(x):
    """Exact GELU: x · Φ(x) = x · (1 + erf(x/√2)) / 2."""
    return x * 0.5 * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def linear(x, w):
    """y = x Wᵀ, W [out, in]."""
    return x @ w.T


def norm(x, w, b, kind):
    if kind == "layer_norm":
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)  # biased variance
        return (x - mu) / np.sqrt(var + EPS) * w + b
    if kind == "rms_norm":
        return x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + EPS) * w
    raise ValueError(kind)


def softmax(x):
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    s = x - m
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def attention(x, w_qkv, w_proj, heads, window=None, qk_gains=None):
    """Causal multi-head self-attention. x [N, S, D]; w_qkv [3D, D] with rows 0..D = q,
    D..2D = k, 2D..3D = v; head h uses columns h·hd..(h+1)·hd of each; w_proj [D, D].
    With a window W, query i sees keys i−W+1..=i only. With qk_gains (g_q, g_k), each [hd]
    (QK-norm), every head's q and k are RMS-normalised over hd and scaled by them first."""
    n, s, d = x.shape
    hd = d // heads
    qkv = linear(x, w_qkv)  # [N, S, 3D]
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]

    def split(t):  # [N, S, D] -> [N, H, S, hd]
        return t.reshape(n, s, heads, hd).transpose(0, 2, 1, 3)

    q, k, v = split(q), split(k), split(v)
    if qk_gains is not None:
        q, k = norm(q, qk_gains[0], None, "rms_norm"), norm(k, qk_gains[1], None, "rms_norm")
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)  # [N, H, S, S]
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    hidden = j > i  # the future
    if window is not None:
        hidden |= j <= i - window  # further back than the window
    scores = np.where(hidden, -np.inf, scores)
    y = softmax(scores) @ v  # [N, H, S, hd]
    y = y.transpose(0, 2, 1, 3).reshape(n, s, d)
    return linear(y, w_proj)


def relu2(x):
    """ReLU²: max(x, 0)²."""
    return np.maximum(x, 0.0) ** 2


def mlp(x, w_up, w_down, act="gelu"):
    u = linear(x, w_up)
    return linear(relu2(u) if act == "relu2" else gelu_erf(u), w_down)


def transformer(x, params, prefix, tc, norm_kind, qk_norm=False, act="gelu"):
    """Pre-norm blocks (x + attn(norm(x)); x + mlp(norm(x))) then a final norm. x [N, S, D]."""

    def nrm(name, h):
        return norm(h, params[f"{name}.weight"], params.get(f"{name}.bias"), norm_kind)

    for i in range(tc.layers):
        b = f"{prefix}.blocks.{i}"
        gains = (params[f"{b}.attn.q_norm.weight"], params[f"{b}.attn.k_norm.weight"]) if qk_norm else None
        x = x + attention(
            nrm(f"{b}.attn_norm", x), params[f"{b}.attn.qkv.weight"], params[f"{b}.attn.proj.weight"], tc.heads,
            tc.window, gains,
        )
        x = x + mlp(nrm(f"{b}.mlp_norm", x), params[f"{b}.mlp.up.weight"], params[f"{b}.mlp.down.weight"], act)
    return nrm(f"{prefix}.norm", x)


# --------------------------------------------------------------------------------------------
# MEGABYTE, in the paper's order
# --------------------------------------------------------------------------------------------


HASH_MODULUS = 2**31 - 1


def hash_rows(x, cfg):
    """[B, T', G] table rows of the hash n-grams of bytes x [B, T'], in Python integers: for
    size n = sizes[i] at position t, h starts at n and takes h = (257·h + b + 1) mod (2³¹ − 1)
    for b = x[t], x[t−1], …, x[t−n+1] (256 before the sequence); the row is
    i·buckets + h mod buckets."""
    sizes, buckets = cfg.hash_ngrams
    b, t = x.shape
    out = np.zeros((b, t, len(sizes)), dtype=np.int64)
    for r in range(b):
        row = [int(v) for v in x[r]]
        for pos in range(t):
            for i, n in enumerate(sizes):
                h = n
                for k in range(n):
                    byte = row[pos - k] if pos - k >= 0 else 256
                    h = (257 * h + byte + 1) % HASH_MODULUS
                out[r, pos, i] = i * buckets + h % buckets
    return out


def byte_embedding(table, x, params, cfg, prefix):
    """Rows of `table` at bytes x [B, T'] plus, with hash n-grams, the sum of the rows of
    `{prefix}.hash_embed.weight` at their n-grams: [B, T', D]."""
    e = table[x]
    if cfg.hash_ngrams is not None:
        e = e + params[f"{prefix}.hash_embed.weight"][hash_rows(x, cfg)].sum(axis=2)
    return e


def patch_embedder(x, params, cfg):
    """1. h_embed[t] = E_global_embed[x_t] + E_pos[t]: [B, T'] -> [B, T', D_G], then the K'
    patches concatenated: [B, K', P·D_G]."""
    b, t = x.shape
    h = byte_embedding(params["patch_embedder.byte_embed.weight"], x, params, cfg, "patch_embedder")
    h = h + params["patch_embedder.pos_embed.weight"][:t]
    return h.reshape(b, t // cfg.patch_size, cfg.patch_size * cfg.d_global)


def shift_one_patch(h, global_pad):
    """Global input: patch 0 gets the trainable pad, patch k>0 gets patch k−1; the last patch
    never enters. [B, K, P·D_G] -> [B, K, P·D_G]."""
    b, _, w = h.shape
    pad = np.broadcast_to(global_pad.reshape(1, 1, w), (b, 1, w))
    return np.concatenate([pad, h[:, :-1]], axis=1)


def global_model(h, params, cfg):
    """2. Causal transformer of width P·D_G over the K patches."""
    return transformer(h, params, "global", cfg.glob, cfg.norm, cfg.qk_norm, cfg.mlp)


def local_sequences(x, cfg):
    """The local model's sequences: each patch on its own [B·K', P], or with cross-patch
    attention each row whole [B, T']."""
    b, t = x.shape
    return x if cfg.cross_patch else x.reshape(b * t // cfg.patch_size, cfg.patch_size)


def global_to_local(h, params, cfg):
    """3. Each global output split into P slices of D_G, each projected by the shared w_GL.
    [B, K, P·D_G] -> [B·K, P, D_L], laid out as the local sequences ([B, T', D_L] across
    patches: byte kP+p gets slice p of patch k's output either way)."""
    b, k, _ = h.shape
    out = linear(h.reshape(b * k, cfg.patch_size, cfg.d_global), params["global_to_local.weight"])
    return out.reshape(b, k * cfg.patch_size, -1) if cfg.cross_patch else out


def local_input(x, params, cfg):
    """4. Local embedding of the previous byte of the same local sequence (the local pad at
    its position 0) plus the learned local position table. Within a patch: [B·K', P, D_L];
    across patches the previous byte may be the previous patch's last, and only a row's first
    byte gets the pad: [B, T', D_L]."""
    seq = local_sequences(x, cfg)  # [N, S]
    # each byte's embedding (with its n-grams, hashed over the whole row) laid out as seq
    e = byte_embedding(params["local_embedder.byte_embed.weight"], x, params, cfg, "local_embedder")
    e = e.reshape(seq.shape[0], seq.shape[1], -1)  # [N, S, D_L]
    pad = params["local_embedder.local_pad"]
    prev = np.concatenate([np.broadcast_to(pad, (e.shape[0], 1, e.shape[2])), e[:, :-1]], axis=1)
    return prev + params["local_embedder.pos_embed.weight"][None, : seq.shape[1], :]


def local_model(h, params, cfg):
    """5. Causal transformer of width D_L over each local sequence independently (each patch,
    or each row through the local window)."""
    return transformer(h, params, "local", cfg.local, cfg.norm, cfg.qk_norm, cfg.mlp)


def head(h, params, cfg):
    """6. logits = h · E_local_embedᵀ (tied) or h · W_headᵀ (untied). [.., D_L] -> [.., V]."""
    w = params["local_embedder.byte_embed.weight"] if cfg.tied_head else params["head.weight"]
    return linear(h, w)


def logits(x, params, cfg):
    """x: bytes [B, T'] (T' ≤ T, a multiple of P) -> logits [B, T', V] in float64;
    logits[:, t] predicts byte t from bytes < t."""
    x = np.asarray(x, dtype=np.int64)
    b, t = x.shape
    assert t % cfg.patch_size == 0 and 0 < t <= cfg.context
    # float64, or complex128 for complex-step derivatives (see complex_step)
    params = {k: np.asarray(v, dtype=np.result_type(v, np.float64)) for k, v in params.items()}
    h = patch_embedder(x, params, cfg)
    h = shift_one_patch(h, params["patch_embedder.global_pad"])
    h = global_model(h, params, cfg)
    h = global_to_local(h, params, cfg) + local_input(x, params, cfg)
    h = local_model(h, params, cfg)
    return head(h, params, cfg).reshape(b, t, V)


def byte_losses(x, lg):
    """Cross-entropy (nats) of every byte given the bytes before it: targets are x itself."""
    lp = log_softmax(lg)
    return -np.take_along_axis(lp, np.asarray(x, dtype=np.int64)[..., None], axis=-1)[..., 0]


def loss(x, lg):
    return float(byte_losses(x, lg).mean())


# --------------------------------------------------------------------------------------------
# safetensors, by hand
# --------------------------------------------------------------------------------------------

_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "U32": np.dtype("<u4"), "U8": np.dtype("u1")}
_ALIGN = {"F64": 8, "F32": 4, "U32": 4, "U8": 1}


def write_safetensors(path, tensors, metadata):
    """tensors: list of (name, dtype tag, array). Layout: u64 LE header length, JSON header
    (space-padded to a multiple of 8 so the data starts 8-aligned), then the raw LE data in
    header order, contiguous. Tensors are placed widest-alignment first."""
    order = sorted(range(len(tensors)), key=lambda i: -_ALIGN[tensors[i][1]])  # stable
    header = {"__metadata__": dict(metadata)}
    blobs, offset = [], 0
    for i in order:
        name, tag, arr = tensors[i]
        data = np.ascontiguousarray(arr, dtype=_DTYPES[tag]).tobytes()
        header[name] = {"dtype": tag, "shape": list(np.shape(arr)), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * (-(8 + len(hj)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path):
    """Returns (metadata, {name: array}); checks that the data regions tile the buffer."""
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8 : 8 + n].decode("utf-8"))
    data = buf[8 + n :]
    meta = header.pop("__metadata__", {})
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items())
    pos = 0
    for s, e, k in spans:
        if s != pos:
            raise ValueError(f"{k}: data starts at {s}, expected {pos}")
        pos = e
    if pos != len(data):
        raise ValueError(f"data is {len(data)} bytes, tensors cover {pos}")
    out = {}
    for k, v in header.items():
        s, e = v["data_offsets"]
        dt = _DTYPES[v["dtype"]]
        shape = tuple(v["shape"])
        if (e - s) != dt.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{k}: size does not match shape {shape}")
        out[k] = np.frombuffer(data[s:e], dtype=dt).reshape(shape)
    return meta, out


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def make_fixture(preset, seed):
    """The `tiny` fixture (version 1): float32 weights, logits and loss."""
    cfg = PRESETS[preset]
    rng = np.random.default_rng(seed=seed)
    params = random_params(cfg, rng)  # float32: the model is computed from these exact values
    x = rng.integers(0, 256, size=(2, cfg.context), dtype=np.uint32)  # uniform over 0..=255
    lg = logits(x, params, cfg)
    ls = loss(x, lg)
    return cfg, params, x, lg, ls


def central_difference(f, w, i, h=CD_STEP):
    """d f / d w.flat[i] by the fourth-order central stencil
    (8·(f(w+h) − f(w−h)) − (f(w+2h) − f(w−2h))) / 12h, restoring w afterwards. Its truncation
    error is O(h⁴) (about 1e-14 at h = 1e-3 here) and its round-off about ulp(f)/h (1e-12);
    a second-order stencil would need h ≈ 1e-5 for the same truncation and lose 100× to
    round-off."""
    flat = w.reshape(-1)  # a view: the model reads the change
    w0 = flat[i]
    values = []
    for d in (h, -h, 2 * h, -2 * h):
        flat[i] = w0 + d
        values.append(f())
    flat[i] = w0
    return (8.0 * (values[0] - values[1]) - (values[2] - values[3])) / (12.0 * h)


def complex_step(x, params, cfg, name, i, h=1e-30):
    """d loss / d params[name].flat[i] by the complex step Im L(w + ih) / h (Squire & Trapp
    1998): the loss evaluated once in complex arithmetic, with no difference of two values,
    so no round-off beyond the loss's own (relative ~1e-15) and a truncation of O(h²), zero
    in double precision at h = 1e-30. It needs every op to extend analytically to complex
    inputs: matmuls, exp, log and sqrt do; max(x, 0) keeps the branch of the real part, so
    ReLU² = max(x, 0)² is differentiated exactly even where central differences straddle its
    kink (its second derivative jumps at 0, and a stencil that crosses it is off by far more
    than the tolerance). The erf of GELU has no complex version here: ReLU² models only."""
    assert cfg.mlp == "relu2", "complex steps need the ReLU² MLP (math.erf is real only)"
    shifted = dict(params)
    w = params[name].astype(np.complex128)
    w.reshape(-1)[i] += 1j * h
    shifted[name] = w
    return float(byte_losses(x, logits(x, shifted, cfg)).mean().imag / h)


def probe_entries(name, shape, cfg, x, rng):
    """CD_ENTRIES flat indices of parameter `name` whose gradient is not structurally zero:
    byte-table rows of bytes that feed the model (not a row's last patch for the global table,
    not its last byte for the local one; the same for hash n-gram rows), global positions
    before the last patch, and one of each of q, k and v for a fused qkv weight."""
    p, t = cfg.patch_size, x.shape[1]
    cols = shape[-1]
    if name == "patch_embedder.byte_embed.weight":
        rows = rng.choice(x[:, : t - p].reshape(-1), CD_ENTRIES)
    elif name == "local_embedder.byte_embed.weight":
        fed = x[:, : t - 1] if cfg.cross_patch else x.reshape(-1, p)[:, : p - 1]
        rows = rng.choice(fed.reshape(-1), CD_ENTRIES)
    elif name == "patch_embedder.hash_embed.weight":  # rows of n-grams ending before the last patch
        rows = rng.choice(hash_rows(x, cfg)[:, : t - p].reshape(-1), CD_ENTRIES)
    elif name == "local_embedder.hash_embed.weight":  # rows of n-grams of bytes that feed the model
        ids = hash_rows(x, cfg)
        fed = ids[:, : t - 1] if cfg.cross_patch else ids.reshape(-1, p, ids.shape[-1])[:, : p - 1]
        rows = rng.choice(fed.reshape(-1), CD_ENTRIES)
    elif name == "patch_embedder.pos_embed.weight":
        rows = rng.integers(0, t - p, CD_ENTRIES)
    elif name.endswith(".attn.qkv.weight"):
        d = cols
        rows = [part * d + int(rng.integers(0, d)) for part in range(3)]
    else:
        return [int(i) for i in rng.integers(0, int(np.prod(shape)), CD_ENTRIES)]
    return [int(r) * cols + int(rng.integers(0, cols)) for r in rows]


def make_gradient_fixture(preset, seed):
    """A float64 fixture: weights, input, logits, loss, and central differences of the loss
    at CD_ENTRIES entries of every weight tensor. Returns (cfg, params, x, logits, loss,
    {name: (indices, gradients)})."""
    cfg = PRESETS[preset]
    rng = np.random.default_rng(seed=seed)
    params = random_params_f64(cfg, rng)
    x = rng.integers(0, 256, size=(2, cfg.context), dtype=np.uint32)  # uniform over 0..=255
    lg = logits(x, params, cfg)
    ls = loss(x, lg)

    def f():
        return loss(x, logits(x, params, cfg))

    grads = {}
    for name, shape, _ in param_specs(cfg):
        idx = probe_entries(name, shape, cfg, x, rng)
        if cfg.mlp == "relu2":
            g = [complex_step(x, params, cfg, name, i) for i in idx]
        else:
            g = [central_difference(f, params[name], i) for i in idx]
        grads[name] = (np.array(idx, dtype=np.uint32), np.array(g))
    return cfg, params, x, lg, ls, grads


def derivative_key(cfg):
    """The fixture's name for its derivatives: complex steps (ReLU² models) or central
    differences."""
    return "complex_step" if cfg.mlp == "relu2" else "central_difference"


def fixture_metadata(preset, seed, cfg):
    meta = {"format": FIXTURE_FORMAT, "version": FIXTURE_VERSION[preset], "preset": preset, "seed": str(seed)}
    if preset != "tiny":  # version 1 of `tiny` predates these fields
        meta["config"] = cfg.to_json()
        if derivative_key(cfg) == "complex_step":
            meta["complex_step"] = "Im L(w + ih) / h, h = 1e-30"
        else:
            meta["central_difference"] = f"fourth-order stencil, h = {CD_STEP}"
    return meta


def cmd_fixture(args):
    seed = FIXTURE_SEED[args.preset] if args.seed is None else args.seed
    if args.preset == "tiny":
        cfg, params, x, lg, ls = make_fixture(args.preset, seed)
        tensors = [(k, "F32", v) for k, v in params.items()]
        tensors += [("input.bytes", "U32", x), ("output.logits", "F32", lg), ("output.loss", "F64", np.float64(ls))]
    else:
        cfg, params, x, lg, ls, grads = make_gradient_fixture(args.preset, seed)
        tensors = [(k, "F64", v) for k, v in params.items()]
        tensors += [("input.bytes", "U32", x), ("output.logits", "F64", lg), ("output.loss", "F64", np.float64(ls))]
        key = derivative_key(cfg)
        for name, (idx, g) in grads.items():
            tensors += [(f"{key}.index.{name}", "U32", idx), (f"{key}.grad.{name}", "F64", g)]
    write_safetensors(args.out, tensors, fixture_metadata(args.preset, seed, cfg))
    nparams = sum(v.size for v in params.values())
    print(f"wrote {args.out}: {os.path.getsize(args.out)} bytes, {len(params)} weight tensors, {nparams} parameters")
    print(f"input {x.shape} uint32, logits {lg.shape}, |logits| max {np.abs(lg).max():.6f}")
    print(f"loss {ls!r} nats/byte ({ls / math.log(2):.6f} bpb; ln 256 = {math.log(256):.6f})")
    if args.preset != "tiny":
        g = np.concatenate([g for _, g in grads.values()])
        print(f"{derivative_key(cfg)}: {g.size} entries of {len(grads)} tensors, |grad| from {np.abs(g).min():.2e} to {np.abs(g).max():.2e}")


def check_complex_steps(preset, cfg, params, x, grads, report):
    """The complex steps `grads` against central differences where the stencil is smooth (its
    values at h, h/2 and h/4 agree within 1e-9·|g| + 3e-12 and twice that; where they do not,
    it straddles a kink of ReLU², or QK-norm's eps curves the loss on its scale): they agree
    with the one at h/4 within four times that bound (its round-off, four times h's) at every
    such probe,
    the smooth probes are many, and every tensor is probed where its gradient is not tiny."""

    def f():
        return loss(x, logits(x, params, cfg))

    worst, smooth, total, smallest = 0.0, 0, 0, np.inf
    for name, (idx, g) in grads.items():
        for i, g0 in zip(idx, g):
            total += 1
            smallest = min(smallest, abs(g0))
            cd = [central_difference(f, params[name], int(i), CD_STEP / 2**j) for j in range(3)]  # h, h/2, h/4
            bound = 1e-9 * abs(cd[0]) + 3e-12
            if abs(cd[1] - cd[0]) <= bound and abs(cd[2] - cd[1]) <= 2 * bound:
                smooth += 1
                worst = max(worst, abs(g0 - cd[2]) / (4 * bound))
    report(f"{preset}: complex steps equal the smooth central differences", worst <= 1.0 and smooth >= total // 3,
           f"{smooth} of {total} probes smooth, worst |CS - CD(h/4)| = {worst:.2f} of 4·(1e-9·|g| + 3e-12)")
    report(f"{preset}: complex steps cover every tensor", set(grads) == set(k for k, _, _ in param_specs(cfg))
           and smallest > 1e-5, f"{len(grads)} tensors, smallest |grad| {smallest:.1e}")


def cmd_check(args):
    ok = True

    def report(name, passed, detail=""):
        nonlocal ok
        ok &= bool(passed)
        print(f"[{'ok' if passed else 'FAIL'}] {name}{': ' + detail if detail else ''}")

    cfg, params, x, lg, ls = make_fixture("tiny", 1234)
    p, t = cfg.patch_size, cfg.context

    # (a) causality: perturbing byte t leaves logits at positions <= t unchanged, and changes
    # position t+1 (through the local model inside a patch, the global model across a boundary).
    def causal(cfg, params, x, lg, positions):
        worst_before, min_after = 0.0, np.inf
        for pos in positions:
            y = x.copy()
            y[:, pos] = (y[:, pos] + 1 + 97) % 256
            lg2 = logits(y, params, cfg)
            worst_before = max(worst_before, float(np.abs(lg2[:, : pos + 1] - lg[:, : pos + 1]).max()))
            if pos + 1 < x.shape[1]:
                min_after = min(min_after, float(np.abs(lg2[:, pos + 1] - lg[:, pos + 1]).max()))
        return worst_before, min_after

    positions = [0, 3, p - 2, p - 1, p, p + 1, 5 * p - 1, 5 * p, t - p - 1, t - p, t - 2, t - 1]
    before, after = causal(cfg, params, x, lg, positions)
    report(
        "causality (tiny)",
        before == 0.0 and after > 1e-6,
        f"bytes {positions}: max change at <= t {before:.1e}, min change at t+1 {after:.1e}",
    )

    # Byte 0 is predicted from the pads only: identical logits for every sequence.
    d0 = float(np.abs(lg[0, 0] - lg[1, 0]).max())
    report("byte 0 from pads only", d0 == 0.0, f"max |logits[0,0] - logits[1,0]| = {d0:.1e}")

    # A prefix (T' < T, a multiple of P) gives the same logits as the full sequence.
    lp = logits(x[:, : 3 * p], params, cfg)
    dp = float(np.abs(lp - lg[:, : 3 * p]).max())
    report("prefix T'=3P matches full forward", dp < 1e-12, f"max diff {dp:.1e}")

    # The config options: RMSNorm and an untied head, causality on a smaller shape.
    small = Cfg(4, 32, TransformerCfg(32, 2, 2), TransformerCfg(16, 1, 2), "rms_norm", False)
    sp = random_params(small, np.random.default_rng(7))
    sx = np.random.default_rng(8).integers(0, 256, size=(2, small.context), dtype=np.uint32)
    slg = logits(sx, sp, small)
    before, after = causal(small, sp, sx, slg, range(small.context))
    report("causality (rms_norm, untied head, every byte)", before == 0.0 and after > 1e-6,
           f"max change at <= t {before:.1e}, min change at t+1 {after:.1e}")

    # Loss sanity: near ln 256 for a small random init.
    report("loss near ln 256", abs(ls - math.log(256)) < 0.5, f"{ls:.6f} vs {math.log(256):.6f}")

    # GELU spot values (x·Φ(x)).
    g = gelu_erf(np.array([-1.0, 0.0, 1.0, 2.0]))
    want = np.array([-0.15865525393145707, 0.0, 0.8413447460685429, 1.9544997361036416])
    report("gelu_erf spot values", np.abs(g - want).max() < 1e-15)

    # (b) the hand-written safetensors file reads back.

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "golden.safetensors")
        cmd_fixture(argparse.Namespace(preset="tiny", seed=1234, out=path))
        meta, got = read_safetensors(path)
        want_meta = {"format": FIXTURE_FORMAT, "version": FIXTURE_VERSION["tiny"], "preset": "tiny", "seed": "1234"}
        report("metadata", meta == want_meta, json.dumps(meta))
        names = set(k for k, _, _ in param_specs(cfg))
        report("weight names = contract", set(got) - {"input.bytes", "output.logits", "output.loss"} == names,
               f"{len(names)} weights")
        same = all(np.array_equal(got[k], params[k]) and got[k].dtype == np.float32 for k in names)
        report("weights round-trip (F32, bit-exact)", same)
        report("input round-trip (U32)", got["input.bytes"].dtype == np.uint32 and np.array_equal(got["input.bytes"], x))
        report("logits round-trip (F32)", np.array_equal(got["output.logits"], lg.astype(np.float32)))
        report("loss round-trip (F64 scalar)", got["output.loss"].shape == () and float(got["output.loss"]) == ls,
               repr(float(got["output.loss"])))
        # Recompute from what the file holds: the fixture is self-consistent.
        lg3 = logits(got["input.bytes"], got, cfg)
        d3 = float(np.abs(lg3 - lg).max())
        report("recomputed from file", d3 == 0.0 and loss(got["input.bytes"], lg3) == ls, f"max diff {d3:.1e}")

    # (c) the cross-patch preset: every option at once (global and local windows, cross-patch
    # local attention, RMSNorm, untied head).
    cfg, params, x, lg, ls, grads = make_gradient_fixture("cross-patch", FIXTURE_SEED["cross-patch"])
    p, t = cfg.patch_size, cfg.context
    before, after = causal(cfg, params, x, lg, range(t))
    report("causality (cross-patch, every byte)", before == 0.0 and after > 1e-6,
           f"max change at <= t {before:.1e}, min change at t+1 {after:.1e}")
    d0 = float(np.abs(lg[0, 0] - lg[1, 0]).max())
    report("cross-patch: byte 0 from pads only", d0 == 0.0, f"max |logits[0,0] - logits[1,0]| = {d0:.1e}")
    for n in (p, 3 * p, 5 * p):
        dp = float(np.abs(logits(x[:, :n], params, cfg) - lg[:, :n]).max())
        report(f"cross-patch: prefix T'={n // p}P matches full forward", dp < 1e-12, f"max diff {dp:.1e}")

    # The local window's reach, without the global model (w_GL = 0): byte j is the input at
    # position j + 1 and each of L layers looks W − 1 positions back, so byte j changes
    # exactly positions j + 1 ..= j + 1 + L·(W − 1), across patch boundaries.
    local_only = dict(params, **{"global_to_local.weight": np.zeros_like(params["global_to_local.weight"])})
    base = logits(x, local_only, cfg)
    reach = cfg.local.layers * (cfg.local.window - 1) + 1
    exact = True
    for j in range(t - 1):
        y = x.copy()
        y[:, j] = (y[:, j] + 1 + 97) % 256
        moved = np.abs(logits(y, local_only, cfg) - base).max(axis=(0, 2)) > 0  # [T]
        exact &= bool(np.array_equal(np.flatnonzero(moved), np.arange(j + 1, min(j + reach, t - 1) + 1)))
    report("cross-patch: local window reach (w_GL = 0)", exact, f"byte j reaches positions j+1..=j+{reach}")

    # The global window, with the local model's reach cut to its shift (local window 1, the
    # same weights): byte j moves position j + 1 (the next local input) and, entering global
    # position k + 1 (k = j // P, the patch shift), global positions k + 1 ..= k + 1 + L·(W − 1),
    # that is the logits of those patches, and nothing else.
    short = replace(cfg, local=replace(cfg.local, window=1))
    base = logits(x, params, short)
    span = cfg.glob.layers * (cfg.glob.window - 1)
    exact = True
    for j in range(t - 1):
        y = x.copy()
        y[:, j] = (y[:, j] + 1 + 97) % 256
        moved = np.abs(logits(y, params, short) - base).max(axis=(0, 2)) > 0  # [T]
        k = j // p
        want = np.zeros(t, dtype=bool)
        want[j + 1] = True
        want[(k + 1) * p : (k + 2 + span) * p] = True
        exact &= bool(np.array_equal(moved, want))
    report("cross-patch: global window reach (local window 1)", exact,
           f"byte j of patch k reaches patches k+1..=k+{1 + span} and byte j+1")

    # Every weight is nonzero (w_GL included: zero_w_gl changes only the Rust initialisation).
    zero = [k for k, v in params.items() if np.any(v == 0)]
    report("cross-patch: every weight nonzero", not zero, ", ".join(zero))

    # Central differences: halving the step moves them by less than 1e-9 (relative) + 3e-12
    # (truncation at h, about 1e-11 for w_GL, plus round-off, about 1e-12 at h and twice that
    # at h/2); every tensor probed, no gradient vanishing.
    def f():
        return loss(x, logits(x, params, cfg))

    spread, smallest = 0.0, np.inf
    for name, (idx, g) in grads.items():
        for i, g0 in zip(idx, g):
            d = abs(central_difference(f, params[name], int(i), CD_STEP / 2) - g0)
            spread = max(spread, d / (1e-9 * abs(g0) + 3e-12))
            smallest = min(smallest, abs(g0))
    report("central differences stable in h", spread <= 1.0,
           f"worst |D(h/2) - D(h)| = {spread:.2f} of 1e-9·|g| + 3e-12")
    report("central differences cover every tensor", set(grads) == set(k for k, _, _ in param_specs(cfg))
           and smallest > 1e-5, f"{len(grads)} tensors, smallest |grad| {smallest:.1e}")

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "golden.safetensors")
        cmd_fixture(argparse.Namespace(preset="cross-patch", seed=None, out=path))
        meta, got = read_safetensors(path)
        report("cross-patch metadata", meta == fixture_metadata("cross-patch", FIXTURE_SEED["cross-patch"], cfg),
               json.dumps(meta))
        report("cross-patch config JSON", json.loads(meta["config"])["cross_patch"] is True
               and json.loads(meta["config"])["local"]["window"] == cfg.local.window, meta["config"])
        same = all(np.array_equal(got[k], params[k]) and got[k].dtype == np.float64 for k in params)
        report("cross-patch weights round-trip (F64, bit-exact)", same)
        lg3 = logits(got["input.bytes"], {k: got[k] for k in params}, cfg)
        report("cross-patch recomputed from file", np.array_equal(lg3, lg) and np.array_equal(got["output.logits"], lg)
               and float(got["output.loss"]) == ls)
        same = all(np.array_equal(got[f"central_difference.index.{k}"], i)
                   and np.array_equal(got[f"central_difference.grad.{k}"], g) for k, (i, g) in grads.items())
        report("cross-patch central differences round-trip", same)

    # (d) the recipe preset: the cross-patch preset with QK-norm and ReLU².
    cfg, params, x, lg, ls, grads = make_gradient_fixture("recipe", FIXTURE_SEED["recipe"])
    before, after = causal(cfg, params, x, lg, range(cfg.context))
    report("causality (recipe, every byte)", before == 0.0 and after > 1e-6,
           f"max change at <= t {before:.1e}, min change at t+1 {after:.1e}")
    for n in (cfg.patch_size, 3 * cfg.patch_size):
        dp = float(np.abs(logits(x[:, :n], params, cfg) - lg[:, :n]).max())
        report(f"recipe: prefix T'={n // cfg.patch_size}P matches full forward", dp < 1e-12, f"max diff {dp:.1e}")
    # QK-norm: scaling a block's q and k rows of w_qkv changes the logits only through the
    # norm's eps (far less than a gain does), and its q gain matters.
    scaled = dict(params)
    w = params["local.blocks.0.attn.qkv.weight"].copy()
    d = cfg.local.width
    w[:d] *= 3.0
    w[d : 2 * d] *= 0.25
    scaled["local.blocks.0.attn.qkv.weight"] = w
    dq = float(np.abs(logits(x, scaled, cfg) - lg).max())
    gained = dict(params, **{"local.blocks.0.attn.q_norm.weight": params["local.blocks.0.attn.q_norm.weight"] * 2.0})
    dg = float(np.abs(logits(x, gained, cfg) - lg).max())
    report("recipe: q and k scale-free up to eps, gains not", dq < 1e-2 * dg and dg > 1e-3,
           f"scaled q, k: {dq:.1e}; doubled gain: {dg:.1e}")
    report("recipe: relu2 spot values", np.array_equal(relu2(np.array([-1.5, 0.0, 0.5, 2.0])), np.array([0.0, 0.0, 0.25, 4.0])))

    check_complex_steps("recipe", cfg, params, x, grads, report)
    with tempfile.TemporaryDirectory() as dname:
        path = os.path.join(dname, "golden.safetensors")
        cmd_fixture(argparse.Namespace(preset="recipe", seed=None, out=path))
        meta, got = read_safetensors(path)
        conf = json.loads(meta["config"])
        report("recipe config JSON", conf["qk_norm"] is True and conf["mlp"] == "relu2", meta["config"])
        lg3 = logits(got["input.bytes"], {k: got[k] for k in params}, cfg)
        report("recipe recomputed from file", np.array_equal(lg3, lg) and float(got["output.loss"]) == ls)

    # (e) the hash-ngrams preset: every byte causal, hashes spot-checked, the tables used.
    cfg, params, x, lg, ls, grads = make_gradient_fixture("hash-ngrams", FIXTURE_SEED["hash-ngrams"])
    before, after = causal(cfg, params, x, lg, range(cfg.context))
    report("causality (hash-ngrams, every byte)", before == 0.0 and after > 1e-6,
           f"max change at <= t {before:.1e}, min change at t+1 {after:.1e}")
    # h(n=2; bytes 5 then 7 at t) = ((257·(257·2 + 7 + 1) + 5 + 1) mod M) mod 5, section 0
    h = (257 * (257 * 2 + 7 + 1) + 5 + 1) % HASH_MODULUS
    got = hash_rows(np.array([[5, 7]]), cfg)[0, 1, 0]
    first = hash_rows(np.array([[5, 7]]), cfg)[0, 0, 1]  # n = 3 at t = 0: 5, then 256 twice
    h3 = 3
    for byte in (5, 256, 256):
        h3 = (257 * h3 + byte + 1) % HASH_MODULUS
    report("hash-ngrams: rows spot values", got == h % 5 and first == 5 + h3 % 5, f"{got}, {first}")
    no_tables = dict(params, **{k: np.zeros_like(v) for k, v in params.items() if "hash_embed" in k})
    dt = float(np.abs(logits(x, no_tables, cfg) - lg).max())
    report("hash-ngrams: the tables change the logits", dt > 1e-3, f"{dt:.1e}")
    check_complex_steps("hash-ngrams", cfg, params, x, grads, report)
    with tempfile.TemporaryDirectory() as dname:
        path = os.path.join(dname, "golden.safetensors")
        cmd_fixture(argparse.Namespace(preset="hash-ngrams", seed=None, out=path))
        meta, got = read_safetensors(path)
        report("hash-ngrams config JSON", json.loads(meta["config"])["hash_ngrams"] == {"sizes": [2, 3], "buckets": 5},
               meta["config"])
        lg3 = logits(got["input.bytes"], {k: got[k] for k in params}, cfg)
        report("hash-ngrams recomputed from file", np.array_equal(lg3, lg) and float(got["output.loss"]) == ls)

    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixture", help="write the golden fixture")
    f.add_argument("--out", required=True)
    f.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    f.add_argument("--seed", type=int, default=None, help="default: the preset's (FIXTURE_SEED)")
    sub.add_parser("check", help="self-checks: causality, safetensors round-trip")
    args = ap.parse_args(argv)
    if args.cmd == "fixture":
        cmd_fixture(args)
        return 0
    return cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
