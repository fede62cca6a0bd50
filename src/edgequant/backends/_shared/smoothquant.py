"""SmoothQuant-style scale migration on a float ONNX graph, before 8-bit activation quantization.

An LLM's activations have a few channels far larger than the rest, so one 8-bit range per tensor
leaves the ordinary channels a handful of levels. SmoothQuant divides each input channel j of a
MatMul by s_j and multiplies the matching weight row by s_j: the product is unchanged, the
activation's channels even out, and the weights (quantized per block or channel) take the
outliers instead. s_j = max|x_j|^alpha / max|w_j|^(1 - alpha).

The division must happen somewhere it costs nothing. It is folded into what produced x:
- a normalization's per-channel scale (our export's `gamma * y` Mul, or onnxruntime's
  (Skip)SimplifiedLayerNormalization / LayerNormalization), for q/k/v and gate/up;
- the other projection of a gated MLP (x = act(gate) * up: divide up's output columns), for down.
Every MatMul reading x must have a constant weight, since they all see the smoothed x.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2, "LayerNormalization": 1,
          "SkipLayerNormalization": 2}  # op -> index of its scale input


@dataclass(frozen=True)
class Site:
    activation: str  # the tensor smoothed
    weights: tuple[str, ...]  # the MatMul weights reading it: their rows are multiplied
    divide: str  # the initializer divided: a norm's scale (elementwise) or a weight's output columns
    divide_columns: bool  # True: `divide` is a 2-D weight whose output columns are divided
    bias: str = ""  # a LayerNormalization's bias, divided too
    producer: str = ""  # the node reading `divide` (and `bias`), given private copies of them


def find_sites(model) -> list[Site]:
    """Every activation whose MatMul readers and producer allow the fold (see the module doc)."""
    graph = model.graph
    constants = _constants(graph)
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    direct = {i.name for i in graph.initializer}

    def _own_matrix(name: str) -> bool:  # a 2-D weight no other node reads (its rows get scaled)
        return name in direct and len(_dims(constants[name])) == 2 and len(readers[name]) == 1

    sites = []
    for activation, nodes in readers.items():
        if activation in constants or not all(n.op_type == "MatMul" and n.input[0] == activation and _own_matrix(n.input[1])
                                              for n in nodes):
            continue
        weights = tuple(n.input[1] for n in nodes)
        producer = producers.get(activation)
        if producer is None:
            continue
        site = _fold_target(producer, activation, constants, producers, readers)
        if site:
            sites.append(Site(activation, weights, *site, producer=producer.name))
    return sites


def _constants(graph) -> dict:
    """Initializers by name, and by the names Identity nodes give them (the TorchScript exporter
    writes one initializer for equal constants and an Identity per other user)."""
    constants = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    return constants


def _dims(initializer) -> list[int]:
    return list(initializer.dims) if initializer is not None else []


def _fold_target(node, activation: str, constants: dict, producers: dict, readers: dict):
    """(divide, divide_columns, bias) for `activation` produced by `node`, or None."""
    if node.op_type in _NORMS and node.output[0] == activation:
        scale = node.input[_NORMS[node.op_type]]
        bias = node.input[_NORMS[node.op_type] + 1] if node.op_type == "LayerNormalization" and len(node.input) > 2 else ""
        return (scale, False, bias) if len(_dims(constants.get(scale))) == 1 else None
    if node.op_type != "Mul":
        return None
    for i, name in enumerate(node.input):
        other = node.input[1 - i]
        if len(_dims(constants.get(name))) == 1 and other not in constants:
            return name, False, ""  # gamma * y
    for name in node.input:  # act(gate) * up: divide up's output columns
        up = producers.get(name)
        if up is not None and up.op_type == "MatMul" and len(_dims(constants.get(up.input[1]))) == 2 \
                and len(readers.get(name, [])) == 1 and len(readers.get(up.input[1], [])) == 1:
            return up.input[1], True, ""
    return None


def activation_maxima(model_path: Path, sites: list[Site], feeds: list[dict]) -> dict[str, np.ndarray]:
    """max |x_j| of each site's activation over the feeds, on the float model."""
    import onnx

    from edgequant.backends._shared.ort import cpu_session

    model = onnx.load(str(model_path))
    names = [site.activation for site in sites]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = cpu_session(model.SerializeToString(), optimize=False)
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            maxima[name] = np.maximum(maxima.get(name, peak), peak)
    return maxima


def smoothing_factors(model_path: Path, feeds: list[dict], alpha: float) -> dict[str, np.ndarray]:
    """Site activation -> s, measured on the float model at `model_path`."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    constants = _constants(model.graph)
    sites = find_sites(model)
    maxima = activation_maxima(model_path, sites, feeds)
    factors = {}
    for site in sites:
        rows = np.max([np.abs(numpy_helper.to_array(constants[w])).max(axis=1) for w in site.weights], axis=0)
        s = np.power(np.maximum(maxima[site.activation], 1e-5), alpha) / np.power(np.maximum(rows, 1e-5), 1 - alpha)
        factors[site.activation] = np.clip(s, 1e-2, 1e2).astype(np.float32)
    return factors


def apply_smoothing(model_path: Path, out_path: Path, factors: dict[str, np.ndarray]) -> int:
    """Write the model with each site smoothed by its factor (names absent from the model are
    skipped, so one set of factors serves graphs that share tensor names). Returns the sites."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    constants = _constants(model.graph)
    nodes = {node.name: node for node in model.graph.node}

    def scale(name: str, by: np.ndarray) -> None:
        tensor = constants[name]
        tensor.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(tensor) * by).astype(np.float32), tensor.name))

    def private(name: str, node, suffix: str) -> str:
        """A copy of initializer `name` for `node` alone: exporters share equal constants (a tiny
        model's all-ones norm scales) between nodes that must not be divided together."""
        copy = numpy_helper.from_array(numpy_helper.to_array(constants[name]), f"{node.name}/smooth_{suffix}")
        model.graph.initializer.append(copy)
        constants[copy.name] = model.graph.initializer[-1]
        node.input[list(node.input).index(name)] = copy.name
        return copy.name

    done = 0
    for site in find_sites(model):
        s = factors.get(site.activation)
        if s is None:
            continue
        for weight in site.weights:
            scale(weight, s[:, None])
        if site.divide_columns:
            scale(site.divide, 1 / s[None, :])
        else:
            scale(private(site.divide, nodes[site.producer], "scale"), 1 / s)
        if site.bias:
            scale(private(site.bias, nodes[site.producer], "bias"), 1 / s)
        done += 1
    read = {name for node in model.graph.node for name in node.input}
    for unread in [i for i in model.graph.initializer if i.name not in read]:  # originals every user now copies
        model.graph.initializer.remove(unread)
    onnx.save(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=out_path.name + ".data")
    return done
