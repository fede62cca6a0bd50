"""GGUF sentence encoders on the real all-MiniLM-L6-v2: llama.cpp's converter and quantizer, run in
embedding mode with llama.cpp's own WordPiece tokenizer, scored against the PyTorch float32 baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgequant
from edgequant.errors import EdgequantError
from edgequant.measurement.settings import EvalConfig

# One thread: llama.cpp's threads wait for each other by spinning, and on a busy 2-core machine
# (other tests, other jobs) two threads ran 3 to 14 times slower than one (ONNX Runtime lost a third).
NO_SPEED = EvalConfig(speed=False, threads=1)

# A long text: each word is one WordPiece token, so 403 words are 405 ids before the cut at 256.
LONG_TEXT = " ".join(["the film is long but the cast is good and the story moves"] * 31)


@pytest.fixture(scope="module")
def gguf_f16(minilm):
    return edgequant.convert(minilm, "gguf:f16")


def test_f16_equals_pytorch(gguf_f16):
    assert gguf_f16.task == "sentence-embedding"
    assert gguf_f16.manifest["details"]["pooling"] == "mean"  # written by the converter from modules.json
    metrics = edgequant.evaluate(gguf_f16.path, config=NO_SPEED)
    assert metrics["cosine_mean"] >= 0.999 and metrics["cosine_p1"] >= 0.999, metrics
    assert metrics["inputs_scored"] == 250
    assert abs(metrics["probe_accuracy"] - metrics["baseline_probe_accuracy"]) < 0.02


def test_q8_0_keeps_the_embeddings_and_runs_without_torch(minilm):
    artifact = edgequant.convert(minilm, "gguf:q8_0")
    types = set(artifact.manifest["details"]["tensor_types"].values())
    assert "q8_0" in types and artifact.size_bytes < 0.3 * 91_000_000
    metrics = edgequant.evaluate(artifact.path, config=EvalConfig(repeats=1, threads=1))
    assert metrics["cosine_mean"] >= 0.98, metrics
    assert metrics["probe_imported"] == []  # the llama.cpp runner loads neither torch nor transformers
    assert metrics["inputs_per_s_b8"] > 0 and metrics["latency_p50_ms"] > 0


def test_llama_cpp_tokenizes_and_cuts_as_tokenizer_json(gguf_f16):
    from edgequant.backends._shared.encoder import EncoderTokenizer
    from edgequant.measurement.taskdata import encoder_eval_texts
    from edgequant.registry import open_task_runner

    texts = [*encoder_eval_texts().texts, LONG_TEXT, "", "Héllo wörld, naïve café — 日本語 😀 U.S.A. 3.14 $100"]
    reference = EncoderTokenizer(_tokenizer_json(gguf_f16), 256)
    with open_task_runner(gguf_f16.path, threads=1) as runner:
        for text in texts:
            expected = reference([text])["input_ids"][0].tolist()
            assert runner.ids(text) == expected, text
        assert len(runner.ids(LONG_TEXT)) == 256
        assert runner.token_count(texts) == reference.count(texts)  # the server's usage figure


def test_a_text_of_max_tokens_equals_pytorch(gguf_f16, minilm):
    """A text cut at 256 tokens runs in one llama.cpp call and gives what PyTorch gives."""
    from edgequant.registry import open_task_runner

    texts = [LONG_TEXT, "a tedious, overlong mess", "the film is a quiet triumph"] * 6  # 18: more than one batch of 16
    with open_task_runner(gguf_f16.path, threads=1) as runner:
        ours = runner.run(texts)
    with open_task_runner(minilm) as baseline:
        theirs = baseline.run(texts[:3])
    assert ours.shape == (18, 384) and ours.dtype == np.float32
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert np.allclose(ours[3:], np.tile(ours[:3], (5, 1)), atol=1e-6)
    assert (ours[:3] * theirs).sum(1).min() > 0.9999


def test_what_does_not_apply_to_an_encoder_is_refused(minilm):
    with pytest.raises(EdgequantError, match="gguf:q4_0 does not apply to sentence-embedding") as caught:
        edgequant.convert(minilm, "gguf:q4_0")
    assert "q8_0" in caught.value.fix
    with pytest.raises(EdgequantError, match="option imatrix .* applies to causal LMs"):
        edgequant.convert(minilm, "gguf:q4_k_m?imatrix=auto")


def _tokenizer_json(artifact) -> Path:
    return Path(artifact.manifest["source"]["path"]) / "tokenizer.json"
