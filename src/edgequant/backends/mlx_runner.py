"""MLX runner through mlx-lm: one forward pass for logits, `generate_step` for decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgequant.runner import GenerateParams, Runner


class MLXRunner(Runner):
    def __init__(self, folder: Path, *, name: str, n_ctx: int):
        import mlx.core as mx
        from mlx_lm import load

        self.name, self.n_ctx = name, n_ctx
        self._mx = mx
        self._model, self._tokenizer = load(str(folder))
        self._eos = set(self._tokenizer.eos_token_ids or [])

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        mx = self._mx
        out = self._model(mx.array([list(ids)]))  # no cache: a fresh causal pass per window
        return np.array(out[0].astype(mx.float32), dtype=np.float32, copy=True)

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        budget = min(params.max_tokens, self.n_ctx - len(prompt_ids))
        if budget <= 0:
            return
        self._mx.random.seed(params.seed)
        sampler = make_sampler(temp=params.temperature, top_p=params.top_p if params.top_p < 1.0 else 0.0, top_k=params.top_k)
        steps = generate_step(self._mx.array(list(prompt_ids)), self._model, max_tokens=budget, sampler=sampler)
        for token, _logprobs in steps:
            token = int(token)
            yield token
            if params.stop_at_eos and token in self._eos:
                return

    def close(self) -> None:
        self._model = self._tokenizer = None
