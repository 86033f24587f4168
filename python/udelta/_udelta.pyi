"""Type stubs of the Rust extension (``udelta._udelta``). Use the ``udelta`` package instead:
these functions take and return raw little-endian bytes."""

from typing import Iterator, List, Optional, Sequence, Tuple

class UdeltaError(Exception):
    """Any failure of udelta; the message is the CLI's."""

def inspect_json(path: str) -> str: ...
def compress(
    base: str,
    finetuned: Sequence[str],
    output: str,
    sparsity: float,
    bits: int,
    step: float,
    factor: float,
    seed: int,
    adapter: str,
    gpu_mem: str,
    include: Optional[str],
    exclude: Optional[str],
    embeddings: str,
    side_files: bool,
    with_remote_code: bool,
    model_name: Optional[str],
    verify: bool,
    trace_norm: bool,
    gamma: Optional[float],
    force: bool,
    progress: bool,
) -> List[str]: ...
def decompress(
    input: str, base: str, output: str, delta_only: bool, force: bool, progress: bool
) -> None: ...
def rescale(files: Sequence[str]) -> List[float]: ...
def crc32_at(addr: int, len: int) -> int: ...

class File:
    def __init__(self, path: str) -> None: ...
    def describe_json(self) -> str: ...
    def kept(self, name: str) -> Tuple[bytearray, bytearray]: ...
    def delta(self, name: str) -> bytearray: ...
    def stored(self, name: str, base: Optional[str] = None) -> bytearray: ...
    def check_base(
        self, name: str, origin: str, dtype: str, shape: Sequence[int], crc32: Optional[int] = None
    ) -> None: ...
    def restore(
        self, name: str, base_bytes: Optional[bytes] = None, base_dtype: Optional[str] = None
    ) -> bytearray: ...

class Restorer(Iterator[Tuple[str, str, List[int], bytearray]]):
    def __init__(self, path: str, base: str, force: bool = False, progress: bool = False) -> None: ...
    def __iter__(self) -> "Restorer": ...
    def __next__(self) -> Tuple[str, str, List[int], bytearray]: ...
