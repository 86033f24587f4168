"""Use UltraDelta-compressed fine-tunes (``.udelta`` files) from Python.

A ``.udelta`` file holds the compressed delta between a fine-tuned checkpoint and its base.
This package turns base + ``.udelta`` into ordinary tensors without writing a checkpoint:

- :func:`load_state_dict` streams the base tensor by tensor and returns the fine-tuned state
  dict (NumPy arrays or torch tensors), bit-identical to what ``udelta-gpu decompress`` writes;
- :func:`apply_` turns base weights already loaded (a torch module or state dict, any device)
  into the fine-tune in place, and :func:`swap_` switches a loaded model from one fine-tune
  of a base to another by touching only the entries the two files kept;
- :func:`open` reads a file's metadata and per-tensor deltas; :func:`compress`,
  :func:`decompress`, :func:`inspect` and :func:`rescale` mirror the CLI.

Every decode, check and restore runs in the same Rust library as the CLI (GIL released).
Every failure raises :class:`UdeltaError` with the CLI's message.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _udelta
from ._udelta import UdeltaError

__all__ = [
    "UdeltaError",
    "UdeltaFile",
    "Applied",
    "open",
    "inspect",
    "load_state_dict",
    "iter_tensors",
    "apply_",
    "swap_",
    "compress",
    "plan",
    "decompress",
    "rescale",
]

PathLike = Union[str, "os.PathLike[str]"]

# Safetensors dtype name -> NumPy dtype. BF16 has no NumPy type: NumPy gets its raw bit
# patterns as uint16 (``framework="np"``), torch gets real ``torch.bfloat16``.
_NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

# Torch dtype name -> safetensors name; filled lazily (torch is optional).
_TORCH_NAMES: Dict[Any, str] = {}


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise UdeltaError(f"this needs torch, which is not installed: {e}") from e
    if not _TORCH_NAMES:
        _TORCH_NAMES.update(
            {
                torch.float64: "F64",
                torch.float32: "F32",
                torch.float16: "F16",
                torch.bfloat16: "BF16",
                torch.int64: "I64",
                torch.int32: "I32",
                torch.int16: "I16",
                torch.int8: "I8",
                torch.uint8: "U8",
                torch.bool: "BOOL",
            }
        )
    return torch


def _torch_dtype(name: str):
    _torch()  # fills _TORCH_NAMES
    for dt, n in _TORCH_NAMES.items():
        if n == name:
            return dt
    raise UdeltaError(f"dtype {name} has no torch equivalent")


def _numpy_dtype(name: str):
    try:
        return np.dtype(_NUMPY_DTYPES[name]).newbyteorder("<")
    except KeyError:
        raise UdeltaError(f"dtype {name} has no NumPy equivalent") from None


def _array(data: bytearray, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """A NumPy array over ``data`` (no copy), of the safetensors ``dtype`` and ``shape``."""
    return np.frombuffer(data, dtype=_numpy_dtype(dtype)).reshape(tuple(shape))


def _tensor(data: bytearray, dtype: str, shape: Sequence[int], device=None):
    """A torch tensor over ``data`` (no copy on the CPU), moved to ``device`` if given."""
    torch = _torch()
    tdt = _torch_dtype(dtype)
    if len(data) == 0:
        t = torch.empty(tuple(shape), dtype=tdt)
    else:
        t = torch.frombuffer(data, dtype=tdt).reshape(tuple(shape))
    return t if device is None else t.to(device)


# ----------------------------------------------------------------------------- the CLI


def inspect(path: PathLike) -> Dict[str, Any]:
    """What a ``.udelta`` file holds, as a dict.

    Keys: ``"index"`` (the file's JSON index: format version, parameters, ``model`` with
    ``gamma`` and ``scale``, ``base`` with its ``fingerprint``, the fine-tune's layout, and one
    record per tensor) and ``"report"`` (what ``udelta-gpu inspect --json`` prints: per-tensor
    sizes, rates, totals and ratios).
    """
    return json.loads(_udelta.inspect_json(os.fspath(path)))


def compress(
    base: PathLike,
    finetuned: Union[PathLike, Sequence[PathLike]],
    output: PathLike,
    *,
    sparsity: Optional[float] = None,
    target_size: Optional[Union[int, str]] = None,
    target_ratio: Optional[float] = None,
    bits: int = 4,
    step: float = 0.01,
    factor: float = 1.0,
    seed: int = 0,
    adapter: str = "auto",
    gpu_mem: str = "1GiB",
    include: Optional[str] = None,
    exclude: Optional[str] = None,
    embeddings: str = "lossy",
    side_files: bool = True,
    with_remote_code: bool = False,
    model_name: Optional[str] = None,
    verify: bool = False,
    trace_norm: bool = False,
    gamma: Optional[float] = None,
    force: bool = False,
    progress: bool = True,
) -> List[str]:
    """``udelta-gpu compress``: writes the ``.udelta`` file(s); returns their paths.

    The options are the CLI's (``--sparsity``, default 0.95, ``--bits``, ``--embeddings
    lossy|lossless|separate``, ...); ``side_files=False`` is ``--no-side-files``,
    ``with_remote_code=True`` is ``--with-remote-code``; ``target_size`` (bytes, or a size
    such as ``"25MB"``) or ``target_ratio`` (the whole-file ratio) choose the sparsity instead
    of ``sparsity``. With several fine-tunes, ``output`` is a directory receiving
    ``NAME.udelta`` each. :func:`plan` is the same call as a dry run.
    """
    files, _ = _compress(base, finetuned, output, locals(), dry_run=False)
    return [os.fspath(f) for f in files]


def plan(base: PathLike, finetuned: Union[PathLike, Sequence[PathLike]], output: PathLike, **options) -> Dict[str, Any]:
    """``udelta-gpu compress --dry-run --json``: what :func:`compress` with the same arguments
    would compress, store and compare, the parameter counts and the expected file size with
    its error bound, from the headers and a small sample of the data; writes nothing."""
    known = dict(compress.__kwdefaults__)
    unknown = set(options) - set(known)
    if unknown:
        raise TypeError(f"plan() got unexpected keyword arguments: {sorted(unknown)}")
    known.update(options)
    _, report = _compress(base, finetuned, output, known, dry_run=True)
    return json.loads(report)


def _compress(base, finetuned, output, o, dry_run: bool):
    """Calls the library's compress with the options ``o`` (the keyword arguments of
    :func:`compress`)."""
    if isinstance(finetuned, (str, bytes, os.PathLike)):
        finetuned = [finetuned]
    if o["sparsity"] is not None and (o["target_size"] is not None or o["target_ratio"] is not None):
        raise UdeltaError("give sparsity or a target size/ratio, not both")
    return _udelta.compress(
        os.fspath(base),
        [os.fspath(f) for f in finetuned],
        os.fspath(output),
        0.95 if o["sparsity"] is None else float(o["sparsity"]),
        int(o["bits"]),
        float(o["step"]),
        float(o["factor"]),
        int(o["seed"]),
        o["adapter"],
        str(o["gpu_mem"]),
        o["include"],
        o["exclude"],
        str(o["embeddings"]),
        bool(o["side_files"]),
        bool(o["with_remote_code"]),
        o["model_name"],
        bool(o["verify"]),
        bool(o["trace_norm"]),
        None if o["gamma"] is None else float(o["gamma"]),
        bool(o["force"]),
        bool(o["progress"]),
        None if o["target_size"] is None else str(o["target_size"]),
        None if o["target_ratio"] is None else float(o["target_ratio"]),
        dry_run,
    )


def decompress(
    path: PathLike,
    base: PathLike,
    output: PathLike,
    *,
    delta_only: bool = False,
    force: bool = False,
    progress: bool = True,
) -> None:
    """``udelta-gpu decompress``: writes the fine-tuned checkpoint into directory ``output``."""
    _udelta.decompress(
        os.fspath(path), os.fspath(base), os.fspath(output), delta_only, force, progress
    )


def rescale(files: Sequence[PathLike]) -> List[float]:
    """``udelta-gpu rescale``: trace-norm rescaling across files of one base compressed
    separately (each with ``trace_norm=True``); returns each file's new gamma."""
    return list(_udelta.rescale([os.fspath(f) for f in files]))


