"""Continuous batching on MLX: the server's batch decoder, built on mlx-lm's own `BatchGenerator`.

How the decoder contract maps onto the generator:

- `start(seq_id, ...)` inserts a greedy request (its prompt ids, its max_tokens) and keeps the
  generator's uid under `seq_id`. The generator holds at most n_seq requests and prefills one new
  prompt at a time as soon as a slot is free (prefill_batch_size 1: a prompt padded beside others
  would change its arithmetic, and a larger prefill batch waits until that many slots are free).
- `step()` is one generator step: every request in its batch gets one token (a new one its first,
  after its whole prompt is prefilled in that step). The generator ends a request itself at
  max_tokens and at the model's EOS ids, with that token in its output, so the worker ends it at
  the same token; should it end one the worker keeps, the decoder hands out EOS so the worker ends
  it rather than wait for a token that never comes.
- `finish(seq_id)` removes the request from the generator's batch.

The generator takes one sampler for its whole batch, so only greedy requests are batched. A
sampled request runs beside the batch on the runner's own decode loop (its own KV cache and
seeded rng), one token per step: the tokens it draws alone, without the batch's speed-up.

Two things differ from how mlx-lm itself runs the generator. Its model is the runner's (mlx-lm's
model files loaded as a private package, engine.py), whose `make_cache` makes that package's
KVCache, which the generator does not recognise: it is handed the model behind a wrapper without
`make_cache`, so it makes its own batched caches, which is exact for models whose every layer has
a plain KV cache (others are served one request at a time). And its `next()` runs on a stream made
when `mlx_lm.generate` was first imported, which belongs to the thread that imported it (MLX
streams are per thread; the server steps in a worker thread), so the decoder runs the step on the
stepping thread's default stream.

Importing `mlx_lm.generate` imports transformers and torch (11 s and some 400 MB of RSS here),
which engine.py otherwise keeps out of the process; a server that batches MLX pays that once.

Measured on the tiny test Llama (mlx:8bit, mlx[cpu], 2 shared cores): greedy text of 4 requests
decoded together is token for token the text of each alone (tests/test_batching_mlx.py). Through
the worker, 4 concurrent greedy requests of 200 tokens: 654 tokens/s decoded together against 394
one at a time (a single request alone: 152, its first steps weighing more in a short run).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from edgequant.backends._shared.adapter_switch import AdapterSwitch
from edgequant.runner import GenerateParams


def batchable(model) -> bool:
    """True where the generator's own batched KV caches are exact for `model`: every layer's cache a
    plain KVCache (no sliding window, no state-space layers), and the mlx-lm installed has one."""
    caches = model.make_cache() if hasattr(model, "make_cache") else [None] * len(model.layers)
    plain = all(c is None or type(c).__name__ == "KVCache" for c in caches)
    return plain and hasattr(_generate_module(), "BatchGenerator")


@dataclass
class _Solo:
    """A sampled request on the runner's own decode loop."""
    tokens: Iterator[int]


class MLXBatchDecoder:
    mixes_adapters = False  # the model computes with one adapter at a time

    def __init__(self, model, *, n_seq: int, n_ctx: int, stop_tokens: set[int],
                 solo: Callable[[Sequence[int], GenerateParams], Iterator[int]],
                 adapter: Callable[[str | None], None] = lambda name: None):
        """`solo(prompt_ids, params)`: the runner's own unbounded token stream, for sampled requests;
        `adapter(name)`: makes a request's adapter the model's, called only while no sequence runs."""
        if n_seq < 1:
            raise ValueError(f"a batch decoder needs n_seq >= 1, not {n_seq}")
        self.n_seq, self.n_ctx = n_seq, n_ctx
        self._stop = set(stop_tokens)
        self._solo, self._adapter = solo, AdapterSwitch(adapter)
        self._generator = _generate_module().BatchGenerator(
            _PlainCacheModel(model), stop_tokens=self._stop, completion_batch_size=n_seq, prefill_batch_size=1)
        self._uids: dict[int, int] = {}  # seq_id -> the generator's uid
        self._seq_of: dict[int, int] = {}  # uid -> seq_id
        self._ended: set[int] = set()  # seq_ids the generator is done with but the worker not yet
        self._solos: dict[int, _Solo] = {}

    def start(self, seq_id: int, prompt_ids: Sequence[int], params: GenerateParams) -> None:
        self.finish(seq_id)  # a slot reused before it was finished starts clean
        self._adapter.select(params.adapter, running=bool(self._uids or self._solos))
        if params.temperature > 0:
            self._solos[seq_id] = _Solo(self._solo(list(prompt_ids), params))
            return
        (uid,) = self._generator.insert([list(prompt_ids)], [params.max_tokens])
        self._uids[seq_id], self._seq_of[uid] = uid, seq_id

    def step(self) -> dict[int, int]:
        """One generator step for the greedy batch, one token for each sampled request."""
        sampled = {seq_id: next(solo.tokens) for seq_id, solo in self._solos.items()}
        for seq_id in self._ended:  # ended by the generator without the worker ending it (see the docstring)
            sampled[seq_id] = min(self._stop)
        if len(self._uids) > len(self._ended):
            for response in self._generator_step():
                seq_id = self._seq_of.get(response.uid)
                if seq_id is None:
                    continue  # finished by the worker in the meantime
                sampled[seq_id] = int(response.token)
                if response.finish_reason is not None:
                    self._ended.add(seq_id)
        return sampled

    def finish(self, seq_id: int) -> None:
        self._solos.pop(seq_id, None)
        uid = self._uids.pop(seq_id, None)
        if uid is not None:
            self._seq_of.pop(uid, None)
            if seq_id in self._ended:
                self._ended.discard(seq_id)  # already out of the generator's batch
            else:
                self._generator.remove([uid])

    def close(self) -> None:
        for seq_id in list(self._uids) + list(self._solos):
            self.finish(seq_id)
        if self._generator is not None:
            self._generator.close()
            self._generator = None

    def _generator_step(self) -> list:
        """The generator's step on this thread's default stream (its own `next()` uses a stream of
        the thread that imported mlx_lm.generate)."""
        import mlx.core as mx

        with mx.stream(mx.default_stream(mx.default_device())):
            return self._generator._next()


class _PlainCacheModel:
    """The runner's model without its `make_cache`, so the generator makes its own batched caches."""

    def __init__(self, model):
        self._model, self.layers = model, model.layers

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)


def _generate_module():
    """mlx-lm's generate module (`mlx_lm.generate` the attribute is its function of that name)."""
    importlib.import_module("mlx_lm.generate")
    return sys.modules["mlx_lm.generate"]
