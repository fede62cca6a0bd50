"""HQQ int4 for ONNX, rewritten so onnxruntime runs it on its fast packed kernels.

HQQ fits a float scale and a *float* zero point per block: w = s * (q - z). That is what makes it
near-lossless on the default model (its weights sit on a Q4_1 min + scale grid, which an integer
zero point cannot reproduce), but onnxruntime's MatMulNBits only prepacks weights whose zero
points are uint8; with float ones it dequantizes the whole matrix on every call (measured ~15x
slower decoding than rtn int4).

The rewrite is exact algebra. With no zero-point input MatMulNBits uses z = 8, so

    x @ W = x @ [s * (q - 8)]  +  x @ [s * (8 - z)]        (the second term is constant per block)
          = MatMulNBits(x, q, s)  +  blocksum(x) @ C,       C[b, n] = s[n, b] * (8 - z[n, b])

where blocksum(x) adds x over each block of K. C has one float per block and output column, the
same count as the float zero points it replaces, so the file size does not change.
"""

from __future__ import annotations

from pathlib import Path

from edgequant.progress import engine_warnings_hidden

_DEFAULT_ZERO_POINT = 8.0  # MatMulNBits' implied zero point for 4-bit weights without a zero_points input


def quantize_hqq(model_path: Path, block: int, accuracy_level: int, keep_float: tuple[str, ...] = ()) -> int:
    """Rewrite every float MatMul left in the model (the LM head is already MatMulNBits) as HQQ
    int4 MatMulNBits (data-free, half-quadratic fit), then fold the float zero points out; MatMuls
    whose node name contains a `keep_float` part (LoRA branches) stay float.
    Rewrites model.onnx and its data file in place; returns how many MatMuls were folded."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from edgequant.backends.onnx.tools import DATA_SUFFIX, save_model

    model = onnx.load(str(model_path))
    excluded = [node.name for node in model.graph.node if any(part in node.name for part in keep_float)]
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=excluded,
                                     algo_config=HQQWeightOnlyQuantConfig(block_size=block, bits=4))
    with engine_warnings_hidden():  # e.g. torch.from_numpy on read-only weights: harmless, HQQ copies them
        quantizer.process()
    model = quantizer.model.model
    folded = fold_float_zero_points(model)
    _set_accuracy_level(model, accuracy_level)
    model_path.with_name(model_path.name + DATA_SUFFIX).unlink(missing_ok=True)
    save_model(model, model_path)
    return folded


def fold_float_zero_points(model) -> int:
    """Replace the float zero points of every 4-bit MatMulNBits by the block-sum correction above."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes = []
    folded = 0
    for node in graph.node:
        new_nodes.append(node)
        zp_name = node.input[3] if node.op_type == "MatMulNBits" and len(node.input) == 4 else ""
        if zp_name not in inits or inits[zp_name].data_type == 2:  # 2 = UINT8: already the fast kind
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        if attrs["bits"] != 4 or k % block:  # a ragged last block would need padding; leave it be
            continue
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, k // block)
        zeros = numpy_helper.to_array(inits[zp_name]).reshape(n, k // block)
        correction = (scales * (_DEFAULT_ZERO_POINT - zeros)).T.astype(scales.dtype)  # (blocks, N)
        new_nodes[-1:] = _folded_nodes(graph, node, correction, block, k // block)
        graph.initializer.remove(inits.pop(zp_name))
        folded += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return folded


def _set_accuracy_level(model, level: int) -> None:
    """The HQQ quantizer leaves accuracy_level unset (fp32 compute); apply the spec's choice."""
    from onnx import helper

    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and level and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(helper.make_attribute("accuracy_level", level))


def _folded_nodes(graph, node, correction, block: int, blocks: int) -> list:
    """MatMulNBits without zero points, plus Reshape -> ReduceSum -> MatMul(C) -> Add."""
    import numpy as np
    from onnx import helper, numpy_helper

    base = node.name or node.output[0]
    names = {key: f"{base}/hqq_{key}" for key in ("shape", "axes", "C", "blocks", "blocksum", "fix", "main")}
    graph.initializer.extend([
        numpy_helper.from_array(np.asarray([0, 0, blocks, block], np.int64), names["shape"]),  # 0 keeps (batch, seq)
        numpy_helper.from_array(np.asarray([-1], np.int64), names["axes"]),
        numpy_helper.from_array(correction, names["C"]),
    ])
    x, out = node.input[0], node.output[0]
    main = helper.make_node("MatMulNBits", list(node.input[:3]), [names["main"]], name=base, domain=node.domain)
    main.attribute.extend(node.attribute)
    return [
        main,
        helper.make_node("Reshape", [x, names["shape"]], [names["blocks"]], name=f"{base}/hqq_reshape"),
        helper.make_node("ReduceSum", [names["blocks"], names["axes"]], [names["blocksum"]], name=f"{base}/hqq_blocksum",
                         keepdims=0),
        helper.make_node("MatMul", [names["blocksum"], names["C"]], [names["fix"]], name=f"{base}/hqq_correction"),
        helper.make_node("Add", [names["main"], names["fix"]], [out], name=f"{base}/hqq_add"),
    ]
