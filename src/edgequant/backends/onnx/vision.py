"""ONNX image classifiers: the shared float32 graph (see backends/_shared/vision.py), then
onnxruntime's own float16 conversion or int8 quantization, run on a plain onnxruntime session.

- fp16: every float tensor float16, the input and output kept float32;
- int8: `quantize_dynamic`: weights int8 per channel, each Conv's and MatMul's input scaled at run
  time (ConvInteger / MatMulInteger);
- int8-static: QDQ around every Conv, Gemm/MatMul and the pooling, uint8 activations with ranges
  calibrated on views of the sample photos that no evaluation uses, int8 weights per channel, and
  each bias corrected for the mean output shift its weights' rounding causes
  (`_shared/bias_correction.py`). On EfficientNet-Lite0 (176 photo views, 2026-12-04) the
  correction took KLD from 0.050 to 0.013 and top-1 agreement from 0.81 to 0.88 (QNN's w8a8, the
  same scheme, measured the same).
- int8 (dynamic) suits transformers, not CNNs: on EfficientNet-Lite0 top-1 agreement 0.45, KLD 0.59
  (each Conv's input scaled per tensor at run time, depthwise kernels included); the manifest says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgequant.progress import engine_warnings_hidden
from edgequant.sources.tasks import IMAGE_CLASSIFICATION


def convert_vision(source, spec, opt, out_dir: Path) -> dict:
    from edgequant.backends._shared import vision
    from edgequant.backends.onnx.encoder import quantize_dynamic_int8, to_float16

    vision.refuse_options(spec, ("samples",), source)
    exported = vision.float_vision_onnx(source)
    fp32, target = exported / vision.MODEL_FILE, out_dir / vision.MODEL_FILE
    info: dict = {"model_file": vision.MODEL_FILE, "task": IMAGE_CLASSIFICATION}
    if spec.precision == "fp32":
        shutil.copyfile(fp32, target)
    elif spec.precision == "fp16":
        to_float16(fp32, target)
        info["post_processing"] = "onnxruntime float16 conversion, input and output kept float32"
    elif spec.precision == "int8":
        quantize_dynamic_int8(fp32, target, unsigned=opt.weights == "u8")
        info["post_quantization"] = "onnxruntime quantize_dynamic: int8 weights per channel, activations per tensor at run time"
        info["limitations"] = ["dynamic quantization of a convolutional network loses most of its agreement with the "
                               "float model (EfficientNet-Lite0: top-1 0.45, KLD 0.59); int8-static keeps it (0.88, 0.013)"]
    else:
        images = spec.options.get("samples", vision.CALIBRATION_IMAGES)  # the LLM default counts sequences
        feeds = vision.calibration_batches(source, exported, images)
        corrected = _quantize_static(fp32, target, feeds)
        info["post_quantization"] = ("QDQ int8: uint8 activations (MinMax ranges), int8 weights per channel, "
                                     f"{corrected} biases corrected for the weights' rounding")
        info["calibration"] = {"images": images, "what": "seeded random-resized crops of the sample photos"}
    vision.copy_settings(exported, out_dir)
    return info


def _quantize_static(fp32: Path, target: Path, feeds: list[dict]) -> int:
    """Returns how many biases were corrected."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgequant.backends._shared.bias_correction import correct_biases
    from edgequant.backends._shared.ort import FeedReader

    prepared = target.with_name("prepared.onnx")
    with engine_warnings_hidden():
        quant_pre_process(str(fp32), str(prepared))  # folds shapes and constants so more nodes take QDQ
        quantize_static(str(prepared), str(target), FeedReader(feeds), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax)
    corrected = correct_biases(target, prepared, feeds)  # `prepared` holds the float weights by the QDQ graph's names
    prepared.unlink()
    return corrected
