"""The QNN backend: fixed-shape export, QDQ via onnxruntime's QNN helpers, CPU EP runs."""

import itertools
import json

import numpy as np
import pytest

import edgequant
from edgequant.backends._shared.ort import qdq_counts
from edgequant.backends.onnx.tools import check_model
from edgequant.errors import EdgequantError
from edgequant.measurement.evaldata import default_eval_text
from edgequant.measurement.settings import EvalConfig

pytest.importorskip("onnx", reason="its extra is not installed")
pytest.importorskip("onnxruntime", reason="its extra is not installed")
import onnx  # noqa: E402

SEQ = 64


def _quality(artifact):
    return edgequant.evaluate(artifact.path, config=EvalConfig(ctx=SEQ, windows=2, speed=False))


@pytest.mark.parametrize("precision, activation, weight", [("w8a16", "uint16", "int8"), ("w8a8", "uint8", "int8")])
def test_qdq_types_and_cpu_run(tiny_model, precision, activation, weight):
    artifact = edgequant.convert(tiny_model, f"qnn:{precision}?graphs=fixed&seq={SEQ}&samples=2")
    check_model(artifact.model_path)
    counts = qdq_counts(artifact.model_path)
    assert counts.get(f"QuantizeLinear:{activation}", 0) >= 20  # every activation of 2 layers is quantized
    assert counts.get(f"DequantizeLinear:{weight}", 0) >= 2 * 7 + 1  # 7 matrices per layer + LM head
    metrics = _quality(artifact)  # runs on the CPU execution provider
    if precision == "w8a16":
        assert abs(metrics["ppl_increase_pct"]) < 3 and metrics["top1_agreement"] > 0.8


def test_w4a16_has_int4_weights(tiny_model):
    artifact = edgequant.convert(tiny_model, f"qnn:w4a16?graphs=fixed&seq={SEQ}&samples=2&mix=0")
    counts = qdq_counts(artifact.model_path)
    assert counts.get("DequantizeLinear:int4", 0) >= 2 * 7
    assert counts.get("QuantizeLinear:uint16", 0) >= 20


def test_an_explicit_block_size_is_the_one_built_even_where_it_equals_another_precisions_default(tiny_model):
    spec = f"qnn:w4a16?graphs=fixed&seq={SEQ}&samples=2&mix=0&gptq=0"

    def block_sizes(artifact):
        model = onnx.load(str(artifact.model_path))
        return {onnx.helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "DequantizeLinear"
                for a in n.attribute if a.name == "block_size"}

    assert block_sizes(edgequant.convert(tiny_model, spec + "&block=64")) == {64}
    assert block_sizes(edgequant.convert(tiny_model, spec)) == {32}  # w4a16's own default


