"""The real server on 127.0.0.1, driven by the official openai client and raw HTTP."""

import asyncio
import json
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import edgequant
from edgequant.registry import open_runner
from edgequant.runner import GenerateParams
from edgequant.serving.metrics import Metrics
from edgequant.serving.scheduling import Job, ModelWorker
from serve_helpers import metric_value, running_server, submit_all

pytest.importorskip("fastapi", reason="its extra is not installed")
pytest.importorskip("uvicorn", reason="its extra is not installed")
pytest.importorskip("llama_cpp", reason="its extra is not installed")

KEY = "test-key-123"


@pytest.fixture(scope="module")
def artifact(tiny_model):
    return edgequant.convert(tiny_model, "gguf:q8_0")


@pytest.fixture(scope="module")
def server(artifact):
    with running_server(str(artifact.path), "--api-key", KEY, "--max-queue", "4", "--ctx", "512",
                        "--max-tokens-cap", "256", "--max-body-bytes", "20000") as (base, proc):
        yield base, proc


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=60)


MODEL = "gguf-q8_0"


def test_lists_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_is_deterministic_when_greedy(client):
    first = client.completions.create(model=MODEL, prompt="The history of", max_tokens=12, temperature=0)
    second = client.completions.create(model=MODEL, prompt="The history of", max_tokens=12, temperature=0)
    assert first.choices[0].text == second.choices[0].text and first.choices[0].text
    assert first.usage.completion_tokens == 12 and first.choices[0].finish_reason == "length"


def test_streamed_chat_reassembles_to_the_plain_answer(client):
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, seed=7)
    chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, seed=7, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content and streamed


def test_sampling_with_a_seed_is_reproducible(client):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0.9, top_p=0.9, seed=42)
    assert client.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text


def test_stop_string_ends_the_text(client):
    free = client.completions.create(model=MODEL, prompt="The history of", max_tokens=24, temperature=0).choices[0].text
    stop = free.strip()[3:6]
    assert stop
    cut = client.completions.create(model=MODEL, prompt="The history of", max_tokens=24, temperature=0, stop=[stop]).choices[0]
    assert stop not in cut.text and free.startswith(cut.text) and cut.finish_reason == "stop"


