"""`import edgequant`, spec parsing and `--help` must not load any engine."""

import subprocess
import sys
from pathlib import Path

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


def test_without_its_entry_points_edgequant_says_how_to_install(tmp_path):
    """The package copied alone (no installed metadata, no site-packages): a clear error, no traceback."""
    import shutil

    shutil.copytree(Path(__file__).resolve().parents[1] / "src" / "edgequant", tmp_path / "edgequant")
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
            "from edgequant.errors import EdgequantError\n"
            "from edgequant.registry import parse_spec\n"
            "try:\n    parse_spec('gguf:q8_0')\nexcept EdgequantError as exc:\n    print(exc.problem, '|', exc.fix)")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True).stdout
    assert "no backends are registered" in out and "make setup" in out
