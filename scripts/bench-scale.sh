#!/usr/bin/env bash
# Full-scale run: synth a LLaMA-2 7B or 13B pair, then time, each from a cold page cache (all
# of it dropped as root, else the inputs' pages evicted by scripts/evict-cache.py), `cat` of
# both inputs, compress (peak RSS by /usr/bin/time -v),
# compress with --trace-norm, decompress, and `cp -r` + sync of the base for comparison.
#   scripts/bench-scale.sh [PRESET] [WORKDIR] [ADAPTER]
# PRESET 7b (default; needs ~57 GB free) or 13b (needs ~80 GB free, or ~54 GB with
# SKIP_DECOMPRESS=1); WORKDIR default target/bench-scale; ADAPTER default cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-7b}"
work="${2:-target/bench-scale}"
adapter="${3:-cpu}"
cargo build --release -q
bin="$(pwd)/target/release/udelta-gpu"
evict="$(pwd)/scripts/evict-cache.py"
mkdir -p "$work"
cd "$work"

cold() {
  sync
  if [ -w /proc/sys/vm/drop_caches ]; then
    echo 3 > /proc/sys/vm/drop_caches
  else
    echo "(not root: only the inputs' pages evicted)"
    python3 "$evict" s
  fi
}
# Runs a command under /usr/bin/time -v; prints its summary lines and the peak RSS.
rss() {
  /usr/bin/time -v -o time.log "$@" > run.log 2>&1
  grep -E "^(compressed|stages|ratio|wrote)" run.log || true
  grep -E "Elapsed|Maximum resident" time.log
}

echo "== machine"; nproc; grep -m1 "model name" /proc/cpuinfo || true; free -g | head -2; uptime
rm -rf s s.udelta s-tn.udelta restored base-copy
echo "== synth --preset $preset"
rss "$bin" synth --out s --preset "$preset" -q
du -sh s/base s/ft-1
echo "== cat of both inputs (cold)"; cold
/usr/bin/time -f "%e s wall" sh -c 'cat s/base/*.safetensors s/ft-1/*.safetensors > /dev/null'
echo "== compress --adapter $adapter (cold)"; cold
rss "$bin" compress --base s/base --finetuned s/ft-1 -o s.udelta --adapter "$adapter" --force
echo "== compress --adapter $adapter --trace-norm (cold)"; cold
rss "$bin" compress --base s/base --finetuned s/ft-1 -o s-tn.udelta --adapter "$adapter" --trace-norm --force
if [ "${SKIP_DECOMPRESS:-0}" != 1 ]; then
  echo "== decompress (cold, synced)"; cold
  rss "$bin" decompress s.udelta --base s/base -o restored
  rm -rf restored
  echo "== cp -r of the base + sync (cold)"; cold
  /usr/bin/time -f "%e s wall" sh -c 'cp -r s/base base-copy && sync'
  rm -rf base-copy
fi
rm -rf s s-tn.udelta time.log run.log
