"""Continuous batching on a raw onnxruntime session: the server's batch decoder for ONNX artifacts.

onnxruntime-genai decodes a batch only as a whole (no row can join a running generator), so a
batch lasts as long as its longest answer and the rows that ended early sit idle: on the serving
benchmark's prompts 4 clients got 1.26x the tokens/s of 1. This decoder drives the artifact's
graph itself, as genai does inside, and lets sequences join and leave between any two steps.

How it uses the graph (the builder's decoder with GroupQueryAttention, every ONNX LLM artifact):
- The KV cache is one buffer per layer's keys and values, (n_seq, kv_heads, capacity, head_dim),
  bound as both the past input and the present output of each call (IO binding on the same
  memory). GroupQueryAttention then writes a row's new keys and values in place, right after that
  row's own tokens, whose count it reads from the row's attention mask: rows of different lengths
  decode in one call with no copying, as genai's own shared buffer does.
- Sequences that decode occupy rows 0..m-1 of the buffer, so a step binds the contiguous view
  [0:m] and the graph never computes an empty row. A sequence that leaves gives its row to the
  last one (its keys and values copied, a few MB at most), keeping the rows contiguous.
- A new sequence prefills in row m, the first free one, a chunk of its prompt per step (at most
  `PREFILL_CHUNK` tokens, continuing from its own cache), so a long prompt delays the running
  streams by one chunk at a time, never by the whole prompt, and its logits stay small. One
  sequence prefills at a time, in start order; when its last chunk has run it samples its first
  token and joins the decoding rows.
- The buffer's capacity grows with the longest sequence (in steps of `GROW_TOKENS`), up to the
  server's context, so memory is n_seq times the longest sequence held, not n_seq contexts.

Inputs that never change between calls (a `?lora=separate` artifact's adapter tensors, which
onnxruntime's run options do not reach in `run_with_iobinding`) are bound once per binding. They
are one set per call, so a base serving several adapters decodes one adapter's requests at a
time: a request for another starts once the running ones have ended (the server's scheduler
waits for that, see `mixes_adapters`).

Sampling is ours (`sample_token`, one generator seeded per request), so a seeded request repeats
its answer whatever shares its steps, and sampled requests batch like greedy ones.

Measured (onnxruntime 1.32, default model at onnx:int4, 2 idle cores): one decode step costs
7.2-7.8 ms against 7.4-8.4 ms for genai's `generate_next_token` on the same graph; four greedy
prompts of 64 tokens decoded together take 0.8-0.9 s against 2.1 s one after another, and every
row's tokens equal its tokens alone and genai's. Row results are bitwise independent of their batch
mates because GroupQueryAttention treats each row by its own length and the quantized MatMuls
quantize activations per row.

Paired per token at one sequence against genai's loop in one process (2026-12-05, 24 requests of
48 tokens each side): 1.02-1.08x genai's time per token, depending on which of four identical
sessions in the process ran it, so memory placement moves it as much as our own work does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from edgequant.backends._shared.adapter_switch import AdapterSwitch
from edgequant.backends._shared.sampling import sample_token
from edgequant.runner import GenerateParams

PREFILL_CHUNK = 256  # prompt tokens per step: bounds both the stall of running streams and the logits array
GROW_TOKENS = 256  # the cache's capacity grows in steps of this many tokens per row


@dataclass
class _Sequence:
    seq_id: int
    params: GenerateParams
    rng: np.random.Generator
    pending: list[int]  # prompt ids not yet run
    length: int = 0  # tokens in its cache
    last: int | None = None  # the token sampled last, not yet run


@dataclass
class _Graph:
    """What the decoder needs to know about the session's inputs and outputs."""

    cache_inputs: list[str]  # past_key_values.N.key / .value, in the graph's order
    kv_heads: int
    head_dim: int
    dtype: type
    has_position_ids: bool
    extra_outputs: list[str] = field(default_factory=list)  # outputs other than logits and present.*
    vocab: int | None = None  # the logits' last dimension, where the graph fixes it
    logits_dtype: type = np.float32

    @classmethod
    def of(cls, session) -> "_Graph":
        inputs = session.get_inputs()
        cache = [i for i in inputs if i.name.startswith("past_key_values")]
        if not cache:
            raise ValueError("the graph has no past_key_values inputs: it is not a decoder with a KV cache")
        dtype = np.float16 if "float16" in cache[0].type else np.float32
        outputs = session.get_outputs()
        logits = next(o for o in outputs if o.name == "logits")
        return cls([i.name for i in cache], int(cache[0].shape[1]), int(cache[0].shape[3]), dtype,
                   any(i.name == "position_ids" for i in inputs),
                   [o.name for o in outputs if o.name != "logits" and not o.name.startswith("present")],
                   logits.shape[-1] if isinstance(logits.shape[-1], int) else None,
                   np.float16 if "float16" in logits.type else np.float32)


