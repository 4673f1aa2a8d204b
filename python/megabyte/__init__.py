"""MEGABYTE byte-level language models from Python.

Load a checkpoint made by ``megabyte train`` (or :func:`train`) to generate and score bytes::

    import megabyte
    model = megabyte.load("runs/tiny")
    print(model.generate(b"The ", n=200, seed=1).decode(errors="replace"))
    print(model.bpb("data/valid.txt"))

Every call runs the same library as the ``megabyte`` command and gives its numbers; long calls
release the GIL and answer Ctrl-C with ``KeyboardInterrupt``. Errors are ``ValueError`` (bad
input or settings), ``FileNotFoundError`` (a missing file) or ``RuntimeError``, carrying the
library's message.

Importing the package applies the command's CPU settings to this process: ``CANDLE_NUM_THREADS``
and ``RAYON_NUM_THREADS`` are set to 1 unless already set (megabyte's training splits each batch
over its own threads), and glibc's allocator keeps freed memory for reuse.
"""

from ._native import Model, Stream, __version__, load, train

__all__ = ["Model", "Stream", "load", "train", "__version__"]
