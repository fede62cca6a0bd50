"""Engine calls for the QNN backend: a fixed-shape ONNX export of the PyTorch model, then
onnxruntime's QNN helpers (`qnn_preprocess_model`, `get_qnn_qdq_config`) to write QDQ models the
Qualcomm HTP can take. Heavy imports stay inside the functions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from edgequant.errors import EdgequantError
from edgequant.progress import engine_warnings_hidden

MODEL_FILE = "model.onnx"
QNN_INSTALL_HINT = "pip install onnxruntime-qnn==2.7.0 (the `qnn` extra: pip install 'edgequant[qnn]')"

# precision -> (activation type, weight type) names of onnxruntime.quantization.QuantType
SCHEMES = {"w8a8": ("QUInt8", "QUInt8"), "w8a16": ("QUInt16", "QUInt8"), "w4a16": ("QUInt16", "QInt4")}
_OVERRIDE_TYPES = {"u8": "QUInt8", "i8": "QInt8", "u16": "QUInt16", "i16": "QInt16", "i4": "QInt4", "u4": "QUInt4"}


@dataclass(frozen=True)
class QnnRequest:
    precision: str
    seq: int
    samples: int
    overrides: dict[str, str] = field(default_factory=dict)  # weight name substring -> override type key
    act16: float = 0.0  # w8a8 only: activations with more than this share of values underflowing 8 bits go to 16 bit
    block: int = 0  # weights quantized per block of this many input rows (0: per tensor)
    activations: dict[str, str] = field(default_factory=dict)  # activation tensor name -> override type key
    weights: dict[str, str] = field(default_factory=dict)  # exact weight initializer name -> override type key


@dataclass
class Quantized:
    """What quantize_qdq decided beyond the request: the activations w8a8 widened to 16 bit, and
    the tensor overrides it quantized with (after onnxruntime added the type conversions that
    mixed precision needs), which a second graph can be pinned to (kv.pinned_overrides)."""
    widened: list[str]
    overrides: dict


def parse_overrides(text: str) -> dict[str, str]:
    """`name:type,name:type` (e.g. `lm_head:u16,down_proj:i8`) -> {name: type}."""
    result = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, kind = part.partition(":")
        if not sep or not name or kind not in _OVERRIDE_TYPES:
            raise EdgequantError(f"override {part!r} is not NAME:TYPE",
                                 f"write e.g. override=lm_head:u16,down_proj:i8 with TYPE one of {', '.join(_OVERRIDE_TYPES)}")
        result[name] = kind
    return result


QNN_EP = "QNNExecutionProvider"
# A current Snapdragon: the 8 Elite's Hexagon v79, SoC model 69 (QNN's id for SM8750).
DEFAULT_TARGET = {"htp_arch": "79", "soc_model": "69"}


def _qnn_devices() -> list:
    """The QNN execution provider's devices. onnxruntime-qnn 2.x is a plugin library: it must be
    registered with onnxruntime once per process before sessions can use it."""
    try:
        import onnxruntime_qnn
    except ImportError:
        return []
    import onnxruntime as ort

    if not any(d.ep_name == QNN_EP for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(QNN_EP, onnxruntime_qnn.get_library_path())
    return [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]


def htp_available() -> bool:
    return bool(_qnn_devices())


def htp_session_options(threads: int = 0, target: dict | None = None):
    """Session options that put the whole graph on the (simulated) HTP: CPU fallback is off, so a
    node the HTP cannot take is an error instead of a silent CPU run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.add_provider_for_devices(_qnn_devices(), htp_options(target))
    return options


def qdq_session(model_path: Path, threads: int, htp: bool):
    """A session on a QDQ graph: the CPU execution provider (the HTP's stand-in), or with `htp`
    the simulated HTP itself."""
    if htp:
        import onnxruntime as ort

        return ort.InferenceSession(str(model_path), htp_session_options(threads))
    from edgequant.backends._shared.ort import cpu_session

    return cpu_session(model_path, threads)


