"""The evaluation harness on the tiny model with real llama.cpp and real PyTorch."""

import json

import pytest

import edgequant
from edgequant.errors import EdgequantError
from edgequant.measurement.results import ResultsDB
from edgequant.measurement.settings import EvalConfig

pytest.importorskip("torch", reason="its extra is not installed")
pytest.importorskip("llama_cpp", reason="its extra is not installed")

QUICK = EvalConfig(ctx=128, windows=4, prompt_tokens=32, gen_tokens=16, repeats=2)


def test_f32_gguf_matches_the_pytorch_baseline(tiny_gguf_f32):
    metrics = edgequant.evaluate(tiny_gguf_f32.path, config=EvalConfig(ctx=128, windows=4, speed=False))
    assert abs(metrics["ppl_increase_pct"]) < 0.1
    assert metrics["kld_mean"] < 1e-3
    assert metrics["top1_agreement"] > 0.98
    assert metrics["tokens_scored"] == 4 * 127


def test_quantized_artifact_gets_every_metric_and_stores_them(tiny_model):
    artifact = edgequant.convert(tiny_model, "gguf:q2_k")
    metrics = edgequant.evaluate(artifact.path, config=QUICK)
    assert metrics["kld_mean"] > 0.001 and metrics["top1_agreement"] < 1.0
    for key in ("perplexity", "kld_p99", "size_bytes", "load_s", "peak_rss_mb", "ttft_ms", "prefill_tps", "decode_tps"):
        assert metrics[key] > 0, key
    assert metrics["peak_rss_mb"] < 1000  # measured in a fresh child process, not this test process
    db = ResultsDB.open()
    stored = db.find_evaluation(artifact.content_sha256, metrics["evaluation_key"])
    db.close()
    assert stored["perplexity"] == metrics["perplexity"]
    assert stored["settings"]["ctx"] == 128 and stored["machine"]["cores"] >= 1
    assert "evaluations" not in json.loads((artifact.path / "edgequant.json").read_text())  # the artifact is not rewritten


def test_per_token_scores_are_the_ones_behind_the_figures(tiny_model):
    """evaluate_with_scores hands over what paired comparisons need: the figures come from these tokens."""
    import numpy as np

    artifact = edgequant.convert(tiny_model, "gguf:q4_0")
    config = EvalConfig(ctx=128, windows=2, speed=False)
    metrics, scores = edgequant.evaluate_with_scores(artifact.path, config=config)
    assert scores.nll.size == metrics["tokens_scored"] == 2 * 127
    assert np.isclose(np.exp(scores.nll.mean()), metrics["perplexity"], rtol=1e-4)
    assert np.isclose(np.maximum(scores.kld, 0).mean(), metrics["kld_mean"], atol=1e-7)
    assert edgequant.evaluate(artifact.path, config=config)["kld_mean"] == metrics["kld_mean"]


