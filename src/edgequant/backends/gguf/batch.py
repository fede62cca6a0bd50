"""Continuous batching on llama.cpp: several sequences advance together, one `llama_decode` per step.

The server uses this for GGUF artifacts: each request owns a sequence id in a shared KV cache;
every step puts the pending tokens of all active sequences (a whole prompt for a new one, the
last sampled token for the others) into one batch, so the weights are read once per step for
all of them instead of once per request. (With a stream per sequence, below, a prompt joining
running sequences is decoded on its own first but for its last token: see `_decode`.)

Where each sequence's share of the cache holds a whole context (the server's default cache of
batch x context tokens), every sequence gets a cache stream of its own (`kv_unified` off):
attention reads only its own cells. With a smaller cache (`--cache-tokens`) one unified stream
lets a long request use the room the others leave; then each token attends over every running
sequence's cells (masked), in one product whose summation depends on the batch.

Whether a sequence's tokens equal its tokens decoded alone also depends on the weights' types:
llama.cpp multiplies one token with its vector kernels and several with its tiled or repacked
ones. For q8_0 both give the same numbers, and with a stream per sequence the tokens are equal
bit for bit (tests/test_batching_gguf.py). For q5_0 and repacked q4_K (most of the default model
at q4_k_m) they round differently, so a greedy answer can part from its answer alone: on
bench/serve.py's four prompts, at tokens 0, 11, 12 and 39 of 64 (2026-12-05).

llama.cpp runs several streams in one call fastest when the batch's sequence ids are consecutive
and ascending, so the running sequences always hold streams 0..k-1: one that ends gives its
stream to the last one (llama.cpp copies that stream's cache, tens of MB at most, once per ended
request). Measured on the decoder alone (llama-cpp-python 0.3.36, default model at gguf:q4_k_m,
2 cores, 2026-12-05), a step of 4 sequences took 21-23 ms in streams 0..3 and 27-29 ms in one
unified stream; 3 sequences took 29 ms in streams 0..2 and 35 ms in streams 0, 1, 3; 4 in
streams 0, 2, 4, 6 took 50 ms. Through the whole server the change was not distinguishable in
tokens/s (4 clients, four paired runs of 8 rounds: 0.96x-0.99x of one unified stream, each
interval holding 1x): it is kept for the exact answers where the weights' kernels allow them.

A base shared by several `?lora=separate` artifacts decodes each request with its own adapter.
llama.cpp applies one adapter set per context, so a step decodes one batch per adapter among the
active sequences: one call when they all use the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from edgequant.backends.gguf.lora import set_adapter
from edgequant.runner import GenerateParams


@dataclass
class _Sequence:
    sampler: object  # a llama.cpp sampler chain, or None for greedy (see `_greedy`)
    pending: list[int]
    adapter: object  # the LoadedAdapter its tokens decode with, or None
    stream: int  # its llama.cpp sequence id: its place among the running sequences
    pos: int = 0


class BatchDecoder:
    mixes_adapters = True  # requests of different adapters share a step (one llama_decode each)

    def __init__(self, model, *, n_seq: int, n_ctx: int, seq_ctx: int, threads: int,
                 adapter: Callable[[str | None], object]):
        """`seq_ctx`: tokens one sequence may hold (the runner's context); `adapter`: the
        LoadedAdapter (or None) a request's `GenerateParams.adapter` names."""
        import llama_cpp

        self._ll = llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_ctx, min(n_ctx, 512)
        params.n_seq_max, params.kv_unified, params.no_perf = n_seq, n_ctx < n_seq * seq_ctx, True
        params.n_threads = params.n_threads_batch = threads
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a batched context")
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self._per_stream = not params.kv_unified
        self._seqs: dict[int, _Sequence] = {}  # by the worker's sequence id
        self._by_stream: list[int] = []  # the worker's sequence id in each running stream
        self._adapter = adapter
        self._ctx_adapter = None  # the adapter the context computes with: a new context has none
        self.n_seq, self.n_ctx = n_seq, n_ctx

    def start(self, seq_id: int, prompt_ids: Sequence[int], params: GenerateParams) -> None:
        adapter = self._adapter(params.adapter)
        self._seqs[seq_id] = _Sequence(self._sampler(params), list(prompt_ids), adapter, len(self._by_stream))
        self._by_stream.append(seq_id)

    def step(self) -> dict[int, int]:
        """Decode every active sequence by one token; returns {sequence id: sampled token}."""
        by_adapter: dict[int, list[int]] = {}
        for seq_id in self._by_stream:  # in stream order, which llama.cpp needs to run streams together
            by_adapter.setdefault(id(self._seqs[seq_id].adapter), []).append(seq_id)
        sampled = {}
        for seq_ids in by_adapter.values():
            self._use_adapter(self._seqs[seq_ids[0]].adapter)
            sampled.update(self._decode(seq_ids))
        return sampled

    def _use_adapter(self, adapter) -> None:
        # llama.cpp ignores an unchanged set, but the call itself took 2% of the worker's time at
        # 1 client (py-spy, 2026-12-05): with no adapters, every step made it.
        if adapter is not self._ctx_adapter:
            set_adapter(self._ctx, adapter)
            self._ctx_adapter = adapter

    def _decode(self, seq_ids: list[int]) -> dict[int, int]:
        """These sequences' pending tokens decoded (one llama_decode, or two when prompts join
        running streams); their sampled tokens."""
        seqs = [self._seqs[seq_id] for seq_id in seq_ids]
        joining = [seq for seq in seqs if len(seq.pending) > 1]
        if self._per_stream and joining and len(seqs) > 1:
            # llama.cpp splits a batch whose streams bring unequal token counts into several
            # ubatches; a prompt decoded on its own first leaves one token per stream for the
            # shared call. A 10-token prompt joining 3 running sequences took about 60 ms in one
            # call, about 50 ms in two (default model, 2 cores, 2026-12-05).
            self._run(joining, sample=False)
        rows = self._run(seqs, sample=True)  # empty when nothing was pending: nothing sampled
        sampled = {}
        for seq_id, seq, row in zip(seq_ids, seqs, rows):
            token = self._greedy(row) if seq.sampler is None else self._ll.llama_sampler_sample(seq.sampler, self._ctx, row)
            seq.pending = [token]
            sampled[seq_id] = token
        return sampled

    def _greedy(self, row: int) -> int:
        """The first token of highest logit in batch row `row`, as llama.cpp's greedy sampler picks.
        llama.cpp's sampler copies the whole vocabulary into candidates first: 100 us a token
        against 15 for this, at 49k tokens (default model, 2026-12-05); at 4 clients that is 2% of a step."""
        import numpy as np

        logits = np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, row), shape=(self._n_vocab,))
        return int(logits.argmax())

    def _run(self, seqs: list[_Sequence], *, sample: bool) -> list[int]:
        """One llama_decode of the sequences' pending tokens, with logits at each one's last token
        (`sample`), or of all but their last token, without logits. The batch row of each
        sequence's last token; none when there was nothing to decode."""
        batch, n, rows = self._batch, 0, []
        for seq in seqs:
            tokens = seq.pending if sample else seq.pending[:-1]
            for j, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, seq.pos + j, 1
                batch.seq_id[n][0] = seq.stream
                batch.logits[n] = sample and j == len(tokens) - 1
                n += 1
            rows.append(n - 1)
            seq.pos += len(tokens)
            seq.pending = seq.pending[len(tokens):]
        batch.n_tokens = n
        if n == 0:
            return []
        rc = self._ll.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        return rows

    def finish(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        ll = self._ll
        ll.llama_memory_seq_rm(self._memory, seq.stream, -1, -1)
        last_id = self._by_stream.pop()
        if last_id != seq_id:  # the last stream's sequence moves into the freed one
            last = self._seqs[last_id]
            ll.llama_memory_seq_cp(self._memory, last.stream, seq.stream, -1, -1)
            ll.llama_memory_seq_rm(self._memory, last.stream, -1, -1)
            last.stream, self._by_stream[seq.stream] = seq.stream, last_id
        if seq.sampler is not None:
            ll.llama_sampler_free(seq.sampler)

    def close(self) -> None:
        for seq_id in self._by_stream[::-1]:  # last stream first: no sequence moves
            self.finish(seq_id)
        if self._ctx:
            self._ll.llama_batch_free(self._batch)
            self._ll.llama_free(self._ctx)
            self._ctx = None

    def _sampler(self, params: GenerateParams):
        if params.temperature <= 0:
            return None  # greedy: `_greedy`
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if params.top_k > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(params.top_k))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(params.temperature))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(params.seed))
        return chain
