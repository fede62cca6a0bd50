"""The baseline of an image classifier: the source's module in float32 run by PyTorch, or, for an
`.onnx` source (which has no module), the source graph itself on an onnxruntime CPU session."""

from __future__ import annotations

import numpy as np

from edgequant.backends._shared.vision import ArrayRunner


class TorchVisionRunner(ArrayRunner):
    def __init__(self, source, *, threads: int):
        import torch

        from edgequant.sources.vision import build_module

        torch.set_num_threads(threads)
        self._torch = torch
        self.name = f"pytorch:fp32 ({source.name})"
        self._model = build_module(source.config, source.path)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self._model(self._torch.from_numpy(batch)).float().numpy()

    def close(self) -> None:
        self._model = None


def open_vision_source(source, *, threads: int) -> ArrayRunner:
    if source.kind == "onnx":
        from edgequant.backends._shared.vision import MODEL_FILE, OrtVisionRunner, float_vision_onnx

        return OrtVisionRunner(float_vision_onnx(source), MODEL_FILE, name=f"onnx source fp32 ({source.name})", threads=threads)
    return TorchVisionRunner(source, threads=threads)