def qdq_arithmetic(htp: bool) -> str:
    """What a task runner's outputs are computed in (`TaskRunner.arithmetic`)."""
    if htp:
        return "Qualcomm's HTP simulator (x86-64), fixed point"
    return ("the QDQ graph on ONNX Runtime's CPU execution provider (dequantized to float32), a stand-in for "
            "the Snapdragon HTP's fixed-point arithmetic")


def require_htp() -> None:
    if not htp_available():
        raise EdgequantError("context=1 needs onnxruntime-qnn (the QNN execution provider), which is not installed",
                             QNN_INSTALL_HINT)


# Added to masked attention scores. The mask Add's output is a quantized activation, so float32's
# minimum would stretch its range until every real score rounds to one step; -100 still makes
# exp() of a masked score vanish next to any unmasked one.
MASK_VALUE = -100.0


class _FixedShapeLM:
    """Wraps a causal LM so the graph takes only input_ids of a fixed length: the causal mask and
    positions are built inside as constants, which keeps transformers' mask helpers (not
    traceable by the TorchScript exporter) out of the graph and every shape static."""

    def __new__(cls, model, seq: int):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model
                mask = torch.full((seq, seq), MASK_VALUE).triu(1)[None, None]
                self.register_buffer("mask", mask, persistent=False)
                self.register_buffer("positions", torch.arange(seq)[None], persistent=False)

            def forward(self, input_ids):
                out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=self.positions, use_cache=False)
                return out.logits

        return Wrapper()


def scale_free_rms_norm(module) -> None:
    """Replace an RMSNorm's forward with an equal one whose intermediates stay in a fixed range.

    Exported as is, RMSNorm squares the residual stream, and every intermediate gets ONE
    quantization range for all tokens. The default model's first token carries |x| ~ 770 (x^2 ~
    6e5), so at 16 bits the squares of every other token (0.01..10) round to 0 and their
    normalisation blows up (w8a16 perplexity x4000). Dividing each token by its own max |x| first
    keeps x^2 in [0, 1] for every token; the max cancels out of x / rms(x), so its rounding error
    does not matter. eps is added to mean(y^2) >= 1/hidden, where it is negligible either way."""
    import types

    import torch

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        y = x / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * y.to(dtype)

    module.forward = types.MethodType(forward, module)


