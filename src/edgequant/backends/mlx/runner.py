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
~10 s instead of ~90 s. Decoding one token keeps the quantized kernel. Scoring then runs the model
up to its output layer and the output layer on a slice of rows at a time, so a large vocabulary's
logits and float32 output weight are never whole in memory (`logit_slices`). Without OpenBLAS each
CPU stream of MLX runs on a thread of its own, so windows are scored `threads` at a time.
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
    def __init__(self, folder: Path, *, name: str, n_ctx: int, model_type: str, threads: int = 1,
                 adapter: Path | None = None, adapters: dict[str, Path | None] | None = None):
        """`adapter`: an mlx-lm adapters.safetensors applied to the model as it loads (lora.py); the
        batch decoder then decodes the same adapted model. `adapters`: for a base several artifacts
        share, each one's adapter (None: the base alone) by served name, the one a request names
        made active for it (`GenerateParams.adapter`)."""
        self._blas = None if is_apple_silicon() else use_openblas()  # what the import hook set up (blas.py)
        import mlx.core as mx

        self.name, self.n_ctx, self._threads = name, n_ctx, max(threads, 1)
        self._streams: list | None = None  # made by the thread that scores (MLX streams are per thread)
        self._mx = mx
        self._model_type = model_type
        self._model = load_model(folder, model_type)
        self._adapter_names = {None, *(adapters or {})}
        self._activate = lambda name: None
        if adapter is not None or adapters:
            from edgequant.backends.mlx.lora import apply_adapters

            self._activate = apply_adapters(self._model, {None: adapter, **(adapters or {})})
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
        return np.concatenate(list(next(self.logits_of_windows([ids]))))

    def logits_of_windows(self, windows: Sequence[Sequence[int]]) -> Iterator[Iterator[np.ndarray]]:
        """With numpy's OpenBLAS (which uses every core), one window at a time, handed over a slice
        of rows at a time (`logit_slices`). Otherwise, off Apple silicon, `threads` windows at a
        time, each on a CPU stream of its own (one thread each); on Apple silicon one after another,
        on the default device."""
        if self._blas and self._split_head() is not None:
            for ids in windows:
                yield self.logit_slices(ids)
            return
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

    def logit_slices(self, ids: Sequence[int]) -> Iterator[np.ndarray]:
        """The final hidden states of the window, then the output layer on `rows_per_slice` rows at
        a time, its weight dequantized a block of vocabulary rows at a time: a 262k vocabulary's
        output layer in float32 is 0.7 GB and one window's logits 0.5 GB, neither of which is ever
        whole here."""
        from edgequant.backends._shared.slices import rows_per_slice

        mx = self._mx
        body, head = self._split_head()
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        hidden = body(mx.array([list(ids)]))
        mx.eval(hidden)
        rows = rows_per_slice(self.vocab_size())
        for start in range(0, len(ids), rows):
            block = head(hidden[:, start:start + rows])[0].astype(mx.float32)
            mx.eval(block)
            yield np.array(block, dtype=np.float32, copy=True)

    def _split_head(self):
        """(the model without its output layer, the output layer by vocabulary blocks) where the
        model's logits are exactly that composition (checked once on a few tokens against the whole
        model, so an architecture that does more after its output layer is scored whole); else None."""
        if not hasattr(self, "_split"):
            self._split = None
            body, layer = getattr(self._model, "model", None), _output_layer(self._model)
            if body is not None and layer is not None:
                mx = self._mx
                # fewer tokens than DEQUANTIZE_FROM_TOKENS: the whole model runs on mlx's quantized
                # kernels, so no whole float32 output weight is made (0.7 GB at 262k tokens)
                probe = mx.array([list(range(1, DEQUANTIZE_FROM_TOKENS // 2))])
                whole, split = self._model(probe), _blockwise_output(layer)(body(probe))
                scale = float(mx.abs(whole).max()) + 1.0
                if whole.shape == split.shape and float(mx.abs(whole - split).max()) <= 1e-4 * scale:
                    self._split = (body, _blockwise_output(layer))
        return self._split

    def vocab_size(self) -> int:
        return int(_output_layer(self._model)["weight"].shape[0])

    def _cpu_streams(self) -> list:
        if self._streams is None:
            self._streams = [self._mx.new_stream(self._mx.cpu) for _ in range(self._threads)]
        return self._streams

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        return self.bounded(prompt_ids, params, self._stream(prompt_ids, params))

    def _stream(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        """A KV-cached decode loop on the calling thread's default stream (MLX streams belong to
        the thread that made them, and the server decodes in a worker thread)."""
        mx = self._mx
        self.use_adapter(params.adapter)
        rng = np.random.default_rng(params.seed)
        cache = model_module("cache").make_prompt_cache(self._model)
        inputs = mx.array([list(prompt_ids)])
        while True:
            row = self._model(inputs, cache=cache)[0, -1]
            token = sample_token(np.array(row.astype(mx.float32)), params, rng)
            yield token
            inputs = mx.array([[token]])

    def batch_decoder(self, n_seq: int, n_ctx: int):
        """mlx-lm's BatchGenerator for greedy requests (batch.py); None where its batched caches would
        not be exact for this model, which the server then serves one request at a time."""
        from edgequant.backends.mlx.batch import MLXBatchDecoder, batchable

        if not batchable(self._model):
            return None
        return MLXBatchDecoder(self._model, n_seq=n_seq, n_ctx=n_ctx, stop_tokens=self._eos_ids, solo=self._stream,
                               adapter=self.use_adapter)

    def use_adapter(self, name: str | None) -> None:
        """Make the adapter a request names the model's (between requests, never within one)."""
        if name not in self._adapter_names:
            raise ValueError(f"{self.name} has no adapter named {name!r}")
        self._activate(name)

    def close(self) -> None:
        self._model = None


def _dequantize_long_passes(model) -> None:
    """Give the model's quantized layers the classes below (same state, another __call__)."""
    swaps = _layer_classes()
    for _, module in model.named_modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]


# Vocabulary rows of the output layer dequantized at once: 64 MiB of float32.
OUTPUT_BLOCK_BYTES = 64 << 20


def _output_layer(model):
    """The module whose weight makes the logits: mlx-lm's `lm_head`, or the token embedding when
    the two are tied (mlx-lm drops lm_head then)."""
    if "lm_head" in model:
        return model["lm_head"]
    body = getattr(model, "model", None)
    return body["embed_tokens"] if body is not None and "embed_tokens" in body else None


def _blockwise_output(layer):
    """rows -> logits through `layer`'s weight, dequantized (if quantized) a block of vocabulary
    rows at a time; the same products as the whole matrix, in float32."""
    import mlx.core as mx

    vocab = layer["weight"].shape[0]
    width = layer["scales"].shape[1] * layer.group_size if "scales" in layer else layer["weight"].shape[1]
    block = max(OUTPUT_BLOCK_BYTES // (4 * width), 1)

    def weight(start: int):
        if "scales" not in layer:
            return layer["weight"][start:start + block]
        return mx.dequantize(layer["weight"][start:start + block], layer["scales"][start:start + block],
                             None if layer.get("biases") is None else layer["biases"][start:start + block],
                             group_size=layer.group_size, bits=layer.bits, mode=layer.mode)

    def output(x):
        parts = []
        for start in range(0, vocab, block):
            parts.append(x @ weight(start).T)
            mx.eval(parts[-1])  # block by block: left lazy, mlx dequantized every block before multiplying
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
        return y + layer["bias"] if "bias" in layer else y

    return output


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
