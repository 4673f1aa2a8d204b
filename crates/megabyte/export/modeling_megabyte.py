"""MEGABYTE (Yu et al., 2023, arXiv 2305.07185) in plain PyTorch, as `megabyte export` writes it.

A self-contained file: it needs torch and safetensors only, and computes the logits the Rust
`megabyte` model computes (within float rounding). Put it beside the exported config.json and
model.safetensors:

    import sys; sys.path.insert(0, "hf_dir")
    from modeling_megabyte import MegabyteForCausalLM
    model = MegabyteForCausalLM.from_pretrained("hf_dir")
    logits = model(torch.tensor([list(b"Hello, w")]))        # [1, 8, 256]
    print(model.generate(b"Hello", 64, temperature=0.8, top_k=40, seed=0))

After fine-tuning, `model.save_pretrained("tuned")` writes the same layout, and
`megabyte import tuned --out ckpt` turns it back into a checkpoint for `megabyte eval`,
`generate` and `serve`.

Letters: B batch, T bytes per sequence (`context`), P patch size, K = T/P patches, D_G per-byte
global width (the global model is P*D_G wide), D_L local width, V = 256 byte values.

The forward pass, in the paper's order (logits for byte t depend only on bytes < t):

    bytes [B, T]
     |- patch embedder: E_global[x] + E_pos[t], P bytes to a patch        [B, K, P*D_G]
     |  shift one patch (global_pad in front, the last patch dropped)     [B, K, P*D_G]
     |  global transformer (causal over K; sliding window if set)         [B, K, P*D_G]
     |  global_to_local on every D_G slice                                [B*K, P, D_L]
     |- local embedder: E_local[x] shifted one byte (local_pad in front)
     |  plus the local position table, added to the above
     local transformer (causal over P; cross_patch: over T, with its window)
     head: h E_local^T (tied_head) or head.weight                         [B, T, V]

Every transformer is pre-norm (LayerNorm with bias, or RMSNorm; eps 1e-5): x + attn(norm(x)),
then x + down(act(up(norm(x)))) with exact (erf) GELU or (mlp "relu2") relu(x)^2, no biases
in linear layers, and a final norm. Attention heads are contiguous in the stacked qkv weight
[3D, D] (q, k, v). With qk_norm, each head's q and k are RMS-normalised over the head
dimension (eps 1e-5) and scaled by the gains q_norm.weight and k_norm.weight before the scores.

Tensors of model.safetensors (D: the width of the transformer, P*D_G global, D_L local; linear
weights are [out, in]):

    patch_embedder.byte_embed.weight         [256, D_G]   E_global_embed
    patch_embedder.pos_embed.weight          [T, D_G]     E_pos (byte positions)
    patch_embedder.global_pad                [P*D_G]      the global model's first input
    {global,local}.blocks.{i}.attn_norm.weight / .bias    [D]   (bias: layer_norm only)
    {global,local}.blocks.{i}.attn.qkv.weight             [3D, D]
    {global,local}.blocks.{i}.attn.{q,k}_norm.weight      [D/heads]  (qk_norm only)
    {global,local}.blocks.{i}.attn.proj.weight            [D, D]
    {global,local}.blocks.{i}.mlp_norm.weight / .bias     [D]
    {global,local}.blocks.{i}.mlp.up.weight               [4D, D]
    {global,local}.blocks.{i}.mlp.down.weight             [D, 4D]
    {global,local}.norm.weight / .bias                    [D]   final norm
    global_to_local.weight                   [D_L, D_G]   w_GL
    local_embedder.byte_embed.weight         [256, D_L]   E_local_embed (the tied head)
    local_embedder.pos_embed.weight          [P, D_L]     ([T, D_L] with cross_patch)
    local_embedder.local_pad                 [D_L]        the local model's first input
    {patch,local}_embedder.hash_embed.weight [G*buckets, D_G or D_L]  hash n-gram rows (hash_ngrams only)
    head.weight                              [256, D_L]   tied_head false only
"""

import json
import math
import os
import shutil

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

MODEL_TYPE = "megabyte"
FORMAT_KEY = "megabyte_format"
FORMAT = 1
V = 256
NORM_EPS = 1e-5
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class Norm(nn.Module):
    """LayerNorm (weight and bias) or RMSNorm (weight only) over the last dimension."""

    def __init__(self, d, kind):
        super().__init__()
        if kind not in ("layer_norm", "rms_norm"):
            raise ValueError(f"norm must be layer_norm or rms_norm, got {kind!r}")
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if kind == "layer_norm" else None

    def forward(self, x):
        if self.bias is not None:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, NORM_EPS)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * self.weight


