"""Runner for fixed-shape (QNN-style) ONNX models on the CPU execution provider.

The graph takes exactly `seq` tokens and has no KV cache. Causal attention means padding after
the real tokens cannot change their logits, so scoring pads to `seq` and keeps the first rows;
generation re-runs the window for each new token (slow on CPU, faithful to what the NPU runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgequant.runner import GenerateParams, Runner


class FixedShapeRunner(Runner):
    def __init__(self, folder: Path, model_file: str, *, seq: int, name: str, n_ctx: int, threads: int,
                 providers: list | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.name, self.n_ctx, self.seq = name, n_ctx, seq
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(folder / model_file), options, providers=providers or ["CPUExecutionProvider"])

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False, verbose=False).input_ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        if len(ids) > self.seq:
            raise ValueError(f"{len(ids)} tokens exceed the fixed sequence length {self.seq} of this graph")
        padded = np.zeros((1, self.seq), np.int64)
        padded[0, : len(ids)] = ids
        (logits,) = self._session.run(["logits"], {"input_ids": padded})
        return np.asarray(logits[0, : len(ids)], dtype=np.float32)

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        rng = np.random.default_rng(params.seed)
        ids = list(prompt_ids)
        eos = self._tokenizer.eos_token_id
        for _ in range(max(0, min(params.max_tokens, self.n_ctx - len(ids)))):
            token = _sample(self.logits(ids)[-1], params, rng)
            ids.append(token)
            yield token
            if params.stop_at_eos and token == eos:
                break

    def close(self) -> None:
        self._session = None


def _sample(row: np.ndarray, params: GenerateParams, rng) -> int:
    if params.temperature <= 0:
        return int(row.argmax())
    logits = row.astype(np.float64) / params.temperature
    order = np.argsort(-logits)
    if params.top_k:
        order = order[: params.top_k]
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    keep = np.searchsorted(np.cumsum(probs), params.top_p) + 1
    order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(rng.choice(order, p=probs))
