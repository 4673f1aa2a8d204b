"""The package gives the command's results on the same checkpoint, and behaves as a Python
library should: typed exceptions with the library's messages, Ctrl-C, the GIL released."""

import ast
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import megabyte
from conftest import STEPS, corpus_bytes, run


def test_train_through_python_equals_the_command_and_calls_on_step_once_per_step(py_run, cli_run):
    result, steps = py_run
    assert result["steps"] == STEPS and result["reason"] == "steps"
    assert Path(result["checkpoint"]) == Path(result["run_dir"]) / f"step-{STEPS:08d}"
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert all(math.isfinite(s["loss"]) and s["loss"] > 0 and math.isfinite(s["lr"]) for s in steps)
    assert all(s["bytes_per_sec"] > 0 for s in steps)
    assert math.isfinite(result["final_valid_bpb"])
    # The same flags through the command train the same weights, bit for bit.
    ours = (Path(result["checkpoint"]) / "model.safetensors").read_bytes()
    theirs = (cli_run / f"step-{STEPS:08d}" / "model.safetensors").read_bytes()
    assert ours == theirs


@pytest.mark.parametrize(
    "flags",
    [
        dict(sampling="greedy"),
        dict(sampling="temperature", temperature=0.7, seed=3),
        dict(sampling="top-k", top_k=5, seed=11),
        dict(sampling="top-p", top_p=0.8, temperature=1.2, seed=42),
        dict(),  # the defaults
    ],
)
def test_generate_gives_the_bytes_the_command_prints(model, cli, cli_run, flags):
    # A prompt longer than the context that ends mid-patch, and n past the context: the window
    # starts and slides the same way in both.
    prompt = "0: the byte model! " * 15
    assert len(prompt) % model.patch_size != 0 and len(prompt) > model.context
    cli_flags = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    printed = run(cli, "generate", "--checkpoint", cli_run, "--prompt", prompt, "-n", 300, *cli_flags).stdout
    assert printed.endswith(b"\n")
    assert model.generate(prompt.encode(), n=300, **flags) == printed[:-1]
    assert model.generate(prompt, n=300, **flags) == printed[:-1]  # str: its UTF-8 bytes


def test_stream_chunks_join_to_generate(model):
    chunks = list(model.stream(b"3: ", n=200, seed=5))
    assert chunks and all(isinstance(c, bytes) and c for c in chunks)
    assert b"".join(chunks) == model.generate(b"3: ", n=200, seed=5)
    assert model.generate(n=0) == b""
    assert list(model.stream(n=0)) == []


def test_dropping_a_stream_stops_it(model):
    stream = model.stream(n=10**9)
    first = next(stream)
    assert first
    stream.close()
    assert list(stream) == []
    del stream  # the generation thread stops at its next byte; nothing hangs


def eval_json(cli, checkpoint, data, *flags):
    return json.loads(run(cli, "eval", "--checkpoint", checkpoint, "--data", data, "--json", *flags).stdout)


def test_bpb_equals_megabyte_eval(model, cli, cli_run, workdir):
    # A partial last window, as most files have.
    data = workdir / "eval.txt"
    data.write_bytes(corpus_bytes()[:3000])
    expected = eval_json(cli, cli_run, data)["bpb"]
    assert model.bpb(data) == expected
    assert model.bpb(str(data)) == expected
    assert model.bpb(data.read_bytes()) == expected
    assert model.bpb(bytearray(data.read_bytes())) == expected
    assert model.bpb(data, strided=True) == eval_json(cli, cli_run, data, "--strided")["bpb"]
    assert model.bpb(data, sliding=64) == eval_json(cli, cli_run, data, "--sliding", "64")["bpb"]


def nll_bits(logits: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bits of each byte of `x` under `logits` (float64 log-softmax)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, x[..., None].astype(np.int64), axis=-1)[..., 0] / math.log(2)


def test_logits_give_the_eval_loss_of_a_window(model, cli, cli_run, workdir):
    t = model.context
    window = corpus_bytes()[1000 : 1000 + t]
    one = workdir / "one-window.txt"
    one.write_bytes(window)
    expected = eval_json(cli, cli_run, one)
    assert expected["windows"] == 1 and expected["bytes"] == t
    x = np.frombuffer(window, dtype=np.uint8)
    logits = model.logits(x[None, :])
    assert logits.shape == (1, t, 256) and logits.dtype == np.float32
    assert nll_bits(logits, x[None, :]).mean() == pytest.approx(expected["bpb"], rel=1e-6)


