"""QNN sentence encoders (QDQ for the Snapdragon HTP) on the real all-MiniLM-L6-v2: a static
1 x 256-token graph, evaluated on ONNX Runtime's CPU execution provider against the PyTorch float32
baseline and, with onnxruntime-qnn installed, checked on Qualcomm's HTP simulator at conversion."""

from __future__ import annotations

import numpy as np
import pytest

import edgequant
from edgequant.errors import EdgequantError
from edgequant.measurement.settings import EvalConfig

NO_SPEED = EvalConfig(speed=False)
TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length: the graph's fixed length


@pytest.fixture(scope="module")
def w8a16(minilm):
    return edgequant.convert(minilm, "qnn:w8a16")


def _htp() -> bool:
    from edgequant.backends.qnn.tools import htp_available

    return htp_available()


def test_padding_to_the_fixed_length_keeps_the_float_embeddings(minilm, tmp_path):
    from edgequant.backends._shared.encoder import MODEL_FILE, EncoderTokenizer, float_encoder_onnx
    from edgequant.backends._shared.ort import cpu_session
    from edgequant.backends.qnn.encoder import cosines, fixed_feeds, static_graph
    from edgequant.measurement.taskdata import encoder_eval_texts
    from edgequant.sources.source import load_source

    exported = float_encoder_onnx(load_source(minilm))
    shape = static_graph(exported / MODEL_FILE, tmp_path / "static.onnx", TOKENS)
    assert shape == {"batch": 1, "tokens": TOKENS, "mask_value": -100.0}
    static, dynamic = cpu_session(tmp_path / "static.onnx"), cpu_session(exported / MODEL_FILE)
    assert [i.shape for i in static.get_inputs()] == [[1, TOKENS]] * 3
    tokenizer = EncoderTokenizer.of_artifact(exported)
    texts = encoder_eval_texts().texts[::5]  # short labelled sentences and long documents (to 154 tokens)
    alone = np.concatenate([dynamic.run(None, tokenizer([text]))[0] for text in texts])
    padded = np.concatenate([static.run(None, feed)[0] for text in texts for feed in fixed_feeds(tokenizer([text]), TOKENS)])
    assert cosines(alone, padded).min() > 0.99999


def test_w8a16_keeps_the_embeddings(w8a16):
    details = w8a16.manifest["details"]
    assert w8a16.task == "sentence-embedding"
    assert details["shape"]["tokens"] == TOKENS and details["shape"]["padding_cosine_min"] > 0.99999
    counts = details["qdq_nodes"]  # every activation 16-bit; int8 weights, uint8 LayerNorm gammas, int32 biases
    assert counts["QuantizeLinear:uint16"] >= 150 and "QuantizeLinear:uint8" not in counts, counts
    assert counts["DequantizeLinear:int8"] == 36 and counts["DequantizeLinear:uint8"] == 13, counts
    metrics = edgequant.evaluate(w8a16.path, config=NO_SPEED)
    assert metrics["cosine_mean"] >= 0.98 and metrics["cosine_p1"] >= 0.97, metrics
    assert abs(metrics["probe_accuracy"] - metrics["baseline_probe_accuracy"]) < 0.1
    assert "CPU execution provider" in metrics["arithmetic"] and "HTP" in metrics["arithmetic"]
    assert w8a16.size_bytes < 0.45 * 91_000_000  # int8 weights; the embedding table at 16 bits


def test_w8a16_runs_wholly_on_the_simulated_htp(w8a16):
    if not _htp():
        pytest.skip("onnxruntime-qnn (HTP simulator) not installed")
    check = w8a16.manifest["details"]["htp_embeddings"]
    assert "error" not in check, check
    assert (check["htp_arch"], check["soc_model"], check["tokens"]) == ("79", "69", TOKENS)
    assert check["cosine_htp_vs_cpu"]["min"] > 0.99 and check["cosine_vs_float"]["htp"] > 0.99, check
    from edgequant.backends.qnn.encoder import QnnEncoderRunner, cosines

    text = ["The cast is good and the story moves."]
    with QnnEncoderRunner(w8a16.path, "model.onnx", name="htp", threads=2, htp=True) as htp:
        on_htp = htp.run(text)
        assert "HTP simulator" in htp.arithmetic()
    with QnnEncoderRunner(w8a16.path, "model.onnx", name="cpu", threads=2) as cpu:
        assert cosines(on_htp, cpu.run(text))[0] > 0.99


def test_a_text_gets_the_same_embedding_alone_or_in_a_batch(w8a16):
    from edgequant.backends.qnn.encoder import QnnEncoderRunner

    texts = ["A quiet film.", "The cast is good and the story moves, though it runs long. " * 8]
    with QnnEncoderRunner(w8a16.path, "model.onnx", name="w8a16", threads=2) as runner:
        together = runner.run(texts)
        alone = np.concatenate([runner.run([text]) for text in texts])
        assert runner.token_count(texts) > 100
    assert together.shape == (2, 384) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, atol=1e-6)  # static ranges, one text per run


def test_w8a8_keeps_16_bit_only_where_8_bits_lose_the_embedding(minilm):
    artifact = edgequant.convert(minilm, "qnn:w8a8")
    details = artifact.manifest["details"]
    choice = details["activations_16bit"]
    assert choice["method"] == "cosine" and choice["count_8bit"] > choice["count"] > 0, choice
    assert choice["cosine_chosen"] >= choice["cosine_all_16bit"] - choice["budget"]
    assert details["qdq_nodes"]["QuantizeLinear:uint8"] > details["qdq_nodes"]["QuantizeLinear:uint16"]
    metrics = edgequant.evaluate(artifact.path, config=NO_SPEED)
    assert metrics["cosine_mean"] >= 0.98, metrics
    if _htp():  # mixed widths only where the HTP takes them: the whole graph loads with CPU fallback off
        check = details["htp_embeddings"]
        assert "error" not in check and check["cosine_htp_vs_cpu"]["min"] > 0.98, check


def test_options_and_precisions_that_do_not_apply_are_refused(minilm):
    with pytest.raises(EdgequantError, match="option block of .* applies to causal LMs"):
        edgequant.convert(minilm, "qnn:w8a16?block=32")
    with pytest.raises(EdgequantError, match="qnn:w4a16 does not apply to sentence-embedding"):
        edgequant.convert(minilm, "qnn:w4a16")
