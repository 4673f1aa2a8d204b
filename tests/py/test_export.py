"""`megabyte export` loads in PyTorch and computes the Rust model's logits; a model trained
further in PyTorch comes back through `megabyte import` with PyTorch's loss.

Needs CPU PyTorch, safetensors, NumPy and pytest, and the `megabyte` binary: $MEGABYTE_BIN, or
target/release/megabyte of this repository.
"""

import ast
import importlib.util
import json
import math
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("MEGABYTE_BIN", str(ROOT / "target" / "release" / "megabyte"))
if not os.path.isabs(BIN):
    BIN = str(ROOT / BIN)


def small(**changes):
    """P = 4, T = 32: a shape that trains in a fraction of a second."""
    cfg = {
        "patch_size": 4,
        "context": 32,
        "global": {"width": 16, "layers": 2, "heads": 2},
        "local": {"width": 8, "layers": 2, "heads": 2},
        "norm": "layer_norm",
        "tied_head": True,
        "init_std": 0.2,
    }
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


# Every configuration the Rust model supports: each option alone, then all of them together.
CONFIGS = {
    "plain": small(),
    "rms_norm": small(norm="rms_norm"),
    "untied": small(tied_head=False),
    "global_window": small(**{"global": {"window": 3}}),
    "local_window": small(local={"window": 2}),
    "cross_patch": small(cross_patch=True, local={"window": 6}),
    "everything": small(
        norm="rms_norm",
        tied_head=False,
        cross_patch=True,
        zero_w_gl=True,
        patch_embed_std=1.0,
        **{"global": {"window": 3, "heads": 4}, "local": {"window": 10, "layers": 3}},
    ),
    "qk_norm": small(qk_norm=True),
    "relu2": small(mlp="relu2"),
    "recipe": small(
        norm="rms_norm",
        tied_head=False,
        cross_patch=True,
        qk_norm=True,
        mlp="relu2",
        zero_init_proj=True,
        **{"global": {"window": 3, "heads": 4}, "local": {"window": 10, "layers": 3}},
    ),
    "hash_ngrams": small(hash_ngrams={"sizes": [2, 3], "buckets": 7}),
    "cross_patch_hash_ngrams": small(cross_patch=True, local={"window": 6}, hash_ngrams={"sizes": [3, 5], "buckets": 11}),
    "byte_transformer": {
        "patch_size": 1,
        "context": 32,
        "global": {"width": 16, "layers": 2, "heads": 2},
        "local": {"width": 16, "layers": 0, "heads": 2},
        "norm": "layer_norm",
        "tied_head": True,
        "init_std": 0.2,
    },
    "tiny": "tiny",  # the preset: P = 8, T = 256
}


def megabyte(*args):
    """Runs the binary; returns its stdout, or fails the test with its stderr."""
    out = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, f"megabyte {' '.join(map(str, args))} failed:\n{out.stderr}"
    return out.stdout


def megabyte_fails(*args):
    out = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    assert out.returncode != 0, f"megabyte {' '.join(map(str, args))} should fail"
    return out.stderr


