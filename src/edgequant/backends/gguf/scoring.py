"""Every position's logits from llama.cpp, a slice of rows at a time.

llama-cpp-python's `logits_all` keeps a (n_ctx x vocab) float32 array, and llama.cpp's own output
and compute buffers are sized by the batch: at a 262k vocabulary and 512 tokens that is three
0.5 GB buffers before the caller copies one. Here a context of its own decodes `rows` tokens per
`llama_decode`, every one of them an output, and hands each slice over as soon as it is decoded,
so memory grows with `rows x vocab`, not `n_ctx x vocab`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from edgequant.backends._shared.slices import rows_per_slice


class LogitScorer:
    def __init__(self, model, *, n_ctx: int, threads: int, lora=None):
        import llama_cpp

        self._ll = llama_cpp
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.rows = rows_per_slice(self.vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, self.rows, self.rows
        params.n_seq_max, params.no_perf = 1, True
        params.n_threads = params.n_threads_batch = threads
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a scoring context")
        if lora is not None:
            lora.apply(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.rows, 0, 1)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = n_ctx

    def slices(self, ids: Sequence[int]) -> Iterator[np.ndarray]:
        """(rows, vocab) float32 logits of consecutive slices of `ids` (row i predicts token i + 1),
        each a view of llama.cpp's output buffer, valid until the next slice is decoded."""
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        ll, batch = self._ll, self._batch
        ll.llama_memory_clear(self._memory, True)
        for start in range(0, len(ids), self.rows):
            chunk = ids[start:start + self.rows]
            for j, token in enumerate(chunk):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = token, start + j, 1, True
                batch.seq_id[j][0] = 0
            batch.n_tokens = len(chunk)
            rc = ll.llama_decode(self._ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            out = ll.llama_get_logits(self._ctx)
            yield np.ctypeslib.as_array(out, shape=(len(chunk), self.vocab))

    def close(self) -> None:
        if self._ctx:
            self._ll.llama_batch_free(self._batch)
            self._ll.llama_free(self._ctx)
            self._ctx = None
