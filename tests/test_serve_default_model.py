"""The server on the real default model: its own chat template, and cancellation on disconnect."""

import httpx
import openai
import pytest

import edgequant
from serve_helpers import running_server, scrape, wait_until

pytest.importorskip("fastapi", reason="its extra is not installed")
pytest.importorskip("uvicorn", reason="its extra is not installed")
pytest.importorskip("llama_cpp", reason="its extra is not installed")

pytestmark = pytest.mark.slow

MODEL = "gguf-q4_k_m"
GENERATED = f'edgequant_generated_tokens_total{{model="{MODEL}"}}'
IN_FLIGHT = f'edgequant_in_flight_requests{{model="{MODEL}"}}'
CANCELLED = f'edgequant_cancelled_requests_total{{model="{MODEL}"}}'
# A worker sees a cancel flag only at its next token; on a machine running other jobs one token of
# this model has taken over 10 s and a flag 40 s to be seen, so waits on that are generous but bounded.
FLAG_SEEN_S = 120


@pytest.fixture(scope="module")
def server():
    artifact = edgequant.convert(None, "gguf:q4_k_m")
    with running_server(str(artifact.path), "--ctx", "2048") as (base, proc):
        yield base


def test_chat_uses_the_models_template_and_answers(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=40,
                                           messages=[{"role": "user", "content": "Say hello."}])
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 20  # the template's system prompt was added


def test_client_disconnect_stops_generation(server):
    before = scrape(server, GENERATED)
    body = {"model": MODEL, "prompt": "Write a very long story:", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        for _ in zip(range(3), response.iter_lines()):
            pass  # read a few events, then hang up
    # the worker drops the request at its next token and counts what it spent when it frees itself
    wait_until(lambda: scrape(server, IN_FLIGHT) == 0, FLAG_SEEN_S, "the worker to drop the disconnected request")
    short = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=30)
    assert short.status_code == 200
    spent = scrape(server, GENERATED) - before
    assert spent < 500, spent
    # a stream the client hung up on is counted under nginx's 499, never lost from the request counts
    assert wait_until(lambda: scrape(server, 'edgequant_requests_total{path="/v1/completions",status="499"}') >= 1, 10,
                      "the dropped stream to be counted")


def test_request_past_the_timeout_gets_504_and_is_cancelled():
    artifact = edgequant.convert(None, "gguf:q4_k_m")
    with running_server(str(artifact.path), "--request-timeout", "1", "--batch", "1") as (base, proc):
        response = httpx.post(f"{base}/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": "Write a very long story:", "max_tokens": 1000, "temperature": 0})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        wait_until(lambda: scrape(base, CANCELLED) >= 1, FLAG_SEEN_S, "the timed-out request to be counted as cancelled")
        assert scrape(base, CANCELLED) == 1
        assert httpx.get(f"{base}/health").status_code == 200
