"""The ONNX backend: genai builder export, int4/int8/int8-static quantization, the ONNX runner.

Fast tests use a tiny random Llama whose MLP width differs from its vocabulary (the builder
mistakes an MLP projection of vocabulary width for the LM head; the shared tiny model has that
shape, which is itself checked to be refused). Slow tests use the real default model.
"""

import json
import shutil

import numpy as np
import pytest

import edgequant
from cpu_int8 import SATURATING_INT8
from edgequant.backends.onnx.tools import check_model
from edgequant.errors import EdgequantError
from edgequant.measurement.settings import EvalConfig
from edgequant.registry import open_runner
from edgequant.runner import GenerateParams

pytest.importorskip("onnx", reason="its extra is not installed")
pytest.importorskip("onnxruntime_genai", reason="its extra is not installed")
import onnx  # noqa: E402


def _quality(artifact):
    return edgequant.evaluate(artifact.path, config=EvalConfig(ctx=128, windows=2, speed=False))


def _op_types(artifact) -> set[str]:
    return {n.op_type for n in onnx.load(str(artifact.model_path), load_external_data=False).graph.node}


def test_fp32_export_is_valid_and_matches_pytorch(onnx_tiny):
    artifact = edgequant.convert(onnx_tiny, "onnx:fp32")
    check_model(artifact.model_path)
    for name in ("genai_config.json", "tokenizer.json", "model.onnx.data"):
        assert (artifact.path / name).is_file()
    assert "onnxruntime-genai" in artifact.manifest["tools"]
    metrics = _quality(artifact)
    assert abs(metrics["ppl_increase_pct"]) < 0.5
    assert metrics["top1_agreement"] > 0.99


def test_fp32_greedy_generation_matches_pytorch(onnx_tiny):
    artifact = edgequant.convert(onnx_tiny, "onnx:fp32")
    params = GenerateParams(max_tokens=16, stop_at_eos=False)
    with open_runner(onnx_tiny, n_ctx=128) as torch_runner:
        prompt = torch_runner.tokenize("The history of the city")
        expected = list(torch_runner.generate(prompt, params))
    with open_runner(artifact.path, n_ctx=128, need_logits=False) as runner:
        assert runner.tokenize("The history of the city") == prompt
        assert list(runner.generate(prompt, params)) == expected


def test_int4_and_int8_quality_bands(onnx_tiny):
    int8 = edgequant.convert(onnx_tiny, "onnx:int8")
    int4 = edgequant.convert(onnx_tiny, "onnx:int4")
    for artifact in (int8, int4):
        check_model(artifact.model_path)
    assert "MatMulNBits" in _op_types(int4)
    assert {"DynamicQuantizeMatMul", "MatMulInteger"} & _op_types(int8)
    q8, q4 = _quality(int8), _quality(int4)
    assert abs(q8["ppl_increase_pct"]) < 3
    assert q4["kld_mean"] > q8["kld_mean"]  # int4 loses more than int8
    assert int4.size_bytes < int8.size_bytes


def test_int8_unsigned_weights_are_the_same_codes_shifted(onnx_tiny):
    """`?weights=u8`: every MatMulInteger reads uint8 weights around the zero point 128, the
    integer products of the signed artifact, so the two score alike (kernels apart)."""
    import onnx
    from onnx import numpy_helper

    signed, unsigned = edgequant.convert(onnx_tiny, "onnx:int8"), edgequant.convert(onnx_tiny, "onnx:int8?weights=u8")
    graphs = {a.spec.options.get("weights", "s8"): onnx.load(str(a.model_path)).graph for a in (signed, unsigned)}
    for codes, graph in graphs.items():
        weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        matmuls = [n for n in graph.node if n.op_type == "MatMulInteger"]
        assert matmuls and {weights[n.input[1]].dtype.name for n in matmuls} == {"int8" if codes == "s8" else "uint8"}
        assert all(len(n.input) == (4 if codes == "u8" else 3) for n in matmuls)  # b_zero_point 128 for uint8 codes
    first = next(n.input[1] for n in graphs["s8"].node if n.op_type == "MatMulInteger")
    codes = {c: next(numpy_helper.to_array(i) for i in g.initializer if i.name == first) for c, g in graphs.items()}
    assert np.array_equal(codes["u8"].astype(np.int16) - 128, codes["s8"].astype(np.int16))
    # The same integer products: as close to the float model as the signed codes, closer where the
    # CPU's u8 x s8 kernels saturate (no VNNI, 2026-12-05: KLD 0.019 signed, 0.0024 unsigned)
    q_signed, q_unsigned = _quality(signed), _quality(unsigned)
    assert q_unsigned["kld_mean"] <= q_signed["kld_mean"] * 1.1 + 1e-4, (q_unsigned["kld_mean"], q_signed["kld_mean"])


