"""The Runner contract: one way to score and run a model, whatever its format.

The evaluation harness asks every runner for `logits` on the same token ids (quality) and drives
`generate` with the same prompt ids (speed); the server uses the same `generate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class GenerateParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int = 0
    stop_at_eos: bool = True  # speed benchmarks turn this off to decode a fixed number of tokens
    # Which LoRA adapter of a runner opened over several artifacts (`Backend.open_shared`) this
    # request decodes with, by the artifact's served name; None: the runner's own (its artifact's).
    adapter: str | None = None


class _Loaded:
    """A loaded engine: `close` releases its memory (the object is unusable afterwards); usable in `with`."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Runner(_Loaded, ABC):
    """A loaded model. Subclasses keep engine objects private; callers only see ids and arrays."""

    name: str = ""
    n_ctx: int = 0
    bos_id: int | None = None  # set where the model's tokenizer metadata says prompts start with BOS

    @abstractmethod
    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added. `special=True` parses special-token text
        such as `<|im_start|>` into its id (chat prompts need that; evaluation text must not)."""

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt's ids as the model was trained to see them: BOS first where its tokenizer adds
        one (Gemma answers a question without BOS with markup), special-token text parsed."""
        return ([self.bos_id] if self.bos_id is not None else []) + self.tokenize(text, special=True)

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits of shape (len(ids), vocab): row i predicts token i + 1."""

    def logits_of_windows(self, windows: Sequence[Sequence[int]]) -> Iterator[Iterator[np.ndarray]]:
        """`logit_slices` of each window, in order. Engines that score one window on one core
        override it to score several at once. Callers are done with a window's blocks before they
        draw the next window."""
        for ids in windows:
            yield self.logit_slices(ids)

    def logit_slices(self, ids: Sequence[int]) -> Iterator[np.ndarray]:
        """`logits` as consecutive blocks of rows (here one block). Engines that can continue a
        window from their KV cache override it so a large vocabulary never holds a whole
        (ctx x vocab) array. A block may be a view of the engine's own output buffer: callers are
        done with it before they draw the next one."""
        return iter((self.logits(ids),))

    @abstractmethod
    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        """Yield generated token ids one at a time, as soon as each is sampled."""

    def is_eos(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, end-of-turn)."""
        return False

    def generation_budget(self, prompt_ids: Sequence[int], params: GenerateParams) -> int:
        """Tokens a request may generate: its max_tokens, within what the context has left."""
        return max(0, min(params.max_tokens, self.n_ctx - len(prompt_ids)))

    def bounded(self, prompt_ids: Sequence[int], params: GenerateParams, stream: Iterator[int]) -> Iterator[int]:
        """The generation loop every runner shares: at most `max_tokens` of `stream`'s tokens, and no
        more than the context has room for, up to and including the first end-of-generation token
        when the request stops there. `stream` (an engine's own generator, unbounded) is not
        started when there is no room, and never asked for a token past the last one yielded."""
        budget = self.generation_budget(prompt_ids, params)
        if budget == 0:
            return
        for count, token in enumerate(stream, start=1):
            yield token
            if count >= budget or (params.stop_at_eos and self.is_eos(token)):
                return

    def chat_template(self) -> str | None:
        """The model's own Jinja chat template, when it has one."""
        return None

    def arithmetic(self) -> str | None:
        """What `logits` are computed in, where that is not simply the engine running the artifact
        (a stand-in for the target device's arithmetic); evaluations record it."""
        return None

    def batch_decoder(self, n_seq: int, n_ctx: int):
        """A decoder that advances several sequences per step (see backends/gguf/batch.py), or
        None when this engine has none; the server then runs one request at a time."""
        return None


def default_threads() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class TaskRunner(_Loaded, ABC):
    """A loaded model of a task other than text generation (see `edgequant.sources.tasks`): one
    call maps a batch of inputs to one output row per input. A sentence encoder takes texts and
    returns embeddings (n, dim) as its source would (pooled, unit length where it normalizes); an
    image classifier takes preprocessed images (n, 3, h, w) float32 and returns logits (n, classes)."""

    name: str = ""
    task: str = ""

    @abstractmethod
    def run(self, batch) -> np.ndarray: ...

    def run_in_batches(self, inputs, batch: int, progress=lambda batches: batches) -> np.ndarray:
        """`run` over any number of inputs, `batch` at a time, rows in input order; `progress`
        wraps the list of batches (a progress bar)."""
        batches = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
        return np.concatenate([self.run(b) for b in progress(batches)])

    def token_count(self, batch) -> int:
        """Tokens the batch's texts make (the server's usage figure); 0 where inputs are not text."""
        return 0

    def arithmetic(self) -> str | None:
        """As `Runner.arithmetic`: what the outputs are computed in, where a stand-in computes them."""
        return None