def test_logits_of_rows_short_rows_and_batches_agree(model):
    data = np.frombuffer(corpus_bytes(), dtype=np.uint8)
    t = model.context
    batch = np.stack([data[i * t : (i + 1) * t] for i in range(11)])  # more rows than one pass
    full = model.logits(batch)
    assert full.shape == (11, t, 256)
    np.testing.assert_array_equal(model.logits(batch[3]), full[3])  # 1-D: [T, 256]
    # A T that is not a multiple of P: the prefix's logits (causality).
    short = model.logits(batch[:2, :13])
    assert short.shape == (2, 13, 256)
    np.testing.assert_allclose(short, full[:2, :13], rtol=1e-5, atol=1e-5)
    # A non-contiguous view reads the same bytes.
    np.testing.assert_array_equal(model.logits(batch[::2]), full[::2])


@pytest.mark.parametrize(
    "x, says",
    [
        (np.zeros((1, 8), dtype=np.int64), "uint8"),
        (np.zeros((1, 8), dtype=np.float32), "uint8"),
        ([1, 2, 3], "NumPy"),
        (b"bytes", "NumPy"),
        (np.zeros((1, 2, 8), dtype=np.uint8), "shape"),
        (np.zeros((1, 0), dtype=np.uint8), "1 ≤ T"),
        (np.zeros((0, 8), dtype=np.uint8), "at least one row"),
        (np.zeros((1, 257), dtype=np.uint8), "≤ 256"),
    ],
)
def test_logits_refuse_bad_input_with_a_value_error(model, x, says):
    with pytest.raises(ValueError, match=says):
        model.logits(x)


def test_config_is_the_checkpoints(model, cli_run):
    saved = json.loads((cli_run / f"step-{STEPS:08d}" / "config.json").read_text())
    assert model.config == saved
    assert (model.context, model.patch_size) == (saved["context"], saved["patch_size"])
    assert model.checkpoint == cli_run / f"step-{STEPS:08d}"
    assert model.device == "cpu" and model.precision == "f32"


def test_on_step_returning_false_stops_training_with_a_checkpoint(tmp_path, corpus):
    seen = []

    def on_step(stats):
        seen.append(stats["step"])
        return stats["step"] < 2

    result = megabyte.train(tmp_path / "run", data=corpus, steps=50, sample_bytes=0, on_step=on_step)
    assert seen == [1, 2]
    assert result["steps"] == 2 and result["reason"] == "interrupted"
    assert (tmp_path / "run" / "step-00000002" / "model.safetensors").is_file()
    # The run resumes from it, as one stopped by Ctrl-C.
    resumed = megabyte.train(resume=tmp_path / "run", steps=3, sample_bytes=0)
    assert resumed["steps"] == 3


def test_an_exception_in_on_step_stops_training_with_a_checkpoint_and_is_raised(tmp_path, corpus):
    class Stop(Exception):
        pass

    def on_step(stats):
        raise Stop(f"at {stats['step']}")

    with pytest.raises(Stop, match="at 1"):
        megabyte.train(tmp_path / "run", data=corpus, steps=50, sample_bytes=0, on_step=on_step)
    assert (tmp_path / "run" / "step-00000001" / "model.safetensors").is_file()


def command_error(cli, *args) -> str:
    proc = run(cli, *args, check=False)
    assert proc.returncode != 0
    return proc.stderr.decode().strip().removeprefix("error: ")


