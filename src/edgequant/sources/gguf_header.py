"""A bounded walk over a GGUF file's header, before any reader trusts its counts.

A GGUF header is counts and lengths followed by what they count: tensors, metadata entries,
strings, arrays. A reader that believes them allocates or loops as told, so a file claiming 2^40
tensors or a 1 GB string can exhaust memory or time before anything fails. This walk reads each
count and length, checks it against the bytes the file has left (and against limits no real model
comes near) and seeks past the data, allocating nothing the file size does not bound. Only a
header that passes is handed to the `gguf` package's reader.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

# Value types of GGUF metadata and their sizes; 8 is a string, 9 an array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MAX_KEY = 1 << 16  # bytes of a metadata key
MAX_STRING = 1 << 26  # 64 MiB: a chat template or a merges entry is far shorter
MAX_DIMS = 4  # ggml tensors have at most 4 dimensions
MAX_COUNT = 1 << 24  # tensors, metadata entries or array items: a 262k vocabulary is 2^18


class HeaderProblem(ValueError):
    """What is wrong with the header, in words for the user (never an internal exception's text)."""


def check_header(path: Path) -> None:
    """Walk the header of the GGUF file at `path`; raise HeaderProblem on the first impossible field."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise HeaderProblem("it does not start with the GGUF magic bytes")
        version = _int(fh, size, "<I", "the version")
        if version not in (2, 3):
            raise HeaderProblem(f"it declares GGUF version {version}; versions 2 and 3 exist")
        tensors = _count(fh, size, "tensors", 8 + 1 + 4 + 8 + 4 + 8)
        entries = _count(fh, size, "metadata entries", 8 + 1 + 4 + 1)
        for _ in range(entries):
            _skip_string(fh, size, "a metadata key", MAX_KEY)
            _skip_value(fh, size, _int(fh, size, "<I", "a metadata type"), depth=0)
        for _ in range(tensors):
            _skip_string(fh, size, "a tensor name", MAX_KEY)
            dims = _int(fh, size, "<I", "a tensor's dimension count")
            if not 1 <= dims <= MAX_DIMS:
                raise HeaderProblem(f"a tensor declares {dims} dimensions; ggml tensors have 1 to {MAX_DIMS}")
            _need(fh, size, 8 * dims + 4 + 8, "a tensor's shape, type and offset")
            fh.seek(8 * dims + 4 + 8, 1)


def _int(fh: BinaryIO, size: int, fmt: str, what: str) -> int:
    width = struct.calcsize(fmt)
    _need(fh, size, width, what)
    return struct.unpack(fmt, fh.read(width))[0]


def _count(fh: BinaryIO, size: int, what: str, least_bytes_each: int) -> int:
    count = _int(fh, size, "<Q", f"the number of {what}")
    room = (size - fh.tell()) // least_bytes_each
    if count > min(room, MAX_COUNT):
        raise HeaderProblem(f"it claims {count:,} {what}, more than its {size:,} bytes can hold")
    return count


def _need(fh: BinaryIO, size: int, length: int, what: str) -> None:
    if length > size - fh.tell():
        raise HeaderProblem(f"{what} runs past the end of the file (truncated or corrupt)")


def _skip_string(fh: BinaryIO, size: int, what: str, limit: int) -> None:
    length = _int(fh, size, "<Q", f"the length of {what}")
    if length > limit:
        raise HeaderProblem(f"{what} claims {length:,} bytes (at most {limit:,} are allowed)")
    _need(fh, size, length, what)
    fh.seek(length, 1)


def _skip_value(fh: BinaryIO, size: int, kind: int, depth: int) -> None:
    if kind in _FIXED:
        _need(fh, size, _FIXED[kind], "a metadata value")
        fh.seek(_FIXED[kind], 1)
    elif kind == STRING:
        _skip_string(fh, size, "a metadata string", MAX_STRING)
    elif kind == ARRAY and depth == 0:  # arrays of arrays do not occur in GGUF models; refuse the recursion
        item = _int(fh, size, "<I", "an array's item type")
        count = _count(fh, size, "array items", _FIXED.get(item, 8))
        if item in _FIXED:
            _need(fh, size, count * _FIXED[item], "an array")
            fh.seek(count * _FIXED[item], 1)
        else:
            for _ in range(count):
                _skip_value(fh, size, item, depth + 1)
    else:
        raise HeaderProblem(f"a metadata value has type {kind}, which GGUF does not define here")
