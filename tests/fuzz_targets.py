"""What the fuzzers feed and to what: every reader of user input that runs before an engine does
(the spec, gate and recipe parsers; the GGUF, safetensors and importance-matrix readers), the
inputs hypothesis generates for it, and the errors that count as a clean refusal. Shared by
tests/test_fuzz.py (bounded, in every test run) and bench/hardening.py (many more inputs, counted).
"""

from __future__ import annotations

import atexit
import math
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hypothesis import strategies as st

from edgequant.errors import EdgequantError

_SCRATCH = Path(tempfile.mkdtemp(prefix="edgequant-fuzz-"))  # one file per suffix, rewritten per input
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)


def scratch_file(data: bytes, suffix: str) -> Path:
    path = _SCRATCH / f"input{suffix}"
    path.write_bytes(data)
    return path


@dataclass(frozen=True)
class Target:
    name: str
    inputs: Callable[[], Any]  # a hypothesis strategy, built when asked for (strategies are lazy anyway)
    read: Callable[[Any], object]
    refusals: tuple[type[BaseException], ...] = (EdgequantError,)

    def outcome(self, value) -> str:
        """'parsed' or 'refused'; any other exception escapes: it is a bug, and the fuzzer reports it."""
        try:
            self.read(value)
        except self.refusals:
            return "refused"
        return "parsed"


_SPEC_PIECES = list("abcdefgkmnoqstuvxz0123456789_:?&=.,-+ /%") + ["gguf", "onnx", "openvino", "mlx", "qnn", "q4_k_m",
                                                                  "int4", "fp16", "imatrix", "group", "?", "&", "="]
# Valid inputs to start from: random edits of them reach the parsers' deeper branches, which random
# text alone almost never does (every input of it is refused at the first check).
_VALID_SPECS = ["gguf:q4_k_m", "gguf:q4_0?imatrix=auto", "gguf:auto?bpw=4.5", "gguf:q4_k_m?tensor=ffn_down:q6_k,attn_v:q8_0",
                "onnx:int4?block=32", "onnx:int8", "openvino:int4?group=64&ratio=0.8", "openvino:int8", "mlx:4bit",
                "mlx:3bit?group=32", "qnn:w8a16", "qnn:w4a16?graphs=fixed&seq=64", "pytorch:fp32"]
_GATE_FIGURES = ["kld", "ppl_increase", "ppl_change", "top1", "size", "peak_rss", "speedup", "ttft", "memory_reduction",
                 "finetune_kept", "tokens_per_s", "bogus", ""]
_GATE_UNITS = ["", "%", "MB", "GB", "KB", "ms", "s", "x", "B", "MiB"]


def _edited(text: str, edits: list[tuple[int, str, str]]) -> str:
    for position, operation, piece in edits:
        at = position % (len(text) + 1)
        if operation == "insert":
            text = text[:at] + piece + text[at:]
        elif operation == "delete":
            text = text[:at] + text[at + 1:]
        else:
            text = text[:at] + piece + text[at + 1:]
    return text


def _specs():
    edits = st.lists(st.tuples(st.integers(0, 60), st.sampled_from(["insert", "delete", "replace"]),
                               st.sampled_from(_SPEC_PIECES)), max_size=3)
    return st.builds(_edited, st.sampled_from(_VALID_SPECS), edits) | st.lists(st.sampled_from(_SPEC_PIECES), max_size=12).map("".join)


def _gates():
    numbers = st.integers(-5, 500).map(str) | st.floats(allow_nan=True, allow_infinity=True).map(str) | st.text(max_size=4)
    built = st.builds(lambda f, op, n, u: f"{f}{op}{n}{u}", st.sampled_from(_GATE_FIGURES),
                      st.sampled_from(["<=", ">=", "<", ">", "=", "==", " <= ", ""]), numbers, st.sampled_from(_GATE_UNITS))
    return built | st.text(alphabet=st.sampled_from(list("kldtop1siz<=>.%0123456789MBGbs _x-")), max_size=20)


def _recipes():
    """YAML built from the recipe's own keys with values right, wrong and hostile, or any text."""
    import yaml

    anything = st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=8)
    keys = {
        "version": st.integers(0, 3) | anything,
        "source": st.sampled_from(["default", "no/such/folder", "."]) | anything,
        "target": st.sampled_from(["x86-cpu", "arm-cpu", "apple-m", "snapdragon-npu", "bogus"]) | anything,
        "specs": st.lists(_specs(), max_size=3) | anything,
        "gates": st.lists(_gates(), max_size=3) | anything,
        "search": st.fixed_dictionaries({}, optional={"objective": st.sampled_from(["size", "speed", "quality", "top1", "x"]),
                                                      "budget": st.integers(-2, 50) | anything,
                                                      "neighbours": st.booleans() | anything}) | anything,
        "eval": st.fixed_dictionaries({}, optional={k: st.integers(-2, 4096) | anything
                                                    for k in ("windows", "ctx", "repeats", "prompt_tokens", "threads")}) | anything,
        "output": st.sampled_from(["out", "sub/out", "../escape", "/tmp/elsewhere", ".", "~"]) | anything,
        "db": st.sampled_from(["results.sqlite", "../x.sqlite", "/tmp/x.sqlite"]) | anything,
        "unknown_key": anything,
    }
    return st.fixed_dictionaries({}, optional=keys).map(lambda d: yaml.safe_dump(d, allow_unicode=True)) | st.text(max_size=300)


