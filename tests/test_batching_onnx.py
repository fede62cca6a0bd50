"""Continuous batching of ONNX artifacts (backends/onnx/continuous.py) on the real engine.

The worker and the decoder are driven directly where the test is about tokens (no HTTP timing
decides which requests share a step); the real server where it is about slots, cancellation and 429s.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import edgequant
from edgequant.backends.onnx import continuous
from edgequant.registry import open_runner
from edgequant.runner import GenerateParams
from edgequant.serving.metrics import Metrics
from edgequant.serving.scheduling import Job, ModelWorker
from serve_helpers import UNEVEN_PROMPTS as PROMPTS
from serve_helpers import drive_decoder, running_server, scrape, wait_until
from tiny_model import copy_that_never_ends

pytest.importorskip("onnxruntime_genai", reason="its extra is not installed")
pytest.importorskip("fastapi", reason="its extra is not installed")
pytest.importorskip("uvicorn", reason="its extra is not installed")

MODEL = "onnx-int8"
CTX = 1024


@pytest.fixture(scope="module")
def artifact(onnx_tiny):
    return edgequant.convert(onnx_tiny, "onnx:int8")


def _served(artifact, jobs: list, batch: int) -> list[str]:
    """The answers a worker of `batch` slots gives to `jobs` submitted at once (they queue while it
    starts the first). With batch 1 the worker runs one request at a time on the runner's own
    `generate` (onnxruntime-genai): each job alone."""
    with open_runner(artifact.path, n_ctx=CTX, need_logits=False) as runner:
        jobs = [(runner.prompt_ids(text), params) for text, params in jobs]
        worker = ModelWorker(MODEL, runner, 8, Metrics(), batch=batch)  # it declares the metrics it records
        return asyncio.run(_answers(worker, jobs))


async def _answers(worker: ModelWorker, jobs: list) -> list[str]:
    loop = asyncio.get_running_loop()
    submitted = [Job(ids, params, [], loop, asyncio.Queue()) for ids, params in jobs]
    try:
        for job in submitted:
            worker.submit(job)
        return [await _text(job) for job in submitted]
    finally:
        await asyncio.to_thread(worker.stop)  # as the app's shutdown does, while the loop still takes deltas


async def _text(job: Job) -> str:
    parts = []
    while True:
        delta = await asyncio.wait_for(job.out.get(), timeout=120)
        assert delta.error is None, delta.error
        parts.append(delta.text)
        if delta.finish_reason:
            return "".join(parts)


def test_concurrent_greedy_requests_answer_as_alone_through_genai(artifact):
    """Batched on the raw session, each answer equals the one onnxruntime-genai gives it alone."""
    jobs = [(text, GenerateParams(max_tokens=n)) for text, n in zip(PROMPTS, (24, 40, 16, 32))]  # rows end at different steps
    assert _served(artifact, jobs, batch=4) == _served(artifact, jobs, batch=1)


def test_sequences_join_and_leave_a_running_batch_and_answer_as_alone(artifact):
    """Sequences start while others decode and finish at different steps (their rows move to keep
    the batch contiguous); greedy and seeded-sampled tokens equal each sequence decoded alone."""
    sampled = GenerateParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=42)
    with open_runner(artifact.path, n_ctx=CTX, need_logits=False) as runner:
        prompts = [runner.prompt_ids(text) for text in PROMPTS]
        plan = {0: (prompts[0], GenerateParams(max_tokens=30), 0), 1: (prompts[1], sampled, 0),
                1_000: (prompts[2], GenerateParams(max_tokens=6), 3), 7: (prompts[3], sampled, 9)}
        decoder = runner.batch_decoder(4, 4 * CTX)
        together = drive_decoder(decoder, plan)
        alone = {seq_id: drive_decoder(decoder, {seq_id: (prompt, params, 0)})[seq_id] for seq_id, (prompt, params, _) in plan.items()}
        decoder.close()
    assert together == alone


def test_a_long_prompt_prefills_a_chunk_per_step_while_others_decode(artifact, monkeypatch):
    """With 8-token chunks, a 60-token prompt takes 8 steps; the running sequence gets a token in
    each of them, and both answers equal their answers alone."""
    monkeypatch.setattr(continuous, "PREFILL_CHUNK", 8)
    with open_runner(artifact.path, n_ctx=CTX, need_logits=False) as runner:
        long_prompt = runner.prompt_ids(" ".join(PROMPTS) * 2)[:60]
        short = runner.prompt_ids(PROMPTS[0])
        decoder = runner.batch_decoder(2, 2 * CTX)
        decoder.start(0, short, GenerateParams(max_tokens=20))
        first = decoder.step()
        decoder.start(1, long_prompt, GenerateParams(max_tokens=8))
        steps = [decoder.step() for _ in range(8)]
        assert all(0 in s for s in steps) and [1 in s for s in steps] == [False] * 7 + [True]
        decoder.close()
        together = [first[0]] + [s[0] for s in steps]
        alone_short = drive_decoder(decoder, {0: (short, GenerateParams(max_tokens=9), 0)})[0]
        alone_long = drive_decoder(decoder, {1: (long_prompt, GenerateParams(max_tokens=1), 0)})[1]
        decoder.close()
    assert together == alone_short and steps[-1][1] == alone_long[0]


def test_a_sequence_at_the_end_of_the_context_gets_an_end_token(artifact):
    """The server never asks for more than the context holds; a direct caller that does gets EOS."""
    with open_runner(artifact.path, n_ctx=64, need_logits=False) as runner:
        decoder = runner.batch_decoder(2, 128)
        decoder.start(0, (runner.tokenize("the ") * 60)[:60], GenerateParams(max_tokens=50))
        tokens = [decoder.step()[0] for _ in range(6)]  # the 5th is sampled from position 64's logits: no room to run it
        decoder.start(1, runner.tokenize("the ") * 70, GenerateParams(max_tokens=5))  # a prompt past the context
        refused = decoder.step()
        decoder.close()
    assert not any(runner.is_eos(t) for t in tokens[:5]) and runner.is_eos(tokens[5]), tokens
    assert runner.is_eos(refused[1])
# -- the real server ---------------------------------------------------------------------------

GENERATED = f'edgequant_generated_tokens_total{{model="{MODEL}"}}'
IN_FLIGHT = f'edgequant_in_flight_requests{{model="{MODEL}"}}'
QUEUED = f'edgequant_queue_depth{{model="{MODEL}"}}'
CANCELLED = f'edgequant_cancelled_requests_total{{model="{MODEL}"}}'
LONG, ENDLESS = CTX - 64, "the the the"  # the endless model's greedy answers have no EOS: they run LONG tokens


@pytest.fixture(scope="module")
def endless(onnx_tiny, tmp_path_factory):
    """A copy that never ends at EOS greedily: where the random model's answers end varies with the CPU."""
    return edgequant.convert(copy_that_never_ends(onnx_tiny, tmp_path_factory.mktemp("endless") / "model"), "onnx:int8")


