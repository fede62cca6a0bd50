"""`openvino:PREC?lora=separate`: the base model's IR, the adapter beside it as adapter.safetensors in
OpenVINO GenAI's form, applied by GenAI (generation, the server's batch decoder) and by edgequant's
scorer, which adds the same branches to the raw IR.

The adapter is random and non-zero, written in PEFT's layout straight from tensors (no training), on
the tiny Llama, with one module at its own alpha and one at a lower rank (both folded into the file's
B). GenAI applying it at run time and edgequant merging it into the float weights are two
implementations of the same `W + s B A`: on fp32 they must agree to float rounding.
"""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

import edgequant
from edgequant.adaptation.merge import adapted_model
from edgequant.errors import EdgequantError
from edgequant.measurement.settings import EvalConfig
from edgequant.registry import open_runner
from edgequant.runner import GenerateParams
from lora_adapters import assert_served_with_their_adapters, decode_together, projections
from lora_adapters import write_random_adapter as random_adapter

pytest.importorskip("openvino_genai", reason="its extra is not installed")
pytest.importorskip("nncf", reason="its extra is not installed")

QUICK = EvalConfig(ctx=64, windows=2, speed=False)
IDS = [1, 45, 300, 17, 99, 250, 3, 480, 12, 77, 301, 5, 260, 33, 140, 8]
GREEDY = GenerateParams(max_tokens=10, temperature=0.0, stop_at_eos=False)
MODULES = projections(512)  # the tiny Llama's (tests/conftest.py)
RANKS = {"v_proj": 2}  # rank_pattern: v_proj at a lower rank than r = 4


def write_random_adapter(out, base, modules=MODULES, seed: int = 0):
    """A PEFT LoRA folder for the tiny Llama: random non-zero A and B on every projection, alpha 8 at
    rank 4 (down_proj at alpha 16, v_proj at rank 2)."""
    return random_adapter(out, base, modules, rank_pattern=RANKS, alpha_pattern={"down_proj": 16}, seed=seed)


@pytest.fixture(scope="module")
def merged(tiny_model, tmp_path_factory):
    """The tiny Llama with a random adapter merged in (what `--adapter` hands every command)."""
    return adapted_model(tiny_model, write_random_adapter(tmp_path_factory.mktemp("lora") / "adapter", tiny_model))


@pytest.fixture(scope="module")
def fp32(merged, tiny_model):
    """openvino:fp32 of base + separate adapter, of the merged model, and of the base alone."""
    return (edgequant.convert(merged, "openvino:fp32?lora=separate"), edgequant.convert(merged, "openvino:fp32"),
            edgequant.convert(tiny_model, "openvino:fp32"))


def _logits(artifact) -> np.ndarray:
    with open_runner(artifact.path, n_ctx=64) as runner:
        return runner.logits(IDS)


def _generated(artifact) -> tuple[list[int], list[list[int]]]:
    """Greedy tokens of LLMPipeline for one prompt, and of the server's batch decoder for two at once."""
    prompts = [IDS[:6], IDS[8:]]
    with open_runner(artifact.path, n_ctx=64, need_logits=False) as runner:
        alone = list(runner.generate(prompts[0], GREEDY))
        together = decode_together(runner, prompts, GREEDY)  # GenAI's ContinuousBatchingPipeline
    return alone, together


def test_fp32_base_plus_adapter_scores_as_the_merged_model(fp32, merged):
    separate, merged_fp32, base = fp32
    adapter = separate.manifest["details"]["adapter"]
    assert adapter["file"] == "adapter.safetensors" and adapter["format"] == "openvino_genai"
    assert adapter["scale"] == 1.0 and adapter["factor"] == 2.0 and adapter["rank"] == 4 and adapter["branches"] == 14
    assert adapter["fingerprint"] == separate.manifest["source"]["adaptation"]["adapter"]["fingerprint"]
    assert separate.manifest["source"]["path"] == str(merged)  # evaluation's baseline: the adapted float model
    assert filecmp.cmp(separate.path / "openvino_model.bin", base.path / "openvino_model.bin", shallow=False)  # the base's IR
    ours, want = _logits(separate), _logits(merged_fp32)
    assert np.abs(ours - want).max() < 1e-4, np.abs(ours - want).max()
    assert np.abs(_logits(base) - want).max() > 0.5  # the adapter matters
    metrics = edgequant.evaluate(separate.path, config=QUICK)
    assert metrics["kld_mean"] < 1e-5 and metrics["top1_agreement"] == 1.0, metrics


def test_generation_and_the_batch_decoder_apply_the_adapter(fp32):
    separate, merged_fp32, base = fp32
    alone, together = _generated(separate)
    assert len(alone) == GREEDY.max_tokens and together[0] == alone  # the server's decoder applies it too
    assert (alone, together) == _generated(merged_fp32)
    assert _generated(base)[1] != together  # without the adapter: other tokens
    assert int(np.argmax(_logits(separate)[5])) == alone[0]  # the scorer agrees on the first token


