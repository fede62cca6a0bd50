"""The server's batch decoder for QNN artifacts: fair interleaving of batch-1 graphs.

A QNN artifact is fixed-shape graphs of batch 1, as the Hexagon NPU runs them: the HTP cannot put
two sequences in one graph call, so "batching" here cannot read the weights once for several
requests. What the decoder gives the server is fairness: every `step()` advances each active
sequence by one unit of work, so requests share the engine turn by turn instead of queueing behind
one another, and a long prompt never stalls running streams for more than one chunk.

- KV graphs (`InterleavedKVDecoder`): each sequence owns a `KVCache` (kv.py) of the layout's
  context, over the runner's two onnxruntime sessions (shared: a graph call carries its whole state
  in its feed). A unit is one prompt chunk (the prompt graph's size) while a sequence prefills, or
  one decode step once it generates. A sequence yields its first token when its last chunk has
  run, then one token per decode step. A last chunk the prompt graph cannot take (a context that is
  not a multiple of its size) goes through the decode graph a token at a time, as one unit.
- Fixed window (`InterleavedWindowDecoder`): no cache; a unit is one window run over the
  sequence's ids so far, which yields a token every step.

Sampling is the runners' own (`sample_token`, one rng seeded per request), so a sequence draws the
tokens the runner's `generate` draws, greedy or seeded, whatever shares its steps. Each sequence's
cache holds its own context, so the decoder's `n_ctx` is at most n_seq times the runner's context.
A sequence that runs out of room (only when a caller asks for more than the context holds; the
server caps max_tokens by the room left) is handed the model's EOS id, so the worker ends it.

Measured on the tiny test Llama (qnn:w8a16 at ar=16, ctx=128; graphs=fixed at seq=64; the CPU
execution provider on 2 shared cores): greedy text of 4 requests interleaved is token for token
the text of each alone, and a short request admitted behind an 8-chunk prompt gets all its tokens
before that prompt's first (tests/test_batching_qnn.py). Through the worker, 4 concurrent requests
of 108 tokens: KV graphs 1,384 tokens/s interleaved against 640 one at a time (628 for a single
request); the fixed window 103 against 116. The KV gain is overhead, not arithmetic: a tiny
model's graph call takes about a millisecond, so the worker's per-token Python (detokenizing,
handing deltas to the event loop) weighs as much, and runs of back-to-back graph calls amortize
it. On a real model the graph call dominates, and interleaving should give the throughput of one
stream, shared fairly; the fixed window already shows that (one window run per token either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from edgequant.backends._shared.sampling import sample_token
from edgequant.runner import GenerateParams


@dataclass
class _KVSequence:
    cache: object  # kv.KVCache, the slot's own (reset per request)
    params: GenerateParams
    rng: np.random.Generator
    pending: list[int] = field(default_factory=list)  # prompt ids not yet through the graphs
    last: int | None = None  # the token sampled last, not yet run through the decode graph


class InterleavedKVDecoder:
    def __init__(self, new_cache: Callable[[], object], *, n_seq: int, n_ctx: int, seq_ctx: int, eos_id: int | None):
        """`new_cache()`: a fresh KVCache over the runner's sessions; `seq_ctx`: the runner's context."""
        if n_seq < 1:
            raise ValueError(f"a batch decoder needs n_seq >= 1, not {n_seq}")
        self.n_seq, self.n_ctx = n_seq, min(n_ctx, n_seq * seq_ctx)
        self._new_cache, self._eos_id = new_cache, eos_id
        self._caches: dict[int, object] = {}  # one per slot, kept across requests (~47 MB on the default model)
        self._seqs: dict[int, _KVSequence] = {}

    def start(self, seq_id: int, prompt_ids: Sequence[int], params: GenerateParams) -> None:
        if seq_id not in self._caches:
            self._caches[seq_id] = self._new_cache()
        cache = self._caches[seq_id]
        cache.reset()
        self._seqs[seq_id] = _KVSequence(cache, params, np.random.default_rng(params.seed), list(prompt_ids))

    def step(self) -> dict[int, int]:
        """One unit of work for every active sequence; the tokens of those that sampled one."""
        sampled = {}
        for seq_id, seq in self._seqs.items():
            token = self._advance(seq)
            if token is not None:
                sampled[seq_id] = token
        return sampled

    def finish(self, seq_id: int) -> None:
        self._seqs.pop(seq_id, None)  # the slot's cache stays for its next request

    def close(self) -> None:
        self._seqs.clear()
        self._caches.clear()

    def _advance(self, seq: _KVSequence) -> int | None:
        cache = seq.cache
        if seq.pending:
            chunk, seq.pending = seq.pending[:cache.chunk], seq.pending[cache.chunk:]
            if cache.position + len(chunk) > cache.layout["ctx"]:  # a prompt longer than the context
                seq.pending = []
                return self._out_of_room()
            logits = _prefill_chunk(cache, chunk)
            if seq.pending:
                return None  # still prefilling: no token this step
        elif seq.last is None or cache.position > cache.layout["ctx"] - 1:  # empty prompt, or the decode graph's past is full
            return self._out_of_room()
        else:
            logits = cache.step([seq.last], "decode")[-1]
        seq.last = sample_token(logits, seq.params, seq.rng)
        return seq.last

    def _out_of_room(self) -> int:
        if self._eos_id is None:
            raise RuntimeError("a sequence ran out of context and the model has no EOS id to end it with")
        return self._eos_id


def _prefill_chunk(cache, chunk: list[int]) -> np.ndarray:
    """The last row of `chunk`'s logits, through the prompt graph where its past has room."""
    if cache.position <= cache.layout["ctx"] - cache.chunk:
        return cache.step(chunk, "prompt")[-1]
    for token in chunk:  # a tail past the prompt graph's reach: the decode graph takes it a token at a time
        logits = cache.step([token], "decode")
    return logits[-1]


@dataclass
class _WindowSequence:
    ids: list[int]
    params: GenerateParams
    rng: np.random.Generator


class InterleavedWindowDecoder:
    def __init__(self, window_logits: Callable[[list[int]], np.ndarray], *, n_seq: int, n_ctx: int, seq_ctx: int,
                 window: int, eos_id: int | None):
        """`window_logits(ids)`: the fixed graph's logits for `ids` (at most `window` of them)."""
        if n_seq < 1:
            raise ValueError(f"a batch decoder needs n_seq >= 1, not {n_seq}")
        self.n_seq, self.n_ctx = n_seq, min(n_ctx, n_seq * seq_ctx)
        self._logits, self._window, self._eos_id = window_logits, window, eos_id
        self._seqs: dict[int, _WindowSequence] = {}

    def start(self, seq_id: int, prompt_ids: Sequence[int], params: GenerateParams) -> None:
        self._seqs[seq_id] = _WindowSequence(list(prompt_ids), params, np.random.default_rng(params.seed))

    def step(self) -> dict[int, int]:
        """One window run for every active sequence, each yielding its next token."""
        return {seq_id: self._advance(seq) for seq_id, seq in self._seqs.items()}

    def finish(self, seq_id: int) -> None:
        self._seqs.pop(seq_id, None)

    def close(self) -> None:
        self._seqs.clear()

    def _advance(self, seq: _WindowSequence) -> int:
        if not seq.ids or len(seq.ids) > self._window:  # nothing to continue from, or past the window
            if self._eos_id is None:
                raise RuntimeError("a sequence ran out of context and the model has no EOS id to end it with")
            return self._eos_id
        token = sample_token(self._logits(seq.ids)[-1], seq.params, seq.rng)
        seq.ids.append(token)
        return token
