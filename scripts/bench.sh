#!/usr/bin/env bash
# End-to-end benchmark on this machine: prints the figures docs/BENCHMARKS.md quotes.
#   scripts/bench.sh [WORKDIR]    (default: target/bench; needs ~6 GB free)
# Page cache is warmed by a first `cat` of the inputs; every timed command runs once after it.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-target/bench}"
mkdir -p "$work"
cargo build --release -q
bin=target/release/udelta-gpu
t() { /usr/bin/time -f "%e s wall, %M KB peak RSS" "$@"; }

echo "== machine"; nproc; grep -m1 "model name" /proc/cpuinfo || true; free -g | head -2

echo "== synth 7b --layers 2 (f16, 2 shards)"
rm -rf "$work/s7"
t $bin synth --out "$work/s7" --preset 7b --layers 2 --force -q
cat "$work"/s7/base/* "$work"/s7/ft-1/* > /dev/null
echo "== read both inputs once (cat, warm page cache)"
t sh -c "cat $work/s7/base/* $work/s7/ft-1/* > /dev/null"
echo "== compress, CPU engine"
t $bin compress --base "$work/s7/base" --finetuned "$work/s7/ft-1" -o "$work/s7.udelta" --force -q --adapter cpu | tail -2
echo "== decompress"
rm -rf "$work/s7-restored"
t $bin decompress "$work/s7.udelta" --base "$work/s7/base" -o "$work/s7-restored" -q
echo "== cp of the base (no sync), for comparison"
rm -rf "$work/s7-cp"; t cp -r "$work/s7/base" "$work/s7-cp"; rm -rf "$work/s7-cp" "$work/s7-restored"

echo "== ratios at the paper's settings (4 bits), over the block linears (--embeddings lossless)"
scripts/fetch-minilm.sh
printf "| s | MiniLM measured | synth 7b-L2 measured | paper bound |\n|---|---|---|---|\n"
for s in 0.90 0.95 0.97 0.99 0.995; do
  step=0.01; [ "$s" = 0.995 ] && step=0.005
  m=$($bin compress --base target/testdata/minilm/base --finetuned target/testdata/minilm/ft -o "$work/m.udelta" --force -q --adapter cpu --sparsity $s --step $step --embeddings lossless --json)
  y=$($bin compress --base "$work/s7/base" --finetuned "$work/s7/ft-1" -o "$work/y.udelta" --force -q --adapter cpu --sparsity $s --step $step --embeddings lossless --json)
  r() { python3 -c "import json,sys; d=json.load(sys.stdin); print('%.1f' % d['$1'])"; }
  printf "| %s | %sx | %sx | %sx |\n" $s "$(echo "$m" | r ratio_measured)" "$(echo "$y" | r ratio_measured)" "$(echo "$m" | r ratio_paper)"
done