def test_int4_separate_keeps_awq_and_every_path_applies_the_adapter(merged, fp32):
    """int4's default, AWQ included: its scales also scale what the branches read (lora.py), an
    approximation measured to cost less than AWQ gains."""
    artifact = edgequant.convert(merged, "openvino:int4?lora=separate")
    details = artifact.manifest["details"]
    assert details["compression"]["awq"] is True and details["calibration"]["sequences"] == 16
    assert details["adapter"]["branches"] == 14 and details["weight_constants"].get("u4", 0) > 0
    alone, together = _generated(artifact)
    assert together[0] == alone
    assert int(np.argmax(_logits(artifact)[5])) == alone[0]
    separate = edgequant.evaluate(artifact.path, config=QUICK)["kld_mean"]
    merged_int4 = edgequant.evaluate(edgequant.convert(merged, "openvino:int4").path, config=QUICK)["kld_mean"]
    base_ir = edgequant.evaluate(fp32[2].path, config=QUICK, baseline=merged)["kld_mean"]  # the base alone vs the adapted model
    # measured: separate 0.033, merged 0.026 (without AWQ: 0.041 and 0.044), the base without the adapter 0.39
    assert separate < 2 * merged_int4 and separate < 0.25 * base_ir, (separate, merged_int4, base_ir)


def test_separate_without_an_adapter_is_refused(tiny_model, tmp_path):
    with pytest.raises(EdgequantError, match="has no adapter merged into it") as refused:
        edgequant.convert(tiny_model, "openvino:int4?lora=separate", output=tmp_path / "out")
    assert "--adapter" in refused.value.fix and not (tmp_path / "out").exists()


def test_an_adapted_output_layer_is_refused_before_converting(tiny_model, tmp_path):
    merged = adapted_model(tiny_model, write_random_adapter(tmp_path / "adapter", tiny_model,
                                                            {"self_attn.q_proj": (256, 256), "lm_head": (512, 256)}))
    with pytest.raises(EdgequantError, match="lm_head, outside the transformer blocks") as refused:
        edgequant.convert(merged, "openvino:int8?lora=separate", output=tmp_path / "out")
    assert "lora=merged" in refused.value.fix and not (tmp_path / "out").exists()


def test_an_adapter_that_does_not_fit_the_ir_is_refused():
    """GenAI leaves a module it finds no MatMul for unadapted (a warning on stderr) and fails on one of
    another shape; the scorer's branches, also added at conversion, refuse both with the reason."""
    from edgequant.backends.openvino.lora import add_branches

    a, b = np.ones((2, 8), np.float32), np.ones((16, 2), np.float32)
    assert add_branches(_one_projection(), {"model.layers.0.mlp.up_proj": (a, b)}) == 1
    with pytest.raises(EdgequantError, match="expects model.layers.0.mlp.up_proj of 32 x 8; the IR's MatMul has 16 x 8"):
        add_branches(_one_projection(), {"model.layers.0.mlp.up_proj": (a, np.ones((32, 2), np.float32))})
    with pytest.raises(EdgequantError, match="no MatMul for model.layers.1.mlp.up_proj"):
        add_branches(_one_projection(), {"model.layers.0.mlp.up_proj": (a, b), "model.layers.1.mlp.up_proj": (a, b)})


def _one_projection():
    """An ov.Model of one MatMul named as optimum-intel names layer 0's up_proj (16 x 8)."""
    import openvino as ov
    from openvino import opset13 as ops

    x = ops.parameter([1, 3, 8], ov.Type.f32, name="x")
    up = ops.matmul(x, ops.constant(np.ones((16, 8), np.float32)), False, True)
    up.set_friendly_name("__module.model.layers.0.mlp.up_proj/aten::linear/MatMul")
    return ov.Model([ops.result(up)], [x])


def test_one_ir_serves_each_artifacts_adapter_one_adapter_at_a_time(tiny_model, merged, tmp_path_factory):
    """Two adapters' int8 separate artifacts and the plain int8 base: one IR, loaded once. GenAI's
    pipelines hold one adapter's LoRA states at a time, switched between requests (the decoder's
    one-token `generate`, with an empty config for the base), so the worker admits one adapter's
    requests at a time; each gets its own artifact's answer."""
    other = adapted_model(tiny_model, write_random_adapter(tmp_path_factory.mktemp("lora2") / "adapter", tiny_model, seed=3))
    assert_served_with_their_adapters({"task_a": edgequant.convert(merged, "openvino:int8?lora=separate"),
                                       "task_b": edgequant.convert(other, "openvino:int8?lora=separate"),
                                       "base": edgequant.convert(tiny_model, "openvino:int8")},
                                      ["Once upon a time", "The capital of"])
