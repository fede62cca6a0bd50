"""OpenVINO image classifiers: the shared float32 ONNX graph read by OpenVINO's own converter, saved
in float32 or float16, or quantized by NNCF (weights and activations int8, ranges calibrated on
views of the sample photos no evaluation uses), and run as a compiled model on the CPU plugin.

`max_drop` asks for NNCF's accuracy-controlled quantization instead: after quantizing everything,
NNCF returns the layers that cost the most to float, one group at a time, until the top-1
agreement with the float model on a held-out set of photo views has dropped by at most
`max_drop` (absolute). The held-out views are a third set, neither calibration nor evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgequant.backends._shared.vision import ArrayRunner
from edgequant.sources.tasks import IMAGE_CLASSIFICATION

MODEL_FILE = "openvino_model.xml"
VALIDATION_IMAGES = 96  # held-out views the accuracy control scores
# Groups NNCF may return to float before it stops. Unbounded, it kept reverting one operation at a
# time for minutes on EfficientNet-Lite0 at max_drop=0.01, where one flipped view of 96 is already
# past the bound and most flips are near-ties any rounding moves.
MAX_REVERT_STEPS = 12


def convert_vision(source, spec, out_dir: Path) -> dict:
    import openvino as ov

    from edgequant.backends._shared import vision
    from edgequant.backends.openvino.tools import inference_precision

    vision.refuse_options(spec, ("max_drop", "infer"), source)
    exported = vision.float_vision_onnx(source)
    model = ov.convert_model(exported / vision.MODEL_FILE)
    info: dict = {"model_file": MODEL_FILE, "task": IMAGE_CLASSIFICATION, **inference_precision(),
                  **({"inference_precision": spec.options["infer"]} if "infer" in spec.options else {})}
    if spec.precision == "int8":
        max_drop = spec.options.get("max_drop")
        model, info["post_quantization"] = _quantize(model, source, exported, max_drop)
        info["calibration"] = {"images": vision.CALIBRATION_IMAGES, "what": "seeded random-resized crops of the sample photos"}
    ov.save_model(model, out_dir / MODEL_FILE, compress_to_fp16=spec.precision == "fp16")
    vision.copy_settings(exported, out_dir)
    if spec.precision == "int8":
        from edgequant.backends.openvino.tools import weight_constant_types

        info["weight_constants"] = weight_constant_types(out_dir / MODEL_FILE)
    return info


def _quantize(model, source, exported: Path, max_drop: float | None):
    import nncf

    from edgequant.backends._shared.vision import calibration_batches
    from edgequant.progress import engine_stdout_to_stderr, engine_warnings_hidden

    feeds = [next(iter(f.values())) for f in calibration_batches(source, exported)]
    calibration = nncf.Dataset(feeds)
    with engine_warnings_hidden(), engine_stdout_to_stderr():
        if max_drop is None:
            return (nncf.quantize(model, calibration, subset_size=len(feeds)),
                    "NNCF quantize: int8 weights per channel and int8 activations, fast bias correction")
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        held_out = _held_out(source, exported)
        quantized = nncf.quantize_with_accuracy_control(
            model, calibration, nncf.Dataset(held_out, lambda item: item[0]), validation_fn=_top1_agreement,
            max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(feeds),
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(max_num_iterations=MAX_REVERT_STEPS))
    return quantized, (f"NNCF quantize_with_accuracy_control: int8, layers returned to float until top-1 agreement with "
                       f"fp32 on {VALIDATION_IMAGES} held-out photo views dropped by at most {max_drop}")


def _held_out(source, exported: Path) -> list[tuple[np.ndarray, int]]:
    """(image, the float model's class) pairs on views drawn after the calibration views."""
    import openvino as ov

    from edgequant.backends._shared.vision import CALIBRATION_IMAGES, MODEL_FILE
    from edgequant.measurement.imagedata import calibration_images

    images = calibration_images(source.image, CALIBRATION_IMAGES + VALIDATION_IMAGES)[CALIBRATION_IMAGES:]
    # In float32, as NNCF's accuracy control scores its candidates (bf16, the plugin's default on
    # CPUs with AVX512-BF16, alone moves the first class on about 5% of these views).
    compiled = ov.Core().compile_model(exported / MODEL_FILE, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    classes = np.asarray(compiled(images)[compiled.output(0)]).argmax(-1)
    return [(images[i:i + 1], int(classes[i])) for i in range(len(images))]


def _top1_agreement(compiled_model, items) -> tuple[float, list[float]]:
    """NNCF's validation function: the share of items whose class matches the float model's, and
    each item's own 0/1 (NNCF ranks layers by the items they change)."""
    output = compiled_model.output(0)
    hits = [float(np.asarray(compiled_model(image)[output]).argmax(-1)[0] == label) for image, label in items]
    return float(np.mean(hits)), hits


class OpenVINOVisionRunner(ArrayRunner):
    """A compiled model on the CPU plugin, in the precision `infer=` asks for (default: the plugin's
    own choice, bf16 on CPUs with AVX512-BF16 or AMX, which `arithmetic` then reports)."""

    def __init__(self, folder: Path, model_file: str, *, name: str, threads: int, infer: str = "auto"):
        import openvino as ov

        self.name = name
        config = {"INFERENCE_NUM_THREADS": threads} | ({"INFERENCE_PRECISION_HINT": infer} if infer != "auto" else {})
        self._model = ov.Core().compile_model(folder / model_file, "CPU", config)
        self._request = self._model.create_infer_request()

    def arithmetic(self) -> str | None:
        from edgequant.backends.openvino.tools import short_type_name

        computed = short_type_name(self._model.get_property("INFERENCE_PRECISION_HINT"))
        return None if computed == "f32" else f"{computed} (the OpenVINO CPU plugin's inference precision here; infer=f32 for float32)"

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self._request.infer([batch])[self._model.output(0)]

    def close(self) -> None:
        self._request = self._model = None
