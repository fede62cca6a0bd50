"""OpenVINO sentence encoders: the shared float32 ONNX export read by OpenVINO's own converter, then
saved in float32 or float16, or quantized by NNCF's post-training quantization (weights and
activations int8, ranges calibrated on news sentences, never the evaluation texts), and run as a
compiled model on the CPU plugin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgequant.backends.openvino.signal_stack import kept_signal_stack
from edgequant.runner import TaskRunner
from edgequant.sources.tasks import SENTENCE_EMBEDDING

MODEL_FILE = "openvino_model.xml"
CALIBRATION_BATCHES = 20  # of 16 sentences: 320, about NNCF's default subset of 300


def convert_encoder(source, spec, out_dir: Path) -> dict:
    import openvino as ov

    from edgequant.backends._shared.encoder import MODEL_FILE as ONNX_FILE
    from edgequant.backends._shared.encoder import copy_runtime_files, float_encoder_onnx, refuse_options

    refuse_options(spec, (), source)
    exported = float_encoder_onnx(source)
    model = ov.convert_model(exported / ONNX_FILE)
    info: dict = {"model_file": MODEL_FILE, "task": SENTENCE_EMBEDDING}
    if spec.precision == "int8":
        model = _quantize(model, exported)
        info["post_quantization"] = ("NNCF quantize (transformer model type): int8 weights and activations, ranges "
                                     f"calibrated on {CALIBRATION_BATCHES} batches of 16 lee_background.cor sentences")
    ov.save_model(model, out_dir / MODEL_FILE, compress_to_fp16=spec.precision == "fp16")
    copy_runtime_files(exported, out_dir)
    return info


def _quantize(model, exported: Path):
    import nncf

    from edgequant.backends._shared.encoder import calibration_feeds
    from edgequant.progress import engine_stdout_to_stderr, engine_warnings_hidden

    feeds = calibration_feeds(exported, CALIBRATION_BATCHES)
    with engine_warnings_hidden(), engine_stdout_to_stderr():
        return nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(feeds))


class OpenVINOEncoderRunner(TaskRunner):
    task = SENTENCE_EMBEDDING

    def __init__(self, folder: Path, model_file: str, *, name: str, threads: int):
        import openvino as ov

        from edgequant.backends._shared.encoder import EncoderTokenizer

        self.name = name
        self._tokenizer = EncoderTokenizer.of_artifact(folder)
        with kept_signal_stack():  # it may load the CPU plugin
            self._model = ov.Core().compile_model(folder / model_file, "CPU", {"INFERENCE_NUM_THREADS": threads})
        self._request = self._model.create_infer_request()

    def token_count(self, batch) -> int:
        return self._tokenizer.count(batch)

    def run(self, batch) -> np.ndarray:
        result = self._request.infer(self._tokenizer(batch))
        return np.asarray(result[self._model.output(0)], dtype=np.float32)

    def close(self) -> None:
        with kept_signal_stack():  # the last compiled model may unload the CPU plugin
            self._request = self._model = None
