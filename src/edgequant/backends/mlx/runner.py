"""MLX runner: mlx decodes (a KV-cached loop) with mlx-lm's model definitions, loaded without the
rest of mlx-lm so neither transformers nor torch enters the process (see engine.py).

Quality figures are scored by MLX itself: its quantized matmul kernels on the artifact's packed
weights. Off Apple silicon, mlx[cpu] emulates float16 arithmetic and is many times slower in it
(128 tokens took 466 s here), so the float16 parameters (scales, biases, norms) are held as float32
in memory and activations are computed in float32; the quantized weights are unchanged.
`arithmetic()` says so wherever a figure is shown.

mlx[cpu]'s quantized matmul is a plain loop and its float products go through the reference BLAS
of its wheel: a 512-token window of the default model took ~79 s here. Where `blas.use_openblas()`
gives mlx numpy's OpenBLAS, passes of many tokens (scoring, prefill) multiply by each weight
dequantized with MLX's own `dequantize` instead (the same values the quantized kernel uses; logits
within float32 rounding, KLD ~1e-8 between the two on the default model), and two windows took
~10 s instead of ~90 s. Decoding one token keeps the quantized kernel. Each CPU stream of MLX runs
on a thread of its own, so windows are scored `threads` at a time, one per stream.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgequant.backends._shared.hf_tokenizer import HFTokenizerMixin
from edgequant.backends._shared.sampling import sample_token
from edgequant.backends.mlx.blas import use_openblas
from edgequant.backends.mlx.engine import is_apple_silicon, load_model, model_module
from edgequant.runner import GenerateParams, Runner

# Passes of at least this many tokens multiply by dequantized weights when mlx has a fast BLAS: a
# weight is dequantized once per pass, which one token's product does not pay back.
DEQUANTIZE_FROM_TOKENS = 16


class MLXRunner(HFTokenizerMixin, Runner):
    def __init__(self, folder: Path, *, name: str, n_ctx: int, model_type: str, threads: int = 1):
        self._blas = None if is_apple_silicon() else use_openblas()  # before mlx's first product
        import mlx.core as mx

        self.name, self.n_ctx, self._threads = name, n_ctx, max(threads, 1)
        self._streams: list | None = None  # made by the thread that scores (MLX streams are per thread)
        self._mx = mx
        self._model_type = model_type
        self._model = load_model(folder, model_type)
        self._load_hf_tokenizer(folder)
        if not is_apple_silicon():
            _compute_in_float32(self._model)
        if self._blas:
            _dequantize_long_passes(self._model)

    def arithmetic(self) -> str | None:
        if is_apple_silicon():
            return None
        kernels = ("its quantized weights dequantized by MLX, products through numpy's OpenBLAS" if self._blas
                   else "its quantized kernels")
        return (f"MLX on CPU with {kernels}, float32 activations and float parameters "
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


def _dequantize_long_passes(model) -> None:
    """Give the model's quantized layers the classes below (same state, another __call__)."""
    swaps = _layer_classes()
    for _, module in model.named_modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]


def _dequantized(layer):
    import mlx.core as mx

    return mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), group_size=layer.group_size,
                         bits=layer.bits, mode=layer.mode)


def _long(x) -> bool:
    return x.ndim >= 2 and x.shape[-2] >= DEQUANTIZE_FROM_TOKENS


@lru_cache(maxsize=1)
def _layer_classes() -> dict:
    """mlx's quantized layer classes -> subclasses that dequantize for passes of many tokens."""
    import mlx.nn as nn

    class DequantizingLinear(nn.QuantizedLinear):
        def __call__(self, x):
            if not _long(x):
                return super().__call__(x)
            y = x @ _dequantized(self).T
            return y + self["bias"] if "bias" in self else y

    class DequantizingEmbedding(nn.QuantizedEmbedding):
        def as_linear(self, x):  # tied LM head
            return x @ _dequantized(self).T if _long(x) else super().as_linear(x)

    return {nn.QuantizedLinear: DequantizingLinear, nn.QuantizedEmbedding: DequantizingEmbedding}


def _compute_in_float32(model) -> None:
    """Hold the float16 scales, biases and norms as float32 in memory (see the module docstring)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.float16 else p, model.parameters()))
    mx.eval(model.parameters())
