"""The OpenVINO backend: optimum-intel export, NNCF compression, LLMPipeline and the raw IR.

Fast tests use the tiny random Llama; the tests marked slow use the real default model.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import edgequant
from edgequant.errors import EdgequantError
from edgequant.measurement.settings import EvalConfig

pytest.importorskip("openvino", reason="its extra is not installed")
pytest.importorskip("nncf", reason="its extra is not installed")
pytest.importorskip("optimum.intel", reason="its extra is not installed")

QUALITY = EvalConfig(ctx=256, windows=2, speed=False)


def constant_types(artifact) -> dict[str, int]:
    from edgequant.backends.openvino.tools import weight_constant_types

    return weight_constant_types(artifact.model_path)


@pytest.mark.parametrize("spec, present, absent", [
    ("openvino:fp16", "f16", ("u8", "i8", "u4", "i4")),
    ("openvino:int8", "u8", ("u4", "i4")),
    ("openvino:int8?sym=1", "i8", ("u4", "i4", "u8")),
    ("openvino:int4?ratio=1&awq=0&scale_estimation=0", "u4", ("i4",)),
    ("openvino:int4?sym=1&group=64&ratio=1&awq=0&scale_estimation=0", "i4", ("u4",)),
])
def test_ir_loads_and_holds_weights_of_the_requested_type(tiny_model, spec, present, absent):
    import openvino as ov

    artifact = edgequant.convert(tiny_model, spec)
    core = ov.Core()
    core.compile_model(core.read_model(str(artifact.model_path)), "CPU")
    types = constant_types(artifact)
    linear_layers = 2 * 7  # q, k, v, o, gate, up, down in each of the two layers
    assert types.get(present, 0) >= linear_layers, types
    assert not any(types.get(t) for t in absent), types
    details = artifact.manifest["details"]
    assert details["weight_constants"] == types
    assert details["inference_precision"] in ("f32", "bf16", "f16")
    for name in ("openvino_tokenizer.xml", "openvino_detokenizer.xml", "config.json"):
        assert (artifact.path / name).is_file()


def test_int4_keeps_embeddings_and_output_at_8_bit_unless_all_layers(tiny_model):
    default = constant_types(edgequant.convert(tiny_model, "openvino:int4?ratio=1&awq=0&scale_estimation=0"))
    everything = constant_types(edgequant.convert(tiny_model, "openvino:int4?ratio=1&awq=0&scale_estimation=0&all_layers=1"))
    assert default.get("u8", 0) >= 2  # embedding and lm_head weights (plus their zero points)
    assert everything.get("u4", 0) > default["u4"] and everything.get("u8", 0) < default["u8"]


def test_ratio_leaves_the_remaining_layers_at_int8(tiny_model):
    full = constant_types(edgequant.convert(tiny_model, "openvino:int4?ratio=1&awq=0&scale_estimation=0"))
    half = constant_types(edgequant.convert(tiny_model, "openvino:int4?ratio=0.5&awq=0&scale_estimation=0"))
    assert 0 < half["u4"] < full["u4"] and half["u8"] > full["u8"]


def test_llm_pipeline_runs_the_artifact_as_is(tiny_model):
    import openvino_genai

    artifact = edgequant.convert(tiny_model, "openvino:int8")
    pipeline = openvino_genai.LLMPipeline(str(artifact.path), "CPU")
    text = pipeline.generate("The history of", max_new_tokens=6, ignore_eos=True)
    assert isinstance(text, str) and text


def test_llm_pipeline_loads_a_tokenizer_that_adds_bos(tiny_model, tmp_path):
    """A post-processor that adds BOS (Gemma's) once made LLMPipeline overflow an int32 length bound
    in the tokenizer IR before it loaded; the IR now carries the model's context as its bound."""
    import json
    import shutil

    from edgequant.registry import open_runner
    from edgequant.runner import GenerateParams

    model = tmp_path / "bos-model"
    shutil.copytree(tiny_model, model)
    config = model / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "add_bos_token": True}))
    artifact = edgequant.convert(model, "openvino:fp16")
    with open_runner(artifact.path, n_ctx=64) as runner:
        prompt = runner.prompt_ids("The history of")
        assert prompt[0] == 1 and len(list(runner.generate(prompt, GenerateParams(max_tokens=4, stop_at_eos=False)))) == 4