def test_w4a16_raises_the_weights_int8_buys_most_for(tiny_model):
    spec = f"qnn:w4a16?graphs=fixed&seq={SEQ}&samples=2"
    mixed = edgequant.convert(tiny_model, spec)  # mix=0.35 is the default
    plain = edgequant.convert(tiny_model, spec + "&mix=0")
    chosen = mixed.manifest["details"]["weights_int8"]
    assert chosen["method"] == "kld" and 0 < chosen["share"] <= 0.35
    assert set(chosen["kind_gain"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # no other set of kinds that fits the share buys more
    gain, share = chosen["kind_gain"], chosen["kind_share"]
    fitting = [s for n in range(1, 8) for s in itertools.combinations(gain, n) if sum(share[k] for k in s) <= 0.35]
    assert sum(gain[k] for k in chosen["kinds"]) >= max(sum(gain[k] for k in s) for s in fitting) - 1e-9
    counts, plain_counts = qdq_counts(mixed.model_path), qdq_counts(plain.model_path)
    assert counts["DequantizeLinear:int4"] == plain_counts["DequantizeLinear:int4"] - chosen["count"]
    assert counts["DequantizeLinear:int8"] == plain_counts["DequantizeLinear:int8"] + chosen["count"]
    assert "weights_int8" not in plain.manifest["details"]


def test_override_gives_mixed_precision(tiny_model):
    artifact = edgequant.convert(tiny_model, f"qnn:w8a16?graphs=fixed&seq={SEQ}&samples=2&override=lm_head:u16")
    counts = qdq_counts(artifact.model_path)
    plain = qdq_counts(edgequant.convert(tiny_model, f"qnn:w8a16?graphs=fixed&seq={SEQ}&samples=2").model_path)
    assert counts["DequantizeLinear:int8"] == plain["DequantizeLinear:int8"] - 1  # the LM head moved to 16 bit


def test_act16_moves_the_worst_activations_of_w8a8_to_16_bit(tiny_model):
    spec = f"qnn:w8a8?graphs=fixed&seq={SEQ}&samples=2&widen=underflow"
    artifact = edgequant.convert(tiny_model, spec + "&act16=0.01")
    widened = artifact.manifest["details"]["activations_16bit"]
    counts = qdq_counts(artifact.model_path)
    plain = qdq_counts(edgequant.convert(tiny_model, spec + "&act16=0").model_path)
    assert widened["count"] == len(widened["tensors"]) > 0
    assert counts.get("QuantizeLinear:uint16", 0) > 0 and "QuantizeLinear:uint16" not in plain
    assert counts["QuantizeLinear:uint8"] < plain["QuantizeLinear:uint8"]


def _half_the_cost(widening: dict) -> float:
    """A budget some groups fit in and some do not: half of what all of them cost one by one."""
    return sum(max(cost, 0.0) for cost in widening["group_cost"].values()) / 2


def test_kld_widening_keeps_the_measured_worst_groups_at_16_bit(tiny_model):
    spec = f"qnn:w8a8?graphs=fixed&seq={SEQ}&samples=2"
    strict = edgequant.convert(tiny_model, spec + "&budget=0").manifest["details"]["activations_16bit"]
    assert strict["method"] == "kld" and strict["group_cost"] and strict["kld_chosen"] <= strict["kld_all_16bit"]
    assert strict["count"] == len(strict["tensors"]) > 0
    # a budget between: the groups that go to 8 bits are the cheapest measured, and together stay within it
    middle = edgequant.convert(tiny_model, spec + f"&budget={_half_the_cost(strict):.5f}")
    chosen = middle.manifest["details"]["activations_16bit"]
    kept = [role for role in chosen["group_cost"] if role not in chosen["eight_bit_groups"]]
    assert chosen["eight_bit_groups"] and kept and chosen["kld_chosen"] - chosen["kld_all_16bit"] <= chosen["budget"]
    assert min(chosen["group_cost"][r] for r in kept) >= max(chosen["group_cost"][r] for r in chosen["eight_bit_groups"])
    assert chosen["count"] <= strict["count"]
    counts = qdq_counts(middle.model_path)
    assert counts.get("QuantizeLinear:uint16", 0) > 0 and counts.get("QuantizeLinear:uint8", 0) > 0
    loose = edgequant.convert(tiny_model, spec + "&budget=10")  # any cost fits: every group goes 8-bit
    assert loose.manifest["details"]["activations_16bit"]["count"] == 0
    assert "QuantizeLinear:uint16" not in qdq_counts(loose.model_path)


def test_generation_is_bounded_by_the_fixed_shape(tiny_model):
    from edgequant.registry import open_runner
    from edgequant.runner import GenerateParams

    artifact = edgequant.convert(tiny_model, f"qnn:w8a16?graphs=fixed&seq={SEQ}&samples=2")
    with open_runner(artifact.path, n_ctx=512, need_logits=False) as runner:
        assert runner.n_ctx == SEQ
        prompt = runner.tokenize("The history of")
        tokens = list(runner.generate(prompt, GenerateParams(max_tokens=200, stop_at_eos=False)))
    assert len(tokens) == SEQ - len(prompt)


@pytest.mark.parametrize("spec, match", [
    ("qnn:w8a16?context=1", "onnxruntime-qnn"),
    ("qnn:w8a16?graphs=fixed&seq=4", "seq"),
    ("qnn:w8a16?graphs=fixed&seq=4096&samples=200", "calibration text"),
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

    artifact = edgequant.convert(tiny_model, f"qnn:w8a16?graphs=fixed&seq={SEQ}&samples=2&context=1")
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


# graphs=kv and an 8-bit KV cache are the defaults; 16 decode steps on the simulated HTP (the default is 1)
KV_SPEC = "qnn:w8a16?ar=16&ctx=128&samples=2&htp_steps=16"


@pytest.fixture(scope="module")
def kv_artifact(tiny_model):
    return edgequant.convert(tiny_model, KV_SPEC)


def _io(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    shape = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return {v.name: shape(v) for v in graph.input}, {v.name: shape(v) for v in graph.output}


def test_kv_graphs_have_the_documented_io_layout(kv_artifact):
    layout = json.loads((kv_artifact.path / "kv_layout.json").read_text())
    heads, kv_heads, dim = layout["heads"], layout["kv_heads"], layout["head_dim"]
    assert (layout["ctx"], layout["layers"], heads, kv_heads, dim) == (128, 2, 4, 2, 64)
    for graph, n in (("prompt", 16), ("decode", 1)):
        inputs, outputs = _io(kv_artifact.path / f"{graph}.onnx")
        assert inputs["input_ids"] == [1, n] and inputs["cos"] == inputs["sin"] == [1, n, dim]
        assert inputs["mask"] == [1, 1, n, 128] and outputs["logits"] == [1, n, 512]
        for i in range(2):
            assert inputs[f"past_key_{i}"] == inputs[f"past_value_{i}"] == [1, kv_heads, 128 - n, dim]
            assert outputs[f"new_key_{i}"] == outputs[f"new_value_{i}"] == [1, kv_heads, n, dim]


def test_the_decode_graph_is_quantized_with_the_prompt_graphs_encodings(kv_artifact):
    from edgequant.backends.qnn.kv import activation_encodings

    prompt = activation_encodings(kv_artifact.path / "prompt.onnx")
    decode = activation_encodings(kv_artifact.path / "decode.onnx")
    assert set(decode) == set(prompt) and len(prompt) > 100
    assert all((prompt[n][0] == decode[n][0]).all() and (prompt[n][1] == decode[n][1]).all() for n in prompt)
    recorded = kv_artifact.manifest["details"]["decode_encodings"]
    assert recorded == {"activations": len(prompt), "same_as_prompt": len(prompt)}


def test_float_kv_graphs_equal_full_window_pytorch_at_every_position(tiny_model, tmp_path):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from edgequant.backends._shared.ort import cpu_session
    from edgequant.backends.qnn.kv import DECODE_FILE, PROMPT_FILE, KVCache, export_graphs

    export_graphs(tiny_model, tmp_path, 16, 128)
    prompt, decode = cpu_session(tmp_path / PROMPT_FILE), cpu_session(tmp_path / DECODE_FILE)
    cache = KVCache(tmp_path, lambda f: prompt.run(None, f), lambda f: decode.run(None, f))
    ids = np.random.default_rng(0).integers(0, 500, 100).tolist()
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(torch.tensor([ids])).logits[0].numpy()
    scored = cache.prefill(ids)  # chunks of 16, the last one padded
    # the graphs' RMSNorm is the scale-free form (tools.scale_free_rms_norm): equal up to its eps
    assert np.abs(scored - reference).max() < 5e-3
    cache.prefill(ids[:20])
    stepped = np.concatenate([cache.step([t], "decode") for t in ids[20:]])
    assert np.abs(stepped - scored[20:]).max() < 1e-4  # decoding with the cache = scoring the whole window


def test_kv_decode_agrees_with_chunked_scoring_and_generation_uses_the_cache(kv_artifact):
    import numpy as np

    from edgequant.measurement.logprobs import kl_divergence, log_softmax
    from edgequant.registry import open_runner
    from edgequant.runner import GenerateParams

    with open_runner(kv_artifact.path, n_ctx=128, need_logits=True) as runner:
        ids = runner.tokenize(default_eval_text()[:3000])[:100]
        scored = runner.logits(ids)
        runner._cache.prefill(ids[:20])
        stepped = np.concatenate([runner._cache.step([t], "decode") for t in ids[20:]])
        kld = kl_divergence(log_softmax(scored[20:]), log_softmax(stepped))
        assert kld.max() < 0.05 and (scored[20:].argmax(-1) == stepped.argmax(-1)).mean() > 0.9
        tokens = list(runner.generate(ids[:100], GenerateParams(max_tokens=200, stop_at_eos=False)))
    assert len(tokens) == 28 and runner.n_ctx == 128  # bounded by the fixed context
    metrics = edgequant.evaluate(kv_artifact.path, config=EvalConfig(ctx=SEQ, windows=2, speed=False))
    assert abs(metrics["ppl_increase_pct"]) < 5 and metrics["top1_agreement"] > 0.8


def test_prefill_and_decode_on_the_simulated_htp_agree_with_the_cpu_and_the_float_model(kv_artifact):
    from edgequant.backends.qnn.tools import htp_available

    if not htp_available():
        pytest.skip("onnxruntime-qnn (extra `qnn`) is not installed")
    check = kv_artifact.manifest["details"]["htp_pipeline"]
    assert "error" not in check and check["within_tolerance"]
    assert check["prompt_tokens"] == 16 and check["decode_steps"] == 16  # one prompt chunk, then 16 decode steps
    assert check["seconds"]["htp_load"] > 0 and check["seconds"]["htp_run"] > 0
    # a random tiny model's greedy path forks at its first near-tie, so the tokens are compared by top-1 and KLD
    assert check["greedy_tokens_same_as_cpu"] >= 1 and check["top1_agreement_with_cpu"] > 0.8
    assert check["kld_vs_float"]["htp"]["decode"] < 0.05


def test_htp_steps_zero_only_loads_both_graphs_on_the_simulated_htp(tiny_model):
    from edgequant.backends.qnn.tools import htp_available
    from edgequant.registry import get_backend

    if not htp_available():
        pytest.skip("onnxruntime-qnn (extra `qnn`) is not installed")
    artifact = edgequant.convert(tiny_model, "qnn:w8a16?ar=16&ctx=128&samples=2&gptq=0&htp_steps=0")
    check = artifact.manifest["details"]["htp_pipeline"]
    assert "error" not in check and "kld_vs_float" not in check and check["seconds"]["htp_load"] > 0
    note = get_backend("qnn").report_notes("qnn:w8a16", artifact.manifest)[-1]
    assert "load wholly" in note and "htp_steps=0" in note


def test_the_kv_cache_is_8_bit_in_both_graphs_on_one_grid(kv_artifact):
    from onnx import numpy_helper

    def cache_quantizers(file):
        graph = onnx.load(str(kv_artifact.path / file), load_external_data=False).graph
        constants = {i.name: i for i in graph.initializer}
        return {n.input[0].removesuffix("_QuantizeLinear_Input"): (constants[n.input[2]].data_type,
                float(numpy_helper.to_array(constants[n.input[1]])))
                for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0].startswith(("past_", "new_"))}

    prompt, decode = cache_quantizers("prompt.onnx"), cache_quantizers("decode.onnx")
    assert len(prompt) == 8 and prompt == decode  # 2 layers x key/value x past/new, same scales
    assert {kind for kind, _ in prompt.values()} == {onnx.TensorProto.UINT8}
    assert kv_artifact.manifest["details"]["kv_cache_bits"] == 8


def test_w8a8_kv_graphs_mix_8_and_16_bit_activations_on_one_grid(tiny_model):
    """widen=kld on the prompt graph; the decode graph takes the same mixed encodings, the cache
    stays 8-bit, and the HTP runs both graphs."""
    from edgequant.backends.qnn.kv import activation_encodings
    from edgequant.backends.qnn.tools import htp_available

    spec = "qnn:w8a8?ar=16&ctx=128&samples=2"
    strict = edgequant.convert(tiny_model, spec + "&budget=0").manifest["details"]["activations_16bit"]
    artifact = edgequant.convert(tiny_model, spec + f"&budget={_half_the_cost(strict):.5f}")
    details = artifact.manifest["details"]
    assert 0 < details["activations_16bit"]["count"] < strict["count"]
    assert details["activations_16bit"]["count_8bit"] > 0
    for file in ("prompt.onnx", "decode.onnx"):
        counts = qdq_counts(artifact.path / file)
        assert counts.get("QuantizeLinear:uint16", 0) > 0 and counts.get("QuantizeLinear:uint8", 0) > 0
    prompt, decode = (activation_encodings(artifact.path / f) for f in ("prompt.onnx", "decode.onnx"))
    assert details["decode_encodings"]["same_as_prompt"] == details["decode_encodings"]["activations"] == len(decode)
    assert all(prompt[n][1].dtype == np.uint8 for n in prompt if n.startswith(("past_", "new_")))
    # the HTP takes a MatMul with per-channel weights only at one width in and out
    sides = _weight_matmul_sides(artifact.path / "prompt.onnx")
    assert all(len(widths) == 1 for widths in sides) and {np.dtype(np.uint8)} in sides
    if htp_available():
        assert "error" not in details["htp_pipeline"] and details["htp_pipeline"]["within_tolerance"]


def _weight_matmul_sides(path):
    """{activation types in and out} of each MatMul with a quantized weight."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = {i: n for n in model.graph.node for i in n.input}
    sides = []
    for node in (n for n in model.graph.node if n.op_type == "MatMul"):
        weight = producers.get(node.input[1])
        if weight is None or weight.input[0] not in inits:
            continue
        zero_points = (producers[node.input[0]].input[2], consumers[node.output[0]].input[2])
        sides.append({numpy_helper.to_array(inits[z]).dtype for z in zero_points})
    return sides


def test_context_binaries_share_the_weights_of_both_graphs(tiny_model):
    from edgequant.backends.qnn.tools import htp_available

    if not htp_available():
        pytest.skip("onnxruntime-qnn (extra `qnn`) is not installed")
    artifact = edgequant.convert(tiny_model, "qnn:w4a16?ar=16&ctx=128&samples=2&context=1&htp_arch=75&soc=57")
    context = artifact.manifest["details"]["context"]
    assert (context["htp_arch"], context["soc_model"]) == ("75", "57")  # Snapdragon 8 Gen 3 instead of the default
    assert context["models"] == {"prompt.onnx": "prompt_ctx.onnx", "decode.onnx": "decode_ctx.onnx"}
    assert context["binaries"] == ["prompt_ctx_qnn.bin"] and context["weights_shared"]
    for name in context["models"].values():  # both EPContext models point at the one binary
        (node,) = onnx.load(str(artifact.path / name)).graph.node
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.op_type == "EPContext" and attributes["ep_cache_context"] == b"prompt_ctx_qnn.bin"
    # one copy of the weights: two graphs' worth would be at least twice the weights
    assert context["bytes"] < 1.5 * (artifact.path / "prompt.onnx.data").stat().st_size


def test_the_two_graphs_store_their_weights_once(kv_artifact):
    from onnx.external_data_helper import uses_external_data

    decode = onnx.load(str(kv_artifact.path / "decode.onnx"), load_external_data=False).graph
    files = {e.value for i in decode.initializer if uses_external_data(i) for e in i.external_data if e.key == "location"}
    assert files == {"prompt.onnx.data"} and not (kv_artifact.path / "decode.onnx.data").exists()
    stored = kv_artifact.manifest["details"]["weights"]["stored_once"]
    assert stored["own_bytes"] == 0 and stored["shared_bytes"] == (kv_artifact.path / "prompt.onnx.data").stat().st_size


@pytest.mark.parametrize("spec, match", [("qnn:w8a16?graphs=fixed&ar=16", "graphs=kv only"),
                                         ("qnn:w8a16?graphs=fixed&kv=16", "graphs=kv only"),
                                         ("qnn:w8a16?graphs=fixed&htp_steps=4", "graphs=kv only"),
                                         ("qnn:w8a16?seq=64", "add graphs=fixed"), ("qnn:w8a16?ar=64&ctx=64", "below ctx"),
                                         ("qnn:w8a8?head=8", "only to w4a16"), ("qnn:w4a16?block=48", "block"),
                                         ("qnn:w8a16?smooth=0.5", "only to w8a8")])
def test_kv_options_are_checked_before_any_work(spec, match):
    with pytest.raises(EdgequantError, match=match):
        edgequant.convert(None, spec)


@pytest.mark.slow
def test_default_model_w8a16_on_cpu_ep():
    artifact = edgequant.convert(None, "qnn:w8a16?graphs=fixed&seq=128&samples=4")
    check_model(artifact.model_path)
    metrics = edgequant.evaluate(artifact.path, config=EvalConfig(ctx=128, windows=2, speed=False))
    assert metrics["ppl_increase_pct"] < 25 and metrics["top1_agreement"] > 0.7


def test_an_architecture_the_kv_graphs_do_not_take_falls_back_to_the_fixed_graph(tiny_model, tmp_path):
    """The default layout (graphs=kv) writes Llama-style attention only: Gemma-3 gets the
    fixed-window graph instead of an error, and the manifest and the report's notes say so."""
    from edgequant.registry import get_backend
    from tiny_archs import build

    gemma = build("gemma3", tiny_model, tmp_path / "gemma3")
    with pytest.raises(EdgequantError, match="graphs=kv only"):
        edgequant.convert(gemma, "qnn:w8a16?ar=16&ctx=128")
    artifact = edgequant.convert(gemma, "qnn:w8a16?samples=1&gptq=0")
    details = artifact.manifest["details"]
    assert "gemma3_text" in details["fallback"] and "graphs=fixed" in details["fallback"]
    assert details["seq"] == 512 and (artifact.path / "model.onnx").is_file()
    notes = get_backend("qnn").report_notes(str(artifact.spec), artifact.manifest)
    assert any("graphs=fixed" in n for n in notes)
    assert _quality(artifact)["top1_agreement"] > 0.8


def test_own_min_max_calibration_equals_onnxruntime_calibrator(tiny_model, tmp_path):
    """tools.calibrated replaces onnxruntime's MinMax calibrator (whose graph edits are quadratic
    in the graph's size): the same tensors, the same ranges, on the prompt graph and its feeds."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from edgequant.backends._shared.ort import FeedReader, cpu_session
    from edgequant.backends.qnn import kv, tools

    kv.export_graphs(tiny_model, tmp_path, 16, 128)
    windows = [np.random.default_rng(seed).integers(0, 500, 64).tolist() for seed in range(2)]
    feeds = kv.calibration_feeds(tmp_path, windows, cpu_session)[0]
    model = tmp_path / kv.PROMPT_FILE
    config = get_qnn_qdq_config(str(model), FeedReader(feeds), activation_type=QuantType.QUInt16,
                                weight_type=QuantType.QInt8, per_channel=True, weight_symmetric=True)
    converted, ranges = tools.calibrated(model, config, feeds)
    ours = load_tensors_data(ranges).data
    calibrator = create_calibrator(converted, config.op_types_to_quantize, augmented_model_path=str(tmp_path / "augmented.onnx"),
                                   use_external_data_format=True)
    calibrator.collect_data(FeedReader(feeds))
    theirs = calibrator.compute_data().data
    assert len(ours) > 50 and set(ours) == set(theirs)
    assert all(np.array_equal(ours[name].range_value, theirs[name].range_value) for name in ours)


@pytest.mark.unit
def test_indexed_rewiring_rewires_like_onnxruntimes_scan():
    """tools.readers_indexed stands in for onnxruntime's scan over every node while it quantizes:
    the same rewiring through a sequence of replacements, appended nodes and edits by name."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    from edgequant.backends.qnn.tools import readers_indexed

    def graph():
        nodes = [onnx.helper.make_node("Add", [f"t{i % 7}", f"t{(i * 3) % 11}"], [f"o{i}"], name=f"n{i}") for i in range(40)]
        return ONNXModel(onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [], [])))

    def edit(model):
        for step in range(30):
            model.replace_input_of_all_nodes(f"t{step % 11}", f"q{step}")
            model.add_node(onnx.helper.make_node("Neg", [f"q{step}"], [f"m{step}"], name=f"a{step}"))
            if step % 9 == 4:
                model.replace_input_of_nodes(f"q{step}", f"r{step}", {f"n{step}", f"a{step}"})
            model.replace_input_of_all_nodes(f"r{step}", f"s{step}")
        return [list(node.input) for node in model.model.graph.node]

    scanned = edit(graph())
    with readers_indexed():
        indexed = edit(graph())
    assert indexed == scanned
    assert ONNXModel.replace_input_of_all_nodes.__qualname__ == "ONNXModel.replace_input_of_all_nodes"  # restored


def test_recorded_feeds_read_back_exactly_what_the_graph_was_run_with():
    from edgequant.backends.qnn.kv import RecordedFeeds

    rng = np.random.default_rng(0)
    cache = np.zeros((1, 2, 32, 4), np.float32)
    cache[:, :, :5] = rng.normal(size=(1, 2, 5, 4))
    cache[:, 1, 7] = 1.0  # a stale entry past a hole of zeros
    run_with = [{"input_ids": np.arange(3)[None], "past_key_0": cache.copy(), "past_value_0": np.zeros_like(cache)},
                {"input_ids": np.arange(3)[None], "past_key_0": cache[:, :, :16].copy(), "past_value_0": cache[:, :, :16].copy()}]
    feeds = RecordedFeeds()
    for feed in run_with:
        feeds.record({name: value.copy() for name, value in feed.items()})
    assert [feeds._kept[0][name][0].shape[2] for name in ("past_key_0", "past_value_0")] == [8, 0]  # the zero tail is not kept
    back = [feeds[0], *feeds[1:]]
    assert len(feeds) == 2 and len(back) == 2
    for original, read in zip(run_with, back):
        assert original.keys() == read.keys()
        assert all(read[name].dtype == original[name].dtype and np.array_equal(read[name], original[name]) for name in original)