def test_errors_are_typed_and_carry_the_library_message(tmp_path, model, cli, corpus):
    with pytest.raises(FileNotFoundError, match="no such checkpoint or run folder"):
        megabyte.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="bad device `tpu`"):
        megabyte.load(model.checkpoint, device="tpu")
    with pytest.raises(ValueError, match="precision must be one of auto, f32, bf16"):
        megabyte.load(model.checkpoint, precision="f16")
    with pytest.raises(ValueError, match="sampling must be one of greedy, temperature, top-k, top-p"):
        model.generate(sampling="nucleus")
    with pytest.raises(ValueError, match="top-p needs 0 < p ≤ 1, got 1.5"):
        model.generate(top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        model.generate(sampling="temperature", temperature=0.0)
    with pytest.raises(TypeError, match="prompt must be bytes"):
        model.generate(prompt=12)
    with pytest.raises(FileNotFoundError, match="cannot read it"):
        model.bpb(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="empty"):
        model.bpb(b"")
    with pytest.raises(TypeError, match="unexpected keyword argument 'step'"):
        megabyte.train(tmp_path / "r", step=3)
    with pytest.raises(TypeError, match="switch"):
        megabyte.train(tmp_path / "r", documents="yes")


@pytest.mark.parametrize(
    "kwargs, flags",
    [
        (dict(lr=-1.0), ["--lr", "-1"]),
        (dict(preset="huge"), ["--preset", "huge"]),
        (dict(batch_size=0), ["--batch-size", "0"]),
        (dict(batch_size="many"), ["--batch-size", "many"]),
        (dict(context=100), ["--context", "100"]),
    ],
)
def test_train_refuses_what_the_command_refuses_with_its_message(tmp_path, cli, corpus, kwargs, flags):
    common = ["train", "--out", tmp_path / "cli", "--data", corpus, "--steps", "1", *flags]
    message = command_error(cli, *common)
    with pytest.raises(ValueError) as raised:
        megabyte.train(tmp_path / "py", data=corpus, steps=1, **kwargs)
    # The same message, up to the usage line clap prints under its own errors.
    assert str(raised.value).splitlines()[0] == message.splitlines()[0]
    assert not (tmp_path / "py").exists() and not (tmp_path / "cli").exists()


def test_train_refuses_a_used_folder_and_missing_data_as_the_command_does(tmp_path, cli, corpus):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    message = command_error(cli, "train", "--out", used, "--data", corpus, "--steps", "1")
    with pytest.raises(ValueError) as raised:
        megabyte.train(used, data=corpus, steps=1)
    assert str(raised.value) == message
    assert (used / "notes.txt").read_text() == "mine"
    missing = tmp_path / "missing.txt"
    message = command_error(cli, "train", "--out", tmp_path / "a", "--data", missing)
    with pytest.raises(FileNotFoundError) as raised:
        megabyte.train(tmp_path / "b", data=missing)
    assert str(raised.value) == message
    with pytest.raises(ValueError, match="megabyte train --devices"):
        megabyte.train(tmp_path / "c", devices="0,1")


def python(script: str, *args) -> subprocess.Popen:
    """A Python process running `script` (with the test folder importable), its output piped."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=Path(__file__).parent,
    )


def interrupt_after_first_line(proc: subprocess.Popen):
    """SIGINT once the process printed its first line; its exit code, stdout and stderr."""
    first = proc.stdout.readline()
    assert first, proc.stderr.read().decode()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process did not stop within 60 s of Ctrl-C")
    return proc.returncode, first + out, err.decode()


def test_ctrl_c_interrupts_a_long_generate(model):
    proc = python(
        """
        import sys, megabyte
        model = megabyte.load(sys.argv[1])
        print("ready", flush=True)
        model.generate(n=10**9)
        """,
        model.checkpoint,
    )
    code, _, err = interrupt_after_first_line(proc)
    assert code != 0 and "KeyboardInterrupt" in err, err


def test_ctrl_c_interrupts_a_long_stream(model):
    proc = python(
        """
        import sys, megabyte
        model = megabyte.load(sys.argv[1])
        for i, chunk in enumerate(model.stream(n=10**9)):
            if i == 0:
                print("ready", flush=True)
        """,
        model.checkpoint,
    )
    code, _, err = interrupt_after_first_line(proc)
    assert code != 0 and "KeyboardInterrupt" in err, err


def test_ctrl_c_stops_training_after_saving_a_checkpoint(tmp_path, corpus):
    out = tmp_path / "run"
    proc = python(
        """
        import sys, megabyte
        def on_step(stats):
            if stats["step"] == 1:
                print("step 1", flush=True)
        megabyte.train(sys.argv[1], data=sys.argv[2], steps=10**6, sample_bytes=0, on_step=on_step)
        """,
        out,
        corpus,
    )
    code, _, err = interrupt_after_first_line(proc)
    assert code != 0 and "KeyboardInterrupt" in err, err
    saved = sorted(out.glob("step-*"))
    assert saved and (saved[-1] / "model.safetensors").is_file(), err
    assert "interrupted at step" in err


def test_the_gil_is_released_during_a_long_call(model):
    # A thread generates without end; the main thread must still run Python.
    proc = python(
        """
        import os, sys, threading, time, megabyte
        model = megabyte.load(sys.argv[1])
        worker = threading.Thread(target=model.generate, kwargs=dict(n=10**9), daemon=True)
        worker.start()
        time.sleep(0.2)
        ticks = 0
        spin_until = time.monotonic()
        while ticks < 20:
            assert worker.is_alive()
            sum(range(10000))  # pure Python work, which needs the GIL
            ticks += 1
        print("ticks", ticks, worker.is_alive(), flush=True)
        os._exit(0)
        """,
        model.checkpoint,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["ticks", "20", "True"]


def test_the_stubs_list_every_option_of_megabyte_train():
    stubs = ast.parse((Path(megabyte.__file__).parent / "__init__.pyi").read_text())
    train = next(n for n in stubs.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    given = {a.arg for a in train.args.args + train.args.kwonlyargs} - {"on_step"}
    options = {name for name, _ in megabyte._native._train_options()}
    assert given == options
    assert (Path(megabyte.__file__).parent / "py.typed").is_file()
