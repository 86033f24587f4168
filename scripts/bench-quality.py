#!/usr/bin/env python3
"""Quality on real weights: how close a restored fine-tune's sentence embeddings are to the
uncompressed fine-tune's.

For each setting (sparsity x --embeddings mode) this compresses the real MiniLM pair
(scripts/fetch-minilm.sh: base all-MiniLM-L6-v2, fine-tune sre-embedding-model, f32),
decompresses it against the base, loads base, fine-tune and restored model with transformers
(`AutoModel`, CPU), embeds the sentences of scripts/data/quality-sentences.txt (mean pooling
over the attention mask, L2-normalised, as the sentence-transformers config of the fine-tune
says), and reports against the fine-tune's embeddings:
  - cos mean / cos min: cosine of each sentence's embedding to the fine-tune's;
  - top-1: fraction of sentences whose nearest other sentence is the same as with the fine-tune;
  - top-10: mean overlap of the 10 nearest other sentences with the fine-tune's;
  - ratio: whole-file ratio, fine-tune tensor bytes / .udelta bytes.
Each setting runs with every seed of --seeds (the seed of the pruning masks); the figures are
means over the seeds, and "top-1 range" is the smallest and largest top-1 over them, to show
how much of a difference between settings is the masks' luck. The base model's row shows how
far the fine-tune moved.

Needs: pip install torch transformers (CPU is enough), a release build of udelta-gpu.
Usage: python3 scripts/bench-quality.py [--sparsity 0.9,0.95,0.97,0.99]
       [--embeddings lossless,lossy,separate] [--seeds 0,1,2] [--bin target/release/udelta-gpu]
       [--pair target/testdata/minilm] [--work DIR] [--markdown]
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIDE_FILES = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
]
# The fine-tune's sentence_bert_config.json: max_seq_length 256.
MAX_TOKENS = 256
TOP_K = 10


def sentences():
    path = ROOT / "scripts" / "data" / "quality-sentences.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


def tensor_bytes(model_dir):
    """Sum of the tensor data bytes of every .safetensors file in model_dir."""
    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(
            v["data_offsets"][1] - v["data_offsets"][0]
            for k, v in header.items()
            if k != "__metadata__"
        )
    return total


@torch.no_grad()
def embed(model_dir, texts, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    for i in range(0, len(texts), 64):
        batch = tok(
            texts[i : i + 64],
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out).double()


def neighbours(e, k):
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.topk(k, dim=1).indices


def compare(e, ref):
    """Figures of embeddings e against the reference (fine-tune) embeddings."""
    cos = (e * ref).sum(1)
    n_e, n_ref = neighbours(e, TOP_K), neighbours(ref, TOP_K)
    top1 = (n_e[:, 0] == n_ref[:, 0]).double().mean().item()
    overlap = [
        len(set(a.tolist()) & set(b.tolist())) / TOP_K for a, b in zip(n_e, n_ref)
    ]
    return {
        "cos_mean": cos.mean().item(),
        "cos_min": cos.min().item(),
        "top1": top1,
        "top10": sum(overlap) / len(overlap),
    }


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stderr}")
    return r.stdout


def restore(args, work, sparsity, mode, seed):
    name = f"s{sparsity}-{mode}-seed{seed}"
    file = work / f"{name}.udelta"
    restored = work / name
    run(
        [args.bin, "compress", "--base", args.pair / "base", "--finetuned",
         args.pair / "ft", "-o", file, "--sparsity", str(sparsity), "--embeddings",
         mode, "--seed", str(seed), "--adapter", "cpu", "--force", "-q", "--json"]
    )
    run([args.bin, "decompress", file, "--base", args.pair / "base", "-o", restored,
         "--force", "-q"])
    # The restored directory holds only weights: add the fine-tune's config and tokenizer.
    for f in SIDE_FILES:
        shutil.copy(args.pair / "ft" / f, restored / f)
    return restored, file.stat().st_size


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sparsity", default="0.9,0.95,0.97,0.99")
    p.add_argument("--embeddings", default="lossless,lossy,separate")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "udelta-gpu")
    p.add_argument("--pair", type=Path, default=ROOT / "target" / "testdata" / "minilm")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = p.parse_args()
    for d in ["base", "ft"]:
        for f in ["model.safetensors"] + SIDE_FILES:
            if not (args.pair / d / f).exists():
                sys.exit(f"{args.pair / d / f} is missing: run scripts/fetch-minilm.sh")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    texts = sentences()
    ft_dir = args.pair / "ft"
    ref = embed(ft_dir, texts, ft_dir)
    ft_bytes = tensor_bytes(ft_dir)
    base = compare(embed(args.pair / "base", texts, ft_dir), ref)
    rows = [("base (uncompressed)", "-", None, dict(base, top1_lo=base["top1"], top1_hi=base["top1"]))]
    work_ctx = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(work_ctx.name) if work_ctx else args.work
    work.mkdir(parents=True, exist_ok=True)
    for s in [float(x) for x in args.sparsity.split(",")]:
        for mode in args.embeddings.split(","):
            figures, sizes = [], []
            for seed in [int(x) for x in args.seeds.split(",")]:
                restored, size = restore(args, work, s, mode, seed)
                figures.append(compare(embed(restored, texts, ft_dir), ref))
                sizes.append(size)
                shutil.rmtree(restored)
            mean = {k: sum(f[k] for f in figures) / len(figures) for k in figures[0]}
            mean["top1_lo"] = min(f["top1"] for f in figures)
            mean["top1_hi"] = max(f["top1"] for f in figures)
            ratio = ft_bytes * len(sizes) / sum(sizes)
            rows.append((f"s = {s}", mode, ratio, mean))
            print(f"done: s = {s} {mode}", file=sys.stderr)
    print(f"{len(texts)} sentences, seeds {args.seeds}; reference: the uncompressed fine-tune "
          f"({ft_bytes} tensor bytes)")
    if args.markdown:
        print("| setting | --embeddings | whole-file ratio | cos mean | cos min | top-1 | "
              "top-1 range | top-10 |")
        print("|---|---|---|---|---|---|---|---|")
    for setting, mode, ratio, f in rows:
        r = "-" if ratio is None else f"{ratio:.1f}x"
        if args.markdown:
            print(f"| {setting} | {mode} | {r} | {f['cos_mean']:.4f} | {f['cos_min']:.4f} | "
                  f"{f['top1']:.3f} | {f['top1_lo']:.3f}-{f['top1_hi']:.3f} | {f['top10']:.3f} |")
        else:
            print(f"{setting:20} {mode:9} ratio {r:>8}  cos mean {f['cos_mean']:.4f}  "
                  f"min {f['cos_min']:.4f}  top-1 {f['top1']:.3f} ({f['top1_lo']:.3f}-"
                  f"{f['top1_hi']:.3f})  top-10 {f['top10']:.3f}")


if __name__ == "__main__":
    main()
