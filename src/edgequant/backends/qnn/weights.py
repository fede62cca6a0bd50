"""Weights quantized here, not by onnxruntime's quantizer: scales searched, rounding by GPTQ.

onnxruntime (1.32) only marks the weights (float -> QuantizeLinear -> DequantizeLinear); this
module turns each pair into an integer initializer -> DequantizeLinear. Weights are symmetric
(zero point 0, as the HTP wants: it ignores block zero points), blocked (int4, or int8) or, when
not blocked, one scale per output column (onnxruntime's QNN config gives MatMul weights one scale
per tensor even when asked per channel). It does not take each block's largest |w| as the grid's
end, where one outlier stretches the step for the other values and, on a model whose weights
already sit on another 4-bit grid (the default model's Q4_1), doubles the rounding error. Like
llama.cpp's quantizers it tries a range of scales per block and keeps the one with the least
squared error, weighted by how large each input feature runs in calibration, then refits the
scale by least squares. With the full input second moment X^T X (`input_importance(full=True)`,
the backend's `gptq` windows) the values are then rounded by GPTQ: each input row in turn, its
rounding error spread over the rows not yet rounded.

Measured on the default model's prompt graph, KLD over the bench's 4 evaluation windows (int4,
blocks of 64, int8 LM head): search with importance from 512 tokens 0.33, from 4096 tokens 0.32,
GPTQ from 4096 tokens 0.27 (from 512 tokens, on 2 windows, it had been worse than the search:
0.44 vs 0.31; too few tokens for a 1536-row H). With blocks of 32 and the int8 mix, GPTQ from
4096 tokens 0.097, from 8192 tokens 0.085 (the backend's default `gptq=64`). w8a8 with per-column int8 weights: onnxruntime's
per-tensor scales 0.141 (all activations 16-bit, held-out text), searched per column 0.055,
with GPTQ 0.049.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

# Scales tried per block, as multiples of max|w| / top (the largest value landing on the grid's top).
_FACTORS = np.linspace(0.80, 1.16, 19)
_FOUR_BIT = {"int4": (-8, 7), "uint4": (0, 15)}  # ml_dtypes' 4-bit types have no np.iinfo
_SIGNED = {"int4": 7, "int8": 127}  # the symmetric grids searched: -(top + 1) .. top


def fold_weight_quantizers(qdq_path: Path, importance: dict[str, np.ndarray] | None = None,
                           solved: dict | None = None) -> int:
    """Replace every weight's float initializer -> QuantizeLinear -> DequantizeLinear (the
    quantizer's AddQDQPairToWeight form) by an integer initializer -> DequantizeLinear, rewriting
    `qdq_path` in place (external data beside it). Symmetric MatMul weights get scales searched
    per block, or per output column when not blocked (`importance`: weight name -> mean square of
    the activation entering each input row); every other weight is quantized with the scale and
    zero point the quantizer chose. `solved` keeps each searched weight's result for the next graph
    holding the same weight (the decode graph, a second build of the prompt graph). Returns how
    many weights had their scales searched."""
    import onnx
    from onnx import numpy_helper

    from edgequant.progress import track

    model = onnx.load(str(qdq_path))
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    searched, folded = 0, []
    quantizers = [node for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] in initializers]
    for node in track(quantizers, f"rounding the weights of {qdq_path.name}"):
        if node.input[0] not in initializers:  # a weight two quantizers read was folded by the first
            continue
        weight = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(initializers[node.input[1]])
        zero = numpy_helper.to_array(initializers[node.input[2]])
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axis, block = attributes.get("axis", 1) % max(weight.ndim, 1), attributes.get("block_size", 0)
        symmetric = zero.dtype.name in _SIGNED and not zero.astype(np.int8).any()  # as the HTP wants
        # onnxruntime's QNN config quantizes MatMul weights per tensor even when asked per channel:
        # those get one scale per output column instead (axis 1 of [K, N]), the whole column one block
        per_column = symmetric and not block and weight.ndim == 2 and scale.ndim == 0 and _feeds_matmul(consumers, node)
        if per_column or (block and symmetric):
            rows = block or weight.shape[0]
            key = (node.input[0], rows, zero.dtype.name)
            cache = solved if solved is not None else {}
            if key not in cache:
                stats = (importance or {}).get(node.input[0])
                solve = _gptq if stats is not None and stats.ndim == 2 else _search
                cache[key] = solve(weight if per_column else np.moveaxis(weight, axis, 0), rows, stats,
                                   _SIGNED[zero.dtype.name])
            values, new_scale = cache[key]
            if per_column:
                _per_channel(graph, initializers, consumers[node.output[0]], new_scale.reshape(-1).astype(scale.dtype),
                             np.zeros(weight.shape[1], zero.dtype), node.input[1], node.input[2])
            else:
                values, scale = np.moveaxis(values, 0, axis), np.moveaxis(new_scale, 0, axis).astype(scale.dtype)
                initializers[node.input[1]].CopyFrom(numpy_helper.from_array(scale, node.input[1]))
            searched += 1
        else:
            values = _quantize(weight, scale, zero, axis, block)
        quantized = numpy_helper.from_array(values.astype(zero.dtype), node.input[0] + "_quantized")
        for dq in consumers[node.output[0]]:
            dq.input[0] = quantized.name
        graph.initializer.remove(initializers.pop(node.input[0]))
        graph.initializer.append(quantized)
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    data_file = qdq_path.name + ".data"
    (qdq_path.parent / data_file).unlink(missing_ok=True)
    onnx.save(model, str(qdq_path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_file)
    return searched


def int8_blocks(weight: np.ndarray, block: int, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A MatMul weight [K, N] as symmetric int8 blocks of `block` rows with searched scales."""
    values, scales = _search(weight, block, None if importance is None else _diagonal(importance), _SIGNED["int8"])
    return values.astype(np.int8), scales