def test_an_evaluation_after_the_first_loads_neither_transformers_nor_torch(tiny_gguf_f32):
    """The token windows are cached beside the reference: tokenizing loads transformers and torch
    (0.6 GB of RSS with a 262k vocabulary), which the runner of an artifact does not need."""
    import subprocess
    import sys

    config = EvalConfig(ctx=64, windows=2, speed=False)
    first = edgequant.evaluate(tiny_gguf_f32.path, config=config)
    code = ("import sys, edgequant; m = edgequant.evaluate(sys.argv[1], config=edgequant.EvalConfig(ctx=64, windows=2, "
            "speed=False)); print(m['kld_mean'], 'transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_gguf_f32.path)], capture_output=True, text=True, check=True)
    kld, transformers_loaded, torch_loaded = out.stdout.split()[-3:]
    assert float(kld) == first["kld_mean"] and (transformers_loaded, torch_loaded) == ("False", "False")


def test_lower_precision_drifts_further_from_the_baseline(tiny_model):
    config = EvalConfig(ctx=128, windows=4, speed=False)
    kld = {p: edgequant.evaluate(edgequant.convert(tiny_model, f"gguf:{p}").path, config=config)["kld_mean"]
           for p in ("q8_0", "q4_k_m", "q2_k")}
    assert kld["q8_0"] < kld["q4_k_m"] < kld["q2_k"]


def test_source_model_evaluates_as_its_own_baseline(tiny_model):
    """The model is run again, not taken to be the reference: the figures check that the cached
    reference and a fresh run of the same model agree."""
    metrics = edgequant.evaluate(tiny_model, config=QUICK)
    assert metrics["kld_mean"] < 1e-6 and metrics["top1_agreement"] == 1.0
    assert metrics["perplexity"] == pytest.approx(metrics["baseline_perplexity"], rel=1e-5)
    assert metrics["target"].startswith("pytorch:fp32") and metrics["decode_tps"] > 0


def test_a_model_is_scored_against_another_baseline(tiny_model, onnx_tiny):
    """`eval MODEL --baseline OTHER`: MODEL's own logits against OTHER's (same tokenizer, other weights)."""
    config = EvalConfig(ctx=128, windows=2, speed=False)
    metrics = edgequant.evaluate(onnx_tiny, baseline=tiny_model, config=config)
    assert metrics["kld_mean"] > 0.05 and metrics["top1_agreement"] < 0.9
    assert metrics["perplexity"] != pytest.approx(metrics["baseline_perplexity"], rel=1e-3)
    own = edgequant.evaluate(onnx_tiny, config=config)  # scored against itself, the same perplexity
    assert own["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-5) and own["kld_mean"] < 1e-6


def test_text_too_short_is_a_clear_error(tiny_gguf_f32, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(EdgequantError, match="tokens"):
        edgequant.evaluate(tiny_gguf_f32.path, config=EvalConfig(ctx=128, windows=4, data=short, speed=False))


def test_user_text_file_is_used(tiny_gguf_f32, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("The river flows to the sea and the sea returns as rain. " * 200)
    metrics = edgequant.evaluate(tiny_gguf_f32.path, config=EvalConfig(ctx=64, windows=2, data=text, speed=False))
    assert metrics["settings"]["data"] == str(text) and metrics["tokens_scored"] == 2 * 63


def test_invalid_settings_are_rejected():
    with pytest.raises(EdgequantError, match="windows"):
        EvalConfig(windows=0)


def test_same_tokens_in_other_window_shapes_get_their_own_reference(tiny_gguf_f32):
    """4 x 64 and 2 x 128 windows hold the same token ids; each needs its own baseline."""
    small = edgequant.evaluate(tiny_gguf_f32.path, config=EvalConfig(ctx=64, windows=4, speed=False))
    large = edgequant.evaluate(tiny_gguf_f32.path, config=EvalConfig(ctx=128, windows=2, speed=False))
    assert small["tokens_scored"] == 4 * 63 and large["tokens_scored"] == 2 * 127
    assert abs(large["ppl_increase_pct"]) < 0.1


def test_speed_prompts_differ_so_no_engine_reuses_a_cached_prefix():
    import numpy as np

    from edgequant.measurement.evaluation import Windows, _speed_prompts

    windows = Windows(np.arange(2 * 64).reshape(2, 64), "sha", "data")
    prompts = _speed_prompts(windows, 16, 4)
    assert len(prompts) == 4 and all(len(p) == 16 for p in prompts)
    assert len({p[0] for p in prompts}) == 4  # every prompt starts with a different token
    assert len(_speed_prompts(windows, 100, 4)) == 2  # too short: one prompt, reused


def test_a_tokenizer_mismatch_names_the_first_differing_token_and_both_pieces(tiny_model, tmp_path):
    import shutil

    from tiny_archs import _gemma_tokenizer

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model, other)
    for item in other.glob("tokenizer*"):
        item.unlink()
    _gemma_tokenizer(tiny_model, other)  # the same pieces without the leading-space prefix
    with pytest.raises(EdgequantError, match="disagrees") as err:
        edgequant.evaluate(other, baseline=tiny_model, config=EvalConfig(ctx=64, windows=1, speed=False))
    assert "first difference at token 0" in err.value.problem and "▁" in err.value.problem


def test_two_processes_evaluating_one_artifact_both_keep_their_result(tiny_model):
    """Two real `edgequant eval` processes on one artifact at once: both succeed, the results
    store holds both evaluations, and the artifact's files are byte for byte what conversion wrote."""
    import hashlib
    import os
    import subprocess
    import sys

    artifact = edgequant.convert(tiny_model, "gguf:q4_0")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in artifact.path.rglob("*") if p.is_file()}
    command = [sys.executable, "-m", "edgequant", "eval", str(artifact.path), "--ctx", "64", "--windows", "3", "--no-speed", "--json"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
            for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outputs]
    keys = {json.loads(out)["evaluation_key"] for out, _ in outputs}
    db = ResultsDB.open()
    stored = db.conn.execute("SELECT COUNT(*) FROM stored_evaluations WHERE artifact_sha256 = ? AND settings_key = ?",
                             (artifact.content_sha256, keys.pop())).fetchone()[0]
    db.close()
    assert stored == 2 and not keys
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in artifact.path.rglob("*") if p.is_file()}