def causal_mask(s, window, device):
    """[S, S] booleans: position i sees positions j <= i, and with a window only j > i - window."""
    i = torch.arange(s, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    keep = j <= i
    if window is not None:
        keep = keep & (j > i - window)
    return keep


class Attention(nn.Module):
    def __init__(self, d, heads, window, qk_norm=False):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        # QK-norm: RMSNorm over each head's dimension, one gain for q and one for k.
        self.q_norm = Norm(d // heads, "rms_norm") if qk_norm else None
        self.k_norm = Norm(d // heads, "rms_norm") if qk_norm else None
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        n, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.reshape(n, s, self.heads, d // self.heads) for t in (q, k, v))  # [N, S, H, hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [N, H, S, hd]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(s, self.window, x.device))
        return self.proj(y.transpose(1, 2).reshape(n, s, d))


class Mlp(nn.Module):
    def __init__(self, d, act="gelu"):
        super().__init__()
        if act not in ("gelu", "relu2"):
            raise ValueError(f"mlp must be gelu or relu2, got {act!r}")
        self.act = act
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        u = self.up(x)
        return self.down(F.relu(u).square() if self.act == "relu2" else F.gelu(u))  # GELU: exact (erf)


class Block(nn.Module):
    def __init__(self, d, heads, window, norm, dropout, qk_norm=False, mlp="gelu"):
        super().__init__()
        self.attn_norm = Norm(d, norm)
        self.attn = Attention(d, heads, window, qk_norm)
        self.mlp_norm = Norm(d, norm)
        self.mlp = Mlp(d, mlp)
        self.drop = nn.Dropout(dropout)  # on each branch's output; identity in eval()

    def forward(self, x):
        x = x + self.drop(self.attn(self.attn_norm(x)))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """Pre-norm causal blocks and a final norm."""

    def __init__(self, cfg, norm, dropout, qk_norm=False, mlp="gelu"):
        super().__init__()
        d, heads, window = cfg["width"], cfg["heads"], cfg.get("window")
        self.blocks = nn.ModuleList(Block(d, heads, window, norm, dropout, qk_norm, mlp) for _ in range(cfg["layers"]))
        self.norm = Norm(d, norm)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


HASH_MODULUS = (1 << 31) - 1


def hash_ngram_rows(x, sizes, buckets):
    """Hash n-gram rows [B, T, G] of bytes x [B, T] (hash_ngrams): for size n = sizes[i] at
    position t, h = n, then h = (257 h + b + 1) mod (2^31 - 1) over the bytes from t back to
    t - n + 1 (256 for bytes before the sequence), row i*buckets + h mod buckets. Exact in
    int64 (every value stays below 2^40)."""
    rows = []
    for i, n in enumerate(sizes):
        h = torch.full_like(x, n)
        for k in range(n):
            b = F.pad(x[:, : x.shape[1] - k], (k, 0), value=256) if k else x
            h = (257 * h + b + 1) % HASH_MODULUS
        rows.append(i * buckets + h % buckets)
    return torch.stack(rows, dim=-1)


class PatchEmbedder(nn.Module):
    """Byte embeddings (plus their hash n-grams' rows) plus byte positions, concatenated into
    patches (paper 2.2.1)."""

    def __init__(self, t, p, dg, hash_rows=0):
        super().__init__()
        self.byte_embed = nn.Embedding(V, dg)
        self.pos_embed = nn.Embedding(t, dg)
        self.global_pad = nn.Parameter(torch.zeros(p * dg))
        self.hash_embed = nn.Embedding(hash_rows, dg) if hash_rows else None

    def forward(self, x, p, ngrams=None):
        b, t = x.shape
        h = self.byte_embed(x) + self.pos_embed.weight[:t]  # [B, T, D_G]
        if self.hash_embed is not None:
            h = h + self.hash_embed(ngrams).sum(-2)
        return h.reshape(b, t // p, -1)  # [B, K, P*D_G]


def shift_one_patch(h, pad):
    """Patch k's global input is patch k-1's embedding; patch 0 gets the pad. [B, K, W] -> [B, K, W]."""
    return torch.cat([pad.expand(h.shape[0], 1, -1), h[:, :-1]], dim=1)


def shift_one_byte(e, pad):
    """Position j's local input is byte j-1's embedding; position 0 gets the pad. [N, S, D] -> [N, S, D]."""
    return torch.cat([pad.expand(e.shape[0], 1, -1), e[:, :-1]], dim=1)


class LocalEmbedder(nn.Module):
    """The local model's byte embedding, position table and pad (paper 2.2.3)."""

    def __init__(self, positions, dl, hash_rows=0):
        super().__init__()
        self.byte_embed = nn.Embedding(V, dl)
        self.pos_embed = nn.Embedding(positions, dl)
        self.local_pad = nn.Parameter(torch.zeros(dl))
        self.hash_embed = nn.Embedding(hash_rows, dl) if hash_rows else None

    def forward(self, x, ngrams=None):
        e = self.byte_embed(x)
        if self.hash_embed is not None:
            e = e + self.hash_embed(ngrams).sum(-2)  # the previous byte's n-grams travel with it
        e = shift_one_byte(e, self.local_pad)  # [N, S, D_L]
        return e + self.pos_embed.weight[: x.shape[1]]


class MegabyteForCausalLM(nn.Module):
    """MEGABYTE over the 256 byte values. `config` is the dict of an export's config.json."""

    def __init__(self, config, dropout=0.0):
        super().__init__()
        check_config(config)
        self.config = dict(config)
        c = self.config
        p, t, dl = c["patch_size"], c["context"], c["local"]["width"]
        dg = c["global"]["width"] // p
        hashes = c.get("hash_ngrams")
        hash_rows = len(hashes["sizes"]) * hashes["buckets"] if hashes else 0
        self.patch_embedder = PatchEmbedder(t, p, dg, hash_rows)
        qk_norm, mlp = bool(c.get("qk_norm")), c.get("mlp") or "gelu"
        self.add_module("global", Transformer(c["global"], c["norm"], dropout, qk_norm, mlp))  # `global` is a keyword
        self.global_to_local = nn.Linear(dg, dl, bias=False)
        self.local_embedder = LocalEmbedder(t if c.get("cross_patch") else p, dl, hash_rows)
        self.local = Transformer(c["local"], c["norm"], dropout, qk_norm, mlp)
        self.head = None if c["tied_head"] else nn.Linear(dl, V, bias=False)
        self._init_weights()

    @property
    def global_model(self):
        return self._modules["global"]

    def _init_weights(self):
        """Truncated normal (2 sigma) at init_std, as a fresh megabyte model starts (the patch
        embedder at patch_embed_std, w_GL at init_std/sqrt(D_G) or zero, the attention output
        and MLP down projections at zero with zero_init_proj); norms at 1 and 0."""
        c = self.config
        std = c["init_std"]
        pe_std = c.get("patch_embed_std") or std
        for name, w in self.named_parameters():
            if "norm." in name:
                continue
            s = pe_std if name.startswith("patch_embedder.") else std
            if name == "global_to_local.weight":
                s = 0.0 if c.get("zero_w_gl") else std / math.sqrt(w.shape[1])
            if c.get("zero_init_proj") and name.endswith((".attn.proj.weight", ".mlp.down.weight")):
                s = 0.0
            with torch.no_grad():
                if s == 0.0:
                    w.zero_()
                else:
                    nn.init.trunc_normal_(w, std=s, a=-2 * s, b=2 * s)

    @classmethod
    def from_pretrained(cls, path, map_location="cpu", dropout=0.0):
        """The model of a folder written by `megabyte export` or `save_pretrained`."""
        with open(os.path.join(path, CONFIG_FILE)) as f:
            config = json.load(f)
        model = cls(config, dropout=dropout)
        state = load_file(os.path.join(path, WEIGHTS_FILE), device=str(map_location))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.to(map_location).eval()

    def save_pretrained(self, path):
        """Writes config.json, model.safetensors (as the parameters are stored) and this file,
        the layout `megabyte import` reads."""
        os.makedirs(path, exist_ok=True)
        config = dict(self.config, torch_dtype=str(next(self.parameters()).dtype).replace("torch.", ""))
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
        here = os.path.abspath(__file__)
        target = os.path.join(os.path.abspath(path), os.path.basename(here))
        if os.path.isfile(here) and here != target:
            shutil.copyfile(here, target)

    def forward(self, x):
        """Logits [B, T', 256] for bytes x [B, T'] (integers 0..255; 0 < T' <= T):
        logits[:, t] predicts byte t from the bytes before it. A T' that is not a multiple of P
        is padded to the next one and the logits cut back (the model is causal, so the padding
        changes nothing before it)."""
        c = self.config
        p, t_max, dl = c["patch_size"], c["context"], c["local"]["width"]
        if x.dim() != 2 or x.shape[1] == 0 or x.shape[1] > t_max:
            raise ValueError(f"bytes must be [B, T'] with 0 < T' <= {t_max}, got {tuple(x.shape)}")
        if x.shape[1] % p:
            t = x.shape[1]
            return self(F.pad(x.long(), (0, -t % p)))[:, :t]
        x = x.long()
        b, t = x.shape
        k = t // p
        hashes = c.get("hash_ngrams")
        ngrams = hash_ngram_rows(x, hashes["sizes"], hashes["buckets"]) if hashes else None  # [B, T, G]
        h = self.patch_embedder(x, p, ngrams)  # [B, K, P*D_G]
        h = shift_one_patch(h, self.patch_embedder.global_pad)
        h = self.global_model(h)  # [B, K, P*D_G]
        context = self.global_to_local(h.reshape(b * k, p, -1))  # [B*K, P, D_L]
        local_bytes = x if c.get("cross_patch") else x.reshape(b * k, p)  # [N, S]
        n, s = local_bytes.shape
        local_ngrams = None if ngrams is None else ngrams.reshape(n, s, -1)  # [N, S, G]
        h = self.local(context.reshape(n, s, dl) + self.local_embedder(local_bytes, local_ngrams))  # [N, S, D_L]
        head = self.local_embedder.byte_embed.weight if self.head is None else self.head.weight
        return F.linear(h, head).reshape(b, t, V)

    def byte_losses(self, x):
        """Cross-entropy (nats) of every byte of x [B, T'] given the bytes before it: [B, T']."""
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, V).float(), x.long().reshape(-1), reduction="none").reshape(x.shape)

    def loss(self, x):
        """The mean loss in nats per byte (the training loss; / ln 2 for bits per byte)."""
        return self.byte_losses(x).mean()

    @torch.no_grad()
    def generate(self, prompt, n, temperature=1.0, top_k=None, top_p=None, seed=None):
        """`n` bytes after `prompt` (bytes), one full forward pass per byte. temperature 0 is
        greedy; top_k and top_p restrict the choice as in `megabyte generate`. Past T bytes the
        window keeps its last half (patch-aligned), as megabyte's decoder does."""
        c = self.config
        p, t_max = c["patch_size"], c["context"]
        keep = t_max // 2 // p * p
        device = next(self.parameters()).device
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        history, start, out = list(bytes(prompt)), 0, []
        for _ in range(n):
            if len(history) - start >= t_max:
                start = len(history) - (len(history) - start) % p - keep
            window = history[start:]
            length = (len(window) // p + 1) * p  # room for the next position, a multiple of P
            x = torch.tensor([window + [0] * (length - len(window))], device=device)
            logits = self(x)[0, len(window)].float()
            byte = sample(logits, temperature, top_k, top_p, gen)
            history.append(byte)
            out.append(byte)
        return bytes(out)


def sample(logits, temperature, top_k, top_p, gen):
    """One byte from logits [256]: greedy at temperature 0, else softmax(logits / temperature)
    over the top_k bytes and the smallest set whose probability reaches top_p."""
    if not temperature:
        return int(logits.argmax())
    probs, order = torch.sort(torch.softmax(logits / temperature, dim=-1), descending=True)
    if top_k:
        probs, order = probs[:top_k], order[:top_k]
    if top_p is not None and top_p < 1.0:
        cum = torch.cumsum(probs / probs.sum(), dim=0)
        n = int((cum < top_p).sum()) + 1
        probs, order = probs[:n], order[:n]
    return int(order[torch.multinomial(probs / probs.sum(), 1, generator=gen)])


def check_config(config):
    """A clear error for a config that is not a megabyte export's."""
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}")
    if config.get(FORMAT_KEY) != FORMAT:
        raise ValueError(f"{FORMAT_KEY} is {config.get(FORMAT_KEY)!r}; this file reads format {FORMAT}")
    for key in ("patch_size", "context", "global", "local", "norm", "tied_head", "init_std"):
        if key not in config:
            raise ValueError(f"config has no {key!r}")
    if config.get("cross_patch") and not config["local"].get("window"):
        raise ValueError("cross_patch needs local.window")
