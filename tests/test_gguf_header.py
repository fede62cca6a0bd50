"""Hostile GGUF headers: counts and lengths that would make a reader allocate or loop are refused
by the bounded walk (sources/gguf_header.py) in milliseconds, with our words, before the `gguf`
package's reader sees the file; every real GGUF the tests make passes it."""

from __future__ import annotations

import struct
import time

import pytest

import edgequant
from edgequant.errors import EdgequantError
from edgequant.sources.gguf_header import HeaderProblem, check_header


def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _header(tensors: int, entries: int, body: bytes = b"", version: int = 3) -> bytes:
    """A whole file: the header, then 64 zero bytes of room (too few for what the header claims)."""
    return b"GGUF" + struct.pack("<IQQ", version, tensors, entries) + body + b"\0" * 64


CASES = {
    "2^40 tensors": (_header(2 ** 40, 0), "2^40"),
    "2^40 metadata entries": (_header(0, 2 ** 40), "metadata entries"),
    "a 1 GB key": (_header(0, 1, struct.pack("<Q", 2 ** 30)), "metadata key"),
    "a 1 GB string value": (_header(0, 1, _string(b"k") + struct.pack("<IQ", 8, 2 ** 30)), "metadata string"),
    "a string past the end": (_header(0, 1, _string(b"k") + struct.pack("<IQ", 8, 5000) + b"abc"), "past the end"),
    "an array of 2^40 floats": (_header(0, 1, _string(b"k") + struct.pack("<IIQ", 9, 6, 2 ** 40)), "array items"),
    "an array of arrays": (_header(0, 1, _string(b"k") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 6, 1)), "type 9"),
    "an unknown value type": (_header(0, 1, _string(b"k") + struct.pack("<I", 99)), "type 99"),
    "a tensor of 7 dimensions": (_header(1, 0, _string(b"t") + struct.pack("<I", 7) + b"\0" * 80), "7 dimensions"),
    "version 7": (_header(0, 0, version=7), "version 7"),
    "a header cut short": (b"GGUF" + struct.pack("<I", 3) + b"\0\0", "past the end"),
}


@pytest.mark.unit
@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_header_is_refused_at_once_with_our_words(tmp_path, name):
    data, words = CASES[name]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    started = time.perf_counter()
    with pytest.raises(HeaderProblem) as refused:
        check_header(path)
    assert time.perf_counter() - started < 1.0  # no loop over a claimed count
    assert words.replace("2^40", f"{2 ** 40:,}") in str(refused.value)


def test_the_command_line_refuses_it_without_internal_text(cli, tmp_path):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(CASES["2^40 tensors"][0])
    done = cli("inspect", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "claims 1,099,511,627,776 tensors" in done.stderr and "fix:" in done.stderr


def test_real_gguf_files_pass(tiny_gguf_f32):
    check_header(tiny_gguf_f32.model_path)  # a model written by llama.cpp's converter
    check_header(edgequant.default_model_path())  # the default model's Q4_1 file, 49k-token vocabulary


def test_load_source_refuses_a_hostile_file(tmp_path):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(CASES["a 1 GB string value"][0])
    with pytest.raises(EdgequantError, match="corrupt or truncated one: a metadata string claims 1,073,741,824 bytes"):
        edgequant.load_source(path)