def load_module(folder):
    """The exported modeling_megabyte.py of `folder`, imported from that file alone."""
    path = Path(folder) / "modeling_megabyte.py"
    spec = importlib.util.spec_from_file_location(f"modeling_megabyte_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_bytes(n, seed):
    rng = random.Random(seed)
    return bytes(rng.randrange(256) for _ in range(n))


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    # Text-like training bytes so two steps move every weight.
    (base / "train.bin").write_bytes((b"the quick brown fox jumps over the lazy dog. " * 500) + random_bytes(5000, 1))
    return base


@pytest.fixture(scope="session")
def exported(work):
    """name -> (run folder, export folder, config dict): trained 2 steps, then exported."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg = CONFIGS[name]
            run, hf = work / f"run-{name}", work / f"hf-{name}"
            if cfg == "tiny":
                model_args = ["--preset", "tiny"]
            else:
                (work / f"{name}.json").write_text(json.dumps(cfg))
                model_args = ["--config", work / f"{name}.json"]
            megabyte("train", *model_args, "--data", work / "train.bin", "--out", run, "--steps", 2, "--lr", 0.01,
                     "--warmup", 1, "--batch-size", 4, "--sample-bytes", 0, "--eval-bytes", 1000)
            megabyte("export", "--checkpoint", run, "--out", hf)
            cache[name] = (run, hf, json.loads((hf / "config.json").read_text()))
        return cache[name]

    return get


def windows(data, t):
    """The plain evaluation windows of `data`: T bytes each, the last zero-padded."""
    rows = [list(data[i:i + t]) for i in range(0, len(data), t)]
    rows[-1] += [0] * (t - len(rows[-1]))
    return torch.tensor(rows)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pytorch_logits_equal_the_rust_models(name, exported, work):
    run, hf, cfg = exported(name)
    t = cfg["context"]
    data = random_bytes(3 * t + 5, 2)  # three whole windows and a padded one
    (work / f"eval-{name}.bin").write_bytes(data)
    npy = work / f"logits-{name}.npy"
    report = json.loads(megabyte("eval", "--checkpoint", run, "--data", work / f"eval-{name}.bin", "--json",
                                 "--logits", npy, "--overwrite"))
    rust = np.load(npy)
    assert rust.shape == (4, t, 256) and rust.dtype == np.float32

    model = load_module(hf).MegabyteForCausalLM.from_pretrained(hf)
    x = windows(data, t)
    with torch.no_grad():
        logits = model(x)
        losses = model.byte_losses(x)
    assert logits.dtype == torch.float32
    diff = np.abs(logits.numpy() - rust).max()
    assert diff < 1e-4, f"{name}: PyTorch's logits differ from megabyte's by {diff}"
    # The same bits per byte over the data's bytes (the padding is not scored).
    bpb = losses.flatten()[: len(data)].double().mean().item() / math.log(2)
    assert abs(bpb - report["bpb"]) < 1e-5, f"{name}: bpb {bpb} in PyTorch, {report['bpb']} in megabyte eval"
    # The weights are trained ones: a wrong layer would show.
    assert np.abs(rust).max() > 0.1


@pytest.mark.parametrize("name", ["plain", "cross_patch", "everything", "recipe", "hash_ngrams"])
def test_a_shorter_sequence_gives_the_rust_logits_of_its_bytes(name, exported, work):
    """T' < T, a multiple of P or not: the logits of the first T' bytes of a window, as
    megabyte computes them over the whole window (its logits of byte t see only bytes < t)."""
    run, hf, cfg = exported(name)
    p, t = cfg["patch_size"], cfg["context"]
    data = random_bytes(t, 3)
    (work / f"short-{name}.bin").write_bytes(data)
    npy = work / f"short-{name}.npy"
    megabyte("eval", "--checkpoint", run, "--data", work / f"short-{name}.bin", "--logits", npy, "--overwrite")
    rust = np.load(npy)[0]
    model = load_module(hf).MegabyteForCausalLM.from_pretrained(hf)
    for length in (1, p, p + 1, 2 * p - 1, t - p, t - 1):
        with torch.no_grad():
            logits = model(torch.tensor([list(data[:length])]))[0].numpy()
        diff = np.abs(logits - rust[:length]).max()
        assert diff < 1e-4, f"{name}, T' = {length}: differs from megabyte by {diff}"
    with pytest.raises(ValueError, match="0 < T' <= "):
        model(torch.tensor([list(data) + [0]]))


def test_generate_is_seeded_greedy_follows_the_logits_and_runs_past_the_context(exported):
    _, hf, cfg = exported("cross_patch")
    model = load_module(hf).MegabyteForCausalLM.from_pretrained(hf)
    t = cfg["context"]
    a = model.generate(b"the quick", 2 * t, temperature=0.9, top_k=20, top_p=0.95, seed=3)
    assert isinstance(a, bytes) and len(a) == 2 * t
    assert a == model.generate(b"the quick", 2 * t, temperature=0.9, top_k=20, top_p=0.95, seed=3)
    # Greedy: each byte is the argmax of the full forward over the bytes before it.
    prompt = b"the quick brown"
    greedy = model.generate(prompt, 8, temperature=0)
    seq = list(prompt)
    for byte in greedy:
        length = (len(seq) // 4 + 1) * 4
        with torch.no_grad():
            logits = model(torch.tensor([seq + [0] * (length - len(seq))]))[0, len(seq)]
        assert byte == int(logits.argmax())
        seq.append(byte)


@pytest.mark.parametrize("name", ["plain", "everything", "recipe", "hash_ngrams"])
def test_a_model_trained_in_pytorch_imports_with_pytorch_loss(name, exported, work):
    """export -> PyTorch -> AdamW steps -> save_pretrained -> megabyte import -> megabyte eval
    gives PyTorch's loss on the same bytes."""
    run, hf, cfg = exported(name)
    t = cfg["context"]
    module = load_module(hf)
    model = module.MegabyteForCausalLM.from_pretrained(hf)
    text = (work / "train.bin").read_bytes()[: 16 * t]
    batch = windows(text, t)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(5):
        opt.zero_grad()
        loss = model.loss(batch)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model.loss(batch).item()
    assert trained < first, f"training in PyTorch did not lower the loss ({first} -> {trained})"

    tuned, back = work / f"tuned-{name}", work / f"back-{name}"
    model.save_pretrained(tuned)
    assert sorted(os.listdir(tuned)) == ["config.json", "model.safetensors", "modeling_megabyte.py"]
    megabyte("import", tuned, "--out", back, "--overwrite")
    (work / f"text-{name}.bin").write_bytes(text)
    before = json.loads(megabyte("eval", "--checkpoint", run, "--data", work / f"text-{name}.bin", "--json"))
    after = json.loads(megabyte("eval", "--checkpoint", back, "--data", work / f"text-{name}.bin", "--json"))
    bpb = trained / math.log(2)
    assert abs(after["bpb"] - bpb) < 1e-4, f"megabyte eval gives {after['bpb']}, PyTorch {bpb}"
    assert abs(before["bpb"] - bpb) > 1e-3, "the imported checkpoint is the exported one, not the trained one"


def test_a_fresh_pytorch_model_starts_its_projections_at_zero_with_zero_init_proj(exported):
    _, hf, cfg = exported("recipe")
    module = load_module(hf)
    model = module.MegabyteForCausalLM(cfg)
    plain = module.MegabyteForCausalLM(dict(cfg, zero_init_proj=False))
    for name, w in model.named_parameters():
        zero = name.endswith((".attn.proj.weight", ".mlp.down.weight"))
        assert bool((w == 0).all()) == zero, name
        assert not bool((dict(plain.named_parameters())[name] == 0).all()) or "norm." in name, name


def test_bf16_weights_from_pytorch_are_converted_with_a_note(exported, work):
    _, hf, _ = exported("untied")
    model = load_module(hf).MegabyteForCausalLM.from_pretrained(hf).to(torch.bfloat16)
    half = work / "half"
    model.save_pretrained(half)
    out = subprocess.run([BIN, "import", str(half), "--out", str(work / "half-ckpt"), "--overwrite"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "converted from BF16 to f32" in out.stderr


def test_import_refuses_a_folder_of_another_model(exported, work):
    _, hf, _ = exported("plain")
    other = work / "other"
    other.mkdir(exist_ok=True)
    config = json.loads((hf / "config.json").read_text())
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    err = megabyte_fails("import", other, "--out", work / "other-ckpt")
    assert 'model_type is "llama", not "megabyte"' in err
    assert not (work / "other-ckpt").exists()
    with pytest.raises(ValueError, match="model_type"):
        load_module(hf).MegabyteForCausalLM.from_pretrained(other)


def test_the_model_file_needs_only_torch_safetensors_and_the_standard_library(exported):
    _, hf, _ = exported("plain")
    tree = ast.parse((hf / "modeling_megabyte.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"json", "math", "os", "shutil", "torch", "safetensors"}, imported
