"""ONNX sentence encoders: the shared float32 export (pooling inside the graph), then onnxruntime's
own float16 conversion or int8 quantization, and a runner on a plain onnxruntime session.

- fp16: every float tensor float16, inputs and output kept in their types;
- int8: `quantize_dynamic`, weights int8 per channel, activations scaled per tensor at run time;
- int8-static: QDQ around the MatMuls and the embedding Gathers, uint8 activations with ranges
  calibrated on news sentences (never the evaluation texts), int8 weights per channel. The
  feed-forward output projections stay float unless `keep_float` says otherwise: their inputs (after
  GELU) carry outliers one range cannot cover. On all-MiniLM-L6-v2 (250 texts, cosine to float32):
  every MatMul quantized 0.927 mean / 0.886 1st percentile; FFN outputs float 0.989 / 0.982 (the
  first and last layer's alone 0.957); symmetric int8 activations 0.837.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

from edgequant.progress import engine_warnings_hidden
from edgequant.runner import TaskRunner
from edgequant.sources.tasks import SENTENCE_EMBEDDING

# `keep_float` of an encoder: node-name parts, and this role name for the feed-forward outputs.
FFN_OUT = "ffn_out"
_ROLES = {FFN_OUT: re.compile(r"layer\.\d+/output/dense/")}


def convert_encoder(source, spec, opt, out_dir: Path) -> dict:
    from edgequant.backends._shared.encoder import MODEL_FILE, calibration_feeds, copy_runtime_files, float_encoder_onnx, refuse_options

    refuse_options(spec, ("samples", "keep_float"), source)
    exported = float_encoder_onnx(source)
    fp32, target = exported / MODEL_FILE, out_dir / MODEL_FILE
    info: dict = {"model_file": MODEL_FILE, "task": SENTENCE_EMBEDDING}
    if spec.precision == "fp32":
        shutil.copyfile(fp32, target)
    elif spec.precision == "fp16":
        to_float16(fp32, target)
        info["post_processing"] = "onnxruntime float16 conversion, inputs and output kept in their types"
    elif spec.precision == "int8":
        quantize_dynamic_int8(fp32, target, unsigned=opt.weights == "u8")
        info["post_quantization"] = "onnxruntime quantize_dynamic: int8 weights per channel, activations per tensor at run time"
        info["limitations"] = ["activations are scaled per tensor over the whole batch, padding included, so a text's "
                               "embedding depends on the batch it runs in (all-MiniLM-L6-v2: cosine 0.991 between a text "
                               "alone and beside two others); quality is scored in batches of 16"]
    else:
        feeds = calibration_feeds(exported, opt.samples)
        keep_float = spec.options.get("keep_float", FFN_OUT)  # the LLM default names no encoder node
        kept = _quantize_static(fp32, target, feeds, keep_float)
        info["post_quantization"] = (f"QDQ int8 around MatMuls and embedding Gathers: uint8 activations (MinMax ranges), "
                                     f"int8 weights per channel; {kept} MatMuls kept float ({keep_float})")
        info["calibration"] = {"text": "lee_background.cor sentences (gensim)", "batches": len(feeds),
                               "sentences": sum(len(f["input_ids"]) for f in feeds)}
    copy_runtime_files(exported, out_dir)
    return info


def to_float16(fp32: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with engine_warnings_hidden():
        onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(target))


def quantize_dynamic_int8(fp32: Path, target: Path, unsigned: bool = False) -> None:
    """onnxruntime's dynamic int8: weights per channel, int8 codes or (`unsigned`) uint8 ones."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with engine_warnings_hidden():
        quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
                         per_channel=True)


def _quantize_static(fp32: Path, target: Path, feeds: list[dict], keep_float: str) -> int:
    """Returns how many MatMuls stay float."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgequant.backends._shared.ort import FeedReader

    matmuls = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "MatMul"]
    excluded = [m for m in matmuls if _kept_float(m, keep_float)]
    with engine_warnings_hidden():
        quantize_static(str(fp32), str(target), FeedReader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gather"], activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=excluded, extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": False})
    return len(excluded)


def _kept_float(node: str, keep_float: str) -> bool:
    """A node `keep_float` names: by a role (ffn_out) or by a part of its name; `none` names none."""
    parts = [p for p in keep_float.split(",") if p and p != "none"]
    return any(_ROLES[p].search(node) if p in _ROLES else p in node for p in parts)


class OnnxEncoderRunner(TaskRunner):
    task = SENTENCE_EMBEDDING

    def __init__(self, folder: Path, model_file: str, *, name: str, threads: int):
        from edgequant.backends._shared.encoder import OUTPUT, EncoderTokenizer
        from edgequant.backends._shared.ort import cpu_session

        self.name = name
        self._tokenizer = EncoderTokenizer.of_artifact(folder)
        self._session = cpu_session(folder / model_file, threads)
        self._output = OUTPUT

    def token_count(self, batch) -> int:
        return self._tokenizer.count(batch)

    def run(self, batch) -> np.ndarray:
        return self._session.run([self._output], self._tokenizer(batch))[0].astype(np.float32, copy=False)

    def close(self) -> None:
        self._session = None