def _diagonal(stats: np.ndarray) -> np.ndarray:
    """Per-input-row importance from either form input_importance gives."""
    return np.diag(stats) if stats.ndim == 2 else stats


def _feeds_matmul(consumers: dict, quantizer) -> bool:
    """The weight's DequantizeLinear outputs are only ever a MatMul's second input."""
    users = [(dq, user) for dq in consumers.get(quantizer.output[0], []) for user in consumers.get(dq.output[0], [])]
    return bool(users) and all(user.op_type == "MatMul" and user.input[1] == dq.output[0] for dq, user in users)


def _per_channel(graph, initializers: dict, dequantizers: list, scales: np.ndarray, zeros: np.ndarray,
                 scale_name: str, zero_name: str) -> None:
    """Point the weight's DequantizeLinear nodes at per-column scales (axis 1), under new names:
    the per-tensor scale may be shared with other tensors."""
    import onnx
    from onnx import numpy_helper

    for name, value in ((scale_name + "_per_channel", scales), (zero_name + "_per_channel", zeros)):
        if name not in initializers:
            initializers[name] = numpy_helper.from_array(value, name)
            graph.initializer.append(initializers[name])
    for dq in dequantizers:
        dq.input[1], dq.input[2] = scale_name + "_per_channel", zero_name + "_per_channel"
        for attribute in [a for a in dq.attribute if a.name == "axis"]:
            dq.attribute.remove(attribute)
        dq.attribute.append(onnx.helper.make_attribute("axis", 1))


def _quantize(weight: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int, block: int) -> np.ndarray:
    """QuantizeLinear's arithmetic: per tensor, per axis, or per block along the axis."""
    low, high = _FOUR_BIT.get(zero.dtype.name) or (np.iinfo(zero.dtype).min, np.iinfo(zero.dtype).max)
    scale, zero = scale.astype(np.float32), zero.astype(np.float32)
    if scale.ndim and block:
        scale, zero = (np.repeat(x, block, axis=axis).take(range(weight.shape[axis]), axis=axis) for x in (scale, zero))
    elif scale.ndim:
        shape = [1] * weight.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return np.clip(np.rint(weight / scale) + zero, low, high)


