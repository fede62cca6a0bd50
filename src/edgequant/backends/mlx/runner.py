"""MLX runner: mlx decodes (a KV-cached loop) with mlx-lm's model definitions, loaded without the
rest of mlx-lm so neither transformers nor torch enters the process (see engine.py).

Quality figures are scored by MLX itself: its quantized matmul kernels on the artifact's packed
weights. Off Apple silicon, mlx[cpu] emulates float16 arithmetic and is many times slower in it
(128 tokens took 466 s here), so the float16 parameters (scales, biases, norms) are held as float32
in memory and activations are computed in float32; the quantized weights are unchanged.
`arithmetic()` says so wherever a figure is shown. mlx[cpu] runs its matmuls on one thread without
BLAS (a 512-token window of the default model took ~79 s on one thread here, against under a
second for the same weights in PyTorch): slow, but the figure is MLX's, not an emulation's. Each CPU stream
of MLX runs on a thread of its own, so windows are scored `threads` at a time, one per stream.
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
    def __init__(self, folder: Path, *, name: str, n_ctx: int, model_type: str, threads: int = 1):
        import mlx.core as mx

        self.name, self.n_ctx, self._threads = name, n_ctx, max(threads, 1)
        self._streams: list | None = None  # made by the thread that scores (MLX streams are per thread)
        self._mx = mx
        self._model_type = model_type
        self._model = load_model(folder, model_type)
        self._load_hf_tokenizer(folder)
        if not is_apple_silicon():
            _compute_in_float32(self._model)

    def arithmetic(self) -> str | None:
        if is_apple_silicon():
            return None
        return ("MLX on CPU with its quantized kernels, float32 activations and float parameters "
                "(Apple silicon computes in float16, which this figure does not include)")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """One causal pass of MLX over `ids` (no cache)."""
        return next(next(self.logits_of_windows([ids])))

    def logits_of_windows(self, windows: Sequence[Sequence[int]]) -> Iterator[Iterator[np.ndarray]]:
        """Off Apple silicon, `threads` windows at a time, each on a CPU stream of its own (one
        thread each); on Apple silicon one after another, on the default device."""
        mx = self._mx
        streams = [mx.default_stream(mx.default_device())] if is_apple_silicon() else self._cpu_streams()
        for start in range(0, len(windows), len(streams)):
            pending = []
            for ids, stream in zip(windows[start:start + len(streams)], streams):
                if len(ids) > self.n_ctx:
                    raise ValueError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
                with mx.stream(stream):
                    pending.append(self._model(mx.array([list(ids)]))[0].astype(mx.float32))
            mx.eval(*pending)
            for k in range(len(pending)):
                out, pending[k] = pending[k], None  # each window's array is freed once drawn
                yield iter((np.array(out, dtype=np.float32, copy=True),))

    def _cpu_streams(self) -> list:
        if self._streams is None:
            self._streams = [self._mx.new_stream(self._mx.cpu) for _ in range(self._threads)]
        return self._streams

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
        self._model = None


def _compute_in_float32(model) -> None:
    """Hold the float16 scales, biases and norms as float32 in memory (see the module docstring)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.float16 else p, model.parameters()))
    mx.eval(model.parameters())
