"""Fixtures of the package's tests: the `megabyte` command, a small corpus, and one tiny run
trained through Python and one through the command (same flags), shared by every test."""

import os
import subprocess
from pathlib import Path

import pytest

import megabyte

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def corpus_bytes() -> bytes:
    """About 40 KB of varied text: enough for a tiny model's training and validation windows."""
    words = b"the byte model reads patches of bytes and predicts every next byte from those before".split()
    lines = []
    for i in range(2000):
        line = b" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 5))
        lines.append(b"%d: %s." % (i, line))
    return b"\n".join(lines) + b"\n"


@pytest.fixture(scope="session")
def cli() -> Path:
    """The `megabyte` binary: $MEGABYTE_BIN, else target/release/megabyte of this checkout."""
    path = Path(os.environ.get("MEGABYTE_BIN", "target/release/megabyte"))
    if not path.is_absolute():
        path = REPO / path
    if not path.is_file():
        pytest.fail(f"no megabyte binary at {path}: run `cargo build --release` or set MEGABYTE_BIN")
    return path


def run(cli: Path, *args, check=True) -> subprocess.CompletedProcess:
    """The command with `args`, its stdout as bytes and stderr as text."""
    proc = subprocess.run([str(cli), *map(str, args)], capture_output=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"megabyte {' '.join(map(str, args))} failed: {proc.stderr.decode()}")
    return proc


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("megabyte")


@pytest.fixture(scope="session")
def corpus(workdir) -> Path:
    path = workdir / "corpus.txt"
    path.write_bytes(corpus_bytes())
    return path


@pytest.fixture(scope="session")
def py_run(workdir, corpus):
    """A tiny run trained through `megabyte.train`, with every step's figures."""
    steps = []
    result = megabyte.train(workdir / "py-run", data=corpus, steps=STEPS, sample_bytes=0, on_step=steps.append)
    return result, steps


@pytest.fixture(scope="session")
def cli_run(workdir, corpus, cli) -> Path:
    """The same run trained through the command."""
    out = workdir / "cli-run"
    run(cli, "train", "--out", out, "--data", corpus, "--steps", STEPS, "--sample-bytes", 0)
    return out


@pytest.fixture(scope="session")
def model(cli_run):
    return megabyte.load(cli_run)
