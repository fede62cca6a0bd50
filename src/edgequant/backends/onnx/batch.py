"""Micro-batches on onnxruntime-genai: several requests decoded by one `og.Generator`.

onnxruntime-genai decodes a batch only as a whole: a generator of `batch_size` rows takes all its
prompts in one `append_tokens` (a 2-D array, each row padded on the right with the model's
`pad_token_id`; genai masks the trailing pad tokens and numbers each row's positions from 0) and
then advances every row by one token per `generate_next_token`. No row can join a running
generator. So the server's decoder contract maps onto micro-batches:

- `start` puts a sequence in a waiting line. When no micro-batch runs, the waiting sequences are
  gathered and launched together: at once when as many wait as were seen together around the last
  micro-batch (the rows waiting at its launch plus those started while it ran: clients served
  together come back together), else after a short window (20 ms), so requests that arrive a few
  milliseconds apart still share a generator while a lone client does not wait after its first
  request.
- `step` advances the running micro-batch by one token and returns the rows the worker has not
  finished. Sequences started while it runs wait in the line, absent from `step`'s answer.
- `finish` drops a row: genai keeps decoding it with the others (a generator cannot shrink), but
  its tokens are no longer returned; once every row is finished the generator is released and the
  next micro-batch launches at the next `step`.

One generator holds one set of search options, so only sequences with identical sampling share a
micro-batch: every greedy request batches with the other greedy ones, while a sampled request
runs alone, since genai draws every row's tokens from one random stream and a seeded request
would otherwise not repeat its answer. A prompt that ends with the pad id also runs alone: in a
batch genai would read that token as padding.

Measured (onnxruntime-genai 0.14.1, CPU; four rows of 1 to 31 prompt tokens, 12 to 16 steps):
every row's logits in a micro-batch are bitwise equal to its logits alone, on the tiny test model
at onnx:fp32, onnx:int8 and onnx:int4 and on the default model's onnx:int4 (HQQ), so greedy
requests answer exactly as alone. Padding changes nothing because the builder's
GroupQueryAttention takes each row's length from the attention mask and writes the row's new keys
and values right after its own tokens, and the quantized MatMuls quantize activations per row.

Throughput (default model, onnx:int4, 2 cores shared with other jobs, load 3 to 5): one genai step
of 4 rows costs 1.6-1.7x a step of 1 row (2.3-2.5x the tokens/s when every row is live). A
micro-batch lasts as long as its longest row, though: on bench/serve_onnx.py's greedy prompts,
which give 6, 26, 61 and 64 tokens (cap 64), 61% of the row-steps yield a token, and 4 clients get
1.26x the tokens/s of 1 (genai driven directly on the same rounds: 1.22x). Only continuous
batching (rows joining a running batch, which genai does not offer) would recover that waste.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from edgequant.runner import GenerateParams

GATHER_S = 0.02  # how long a free decoder waits for more requests before launching fewer
_POLL_S = 0.002  # the worker calls `step` in a loop while gathering: sleep a little each time
GREEDY = "greedy"  # the group of every greedy row that may be batched


@dataclass(frozen=True)
class _Row:
    seq_id: int
    prompt: list[int]
    params: GenerateParams
    group: object  # rows of equal groups may share a generator


def _group(seq_id: int, prompt: list[int], params: GenerateParams, pad_id: int) -> object:
    if params.temperature > 0:
        return ("alone", seq_id)  # one random stream per generator: a seeded answer must not depend on its batch mates
    if prompt[-1] == pad_id:
        return ("alone", seq_id)  # in a batch genai would take the prompt's last token for padding and mask it
    return GREEDY


@dataclass(frozen=True)
class GenaiLimits:
    """What a micro-batch needs from the artifact's genai_config.json and tokenizer."""

    pad_id: int
    eos_ids: frozenset[int]  # tokens after which genai pads a row (its eos_token_id, else its pad id)
    context_length: int
    end_token: int | None  # an id the runner reads as end of generation (see _MicroBatch.advance)

    @classmethod
    def from_config(cls, model_config: dict, end_token: int | None) -> "GenaiLimits":
        eos = model_config.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        pad = int(model_config.get("pad_token_id", 0))
        return cls(pad, frozenset(eos or [pad]), int(model_config["context_length"]), end_token)


