"""Importance matrices as llama.cpp stores them, read and written without llama.cpp's tools.

An importance matrix holds, for every weight matrix a GGUF model multiplies its activations with,
the sum over calibration tokens of each input column's squared activation (`in_sum2`) and how
many activation rows were summed (`counts`). llama.cpp's quantizer weighs each column's rounding
error by the mean, sum / count, so the columns that carry large activations are kept closest.

Two layouts are read: the GGUF one llama.cpp's `llama-imatrix` writes today (`general.type =
imatrix`, tensors `<name>.in_sum2` of shape [n_mat, n_in] and `<name>.counts` of shape [n_mat, 1],
metadata `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`) and its legacy `.dat`
(per tensor: the mean times the number of chunks, and that number). The GGUF layout is written,
so a file made here can be handed to `llama-quantize --imatrix` as is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgequant.errors import EdgequantError

GGUF_MAGIC = b"GGUF"
LEGACY_CHUNK = 512  # llama-imatrix's default context: the token count a legacy file's "call" stands for
_ALIGN = 32


@dataclass
class ImportanceMatrix:
    sums: dict[str, np.ndarray]  # GGUF tensor name -> float32 [n_mat, n_in]: sum of squared inputs
    counts: dict[str, np.ndarray]  # GGUF tensor name -> float32 [n_mat]: activation rows summed
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = LEGACY_CHUNK

    def importance(self) -> dict[str, np.ndarray]:
        """Per tensor, the flat float32 vector llama_model_quantize takes: each column's mean
        squared activation; a matrix no calibration row reached weighs every column alike (1), as
        llama.cpp does."""
        out = {}
        for name, sums in self.sums.items():
            counts = self.counts[name].reshape(-1, 1)
            mean = np.divide(sums, counts, out=np.ones_like(sums), where=counts > 0)
            out[name] = np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)
        return out


def read_imatrix(path: Path) -> ImportanceMatrix:
    """An importance matrix from llama.cpp's GGUF layout or its legacy `.dat` layout."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EdgequantError(f"no importance matrix file at {path}",
                             "pass a file written by `edgequant imatrix` or `llama-imatrix`, or use imatrix=auto")
    with path.open("rb") as fh:
        magic = fh.read(4)
    try:
        return _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:
        raise EdgequantError(f"{path} is not a llama.cpp importance matrix ({exc})",
                             "pass a .gguf or .dat file written by `edgequant imatrix` or `llama-imatrix`") from None


def _read_gguf(path: Path) -> ImportanceMatrix:
    from gguf import GGUFReader

    from edgequant.sources.gguf_header import check_header

    check_header(path)  # a HeaderProblem is a ValueError: refused below with its words
    reader = GGUFReader(path)
    fields = reader.fields
    kind = _field_value(fields.get("general.type"))
    if kind != "imatrix":
        raise ValueError(f"general.type is {kind!r}, not 'imatrix'")
    by_name = {t.name: t for t in reader.tensors}
    sums, counts = {}, {}
    for key, tensor in by_name.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key[: -len(".in_sum2")]
        sums[name] = np.array(tensor.data, dtype=np.float32).reshape(-1, int(tensor.shape[0]))  # shape lists n_in first
        counts[name] = np.array(by_name[f"{name}.counts"].data, dtype=np.float32).reshape(-1)
        if counts[name].size != sums[name].shape[0]:
            raise ValueError(f"{name}: {counts[name].size} counts for {sums[name].shape[0]} matrices")
    return ImportanceMatrix(sums, counts, list(_field_value(fields.get("imatrix.datasets")) or []),
                            int(_field_value(fields.get("imatrix.chunk_count")) or 0),
                            int(_field_value(fields.get("imatrix.chunk_size")) or LEGACY_CHUNK))


def _field_value(field):
    """A GGUFReader field as a Python value: a string, a number, or a list of strings."""
    if field is None:
        return None
    from gguf import GGUFValueType

    if field.types[0] == GGUFValueType.ARRAY:
        return [bytes(field.parts[i]).decode() for i in field.data]
    value = field.parts[field.data[0]]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(value).decode()
    return value.tolist()[0]


def _read_legacy(path: Path) -> ImportanceMatrix:
    """The `.dat` layout: int32 entry count; per entry an int32-prefixed name, the number of chunks
    (`ncall`), the value count and the float32 values, each sum / count * ncall; then optionally
    the chunk count and the dataset name."""
    blob = path.read_bytes()
    at = 0

    def take(fmt: str):
        nonlocal at
        values = struct.unpack_from(fmt, blob, at)
        at += struct.calcsize(fmt)
        return values

    (n_entries,) = take("<i")
    if not 0 < n_entries < 1_000_000:
        raise ValueError(f"implausible entry count {n_entries}")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (length,) = take("<i")
        name = blob[at:at + length].decode()
        at += length
        ncall, nval = take("<ii")
        values = np.frombuffer(blob, dtype="<f4", count=nval, offset=at).astype(np.float32)
        at += 4 * nval
        # back to raw sums and counts the way llama.cpp's own loader does: ncall chunks of LEGACY_CHUNK rows
        sums[name] = (values * LEGACY_CHUNK).reshape(1, -1)
        counts[name] = np.array([max(ncall, 0) * LEGACY_CHUNK], dtype=np.float32)
    chunk_count, datasets = 0, []
    if at + 4 <= len(blob):
        (chunk_count,) = take("<i")
    if at + 4 <= len(blob):
        (length,) = take("<i")
        datasets = [blob[at:at + length].decode()]
    return ImportanceMatrix(sums, counts, datasets, chunk_count, LEGACY_CHUNK)


def write_imatrix(matrix: ImportanceMatrix, path: Path) -> None:
    """Write `matrix` in llama.cpp's GGUF layout (GGUF v3, float32 tensors, 32-byte alignment),
    tensors in name order as llama-imatrix writes them."""
    kv = [("general.type", _gguf_string("imatrix")),
          ("imatrix.datasets", _gguf_string_array(matrix.datasets)),
          ("imatrix.chunk_count", struct.pack("<II", _UINT32, matrix.chunk_count)),
          ("imatrix.chunk_size", struct.pack("<II", _UINT32, matrix.chunk_size))]
    arrays = []
    for name in sorted(matrix.sums):
        arrays.append((f"{name}.in_sum2", np.ascontiguousarray(matrix.sums[name], dtype="<f4")))
        arrays.append((f"{name}.counts", np.ascontiguousarray(matrix.counts[name].reshape(-1, 1), dtype="<f4")))
    header = bytearray(GGUF_MAGIC + struct.pack("<IQQ", 3, len(arrays), len(kv)))
    for key, value in kv:
        header += _string(key) + value
    offset = 0
    for name, array in arrays:
        dims = array.shape[::-1]  # GGUF lists the fastest-moving dimension first
        header += _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, 0, offset)  # type 0 = F32
        offset += _padded(array.nbytes)
    header += b"\0" * (_padded(len(header)) - len(header))
    with Path(path).open("wb") as fh:
        fh.write(header)
        for _, array in arrays:
            fh.write(array.tobytes() + b"\0" * (_padded(array.nbytes) - array.nbytes))


_UINT32, _STRING, _ARRAY = 4, 8, 9  # GGUF value types


def _padded(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf_string(text: str) -> bytes:
    return struct.pack("<I", _STRING) + _string(text)


def _gguf_string_array(items: list[str]) -> bytes:
    return struct.pack("<IIQ", _ARRAY, _STRING, len(items)) + b"".join(_string(i) for i in items)
