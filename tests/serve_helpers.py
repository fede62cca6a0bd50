"""Start the real server in a child process on a free 127.0.0.1 port, and stop it; wait on its state;
drive a worker or a runner's batch decoder directly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable, NamedTuple

import httpx

from edgequant.runner import GenerateParams

# Prompts of different lengths (a word to a dozen), so sequences decoded together hold caches of
# different lengths in one call.
UNEVEN_PROMPTS = ["The history of", "Rivers flow into the sea because the water of every mountain", "A",
                  "Once upon a time there was a small town where"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until it returns a true value, and return that; fail naming `what` after `timeout` s.

    Tests wait on the condition itself, never on a fixed sleep: a loaded machine only makes them slower.
    """
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return value


def metric_value(text: str, series: str) -> float:
    """The value of one series, written as the server renders it (`name{label="v"}`); 0 when absent."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0


def scrape(base: str, series: str, headers: dict | None = None) -> float:
    return metric_value(httpx.get(f"{base}/metrics", headers=headers).text, series)


@contextmanager
def running_server(*args: str, startup_timeout: float = 120.0):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgequant", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers_health(base, proc), startup_timeout, "the server to answer /health", interval=0.2)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _answers_health(base: str, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"server exited: {proc.stdout.read()}")
    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# -- driving a ModelWorker directly (no HTTP timing decides what a test sees) ------------------------

class Collected(NamedTuple):
    text: str
    first: float  # when the first token was sampled (perf_counter)
    last: float  # when the final delta arrived


async def collect(job) -> Collected:
    """Read one job's deltas to its final one; an error delta fails the test."""
    import asyncio

    text = ""
    while True:
        delta = await asyncio.wait_for(job.out.get(), timeout=60)
        assert delta.error is None, delta.error
        text += delta.text
        if delta.finish_reason:
            return Collected(text, job.first_token_at, time.perf_counter())


async def submit_all(worker, prompts: list[str], params: list, make_job=None) -> list[Collected]:
    """Submit every prompt at once (`make_job(ids, params)` builds each job; default a plain Job) and
    collect each job's answer."""
    import asyncio

    from edgequant.serving.scheduling import Job

    loop = asyncio.get_running_loop()
    build = make_job or (lambda ids, p: Job(ids, p, [], loop, asyncio.Queue()))
    jobs = [build(worker.runner.prompt_ids(prompt), p) for prompt, p in zip(prompts, params)]
    for job in jobs:
        worker.submit(job)
    return [await collect(job) for job in jobs]


def assert_batched_as_alone(batched, alone_worker, prompts: list[str], params: list) -> None:
    """Requests submitted together to `batched` get, each, the text `alone_worker` (a `--batch 1`
    worker, stopped here) gives it alone, and they really overlapped."""
    import asyncio

    together = asyncio.run(submit_all(batched, prompts, params))
    try:
        alone = [asyncio.run(submit_all(alone_worker, [p], [q]))[0] for p, q in zip(prompts, params)]
    finally:
        alone_worker.stop()
    assert [c.text for c in together] == [c.text for c in alone]
    assert all(c.text for c in together)
    assert max(c.first for c in together) < min(c.last for c in together), "the requests did not overlap: nothing was batched"


def drive_decoder(decoder, starts: dict[int, tuple[list[int], GenerateParams, int]], steps: int = 10_000) -> dict[int, list[int]]:
    """Drive `decoder`: start sequence s at step `starts[s][2]`, finish it once it has max_tokens."""
    got: dict[int, list[int]] = {}
    for step in range(steps):
        for seq_id, (prompt, params, at) in starts.items():
            if at == step:
                decoder.start(seq_id, prompt, params)
                got[seq_id] = []
        for seq_id, token in decoder.step().items():
            got[seq_id].append(token)
            if len(got[seq_id]) == starts[seq_id][1].max_tokens:
                decoder.finish(seq_id)
        if len(got) == len(starts) and all(len(got[s]) == starts[s][1].max_tokens for s in starts):
            return got
    raise AssertionError(f"unfinished after {steps} steps: {got}")