def present_name(cache_input: str) -> str:
    return cache_input.replace("past_key_values", "present", 1)


class ContinuousDecoder:
    """The Runner contract's batch decoder (start, step, finish, close) over one onnxruntime session."""

    mixes_adapters = False  # every sequence of a step runs with the same adapter tensors

    def __init__(self, session, *, n_seq: int, n_ctx: int, seq_ctx: int, end_token: int | None,
                 adapter: Callable[[str | None], dict] = lambda name: {}):
        """`seq_ctx`: tokens one sequence may hold (the runner's context); `end_token`: the id
        handed to a sequence that runs out of room, so the worker ends it; `adapter`: the OrtValues
        by input name a request's `GenerateParams.adapter` binds on every call (a LoRA adapter's
        tensors; none for the base)."""
        if n_seq < 1:
            raise ValueError(f"a batch decoder needs n_seq >= 1, not {n_seq}")
        self.n_seq, self.n_ctx = n_seq, min(n_ctx, n_seq * seq_ctx)
        self._session, self._graph = session, _Graph.of(session)
        self._seq_ctx, self._end_token = seq_ctx, end_token
        self._constants = adapter(None)
        self._adapter = AdapterSwitch(lambda name: self._bind_constants(adapter(name)))
        self._capacity = 0
        self._buffers: dict[str, np.ndarray] = {}
        self._bindings: dict[tuple[int, int, bool], tuple] = {}  # (binding, its logits buffer or None), see `_binding`
        self._rows: list[_Sequence] = []  # row i of the buffers; rows[:decoding] decode, rows[decoding] may prefill
        self._decoding = 0
        self._waiting: list[_Sequence] = []  # started, not yet given a row

    # -- the contract ------------------------------------------------------------------------

    def start(self, seq_id: int, prompt_ids: Sequence[int], params: GenerateParams) -> None:
        self._adapter.select(params.adapter, running=bool(self._rows or self._waiting))
        self._waiting.append(_Sequence(seq_id, params, np.random.default_rng(params.seed), list(prompt_ids)))

    def step(self) -> dict[int, int]:
        """One decode step for every decoding sequence, then one prompt chunk for the sequence
        that prefills; returns the tokens sampled (a prefilling sequence's first one on its last chunk)."""
        sampled = self._decode() if self._decoding else {}
        token = self._prefill_chunk()
        if token is not None:
            sampled[token[0]] = token[1]
        return sampled

    def finish(self, seq_id: int) -> None:
        self._waiting = [s for s in self._waiting if s.seq_id != seq_id]
        for row, seq in enumerate(self._rows):
            if seq.seq_id == seq_id:
                self._free_row(row)
                return

    def _bind_constants(self, constants: dict) -> None:
        """Inputs bound unchanged on every call from now on; the bindings holding the old ones go."""
        self._constants, self._bindings = constants, {}

    def close(self) -> None:
        self._rows, self._waiting, self._decoding = [], [], 0
        self._buffers, self._capacity, self._bindings = {}, 0, {}

    # -- one call of the graph ---------------------------------------------------------------

    def _run(self, rows: slice, input_ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run the graph on buffer rows `rows`, their caches bound in place; the last position's
        logits per row (for one token per row, a view of a buffer the next run overwrites)."""
        binding, logits = self._binding(rows, one_token=input_ids.shape[1] == 1)
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self._graph.has_position_ids:
            binding.bind_cpu_input("position_ids", positions)
        for name in self._graph.extra_outputs:  # rebound each run: a bound output keeps its last shape
            binding.bind_output(name)
        if logits is None:
            binding.bind_output("logits")
        self._session.run_with_iobinding(binding)
        if logits is None:
            logits = binding.get_outputs()[0].numpy()
        return logits[:, -1, :]

    def _binding(self, rows: slice, one_token: bool) -> tuple:
        """An IO binding with the caches of `rows` bound as past and present (views of the buffers,
        no copy), kept per row range until the buffers grow, so a step binds only its small inputs.

        A binding for one token per row (every decode step) also writes the logits into a buffer
        of its own: reading an output onnxruntime allocated means `get_outputs`, which wraps every
        bound output (61 on the default model) at 120-250 us a step, 2-3% of a decode step there.
        Prompt chunks vary in length, so their logits stay onnxruntime's (None)."""
        import onnxruntime as ort

        key = (rows.start, rows.stop, one_token and self._graph.vocab is not None)
        if key not in self._bindings:
            binding = self._session.io_binding()
            logits = None
            if key[2]:
                logits = np.empty((rows.stop - rows.start, 1, self._graph.vocab), self._graph.logits_dtype)
                binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            else:
                binding.bind_output("logits")  # first: `_run` reads the first output (rebinding keeps the place)
            for name, value in self._constants.items():
                binding.bind_ortvalue_input(name, value)
            for name in self._graph.cache_inputs:
                value = ort.OrtValue.ortvalue_from_numpy(self._buffers[name][rows])
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(present_name(name), value)
            self._bindings[key] = binding, logits
        return self._bindings[key]

    def _decode(self) -> dict[int, int]:
        sampled = {}
        for seq in [s for s in self._rows[:self._decoding] if s.length >= self._seq_ctx]:
            sampled[seq.seq_id] = self._out_of_room()  # no room to run its last token (only past what the server allows)
            self._free_row(self._row_of(seq))
        rows = self._rows[:self._decoding]
        if not rows:
            return sampled
        width = max(seq.length for seq in rows) + 1
        self._ensure_capacity(width)
        mask = np.zeros((len(rows), width), np.int64)
        for i, seq in enumerate(rows):
            mask[i, :seq.length + 1] = 1
        ids = np.asarray([[seq.last] for seq in rows], np.int64)
        positions = np.asarray([[seq.length] for seq in rows], np.int64)
        logits = self._run(slice(0, len(rows)), ids, mask, positions)
        for i, seq in enumerate(rows):
            seq.length += 1
            seq.last = sample_token(logits[i], seq.params, seq.rng)
            sampled[seq.seq_id] = seq.last
        return sampled

    def _prefill_chunk(self) -> tuple[int, int] | None:
        """One chunk of the prefilling sequence's prompt; (seq_id, first token) after its last chunk."""
        if len(self._rows) == self._decoding:
            if not self._waiting or self._decoding == self.n_seq:
                return None
            self._rows.append(self._waiting.pop(0))
        row = self._decoding
        seq = self._rows[row]
        if not seq.pending or seq.length + len(seq.pending) > self._seq_ctx:  # an empty prompt, or one past the context
            self._rows.pop()
            return seq.seq_id, self._out_of_room()
        chunk, seq.pending = seq.pending[:PREFILL_CHUNK], seq.pending[PREFILL_CHUNK:]
        self._ensure_capacity(seq.length + len(chunk))
        mask = np.ones((1, seq.length + len(chunk)), np.int64)
        positions = np.arange(seq.length, seq.length + len(chunk), dtype=np.int64)[None]
        logits = self._run(slice(row, row + 1), np.asarray([chunk], np.int64), mask, positions)
        seq.length += len(chunk)
        if seq.pending:
            return None
        seq.last = sample_token(logits[0], seq.params, seq.rng)
        self._decoding += 1  # it is in row `decoding`: the first row after the decoding ones
        return seq.seq_id, seq.last

    def _out_of_room(self) -> int:
        if self._end_token is None:
            raise RuntimeError("a sequence ran out of context and the model has no EOS id to end it with")
        return self._end_token

    # -- the cache's rows ----------------------------------------------------------------------

    def _ensure_capacity(self, tokens: int) -> None:
        """Grow every buffer to hold `tokens` per row (in GROW_TOKENS steps, at most the context)."""
        if tokens <= self._capacity:
            return
        capacity = min(self._seq_ctx, -(-tokens // GROW_TOKENS) * GROW_TOKENS)
        graph = self._graph
        for name in graph.cache_inputs:
            grown = np.zeros((self.n_seq, graph.kv_heads, capacity, graph.head_dim), graph.dtype)
            if self._capacity:
                grown[:, :, :self._capacity] = self._buffers[name]
            self._buffers[name] = grown
        self._capacity, self._bindings = capacity, {}

    def _row_of(self, seq: _Sequence) -> int:
        return next(i for i, held in enumerate(self._rows) if held is seq)

    def _free_row(self, row: int) -> None:
        """Drop the sequence in `row`; the rows after it stay contiguous (decoding rows first)."""
        if row < self._decoding:
            last_decoding = self._decoding - 1
            self._move(last_decoding, row)
            self._decoding -= 1
            if len(self._rows) > self._decoding + 1:  # a sequence was prefilling after the decoding rows
                self._move(len(self._rows) - 1, self._decoding)
        self._rows.pop()

    def _move(self, source: int, target: int) -> None:
        """Row `source`'s sequence and its cache into row `target` (whose sequence is dropped)."""
        if source == target:
            return
        seq = self._rows[source]
        for buffer in self._buffers.values():
            buffer[target, :, :seq.length] = buffer[source, :, :seq.length]
        self._rows[target] = seq
