#!/usr/bin/env bash
# Builds the Python package `udelta` (python/) with maturin into a venv under target/, and runs
# its pytest suite against the CLI (target/debug/udelta-gpu, built if missing).
#
# The venv uses Debian's python3 with its system packages, so Debian's CPU torch
# (python3-torch) and numpy are visible; maturin and pytest come from pip. The torch tests
# import torch unconditionally: without it they fail, they are never skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

PYTHON="${UDELTA_PYTHON:-/usr/bin/python3}"
VENV=target/pyvenv
# The extension has its own target dir: it never invalidates the root crate's build.
export CARGO_TARGET_DIR="$PWD/target/python"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q "maturin>=1.5,<2" pytest numpy "transformers==4.40.2"
"$VENV/bin/python" -c "import torch" || {
  echo "test-python: torch is not importable (install python3-torch); the torch tests need it" >&2
  exit 1
}

[ -x target/debug/udelta-gpu ] || cargo build -q --bin udelta-gpu
rm -rf target/python/wheels
"$VENV/bin/maturin" build -q --release -m python/Cargo.toml -i "$VENV/bin/python" --out target/python/wheels
"$VENV/bin/pip" install -q --force-reinstall --no-deps target/python/wheels/udelta-*.whl

export UDELTA_CLI="$PWD/target/debug/udelta-gpu"
cd python/tests && "../../$VENV/bin/python" -m pytest -q "$@"
