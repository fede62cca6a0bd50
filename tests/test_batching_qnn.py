"""QNN artifacts serve several requests by fair interleaving of their batch-1 graphs (interleave.py).

The real engine on the tiny Llama at qnn:w8a16 with prompt chunks of 16 tokens in a context of
128: the worker itself checks that interleaved text is the text each request gets alone, that a
running stream keeps getting tokens while a long prompt is prefilled beside it, and that a
cancelled request frees its slot. Order is read from the events the worker emits, never timings.
"""

import asyncio
import threading
from dataclasses import dataclass, field

import pytest

import edgequant
from edgequant.registry import open_runner
from edgequant.runner import GenerateParams
from edgequant.serving.metrics import Metrics
from edgequant.serving.scheduling import Delta, Job, ModelWorker
from serve_helpers import Collected, collect, metric_value, wait_until

CHUNK, CTX = 16, 128
SPEC = f"qnn:w8a16?ar={CHUNK}&ctx={CTX}&samples=2"
NO_EOS = "The history of the river"  # the tiny model's greedy text has no EOS for over 100 tokens after it
PROMPTS = [
    "The history of the river",
    "Once upon a time",
    "Rain falls on the hills and " * 6,  # several prompt chunks, prefilled beside the others
    "A",
]


@pytest.fixture(scope="module")
def artifact(tiny_model):
    return edgequant.convert(tiny_model, SPEC)


@pytest.fixture(scope="module")
def fixed_artifact(tiny_model):
    return edgequant.convert(tiny_model, "qnn:w8a16?graphs=fixed&seq=64&samples=2")


def _worker(path, batch: int, n_ctx: int = CTX) -> ModelWorker:
    return ModelWorker("qnn", open_runner(path, n_ctx=n_ctx, need_logits=False), 8, Metrics(), batch=batch)


@pytest.mark.parametrize("graphs", ["kv", "fixed"])
def test_requests_interleaved_get_the_text_each_gets_alone(request, graphs):
    path = request.getfixturevalue("artifact" if graphs == "kv" else "fixed_artifact").path
    n_ctx = CTX if graphs == "kv" else 64
    prompts = PROMPTS if graphs == "kv" else [p[:60] for p in PROMPTS]  # the window holds 64 tokens in all
    params = [GenerateParams(max_tokens=n) for n in (24, 12, 16, 24)]  # different lengths: slots free at different steps
    batched = _worker(path, batch=4, n_ctx=n_ctx)
    alone_worker = _worker(path, batch=1, n_ctx=n_ctx)  # what `serve --batch 1` runs: the runner's own generate
    try:
        together = asyncio.run(_run(batched, prompts, params))
        alone = [asyncio.run(_run(alone_worker, [p], [q]))[0] for p, q in zip(prompts, params)]
    finally:
        batched.stop()
        alone_worker.stop()
    # Exact: every sequence runs the very graph calls it runs alone (its own cache, its own rng).
    assert [r.text for r in together] == [r.text for r in alone]
    assert all(r.text for r in together)
    assert max(r.first for r in together) < min(r.last for r in together), "the requests did not overlap"


def test_a_short_request_overtakes_a_long_prompt_being_prefilled(artifact):
    """A long prompt goes in first, a short request right behind it: interleaved, the short one gets
    all its tokens while the long prompt is still being prefilled chunk by chunk (one at a time, it
    would wait for the long request to end)."""
    worker = _worker(artifact.path, batch=2)
    events: list[tuple[str, Delta]] = []
    long_prompt = worker.runner.prompt_ids("Rain falls on the hills and " * 12)[:7 * CHUNK + 4]  # eight chunks
    try:
        async def scenario():
            long = _job(worker, "long", long_prompt, GenerateParams(max_tokens=4), events)
            short = _job(worker, "short", worker.runner.prompt_ids(NO_EOS), GenerateParams(max_tokens=4), events)
            return await asyncio.gather(collect(long), collect(short))

        asyncio.run(scenario())
    finally:
        worker.stop()
    # The short request may be admitted a step or two after the long one (the worker may take the
    # queue before it is submitted), and ends by its fourth step; the long one's first token comes
    # at its eighth.
    names = [name for name, _ in events]
    short_end = next(i for i, (name, delta) in enumerate(events) if name == "short" and delta.finish_reason)
    assert short_end < names.index("long"), names
    assert events[short_end][1].completion_tokens == 4


def test_prefill_runs_one_chunk_per_step_beside_running_decodes(artifact):
    """The decoder itself: a sequence prefilling n chunks yields its first token at its n-th step,
    and every generating sequence yields one token in each of those steps."""
    with open_runner(artifact.path, n_ctx=CTX, need_logits=False) as runner:
        decoder = runner.batch_decoder(2, 2 * CTX)
        decoder.start(0, runner.prompt_ids(NO_EOS), GenerateParams(max_tokens=100))
        assert set(decoder.step()) == {0}
        long_prompt = runner.prompt_ids("Rain falls on the hills and " * 12)[:5 * CHUNK + 3]  # six chunks, the last partial
        decoder.start(1, long_prompt, GenerateParams(max_tokens=4))
        assert [set(decoder.step()) for _ in range(6)] == [{0}] * 5 + [{0, 1}]
        decoder.close()


def test_a_cancelled_stream_frees_its_slot(artifact):
    worker = _worker(artifact.path, batch=2)
    events: list[tuple[str, Delta]] = []
    budget = GenerateParams(max_tokens=CTX - 16, stop_at_eos=False)
    try:
        async def scenario():
            prompt = worker.runner.prompt_ids(NO_EOS)
            running = _job(worker, "running", prompt, budget, events)
            cancelled = _job(worker, "cancelled", prompt, budget, events)
            await cancelled.out.get()
            cancelled.cancelled.set()  # as the app does when a client goes away
            # Both slots were taken: this request can start only in the one the cancel frees.
            after = _job(worker, "after", worker.runner.prompt_ids("Still there"), GenerateParams(max_tokens=4), events)
            return await asyncio.gather(collect(running), collect(after)), cancelled

        (_, after), cancelled = asyncio.run(scenario())
        wait_until(lambda: worker.in_flight == 0, 30, "the worker to retire every request")
        assert not cancelled.completed
        assert metric_value(worker.metrics.render(), 'edgequant_cancelled_requests_total{model="qnn"}') == 1
    finally:
        worker.stop()
    names = [name for name, _ in events]
    assert names.index("after") < len(names) - 1 - names[::-1].index("running"), "the new request waited for the running one"
    assert after.text


@dataclass
class _RecordedJob(Job):
    """A job whose deltas are also logged, in the order the worker emits them, under `tag`."""
    tag: str = ""
    log: list = field(default_factory=list)

    def emit(self, delta: Delta) -> None:
        with _LOG_LOCK:
            self.log.append((self.tag, delta))
        super().emit(delta)


_LOG_LOCK = threading.Lock()


def _job(worker: ModelWorker, tag: str, ids: list[int], params: GenerateParams, log: list) -> Job:
    job = _RecordedJob(ids, params, [], asyncio.get_running_loop(), asyncio.Queue(), tag=tag, log=log)
    worker.submit(job)
    return job


async def _run(worker: ModelWorker, prompts: list[str], params: list[GenerateParams]) -> list[Collected]:
    """Submit every prompt at once; each job's text, first-token time and the time its last delta arrived."""
    jobs = [_job(worker, str(i), worker.runner.prompt_ids(p), q, []) for i, (p, q) in enumerate(zip(prompts, params))]
    return [await collect(job) for job in jobs]