def model_for_export(hf_dir: Path):
    """The float32 model as every QNN graph exports it: eager attention, scale-free RMSNorm."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32).eval()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            scale_free_rms_norm(module)
    return model


def export_fixed(hf_dir: Path, seq: int, out_path: Path) -> None:
    import warnings

    import torch

    model = model_for_export(hf_dir)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_FixedShapeLM(model, seq), (torch.zeros(1, seq, dtype=torch.long),), str(out_path),
                          input_names=["input_ids"], output_names=["logits"], opset_version=17, dynamo=False)


def calibration_inputs(hf_dir: Path, seq: int, samples: int, option: str = "samples") -> list[dict]:
    import numpy as np

    from edgequant.backends._shared.calibration import calibration_windows

    windows = calibration_windows(hf_dir, samples, seq, fix=f"ask for {option}<={{fit}} or a smaller seq")
    return [{"input_ids": np.asarray([w], np.int64)} for w in windows]


def quantize_qdq(fp32_path: Path, out_path: Path, request: QnnRequest, feeds: list[dict], *,
                 pinned: dict | None = None, importance: dict | None = None, solved: dict | None = None) -> Quantized:
    """qnn_preprocess_model (fusions the HTP wants), then QDQ with the QNN config. `pinned`
    (kv.pinned_overrides) gives every activation another graph's type, scale and zero point, so
    calibration only has to run the graph. Weights are quantized by weights.py, with `importance`
    (input statistics) driving the scale search and GPTQ, and `solved` caching its results."""
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    from edgequant.backends._shared.ort import FeedReader
    from edgequant.backends.qnn.weights import fold_weight_quantizers

    prepared = fp32_path.with_name("prepared.onnx")
    if not qnn_preprocess_model(str(fp32_path), str(prepared), fuse_layernorm=True, save_as_external_data=True,
                                all_tensors_to_one_file=True, external_data_location="prepared.onnx.data"):
        prepared = fp32_path
    activation, weight = (getattr(QuantType, name) for name in SCHEMES[request.precision])
    if weight == QuantType.QUInt8:
        weight = QuantType.QInt8  # weights per channel or per block are symmetric (zero point 0), as the HTP takes them
    widened = []
    if pinned is not None:
        overrides = pinned
    else:
        overrides = _init_overrides(prepared, request.overrides) or {}
        if request.act16 and activation == QuantType.QUInt8:
            widened = [name for name, share in underflow_shares(prepared, feeds[:2]).items() if share > request.act16]
        overrides.update({name: [{"quant_type": getattr(QuantType, _OVERRIDE_TYPES[kind])}]
                          for name, kind in {**request.weights, **request.activations}.items()})
        # w8a8: a cache tensor that underflows 8 bits stays 16-bit, 8-bit KV cache or not
        overrides.update({name: [{"quant_type": QuantType.QUInt16}] for name in widened})
    config = get_qnn_qdq_config(str(prepared), FeedReader(feeds), activation_type=activation, weight_type=weight,
                                per_channel=True, init_overrides=overrides or None, add_qtype_converts=pinned is None,
                                weight_symmetric=True)
    config.use_external_data_format = True
    # onnxruntime's blocked weights take each block's min/max (and for int4 a zero point the HTP
    # ignores), and its MatMul weights are per tensor even when asked per channel, so it only marks
    # the weights (float -> Q -> DQ) and weights.py quantizes them with searched scales, per block
    # or per output channel. Blocked Q/DQ needs opset 21's standard ops (the contrib ops have no
    # block_size).
    config.extra_options.update({"AddQDQPairToWeight": True, "UseQDQContribOps": False})
    if request.block:
        config.extra_options["BlockSize"] = request.block
    converted, ranges = calibrated(prepared, config, feeds)
    with engine_warnings_hidden(), readers_indexed():
        quantize_static(str(converted), str(out_path), None, calibration_cache_path=str(ranges),
                        calibrate_method=config.calibrate_method, quant_format=config.quant_format,
                        activation_type=config.activation_type, weight_type=config.weight_type,
                        op_types_to_quantize=config.op_types_to_quantize, nodes_to_quantize=config.nodes_to_quantize,
                        nodes_to_exclude=config.nodes_to_exclude, per_channel=config.per_channel,
                        reduce_range=config.reduce_range, use_external_data_format=config.use_external_data_format,
                        extra_options=config.extra_options)
    fold_weight_quantizers(out_path, importance, solved)
    return Quantized(widened, config.extra_options["TensorQuantOverrides"])


@contextmanager
def readers_indexed() -> Iterator[None]:
    """onnxruntime's QDQ quantizer rewires the readers of each tensor it quantizes (~2,600 per graph
    on the default model) by scanning every input of every node in Python: 106 s of the default
    model's two graphs. While this is active its `replace_input_of_all_nodes` finds them in an index
    of readers instead: built once, extended with the nodes the quantizer appends, moved along with
    each rewiring, and built again whenever another method edits inputs or nodes are removed. The
    graphs it writes are the same (tested against the scan). The index does not see inputs edited
    node by node, which the quantizer does only with DedicatedQDQPair, never set here."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    scan_all, scan_some = ONNXModel.replace_input_of_all_nodes, ONNXModel.replace_input_of_nodes

    def replace_input_of_all_nodes(self, old_input_name, new_input_name):
        nodes = self.model.graph.node
        readers, indexed, last = self.__dict__.get("_readers", ({}, 0, None))
        if len(nodes) < indexed or (indexed and nodes[indexed - 1] is not last):  # nodes were removed
            readers, indexed = {}, 0
        for node in nodes[indexed:]:
            for name in set(node.input):
                readers.setdefault(name, []).append(node)
        moved = readers.pop(old_input_name, [])
        for node in moved:
            ONNXModel.replace_node_input(node, old_input_name, new_input_name)
        readers.setdefault(new_input_name, []).extend(moved)
        self._readers = (readers, len(nodes), nodes[-1] if len(nodes) else None)

    def replace_input_of_nodes(self, old_input_name, new_input_name, node_names_set):
        self.__dict__.pop("_readers", None)  # edited here by name: index again at the next call
        scan_some(self, old_input_name, new_input_name, node_names_set)

    ONNXModel.replace_input_of_all_nodes, ONNXModel.replace_input_of_nodes = replace_input_of_all_nodes, replace_input_of_nodes
    try:
        yield
    finally:
        ONNXModel.replace_input_of_all_nodes, ONNXModel.replace_input_of_nodes = scan_all, scan_some


