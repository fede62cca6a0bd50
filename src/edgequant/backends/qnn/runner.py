"""Runners for QNN-style ONNX models on the CPU execution provider: one fixed-window graph, or
prompt and decode graphs with an explicit KV cache.

The fixed graph takes exactly `seq` tokens and has no KV cache. Causal attention means padding after
the real tokens cannot change their logits, so scoring pads to `seq` and keeps the first rows;
generation re-runs the window for each new token (slow on CPU, faithful to what the NPU runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgequant.backends._shared.hf_tokenizer import HFTokenizerMixin
from edgequant.backends._shared.sampling import sample_token
from edgequant.runner import GenerateParams, Runner


class FixedShapeRunner(HFTokenizerMixin, Runner):
    def __init__(self, folder: Path, model_file: str, *, seq: int, name: str, n_ctx: int, threads: int,
                 htp: bool = False):
        self.name, self.n_ctx, self.seq = name, n_ctx, seq
        self._load_hf_tokenizer(folder)
        if htp:  # the simulated Qualcomm HTP (needs onnxruntime-qnn); the options name the provider
            import onnxruntime as ort

            from edgequant.backends.qnn.tools import htp_session_options

            self._session = ort.InferenceSession(str(folder / model_file), htp_session_options(threads))
        else:
            from edgequant.backends._shared.ort import cpu_session

            self._session = cpu_session(folder / model_file, threads)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        if len(ids) > self.seq:
            raise ValueError(f"{len(ids)} tokens exceed the fixed sequence length {self.seq} of this graph")
        padded = np.zeros((1, self.seq), np.int64)
        padded[0, : len(ids)] = ids
        (logits,) = self._session.run(["logits"], {"input_ids": padded})
        return np.asarray(logits[0, : len(ids)], dtype=np.float32)

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        return self.bounded(prompt_ids, params, self._stream(prompt_ids, params))

    def _stream(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        rng = np.random.default_rng(params.seed)
        ids = list(prompt_ids)
        while True:
            token = sample_token(self.logits(ids)[-1], params, rng)
            ids.append(token)
            yield token

    def batch_decoder(self, n_seq: int, n_ctx: int):
        """Fair interleaving of the batch-1 window graph: one window run per sequence per step."""
        from edgequant.backends.qnn.interleave import InterleavedWindowDecoder

        return InterleavedWindowDecoder(self.logits, n_seq=n_seq, n_ctx=n_ctx, seq_ctx=self.n_ctx,
                                        window=self.seq, eos_id=_eos_id(self))

    def close(self) -> None:
        self._session = None


class KVRunner(HFTokenizerMixin, Runner):
    """Prompt and decode graphs with an explicit KV cache (see kv.py): scoring prefills in chunks
    of the prompt graph's size; generation then runs the decode graph one token per step."""

    def __init__(self, folder: Path, *, name: str, n_ctx: int, threads: int):
        from edgequant.backends._shared.ort import cpu_session
        from edgequant.backends.qnn.kv import DECODE_FILE, PROMPT_FILE

        self.name, self._folder = name, folder
        self._load_hf_tokenizer(folder)
        prompt, decode = cpu_session(folder / PROMPT_FILE, threads), cpu_session(folder / DECODE_FILE, threads)
        # Held as plain callables: a graph call carries its whole state in its feed, so every
        # KVCache over them (the batch decoder makes one per sequence) shares the two sessions.
        self._graphs = (lambda feed: prompt.run(None, feed), lambda feed: decode.run(None, feed))
        self._cache = self._new_cache()
        self.n_ctx = min(n_ctx, self._cache.layout["ctx"])

    def _new_cache(self):
        from edgequant.backends.qnn.kv import KVCache

        return KVCache(self._folder, *self._graphs)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self._cache.prefill(list(ids))

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        return self.bounded(prompt_ids, params, self._stream(prompt_ids, params))

    def _stream(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        rng = np.random.default_rng(params.seed)
        logits = self._cache.prefill(list(prompt_ids))[-1]
        while True:
            token = sample_token(logits, params, rng)
            yield token
            logits = self._cache.step([token], "decode")[-1]

    def batch_decoder(self, n_seq: int, n_ctx: int):
        """Fair interleaving over the batch-1 graphs (interleave.py): each sequence its own cache,
        one prompt chunk or one decode step per sequence per step."""
        from edgequant.backends.qnn.interleave import InterleavedKVDecoder

        return InterleavedKVDecoder(self._new_cache, n_seq=n_seq, n_ctx=n_ctx, seq_ctx=self.n_ctx, eos_id=_eos_id(self))

    def close(self) -> None:
        self._cache = self._graphs = None


def _eos_id(runner: HFTokenizerMixin) -> int | None:
    """One end-of-generation id, handed to a sequence that runs out of context so the worker ends it."""
    return min(runner._eos_ids) if runner._eos_ids else None
