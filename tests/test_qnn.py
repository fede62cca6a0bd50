"""The QNN backend: fixed-shape export, QDQ via onnxruntime's QNN helpers, CPU EP runs."""

import pytest

import edgequant
from edgequant.backends.onnx.tools import check_model, qdq_counts
from edgequant.errors import EdgequantError
from edgequant.evaldata import default_eval_text
from edgequant.evaluation import EvalConfig

pytest.importorskip("onnx", reason="its extra is not installed")
pytest.importorskip("onnxruntime", reason="its extra is not installed")
import onnx  # noqa: E402

SEQ = 64


def _quality(artifact):
    return edgequant.evaluate(artifact.path, config=EvalConfig(ctx=SEQ, windows=2, speed=False))


@pytest.mark.parametrize("precision, activation, weight", [("w8a16", "uint16", "uint8"), ("w8a8", "uint8", "uint8")])
def test_qdq_types_and_cpu_run(tiny_model, precision, activation, weight):
    artifact = edgequant.convert(tiny_model, f"qnn:{precision}?seq={SEQ}&samples=2")
    check_model(artifact.model_path)
    counts = qdq_counts(artifact.model_path)
    assert counts.get(f"QuantizeLinear:{activation}", 0) >= 20  # every activation of 2 layers is quantized
    assert counts.get(f"DequantizeLinear:{weight}", 0) >= 2 * 7 + 1  # 7 matrices per layer + LM head
    metrics = _quality(artifact)  # runs on the CPU execution provider
    if precision == "w8a16":
        assert abs(metrics["ppl_increase_pct"]) < 3 and metrics["top1_agreement"] > 0.8


def test_w4a16_has_int4_weights(tiny_model):
    artifact = edgequant.convert(tiny_model, f"qnn:w4a16?seq={SEQ}&samples=2")
    counts = qdq_counts(artifact.model_path)
    assert counts.get("DequantizeLinear:int4", 0) >= 2 * 7
    assert counts.get("QuantizeLinear:uint16", 0) >= 20


def test_override_gives_mixed_precision(tiny_model):
    artifact = edgequant.convert(tiny_model, f"qnn:w8a16?seq={SEQ}&samples=2&override=lm_head:u16")
    counts = qdq_counts(artifact.model_path)
    plain = qdq_counts(edgequant.convert(tiny_model, f"qnn:w8a16?seq={SEQ}&samples=2").model_path)
    assert counts["DequantizeLinear:uint8"] == plain["DequantizeLinear:uint8"] - 1  # the LM head moved to 16 bit


def test_act16_moves_the_worst_activations_of_w8a8_to_16_bit(tiny_model):
    artifact = edgequant.convert(tiny_model, f"qnn:w8a8?seq={SEQ}&samples=2&act16=0.01")
    widened = artifact.manifest["details"]["activations_16bit"]
    counts = qdq_counts(artifact.model_path)
    plain = qdq_counts(edgequant.convert(tiny_model, f"qnn:w8a8?seq={SEQ}&samples=2&act16=0").model_path)
    assert widened["count"] == len(widened["tensors"]) > 0
    assert counts.get("QuantizeLinear:uint16", 0) > 0 and "QuantizeLinear:uint16" not in plain
    assert counts["QuantizeLinear:uint8"] < plain["QuantizeLinear:uint8"]


def test_generation_is_bounded_by_the_fixed_shape(tiny_model):
    from edgequant.registry import open_runner
    from edgequant.runner import GenerateParams

    artifact = edgequant.convert(tiny_model, f"qnn:w8a16?seq={SEQ}&samples=2")
    with open_runner(artifact.path, n_ctx=512, need_logits=False) as runner:
        assert runner.n_ctx == SEQ
        prompt = runner.tokenize("The history of")
        tokens = list(runner.generate(prompt, GenerateParams(max_tokens=200, stop_at_eos=False)))
    assert len(tokens) == SEQ - len(prompt)


@pytest.mark.parametrize("spec, match", [
    ("qnn:w8a16?context=1", "onnxruntime-qnn"),
    ("qnn:w8a16?seq=4", "seq"),
    ("qnn:w8a16?seq=4096&samples=200", "calibration text"),
    ("qnn:w8a16?override=lm_head:u7", "NAME:TYPE"),
    ("qnn:w8a16?act16=0.3", "does not apply to qnn:w8a16 \\(only to w8a8\\)"),
])
def test_bad_input_leaves_nothing_behind(tiny_model, tmp_path, spec, match):
    from edgequant.backends.qnn.tools import htp_available

    if "context" in spec and htp_available():
        pytest.skip("onnxruntime-qnn is installed here")
    out = tmp_path / "out"
    with pytest.raises(EdgequantError, match=match) as err:
        edgequant.convert(tiny_model, spec, output=out)
    if "context" in spec:
        assert "pip install onnxruntime-qnn" in err.value.fix
    assert not out.exists() and not list(tmp_path.iterdir())


def test_simulated_htp_agrees_with_cpu_and_compiles_a_context(tiny_model):
    from edgequant.backends.qnn.tools import htp_available

    if not htp_available():
        pytest.skip("onnxruntime-qnn (extra `qnn`) is not installed")
    from edgequant.backends.qnn.runner import FixedShapeRunner

    artifact = edgequant.convert(tiny_model, f"qnn:w8a16?seq={SEQ}&samples=2&context=1")
    report = artifact.manifest["details"]["htp"]
    assert report["top1_agreement"] > 0.8 and report["tokens"] == SEQ
    context = onnx.load(str(artifact.path / "model_ctx.onnx"))
    assert [n.op_type for n in context.graph.node] == ["EPContext"]
    with FixedShapeRunner(artifact.path, "model.onnx", seq=SEQ, name="htp", n_ctx=SEQ, threads=2, htp=True) as htp:
        ids = htp.tokenize(default_eval_text()[:2000])[:SEQ]
        on_htp = htp.logits(ids)
    with FixedShapeRunner(artifact.path, "model.onnx", seq=SEQ, name="cpu", n_ctx=SEQ, threads=2) as cpu:
        on_cpu = cpu.logits(ids)
    assert (on_cpu.argmax(-1) == on_htp.argmax(-1)).mean() > 0.8


@pytest.mark.slow
def test_default_model_w8a16_on_cpu_ep():
    artifact = edgequant.convert(None, "qnn:w8a16?seq=128&samples=4")
    check_model(artifact.model_path)
    metrics = edgequant.evaluate(artifact.path, config=EvalConfig(ctx=128, windows=2, speed=False))
    assert metrics["ppl_increase_pct"] < 25 and metrics["top1_agreement"] > 0.7
