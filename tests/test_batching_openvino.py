"""OpenVINO artifacts decode several requests together (GenAI's continuous-batching pipeline).

The real engine on the tiny Llama at openvino:int8: the worker itself checks that batched text is
the text each request gets alone, and the real server checks that a stream cut off midway frees
its slot and that a burst past the queue's bound is refused with 429.
"""

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import edgequant
from edgequant.registry import open_runner
from edgequant.runner import GenerateParams
from edgequant.serving.metrics import Metrics
from edgequant.serving.scheduling import ModelWorker
from serve_helpers import assert_batched_as_alone, running_server, scrape, submit_all, wait_until
from tiny_model import copy_that_never_ends

pytest.importorskip("openvino_genai", reason="its extra is not installed")
pytest.importorskip("fastapi", reason="its extra is not installed")
pytest.importorskip("uvicorn", reason="its extra is not installed")

CTX = 1024
PROMPTS = [
    "The history of the river",
    "Once upon a time",
    "Rain falls on the hills and " * 40,  # over one step's 256 prompt tokens: prefilled in chunks beside the others
    "A",
]


@pytest.fixture(scope="module")
def artifact(tiny_model):
    return edgequant.convert(tiny_model, "openvino:int8")


@pytest.fixture(scope="module")
def batched(artifact):
    worker = _worker(artifact, batch=4)
    yield worker
    worker.stop()


def _worker(artifact, batch: int) -> ModelWorker:
    metrics = Metrics()
    metrics.counter("edgequant_generated_tokens_total", "")
    metrics.counter("edgequant_cancelled_requests_total", "")
    return ModelWorker("openvino-int8", open_runner(artifact.path, n_ctx=CTX, need_logits=False), 8, metrics, batch=batch)


def test_requests_decoded_together_get_the_text_each_gets_alone(artifact, batched):
    params = [GenerateParams(max_tokens=n) for n in (40, 24, 32, 40)]  # different lengths: slots free at different steps
    # Exact: GenAI's paged attention gives a sequence the same arithmetic whatever shares its step
    # (checked token for token, chunked prefill included), so there is no tolerance to allow for.
    assert_batched_as_alone(batched, _worker(artifact, batch=1), PROMPTS, params)  # batch 1: LLMPipeline alone


def test_a_seeded_sampled_request_draws_the_same_tokens_with_or_without_company(batched):
    sampled = GenerateParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=42)
    alone = asyncio.run(submit_all(batched, PROMPTS[:1], [sampled]))[0][0]
    with_company = asyncio.run(submit_all(batched, PROMPTS, [sampled] + [GenerateParams(max_tokens=24)] * 3))[0][0]
    assert alone == with_company and alone


def test_finish_takes_a_running_request_out_of_the_pipeline(artifact):
    """The worker's bookkeeping frees a slot whatever the decoder does; this checks the engine side:
    a sequence finished midway stops costing the pipeline work and cache, and its slot starts clean."""
    with open_runner(artifact.path, n_ctx=CTX, need_logits=False) as runner:
        decoder = runner.batch_decoder(2, 2 * CTX)
        ids = runner.prompt_ids(PROMPTS[0])
        decoder.start(0, ids, GenerateParams(max_tokens=500))
        decoder.start(1, ids, GenerateParams(max_tokens=500))
        first = [decoder.step() for _ in range(2)]
        assert all(set(tokens) == {0, 1} for tokens in first)
        decoder.finish(0)  # mid-generation, as for a cancelled request
        assert [set(decoder.step()) for _ in range(2)] == [{1}, {1}]
        engine = decoder._pipeline.get_metrics()  # the pipeline's own count of what its last step held
        assert (engine.requests, engine.scheduled_requests) == (1, 1)
        decoder.finish(1)
        decoder.start(0, ids, GenerateParams(max_tokens=2))  # the slot again: same text as the first time
        assert [decoder.step()[0] for _ in range(2)] == [tokens[0] for tokens in first]




# -- the real server -------------------------------------------------------------------------------

MODEL = "openvino-int8"
IN_FLIGHT = f'edgequant_in_flight_requests{{model="{MODEL}"}}'
CANCELLED = f'edgequant_cancelled_requests_total{{model="{MODEL}"}}'
GENERATED = f'edgequant_generated_tokens_total{{model="{MODEL}"}}'


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    # A model that never ends at EOS greedily, and ctx 4096: a 4000-token request (about 3 s here)
    # that a client hangs up on while it still runs, even on this tiny fast model and whatever CPU
    # runs it. (The tiny model's own answer ended at EOS after 291 tokens, a quarter second.)
    endless = edgequant.convert(copy_that_never_ends(tiny_model, tmp_path_factory.mktemp("endless") / "model"), "openvino:int8")
    with running_server(str(endless.path), "--batch", "4", "--max-queue", "2", "--ctx", "4096",
                        "--max-tokens-cap", "4000") as (base, _proc):
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == MODEL
        yield base


def test_a_stream_cut_off_midway_frees_its_slot(server):
    cancelled, generated = scrape(server, CANCELLED), scrape(server, GENERATED)
    body = {"model": MODEL, "prompt": "Write a very long story:", "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        for _ in zip(range(5), response.iter_lines()):
            pass  # a few events, then hang up
    wait_until(lambda: scrape(server, IN_FLIGHT) == 0, 60, "the worker to drop the disconnected request")
    assert scrape(server, CANCELLED) == cancelled + 1 and scrape(server, GENERATED) - generated < 4000  # stopped midway
    after = httpx.post(f"{server}/v1/completions", timeout=60,
                       json={"model": MODEL, "prompt": "Still there", "max_tokens": 8, "temperature": 0})
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 8


def test_a_burst_past_the_queue_gets_429_and_the_rest_complete(server):
    def one(i: int) -> int:
        return httpx.post(f"{server}/v1/completions", timeout=120,
                          json={"model": MODEL, "prompt": f"Request {i} is about", "max_tokens": 400, "temperature": 0}).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(16)))
    # 4 decoding + 2 queued (+1 the worker holds while the cache is full) fit; the rest are refused at once
    assert set(codes) == {200, 429} and codes.count(200) >= 4, codes
    wait_until(lambda: scrape(server, IN_FLIGHT) == 0, 60, "every accepted request to finish")


def test_a_batched_server_stops_on_sigterm_without_crashing(artifact):
    """OpenVINO's CPU plugin gave the thread that loaded it a signal stack that GenAI's pipeline
    freed on unload; the server's main thread then died with SIGSEGV (-11) re-raising SIGTERM
    after its graceful shutdown (backends/openvino/signal_stack.py)."""
    with running_server(str(artifact.path), "--batch", "4", "--ctx", str(CTX)) as (base, proc):
        answer = httpx.post(f"{base}/v1/completions", timeout=60,
                            json={"model": MODEL, "prompt": "The history of", "max_tokens": 8, "temperature": 0})
        assert answer.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, 128 + signal.SIGTERM)  # terminated, not crashed