def test_runner_streams_deterministic_tokens_and_scores_like_pytorch(tiny_model):
    from edgequant.registry import open_runner
    from edgequant.runner import GenerateParams

    artifact = edgequant.convert(tiny_model, "openvino:fp16?infer=f32")
    with open_runner(artifact.path, n_ctx=128) as runner, open_runner(tiny_model, n_ctx=128) as torch_runner:
        prompt = runner.tokenize("The history of the city")
        assert prompt == torch_runner.tokenize("The history of the city")
        params = GenerateParams(max_tokens=8, stop_at_eos=False)
        first, second = list(runner.generate(prompt, params)), list(runner.generate(prompt, params))
        assert len(first) == 8 and first == second
        assert first == list(torch_runner.generate(prompt, params))  # fp16 weights, greedy: same tokens
        ours, reference = runner.logits(prompt), torch_runner.logits(prompt)
        assert ours.shape == reference.shape
        assert np.abs(ours - reference).max() < 0.05 * np.abs(reference).max()
        assert runner.inference_precision() == "f32"


def test_int8_perplexity_within_one_percent_on_the_tiny_model(tiny_model):
    artifact = edgequant.convert(tiny_model, "openvino:int8?infer=f32")
    metrics = edgequant.evaluate(artifact.path, config=QUALITY)
    assert abs(metrics["ppl_increase_pct"]) < 1.0, metrics


