"""Request scheduling for the server: a bounded queue and one worker thread per served model.

A runner is not thread-safe and the CPU is the bottleneck, so each model has one worker thread.
Requests wait in a bounded queue and are refused at once when it is full. When the runner offers
a batch decoder (every built-in format: each engine's own batched path, or QNN's fair
interleaving), the worker advances up to `batch` requests together, one `step` for all of them;
otherwise, or with `batch` 1, it runs one request at a time. A worker over a base several
artifacts share gives each request its artifact's adapter; a decoder that cannot mix adapters in
one step gets requests of one adapter at a time, in queue order. Either way text deltas go back
to the asyncio side through `loop.call_soon_threadsafe` (a batched worker hands over a whole
step's deltas in one call: each call wakes the event loop through a pipe), and a cancel flag is
checked between tokens, so a client that disconnects or times out stops its generation within one
step.

Every job a worker takes off its queue is retired exactly once, however it ends: skipped because it
was cancelled while queued, run to its end, failed, stopped by its cancel flag, or dropped at
shutdown. Retiring is the one place that counts tokens and cancellations.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
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
    completed: bool = False  # its final delta went out: a cancel flag set afterwards stopped nothing
    outbox: "Outbox | None" = None  # set by a batched worker: its deltas go out once per step

    def emit(self, delta: Delta) -> None:
        if self.outbox is not None:
            self.outbox.put(self, delta)
        else:
            self.loop.call_soon_threadsafe(self.out.put_nowait, delta)


class Outbox:
    """The deltas of one decode step, handed to each event loop in one wake-up.

    At 4 clients one wake-up per delta cost the worker 1.7% of its time (py-spy, 2026-12-05),
    on cores llama.cpp's threads need.
    """

    def __init__(self):
        self._items: list[tuple[Job, Delta]] = []

    def put(self, job: Job, delta: Delta) -> None:
        self._items.append((job, delta))

    def flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Delta]]] = {}
        for job, delta in self._items:
            by_loop.setdefault(job.loop, []).append((job, delta))
        self._items = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: its clients are gone, stop their requests
                for job, _ in items:
                    job.cancelled.set()


def _deliver(items: list[tuple[Job, Delta]]) -> None:
    for job, delta in items:
        job.out.put_nowait(delta)


class JobStream:
    """Turns one job's sampled tokens into text deltas: stop strings, EOS, token budget, UTF-8.

    Text is decoded incrementally: each token decodes only the few ids since the last complete
    text, with the ids before them as context (a tokenizer may render a token differently at the
    start of a text), so a long answer costs the same per token as a short one.
    """

    def __init__(self, job: Job, runner: Runner):
        self.job, self.runner = job, runner
        self.ids: list[int] = []
        self.text = ""  # the answer's complete text so far
        self.sent = ""  # text already emitted
        self.generated = 0
        self.holdback = max((len(s) for s in job.stop), default=1) - 1  # text that may start a stop string
        self._context = 0  # ids[_context:_decoded] give the context for decoding ids[_decoded:]
        self._decoded = 0

    def feed(self, token: int) -> bool:
        """Take one sampled token; True once the job is finished (its last delta emitted)."""
        if self.job.first_token_at is None:
            self.job.first_token_at = time.perf_counter()
        self.generated += 1
        if self.runner.is_eos(token):
            return self.finish("stop")
        self.ids.append(token)
        pending = self._pending_text()
        if not pending.endswith("\ufffd"):  # never split a UTF-8 character across deltas
            self.text += pending
            self._context, self._decoded = self._decoded, len(self.ids)
        cut = _first_stop(self.text, self.job.stop)
        if cut is not None:
            return self.finish("stop", self.text[:cut])
        self._flush(self.text[: len(self.text) - self.holdback])
        if self.generated >= self.job.params.max_tokens:
            return self.finish("length")
        return False

    def _pending_text(self) -> str:
        """The text of the ids not yet in `text`, decoded after their context ids."""
        if self._decoded == len(self.ids):
            return ""
        context = self.runner.detokenize(self.ids[self._context:self._decoded])
        return self.runner.detokenize(self.ids[self._context:])[len(context):]

    def finish(self, reason: str, final_text: str | None = None) -> bool:
        self._flush(final_text if final_text is not None else self.text + self._pending_text())
        self.job.completed = True
        self.job.emit(Delta(finish_reason=reason, prompt_tokens=len(self.job.prompt_ids), completion_tokens=self.generated))
        return True

    def _flush(self, text: str) -> None:
        if len(text) > len(self.sent):
            self.job.emit(Delta(text=text[len(self.sent):]))
            self.sent = text


def declare_worker_metrics(metrics) -> None:
    """The figures a worker records, declared in `metrics` unless they already are."""
    from edgequant.serving.metrics import OCCUPANCY_BUCKETS, TTFT_BUCKETS

    for name, text in (("edgequant_generated_tokens_total", "Tokens generated, including those of cancelled requests"),
                       ("edgequant_cancelled_requests_total", "Generations stopped early: client gone, timeout or shutdown")):
        if not metrics.has(name):
            metrics.counter(name, text)
    for name, text, buckets in (
            ("edgequant_queue_seconds", "Time from admission to the engine starting the request", TTFT_BUCKETS),
            ("edgequant_batch_occupancy", "Requests given a token by each batched decode step", OCCUPANCY_BUCKETS)):
        if not metrics.has(name):
            metrics.histogram(name, text, buckets)


class ModelWorker:
    def __init__(self, name: str, runner: Runner, max_queue: int, metrics, batch: int = 1, batch_ctx: int = 0,
                 adapters: tuple[str, ...] = ()):
        """`adapters`: for a runner over a base several artifacts share, their served names, each
        standing for its adapter (a request's `GenerateParams.adapter`)."""
        self.name, self.runner, self.metrics, self.adapters = name, runner, metrics, adapters
        declare_worker_metrics(metrics)
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._running = 0
        self._decoder = runner.batch_decoder(batch, batch_ctx or batch * runner.n_ctx) if batch > 1 else None
        self._outbox = Outbox()
        self._reserved_tokens = 0  # prompt + budget of every running request: the cache they may fill
        loop = self._batched_loop if self._decoder is not None else self._serial_loop
        self._thread = threading.Thread(target=loop, name=f"edgequant-worker-{name}", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    @property
    def slots(self) -> int:
        """Requests decoded together: the batch decoder's sequences, or 1."""
        return self._decoder.n_seq if self._decoder is not None else 1

    @property
    def cache_tokens(self) -> int:
        """Tokens the cache holds for all running requests together."""
        return self._decoder.n_ctx if self._decoder is not None else self.runner.n_ctx

    @property
    def cache_use(self) -> float:
        """Share of the cache the running requests have reserved (prompt plus token budget each)."""
        return self._reserved_tokens / self.cache_tokens if self.cache_tokens else 0.0

    def describe(self) -> str:
        """One line for the server's start-up: how many requests run together in how much cache."""
        how = (f"{self.slots} requests decoded together ({type(self._decoder).__module__})"
               if self._decoder is not None else "one request at a time (this engine has no batch decoder)")
        shared = f", one base for the adapters of {', '.join(self.adapters)}" if self.adapters else ""
        return f"{self.name}: {how}, cache of {self.cache_tokens} tokens, queue of {self._jobs.maxsize}{shared}"

    @property
    def in_flight(self) -> int:
        return self._jobs.qsize() + self._running

    def submit(self, job: Job) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def stop(self) -> None:
        """Cancel queued jobs and end the thread after the running ones notice their cancel flag."""
        self._cancel_queued()
        self._jobs.put(None)
        self._thread.join(timeout=30)
        self._cancel_queued()  # submitted behind the end marker: no worker will ever take them
        if self._decoder is not None:
            self._decoder.close()
        self.runner.close()

    def _cancel_queued(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._shut_down(job)
                self._retire(job)

    @staticmethod
    def _shut_down(job: Job) -> None:
        job.cancelled.set()
        job.emit(Delta(finish_reason="stop", error="server shutting down"))

    # -- one request at a time -------------------------------------------------------------

    def _serial_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():  # cancelled while queued: never started, but still a cancellation
                self._retire(job)
                continue
            stream = JobStream(job, self.runner)
            self._started(job)
            self._running = 1
            try:
                self._run_one(stream)
            except Exception as exc:  # a failing request must never take the worker down
                job.emit(Delta(finish_reason="stop", error=f"generation failed: {type(exc).__name__}"))
            finally:
                self._retire(job, stream.generated)  # before the worker counts as idle, so idle means accounted for
                self._running, self._reserved_tokens = 0, 0

    def _run_one(self, stream: JobStream) -> None:
        job, done = stream.job, False
        for token in self.runner.generate(job.prompt_ids, job.params):
            if job.cancelled.is_set():
                break
            if done := stream.feed(token):
                break
        if not done and not job.cancelled.is_set():
            stream.finish("length")  # the context ran out before the token budget

    # -- several requests per step -----------------------------------------------------------

    def _batched_loop(self) -> None:
        active, waiting, free_slots = {}, deque(), list(range(self._decoder.n_seq))
        while True:
            try:
                if not self._admit(active, waiting, free_slots):
                    for slot in list(active):  # shutting down: end what is still running
                        self._shut_down(active[slot].job)
                        self._release(active, free_slots, slot)
                    return
                self._step(active, free_slots)
            finally:
                self._outbox.flush()

    def _step(self, active: dict, free_slots: list) -> None:
        """One decode step for every active request: feed each its token, release the finished."""
        try:
            sampled = self._decoder.step()
        except Exception as exc:  # fail the requests in this step, keep serving
            for slot in list(active):
                active[slot].job.emit(Delta(finish_reason="stop", error=f"generation failed: {type(exc).__name__}"))
                self._release(active, free_slots, slot)
            return
        if sampled:  # a step that gave tokens (a gathering or prefill step gives none)
            self.metrics.observe("edgequant_batch_occupancy", len(sampled), model=self.name)
        for slot, token in sampled.items():
            stream = active[slot]
            try:
                done = stream.job.cancelled.is_set() or stream.feed(token)
            except Exception as exc:  # one request's failure must not end the others
                stream.job.emit(Delta(finish_reason="stop", error=f"generation failed: {type(exc).__name__}"))
                done = True
            if done:
                self._release(active, free_slots, slot)

    def _admit(self, active: dict, waiting: deque, free_slots: list) -> bool:
        """Move queued jobs into free sequence slots while the KV cache has room; False to exit."""
        for slot in [s for s, stream in active.items() if stream.job.cancelled.is_set()]:
            self._release(active, free_slots, slot)
        while free_slots:
            if not waiting:
                try:  # block only when there is nothing to decode
                    waiting.append(self._jobs.get() if not active else self._jobs.get_nowait())
                except queue.Empty:
                    break
            job = waiting[0]
            if job is None:
                return False
            if job.cancelled.is_set():  # cancelled while queued: never started, but still a cancellation
                self._retire(waiting.popleft())
                continue
            if active and self._reserved(active) + len(job.prompt_ids) + job.params.max_tokens > self._decoder.n_ctx:
                break  # wait for a running request to finish and free cache
            if active and not self._joins_adapter(active, job):
                break  # the engine decodes one adapter per step: this request starts when the running ones end
            waiting.popleft()
            slot = free_slots.pop()
            job.outbox = self._outbox
            self._started(job)
            try:
                self._decoder.start(slot, job.prompt_ids, job.params)
            except Exception as exc:  # an engine that refuses one request must not take the worker down
                job.emit(Delta(finish_reason="stop", error=f"generation failed: {type(exc).__name__}"))
                with contextlib.suppress(Exception):  # whatever part of the sequence the engine made
                    self._decoder.finish(slot)
                free_slots.append(slot)
                self._retire(job)
                continue
            active[slot] = JobStream(job, self.runner)
        self._running, self._reserved_tokens = len(active), self._reserved(active)
        return True

    def _joins_adapter(self, active: dict, job: Job) -> bool:
        """Whether `job` may decode beside `active`: same adapter, or a decoder that mixes them."""
        if getattr(self._decoder, "mixes_adapters", False):
            return True
        return job.params.adapter == next(iter(active.values())).job.params.adapter

    @staticmethod
    def _reserved(active: dict) -> int:
        return sum(len(s.job.prompt_ids) + s.job.params.max_tokens for s in active.values())

    def _release(self, active: dict, free_slots: list, slot: int) -> None:
        self._decoder.finish(slot)
        free_slots.append(slot)
        stream = active.pop(slot)
        self._retire(stream.job, stream.generated)
        self._running, self._reserved_tokens = len(active), self._reserved(active)

    def _started(self, job: Job) -> None:
        """A job leaves the queue for the engine: its wait is a queue-time sample."""
        self.metrics.observe("edgequant_queue_seconds", time.perf_counter() - job.enqueued, model=self.name)
        if self._decoder is None:
            self._reserved_tokens = len(job.prompt_ids) + job.params.max_tokens

    def _retire(self, job: Job, generated: int = 0) -> None:
        """Account for a job the worker is done with; called exactly once per job taken off the queue."""
        self.metrics.inc("edgequant_generated_tokens_total", generated, model=self.name)
        # The app sets the flag on every streamed request once it ends, so a set flag alone is not
        # a cancellation: only a job stopped before its final delta went out is one.
        if job.cancelled.is_set() and not job.completed:
            self.metrics.inc("edgequant_cancelled_requests_total", model=self.name)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None