def calibrated(model_path: Path, config, feeds: list[dict]) -> tuple[Path, Path]:
    """onnxruntime's MinMax calibration of `model_path`, done here: the model at the opset
    quantize_static would bring it to, and its calibration cache, both beside `model_path`.

    onnxruntime's calibrator inserts each ReduceMin/ReduceMax pair before the first node reading its
    tensor, scanning the node list for every tensor: on the default model's graphs that scan (5,000
    tensors x 7,000 nodes) was 113 s of pure Python for the two. Appending the pairs at the end of
    the graph is as valid (every input is computed before them) and linear. The tensors are those
    its calibrator picks (float inputs and outputs of the op types to quantize) and each is reduced
    over every feed as it does, so the ranges, and the model quantized from them, are the same.
    Handed the converted model, quantize_static has no opset conversion of its own to make."""
    import numpy as np
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationMethod, MinMaxCalibrater, TensorsData, save_tensors_data

    from edgequant.backends._shared.ort import cpu_session

    # The graph alone, its weights left in their file beside it: onnxruntime's own opset update
    # serializes, deep-copies, saves and reloads the whole model around the conversion (32 s for
    # the default model's two graphs), none of which needs a weight's value.
    model = onnx.load(str(model_path), load_external_data=False)
    target = _opset_quantize_static_wants(model, config)
    if target != _opset(model):
        model = onnx.version_converter.convert_version(model, target)
    model = onnx.shape_inference.infer_shapes(model)
    converted = model_path.with_name("converted.onnx")  # reads model_path's weight file, in the same folder
    onnx.save_model(model, str(converted))
    selector = MinMaxCalibrater.__new__(MinMaxCalibrater)  # its choice of tensors, without loading a model
    selector.op_types_to_calibrate = config.op_types_to_quantize
    tensors, value_infos = selector.select_tensors_to_calibrate(model)
    tensors = sorted(tensors)
    del model.graph.output[:]
    for name in tensors:
        for op in ("ReduceMin", "ReduceMax"):
            model.graph.node.append(onnx.helper.make_node(op, [name], [f"{name}__{op}"], keepdims=0))
            model.graph.output.append(onnx.helper.make_tensor_value_info(
                f"{name}__{op}", value_infos[name].type.tensor_type.elem_type, []))
    augmented = model_path.with_name("minmax.onnx")  # reads the weight file beside it too
    onnx.save_model(model, str(augmented))
    session = cpu_session(augmented, optimize=False)  # as the calibrator runs it: no fusions
    lows = np.full(len(tensors), np.inf, np.float32)
    highs = np.full(len(tensors), -np.inf, np.float32)
    for feed in feeds:
        values = session.run(None, feed)
        lows = np.fmin(lows, np.asarray(values[0::2], np.float32))  # NaN skipped, as nanmin/nanmax do
        highs = np.fmax(highs, np.asarray(values[1::2], np.float32))
    del session
    augmented.unlink()
    ranges = model_path.with_name("minmax_ranges.json")
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
        name: (np.array([low], np.float32), np.array([high], np.float32)) for name, low, high in zip(tensors, lows, highs)}),
        ranges)
    return converted, ranges


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _opset_quantize_static_wants(model, config) -> int:
    """The opset quantize_static would convert `model` to: its own rule, asked about an empty
    graph that imports the same opsets."""
    import onnx
    from onnxruntime.quantization.quant_utils import update_opset_version

    stub = onnx.helper.make_model(onnx.helper.make_graph([], "opsets", [], []), opset_imports=model.opset_import)
    with engine_warnings_hidden():  # it announces the upgrade it makes
        stub = update_opset_version(stub, config.weight_type, config.activation_type,
                                    tensor_quant_overrides=config.extra_options.get("TensorQuantOverrides"),
                                    block_size=config.extra_options.get("BlockSize", 0))
    return _opset(stub)


