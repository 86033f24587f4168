#!/usr/bin/env bash
# Side-by-side: udelta-gpu's engine vs the authors' approach in plain PyTorch
# (scripts/pytorch_reference.py), on the same tensors, on this machine.
#   scripts/bench-pytorch.sh [WORKDIR] [LAYERS] [DEVICE] [ADAPTER]
# WORKDIR default target/bench-torch; LAYERS of LLaMA-2-7B shapes (default 1: the 7 linear
# weights of one block, 202 M parameters); DEVICE cpu or cuda (PyTorch); ADAPTER for
# udelta-gpu (default cpu). Needs `pip install torch safetensors` and ~4 GB free per layer.
#
# Compared, loading excluded on both sides:
# - quantize + allocate + prune (+ encode for ours): our `analyze + select + encode` stage
#   times vs PyTorch's `quantize + allocate + prune`;
# - trace norm: our estimate (`--trace-norm`) vs the exact sum of singular values by full SVD
#   (torch.linalg.svdvals) of the very deltas we compressed (`decompress --delta-only`). Our
#   time is the estimator alone on those deltas (`examples/tracenorm_block`: operator build +
#   estimate, summed over the matrices): inside `compress` the estimates run on their own
#   thread beside the other stages, so the stage time printed there includes contention.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-target/bench-torch}"
layers="${2:-1}"
device="${3:-cpu}"
adapter="${4:-cpu}"
mkdir -p "$work"
cargo build --release -q
bin=target/release/udelta-gpu

echo "== machine"; nproc; grep -m1 "model name" /proc/cpuinfo || true
rm -rf "$work/s" "$work/deltas" "$work/ours.udelta"
$bin synth --out "$work/s" --preset 7b --layers "$layers" --force -q
cat "$work"/s/base/* "$work"/s/ft-1/* > /dev/null

echo "== udelta-gpu (--adapter $adapter)"
# Stage times from a run without --trace-norm (whose thread would share the cores with
# analyze and select), then the file with the estimate.
stages=$($bin compress --base "$work/s/base" --finetuned "$work/s/ft-1" -o "$work/ours.udelta" \
  --adapter "$adapter" --force -q 2>&1 | grep '^stages')
tn_stages=$($bin compress --base "$work/s/base" --finetuned "$work/s/ft-1" -o "$work/ours.udelta" \
  --adapter "$adapter" --trace-norm --force -q 2>&1 | grep '^stages')
echo "$stages"
$bin decompress "$work/ours.udelta" --base "$work/s/base" -o "$work/deltas" --delta-only -q
ours_tn=$($bin inspect "$work/ours.udelta" --json --totals | python3 -c "import json,sys; print(json.load(sys.stdin)['trace_norm'])")
cargo build --release -q --example tracenorm_block
# First run of each matrix (the reused workspace grows); fastest of 3 with the workspace grown
# and the caches flushed before each run (as inside compress, where gigabytes of checkpoint
# data stream through between two matrices); fastest of 3 with the matrix's data still in the
# caches from the run before (a bound that compress does not reach).
alone=$(target/release/examples/tracenorm_block "$work/deltas/model.safetensors" | grep '^total:')
flushed=$(UD_FLUSH=1 UD_REPEAT=3 target/release/examples/tracenorm_block "$work/deltas/model.safetensors" | grep '^total:')
warm=$(UD_REPEAT=3 target/release/examples/tracenorm_block "$work/deltas/model.safetensors" | tee /dev/stderr | grep '^total:')

echo "== PyTorch ($device)"
torch_algo=$(python3 scripts/pytorch_reference.py algo "$work/s/base" "$work/s/ft-1" --device "$device")
echo "$torch_algo"
torch_svd=$(python3 scripts/pytorch_reference.py svd "$work/deltas/model.safetensors" --device "$device")
echo "$torch_svd"

STAGES="$stages" TN_STAGES="$tn_stages" ALONE="$alone" FLUSHED="$flushed" WARM="$warm" OURS_TN="$ours_tn" ALGO="$torch_algo" SVD="$torch_svd" python3 - <<'EOF'
import json, os, re
st = dict((k, float(v)) for k, v in re.findall(r"(\w+(?: norm)?) ([0-9.]+)", os.environ["STAGES"]))
algo, svd = json.loads(os.environ["ALGO"]), json.loads(os.environ["SVD"])
ours = st["analyze"] + st["select"] + st["encode"]
theirs = algo["total"]
print(f"| stage | udelta-gpu | PyTorch | speed-up |\n|---|---|---|---|")
print(f"| quantize + allocate + prune (+ encode), {algo['params']/1e6:.1f} M params | {ours:.2f} s | {theirs:.2f} s | {theirs/ours:.0f}x |")
est, exact = float(os.environ["OURS_TN"]), svd["trace_norm"]
for label, key in (("first run", "ALONE"), ("workspace grown, caches flushed, fastest of 3 (as in compress)", "FLUSHED"), ("data still cached, fastest of 3", "WARM")):
    build, estimate = (float(v) / 1e3 for v in re.findall(r"([0-9.]+) ms", os.environ[key]))
    tn = build + estimate
    print(f"| trace norm, {svd['matrices']} matrices, {label} (build {build:.2f} + estimate {estimate:.2f}) | {tn:.2f} s | {svd['times']['svd']:.2f} s | {svd['times']['svd']/tn:.0f}x |")
tn_busy = re.search(r"trace norm ([0-9.]+)", os.environ["TN_STAGES"]).group(1)
print(f"(inside compress --trace-norm the trace-norm thread was busy {tn_busy} s, beside the other stages)")
print(f"trace norm: estimate {est:.2f}, exact {exact:.2f}, error {100*abs(est-exact)/exact:.3f} %")
print(f"PyTorch stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in algo["times"].items()) + f"; kept {algo['kept']}")
EOF
