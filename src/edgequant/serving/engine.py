"""One worker thread per served model, fed by a bounded queue.

A runner is not thread-safe and the CPU is the bottleneck, so each model runs one generation at a
time on its own thread; requests wait in a bounded queue and are refused at once when it is full.
The worker streams text deltas back to the asyncio side through `loop.call_soon_threadsafe` and
checks a cancel flag between tokens, so a client that disconnects or times out stops its
generation within one token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from edgequant.runner import GenerateParams, Runner


class QueueFull(Exception):
    """The model's queue is at its bound: the caller answers 429 at once."""


@dataclass
class Delta:
    text: str = ""
    finish_reason: str | None = None  # set on the last delta: "stop" or "length"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Job:
    prompt_ids: list[int]
    params: GenerateParams
    stop: Sequence[str]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def emit(self, delta: Delta) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, delta)


class ModelWorker:
    def __init__(self, name: str, runner: Runner, max_queue: int, metrics):
        self.name, self.runner, self.metrics = name, runner, metrics
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._busy = False
        self._thread = threading.Thread(target=self._loop, name=f"edgequant-worker-{name}", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    @property
    def in_flight(self) -> int:
        return self._jobs.qsize() + int(self._busy)

    def submit(self, job: Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def stop(self) -> None:
        """Cancel queued jobs and end the thread after the running one notices its cancel flag."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.emit(Delta(finish_reason="stop", error="server shutting down"))
        self._jobs.put(None)
        self._thread.join(timeout=30)
        self.runner.close()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            self._busy = True
            try:
                generated = self._run(job)
                self.metrics.inc("edgequant_generated_tokens_total", generated, model=self.name)
            except Exception as exc:  # a failing request must never take the worker down
                job.emit(Delta(finish_reason="stop", error=f"generation failed: {type(exc).__name__}"))
            finally:
                self._busy = False

    def _run(self, job: Job) -> int:
        """Generate for one job; returns the number of tokens generated, cancelled or not."""
        runner, ids, sent, generated = self.runner, [], "", 0
        holdback = max((len(s) for s in job.stop), default=1) - 1  # text that may start a stop string
        finish, final_text = "length", None
        for token in runner.generate(job.prompt_ids, job.params):
            if job.cancelled.is_set():
                self.metrics.inc("edgequant_cancelled_requests_total", model=self.name)
                return generated
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
            generated += 1
            if runner.is_eos(token):
                finish = "stop"
                break
            ids.append(token)
            text = runner.detokenize(ids)
            cut = _first_stop(text, job.stop)
            if cut is not None:
                finish, final_text = "stop", text[:cut]
                break
            if not text.endswith("\ufffd"):  # never split a UTF-8 character across deltas
                sent = _flush(job, text[: len(text) - holdback], sent)
        _flush(job, final_text if final_text is not None else runner.detokenize(ids), sent)
        job.emit(Delta(finish_reason=finish, prompt_tokens=len(job.prompt_ids), completion_tokens=generated))
        return generated


def _flush(job: Job, text: str, sent: str) -> str:
    """Emit what `text` adds to what was already sent; return the new sent text."""
    if len(text) > len(sent):
        job.emit(Delta(text=text[len(sent):]))
        return text
    return sent


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None