def underflow_shares(model_path: Path, feeds: list[dict]) -> dict[str, float]:
    """How badly one uint8 range carries each activation tensor: run the float model on
    calibration windows and, with the asymmetric min/max range calibration will give it, count
    the share of its nonzero values that round to zero at 8 bits. Two LLM patterns make that
    share large: a few outlier tokens stretching the range of the residual stream and the MLP
    down-projection inputs (every ordinary token lands on a handful of levels), and long-tailed
    values such as attention probabilities next to an attention sink (most of them underflow).
    A per-token relative error missed the second kind: the large entries dominate each row."""
    import numpy as np
    import onnx

    from edgequant.backends._shared.ort import cpu_session

    model = onnx.load(str(model_path))
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    names = [o for n in model.graph.node for o in n.output if o in floats]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    session = cpu_session(model.SerializeToString(), optimize=False)  # keep every named tensor
    outputs = [session.run(names, feed) for feed in feeds]
    shares = {}
    for i, name in enumerate(names):
        values = [out[i] for out in outputs]
        low = min(0.0, *(float(x.min()) for x in values))  # one range over every window, as calibration sets it
        high = max(0.0, *(float(x.max()) for x in values))
        half_step = (high - low) / 255 / 2
        nonzero = sum(int(np.count_nonzero(x)) for x in values)
        if half_step == 0 or nonzero == 0:
            continue
        shares[name] = sum(int(np.count_nonzero((np.abs(x) < half_step) & (x != 0))) for x in values) / nonzero
    return shares


def _init_overrides(model_path: Path, overrides: dict[str, str]) -> dict | None:
    """Map NAME patterns to weight initializers: a pattern matches a weight's own name or the name
    of the node using it (the TorchScript exporter names transposed MatMul weights `onnx::MatMul_N`,
    while nodes keep module paths such as /model/layers.0/mlp/down_proj/MatMul)."""
    if not overrides:
        return None
    import onnx
    from onnxruntime.quantization import QuantType

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer if len(i.dims) >= 2}
    result = {}
    for pattern, kind in overrides.items():
        matched = {w for w in weights if pattern in w}
        matched |= {x for n in graph.node if pattern in n.name for x in n.input if x in weights}
        if not matched:
            raise EdgequantError(f"override {pattern!r} matches no weight of the exported model",
                                 "use a substring of a weight or node name, e.g. lm_head or layers.0/mlp")
        for name in matched:
            result[name] = [{"quant_type": getattr(QuantType, _OVERRIDE_TYPES[kind])}]
    return result


def compile_context(model_path: Path, out_path: Path, target: dict | None = None) -> None:
    """Compile the QDQ model for the simulated HTP and write the QNN context model beside it."""
    import onnxruntime as ort

    options = htp_session_options(target=target)
    options.add_session_config_entry("ep.context_enable", "1")
    options.add_session_config_entry("ep.context_file_path", str(out_path))
    options.add_session_config_entry("ep.context_embed_mode", "1")
    ort.InferenceSession(str(model_path), options)


def compile_shared_contexts(folder: Path, files: list[str], target: dict | None = None) -> dict:
    """Compile QDQ models into QNN context models that share ONE context binary: onnxruntime-qnn
    keeps one QNN backend across sessions marked ep.share_ep_contexts, weights with the same name
    and data are stored once, and the last session (ep.stop_share_ep_contexts) writes the binary
    every `<name>_ctx.onnx` points to. (The x86-64 simulator writes such binaries but cannot open
    them, so the graphs are checked on it as QDQ models instead.)"""
    import onnxruntime as ort

    contexts = {}
    for i, name in enumerate(files):
        context = Path(name).stem + "_ctx.onnx"
        options = htp_session_options(target=target)
        for key, value in (("ep.context_enable", "1"), ("ep.context_file_path", str(folder / context)),
                           ("ep.context_embed_mode", "0"), ("ep.share_ep_contexts", "1")):
            options.add_session_config_entry(key, value)
        if i == len(files) - 1:
            options.add_session_config_entry("ep.stop_share_ep_contexts", "1")
        ort.InferenceSession(str(folder / name), options)
        contexts[name] = context
    binaries = sorted(p.name for p in folder.glob("*.bin"))
    return {"models": contexts, "binaries": binaries, "bytes": sum((folder / b).stat().st_size for b in binaries),
            "weights_shared": len(binaries) == 1, **htp_options(target)}


