"""MLX runner: mlx decodes (a KV-cached loop) with mlx-lm's model definitions, loaded without the
rest of mlx-lm so neither transformers nor torch enters the process (see engine.py).

Off Apple silicon, mlx[cpu] emulates float16 arithmetic and is many times slower in it (128 tokens
took 466 s here), so the float16 parameters (scales, biases, norms) are held as float32 in memory
and activations are computed in float32; the quantized weights are the artifact's, unchanged.
Logits for quality come from MLX on Apple silicon and, elsewhere, from the same dequantized
weights in PyTorch (torch_scoring.py: MLX itself takes 47 s per 512-token window here).
`arithmetic()` names what the quality figures were computed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgequant.backends._shared.hf_tokenizer import HFTokenizerMixin
from edgequant.backends._shared.sampling import sample_token
from edgequant.backends.mlx.engine import is_apple_silicon, load_model, model_module
from edgequant.runner import GenerateParams, Runner


class MLXRunner(HFTokenizerMixin, Runner):
    def __init__(self, folder: Path, *, name: str, n_ctx: int, model_type: str):
        import mlx.core as mx

        self.name, self.n_ctx = name, n_ctx
        self._mx = mx
        self._model_type = model_type
        self._folder = folder
        self._torch_model = None
        self._model = load_model(folder, model_type)
        self._load_hf_tokenizer(folder)
        if not is_apple_silicon():
            _compute_in_float32(self._model)

    def arithmetic(self) -> str:
        if is_apple_silicon():
            return "MLX on Apple silicon: its quantized kernels, float16 activations"
        return ("PyTorch float32 on the MLX weights as mx.dequantize expands them (MLX's float32 pass gives the same "
                "logits); the float16 activations MLX uses on Apple silicon are not included")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        if not is_apple_silicon():
            return self._torch_logits(ids)
        return self.mlx_logits(ids)

    def mlx_logits(self, ids: Sequence[int]) -> np.ndarray:
        """One causal pass of MLX itself over `ids` (no cache)."""
        mx = self._mx
        out = self._model(mx.array([list(ids)]))
        return np.array(out[0].astype(mx.float32), dtype=np.float32, copy=True)

    def _torch_logits(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        from edgequant.backends.mlx.torch_scoring import dequantized_torch_model

        if self._torch_model is None:
            self._torch_model = dequantized_torch_model(self._model, self._folder)
        with torch.inference_mode():
            out = self._torch_model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        """A KV-cached decode loop on the calling thread's default stream (MLX streams belong to
        the thread that made them, and the server decodes in a worker thread)."""
        mx = self._mx
        budget = min(params.max_tokens, self.n_ctx - len(prompt_ids))
        if budget <= 0:
            return
        rng = np.random.default_rng(params.seed)
        cache = model_module("cache").make_prompt_cache(self._model)
        inputs = mx.array([list(prompt_ids)])
        for _ in range(budget):
            row = self._model(inputs, cache=cache)[0, -1]
            token = sample_token(np.array(row.astype(mx.float32)), params, rng)
            yield token
            if params.stop_at_eos and token in self._eos_ids:
                return
            inputs = mx.array([[token]])

    def close(self) -> None:
        self._model = self._torch_model = None


def _compute_in_float32(model) -> None:
    """Hold the float16 scales, biases and norms as float32 in memory (see the module docstring)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.float16 else p, model.parameters()))
    mx.eval(model.parameters())
