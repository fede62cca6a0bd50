"""`import edgequant`, spec parsing and `--help` must not load any engine."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

HEAVY = ("torch", "transformers", "llama_cpp", "onnxruntime", "openvino", "mlx", "gguf", "numpy")


def test_import_parse_and_parser_load_no_engine():
    code = (
        "import sys, edgequant; from edgequant.cli import build_parser; build_parser();"
        "edgequant.parse_spec('gguf:q4_k_m');"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "edgequant", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("inspect", "convert", "eval"):
        assert command in out