@pytest.fixture(scope="module")
def server(endless):
    with running_server(str(endless.path), "--batch", "2", "--max-queue", "1", "--ctx", str(CTX),
                        "--max-tokens-cap", str(CTX)) as (base, _proc):
        yield base


def _complete(base: str, prompt: str, max_tokens: int) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def test_a_stream_cancelled_midway_frees_its_slot(server, endless):
    before, cancelled = scrape(server, GENERATED), scrape(server, CANCELLED)
    body = {"model": MODEL, "prompt": ENDLESS, "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        for _ in zip(range(3), response.iter_lines()):
            pass  # read a few events, then hang up
    wait_until(lambda: scrape(server, IN_FLIGHT) == 0, 60, "the worker to drop the disconnected request")
    assert scrape(server, CANCELLED) == cancelled + 1 and scrape(server, GENERATED) - before < LONG  # stopped midway
    after = _complete(server, PROMPTS[1], 12)
    assert after.status_code == 200
    assert after.json()["choices"][0]["text"] == _served(endless, [(PROMPTS[1], GenerateParams(max_tokens=12))], batch=1)[0]


def test_queue_overflow_answers_429(server):
    """Two slots and a queue of one: a burst of long requests gets 200s and 429s, nothing else."""
    with ThreadPoolExecutor(8) as pool:
        codes = [r.status_code for r in pool.map(lambda _: _complete(server, ENDLESS, LONG), range(8))]
    assert set(codes) <= {200, 429} and 429 in codes and codes.count(200) >= 2, codes
    assert _complete(server, PROMPTS[2], 4).status_code == 200  # and it keeps serving
