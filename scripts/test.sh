#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): the Rust tests, then, in a virtual environment
# of its own (.venv-test/, made once), the Python package's tests (python/tests/), the PyTorch
# export tests and the playground's browser test (tests/py/).
#
#   scripts/test.sh             # everything
#   scripts/test.sh --rust      # the Rust tests alone (cargo test --release --workspace)
#
# Needs a Rust toolchain and python3 (3.9 or later); pip fetches maturin, pytest, NumPy, CPU
# PyTorch, safetensors and selenium (tests/py/requirements.txt). The browser test drives Debian's
# chromium and chromium-driver, installed here when missing and allowed (root with apt-get);
# without them it is skipped, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cargo test --release --workspace
[ "${1:-}" = --rust ] && exit 0

# The Python tests run target/release/megabyte beside the package: `cargo test` built it.
venv=$root/.venv-test
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r tests/py/requirements.txt
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
            || echo "note: could not install chromium; the browser test will be skipped" >&2
    fi
fi
# The package builds into the workspace's target/ and so reuses its compiled dependencies.
CARGO_TARGET_DIR=$root/target "$venv/bin/pip" install -q --disable-pip-version-check ./python
MEGABYTE_BIN=$root/target/release/megabyte "$venv/bin/python" -m pytest -q python/tests tests/py
