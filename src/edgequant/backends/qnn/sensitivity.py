"""Precision choices measured by what they cost in KLD: w8a8's 16-bit activations (`widen=kld`)
and w4a16's int8 weights (`mix`).

Activations. A w8a8 graph quantized with every activation at 16 bits is the starting point. Its
tensors are grouped by their role in a decoder layer (the same op at the same place in every
layer: "the residual add after the MLP", "the softmax"), and each group in turn is re-encoded at
8 bits in memory: the same range, 256 levels instead of 65536, which is what calibration would
have given it. The KLD of that model to the float graph, on held-out calibration windows, is what
8 bits cost the group. The cheapest groups then go to 8 bits together, as many as keep the KLD
within a budget of added KLD (found by bisection over the groups sorted by cost); the rest stay
16-bit. Groups are tied where the HTP needs it (measured on the simulator): tensors sharing an
encoding (data movement) change together, a MatMul with per-channel weights needs the same width
in and out, and one with blocked weights refuses 8 bits on either side.

On the default model the residual stream's adds and the norms' inputs cost ~5 nats at 8 bits
(its first token runs ~100x larger than the others), the MLP down-projection ~1, most groups
nothing measurable; the underflow share (`widen=underflow`) cannot tell those apart. The
held-out window must be as long as the contexts the model will see: the attention softmax cost
0.001 over 128 tokens and 0.028 over 512. Prompt graph, the bench's 4 evaluation windows of 512:
underflow 0.185 with 1616 tensors at 16 bits; KLD choice over 2 x 128 held-out tokens 0.083
(1421), over 512 tokens 0.053 (the whole artifact, 1509 at 16 bits, 821 at 8).

Weights. A w4a16 graph quantized all-int4 is the starting point; each kind of matrix (q_proj in
every layer, ...) is raised to int8 in memory and measured the same way, and the set of kinds
with the most summed gain that fits a share of the weights is taken.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

_U16_LEVELS, _U8_LEVELS = 65535, 255


class EightBitSplicer:
    """A QDQ model loaded once; `model_bytes(tensors)` serializes it with those activations'
    uint16 encodings swapped for uint8 ones over the same range."""

    def __init__(self, qdq_path: Path, layers: int):
        import onnx
        from onnx import numpy_helper

        self._model = onnx.load(str(qdq_path))
        graph = self._model.graph
        self._index = {init.name: i for i, init in enumerate(graph.initializer)}
        initializers = {init.name for init in graph.initializer}
        producers = {out: node for node in graph.node for out in node.output}
        # a weight's DQ may share its parameters with an activation (a Gather's table and output)
        weight_params = {x for node in graph.node if node.op_type == "DequantizeLinear"
                         and node.input[0] in initializers for x in node.input[1:]}
        self.encodings: dict[str, tuple[str, str]] = {}
        blocked, tied = _weight_matmul_activations(graph, producers, initializers)
        for node in graph.node:
            if node.op_type != "QuantizeLinear" or len(node.input) < 3 or node.input[0] in initializers:
                continue
            producer = producers.get(node.input[0])
            if producer is not None and producer.op_type == "DequantizeLinear":
                continue  # a type conversion (Q -> DQ -> Q), pinned by the tensor it converts
            zero = numpy_helper.to_array(graph.initializer[self._index[node.input[2]]])
            if zero.dtype == np.uint16 and node.input[2] not in weight_params and node.input[0] not in blocked:
                self.encodings[node.input[0]] = (node.input[1], node.input[2])
        sharing: dict[str, list[str]] = {}  # data-movement ops share their input's encoding
        for tensor, (scale_name, _) in self.encodings.items():
            sharing.setdefault(scale_name, []).append(tensor)
        tied += [(tensors[0], other) for tensors in sharing.values() for other in tensors[1:]]
        self.groups = tie(_group_by_role(self.encodings, producers, graph.node, layers), tied)

    def model_bytes(self, eight_bit=()) -> bytes:
        from onnx import numpy_helper

        inits = self._model.graph.initializer
        ratio = _U16_LEVELS / _U8_LEVELS
        replacements = {}
        for tensor in eight_bit:
            scale_name, zero_name = self.encodings[tensor]
            scale, zero = (numpy_helper.to_array(inits[self._index[n]]) for n in (scale_name, zero_name))
            replacements[self._index[scale_name]] = numpy_helper.from_array((scale * ratio).astype(scale.dtype), scale_name)
            replacements[self._index[zero_name]] = numpy_helper.from_array(
                np.clip(np.rint(zero / ratio), 0, _U8_LEVELS).astype(np.uint8), zero_name)
        return _serialized_with(self._model, replacements)


def _serialized_with(model, replacements: dict) -> bytes:
    """The model serialized with some initializers (index -> TensorProto) replaced, then restored."""
    inits = model.graph.initializer
    originals = {}
    for i, replacement in replacements.items():
        originals[i] = type(inits[i])()
        originals[i].CopyFrom(inits[i])
        inits[i].CopyFrom(replacement)
    try:
        return model.SerializeToString()
    finally:
        for i, original in originals.items():
            inits[i].CopyFrom(original)


def _weight_matmul_activations(graph, producers: dict, initializers: set) -> tuple[set[str], list[tuple[str, str]]]:
    """The activations entering and leaving MatMuls with quantized weights, as the HTP constrains
    them: around blocked weights both must be 16-bit (it refuses the MatMul when either side is
    8-bit), around per-channel ones both must have the same width. Returns (the tensors around
    blocked weights, the (input, output) pairs around the others)."""
    import onnx

    blocked, tied = set(), []
    for node in graph.node:
        weight = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or weight.op_type != "DequantizeLinear" or weight.input[0] not in initializers:
            continue
        source = producers.get(node.input[0])
        if source is None or source.op_type != "DequantizeLinear":
            continue
        quantizer = producers.get(source.input[0])
        pair = (quantizer.input[0] if quantizer is not None else source.input[0], node.output[0])
        if any(a.name == "block_size" and onnx.helper.get_attribute_value(a) for a in weight.attribute):
            blocked.update(pair)
        else:
            tied.append(pair)
    return blocked, tied


def tie(groups: dict[str, list[str]], pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Merge the groups holding the two tensors of each pair, so they change width together."""
    role_of = {t: role for role, tensors in groups.items() for t in tensors}
    parent = {role: role for role in groups}

    def root(role: str) -> str:
        while parent[role] != role:
            role = parent[role]
        return role

    for a, b in pairs:
        if a in role_of and b in role_of:
            parent[root(role_of[a])] = root(role_of[b])
    merged: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}
    for role in groups:
        members.setdefault(root(role), []).append(role)
    for roles in members.values():
        merged[" + ".join(sorted(roles))] = [t for role in roles for t in groups[role]]
    return merged