@pytest.mark.parametrize("spec, message", [
    ("openvino:int4?ratio=1.5", "out of range"),
    ("openvino:int4?group=48", "out of range"),
    ("openvino:int8?group=128", "does not apply"),
    ("openvino:fp16?gptq=1", "does not apply"),
    ("openvino:int4?awq=0&scale_estimation=0&samples=8", "only apply to data-aware"),
])
def test_bad_options_are_refused_before_any_work(tiny_model, tmp_path, spec, message):
    out = tmp_path / "out"
    with pytest.raises(EdgequantError, match=message):
        edgequant.convert(tiny_model, spec, output=out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_data_aware_compression_needs_enough_calibration_text(tiny_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.")
    out = tmp_path / "out"
    with pytest.raises(EdgequantError, match="calibration text has") as err:
        edgequant.convert(tiny_model, f"openvino:int4?awq=1&calib={short}", output=out)
    assert "samples=" in err.value.fix
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_data_aware_compression_records_its_calibration(tiny_model):
    artifact = edgequant.convert(tiny_model, "openvino:int4?samples=8")
    details = artifact.manifest["details"]
    assert details["compression"]["awq"] and not details["compression"]["scale_estimation"]  # the defaults
    assert details["calibration"]["sequences"] == 8 and "lee_background" in details["calibration"]["text"]


def test_unsupported_architecture_is_named_and_leaves_nothing(tiny_model, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_model, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"], config["model_type"] = ["MadeUpForCausalLM"], "madeup"
    (odd / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "odd"
    with pytest.raises(EdgequantError, match="MadeUpForCausalLM") as err:
        edgequant.convert(odd, "openvino:int8", output=out)
    assert "llama" in err.value.fix
    assert not out.exists()


def test_inspect_estimates_openvino_sizes(tiny_model):
    estimates = edgequant.inspect_model(tiny_model)["estimated_bytes"]
    assert estimates["openvino:fp16"] > estimates["openvino:int8"] > estimates["openvino:int4"] > 0


# --- the real default model -------------------------------------------------------------------

REAL = EvalConfig(ctx=512, windows=2, speed=False)  # 2 windows: the gaps asserted are many times the noise


# The default's settings (group 32, ratio 0.4) without data, and with both data-aware methods the
# issue names (8 samples keep scale estimation, the slow one, to well under a minute).
DATA_FREE = "openvino:int4?awq=0&scale_estimation=0"
AWQ_AND_SCALE_ESTIMATION = "openvino:int4?awq=1&scale_estimation=1&samples=8"


@pytest.fixture(scope="module")
def real_results():
    results = {}
    for spec in ("openvino:int8", "openvino:int4", DATA_FREE, AWQ_AND_SCALE_ESTIMATION):
        artifact = edgequant.convert(None, spec)
        results[spec] = (artifact, edgequant.evaluate(artifact.path, config=REAL))
    return results


@pytest.mark.slow
def test_real_model_int8_within_one_percent_and_really_int8(real_results):
    artifact, metrics = real_results["openvino:int8"]
    assert abs(metrics["ppl_increase_pct"]) < 1.0, metrics
    assert constant_types(artifact).get("u8", 0) >= 30 * 7


@pytest.mark.slow
def test_real_model_default_int4_meets_the_quality_target(real_results):
    """At most 1.5x gguf:q4_k_m's perplexity increase (+6.11% on 8 windows) at most 1.2x its size
    (100.6 MiB); bench/openvino_mlx.py measures both formats side by side."""
    artifact, metrics = real_results["openvino:int4"]
    assert constant_types(artifact).get("u4", 0) >= 30 * 7 * 0.3
    assert metrics["ppl_increase_pct"] <= 1.5 * 6.11, metrics
    assert artifact.size_bytes <= 1.2 * 100.6 * 2**20


@pytest.mark.slow
def test_real_model_awq_and_scale_estimation_no_worse_than_data_free(real_results):
    """Compared by KLD to the baseline: perplexity over 2 windows is too noisy to rank these (AWQ +
    scale estimation on 8 samples measured +5.54% vs data-free +4.99% on 2 windows, but KLD 0.059
    vs 0.124; on 8 windows data-free is +9.46%)."""
    data_free = real_results[DATA_FREE][1]
    for spec in (AWQ_AND_SCALE_ESTIMATION, "openvino:int4"):  # the default: AWQ alone on 16 samples
        data_aware = real_results[spec][1]
        assert data_aware["kld_mean"] <= data_free["kld_mean"], (spec, data_aware, data_free)
    assert real_results["openvino:int4"][1]["perplexity"] <= data_free["perplexity"], data_free


@pytest.mark.slow
def test_real_model_generates_through_llm_pipeline(real_results):
    from edgequant.registry import open_runner
    from edgequant.runner import GenerateParams

    artifact = real_results["openvino:int8"][0]
    with open_runner(artifact.path, n_ctx=64, need_logits=False) as runner:
        ids = list(runner.generate(runner.tokenize("The capital of France is"), GenerateParams(max_tokens=4)))
        assert "Paris" in runner.detokenize(ids)


def test_a_bf16_source_is_exported_in_bf16_and_compressed_from_it(tiny_model, tmp_path):
    """A bf16 checkpoint keeps its type through the float IR (a float32 export doubled the memory
    and the IR for nothing the compression uses), and compression from it scores like the source."""
    import torch
    from transformers import AutoModelForCausalLM

    source = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.bfloat16)
    model.save_pretrained(source, safe_serialization=True)
    for item in tiny_model.iterdir():
        if item.suffix != ".safetensors" and item.name != "config.json":
            shutil.copy(item, source / item.name)
    artifact = edgequant.convert(source, "openvino:int8")
    intermediate = artifact.manifest["details"]["intermediate"]
    assert intermediate["type"] == "bf16"
    ir_bytes = (Path(intermediate["path"]) / "openvino_model.bin").stat().st_size
    assert ir_bytes < 2.2 * model.num_parameters()  # two bytes a weight, not four
    assert "u8" in constant_types(artifact)
    metrics = edgequant.evaluate(artifact.path, config=QUALITY)
    assert metrics["kld_mean"] < 0.02