def _matmul_nbits_model(zero_points):
    """One 4-bit MatMulNBits (K=64, N=8, blocks of 32) on a (1, 3, 64) input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(0, 256, (8, 2, 16), dtype=np.uint8), "q"),
             numpy_helper.from_array(rng.uniform(0.01, 0.1, 16).astype(np.float32), "s"),
             numpy_helper.from_array(zero_points, "z")]
    node = helper.make_node("MatMulNBits", ["x", "q", "s", "z"], ["y"], domain="com.microsoft", K=64, N=8, bits=4, block_size=32)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_hqq_float_zero_points_fold_into_an_exact_correction():
    import onnxruntime as ort

    from edgequant.backends.onnx.hqq import fold_float_zero_points

    model = _matmul_nbits_model(np.random.default_rng(1).uniform(2.0, 13.0, 16).astype(np.float32))
    x = {"x": np.random.default_rng(2).normal(size=(1, 3, 64)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    assert fold_float_zero_points(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "Reshape", "ReduceSum", "MatMul", "Add"]
    assert len(model.graph.node[0].input) == 3  # no zero points: the prepacked kernel applies
    after = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


def test_integer_zero_points_are_left_alone():
    from edgequant.backends.onnx.hqq import fold_float_zero_points

    model = _matmul_nbits_model(np.full(8, 0x88, np.uint8))
    assert fold_float_zero_points(model) == 0 and len(model.graph.node) == 1


def test_default_int4_has_no_float_zero_points(onnx_tiny):
    artifact = edgequant.convert(onnx_tiny, "onnx:int4")
    graph = onnx.load(str(artifact.model_path), load_external_data=False).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) >= 10 and all(len(n.input) < 4 or inits[n.input[3]] == onnx.TensorProto.UINT8 for n in nbits)


def test_int8_static_is_qdq_with_int8_weights_and_uint8_activations(onnx_tiny):
    from edgequant.backends._shared.ort import qdq_counts

    artifact = edgequant.convert(onnx_tiny, "onnx:int8-static?samples=4&keep_float=none")
    check_model(artifact.model_path)
    counts = qdq_counts(artifact.model_path)
    matmuls = 2 * 5 + 1  # qkv, o, gate, up, down per layer + LM head
    assert counts.get("DequantizeLinear:int8", 0) >= matmuls  # one per weight
    assert counts.get("QuantizeLinear:uint8", 0) >= matmuls  # at least one per activation input
    assert artifact.manifest["details"]["calibration"]["decode_steps"] > 0
    # SmoothQuant (the default): per layer the attention norm, the MLP norm and up's columns, then the final norm
    assert artifact.manifest["details"]["smoothquant"] == {"alpha": 0.5, "sites": 2 * 3 + 1}
    assert abs(_quality(artifact)["ppl_increase_pct"]) < 3


def test_int4_options_reach_the_builder(onnx_tiny):
    artifact = edgequant.convert(onnx_tiny, "onnx:int4?algo=rtn&block=64&sym=1")
    assert artifact.manifest["details"]["builder_options"]["int4_block_size"] == "64"
    nodes = onnx.load(str(artifact.model_path), load_external_data=False).graph.node
    blocks = {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {64}


@pytest.mark.parametrize("spec, match", [
    ("onnx:int4?block=48", "block"),
    ("onnx:fp32?block=64", "does not apply"),
    ("onnx:int4?algo=k_quant&sym=1", "sym=1"),
    ("onnx:int8-static?samples=512&calib_tokens=4096", "calibration text"),
])
def test_bad_options_leave_nothing_behind(onnx_tiny, tmp_path, spec, match):
    out = tmp_path / "out"
    with pytest.raises(EdgequantError, match=match):
        edgequant.convert(onnx_tiny, spec, output=out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unsupported_architecture_names_the_supported_ones(onnx_tiny, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(onnx_tiny, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["MadeUpForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgequantError, match="MadeUpForCausalLM") as err:
        edgequant.convert(odd, "onnx:fp32", output=tmp_path / "o")
    assert "LlamaForCausalLM" in err.value.fix


def test_vocab_wide_mlp_is_refused_instead_of_exported_wrong(tiny_model, tmp_path):
    with pytest.raises(EdgequantError, match="LM head"):
        edgequant.convert(tiny_model, "onnx:fp32", output=tmp_path / "o")


def test_inspect_estimates_onnx_sizes(onnx_tiny):
    sizes = edgequant.inspect_model(onnx_tiny)["estimated_bytes"]
    assert sizes["onnx:int4"] < sizes["onnx:int8"] < sizes["onnx:fp16"] < sizes["onnx:fp32"]


@pytest.mark.slow
def test_default_model_int4_meets_the_quality_target():
    """The issue's target: ppl increase <= 1.5x gguf:q4_k_m's, size <= 1.2x, on the default model."""
    config = EvalConfig(windows=2, speed=False)
    onnx_int4 = edgequant.convert(None, "onnx:int4")
    gguf = edgequant.convert(None, "gguf:q4_k_m")
    check_model(onnx_int4.model_path)
    ours, theirs = edgequant.evaluate(onnx_int4.path, config=config), edgequant.evaluate(gguf.path, config=config)
    assert ours["ppl_increase_pct"] <= 1.5 * max(theirs["ppl_increase_pct"], 0.1)
    assert onnx_int4.manifest["model_bytes"] + (onnx_int4.path / "model.onnx.data").stat().st_size <= 1.2 * gguf.manifest["model_bytes"]
    with open_runner(onnx_int4.path, n_ctx=256, need_logits=False) as runner:
        text = runner.detokenize(list(runner.generate(runner.tokenize("The capital of France is"), GenerateParams(max_tokens=8))))
    assert "Paris" in text


@pytest.mark.slow
def test_default_model_int8_is_within_3_percent():
    """The issue's int8 band on the real model: 4 windows of 512 (the bench's windows). Per-tensor
    dynamic int8 (onnxruntime's quantize_dynamic) measured +69% here; per-token scales fix it."""
    artifact = edgequant.convert(None, "onnx:int8")
    check_model(artifact.model_path)
    assert "MatMulInteger" in _op_types(artifact)
    metrics = edgequant.evaluate(artifact.path, config=EvalConfig(windows=4, speed=False))
    # Measured with VNNI: under 3%, top-1 0.885 (gguf:q4_k_m: 0.867); without it (2026-12-05, u8s8
    # kernels saturating): +6.4%, top-1 0.86 at 2 windows.
    assert abs(metrics["ppl_increase_pct"]) < (9 if SATURATING_INT8 else 3), metrics["ppl_increase_pct"]
    assert metrics["top1_agreement"] > (0.82 if SATURATING_INT8 else 0.85), metrics["top1_agreement"]
    # Unsigned weight codes run on u8 x u8 kernels, which do not saturate: the integer products are
    # exact on any x86 CPU. Measured without VNNI (2026-12-05): +3.5%, KLD 0.042, top-1 0.88, where
    # the signed codes gave +6.4%, KLD 0.092, top-1 0.855.
    unsigned = edgequant.evaluate(edgequant.convert(None, "onnx:int8?weights=u8").path, config=EvalConfig(windows=4, speed=False))
    assert abs(unsigned["ppl_increase_pct"]) < 4.5 and unsigned["top1_agreement"] > 0.86, unsigned
    if SATURATING_INT8:
        assert unsigned["kld_mean"] < 0.7 * metrics["kld_mean"], (unsigned["kld_mean"], metrics["kld_mean"])


@pytest.mark.slow
def test_default_model_int8_static_is_sane():
    """Static per-tensor activation ranges cannot follow the model's massive first-token
    activations, so the sensitive MatMuls stay float; the rest must stay close to the baseline."""
    from edgequant.backends._shared.ort import qdq_counts

    artifact = edgequant.convert(None, "onnx:int8-static")
    check_model(artifact.model_path)
    assert qdq_counts(artifact.model_path).get("DequantizeLinear:int8", 0) >= 30 * 4  # qkv, o, gate, up
    metrics = edgequant.evaluate(artifact.path, config=EvalConfig(windows=2, speed=False))
    assert abs(metrics["ppl_increase_pct"]) < 15


@pytest.mark.slow
def test_default_model_fp16_generates_on_cpu():
    """The builder's fp16 CPU graph failed on the first decode step in onnxruntime-genai."""
    artifact = edgequant.convert(None, "onnx:fp16")
    check_model(artifact.model_path)
    with open_runner(artifact.path, n_ctx=256, need_logits=False) as runner:
        tokens = list(runner.generate(runner.tokenize("The capital of France is"), GenerateParams(max_tokens=8)))
        text = runner.detokenize(tokens)
    assert len(tokens) == 8 and "Paris" in text