def _group_by_role(tensors, producers: dict, nodes, layers: int) -> dict[str, list[str]]:
    """Tensor -> its role: the producing node's module path with layer numbers taken out
    (`/post_attention_layernorm_7/Mul` -> `/post_attention_layernorm/Mul`, `layers.7` -> `layers.N`). Nodes the exporter
    left at the top level (`/Add_103`) are numbered through the whole graph; the k-th of an op
    type plays role k mod (count / layers)."""
    top_level: dict[str, list[str]] = {}
    for node in nodes:
        if node.name.count("/") == 1 and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            top_level.setdefault(node.op_type, []).append(node.name)
    position = {name: (i, len(names)) for names in top_level.values() for i, name in enumerate(names)}
    groups: dict[str, list[str]] = {}
    for tensor in tensors:
        node = producers.get(tensor)
        if node is None:
            role = "input:" + re.sub(r"_\d+$", "", tensor)
        elif node.name in position:
            i, count = position[node.name]
            per_layer = count // layers if count % layers == 0 else 0
            role = f"/{node.op_type}#{i % per_layer}" if per_layer else f"/{node.op_type}"
        else:
            role = "/".join(re.sub(r"_\d+$", "", part) for part in re.sub(r"layers\.\d+", "layers.N", node.name).split("/"))
        groups.setdefault(role, []).append(tensor)
    return groups


