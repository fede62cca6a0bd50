"""Read safetensors headers without loading tensors: shapes, dtypes, and integrity checks."""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgequant.errors import EdgequantError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


def read_header(path: Path) -> list[TensorInfo]:
    """Return the tensors a safetensors file declares, checking the file holds all their bytes."""
    size = path.stat().st_size
    fix = f"re-create or re-download {path.name}; the file is truncated or not a safetensors file"
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise EdgequantError(f"{path} is too short to be a safetensors file", fix)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, 100_000_000):
            raise EdgequantError(f"{path} has a corrupt safetensors header", fix)
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise EdgequantError(f"{path} has a corrupt safetensors header", fix) from None
    if not isinstance(header, dict):
        raise EdgequantError(f"{path} has a corrupt safetensors header (not a mapping of tensors)", fix)
    tensors, data_end = [], 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info, (start, end) = _tensor_entry(path, name, entry, fix)
        if end - start != info.numel * _DTYPE_BYTES.get(info.dtype, 0) and info.dtype in _DTYPE_BYTES:
            raise EdgequantError(f"{path}: tensor {name!r} has inconsistent offsets", fix)
        data_end = max(data_end, end)
        tensors.append(info)
    if 8 + header_len + data_end > size:
        raise EdgequantError(
            f"{path} is truncated: its header needs {8 + header_len + data_end} bytes, the file has {size}",
            fix,
        )
    return tensors


def _tensor_entry(path: Path, name: str, entry, fix: str) -> tuple[TensorInfo, tuple[int, int]]:
    """One tensor's declaration, every field of the type and range the format allows."""
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError):
        dtype = shape = offsets = None
    if (not isinstance(dtype, str) or not isinstance(shape, list) or not all(whole(d) for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(whole(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise EdgequantError(f"{path}: tensor {name!r} has a corrupt header entry", fix)
    return TensorInfo(name, dtype, tuple(shape)), (offsets[0], offsets[1])


def folder_tensors(folder: Path) -> list[TensorInfo]:
    """Every tensor of every safetensors file in a Hugging Face folder."""
    return [t for f in sorted(folder.glob("*.safetensors")) for t in read_header(f)]


def dominant_dtype(tensors: list[TensorInfo]) -> str:
    """The dtype holding most parameters (safetensors names: F32, BF16, F16, ...)."""
    counts = Counter()
    for tensor in tensors:
        counts[tensor.dtype] += tensor.numel
    return counts.most_common(1)[0][0]
