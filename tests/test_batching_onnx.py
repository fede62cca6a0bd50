"""Micro-batched serving of ONNX artifacts (backends/onnx/batch.py) on the real engine.

The worker is driven directly where the test is about tokens (no HTTP timing decides which
requests share a micro-batch); the real server where it is about slots, cancellation and 429s.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import edgequant
from edgequant.registry import open_runner
from edgequant.runner import GenerateParams
from edgequant.serving.metrics import Metrics
from edgequant.serving.scheduling import Job, ModelWorker
from serve_helpers import running_server, scrape, wait_until

pytest.importorskip("onnxruntime_genai", reason="its extra is not installed")
pytest.importorskip("fastapi", reason="its extra is not installed")
pytest.importorskip("uvicorn", reason="its extra is not installed")

MODEL = "onnx-int8"
CTX = 1024
# Prompts of different lengths, so the micro-batch pads all but the longest.
PROMPTS = ["The history of", "Rivers flow into the sea because the water of every mountain", "A",
           "Once upon a time there was a small town where"]


@pytest.fixture(scope="module")
def artifact(onnx_tiny):
    return edgequant.convert(onnx_tiny, "onnx:int8")


def _served(artifact, jobs: list, batch: int) -> tuple[list[str], dict]:
    """The answers a worker of `batch` slots gives to `jobs` submitted at once (they queue while it
    starts the first), and the micro-batches it launched by size. With batch 1 the worker runs one
    request at a time on the runner's own `generate`: each job alone."""
    with open_runner(artifact.path, n_ctx=CTX, need_logits=False) as runner:
        jobs = [(runner.prompt_ids(text), params) for text, params in jobs]
        worker = ModelWorker(MODEL, runner, 8, Metrics(), batch=batch)  # it declares the metrics it records
        launched = worker._decoder.launched if worker._decoder is not None else None
        return asyncio.run(_answers(worker, jobs)), launched


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


def test_concurrent_greedy_requests_share_a_micro_batch_and_answer_as_alone(artifact):
    jobs = [(text, GenerateParams(max_tokens=n)) for text, n in zip(PROMPTS, (24, 40, 16, 32))]  # rows end at different steps
    alone, _ = _served(artifact, jobs, batch=1)
    together, launched = _served(artifact, jobs, batch=4)
    assert together == alone
    assert launched == {4: 1}, launched  # one micro-batch held all four


def test_a_sampled_request_runs_alone_and_repeats_its_answer(artifact):
    """A seeded request is not batched with others (one generator draws one random stream)."""
    sampled = GenerateParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=42)
    jobs = [(PROMPTS[0], GenerateParams(max_tokens=20)), (PROMPTS[1], sampled), (PROMPTS[2], GenerateParams(max_tokens=20))]
    alone, _ = _served(artifact, jobs, batch=1)
    together, launched = _served(artifact, jobs, batch=4)
    assert together == alone
    assert launched == {2: 1, 1: 1}, launched


def test_a_sequence_started_while_a_micro_batch_runs_waits_for_the_next_one(artifact):
    """The decoder contract itself: rows join only between micro-batches; a finished row stops answering."""
    with open_runner(artifact.path, n_ctx=CTX, need_logits=False) as runner:
        prompts = [runner.prompt_ids(text) for text in PROMPTS[:3]]
        alone = [list(runner.generate(p, GenerateParams(max_tokens=8, stop_at_eos=False))) for p in prompts]
        decoder = runner.batch_decoder(4, 4 * CTX)
        decoder.start(0, prompts[0], GenerateParams(max_tokens=8))
        decoder.start(1, prompts[1], GenerateParams(max_tokens=8))
        got = {seq_id: [token] for seq_id, token in _next(decoder).items()}
        decoder.start(2, prompts[2], GenerateParams(max_tokens=8))  # a micro-batch runs: it waits
        while len(got[1]) < 8:
            sampled = _next(decoder)
            assert 2 not in sampled and (0 in sampled) == (len(got[0]) < 3), sampled
            for seq_id, token in sampled.items():
                got[seq_id].append(token)
            if len(got[0]) == 3:
                decoder.finish(0)  # stopped early: no more tokens for it
        decoder.finish(1)
        got[2] = [_next(decoder)[2] for _ in range(8)]  # the next micro-batch
        decoder.close()
        assert [got[0], got[1], got[2]] == [alone[0][:3], alone[1], alone[2]]
        assert decoder.launched == {2: 1, 1: 1}


def test_a_row_at_the_end_of_the_models_context_gets_an_end_token(artifact):
    """genai stops at its context length (1024 here); the row is then ended, never left hanging."""
    with open_runner(artifact.path, n_ctx=CTX, need_logits=False) as runner:
        decoder = runner.batch_decoder(2, 4 * CTX)
        decoder.start(0, (runner.tokenize("the ") * 1010)[:1010], GenerateParams(max_tokens=50))
        tokens = [_next(decoder)[0] for _ in range(15)]
        decoder.close()
    assert not any(runner.is_eos(t) for t in tokens[:14]) and runner.is_eos(tokens[14]), tokens


def _next(decoder) -> dict[int, int]:
    """The next step that samples anything (a decoder gathering rows answers nothing for ~20 ms)."""
    for _ in range(1000):
        if sampled := decoder.step():
            return sampled
    raise AssertionError("the decoder never launched a micro-batch")


# -- the real server ---------------------------------------------------------------------------

GENERATED = f'edgequant_generated_tokens_total{{model="{MODEL}"}}'
IN_FLIGHT = f'edgequant_in_flight_requests{{model="{MODEL}"}}'
QUEUED = f'edgequant_queue_depth{{model="{MODEL}"}}'
CANCELLED = f'edgequant_cancelled_requests_total{{model="{MODEL}"}}'
LONG, ENDLESS = CTX - 64, "the the the"  # the tiny model's greedy answer to ENDLESS has no EOS in LONG tokens


@pytest.fixture(scope="module")
def server(artifact):
    with running_server(str(artifact.path), "--batch", "2", "--max-queue", "1", "--ctx", str(CTX),
                        "--max-tokens-cap", str(CTX)) as (base, _proc):
        yield base


def _complete(base: str, prompt: str, max_tokens: int) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def test_a_stream_cancelled_midway_frees_its_slot(server, artifact):
    before, cancelled = scrape(server, GENERATED), scrape(server, CANCELLED)
    body = {"model": MODEL, "prompt": ENDLESS, "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        for _ in zip(range(3), response.iter_lines()):
            pass  # read a few events, then hang up
    wait_until(lambda: scrape(server, IN_FLIGHT) == 0, 60, "the worker to drop the disconnected request")
    assert scrape(server, CANCELLED) == cancelled + 1 and scrape(server, GENERATED) - before < LONG  # stopped midway
    after = _complete(server, PROMPTS[1], 12)
    assert after.status_code == 200
    assert after.json()["choices"][0]["text"] == _served(artifact, [(PROMPTS[1], GenerateParams(max_tokens=12))], batch=1)[0][0]


def test_queue_overflow_answers_429(server):
    """Two slots and a queue of one: a burst of long requests gets 200s and 429s, nothing else."""
    with ThreadPoolExecutor(8) as pool:
        codes = [r.status_code for r in pool.map(lambda _: _complete(server, ENDLESS, LONG), range(8))]
    assert set(codes) <= {200, 429} and 429 in codes and codes.count(200) >= 2, codes
    assert _complete(server, PROMPTS[2], 4).status_code == 200  # and it keeps serving
