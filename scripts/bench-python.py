"""Times the Python package against the CLI on a synthetic LLaMA-shaped pair (issue: apply_ onto
a loaded base vs decompress + loading the written checkpoint; swap_ between two fine-tunes;
extra peak memory). Run by scripts/bench-python.sh, which makes the data; prints one JSON line.

    python bench-python.py WORKDIR CLI
WORKDIR holds base/, ft-1/, ft-2/, ft-1.udelta, ft-2.udelta.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import udelta


def rss_peak_gib():
    """Peak resident memory since the last reset_peak() (VmHWM)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_now_gib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def load_dir(d):
    state = {}
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(d, name)))
    return state


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k].view(torch.int16) if a[k].dtype == torch.bfloat16 else a[k],
                                                b[k].view(torch.int16) if b[k].dtype == torch.bfloat16 else b[k]) for k in a)


def decompress_and_load(work, cli, path, out):
    """Times the CLI's decompress of ``path`` plus loading the checkpoint it wrote, then frees
    the loaded copy (run before the base is loaded: two 7B models do not fit in 24 GiB)."""
    restored = os.path.join(work, "restored-2")
    shutil.rmtree(restored, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([cli, "decompress", path, "--base", os.path.join(work, "base"), "-o", restored, "-q"],
                   check=True, capture_output=True)
    out["decompress_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fresh = {k: v.clone() for k, v in load_dir(restored).items()}
    out["load_restored_s"] = time.perf_counter() - t
    del fresh
    return restored


def equals_dir(state, d):
    """``state`` equals the checkpoint in ``d`` bit for bit, compared one tensor at a time."""
    names = set()
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(d, name), framework="pt") as f:
                for k in f.keys():
                    names.add(k)
                    if k not in state or not same({k: state[k]}, {k: f.get_tensor(k)}):
                        return False
    return names == set(state)


def main(work, cli):
    a, b = os.path.join(work, "ft-1.udelta"), os.path.join(work, "ft-2.udelta")
    out = {}
    restored = decompress_and_load(work, cli, b, out)
    t = time.perf_counter()
    state = {k: v.clone() for k, v in load_dir(os.path.join(work, "base")).items()}  # read now, not mapped
    out["load_base_s"] = time.perf_counter() - t
    loaded = rss_now_gib()
    reset_peak()
    out["model_gib"] = sum(v.numel() * v.element_size() for v in state.values()) / 2**30

    t, cpu = time.perf_counter(), time.process_time()
    applied = udelta.apply_(state, a)
    out["apply_s"] = time.perf_counter() - t
    out["apply_cpu_s"] = time.process_time() - cpu
    out["apply_extra_peak_gib"] = rss_peak_gib() - loaded
    out["undo_record_gib"] = applied.nbytes() / 2**30

    t, cpu = time.perf_counter(), time.process_time()
    udelta.swap_(state, a, b, applied=applied)
    out["swap_s"] = time.perf_counter() - t
    # CPU seconds of all threads: with the machine shared, wall time / CPU time shows the
    # cores the process actually got.
    out["swap_cpu_s"] = time.process_time() - cpu
    out["load_average_1min"] = os.getloadavg()[0]
    out["extra_peak_after_swap_gib"] = rss_peak_gib() - loaded
    out["apply_over_decompress_and_load"] = out["apply_s"] / (out["decompress_s"] + out["load_restored_s"])

    out["swap_equals_fresh"] = equals_dir(state, restored)
    shutil.rmtree(restored)
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
