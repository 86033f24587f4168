"""Fixtures: synthetic base/fine-tune pairs made, compressed and decompressed by the CLI.

Every expected tensor comes from files the CLI (`udelta-gpu decompress`) wrote, read with the
small independent safetensors reader below, never from the package under test.
"""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = os.environ.get("UDELTA_CLI", str(REPO / "target" / "debug" / "udelta-gpu"))
MINILM = REPO / "target" / "testdata" / "minilm"

NP_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "U8": "u1"}


def cli(*args):
    """Runs the CLI; returns its stdout, fails the test with its stderr."""
    p = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True)
    assert p.returncode == 0, f"udelta-gpu {' '.join(map(str, args))}: {p.stderr}"
    return p.stdout


def read_safetensors(path):
    """name -> (dtype, shape, bytes) of one .safetensors file or every one in a directory."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__", None)
        for name, h in header.items():
            a, b = h["data_offsets"]
            out[name] = (h["dtype"], tuple(h["shape"]), raw[8 + n + a : 8 + n + b])
    return out


def as_numpy(entry):
    dtype, shape, data = entry
    return np.frombuffer(data, dtype=NP_DTYPES[dtype]).reshape(shape)


def as_torch(entry):
    import torch

    dtype, shape, data = entry
    tdt = {
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "U8": torch.uint8,
    }[dtype]
    if not data:
        return torch.empty(shape, dtype=tdt)
    return torch.frombuffer(bytearray(data), dtype=tdt).reshape(shape).clone()


def torch_bytes(t):
    import torch

    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class Pair:
    """A synthetic base, its fine-tune(s), their .udelta files and CLI-restored checkpoints."""

    def __init__(self, root, base, fts):
        self.root, self.base, self.fts = root, base, fts
        self.udelta = [root / f"ft-{i + 1}.udelta" for i in range(len(fts))]
        self.restored = [root / f"restored-{i + 1}" for i in range(len(fts))]

    @property
    def expected(self):
        return read_safetensors(self.restored[0])


def make_pair(root, dtype="f16", shards=None, vocab_growth=0, models=1, base=None, ft=None,
              preset=("tiny",)):
    root = Path(root)
    if base is None:
        args = ["synth", "--out", root, "--preset", *preset, "--dtype", dtype, "-q"]
        args += ["--models", models, "--vocab-growth", vocab_growth]
        if shards:
            args += ["--shards", shards]
        cli(*args)
        base, fts = root / "base", [root / f"ft-{i + 1}" for i in range(models)]
    else:
        fts = [ft]
    pair = Pair(root, base, fts)
    for ft_dir, out, restored in zip(pair.fts, pair.udelta, pair.restored):
        cli("compress", "--base", base, "--finetuned", ft_dir, "-o", out, "--adapter", "cpu", "-q")
        cli("decompress", out, "--base", base, "-o", restored, "-q")
    return pair


CASES = {
    "f16": dict(dtype="f16"),
    "bf16": dict(dtype="bf16"),
    "f32": dict(dtype="f32"),
    "sharded-bf16": dict(dtype="bf16", shards=3),
    "vocab-growth-f16": dict(dtype="f16", vocab_growth=8),
}


@pytest.fixture(scope="session", params=sorted(CASES))
def pair(request, tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp(request.param), **CASES[request.param])


@pytest.fixture(scope="session")
def two_models(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("two"), dtype="bf16", models=2)


@pytest.fixture(scope="session")
def fused_experts(tmp_path_factory):
    """Two fine-tunes of a Qwen3-MoE-shaped model (fused 3-D experts, stored as matrices),
    one block, every size divided by 32."""
    preset = ("qwen3-moe", "--layers", 1, "--shrink", 32)
    return make_pair(tmp_path_factory.mktemp("fused"), dtype="bf16", models=2, preset=preset)


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    base, ft = MINILM / "base" / "model.safetensors", MINILM / "ft" / "model.safetensors"
    assert base.is_file() and ft.is_file(), "run scripts/fetch-minilm.sh first"
    return make_pair(tmp_path_factory.mktemp("minilm"), base=base, ft=ft)


def base_state_dict(pair):
    """The base checkpoint as torch tensors (read independently of the package)."""
    return {k: as_torch(v) for k, v in read_safetensors(pair.base).items()}


def module_from_state_dict(state):
    """A torch module whose parameters are `state`, nested by the dotted names."""
    import torch

    root = torch.nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    return root
