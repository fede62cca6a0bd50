"""Image classifiers: the float32 ONNX graph every format starts from (ONNX, OpenVINO and QNN each
quantize it their own way), made once per source, and what their artifacts carry.

A module source is exported by PyTorch's TorchScript exporter with a dynamic batch; an `.onnx`
source is its own float graph. Either way the folder holds `model.onnx` and `vision.json` (the
input and output names and the preprocessing), and runners take preprocessed images
(n, 3, size, size) float32, so no runner decodes photos or needs torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edgequant.errors import EdgequantError
from edgequant.progress import engine_warnings_hidden
from edgequant.runner import TaskRunner
from edgequant.sources.tasks import IMAGE_CLASSIFICATION

MODEL_FILE = "model.onnx"
SETTINGS_FILE = "vision.json"
INPUT, OUTPUT = "pixel_values", "logits"  # the names an exported module's graph gets
_OPSET = 17
CALIBRATION_IMAGES = 96  # views of the sample photos; NNCF's own default subset is 300 samples


def float_vision_onnx(source) -> Path:
    """The cached folder holding the float32 graph and `vision.json`."""
    from edgequant.backends._shared.intermediates import cached_intermediate

    return cached_intermediate(source, "vision-onnx", MODEL_FILE, lambda tmp: _export(source, tmp),
                               f"exporting {source.name} to a float32 ONNX graph")


def settings(folder: Path) -> dict:
    return json.loads((folder / SETTINGS_FILE).read_text())


def copy_settings(folder: Path, out_dir: Path) -> None:
    shutil.copyfile(folder / SETTINGS_FILE, out_dir / SETTINGS_FILE)


def refuse_options(spec, allowed: tuple[str, ...], source) -> None:
    """A spec option the image path does not read is refused, never silently ignored."""
    given = sorted(set(spec.options) - set(allowed))
    if given:
        raise EdgequantError(f"option {given[0]} of {spec} does not apply to the image classifier {source.name}",
                             f"drop {given[0]}=" + (f" (an image classifier takes {', '.join(allowed)})" if allowed else ""))


def calibration_batches(source, folder: Path, images: int = CALIBRATION_IMAGES, batch: int = 8) -> list[dict]:
    """Calibration inputs as feeds of the graph's input: views of the photos no evaluation uses."""
    from edgequant.measurement.imagedata import calibration_images

    rows = calibration_images(source.image, images)
    name = settings(folder)["input"]
    return [{name: rows[i:i + batch]} for i in range(0, len(rows), batch)]


class ArrayRunner(TaskRunner):
    """An image classifier on any engine that maps the input array to the output array; subclasses
    give `_infer(batch) -> logits`."""

    task = IMAGE_CLASSIFICATION

    def run(self, batch) -> np.ndarray:
        return np.asarray(self._infer(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OrtVisionRunner(ArrayRunner):
    """An onnxruntime CPU session on an image classifier's graph (the ONNX format's runner)."""

    def __init__(self, folder: Path, model_file: str, *, name: str, threads: int):
        from edgequant.backends._shared.ort import cpu_session

        self.name = name
        found = settings(folder)
        self._input, self._output = found["input"], found["output"]
        self._session = cpu_session(folder / model_file, threads)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run([self._output], {self._input: batch})[0]

    def close(self) -> None:
        self._session = None


def _export(source, out: Path) -> None:
    if source.kind == "onnx":
        graph = source.onnx_graph
        shutil.copyfile(source.path, out / MODEL_FILE)
        names = (next(iter(graph.inputs)), next(iter(graph.outputs)))
    else:
        import torch

        from edgequant.sources.vision import build_module

        model = build_module(source.config, source.path)
        size = source.image.size
        # Modules are exported as built: never call a family's `set_swish` here, which would swap
        # EfficientNet-Lite's ReLU6 for swish and change the model.
        with torch.no_grad(), engine_warnings_hidden():
            torch.onnx.export(model, (torch.zeros(2, 3, size, size),), str(out / MODEL_FILE), dynamo=False,
                              input_names=[INPUT], output_names=[OUTPUT], opset_version=_OPSET,
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        names = (INPUT, OUTPUT)
    (out / SETTINGS_FILE).write_text(json.dumps({"task": IMAGE_CLASSIFICATION, "input": names[0], "output": names[1],
                                                 "image": source.image.to_json()}, indent=2))