class _MicroBatch:
    """One generator decoding a fixed set of rows until every row is finished."""

    def __init__(self, model, rows: list[_Row], limits: GenaiLimits):
        import numpy as np
        import onnxruntime_genai as og

        self.seq_ids = [row.seq_id for row in rows]
        self.live = set(self.seq_ids)  # rows the worker has not finished
        self._ended: set[int] = set()  # rows genai has ended on its own
        self._limits = limits
        width = max(len(row.prompt) for row in rows)
        params = og.GeneratorParams(model)
        params.set_search_options(**_search_options(rows[0].params, len(rows), min(limits.context_length, width + max(
            row.params.max_tokens for row in rows))))
        self._generator = og.Generator(model, params)
        padded = np.full((len(rows), width), limits.pad_id, dtype=np.int32)
        for i, row in enumerate(rows):
            padded[i, :len(row.prompt)] = row.prompt
        self._generator.append_tokens(padded)

    def advance(self) -> dict[int, int]:
        """One token for each live row. A row genai has ended (one of its EOS ids the runner does not
        treat as one, or the context's end) gets the runner's end token, so the worker finishes it
        rather than waiting for a token that will never come."""
        tokens = None
        if not self._generator.is_done():
            self._generator.generate_next_token()
            tokens = self._generator.get_next_tokens()
        sampled = {}
        for i, seq_id in enumerate(self.seq_ids):
            if seq_id not in self.live:
                continue
            if tokens is None or seq_id in self._ended:
                sampled[seq_id] = self._end_token()
                continue
            sampled[seq_id] = int(tokens[i])
            if sampled[seq_id] in self._limits.eos_ids:
                self._ended.add(seq_id)  # genai pads this row from now on
        return sampled

    def _end_token(self) -> int:
        if self._limits.end_token is None:
            raise RuntimeError("onnxruntime-genai ended a sequence and the tokenizer has no EOS id to end it with")
        return self._limits.end_token

    def drop(self, seq_id: int) -> None:
        self.live.discard(seq_id)

    def close(self) -> None:
        self._generator = None


class MicroBatchDecoder:
    """The server's batch decoder for ONNX artifacts (see the module docstring)."""

    def __init__(self, model, *, n_seq: int, n_ctx: int, limits: GenaiLimits, gather_s: float = GATHER_S):
        self.model = model  # the runner's og.Model, shared: its weights are loaded once
        self.n_seq, self.n_ctx, self.limits, self.gather_s = n_seq, n_ctx, limits, gather_s
        self._waiting: dict[int, _Row] = {}  # in start order
        self._batch: _MicroBatch | None = None
        self._gather_until: float | None = None  # set when the decoder is free and a row waits
        # Requests seen together lately: the rows waiting when the last micro-batch launched plus
        # those started while it ran. The next launch waits for that many (all n_seq at first).
        self._demand = n_seq
        self.launched: Counter[int] = Counter()  # micro-batches launched, by number of rows

    def start(self, seq_id: int, prompt_ids: Sequence[int], params: GenerateParams) -> None:
        prompt = list(prompt_ids)
        self._waiting[seq_id] = _Row(seq_id, prompt, params, _group(seq_id, prompt, params, self.limits.pad_id))
        if self._batch is not None:
            self._demand += 1

    def step(self) -> dict[int, int]:
        if self._batch is None and not self._launch():
            return {}
        return self._batch.advance()

    def finish(self, seq_id: int) -> None:
        self._waiting.pop(seq_id, None)
        if self._batch is not None and seq_id in self._batch.seq_ids:
            self._batch.drop(seq_id)
            if not self._batch.live:
                self._batch.close()
                self._batch = None

    def close(self) -> None:
        self._waiting.clear()
        if self._batch is not None:
            self._batch.close()
            self._batch = None

    def _launch(self) -> bool:
        """Start the next micro-batch from the waiting line; False while still gathering."""
        if not self._waiting:
            return False
        rows = self._next_rows()
        now = time.monotonic()
        if self._gather_until is None:
            self._gather_until = now + self.gather_s
        if rows[0].group == GREEDY and len(rows) < min(self.n_seq, self._demand) and now < self._gather_until:
            time.sleep(min(_POLL_S, self._gather_until - now))  # the worker admits new requests between steps
            return False
        self._batch = _MicroBatch(self.model, rows, self.limits)
        self._gather_until, self._demand = None, len(self._waiting)
        for row in rows:
            del self._waiting[row.seq_id]
        self.launched[len(rows)] += 1
        return True

    def _next_rows(self) -> list[_Row]:
        """The oldest waiting row and the later ones that may share its generator, while the padded
        prompts and the longest answer fit the model's context."""
        first, *others = self._waiting.values()
        rows, width, budget = [first], len(first.prompt), first.params.max_tokens
        for row in others:
            if len(rows) == self.n_seq:
                break
            wider, longer = max(width, len(row.prompt)), max(budget, row.params.max_tokens)
            if row.group == first.group and wider + longer <= self.limits.context_length:
                rows.append(row)
                width, budget = wider, longer
        return rows


def _search_options(params: GenerateParams, batch_size: int, max_length: int) -> dict:
    """genai's search options for a micro-batch, as OnnxRunner sets them for one request."""
    options = {"batch_size": batch_size, "max_length": max_length, "do_sample": params.temperature > 0}
    if params.temperature > 0:
        options.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0,
                       random_seed=params.seed)
    return options