def test_wrong_or_missing_key_is_401_but_health_is_open(server):
    base = server[0]
    bad = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/health").status_code == 200


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "nope", "prompt": "hi"}).encode(), 404, "not served"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": -5}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 10**9}).encode(), 400, "cap"),
    (json.dumps({"model": MODEL, "prompt": "hi", "n": 3}).encode(), 400, "n"),
    (json.dumps({"model": MODEL, "prompt": "x" * 30000}).encode(), 413, "larger than"),
])
def test_bad_completion_requests_get_openai_errors(server, body, status, words):
    response = httpx.post(f"{server[0]}/v1/completions", content=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and "Traceback" not in response.text and "/" not in error["message"].replace("GET /v1/models", "")


def test_empty_messages_are_rejected_and_the_server_keeps_serving(server, client):
    response = httpx.post(f"{server[0]}/v1/chat/completions", json={"model": MODEL, "messages": []},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert client.completions.create(model=MODEL, prompt="Still", max_tokens=2, temperature=0).choices[0].text is not None


def test_burst_gets_answers_or_429_never_a_hang_or_5xx(server):
    def one(i):
        response = httpx.post(f"{server[0]}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                              json={"model": MODEL, "prompt": f"Request {i} is about", "max_tokens": 64, "temperature": 0})
        return response.status_code

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(one, range(32)))
    assert set(codes) <= {200, 429} and codes.count(200) >= 5, codes


def test_metrics_count_requests_and_tokens(server, client):
    client.completions.create(model=MODEL, prompt="Counting", max_tokens=5, temperature=0)
    text = httpx.get(f"{server[0]}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    ok = [line for line in text.splitlines() if line.startswith('edgequant_requests_total{path="/v1/completions",status="200"}')]
    assert ok and float(ok[0].split()[-1]) >= 1
    for name in ("edgequant_generated_tokens_total", "edgequant_time_to_first_token_seconds_count", "edgequant_queue_depth",
                 "edgequant_in_flight_requests", "edgequant_request_latency_seconds_bucket", "edgequant_tokens_per_second_count",
                 "edgequant_queue_seconds_count", "edgequant_batch_occupancy_count", "edgequant_cache_use_ratio"):
        assert name in text, name
    assert f'edgequant_batch_slots{{model="{MODEL}"}} 4' in text  # GGUF decodes --batch (default 4) requests together


def test_openapi_description_is_served(server):
    spec = httpx.get(f"{server[0]}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "/v1/chat/completions" in spec["paths"] and "/v1/completions" in spec["paths"]


def test_sigterm_shuts_down_cleanly(artifact):
    with running_server(str(artifact.path)) as (base, proc):
        with httpx.stream("POST", f"{base}/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "A long", "max_tokens": 200, "temperature": 0, "stream": True}) as response:
            proc.send_signal(signal.SIGTERM)  # mid-request: the request still ends properly
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        # uvicorn finishes the graceful shutdown, then re-raises the signal, which edgequant's own
        # handler turns into exit 143 once every `finally` has run: terminated, not crashed
        assert proc.wait(timeout=30) in (0, 128 + signal.SIGTERM)
        assert "Traceback" not in proc.stdout.read()


@pytest.mark.parametrize("batch", [1, 4], ids=["serial", "batched"])
def test_a_request_cancelled_while_queued_is_counted_once(artifact, batch):
    """The worker itself on the real runner, so no HTTP timing decides which stage a cancel hits:
    the second job is cancelled before it is submitted, so the worker can only meet it in its queue."""
    metrics = Metrics()
    metrics.counter("edgequant_generated_tokens_total", "")
    metrics.counter("edgequant_cancelled_requests_total", "")
    runner = open_runner(artifact.path, n_ctx=512, need_logits=False)
    asyncio.run(_cancel_one_queued_job(ModelWorker(MODEL, runner, 8, metrics, batch=batch)))
    assert _cancelled(metrics) == 1  # the worker's thread has ended: every job is accounted for


async def _cancel_one_queued_job(worker: ModelWorker) -> None:
    loop = asyncio.get_running_loop()
    ids = worker.runner.tokenize("The history of")
    running, queued, finished = (Job(ids, GenerateParams(max_tokens=32), [], loop, asyncio.Queue()) for _ in range(3))
    queued.cancelled.set()
    try:
        worker.submit(running)
        worker.submit(queued)
        await _final_delta(running)
        worker.submit(finished)
        await _final_delta(finished)  # the worker took it only after retiring the two queued before it
        assert _cancelled(worker.metrics) == 1
        finished.cancelled.set()  # as the app does once any streamed response ends: no cancellation of a finished job
    finally:
        await asyncio.to_thread(worker.stop)  # as the app's shutdown does, while the loop still takes deltas


async def _final_delta(job: Job) -> None:
    while not (delta := await asyncio.wait_for(job.out.get(), timeout=60)).finish_reason:
        pass
    assert delta.error is None, delta.error


def _cancelled(metrics: Metrics) -> float:
    return metric_value(metrics.render(), f'edgequant_cancelled_requests_total{{model="{MODEL}"}}')


def test_cache_tokens_bound_the_batched_cache(artifact, cli):
    metrics = Metrics()
    runner = open_runner(artifact.path, n_ctx=256, need_logits=False)
    worker = ModelWorker(MODEL, runner, 4, metrics, batch=4, batch_ctx=512)
    try:
        assert (worker.slots, worker.cache_tokens, worker.cache_use) == (4, 512, 0.0)
        assert "4 requests decoded together" in worker.describe() and "cache of 512 tokens" in worker.describe()
    finally:
        worker.stop()
    refused = cli("serve", str(artifact.path), "--ctx", "256", "--cache-tokens", "100")
    assert refused.returncode != 0 and "--cache-tokens 100 is less than one request's context" in refused.stderr


def test_a_batched_worker_wakes_the_event_loop_once_per_step(artifact):
    """Four requests decoded together: their deltas of one step reach the loop in one thread-safe
    call (each call writes to the loop's wake-up pipe), and every delta still arrives, in order:
    each text equals the request's text served alone by a `--batch 1` worker (the runner's own
    generation: same attention, same kernels for one token)."""
    workers = [ModelWorker(MODEL, open_runner(artifact.path, n_ctx=512, need_logits=False), 8, Metrics(), batch=b)
               for b in (4, 1)]
    loop = _CountingLoop()
    try:
        together = [c.text for c in loop.run_until_complete(submit_all(workers[0], _FOUR, [_GREEDY_24] * len(_FOUR)))]
        steps = metric_value(workers[0].metrics.render(), f'edgequant_batch_occupancy_count{{model="{MODEL}"}}')
        wakeups = loop.wakeups
        alone = [loop.run_until_complete(submit_all(workers[1], [prompt], [_GREEDY_24]))[0].text for prompt in _FOUR]
    finally:
        for worker in workers:
            worker.stop()
        loop.close()
    assert together == alone and all(together)
    assert steps > 0 and wakeups <= steps + 1, (wakeups, steps)  # + 1: the flush of the step that ended the last


_FOUR = ["The history of", "Rivers flow", "A", "Once upon a time"]
_GREEDY_24 = GenerateParams(max_tokens=24)


class _CountingLoop(asyncio.SelectorEventLoop):
    wakeups = 0

    def call_soon_threadsafe(self, *args, **kwargs):
        self.wakeups += 1
        return super().call_soon_threadsafe(*args, **kwargs)
