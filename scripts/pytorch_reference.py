#!/usr/bin/env python3
"""UltraDelta as its authors run it, in plain PyTorch: the baseline of the speed comparison in
docs/BENCHMARKS.md (run by scripts/bench-pytorch.sh). Not used by the tool or its tests.

  pytorch_reference.py algo BASE_DIR FT_DIR [--sparsity S] [--bits B] [--step D] [--device DEV]
      quantize + allocate + prune + rescale the linear weights of the transformer blocks
  pytorch_reference.py svd DELTAS.safetensors [--device DEV]
      exact trace norm (sum of singular values, full SVD) of every 2-D tensor in the file

Both print one JSON object with the wall time of each stage (loading excluded). The algorithm
follows docs/ALGORITHM.md step by step with the authors' torch idioms: whole-tensor ops,
`torch.unique` of the levels, and per level `nonzero` + `randperm` (unseeded, as released).
Needs `pip install torch safetensors`.
"""

import argparse
import glob
import json
import os
import re
import time

import torch
from safetensors import safe_open

# The tool's default selection: 2-D weights of the blocks' linear layers (LLaMA names).
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def shards(path):
    if os.path.isfile(path):
        return [path]
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


def load_linear(path, device):
    """name -> tensor (as stored) of the linear weights in a checkpoint file or directory."""
    out = {}
    for f in shards(path):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                if LINEAR.match(name):
                    out[name] = st.get_tensor(name).to(device)
    return out


class Clock:
    """Accumulates wall time per stage, synchronizing CUDA so that queued kernels count."""

    def __init__(self, device):
        self.device = device
        self.times = {}

    def __call__(self, stage, fn, *args):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t
        return r


def quantize(base, ft, bits):
    """Per-tensor min/max quantization: levels, dequantized values, std of the dequantized."""
    delta = ft.float() - base.float()
    lo, hi = delta.min(), delta.max()
    top = 2**bits - 1
    if hi == lo:
        q = torch.zeros_like(delta, dtype=torch.uint8)
        deq = torch.full_like(delta, lo.item())
    else:
        q = torch.round((delta - lo) / (hi - lo) * top).to(torch.uint8)
        deq = q.float() / top * (hi - lo) + lo
    std = deq.std(unbiased=False).item() if deq.numel() > 1 else 0.0
    return q, deq, std


def allocate(sizes_stds, s, step):
    """Variance-based mixed sparsity: thirds by parameter count, sorted by std."""
    n = sum(size for size, _ in sizes_stds)
    order = sorted(range(len(sizes_stds)), key=lambda i: sizes_stds[i][1])
    groups, run = {}, 0
    for i in order:
        run += sizes_stds[i][0]
        groups[i] = "low" if run <= n / 3 else ("mid" if run <= 2 * n / 3 else "high")
    count = {g: sum(sizes_stds[i][0] for i in groups if groups[i] == g) for g in ("low", "mid", "high")}
    r_high = s
    if count["high"]:
        r_high = (s * n - s * count["mid"] - (s + step) * count["low"]) / count["high"]
        r_high = min(max(r_high, 0.0), 0.99)
    rate = {"low": s + step, "mid": s, "high": r_high}
    return [rate[groups[i]] for i in range(len(sizes_stds))]


def prune(q, deq, rate):
    """Distribution-aware random pruning: the same fraction of every level, chosen by randperm."""
    z = (deq == 0).float().mean().item()
    r = max(0.0, (rate - z) / (1 - z)) if z < 1 else 0.0
    flat_q = q.view(-1)
    mask = torch.ones_like(flat_q, dtype=torch.bool)
    for v in torch.unique(flat_q):
        idx = (flat_q == v).nonzero(as_tuple=True)[0]
        k = round(idx.numel() * r)
        perm = torch.randperm(idx.numel(), device=q.device)[:k]
        mask[idx[perm]] = False
    return mask.view_as(q)


def warm_up(device):
    """Runs every op once on a small tensor so that library start-up is not timed."""
    x = torch.randn(64, 64, device=device)
    q, deq, _ = quantize(x, x * 1.01, 4)
    prune(q, deq, 0.9)
    torch.linalg.svdvals(x)


def algo(args):
    device = torch.device(args.device)
    warm_up(device)
    base = load_linear(args.base, device)
    ft = load_linear(args.finetuned, device)
    names = [n for n in ft if n in base]
    clock = Clock(device)
    quantized = {}
    for n in names:
        quantized[n] = clock("quantize", quantize, base[n], ft[n], args.bits)
    rates = clock("allocate", allocate, [(ft[n].numel(), quantized[n][2]) for n in names], args.sparsity, args.step)
    kept = 0
    scale = 1.0 / (1.0 - args.sparsity)
    for n, rate in zip(names, rates):
        q, deq, _ = quantized[n]
        mask = clock("prune", prune, q, deq, rate)
        out = clock("prune", lambda d, m: d * m * scale, deq, mask)
        kept += int(mask.sum().item())
        del out
    params = sum(ft[n].numel() for n in names)
    print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "tensors": len(names), "params": params, "kept": kept, "times": clock.times,
                      "total": sum(clock.times.values())}))


def svd(args):
    device = torch.device(args.device)
    warm_up(device)
    clock = Clock(device)
    total, count = 0.0, 0
    with safe_open(args.deltas, framework="pt") as st:
        for name in st.keys():
            x = st.get_tensor(name)
            if x.dim() != 2:
                continue
            x = x.to(device=device, dtype=torch.float32)
            total += clock("svd", lambda m: torch.linalg.svdvals(m).double().sum().item(), x)
            count += 1
    print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "matrices": count, "trace_norm": total, "times": clock.times}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("algo")
    a.add_argument("base")
    a.add_argument("finetuned")
    a.add_argument("--sparsity", type=float, default=0.95)
    a.add_argument("--bits", type=int, default=4)
    a.add_argument("--step", type=float, default=0.01)
    a.add_argument("--device", default="cpu")
    s = sub.add_parser("svd")
    s.add_argument("deltas")
    s.add_argument("--device", default="cpu")
    args = p.parse_args()
    algo(args) if args.cmd == "algo" else svd(args)


if __name__ == "__main__":
    main()
