#!/usr/bin/env bash
# Benchmarks the Python package (docs/BENCHMARKS.md, "Python"): synthesizes a LLaMA-shaped base
# and two fine-tunes, compresses both, then times (in one Python process, base loaded first)
# apply_ of fine-tune 1, swap_ to fine-tune 2, and the CLI's decompress of fine-tune 2 plus
# loading the checkpoint it wrote; checks that the swapped model equals the fresh load.
#
#   scripts/bench-python.sh [PRESET] [LAYERS] [WORKDIR]    (default: 7b 2 target/bench-python)
# LAYERS "all" keeps the preset's depth. The fine-tune directories are deleted once compressed
# (the bench needs only the base and the two .udelta files; a full 7B pair is 27 GB).
# The decompressed checkpoint is timed and loaded before the base is loaded, then compared
# with the swapped model one tensor at a time: two whole 7B models need not fit in memory.
# Needs scripts/test-python.sh run once (the venv and wheel) and the release CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-7b} layers=${2:-2} work=${3:-target/bench-python}
cli=target/release/udelta-gpu
[ -x "$cli" ] || cargo build -q --release --bin udelta-gpu
target/pyvenv/bin/pip install -q safetensors
if [ ! -f "$work/ft-2.udelta" ]; then
  depth=(); [ "$layers" = all ] || depth=(--layers "$layers")
  "$cli" synth --out "$work" --preset "$preset" "${depth[@]}" --dtype bf16 --models 2 -q --force
  for i in 1 2; do
    "$cli" compress --base "$work/base" --finetuned "$work/ft-$i" -o "$work/ft-$i.udelta" --adapter cpu -q --force >/dev/null
    rm -rf "$work/ft-$i"
  done
fi
target/pyvenv/bin/python scripts/bench-python.py "$work" "$cli"