# ----------------------------------------------------------------------------- a file


class UdeltaFile:
    """An opened ``.udelta`` file: metadata and per-tensor deltas. Get one with :func:`open`."""

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        self._file = _udelta.File(self.path)
        described = json.loads(self._file.describe_json())
        self.index: Dict[str, Any] = described["index"]
        self.report: Dict[str, Any] = described["report"]
        self._records = {r["name"]: r for r in self.index["tensors"]}

    @property
    def tensors(self) -> List[str]:
        """Tensor names of the fine-tune, in file order."""
        return [r["name"] for r in self.index["tensors"]]

    def record(self, name: str) -> Dict[str, Any]:
        """The index record of tensor ``name`` (``kind``: unchanged, compressed, coded or raw)."""
        try:
            return self._records[name]
        except KeyError:
            raise UdeltaError(f"{self.path}: no tensor named '{name}' in this file") from None

    def kind(self, name: str) -> str:
        """``"unchanged"``, ``"compressed"`` (UltraDelta), ``"coded"`` (stored whole, coded
        losslessly, against the base's tensor when ``record(name)["base"]`` is set) or ``"raw"``
        (stored whole, version-1 files)."""
        return self.record(name)["kind"]

    def shape(self, name: str) -> Tuple[int, ...]:
        """The fine-tune's shape of tensor ``name``."""
        return tuple(self.record(name)["shape"])

    def dtype(self, name: str) -> str:
        """The fine-tune's dtype of tensor ``name`` (safetensors spelling: F16, BF16, ...)."""
        return self.record(name)["dtype"]

    @property
    def gamma(self) -> float:
        """Trace-norm rescaling factor."""
        return self.index["model"]["gamma"]

    @property
    def scale(self) -> float:
        """What every kept value was multiplied by (``gamma * factor / (1 - s)``)."""
        return self.index["model"]["scale"]

    @property
    def base_fingerprint(self) -> str:
        """The identity of the base checkpoint the file was made against."""
        return self.index["base"]["fingerprint"]

    @property
    def params(self) -> Dict[str, Any]:
        """The UltraDelta parameters (sparsity, bits, step, factor, seed)."""
        return self.index["params"]

    def rates(self) -> Dict[str, float]:
        """Pruning rate of each compressed tensor."""
        return {
            r["name"]: r["rate"] for r in self.index["tensors"] if r["kind"] == "compressed"
        }

    def kept(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        """``(positions, values)`` of compressed tensor ``name``: the flat positions (int64,
        increasing, into the base tensor) and the float32 value restoring adds at each —
        exactly what ``decompress`` adds before rounding to the tensor's dtype."""
        positions, values = self._file.kept(name)
        return (
            np.frombuffer(positions, dtype="<u4").astype(np.int64),
            np.frombuffer(values, dtype="<f4"),
        )

    def delta(self, name: str) -> np.ndarray:
        """The dense float32 delta of compressed tensor ``name``, shaped like the base tensor
        (zero where nothing was kept)."""
        shape = self.record(name)["base_shape"]
        return np.frombuffer(self._file.delta(name), dtype="<f4").reshape(tuple(shape))

    def stored(self, name: str, base: Optional[PathLike] = None) -> np.ndarray:
        """The fine-tune's tensor ``name`` stored whole in the file (kind ``coded`` or ``raw``).
        A tensor coded against the base's needs ``base`` (the base checkpoint, checked).
        BF16 comes as its uint16 bit patterns."""
        r = self.record(name)
        data = self._file.stored(name, None if base is None else os.fspath(base))
        return _array(data, r["dtype"], r["shape"])

    def __repr__(self) -> str:
        return f"UdeltaFile({self.path!r}, {len(self._records)} tensors)"


def open(path: PathLike) -> UdeltaFile:  # noqa: A001 - mirrors the builtin on purpose
    """Opens a ``.udelta`` file (checks its structure; raises :class:`UdeltaError`)."""
    return UdeltaFile(path)


# ----------------------------------------------------------------------------- loading


def iter_tensors(
    base: PathLike,
    path: PathLike,
    *,
    framework: str = "pt",
    device=None,
    force: bool = False,
    progress: bool = True,
) -> Iterator[Tuple[str, Any]]:
    """Yields ``(name, tensor)`` of the fine-tune, one at a time, in file order; see
    :func:`load_state_dict`."""
    if framework not in ("pt", "np"):
        raise UdeltaError(f"framework '{framework}': expected 'pt' or 'np'")
    if framework == "pt":
        _torch()
    restorer = _udelta.Restorer(os.fspath(path), os.fspath(base), force, progress)
    for name, dtype, shape, data in restorer:
        if framework == "np":
            yield name, _array(data, dtype, shape)
        else:
            yield name, _tensor(data, dtype, shape, device)


def load_state_dict(
    base: PathLike,
    path: PathLike,
    framework: str = "pt",
    device=None,
    *,
    force: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """The fine-tuned state dict from the base checkpoint and a ``.udelta`` file, without
    writing a checkpoint.

    ``base`` is what ``decompress --base`` takes (a .safetensors file, a directory, or a
    sharded index). The base is read one tensor at a time and checked against the CRC-32s the
    file recorded (a wrong base raises :class:`UdeltaError`; ``force=True`` skips the check),
    so memory beyond the result is about one tensor. Values are bit-identical to
    ``decompress``'s output, in the checkpoint's own dtypes: with ``framework="pt"`` torch
    tensors (``torch.bfloat16`` for BF16), moved to ``device`` if given; with ``"np"`` NumPy
    arrays, BF16 as its raw uint16 bit patterns (NumPy has no bfloat16). ``progress`` shows
    the CLI's progress bar (on a terminal).
    """
    return dict(
        iter_tensors(base, path, framework=framework, device=device, force=force, progress=progress)
    )


# ----------------------------------------------------------------------------- in place


class Applied:
    """What :func:`apply_` changed in a model, to put the base back (used by :func:`swap_`).

    Kept compactly: for each compressed tensor only the base values at the kept entries (in
    the tensor's dtype: a ``bytearray`` for tensors applied in place on the CPU, else a tensor
    on their device; the positions are decoded again from the file when undoing); whole
    copies only of tensors that were replaced (stored whole, or whose shape or dtype the
    fine-tune changed).
    """

    def __init__(self, path: str, base: Dict[str, Any], base_crcs: Dict[str, int]):
        self.path = path
        self.fingerprint = base["fingerprint"]
        self.identity = base.get("identity")
        # The CRC-32 of every base tensor apply_ checked (name -> CRC).
        self.base_crcs = base_crcs
        self.scattered: Dict[str, Any] = {}
        self.replaced: Dict[str, Any] = {}
        self.dropped: Dict[str, Any] = {}
        self.added: List[str] = []

    def nbytes(self) -> int:
        """Bytes held to undo."""
        held = [*self.scattered.values(), *self.replaced.values()]
        return sum(len(t) if isinstance(t, bytearray) else t.numel() * t.element_size() for t in held)


class _Target:
    """Name -> tensor access to a torch module or a state dict, with replacement."""

    def __init__(self, target):
        torch = _torch()
        self.module = target if isinstance(target, torch.nn.Module) else None
        if self.module is not None:
            self.tensors = dict(self.module.state_dict(keep_vars=True))
            self.prefix = getattr(self.module, "base_model_prefix", "") or ""
        elif isinstance(target, Mapping):
            self.tensors = target
            self.prefix = ""
        else:
            raise UdeltaError(
                f"apply_: expected a torch.nn.Module or a dict of tensors, got {type(target).__name__}"
            )
        self.origin = "model" if self.module is not None else "state dict"
        self.views: Dict[str, Dict[str, Any]] = {}

    def add_views(self, path: str, records) -> None:
        """Registers the matrix views among ``records`` (fused experts stored as their
        matrices, format version 3): the file's tensor ``NAME[e]`` is then matrix ``e`` of the
        target's tensor ``NAME``, a view into its memory."""
        for r in records:
            m = r.get("matrix_of")
            if m is None:
                continue
            if r["kind"] not in ("compressed", "unchanged"):
                raise UdeltaError(
                    f"{path}: tensor '{r['name']}': a matrix of '{m['name']}' stored "
                    f"{r['kind']}, which apply_ cannot write into the fused tensor: use "
                    "load_state_dict or iter_tensors"
                )
            self.views[r["name"]] = m

    def whole_name(self, name: str) -> str:
        """The target's tensor that the file's tensor ``name`` lies in (itself unless a view)."""
        m = self.views.get(name)
        return name if m is None else m["name"]

    def key(self, name: str) -> Optional[str]:
        """The target's key for the file's tensor ``name`` (allowing the model's prefix)."""
        if name in self.tensors:
            return name
        p = self.prefix
        if p and f"{p}.{name}" in self.tensors:
            return f"{p}.{name}"
        if p and name.startswith(p + ".") and name[len(p) + 1 :] in self.tensors:
            return name[len(p) + 1 :]
        return None

    def get(self, name: str):
        m = self.views.get(name)
        if m is not None:
            return self._matrix(m)
        key = self.key(name)
        if key is None:
            raise UdeltaError(
                f"{self.origin}: tensor '{name}': missing from the {self.origin}, "
                "but the .udelta file was made against a base that has it"
            )
        return self.tensors[key]

    def _matrix(self, m):
        """Matrix ``m["index"]`` of the fused tensor ``m["name"]``, checked to have the
        shape the file was made against."""
        whole = self.get(m["name"])
        if list(whole.shape) != list(m["shape"]):
            raise UdeltaError(
                f"{self.origin}: tensor '{m['name']}': shape {list(whole.shape)}, but the .udelta "
                f"file was made against a base of shape {list(m['shape'])}: wrong base"
            )
        return whole[m["index"]]

    def replace(self, name: str, new) -> None:
        key = self.key(name)
        if self.module is None:
            self.tensors[key or name] = new
            return
        if key is None:
            raise UdeltaError(f"model: tensor '{name}': in the fine-tune, but the model has no such tensor")
        torch = _torch()
        owner_name, _, attr = key.rpartition(".")
        owner = self.module.get_submodule(owner_name) if owner_name else self.module
        old = getattr(owner, attr)
        if isinstance(old, torch.nn.Parameter):
            old.data = new
        else:
            owner._buffers[attr] = new
        self.tensors[key] = getattr(owner, attr)


def _host_view(t) -> np.ndarray:
    """The bytes of tensor ``t`` on the host, as a flat NumPy array (copies only off-CPU)."""
    torch = _torch()
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def _crc32(t) -> int:
    """CRC-32 of tensor ``t``'s bytes (the library's, hardware-accelerated, GIL released)."""
    a = _host_view(t)
    return _udelta.crc32_at(a.ctypes.data, a.nbytes)


def _dtype_name(t) -> str:
    _torch()
    try:
        return _TORCH_NAMES[t.dtype]
    except KeyError:
        raise UdeltaError(f"tensor of dtype {t.dtype}: not a safetensors dtype") from None


def _check_all(file: UdeltaFile, target: _Target, records, checksum, force: bool) -> None:
    """Refuses a wrong base before anything is changed: dtype and shape of every tensor the
    file needs from the base, and (for the names ``checksum(name)`` accepts, unless ``force``)
    the CRC-32 of its bytes."""
    for r in records:
        if _stored_alone(r):
            continue
        t = target.get(r["name"])
        crc = _crc32(t) if checksum(r["name"]) and not force else None
        file._file.check_base(r["name"], target.origin, _dtype_name(t), list(t.shape), crc)


def _base_crcs(records) -> Dict[str, int]:
    """The CRC-32 of every base tensor the records need (name -> CRC)."""
    out = {}
    for r in records:
        if r["kind"] in ("unchanged", "compressed"):
            out[r["name"]] = r["base_crc32"]
        elif r["kind"] == "coded" and r.get("base") is not None:
            out[r["name"]] = r["base"]["crc32"]
    return out


def _check_same_base(to_file: UdeltaFile, applied: Applied) -> bool:
    """Refuses ``to_file`` if it was made against another base than the file ``applied``
    records (another fingerprint of the same kind, or another CRC-32 for a base tensor both
    need). Returns the base tensors it needs that apply_ did not check."""
    base = to_file.index["base"]
    if base.get("identity") == applied.identity and base["fingerprint"] != applied.fingerprint:
        raise UdeltaError(
            f"{to_file.path}: made against another base (fingerprint {base['fingerprint']}, "
            f"the model's base has {applied.fingerprint}): wrong base"
        )
    unchecked = set()
    for name, crc in _base_crcs(to_file.index["tensors"]).items():
        have = applied.base_crcs.get(name)
        if have is None:
            unchecked.add(name)
        elif have != crc:
            raise UdeltaError(
                f"{to_file.path}: tensor '{name}': made against another base (base CRC-32 "
                f"{crc:08x}, the model's base has {have:08x}): wrong base"
            )
    return unchecked


def _stored_alone(r) -> bool:
    """Whether record ``r`` restores without any base tensor (raw, or coded alone)."""
    return r["kind"] == "raw" or (r["kind"] == "coded" and r.get("base") is None)


def _scatters(r) -> bool:
    """Whether record ``r`` is applied by a scatter into the base tensor (same dtype, shape)."""
    return r["kind"] == "compressed" and (r["dtype"], r["shape"]) == (r["base_dtype"], r["base_shape"])


def _fetch(file: UdeltaFile, r):
    """What applying record ``r`` needs from the file (decoded in the library, GIL released)."""
    if _stored_alone(r):
        return file._file.stored(r["name"])
    if _scatters(r):
        return file.kept(r["name"])
    return None


def _ahead(fetch, items):
    """``(item, fetch(item))`` in order, fetching one item ahead on a thread, so that decoding
    the next tensor (GIL released) overlaps working on this one (memory: one item ahead)."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(fetch, items[0]) if items else None
        for i, item in enumerate(items):
            data = pending.result()
            pending = pool.submit(fetch, items[i + 1]) if i + 1 < len(items) else None
            yield item, data


def _in_place(t) -> bool:
    """Whether tensor ``t`` is scattered into by the library itself, in its memory (a
    contiguous CPU tensor): no index tensors, no float32 copies, both cores."""
    return t.device.type == "cpu" and t.is_contiguous()


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _workers():
    """A pool for per-tensor library calls (each releases the GIL): one thread per core."""
    return ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))


def _in_order(call, names):
    """Runs ``call(name)`` for every name on the worker pool and yields ``(name, result)`` in
    order as the results come (so the caller can free what each one replaces). A failure is
    raised only after every call has finished and every success was yielded: the caller's
    record then matches what was changed."""
    failure = None
    with _workers() as pool:
        for name, future in [(n, pool.submit(call, n)) for n in names]:
            try:
                result = future.result()
            except Exception as e:  # re-raised below, once the others are recorded
                failure = failure or e
                continue
            yield name, result
    if failure is not None:
        raise failure


def _apply_in_place(target: _Target, file: UdeltaFile, names: List[str], applied: Applied) -> None:
    """Applies the compressed tensors ``names`` (contiguous CPU tensors of the target) in
    their memory, several at a time, recording the overwritten base values."""

    def one(name):
        t = target.get(name)
        return file._file.apply_at(name, t.data_ptr(), _nbytes(t), _dtype_name(t))

    for name, old in _in_order(one, names):
        applied.scattered[name] = old


def _undo_in_place(target: _Target, file: UdeltaFile, names: List[str], applied: Applied) -> None:
    """Puts back the base values of the tensors ``names`` applied in place, freeing each
    tensor's record as soon as it is undone."""

    def one(name):
        t = target.get(name)
        old = np.frombuffer(applied.scattered[name], dtype=np.uint8)
        file._file.undo_at(name, t.data_ptr(), _nbytes(t), _dtype_name(t), old.ctypes.data, old.nbytes)

    for name, _ in _in_order(one, names):
        del applied.scattered[name]


def _swap_in_place(
    target: _Target, from_file: UdeltaFile, to_file: UdeltaFile, names: List[str], old: Applied, new: Applied
) -> None:
    """Switches the tensors ``names`` (contiguous CPU tensors holding ``from_file``'s
    fine-tune, applied in place) to ``to_file``'s in one pass over each, several at a time:
    ``old``'s record of each is consumed, ``new``'s filled."""

    def one(name):
        t = target.get(name)
        was = np.frombuffer(old.scattered[name], dtype=np.uint8)
        return to_file._file.swap_at(
            name, t.data_ptr(), _nbytes(t), _dtype_name(t), from_file._file, was.ctypes.data, was.nbytes
        )

    for name, record in _in_order(one, names):
        del old.scattered[name]
        new.scattered[name] = record


def _swappable(target: _Target, from_file: UdeltaFile, to_file: UdeltaFile, applied: Applied) -> List[str]:
    """The tensors both files scatter into, applied in place by ``from_file``: they are
    switched in one pass (the views of both files registered on ``target``)."""
    target.add_views(from_file.path, from_file.index["tensors"])
    target.add_views(to_file.path, to_file.index["tensors"])
    from_records = {r["name"]: r for r in from_file.index["tensors"]}
    return [
        r["name"]
        for r in to_file.index["tensors"]
        if _scatters(r)
        and isinstance(applied.scattered.get(r["name"]), bytearray)
        and _scatters(from_records.get(r["name"], {"kind": None}))
        and _in_place(target.get(r["name"]))
    ]


def _update_flat(t, update):
    """``update(flat)`` on a flat view of ``t``'s elements; for a strided ``t``, on a flat
    copy that is then written back. Returns what ``update`` returns."""
    if t.is_contiguous():
        return update(t.view(-1))
    flat = t.reshape(-1).clone()
    result = update(flat)
    t.copy_(flat.view(t.shape))
    return result


def _apply_record(target: _Target, file: UdeltaFile, r, data, applied: Applied) -> None:
    """Applies one tensor's record (with its fetched ``data``) to the checked target,
    recording how to undo it."""
    torch = _torch()
    name, kind = r["name"], r["kind"]
    if kind == "unchanged":
        return
    if _stored_alone(r):
        key = target.key(name)
        old = target.tensors[key] if key is not None else None
        device = old.device if old is not None else None
        if old is not None:
            applied.replaced[name] = old.detach()  # its own storage: replace rebinds a Parameter's
        else:
            applied.added.append(name)
        target.replace(name, _tensor(data, r["dtype"], r["shape"], device))
        return
    t = target.get(name)
    if not _scatters(r):
        base_dtype = r["base_dtype"] if kind == "compressed" else r["dtype"]
        restored = file._file.restore(name, _host_view(t).tobytes(), base_dtype)
        applied.replaced[name] = t.detach()  # the base's storage, kept when the Parameter is rebound
        target.replace(name, _tensor(restored, r["dtype"], r["shape"], t.device))
        return
    positions, values = (torch.from_numpy(a).to(t.device) for a in data)

    def add(flat):
        old = flat[positions]
        flat[positions] = (old.float() + values).to(t.dtype)
        return old

    applied.scattered[name] = _update_flat(t, add)


def apply_(model_or_state_dict, path: PathLike, *, force: bool = False) -> Applied:
    """Turns base weights already loaded into the fine-tune of ``path``, in place.

    ``model_or_state_dict`` is a ``torch.nn.Module`` or a dict of torch tensors, on any
    device, holding the base the file was made against (names as in the checkpoint; a
    model's ``base_model_prefix`` may be added or dropped). For each compressed tensor the
    kept entries become ``dtype(float32(base) + delta)``, exactly as ``decompress`` computes
    them; tensors stored whole are copied in; tensors whose shape or dtype the fine-tune
    changed (vocabulary growth) are replaced by new ones (for a module, ``param.data``).
    A state dict also loses the base tensors the fine-tune does not have (a module keeps them).

    Before anything is changed every base tensor is checked against the file: dtype, shape and
    the CRC-32 of its bytes (computed on the host: device tensors are copied to the host one
    at a time). A mismatch raises :class:`UdeltaError` naming the tensor and leaves the
    weights untouched; ``force=True`` skips the CRC-32 check. Returns an :class:`Applied`
    record (also kept on a module as ``module._udelta_applied``) that :func:`swap_` uses.
    """
    return _apply(model_or_state_dict, open(path), checksum=lambda name: True, force=force)


def _drop_extra(target: _Target, file: UdeltaFile, applied: Applied) -> None:
    """Removes from a state dict the base tensors the fine-tune does not have (as
    ``decompress`` does not write them), keeping them in ``applied`` to put back."""
    keep = {target.key(n) or n for n in map(target.whole_name, file.tensors)}
    for key in [k for k in target.tensors if k not in keep]:
        applied.dropped[key] = target.tensors.pop(key)


def _apply(target_obj, file: UdeltaFile, checksum, force: bool, swapping=None) -> Applied:
    """Applies ``file`` to the target. ``swapping = (from_file, from_applied, names)``: the
    tensors ``names`` still hold ``from_file``'s fine-tune and are switched in one pass."""
    torch = _torch()
    target = _Target(target_obj)
    records = file.index["tensors"]
    target.add_views(file.path, records)
    _check_all(file, target, records, checksum, force)
    applied = Applied(file.path, file.index["base"], _base_crcs(records))
    in_place = [r["name"] for r in records if _scatters(r) and _in_place(target.get(r["name"]))]
    swapped = set(swapping[2]) if swapping else set()
    rest = [r for r in records if r["name"] not in set(in_place)]
    with torch.no_grad():
        if swapping:
            _swap_in_place(target, swapping[0], file, swapping[2], swapping[1], applied)
        _apply_in_place(target, file, [n for n in in_place if n not in swapped], applied)
        for r, data in _ahead(lambda r: _fetch(file, r), rest):
            _apply_record(target, file, r, data, applied)
    if target.module is None:
        _drop_extra(target, file, applied)
    else:
        target.module._udelta_applied = applied
    return applied


def _undo(target: _Target, applied: Applied, keep=()) -> None:
    """Puts back the base values ``applied`` recorded, emptying it as it goes (so that its
    memory is free before the next file is applied), except for the tensors ``keep`` (which a
    swap switches in one pass)."""
    torch = _torch()
    file = open(applied.path)
    target.add_views(file.path, file.index["tensors"])
    keep = set(keep)
    host = [n for n, old in applied.scattered.items() if isinstance(old, bytearray) and n not in keep]
    with torch.no_grad():
        _undo_in_place(target, file, host, applied)
        on_device = [n for n in applied.scattered if n not in keep]
        for name, (positions, _) in _ahead(file.kept, on_device):
            old = applied.scattered.pop(name)
            t = target.get(name)
            at = torch.from_numpy(positions).to(t.device)
            _update_flat(t, lambda flat: flat.index_put_((at,), old))
        for name, old in applied.replaced.items():
            target.replace(name, old)
        applied.replaced.clear()
        if target.module is None:
            for name in applied.added:
                target.tensors.pop(name, None)
            target.tensors.update(applied.dropped)
            applied.dropped.clear()


def swap_(
    model,
    from_path: PathLike,
    to_path: PathLike,
    *,
    applied: Optional[Applied] = None,
) -> Applied:
    """Switches a model (or state dict) from the fine-tune ``from_path`` to ``to_path``, in
    place: puts the base values back at the entries ``from_path`` touched, then applies
    ``to_path``. The result is bit-identical to loading ``to_path``'s fine-tune fresh.

    ``from_path`` must be the file last applied with :func:`apply_` (its record is
    ``model._udelta_applied``, or pass ``applied=`` for a state dict). Instead of checksumming
    every tensor again, the two files must have been made against the same base (same base
    fingerprint, same CRC-32 for every base tensor both need): the undo restores exactly the
    base that :func:`apply_` checked. Base tensors ``to_path`` needs that ``from_path`` did not
    are checksummed. Contiguous CPU tensors that both files compress are switched in one pass
    over their memory (the same bytes as undoing, then applying).
    """
    applied = applied if applied is not None else getattr(model, "_udelta_applied", None)
    if applied is None:
        raise UdeltaError("swap_: nothing was applied to this model (call apply_ first)")
    if os.path.abspath(os.fspath(from_path)) != os.path.abspath(applied.path):
        raise UdeltaError(
            f"swap_: the model holds {applied.path}, not {os.fspath(from_path)}"
        )
    to_file = open(to_path)
    unchecked = _check_same_base(to_file, applied)
    target = _Target(model)
    from_file = open(applied.path)
    both = _swappable(target, from_file, to_file, applied)
    _undo(target, applied, keep=both)
    try:
        return _apply(model, to_file, checksum=unchecked.__contains__, force=False, swapping=(from_file, applied, both))
    except UdeltaError:
        # Tensors not switched yet still hold the first fine-tune: put the base back there
        # too, as for every other tensor the undo reached.
        _undo(target, applied)
        raise
