#!/usr/bin/env bash
# Compresses many fine-tunes of one base the way a cluster does, with local processes: one
# independent `compress --trace-norm` per fine-tune (what each Slurm array task, Kubernetes
# Indexed Job pod or Ray task runs), then one `rescale` over all the files, which gives every
# file the gamma that compressing them together would have (docs/PYTHON.md, "Many fine-tunes").
#
#   scripts/compress-many.sh BASE OUTDIR FT1 FT2 ...
#
# Writes OUTDIR/NAME.udelta per fine-tune (NAME: the fine-tune path's last component).
# Environment: UDELTA (the udelta-gpu binary; default: on PATH), JOBS (processes at once,
# default 2), UDELTA_ARGS (extra compress options, e.g. "--adapter cpu --sparsity 0.97").
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 BASE OUTDIR FT1 [FT2 ...]" >&2
  exit 2
fi
base=$1 out=$2
shift 2
bin=${UDELTA:-udelta-gpu}
jobs=${JOBS:-2}
read -r -a extra <<< "${UDELTA_ARGS:-}"
mkdir -p "$out"

# One task per fine-tune: this line is the whole body of a cluster job.
compress_one() {
  local ft=$1 name
  name=$(basename "$ft" .safetensors)
  "$bin" compress --base "$base" --finetuned "$ft" -o "$out/$name.udelta" --trace-norm -q "${extra[@]}" >/dev/null
}

pids=()
for ft in "$@"; do
  compress_one "$ft" &
  pids+=($!)
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 0.2; done
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ "$failed" -eq 0 ] || { echo "compress-many: a compress job failed" >&2; exit 1; }

# After all tasks: one step over every file (cheap, rewrites only metadata).
files=()
for ft in "$@"; do files+=("$out/$(basename "$ft" .safetensors).udelta"); done
if [ ${#files[@]} -ge 2 ]; then "$bin" rescale "${files[@]}"; fi
