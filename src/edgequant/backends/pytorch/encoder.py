"""The baseline of a sentence encoder: the source's encoder in float32 with its pooling, run by
PyTorch, tokenized by the same `EncoderTokenizer` every exported encoder uses."""

from __future__ import annotations

import numpy as np

from edgequant.runner import TaskRunner
from edgequant.sources.tasks import SENTENCE_EMBEDDING


class TorchEncoderRunner(TaskRunner):
    task = SENTENCE_EMBEDDING

    def __init__(self, source, *, threads: int):
        import torch

        from edgequant.backends._shared.encoder import EncoderTokenizer, pooled_encoder

        torch.set_num_threads(threads)
        self._torch = torch
        self.name = f"pytorch:fp32 ({source.name})"
        self._tokenizer = EncoderTokenizer(source.hf_dir / "tokenizer.json", source.encoder.max_tokens)
        self._model = pooled_encoder(source.hf_dir, source.encoder)

    def token_count(self, batch) -> int:
        return self._tokenizer.count(batch)

    def run(self, batch) -> np.ndarray:
        torch = self._torch
        feeds = {name: torch.from_numpy(values) for name, values in self._tokenizer(batch).items()}
        with torch.inference_mode():
            return self._model(**feeds).float().numpy()

    def close(self) -> None:
        self._model = None