def choose_eight_bit(splicer: EightBitSplicer, kld_of: Callable[[bytes], float], budget: float) -> dict:
    """Measure each group's KLD at 8 bits (the rest 16), then put the cheapest groups at 8 bits
    together, as many as add at most `budget` to the all-16-bit graph's KLD. Returns the tensors
    for each width and the measurements behind the choice."""
    base = kld_of(splicer.model_bytes())
    cost = {role: kld_of(splicer.model_bytes(tensors)) - base for role, tensors in splicer.groups.items()}
    order = sorted(cost, key=cost.get)

    def eight_bit(count: int) -> list[str]:
        return [t for role in order[:count] for t in splicer.groups[role]]

    low, high, measured = 0, len(order), {0: base}  # the largest prefix within budget, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        measured[middle] = kld_of(splicer.model_bytes(eight_bit(middle)))
        if measured[middle] - base <= budget:
            low = middle
        else:
            high = middle - 1
    kept = set(eight_bit(low))
    return {"eight_bit": sorted(kept), "sixteen_bit": sorted(t for t in splicer.encodings if t not in kept),
            "eight_bit_groups": order[:low], "budget": budget, "kld_all_16bit": round(base, 5), "kld_chosen": round(measured[low], 5),
            "group_cost": {role: round(cost[role], 5) for role in order}}


def kld_meter(fp32_path: Path, logits_of: Callable) -> Callable[[bytes], float]:
    """model bytes -> mean KLD of its logits to the float graph's, over what `logits_of(session)` runs."""
    from edgequant.backends._shared.ort import cpu_session
    from edgequant.measurement.logprobs import kl_divergence, log_softmax

    reference = [log_softmax(x) for x in logits_of(cpu_session(fp32_path))]

    def kld_of(model: bytes) -> float:
        logits = logits_of(cpu_session(model))
        return float(np.mean(np.concatenate([kl_divergence(r, log_softmax(x)) for r, x in zip(reference, logits)])))

    return kld_of


def widen_by_kld(fp32_path: Path, work: Path, request, feeds: list[dict], importance, kld_of: Callable,
                 layers: int, budget: float, solved: dict) -> dict:
    """The activations a w8a8 `request` keeps at 16 bits, chosen by measured KLD (`kld_of`,
    kld_meter): the graph is quantized once with every activation at 16 bits (same weights, same
    calibration), then choose_eight_bit. The result's `pinned` holds every activation's chosen
    type, scale and zero point (kv.pinned_overrides), for quantize_qdq to build the graph with:
    handing onnxruntime only the 16-bit list would let its mixed-precision pass re-derive types
    around the KV cache outputs, which it refuses."""
    from dataclasses import replace

    from edgequant.backends.qnn import kv, tools

    work.mkdir(exist_ok=True)
    all_16bit = work / "all16.onnx"
    quantized = tools.quantize_qdq(fp32_path, all_16bit, replace(request, precision="w8a16", act16=0.0), feeds,
                                   importance=importance, solved=solved)  # the same int8 weights as w8a8's
    splicer = EightBitSplicer(all_16bit, layers)
    choice = choose_eight_bit(splicer, kld_of, budget)
    chosen = work / "chosen.onnx"
    chosen.write_bytes(splicer.model_bytes(choice["eight_bit"]))
    choice["pinned"] = kv.pinned_overrides(chosen, quantized.overrides)
    return choice


def mix_int8_by_kld(fp32_path: Path, work: Path, request, feeds: list[dict], importance, kld_of: Callable,
                    share: float, solved: dict) -> dict:
    """The int4 weights a w4a16 `request` raises to int8 (choose_int8_weights): the graph is
    quantized once all-int4, and each candidate's int8 form spliced in to measure it."""
    import onnx
    from onnx import numpy_helper

    from edgequant.backends.qnn import tools

    work.mkdir(exist_ok=True)
    int4 = work / "int4.onnx"
    tools.quantize_qdq(fp32_path, int4, request, feeds, importance=importance, solved=solved)
    prepared = fp32_path.with_name("prepared.onnx")  # the graph quantize_qdq quantized
    float_graph = onnx.load(str(prepared if prepared.exists() else fp32_path)).graph
    float_weights = {i.name: numpy_helper.to_array(i) for i in float_graph.initializer
                     if len(i.dims) == 2}
    splicer = Int8WeightSplicer(int4, float_weights, importance)
    return choose_int8_weights(splicer, kld_of, share, {w: float_weights[w].size for w in splicer.users})


