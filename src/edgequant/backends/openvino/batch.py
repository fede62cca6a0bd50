"""Continuous batching on OpenVINO: the server's batch decoder, built on OpenVINO GenAI's own
`ContinuousBatchingPipeline` (paged attention on the CPU plugin).

How the decoder contract maps onto the pipeline:

- `start(seq_id, ...)` adds a request (its prompt ids as a tensor, a GenerationConfig made as the
  runner's `generate` makes it) and keeps the handle under `seq_id`. The pipeline's request id is a
  fresh number each time, never the slot: reusing an id breaks the pipeline's bookkeeping.
- `step()` runs one pipeline step (every scheduled request advances: a chunk of a new prompt, or
  one token of a running one), then reads each handle. The pipeline may hold more than one new
  token for a request (it could decode several per step); extras wait in a buffer and go out one
  per `step()`, and the pipeline is not stepped while every request still has a buffered token.
- The pipeline ends a request itself at `max_tokens` (the worker ends it there too) and at the
  model's stop tokens unless `stop_at_eos` is off; the stop token is part of its output, so the
  worker sees EOS as usual. Should the pipeline end a request without one, the decoder hands out
  the model's EOS id so the worker ends it rather than wait forever for a token.
- `finish(seq_id)` cancels the handle; the pipeline frees the request's KV blocks at its next step.

The KV cache is bounded: `n_ctx` tokens (what the worker admits at once: prompts plus their token
budgets) in the plugin's 32-token blocks, plus two blocks per sequence: one partly filled, one of
slack. A request cancelled in one step holds its blocks until the pipeline drops it at the next;
a request admitted in its place meanwhile gets what fits and the rest a step later (measured on a
cache sized to the token: same tokens as in an empty cache, nothing dropped). Prefix caching stays
off: it keeps finished requests' blocks in memory, which pays only for repeated prompts. Dynamic
split-fuse stays on, so a long prompt is prefilled in chunks while running requests keep getting
tokens. The pipeline allocates the whole cache at its first step: for SmolLM2-135M at the
server's defaults (--batch 4, --ctx 2048: 8,448 token slots) that is 186 MiB of f16 KV.

A `?lora=separate` artifact's adapter (lora.py) is given to the pipeline as GenAI's adapters, but
only the pipeline's `generate` applies them: `add_request` and `step` never call its adapter
controller, so without more the server would decode the base model, silently. The decoder therefore
runs one `generate` of a single token first, with the adapters in its GenerationConfig; that sets the
adapter's tensors as LoRA states of the pipeline's infer request, where they stay (the pipeline
never resets its states, and GenAI's controller keeps a state once set until the adapters change).
The tests check the decoder's tokens against the merged model's. A base several artifacts share is
built with all their adapters, and a request for another adapter (or none) runs such a `generate`
with it once the running requests have ended: measured on the tiny Llama, switching between two
adapters and the base gives each request the tokens its own artifact gives.

Measured on the tiny test Llama (2 cores, int8): greedy text from 4 requests decoded together is
token-for-token the text of each decoded alone and of `LLMPipeline.generate`, and a seeded sampled
request draws the same tokens with or without company (the sampler seeds per request). Reading
8 handles costs 50-130 us a step (0.4% of a SmolLM2-135M step).

Through `edgequant serve --batch 8` on SmolLM2-135M int8 (2 cores shared with other jobs, load
average 4-5; bench/serve_openvino.py, medians of 5 paired rounds): 4 clients get 3.0x one client's
total tokens/s; one client gets 0.91x what the same pipeline gives driven directly (best runs 50
vs 53 tokens/s). At 4 clients the server beats lockstep `generate` calls (1.18x: a finished
request's slot is refilled at once); at 8 it trails them (0.62x), most likely the server's
per-token Python work taking turns on the 2 cores with the inference threads.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from edgequant.backends._shared.adapter_switch import AdapterSwitch
from edgequant.backends.openvino.signal_stack import kept_signal_stack
from edgequant.errors import EdgequantError
from edgequant.runner import GenerateParams

KV_BLOCK_TOKENS = 32  # the CPU plugin's paged-attention block (measured from the pipeline's cache usage)
TOKENS_PER_STEP = 256  # prompt tokens one step may take (split-fuse chunks a longer prompt)


def _adapters_of(adapters, name: str | None):
    """The AdapterConfig a request names; a pipeline built without adapters has none to switch to."""
    if adapters is None:
        raise ValueError(f"adapter {name!r} requested from a pipeline built without adapters")
    return adapters.of(name)


@dataclass
class _Request:
    handle: object
    ready: deque = field(default_factory=deque)  # tokens read from the pipeline, not yet handed out
    ended: bool = False  # the pipeline is done with it: no more tokens will come


class OpenVINOBatchDecoder:
    mixes_adapters = False  # the pipeline's LoRA states hold one adapter at a time

    def __init__(self, folder: Path, *, n_seq: int, n_ctx: int, properties: dict, eos_id: int | None,
                 generation_config: Callable[[GenerateParams, int], object], adapters=None):
        """`generation_config(params, budget)`: GenAI's settings for one request, the runner's own.
        `adapters`: the runner's GenAIAdapters (lora.py), or None; a request gets the one it names,
        switched while no other request runs."""
        if n_seq < 1 or n_ctx < 1:
            raise ValueError(f"a batch decoder needs n_seq >= 1 and n_ctx >= 1, not {n_seq} and {n_ctx}")
        self.n_seq, self.n_ctx = n_seq, n_ctx
        self._eos_id, self._generation_config = eos_id, generation_config
        self._pipeline = _pipeline(folder, scheduler_config(n_seq, n_ctx),
                                   {**properties, "adapters": adapters.every} if adapters else properties)
        self._adapter = AdapterSwitch(lambda name: self._apply_adapters(_adapters_of(adapters, name)))
        if adapters:
            self._apply_adapters(adapters.of(None))
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()

    def start(self, seq_id: int, prompt_ids: Sequence[int], params: GenerateParams) -> None:
        import numpy as np
        import openvino as ov

        self.finish(seq_id)  # a slot reused before it was finished starts clean
        self._adapter.select(params.adapter, running=bool(self._requests))
        ids = ov.Tensor(np.asarray([list(prompt_ids)], dtype=np.int64))
        handle = self._pipeline.add_request(next(self._ids), ids, self._generation_config(params, params.max_tokens))
        self._requests[seq_id] = _Request(handle)

    def step(self) -> dict[int, int]:
        """At most one new token per active sequence: {sequence id: token}."""
        if any(not r.ready and not r.ended for r in self._requests.values()):
            self._pipeline.step()
            for request in self._requests.values():
                self._collect(request)
        return {seq_id: token for seq_id, request in self._requests.items()
                if (token := self._next_token(seq_id, request)) is not None}

    def finish(self, seq_id: int) -> None:
        request = self._requests.pop(seq_id, None)
        if request is not None and not request.ended:
            request.handle.cancel()

    def close(self) -> None:
        for seq_id in list(self._requests):
            self.finish(seq_id)
        if self._pipeline is not None and self._pipeline.has_non_finished_requests():
            self._pipeline.step()  # lets it drop the cancelled requests and return their blocks
        with kept_signal_stack():  # its destructor may unload the CPU plugin
            self._pipeline = None

    def _apply_adapters(self, adapters) -> None:
        """One `generate` of one token with `adapters` (an AdapterConfig): what makes the pipeline
        set them as its LoRA states, or clear them with an empty one (see the module docstring)."""
        import numpy as np
        import openvino as ov

        config = self._generation_config(GenerateParams(max_tokens=1, temperature=0.0, stop_at_eos=False), 1)
        config.adapters = adapters
        self._pipeline.generate([ov.Tensor(np.asarray([[self._eos_id or 0]], dtype=np.int64))], [config])

    def _collect(self, request: _Request) -> None:
        import openvino_genai as genai

        while request.handle.can_read():
            for output in request.handle.read().values():  # one sequence per request (no beams)
                request.ready.extend(output.generated_ids)
        status = request.handle.get_status()
        if status == genai.GenerationStatus.IGNORED:
            # The scheduler found no room for it; the cache is sized for everything the worker admits.
            raise RuntimeError("OpenVINO GenAI dropped a request for lack of KV cache")
        request.ended = status != genai.GenerationStatus.RUNNING

    def _next_token(self, seq_id: int, request: _Request) -> int | None:
        if request.ready:
            return int(request.ready.popleft())
        if not request.ended:
            return None  # still being prefilled, or waiting for a free block
        if self._eos_id is None:
            raise RuntimeError(f"OpenVINO GenAI ended sequence {seq_id} early, and the model has no EOS id to say so")
        return self._eos_id  # ended early without a stop token of ours: EOS makes the worker end it too


def kv_blocks(n_seq: int, n_ctx: int) -> int:
    """Blocks for `n_ctx` tokens shared by `n_seq` sequences, each of which may leave its last block
    partly filled, and one block more per sequence as slack (see the module docstring)."""
    return -(-n_ctx // KV_BLOCK_TOKENS) + 2 * n_seq


def scheduler_config(n_seq: int, n_ctx: int):
    """The pipeline's scheduling for `n_seq` sequences sharing `n_ctx` tokens of KV cache (the
    benchmark drives a pipeline of its own with the same one)."""
    import openvino_genai as genai

    config = genai.SchedulerConfig()
    config.num_kv_blocks = kv_blocks(n_seq, n_ctx)
    config.max_num_seqs = n_seq
    config.max_num_batched_tokens = max(TOKENS_PER_STEP, n_seq)
    config.dynamic_split_fuse = True
    config.enable_prefix_caching = False
    return config


def _pipeline(folder: Path, scheduler, properties: dict):
    import openvino_genai as genai

    try:
        with kept_signal_stack():  # it may load the CPU plugin
            return genai.ContinuousBatchingPipeline(str(folder), scheduler, "CPU", properties)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise EdgequantError(f"OpenVINO GenAI cannot batch requests on {folder}: {reason}",
                             "serve it one request at a time with --batch 1, or convert the model again") from exc
