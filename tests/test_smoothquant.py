"""SmoothQuant (backends/_shared/smoothquant.py) and the searched block scales (qnn/weights.py)."""

import numpy as np
import pytest

pytest.importorskip("onnx", reason="its extra is not installed")
pytest.importorskip("onnxruntime", reason="its extra is not installed")
import onnx  # noqa: E402


@pytest.fixture(scope="module")
def float_graphs(tiny_model, tmp_path_factory):
    from edgequant.backends._shared.ort import cpu_session
    from edgequant.backends.qnn.kv import calibration_feeds, export_graphs

    folder = tmp_path_factory.mktemp("float-graphs")
    export_graphs(tiny_model, folder, 16, 128)
    windows = [np.random.default_rng(i).integers(0, 500, 64).tolist() for i in range(2)]
    return folder, calibration_feeds(folder, windows, cpu_session)


def test_smoothing_leaves_the_float_model_unchanged_and_flattens_its_activations(float_graphs, tmp_path):
    from edgequant.backends._shared import smoothquant
    from edgequant.backends._shared.ort import cpu_session
    from edgequant.backends.qnn.kv import DECODE_FILE, PROMPT_FILE

    folder, (prompt_feeds, decode_feeds) = float_graphs
    sites = smoothquant.find_sites(onnx.load(str(folder / PROMPT_FILE)))
    # per layer: the input norm (q, k, v), the post-attention norm (gate, up), up's columns (down); then the final norm
    assert [len(site.weights) for site in sites] == [3, 2, 1, 3, 2, 1, 1]
    factors = smoothquant.smoothing_factors(folder / PROMPT_FILE, prompt_feeds, 0.5)
    for name, feeds in ((PROMPT_FILE, prompt_feeds), (DECODE_FILE, decode_feeds)):  # one set of factors for both graphs
        assert smoothquant.apply_smoothing(folder / name, tmp_path / name, factors) == len(sites)
        before, after = cpu_session(folder / name).run(None, feeds[0]), cpu_session(tmp_path / name).run(None, feeds[0])
        assert max(float(np.abs(a - b).max()) for a, b in zip(before, after)) < 1e-4
    spread = {}  # how far the largest channel stands above the median one, before and after
    for label, path in (("before", folder / PROMPT_FILE), ("after", tmp_path / PROMPT_FILE)):
        maxima = smoothquant.activation_maxima(path, sites, prompt_feeds)
        spread[label] = np.mean([m.max() / np.median(m) for m in maxima.values()])
    assert spread["after"] < spread["before"]


def test_searched_scales_beat_the_largest_value_scale():
    from edgequant.backends.qnn.weights import _search

    rng = np.random.default_rng(0)
    weight = rng.standard_t(3, size=(256, 32)).astype(np.float32)  # heavy tails: outliers stretch max-based scales
    importance = rng.random(256).astype(np.float32) + 0.1
    values, scales = _search(weight, 64, importance, 7)
    assert values.min() >= -8 and values.max() <= 7 and scales.shape == (4, 32)
    blocks = weight.reshape(4, 64, 32)
    plain = np.abs(blocks).max(axis=1, keepdims=True) / 7
    error = lambda w, s: float((importance[:, None] * (weight - (w * s).reshape(256, 32)) ** 2).sum())  # noqa: E731
    searched = error(values.reshape(4, 64, 32), scales[:, None])
    assert searched < 0.9 * error(np.clip(np.rint(blocks / plain), -8, 7), plain)


def test_qnn_weights_are_symmetric_blocks_close_to_the_float_weights(tiny_model, float_graphs):
    from onnx import numpy_helper

    import edgequant

    folder, _ = float_graphs
    artifact = edgequant.convert(tiny_model, "qnn:w4a16?ar=16&ctx=128&samples=2")
    float_weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(folder / "prompt.onnx")).graph.initializer}
    graph = onnx.load(str(artifact.path / "prompt.onnx")).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    checked = 0
    for node in graph.node:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "DequantizeLinear" or "block_size" not in attributes:
            continue
        q, scale, zero = (constants[name] for name in node.input)
        assert attributes["block_size"] == 32 and attributes["axis"] == 0 and not zero.astype(np.int8).any()  # w4a16's default
        weight = float_weights[node.input[0].removesuffix("_quantized")]
        rows = weight.shape[0]
        dequantized = (q.astype(np.float32).reshape(rows // 32, 32, -1) * scale[:, None]).reshape(weight.shape)
        assert np.abs(dequantized - weight).mean() < 0.2 * np.abs(weight).mean()
        checked += 1
    assert checked >= 2 * 7 + 1  # every projection of both layers and the LM head (int8)