class Int8WeightSplicer:
    """A QDQ model with blocked int4 weights, loaded once; `model_bytes(weights)` serializes it
    with those weights at int8 instead (blocks unchanged, scales searched as weights.py does)."""

    def __init__(self, qdq_path: Path, float_weights: dict[str, np.ndarray], importance: dict | None):
        import onnx
        from onnx import numpy_helper

        from edgequant.backends.qnn.weights import int8_blocks

        self._model = onnx.load(str(qdq_path))
        graph = self._model.graph
        self._index = {init.name: i for i, init in enumerate(graph.initializer)}
        consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        self.users: dict[str, str] = {}  # int4 weight -> the name of the MatMul using it
        self._int8: dict[str, list] = {}
        for node in graph.node:
            if node.op_type != "DequantizeLinear" or not node.input[0].endswith("_quantized"):
                continue
            weight = node.input[0].removesuffix("_quantized")
            values = graph.initializer[self._index[node.input[0]]]
            block = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "block_size"), 0)
            if values.data_type != onnx.TensorProto.INT4 or not block or weight not in float_weights:
                continue
            users = [user.name for user in consumers.get(node.output[0], []) if user.op_type == "MatMul"]
            if not users:
                continue
            self.users[weight] = users[0]
            q, scale = int8_blocks(float_weights[weight], block, (importance or {}).get(weight))
            self._int8[weight] = [(node.input[0], numpy_helper.from_array(q, node.input[0])),
                                  (node.input[1], numpy_helper.from_array(scale.astype(np.float32), node.input[1])),
                                  (node.input[2], numpy_helper.from_array(np.zeros(scale.shape, np.int8), node.input[2]))]

    def model_bytes(self, weights=()) -> bytes:
        return _serialized_with(self._model, {self._index[name]: replacement for weight in weights
                                              for name, replacement in self._int8[weight]})


def _kind(node_name: str) -> str:
    """`/q_proj_10/MatMul` or `/model/layers.10/self_attn/q_proj/MatMul` -> "q_proj"."""
    parts = [p for p in node_name.split("/") if p and p != "MatMul"]
    return re.sub(r"_\d+$", "", parts[-1] if parts else node_name)


def choose_int8_weights(splicer: Int8WeightSplicer, kld_of: Callable[[bytes], float], share: float,
                        sizes: dict[str, int]) -> dict:
    """Which kinds of int4 matrix (q_proj, down_proj, ... in every layer) to raise to int8, within
    `share` of all their values: what int8 buys each kind is measured, and the set of kinds with
    the most summed gain that fits is taken (_best_within). Whole kinds, not single matrices: one
    matrix's gain is too small to measure on a few hundred held-out tokens (per-matrix choices
    measured on the default model overfit them: KLD 0.104 held out, 0.158 on the evaluation
    text). The chosen set is then measured."""
    base = kld_of(splicer.model_bytes())
    kinds: dict[str, list[str]] = {}
    for weight, user in splicer.users.items():
        kinds.setdefault(_kind(user), []).append(weight)
    total = sum(sizes[w] for w in splicer.users)
    gain = {kind: base - kld_of(splicer.model_bytes(weights)) for kind, weights in kinds.items()}
    size = {kind: sum(sizes[w] for w in weights) for kind, weights in kinds.items()}
    chosen = _best_within(gain, size, share * total)
    spent = sum(size[kind] for kind in chosen)
    weights = [w for kind in chosen for w in kinds[kind]]
    return {"int8": weights, "kinds": chosen, "share": round(spent / max(total, 1), 4), "kld_int4": round(base, 5),
            "kld_chosen": round(kld_of(splicer.model_bytes(weights)), 5),
            "kind_gain": {k: round(v, 5) for k, v in sorted(gain.items(), key=lambda kv: -kv[1])},
            "kind_share": {k: round(v / max(total, 1), 4) for k, v in size.items()}}


def _best_within(gain: dict[str, float], size: dict[str, int], limit: float) -> list[str]:
    """The kinds with the largest summed gain whose sizes fit `limit`, best buy (gain per value)
    first. Every subset is tried: there are a handful of kinds, and taking them greedily by gain
    per value can fill the share with small kinds and leave no room for a large one worth more."""
    from itertools import combinations

    useful = [kind for kind in gain if gain[kind] > 0]
    best: tuple = (0.0, 0, ())
    for count in range(1, len(useful) + 1):
        for subset in combinations(useful, count):
            spent = sum(size[k] for k in subset)
            bought = sum(gain[k] for k in subset)
            if spent <= limit and (bought, -spent) > best[:2]:
                best = (bought, -spent, subset)
    return sorted(best[2], key=lambda k: gain[k] / size[k], reverse=True)