def _gguf_like():
    """Bytes that start like a GGUF header (magic, version, counts) and continue at random."""
    counts = st.integers(min_value=0, max_value=2 ** 64 - 1) | st.integers(min_value=0, max_value=8)
    return st.builds(lambda v, t, k, rest: b"GGUF" + struct.pack("<IQQ", v, t, k) + rest,
                     st.sampled_from([2, 3, 0, 9]), counts, counts, st.binary(max_size=256))


def _mutated(data: bytes, edits: list[tuple[int, int]], keep: int | None) -> bytes:
    """`data` with bytes overwritten (position, value) and cut to `keep` bytes, if given."""
    out = bytearray(data)
    for position, value in edits:
        if out:
            out[position % len(out)] = value
    return bytes(out[:keep] if keep is not None else out)


def _mutations(valid):
    """Valid files (a strategy of bytes), and the same with a few bytes changed or the end cut off."""
    edits = st.lists(st.tuples(st.integers(0, 2 ** 16), st.integers(0, 255)), max_size=4)
    return valid | st.builds(_mutated, valid, edits, st.none() | st.integers(0, 400))


def _safetensors_file(tensors: list[tuple[str, list[int]]], extra: bytes) -> bytes:
    import json

    header, offset = {}, 0
    for i, (dtype, shape) in enumerate(tensors):
        size = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1}[dtype] * math.prod(shape)
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + b"\0" * offset + extra


def _safetensors_like():
    """Well-formed files (with hostile edits), or an 8-byte header length (huge or small) and random bytes."""
    tensor = st.tuples(st.sampled_from(["F32", "F16", "BF16", "I8"]), st.lists(st.integers(0, 6), max_size=3))
    valid = st.builds(_safetensors_file, st.lists(tensor, max_size=3), st.binary(max_size=8))
    raw = st.builds(lambda n, rest: struct.pack("<Q", n) + rest,
                    st.integers(min_value=0, max_value=2 ** 64 - 1) | st.integers(min_value=0, max_value=300),
                    st.binary(max_size=300))
    return _mutations(valid) | raw


def _imatrix_file(shapes: list[tuple[int, int]], chunks: int) -> bytes:
    import numpy as np

    from edgequant.backends.gguf.imatrix import ImportanceMatrix, write_imatrix

    sums = {f"blk.{i}.ffn_up.weight": np.ones((m, n), dtype=np.float32) for i, (m, n) in enumerate(shapes)}
    counts = {name: np.full(len(a), chunks, dtype=np.float32) for name, a in sums.items()}
    path = _SCRATCH / "valid-imatrix.gguf"
    write_imatrix(ImportanceMatrix(sums, counts, ["fuzz"], chunks), path)
    return path.read_bytes()


def _imatrix_like():
    """Importance matrices as llama.cpp writes them (with hostile edits), or GGUF-like bytes."""
    shapes = st.lists(st.tuples(st.integers(1, 2), st.integers(1, 8)), max_size=2)
    return _mutations(st.builds(_imatrix_file, shapes, st.integers(0, 3))) | _gguf_like() | st.binary(max_size=256)


def _parse_spec(text: str):
    from edgequant.registry import parse_spec

    return parse_spec(text)


def _parse_gate(text: str):
    from edgequant.decisions.gates import parse_gates

    return parse_gates([text])


def _load_recipe(text: str):
    from edgequant.decisions.recipe import load_recipe, optimize_config

    return optimize_config(load_recipe(scratch_file(text.encode("utf-8", "surrogatepass"), ".yaml")))


def _walk_gguf_header(data: bytes):
    from edgequant.sources.gguf_header import check_header

    return check_header(scratch_file(data, ".gguf"))


def _read_imatrix(data: bytes):
    from edgequant.backends.gguf.imatrix import read_imatrix

    return read_imatrix(scratch_file(data, ".gguf"))


def _read_safetensors_header(data: bytes):
    from edgequant.sources.safetensors_info import read_header

    return read_header(scratch_file(data, ".safetensors"))


def _header_problem() -> tuple[type[BaseException], ...]:
    from edgequant.sources.gguf_header import HeaderProblem

    return (HeaderProblem,)


TARGETS = (
    Target("spec parser", _specs, _parse_spec),
    Target("gate parser", _gates, _parse_gate),
    Target("recipe reader", _recipes, _load_recipe),
    Target("GGUF header walk", _gguf_like, _walk_gguf_header, _header_problem()),
    Target("importance matrix reader", _imatrix_like, _read_imatrix),
    Target("safetensors header reader", _safetensors_like, _read_safetensors_header),
)
