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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("onnx-tiny") / "model"
    shutil.copytree(tiny_model, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out


def run_cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """The real command line, in a child process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "edgequant", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli
