"""`/v1/embeddings` for sentence-encoder artifacts, in OpenAI's request and response shape.

One worker per encoder runs one request at a time on a thread (a runner is not thread-safe and the
CPU is the bottleneck; a request's texts already run in batches). Admission is decided before any
work: beyond `max_queue` waiting requests the answer is a 429 at once.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgequant.runner import TaskRunner
from edgequant.serving.errors import ApiError

MAX_INPUTS = 2048  # OpenAI's own bound on inputs per request
RUN_BATCH = 16  # texts per runner call


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `user` and other OpenAI fields are accepted and ignored

    model: str
    input: str | list[str] | list[int] | list[list[int]] = Field(..., description="a text or a list of texts")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="must equal the model's own dimension when given")


class EmbeddingWorker:
    def __init__(self, name: str, runner: TaskRunner, max_queue: int):
        self.name, self.runner = name, runner
        self._max_waiting = max_queue
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._admitted = 0

    @property
    def in_flight(self) -> int:
        return self._admitted

    @property
    def queue_depth(self) -> int:
        return max(self._admitted - 1, 0)

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """The texts' embeddings and their token count; a 429 when the queue is full."""
        with self._count_lock:
            if self._admitted > self._max_waiting:
                raise ApiError(429, f"model {self.name} is busy: its queue of {self._max_waiting} is full; retry later",
                               "rate_limit_error", code="queue_full")
            self._admitted += 1
        try:
            return await asyncio.to_thread(self._run, texts)
        finally:
            with self._count_lock:
                self._admitted -= 1

    def _run(self, texts: list[str]) -> tuple[np.ndarray, int]:
        with self._lock:
            return self.runner.run_in_batches(texts, RUN_BATCH), self.runner.token_count(texts)

    def stop(self) -> None:
        with self._lock:
            self.runner.close()


def texts_of(body: EmbeddingRequest) -> list[str]:
    """The request's texts, checked: no token-id inputs, none empty, at most MAX_INPUTS."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(400, "input is empty", param="input")
    if not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "input as token ids is not supported here: send text", param="input")
    if len(texts) > MAX_INPUTS:
        raise ApiError(400, f"input holds {len(texts)} texts; at most {MAX_INPUTS} per request", param="input")
    if any(not t for t in texts):
        raise ApiError(400, "input holds an empty string", param="input")
    return texts


def response(model: str, vectors: np.ndarray, tokens: int, encoding_format: str, dimensions: int | None) -> dict:
    if dimensions is not None and dimensions != vectors.shape[1]:
        raise ApiError(400, f"dimensions={dimensions}: model {model} gives {vectors.shape[1]}-dimensional embeddings; "
                            "omit dimensions", param="dimensions")
    vectors = vectors.astype("<f4", copy=False)
    encode = ((lambda v: base64.b64encode(v.tobytes()).decode()) if encoding_format == "base64" else (lambda v: v.tolist()))
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
