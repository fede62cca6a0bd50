"""ONNX Runtime pieces the ONNX and QNN formats share: CPU sessions and calibration readers."""

from __future__ import annotations

from pathlib import Path


def cpu_session(model: Path | bytes, threads: int = 0, *, optimize: bool = True):
    """An onnxruntime session on the CPU execution provider, quiet. `optimize=False` keeps every
    named tensor of the graph (no fusions), for reading intermediate activations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)

    def rewind(self):  # the calibrator reads once; nothing to rewind
        pass


def qdq_counts(model_path: Path) -> dict[str, int]:
    """QuantizeLinear / DequantizeLinear counts by integer type (a golden structure check)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    types = {}
    for init in model.graph.initializer:
        types[init.name] = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            key = f"{node.op_type}:{types.get(node.input[2], 'unknown')}"
            counts[key] = counts.get(key, 0) + 1
    return counts