def _search(weight: np.ndarray, block: int, importance: np.ndarray | None, top: int) -> tuple[np.ndarray, np.ndarray]:
    """weight [K, ...] blocked along K: (int values in -(top + 1)..top [K, ...], scales [ceil(K/block), ...])."""
    rows = weight.shape[0]
    count = -(-rows // block)
    flat = weight.reshape(rows, -1).astype(np.float32)
    padded = np.zeros((count * block, flat.shape[1]), np.float32)
    padded[:rows] = flat
    blocks = padded.reshape(count, block, -1)
    weights = np.ones((count * block, 1), np.float32)
    if importance is not None:
        weights[:rows, 0] = np.maximum(importance.astype(np.float32), 1e-12)
    weights = weights.reshape(count, block, 1)
    base = np.abs(blocks).max(axis=1) / top
    base[base == 0] = 1.0
    best_scale, best_error = base.copy(), np.full(base.shape, np.inf, np.float32)
    for factor in _FACTORS:
        scale = base * factor
        q = np.clip(np.rint(blocks / scale[:, None]), -top - 1, top)
        error = (weights * (blocks - q * scale[:, None]) ** 2).sum(axis=1)
        better = error < best_error
        best_error[better], best_scale[better] = error[better], scale[better]
    for _ in range(2):  # then the least-squares scale for the values chosen, kept where it helps
        q = np.clip(np.rint(blocks / best_scale[:, None]), -top - 1, top)
        fitted = (weights * blocks * q).sum(axis=1) / np.maximum((weights * q * q).sum(axis=1), 1e-12)
        fitted = np.where(fitted > 0, fitted, best_scale)
        refit = np.clip(np.rint(blocks / fitted[:, None]), -top - 1, top)
        error = (weights * (blocks - refit * fitted[:, None]) ** 2).sum(axis=1)
        better = error < best_error
        best_error[better], best_scale[better] = error[better], fitted[better]
    values = np.clip(np.rint(blocks / best_scale[:, None]), -top - 1, top).reshape(count * block, -1)[:rows]
    return values.reshape(weight.shape), best_scale.reshape((count,) + weight.shape[1:])


def _gptq(weight: np.ndarray, block: int, hessian: np.ndarray, top: int, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's error feedback for a weight [K, N] blocked along K: rows are rounded in order, each
    row's rounding error spread over the rows not yet rounded through the inverse of the input
    second moment H [K, K]; each block's scales are searched when the block is reached."""
    weight = weight.astype(np.float64).copy()
    rows = weight.shape[0]
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    weight[dead] = 0.0
    h[np.diag_indices(rows)] += damp * np.mean(np.diag(h))
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U
    values = np.zeros_like(weight)
    scales = []
    for start in range(0, rows, block):
        end = min(start + block, rows)
        _, scale = _search(weight[start:end].astype(np.float32), block, np.diag(h)[start:end], top)
        scale = scale.reshape(-1).astype(np.float64)
        scales.append(scale)
        errors = np.zeros((end - start, weight.shape[1]))
        for i in range(start, end):
            q = np.clip(np.rint(weight[i] / scale), -top - 1, top)
            values[i] = q
            error = (weight[i] - q * scale) / upper[i, i]
            weight[i + 1:end] -= np.outer(upper[i, i + 1:end], error)
            errors[i - start] = error
        weight[end:] -= upper[start:end, end:].T @ errors
    return values, np.stack(scales).astype(np.float32)


def input_importance(model_path: Path, feeds: Iterable[dict], full: bool = False) -> dict[str, np.ndarray]:
    """Weight name -> mean square of each input feature entering its MatMul, over the feeds (the
    float model; any iterable, drawn once): the weights of the scale search, as llama.cpp's
    importance matrix weights its.
    `full`: the whole second moment X^T X / n [K, K] instead (one array per activation, shared by
    the weights it enters), for GPTQ's error feedback."""
    statistics = InputStatistics(model_path, full)
    for feed in feeds:
        statistics.run(feed)
    return statistics.result()


class InputStatistics:
    """`input_importance` gathered while the graph does its own work: `run` returns the graph's
    outputs (a KV cache can be advanced with them) and adds the inputs of every weight MatMul to
    the sums, so statistics over many windows cost one pass of the graph, not two."""

    ROWS_PER_PRODUCT = 256

    def __init__(self, model_path: Path, full: bool) -> None:
        import onnx

        from edgequant.backends._shared.ort import cpu_session

        model = onnx.load(str(model_path))
        matrices = {i.name for i in model.graph.initializer if len(i.dims) == 2}
        self._users: dict[str, list[str]] = {}  # activation -> the weights it multiplies
        for node in model.graph.node:
            if node.op_type == "MatMul" and node.input[1] in matrices:
                self._users.setdefault(node.input[0], []).append(node.input[1])
        self._outputs = [o.name for o in model.graph.output]
        model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                                  for name in self._users)
        self._session = cpu_session(model.SerializeToString(), optimize=False)
        self._full = full
        self._sums: dict[str, np.ndarray] = {}  # float64
        self._pending: dict[str, list[np.ndarray]] = {}  # rows not yet in the sums
        self._rows = self._summed = 0

    def run(self, feed: dict) -> list[np.ndarray]:
        values = self._session.run(self._outputs + list(self._users), feed)
        for name, value in zip(self._users, values[len(self._outputs):]):
            self._pending.setdefault(name, []).append(value.reshape(-1, value.shape[-1]))
        self._rows += values[-1].size // values[-1].shape[-1]
        if self._rows - self._summed >= self.ROWS_PER_PRODUCT:
            self._sum_pending()
        return values[:len(self._outputs)]

    def _sum_pending(self) -> None:
        """Add the pending rows' products to the sums: in float32 (BLAS's sgemm; the float64 product
        was ~2x slower), summed in float64. Rows are gathered first because one product over 256 rows
        costs far less than four over 64 (the default model's prompt chunks), as do the float64 sums."""
        for name, blocks in self._pending.items():
            flat = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
            product = flat.T @ flat if self._full else (flat ** 2).sum(axis=0)
            if name in self._sums:
                self._sums[name] += product
            else:
                self._sums[name] = product.astype(np.float64)
        self._pending.clear()
        self._summed = self._rows

    def result(self) -> dict[str, np.ndarray]:
        self._sum_pending()
        moments = {name: (total / self._rows).astype(np.float32) for name, total in self._sums.items()}
        return {weight: moments[name] for name, weights in self._users.items() for weight in weights}
