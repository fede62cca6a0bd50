"""Property-based fuzzing (hypothesis) of everything that reads user input before an engine does:
the spec, gate and recipe parsers and the GGUF, safetensors and importance-matrix readers. Each
input either parses or is refused with our EdgequantError (or, for the GGUF walk, HeaderProblem);
any other exception is a bug the fuzzer reports with the input that caused it. Bounded: a fixed
number of examples per reader, no deadline, derandomized so CI sees the same inputs each run.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the dev extra (hypothesis) is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edgequant.errors import EdgequantError  # noqa: E402

pytestmark = pytest.mark.unit
BOUNDED = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
SPEC_ALPHABET = st.sampled_from(list("abcdefgkmnoqstuvxz0123456789_:?&=.,-+ /%") + ["gguf", "onnx", "openvino", "mlx", "qnn",
                                                                                     "q4_k_m", "int4", "fp16", "imatrix",
                                                                                     "group", "?", "&", "="])


_SCRATCH = Path(tempfile.mkdtemp(prefix="edgequant-fuzz-"))  # one file per suffix, rewritten per example


@pytest.fixture(scope="module", autouse=True)
def _remove_scratch():
    yield
    shutil.rmtree(_SCRATCH, ignore_errors=True)


def _scratch(data: bytes, suffix: str) -> Path:
    path = _SCRATCH / f"input{suffix}"
    path.write_bytes(data)
    return path


@BOUNDED
@given(st.lists(SPEC_ALPHABET, max_size=12).map("".join))
def test_spec_parser(text):
    from edgequant.registry import parse_spec

    try:
        parse_spec(text)
    except EdgequantError:
        pass


@BOUNDED
@given(st.text(alphabet=st.sampled_from(list("kldtop1siz<=>.%0123456789MBGbs _x-")), max_size=20))
def test_gate_parser(text):
    from edgequant.decisions.gates import parse_gates

    try:
        parse_gates([text])
    except EdgequantError:
        pass


@BOUNDED
@given(st.text(max_size=300))
def test_recipe_reader(text):
    from edgequant.decisions.recipe import load_recipe

    try:
        load_recipe(_scratch(text.encode("utf-8", "surrogatepass"), ".yaml"))
    except EdgequantError:
        pass


def _gguf_like():
    """Bytes that start like a GGUF header (magic, version, counts) and continue at random."""
    counts = st.integers(min_value=0, max_value=2 ** 64 - 1) | st.integers(min_value=0, max_value=8)
    return st.builds(lambda v, t, k, rest: b"GGUF" + struct.pack("<IQQ", v, t, k) + rest,
                     st.sampled_from([2, 3, 0, 9]), counts, counts, st.binary(max_size=256))


@BOUNDED
@given(_gguf_like())
def test_gguf_header_walk(data):
    from edgequant.sources.gguf_header import HeaderProblem, check_header

    try:
        check_header(_scratch(data, ".gguf"))
    except HeaderProblem:
        pass


@BOUNDED
@given(_gguf_like() | st.binary(max_size=256))
def test_importance_matrix_reader(data):
    from edgequant.backends.gguf.imatrix import read_imatrix

    try:
        read_imatrix(_scratch(data, ".gguf"))
    except EdgequantError:
        pass


@BOUNDED
@given(st.builds(lambda n, rest: struct.pack("<Q", n) + rest,
                 st.integers(min_value=0, max_value=2 ** 64 - 1) | st.integers(min_value=0, max_value=300),
                 st.binary(max_size=300)))
def test_safetensors_header_reader(data):
    from edgequant.sources.safetensors_info import read_header

    try:
        read_header(_scratch(data, ".safetensors"))
    except EdgequantError:
        pass