def htp_refusal(exc: Exception) -> str:
    """The first line of onnxruntime's reason for not putting a graph on the HTP."""
    return str(exc).split("] : ", 1)[-1].strip().splitlines()[0][:300]


def htp_agreement(model_path: Path, feeds: list[dict], target: dict | None = None) -> dict:
    """Run the first calibration feed on the CPU EP and on the simulated HTP; how far apart they
    land. The HTP computes in fixed point where the CPU EP dequantizes to float, so they differ a
    little."""
    import numpy as np
    import onnxruntime as ort

    from edgequant.backends._shared.ort import cpu_session
    from edgequant.measurement.logprobs import kl_divergence, log_softmax

    cpu = cpu_session(model_path)
    try:
        htp = ort.InferenceSession(str(model_path), htp_session_options(target=target))
    except Exception as exc:  # the graph still runs on the CPU EP; the HTP's refusal is the finding
        return {"backend": "QNN HTP simulator (x86-64)", **htp_options(target), "error": htp_refusal(exc)}
    a = cpu.run(["logits"], feeds[0])[0][0]
    b = htp.run(["logits"], feeds[0])[0][0]
    log_p, log_q = log_softmax(a), log_softmax(b)
    return {"backend": "QNN HTP simulator (x86-64)", **htp_options(target), "tokens": int(a.shape[0]),
            "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).mean()), 4),
            "kld_mean": round(float(kl_divergence(log_p, log_q).mean()), 6),
            "max_abs_logit_diff": round(float(np.abs(a - b).max()), 4)}


def htp_target(opt) -> dict:
    """The HTP the simulator checks and context binaries are made for (the htp_arch and soc options)."""
    return {"htp_arch": str(opt.htp_arch), "soc_model": str(opt.soc)}


def outputs_on_htp(model_path: Path, float_path: Path, run, target: dict, record: dict):
    """`run(session) -> outputs` of the QDQ graph on the simulated HTP (CPU fallback off) and on the
    CPU EP, and of the float graph on the CPU EP, for a task's HTP check. Returns `record` (what was
    run) with the simulator's settings and load and run seconds plus the three outputs, or, where
    the HTP refuses the graph, `record` with its reason and no outputs."""
    import time

    import onnxruntime as ort

    from edgequant.backends._shared.ort import cpu_session

    record = {"backend": "QNN HTP simulator (x86-64)", **htp_options(target), **record}
    started = time.perf_counter()
    try:
        htp = ort.InferenceSession(str(model_path), htp_session_options(target=target))
    except Exception as exc:  # the graph still runs on the CPU EP; the HTP's refusal is the finding
        return {**record, "error": htp_refusal(exc)}, None
    loaded = time.perf_counter()
    on_htp = run(htp)
    ran = time.perf_counter()
    record["seconds"] = {"htp_load": round(loaded - started, 3), "htp_run": round(ran - loaded, 3)}
    return record, (on_htp, run(cpu_session(model_path)), run(cpu_session(float_path)))


def save_static(model, out: Path) -> None:
    """A graph whose inputs were fixed: its output shapes fixed too and the shape arithmetic folded
    away (onnxruntime's basic optimizations, as qnn_preprocess_model runs them), written to `out`."""
    import onnx
    from onnxruntime.quantization.quant_utils import optimize_model
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes

    fix_output_shapes(model)
    fixed = out.with_name("fixed.onnx")
    onnx.save(model, str(fixed))
    optimize_model(fixed, out)
    fixed.unlink()


def htp_options(target: dict | None = None) -> dict:
    # The x86-64 simulator needs an explicit architecture and SoC (see shared/ENGINES.md).
    return {"backend_type": "htp", **(target or DEFAULT_TARGET)}
